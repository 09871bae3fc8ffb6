//! vmscan: reclaim activity summed in the kernel (per-CPU counters and log2 latency
//! histograms); user space reads and diffs them every interval.

use crate::user_pod;

/// Kinds of timed reclaim work; also the histogram rows.
pub const KIND_SLAB: u32 = 0;
pub const KIND_DIRECT: u32 = 1;
pub const KIND_MEMCG: u32 = 2;
pub const KINDS: u32 = 3;
pub const KIND_NAMES: [&str; KINDS as usize] = ["shrink_slab", "direct_reclaim", "memcg_reclaim"];

/// Counters in `STATS`: per kind, nanoseconds spent, completed calls and (reclaim only) pages
/// reclaimed, at `kind * 3 + STAT_*`; then the untimed events.
pub const STAT_NS: u32 = 0;
pub const STAT_CALLS: u32 = 1;
pub const STAT_RECLAIMED: u32 = 2;
pub const STAT_KSWAPD_WAKEUPS: u32 = KINDS * 3;
pub const STAT_PAGES_WRITTEN: u32 = KINDS * 3 + 1;
pub const STAT_COUNT: u32 = KINDS * 3 + 2;

/// log2 microsecond buckets per kind in `HIST`: slot i counts latencies in [2^i, 2^(i+1)) us
/// (slot 0 also holds < 1 us).
pub const HIST_SLOTS: u32 = 32;

/// Field offsets of the end tracepoints, from the running kernel's format files.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Offsets {
    pub direct_end_reclaimed: u32,
    pub memcg_end_reclaimed: u32,
}

user_pod!(Offsets);

/// The maps and globals user space finds by name in the object.
pub mod names {
    crate::names!(OFFSETS, STATS, HIST);
}
