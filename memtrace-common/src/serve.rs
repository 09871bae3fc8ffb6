//! serve: the agent's own counters, summed per memory cgroup in the kernel (page faults,
//! swap-ins, reclaim latency) and read at each scrape.

use crate::user_pod;

/// Timed reclaim kinds, the rows of `CgroupStats::hist`.
pub const KIND_DIRECT: u32 = 0;
pub const KIND_MEMCG: u32 = 1;
pub const KINDS: u32 = 2;
pub const KIND_NAMES: [&str; KINDS as usize] = ["direct", "memcg"];

/// log2 microsecond buckets: slot i counts latencies in [2^i, 2^(i+1)) us, slot 0 also < 1 us.
pub const HIST_SLOTS: u32 = 26;

/// Groups tracked at once: the bound on the metrics' cardinality (a group past it is counted
/// in `STAT_CGROUPS_FULL`, as a blind spot).
pub const MAX_CGROUPS: u32 = 2048;

/// Counters in `STATS`.
pub const STAT_KSWAPD_WAKEUPS: u32 = 0;
/// Events of a group that found the per-group map full.
pub const STAT_CGROUPS_FULL: u32 = 1;
/// Reclaims whose start was not recorded (the start map full).
pub const STAT_STARTS_FULL: u32 = 2;
/// Events whose task's memory cgroup could not be read.
pub const STAT_NO_CGROUP: u32 = 3;
pub const STAT_COUNT: u32 = 4;

/// One memory cgroup's counters (per CPU; user space sums them).
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct CgroupStats {
    pub faults_user: u64,
    pub faults_kernel: u64,
    pub swapins: u64,
    pub reclaim_ns: [u64; KINDS as usize],
    pub reclaims: [u64; KINDS as usize],
    pub hist: [[u64; HIST_SLOTS as usize]; KINDS as usize],
}

impl CgroupStats {
    pub const ZERO: CgroupStats = CgroupStats {
        faults_user: 0,
        faults_kernel: 0,
        swapins: 0,
        reclaim_ns: [0; KINDS as usize],
        reclaims: [0; KINDS as usize],
        hist: [[0; HIST_SLOTS as usize]; KINDS as usize],
    };
}

user_pod!(CgroupStats);

/// The maps and globals user space finds by name in the object.
pub mod names {
    crate::names!(CGROUPS);
}
