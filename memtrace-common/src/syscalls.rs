//! What the syscall snoops (mmapsnoop, shmsnoop) share: the entry tracepoint keeps a call's
//! arguments per thread, and the exit tracepoint sends them with the result as one `Event`.
//! Each tool numbers its calls (`CALL_*` in its own module) from 0.

use crate::user_pod;

/// Most arguments a call has (mmap's six).
pub const MAX_ARGS: usize = 6;
/// Most calls one tool follows (shmsnoop's four).
pub const MAX_CALLS: usize = 4;

/// A finished call: the tool's call number, its arguments in order, its result.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Event {
    /// bpf_ktime_get_ns at entry.
    pub ts_ns: u64,
    pub pid: u32,
    pub tid: u32,
    pub call: u32,
    pub _pad: u32,
    pub args: [u64; MAX_ARGS],
    /// The syscall's return value: an id, an address, 0, or a negated errno.
    pub ret: i64,
    pub comm: [u8; 16],
    /// The caller's memory cgroup, read at entry (`current_memcg_id`).
    pub memcg_id: u64,
}

/// Byte offsets, per call number, of the fields read from its syscalls tracepoints, from the
/// running kernel's `format` files.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Offsets {
    /// sys_enter_<call>: the arguments, in order.
    pub args: [[u32; MAX_ARGS]; MAX_CALLS],
    /// How many of `args` each call has.
    pub nargs: [u32; MAX_CALLS],
    /// sys_exit_<call>: `ret`.
    pub ret: [u32; MAX_CALLS],
}

/// Settings written into the object before it is loaded.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Config {
    /// Non-zero: send only calls that failed (`--failed`).
    pub failed_only: u32,
    /// The tracer's own process, whose calls would otherwise feed back into the trace.
    pub self_pid: u32,
}

user_pod!(Event, Offsets, Config);

/// The maps and globals user space finds by name in the object.
pub mod names {
    crate::names!(CONFIG, OFFSETS);
}
