//! serve: the agent's per-memory-cgroup counters, summed per CPU in the kernel: page faults,
//! swap-ins (kprobe, where the kernel has kprobes), kswapd wake-ups, and the latency of
//! direct and memcg reclaim as log2 histograms. Keyed by the kernfs id of the current
//! task's memory cgroup (`current_memcg_id`), which user space turns into a path at each scrape.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    btf_maps::{HashMap, PerCpuArray, PerCpuHashMap},
    helpers::bpf_ktime_get_ns,
    macros::{btf_map, kprobe, tracepoint},
    programs::{ProbeContext, TracePointContext},
};
use memtrace_common::serve::{
    CgroupStats, HIST_SLOTS, KIND_DIRECT, KIND_MEMCG, MAX_CGROUPS, STAT_CGROUPS_FULL, STAT_COUNT, STAT_KSWAPD_WAKEUPS,
    STAT_NO_CGROUP, STAT_STARTS_FULL,
};
use memtrace_ebpf::{BPF_NOEXIST, bump, current_memcg_id, current_pid_tgid, log2};

memtrace_ebpf::license!();

#[btf_map]
static CGROUPS: PerCpuHashMap<u64, CgroupStats, { MAX_CGROUPS as usize }> = PerCpuHashMap::new();
/// A zeroed row to create groups from: a CgroupStats on the stack would leave too little of
/// the 512 bytes for the calls beside it on older kernels.
#[btf_map]
static ZERO: PerCpuArray<CgroupStats, 1> = PerCpuArray::new();
/// Reclaim start per (thread, kind).
#[btf_map]
static STARTS: HashMap<u64, u64, 16_384> = HashMap::new();
#[btf_map]
static STATS: PerCpuArray<u64, { STAT_COUNT as usize }> = PerCpuArray::new();

/// The current task's group's counters on this CPU, created at its first event.
#[inline(always)]
fn row() -> Option<*mut CgroupStats> {
    let id = current_memcg_id();
    if id == 0 {
        bump(&STATS, STAT_NO_CGROUP);
        return None;
    }
    if let Some(row) = CGROUPS.get_ptr_mut(id) {
        return Some(row);
    }
    // EEXIST (another CPU made it first) is fine: each CPU has its own value.
    let zero = ZERO.get_ptr(0)?;
    // SAFETY: the map's own (never written) zeroed slot.
    let _ = CGROUPS.insert(id, unsafe { &*zero }, BPF_NOEXIST);
    let row = CGROUPS.get_ptr_mut(id);
    if row.is_none() {
        bump(&STATS, STAT_CGROUPS_FULL);
    }
    row
}

#[tracepoint]
pub fn serve_fault_user(_ctx: TracePointContext) -> u32 {
    if let Some(row) = row() {
        // SAFETY: this CPU's copy of the row; programs do not preempt each other on a CPU.
        unsafe { (*row).faults_user += 1 };
    }
    0
}

#[tracepoint]
pub fn serve_fault_kernel(_ctx: TracePointContext) -> u32 {
    if let Some(row) = row() {
        // SAFETY: as above.
        unsafe { (*row).faults_kernel += 1 };
    }
    0
}

/// swap_read_folio (6.10+) or swap_readpage: one call per page or folio read from swap, in
/// the task that waits for it.
#[kprobe]
pub fn serve_swapin(_ctx: ProbeContext) -> u32 {
    if let Some(row) = row() {
        // SAFETY: as above.
        unsafe { (*row).swapins += 1 };
    }
    0
}

#[tracepoint]
pub fn serve_kswapd(_ctx: TracePointContext) -> u32 {
    bump(&STATS, STAT_KSWAPD_WAKEUPS);
    0
}

#[inline(always)]
fn start_key(kind: u32) -> u64 {
    (current_pid_tgid() << 1) | kind as u64
}

#[inline(always)]
fn begin(kind: u32) -> u32 {
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if STARTS.insert(start_key(kind), now, 0).is_err() {
        bump(&STATS, STAT_STARTS_FULL);
    }
    0
}

#[inline(always)]
fn end(kind: u32) -> u32 {
    let key = start_key(kind);
    // SAFETY: value copied out of the map at once.
    let Some(start) = (unsafe { STARTS.get(&key) }).copied() else { return 0 };
    let _ = STARTS.remove(&key);
    // SAFETY: helper without preconditions.
    let ns = unsafe { bpf_ktime_get_ns() }.saturating_sub(start);
    let Some(row) = row() else { return 0 };
    let slot = log2(ns / 1000).min(HIST_SLOTS - 1) as usize;
    let k = kind as usize & 1;
    // SAFETY: this CPU's copy of the row; k and slot are bounded above.
    unsafe {
        (*row).reclaim_ns[k] += ns;
        (*row).reclaims[k] += 1;
        (*row).hist[k][slot] += 1;
    }
    0
}

#[tracepoint]
pub fn serve_direct_begin(_ctx: TracePointContext) -> u32 {
    begin(KIND_DIRECT)
}

#[tracepoint]
pub fn serve_direct_end(_ctx: TracePointContext) -> u32 {
    end(KIND_DIRECT)
}

#[tracepoint]
pub fn serve_memcg_begin(_ctx: TracePointContext) -> u32 {
    begin(KIND_MEMCG)
}

#[tracepoint]
pub fn serve_memcg_end(_ctx: TracePointContext) -> u32 {
    end(KIND_MEMCG)
}
