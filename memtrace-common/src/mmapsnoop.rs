//! mmapsnoop: one event per mmap, munmap or mremap, its arguments paired with its result.

use crate::user_pod;

/// Which call an event is.
pub const CALL_MMAP: u32 = 0;
pub const CALL_MUNMAP: u32 = 1;
pub const CALL_MREMAP: u32 = 2;

/// A finished call. `args` are the syscall's arguments in order: mmap (addr, len, prot,
/// flags, fd, off), munmap (addr, len), mremap (addr, old_len, new_len, flags, new_addr).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Event {
    /// bpf_ktime_get_ns at entry.
    pub ts_ns: u64,
    pub pid: u32,
    pub tid: u32,
    pub call: u32,
    pub _pad: u32,
    pub args: [u64; 6],
    /// The syscall's return value: an address, 0, or a negated errno.
    pub ret: i64,
    pub comm: [u8; 16],
}

/// Byte offsets of the fields read from each syscalls tracepoint record, from the running
/// kernel's `format` files.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Offsets {
    /// sys_enter_mmap: addr, len, prot, flags, fd, off.
    pub mmap: [u32; 6],
    /// sys_enter_munmap: addr, len.
    pub munmap: [u32; 2],
    /// sys_enter_mremap: addr, old_len, new_len, flags, new_addr.
    pub mremap: [u32; 5],
    /// `ret` of sys_exit_mmap, sys_exit_munmap, sys_exit_mremap.
    pub mmap_ret: u32,
    pub munmap_ret: u32,
    pub mremap_ret: u32,
}

/// Settings written into the object before it is loaded.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Config {
    /// Non-zero: send only calls that failed (`--failed`).
    pub failed_only: u32,
    /// The tracer's own process, whose mappings would otherwise feed back into the trace.
    pub self_pid: u32,
}

user_pod!(Event, Offsets, Config);
