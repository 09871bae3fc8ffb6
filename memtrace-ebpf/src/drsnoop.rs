//! drsnoop: each direct reclaim (and, when attached, each memcg reclaim) with its latency and
//! the pages it reclaimed, sent to user space as it ends.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    Global,
    btf_maps::HashMap,
    helpers::{bpf_get_current_comm, bpf_ktime_get_ns},
    macros::{btf_map, tracepoint},
    programs::TracePointContext,
};
use memtrace_common::drsnoop::{Config, Event, KIND_DIRECT, KIND_MEMCG};
use memtrace_ebpf::{current_pid_tgid, submit, tp_u64, wanted};

memtrace_ebpf::license!();

memtrace_ebpf::filter!();

#[unsafe(no_mangle)]
static CONFIG: Global<Config> =
    Global::new(Config { tid: 0, direct_end_reclaimed: 0, memcg_end_reclaimed: 0, name_len: 0, name: [0; 16] });

/// Start time per thread: a thread is in at most one direct or memcg reclaim at a time.
#[btf_map]
static STARTS: HashMap<u32, u64, 16_384> = HashMap::new();
memtrace_ebpf::events!(Event);

#[inline(always)]
fn begin() -> u32 {
    if !wanted(&FILTER.load()) {
        return 0;
    }
    let tid = current_pid_tgid() as u32;
    let config = CONFIG.load();
    if config.tid != 0 && tid != config.tid {
        return 0;
    }
    if config.name_len != 0 && !comm_contains(&config.name, config.name_len as usize) {
        return 0;
    }
    // SAFETY: helper without preconditions.
    let _ = STARTS.insert(tid, unsafe { bpf_ktime_get_ns() }, 0);
    0
}

/// Whether the current comm contains `name[..len]` anywhere (bcc's `-n`).
#[inline(always)]
fn comm_contains(name: &[u8; 16], len: usize) -> bool {
    let Ok(comm) = bpf_get_current_comm() else { return false };
    // Bounded loops over fixed sizes keep the verifier's work small (at most 16 x 16 steps).
    for start in 0..16 {
        let mut matched = true;
        for i in 0..16 {
            if i >= len {
                break;
            }
            if start + i >= 16 || comm[start + i] != name[i] {
                matched = false;
                break;
            }
        }
        if matched {
            return true;
        }
        if start + len >= 16 || comm[start] == 0 {
            return false;
        }
    }
    false
}

#[inline(always)]
fn end(ctx: &TracePointContext, kind: u32, reclaimed_offset: u32) -> u32 {
    let id = current_pid_tgid();
    let tid = id as u32;
    // SAFETY: value copied out of the map at once.
    let Some(start) = (unsafe { STARTS.get(&tid) }).copied() else { return 0 };
    let _ = STARTS.remove(&tid);
    let event = Event {
        pid: (id >> 32) as u32,
        tid,
        kind,
        _pad: 0,
        comm: bpf_get_current_comm().unwrap_or_default(),
        start_ns: start,
        // SAFETY: helper without preconditions.
        latency_ns: unsafe { bpf_ktime_get_ns() }.saturating_sub(start),
        nr_reclaimed: tp_u64(ctx, reclaimed_offset),
        memcg_id: memtrace_ebpf::current_memcg_id(),
    };
    submit(&EVENTS, &event, &LOST);
    0
}

#[tracepoint]
pub fn drsnoop_direct_begin(_ctx: TracePointContext) -> u32 {
    begin()
}

// name: mm_vmscan_direct_reclaim_end (mm_vmscan_memcg_reclaim_end has the same layout)
// format:
//  field:unsigned long nr_reclaimed; offset:8; size:8; signed:0;
#[tracepoint]
pub fn drsnoop_direct_end(ctx: TracePointContext) -> u32 {
    end(&ctx, KIND_DIRECT, CONFIG.load().direct_end_reclaimed)
}

#[tracepoint]
pub fn drsnoop_memcg_begin(_ctx: TracePointContext) -> u32 {
    begin()
}

#[tracepoint]
pub fn drsnoop_memcg_end(ctx: TracePointContext) -> u32 {
    end(&ctx, KIND_MEMCG, CONFIG.load().memcg_end_reclaimed)
}
