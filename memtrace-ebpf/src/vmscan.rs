//! vmscan: time in slab shrinking, direct reclaim and memcg reclaim, kswapd wake-ups and
//! pages written by reclaim, summed per CPU in the kernel, with log2 latency histograms.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    Global,
    btf_maps::{HashMap, PerCpuArray},
    helpers::bpf_ktime_get_ns,
    macros::{btf_map, tracepoint},
    programs::TracePointContext,
};
use memtrace_common::vmscan::{
    HIST_SLOTS, KIND_DIRECT, KIND_MEMCG, KIND_SLAB, KINDS, Offsets, STAT_CALLS, STAT_COUNT, STAT_KSWAPD_WAKEUPS,
    STAT_NS, STAT_PAGES_WRITTEN, STAT_RECLAIMED,
};
use memtrace_ebpf::{bump, current_pid_tgid, log2, tp_u64, wanted};

memtrace_ebpf::license!();

memtrace_ebpf::filter!();

#[unsafe(no_mangle)]
static OFFSETS: Global<Offsets> = Global::new(Offsets { direct_end_reclaimed: 0, memcg_end_reclaimed: 0 });

/// Start time per (thread, kind): slab shrinking runs inside the reclaims, so kinds nest.
#[btf_map]
static STARTS: HashMap<u64, u64, 16_384> = HashMap::new();
#[btf_map]
static STATS: PerCpuArray<u64, { STAT_COUNT as usize }> = PerCpuArray::new();
#[btf_map]
static HIST: PerCpuArray<u64, { (KINDS * HIST_SLOTS) as usize }> = PerCpuArray::new();

#[inline(always)]
fn start_key(kind: u32) -> u64 {
    (current_pid_tgid() << 2) | kind as u64
}

#[inline(always)]
fn add(index: u32, delta: u64) {
    if let Some(slot) = STATS.get_ptr_mut(index) {
        // SAFETY: the slot belongs to this CPU and programs do not preempt each other on it.
        unsafe { *slot += delta };
    }
}

#[inline(always)]
fn begin(kind: u32) -> u32 {
    if !wanted(&FILTER.load()) {
        return 0;
    }
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let _ = STARTS.insert(start_key(kind), now, 0);
    0
}

/// Ends a timed section begun on this thread: adds its time, call and reclaimed pages.
#[inline(always)]
fn end(kind: u32, reclaimed: u64) -> u32 {
    let key = start_key(kind);
    // SAFETY: value copied out of the map at once.
    let Some(start) = (unsafe { STARTS.get(&key) }).copied() else { return 0 };
    let _ = STARTS.remove(&key);
    // SAFETY: helper without preconditions.
    let ns = unsafe { bpf_ktime_get_ns() }.saturating_sub(start);
    add(kind * 3 + STAT_NS, ns);
    add(kind * 3 + STAT_CALLS, 1);
    add(kind * 3 + STAT_RECLAIMED, reclaimed);
    let slot = log2(ns / 1000).min(HIST_SLOTS - 1);
    bump(&HIST, kind * HIST_SLOTS + slot);
    0
}

#[tracepoint]
pub fn vmscan_slab_start(_ctx: TracePointContext) -> u32 {
    begin(KIND_SLAB)
}

#[tracepoint]
pub fn vmscan_slab_end(_ctx: TracePointContext) -> u32 {
    end(KIND_SLAB, 0)
}

#[tracepoint]
pub fn vmscan_direct_begin(_ctx: TracePointContext) -> u32 {
    begin(KIND_DIRECT)
}

// name: mm_vmscan_direct_reclaim_end (mm_vmscan_memcg_reclaim_end has the same layout)
// format:
//  field:unsigned long nr_reclaimed; offset:8; size:8; signed:0;
#[tracepoint]
pub fn vmscan_direct_end(ctx: TracePointContext) -> u32 {
    end(KIND_DIRECT, tp_u64(&ctx, OFFSETS.load().direct_end_reclaimed))
}

#[tracepoint]
pub fn vmscan_memcg_begin(_ctx: TracePointContext) -> u32 {
    begin(KIND_MEMCG)
}

#[tracepoint]
pub fn vmscan_memcg_end(ctx: TracePointContext) -> u32 {
    end(KIND_MEMCG, tp_u64(&ctx, OFFSETS.load().memcg_end_reclaimed))
}

#[tracepoint]
pub fn vmscan_kswapd(_ctx: TracePointContext) -> u32 {
    if wanted(&FILTER.load()) {
        bump(&STATS, STAT_KSWAPD_WAKEUPS);
    }
    0
}

/// mm_vmscan_write_folio (mm_vmscan_writepage before 6.2-era kernels): one page or folio
/// written back by reclaim.
#[tracepoint]
pub fn vmscan_write(_ctx: TracePointContext) -> u32 {
    if wanted(&FILTER.load()) {
        bump(&STATS, STAT_PAGES_WRITTEN);
    }
    0
}
