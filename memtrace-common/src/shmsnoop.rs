//! shmsnoop: one event per System V shared memory call, its arguments paired with its result.

use crate::user_pod;

/// Which call an event is.
pub const CALL_SHMGET: u32 = 0;
pub const CALL_SHMAT: u32 = 1;
pub const CALL_SHMDT: u32 = 2;
pub const CALL_SHMCTL: u32 = 3;

/// A finished call. `args` are the syscall's arguments in order: shmget (key, size, shmflg),
/// shmat (shmid, shmaddr, shmflg), shmdt (shmaddr), shmctl (shmid, cmd, buf).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Event {
    /// bpf_ktime_get_ns at entry.
    pub ts_ns: u64,
    pub pid: u32,
    pub tid: u32,
    pub call: u32,
    pub _pad: u32,
    pub args: [u64; 3],
    /// The syscall's return value: an id, an address, 0, or a negated errno.
    pub ret: i64,
    pub comm: [u8; 16],
}

/// Byte offsets of the fields read from each syscalls tracepoint record, from the running
/// kernel's `format` files.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Offsets {
    /// sys_enter_shmget: key, size, shmflg.
    pub shmget: [u32; 3],
    /// sys_enter_shmat: shmid, shmaddr, shmflg.
    pub shmat: [u32; 3],
    /// sys_enter_shmdt: shmaddr.
    pub shmdt: u32,
    /// sys_enter_shmctl: shmid, cmd, buf.
    pub shmctl: [u32; 3],
    /// `ret` of sys_exit_shmget, sys_exit_shmat, sys_exit_shmdt, sys_exit_shmctl.
    pub ret: [u32; 4],
}

/// Settings written into the object before it is loaded.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Config {
    /// Non-zero: send only calls that failed (`--failed`).
    pub failed_only: u32,
    pub _pad: u32,
}

user_pod!(Event, Offsets, Config);
