//! drsnoop: one event per direct (or, with --memcg, memory-cgroup) reclaim, with its latency.

use crate::user_pod;

pub const KIND_DIRECT: u32 = 0;
pub const KIND_MEMCG: u32 = 1;
pub const KIND_NAMES: [&str; 2] = ["direct", "memcg"];

/// Settings written into the object before it is loaded.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Config {
    /// Only this thread (`-t`); 0 keeps all.
    pub tid: u32,
    /// `nr_reclaimed` offsets in the direct and memcg end tracepoints.
    pub direct_end_reclaimed: u32,
    pub memcg_end_reclaimed: u32,
    /// Length of `name` (`-n`); 0 keeps every task.
    pub name_len: u32,
    /// Keep tasks whose comm contains this (`-n`, a substring match as in bcc).
    pub name: [u8; 16],
}

#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Event {
    pub pid: u32,
    pub tid: u32,
    pub kind: u32,
    pub _pad: u32,
    pub comm: [u8; 16],
    /// bpf_ktime_get_ns at the start of the reclaim.
    pub start_ns: u64,
    pub latency_ns: u64,
    pub nr_reclaimed: u64,
    /// The reclaiming task's memory cgroup (`current_memcg_id`).
    pub memcg_id: u64,
}

user_pod!(Config, Event);

/// The maps and globals user space finds by name in the object.
pub mod names {
    crate::names!(CONFIG);
}
