//! faults: page faults counted per (pid, user stack, kernel stack) and per process.

use crate::user_pod;

/// Key of the per-stack counts. `kernel_stack` is `STACK_LOST` for faults taken in user mode.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct FaultKey {
    pub pid: u32,
    /// `KIND_USER` or `KIND_KERNEL`: which tracepoint saw it.
    pub kind: u32,
    pub user_stack: u64,
    pub kernel_stack: u64,
}

/// Faults of one process.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct ProcFaults {
    pub user: u64,
    pub kernel: u64,
    /// Faults counted in no row with their stack: a stack lost (store full, unreadable) or
    /// the counts map full. The process's stacked rows sum to `user + kernel - no_stack`.
    pub no_stack: u64,
    pub comm: [u8; 16],
    /// The process's memory cgroup at its first fault (`current_memcg_id`), for reports on a
    /// process that has exited since.
    pub memcg_id: u64,
}

#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Config {
    /// Non-zero: send every fault to user space (`--events`).
    pub events: u32,
    /// memtrace itself: its own symbolizing would otherwise feed back into the counts.
    pub self_pid: u32,
}

/// Offsets of the fields read in exceptions:page_fault_user and page_fault_kernel (one layout).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Offsets {
    pub address: u32,
    pub ip: u32,
    pub error_code: u32,
    pub _pad: u32,
}

pub const KIND_USER: u32 = 0;
pub const KIND_KERNEL: u32 = 1;

/// Event kinds on the ring buffer.
pub const EV_FAULT: u32 = 1;
/// First fault seen from a stack key: user space symbolizes it while the process lives.
pub const EV_NEW_STACK: u32 = 2;

#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Event {
    pub kind: u32,
    pub pid: u32,
    pub tid: u32,
    /// `KIND_USER` or `KIND_KERNEL`.
    pub mode: u32,
    pub user_stack: u64,
    pub kernel_stack: u64,
    pub address: u64,
    pub ip: u64,
    pub error_code: u64,
    pub comm: [u8; 16],
}

/// Indices of the per-CPU counters in `STATS`: the tool's own blind spots.
/// Faults whose user stack could not be recorded.
pub const STAT_USTACK_LOST: u32 = 0;
/// Kernel faults whose kernel stack could not be recorded.
pub const STAT_KSTACK_LOST: u32 = 1;
/// Faults not counted per stack because the counts map was full.
pub const STAT_COUNTS_FULL: u32 = 2;
/// Faults not counted per process because the process map was full.
pub const STAT_PROCS_FULL: u32 = 3;
pub const STAT_COUNT: u32 = 4;

user_pod!(FaultKey, ProcFaults, Config, Offsets, Event);

/// The maps and globals user space finds by name in the object.
pub mod names {
    crate::names!(CONFIG, OFFSETS, STACKS, COUNTS, PROCS, STATS);
}
