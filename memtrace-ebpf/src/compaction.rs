//! compaction: each compaction of a zone, from mm_compaction_begin to mm_compaction_end on
//! one thread, with the node, zone and order that mm_compaction_finished reports in between.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    Global,
    btf_maps::HashMap,
    helpers::{bpf_get_current_comm, bpf_ktime_get_ns},
    macros::{btf_map, tracepoint},
    programs::TracePointContext,
};
use memtrace_common::compaction::{Event, Offsets, Running, UNKNOWN};
use memtrace_ebpf::{current_pid_tgid, submit, tp_u32, tp_u64, wanted};

memtrace_ebpf::license!();

memtrace_ebpf::filter!();

#[unsafe(no_mangle)]
static OFFSETS: Global<Offsets> =
    Global::new(Offsets { zone_start: 0, zone_end: 0, sync: 0, status: 0, nid: 0, zone: 0, order: 0, _pad: 0 });

/// The compaction under way per thread: compact_zone does not nest.
#[btf_map]
static RUNNING: HashMap<u32, Running, 4096> = HashMap::new();
memtrace_ebpf::events!(Event);

// name: mm_compaction_begin
// format:
//  field:unsigned long zone_start;  offset:8;  size:8; signed:0;
//  field:unsigned long migrate_pfn; offset:16; size:8; signed:0;
//  field:unsigned long free_pfn;    offset:24; size:8; signed:0;
//  field:unsigned long zone_end;    offset:32; size:8; signed:0;
//  field:bool sync;                 offset:40; size:1; signed:0;
#[tracepoint]
pub fn compaction_begin(ctx: TracePointContext) -> u32 {
    if !wanted(&FILTER.load()) {
        return 0;
    }
    let offsets = OFFSETS.load();
    let running = Running {
        // SAFETY: helper without preconditions.
        start_ns: unsafe { bpf_ktime_get_ns() },
        zone_start: tp_u64(&ctx, offsets.zone_start),
        zone_end: tp_u64(&ctx, offsets.zone_end),
        nid: UNKNOWN,
        zone: UNKNOWN,
        order: UNKNOWN,
        // A one-byte bool: the other three bytes read are the next field's or padding.
        sync: tp_u32(&ctx, offsets.sync) & 0xff,
    };
    let _ = RUNNING.insert(current_pid_tgid() as u32, running, 0);
    0
}

// name: mm_compaction_finished (called on every step of the compaction loop)
// format:
//  field:int nid;           offset:8;  size:4; signed:1;
//  field:enum zone_type idx; offset:12; size:4; signed:0;
//  field:int order;         offset:16; size:4; signed:1;
//  field:int ret;           offset:20; size:4; signed:1;
#[tracepoint]
pub fn compaction_finished(ctx: TracePointContext) -> u32 {
    let tid = current_pid_tgid() as u32;
    let Some(running) = RUNNING.get_ptr_mut(&tid) else { return 0 };
    let offsets = OFFSETS.load();
    // SAFETY: the entry is this thread's, and only this thread's programs write it.
    unsafe {
        (*running).nid = tp_u32(&ctx, offsets.nid) as i32;
        (*running).zone = tp_u32(&ctx, offsets.zone) as i32;
        (*running).order = tp_u32(&ctx, offsets.order) as i32;
    }
    0
}

// name: mm_compaction_end
// format: mm_compaction_begin's fields, then
//  field:int status;        offset:44; size:4; signed:1;
#[tracepoint]
pub fn compaction_end(ctx: TracePointContext) -> u32 {
    let id = current_pid_tgid();
    let tid = id as u32;
    // SAFETY: value copied out of the map at once.
    let Some(running) = (unsafe { RUNNING.get(&tid) }).copied() else { return 0 };
    let _ = RUNNING.remove(&tid);
    let event = Event {
        pid: (id >> 32) as u32,
        tid,
        comm: bpf_get_current_comm().unwrap_or_default(),
        cgroup_id: memtrace_ebpf::current_memcg_id(),
        start_ns: running.start_ns,
        // SAFETY: helper without preconditions.
        latency_ns: unsafe { bpf_ktime_get_ns() }.saturating_sub(running.start_ns),
        zone_start: running.zone_start,
        zone_end: running.zone_end,
        nid: running.nid,
        zone: running.zone,
        order: running.order,
        status: tp_u32(&ctx, OFFSETS.load().status) as i32,
        sync: running.sync,
        _pad: 0,
    };
    submit(&EVENTS, &event, &LOST);
    0
}
