//! compaction: one event per compaction of a zone (direct, by kcompactd, proactive, or asked
//! for through /proc/sys/vm/compact_memory), with its latency and result.

use crate::user_pod;

/// The maps and globals user space finds by name in the object.
pub mod names {
    crate::names!(OFFSETS);
}

/// Field offsets in the compaction tracepoints, from the running kernel's format files.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Offsets {
    /// mm_compaction_begin / mm_compaction_end: the zone's pfn range and the mode.
    pub zone_start: u32,
    pub zone_end: u32,
    pub sync: u32,
    /// mm_compaction_end: the result.
    pub status: u32,
    /// mm_compaction_finished: node, zone index and order of the compaction under way.
    pub nid: u32,
    pub zone: u32,
    pub order: u32,
    pub _pad: u32,
}

/// A compaction under way on one thread, between mm_compaction_begin and mm_compaction_end.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Running {
    pub start_ns: u64,
    pub zone_start: u64,
    pub zone_end: u64,
    /// From the latest mm_compaction_finished; `UNKNOWN` until one fired.
    pub nid: i32,
    pub zone: i32,
    pub order: i32,
    pub sync: u32,
}

/// Node, zone or order not seen (no mm_compaction_finished between begin and end).
pub const UNKNOWN: i32 = i32::MIN;

#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Event {
    pub pid: u32,
    pub tid: u32,
    pub comm: [u8; 16],
    pub cgroup_id: u64,
    pub start_ns: u64,
    pub latency_ns: u64,
    pub zone_start: u64,
    pub zone_end: u64,
    pub nid: i32,
    pub zone: i32,
    /// -1 for a whole-zone compaction (compact_memory, proactive), else the allocation order.
    pub order: i32,
    pub status: i32,
    pub sync: u32,
    pub _pad: u32,
}

user_pod!(Offsets, Running, Event);
