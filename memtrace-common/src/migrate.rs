//! migrate: page migrations summed in the kernel per reason (all tasks, for the comparison
//! with /proc/vmstat) and per process and reason (the tasks the filter keeps).

use crate::user_pod;

/// The object's globals and maps beyond `crate::names`, by the names user space finds them.
pub mod names {
    crate::names!(OFFSETS, TOTALS, PROCS, STATS);
}

/// What one mm_migrate_pages record adds to, in this order in `Counts::n` and in `TOTALS`.
pub const SUCCEEDED: usize = 0;
pub const FAILED: usize = 1;
pub const THP_SUCCEEDED: usize = 2;
pub const THP_FAILED: usize = 3;
pub const THP_SPLIT: usize = 4;
/// Large folios split (6.8+; 0 where the kernel has no such field).
pub const LARGE_SPLIT: usize = 5;
/// migrate_pages calls.
pub const CALLS: usize = 6;
pub const COUNTERS: usize = 7;
pub const COUNTER_NAMES: [&str; COUNTERS] =
    ["succeeded", "failed", "thp_succeeded", "thp_failed", "thp_split", "large_split", "calls"];

/// Reasons 0..MAX_REASON have a row of their own in `TOTALS`; any higher one shares the last.
pub const MAX_REASON: u32 = 31;
pub const REASON_ROWS: u32 = MAX_REASON + 1;

/// Counters in `STATS`.
pub const STAT_PROCS_FULL: u32 = 0;
pub const STAT_COUNT: u32 = 1;

/// A field the running kernel's record does not have.
pub const FIELD_ABSENT: u32 = u32::MAX;

/// Offsets of mm_migrate_pages' fields, indexed as `Counts::n` (CALLS unused), then `reason`.
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct Offsets {
    pub counts: [u32; COUNTERS],
    pub reason: u32,
}

impl Offsets {
    pub const ABSENT: Offsets = Offsets { counts: [FIELD_ABSENT; COUNTERS], reason: FIELD_ABSENT };
}

#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ProcKey {
    pub pid: u32,
    pub reason: u32,
}

#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Counts {
    pub n: [u64; COUNTERS],
    /// The comm of the thread that first migrated for this key.
    pub comm: [u8; 16],
    /// Its memory cgroup then (`current_memcg_id`), for a process gone by the report.
    pub memcg_id: u64,
}

user_pod!(Offsets, ProcKey, Counts);
