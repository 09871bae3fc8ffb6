//! migrate: each migrate_pages call (mm_migrate_pages) added to its reason's totals for all
//! tasks, and to its process's and reason's totals for the tasks the filter keeps.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    Global,
    btf_maps::{HashMap, PerCpuArray},
    helpers::bpf_get_current_comm,
    macros::{btf_map, tracepoint},
    programs::TracePointContext,
};
use memtrace_common::migrate::{
    CALLS, COUNTERS, Counts, FIELD_ABSENT, MAX_REASON, Offsets, ProcKey, REASON_ROWS, STAT_COUNT, STAT_PROCS_FULL,
};
use memtrace_ebpf::{BPF_NOEXIST, atomic_add, bump, current_pid, tp_u32, tp_u64, wanted};

memtrace_ebpf::license!();

memtrace_ebpf::filter!();

#[unsafe(no_mangle)]
static OFFSETS: Global<Offsets> = Global::new(Offsets::ABSENT);

/// Per reason row, `COUNTERS` counters each, summed over every task: what /proc/vmstat counts.
#[btf_map]
static TOTALS: PerCpuArray<u64, { REASON_ROWS as usize * COUNTERS }> = PerCpuArray::new();
#[btf_map]
static PROCS: HashMap<ProcKey, Counts, 16_384> = HashMap::new();
#[btf_map]
static STATS: PerCpuArray<u64, { STAT_COUNT as usize }> = PerCpuArray::new();

// name: mm_migrate_pages (6.18; 5.10 to 6.7 have no large_folio_split)
// format:
//  field:unsigned long succeeded;         offset:8;  size:8; signed:0;
//  field:unsigned long failed;            offset:16; size:8; signed:0;
//  field:unsigned long thp_succeeded;     offset:24; size:8; signed:0;
//  field:unsigned long thp_failed;        offset:32; size:8; signed:0;
//  field:unsigned long thp_split;         offset:40; size:8; signed:0;
//  field:unsigned long large_folio_split; offset:48; size:8; signed:0;
//  field:enum migrate_mode mode;          offset:56; size:4; signed:0;
//  field:int reason;                      offset:60; size:4; signed:1;
#[tracepoint]
pub fn migrate_pages(ctx: TracePointContext) -> u32 {
    let offsets = OFFSETS.load();
    let reason = tp_u32(&ctx, offsets.reason);
    let mut n = [0u64; COUNTERS];
    for (i, offset) in offsets.counts.iter().enumerate() {
        if *offset != FIELD_ABSENT {
            n[i] = tp_u64(&ctx, *offset);
        }
    }
    n[CALLS] = 1;
    let row = reason.min(MAX_REASON) as usize * COUNTERS;
    for (i, value) in n.iter().enumerate() {
        if let Some(slot) = TOTALS.get_ptr_mut((row + i) as u32) {
            // SAFETY: the slot belongs to this CPU and programs do not preempt each other on it.
            unsafe { *slot += *value };
        }
    }
    if !wanted(&FILTER.load()) {
        return 0;
    }
    let key = ProcKey { pid: current_pid(), reason };
    if PROCS.get_ptr_mut(&key).is_none() {
        let fresh = Counts {
            n: [0; COUNTERS],
            comm: bpf_get_current_comm().unwrap_or_default(),
            memcg_id: memtrace_ebpf::current_memcg_id(),
        };
        // Another CPU may have added the key meanwhile: then its entry is used.
        let _ = PROCS.insert(key, fresh, BPF_NOEXIST);
    }
    let Some(counts) = PROCS.get_ptr_mut(&key) else {
        bump(&STATS, STAT_PROCS_FULL);
        return 0;
    };
    for (i, value) in n.iter().enumerate() {
        // SAFETY: the pointer comes from the lookup just made; entries are never deleted.
        atomic_add(unsafe { &raw mut (*counts).n[i] }, *value);
    }
    0
}
