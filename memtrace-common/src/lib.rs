//! Types shared by memtrace's eBPF programs and its user space: one module per tracer.
//!
//! Every struct is `#[repr(C)]` with explicit padding fields so that it is a plain byte
//! image on both sides (aya's `Pod` requires that no byte is implicit padding).
#![no_std]

pub mod brkstack;
pub mod drsnoop;
pub mod faults;
pub mod hfaults;
pub mod memleak;
pub mod mmapsnoop;
pub mod oomkill;
pub mod shmsnoop;
pub mod swapin;
pub mod vmscan;

/// Which tasks a tracer reports, set by user space before load (`-p`, `--comm`).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Filter {
    /// Process (tgid) to keep; `NO_PID` keeps all.
    pub pid: u32,
    /// Non-zero: keep only tasks whose comm equals `comm`.
    pub has_comm: u32,
    pub comm: [u8; 16],
}

user_pod!(Filter);

/// `pid` value meaning "no process": kernel allocations, or no filter.
pub const NO_PID: u32 = 0;

/// Stack id stored when the kernel could not record a stack (map full, hash collision, fault).
pub const STACK_LOST: u32 = u32::MAX;

/// Implements aya's `Pod` for the listed types when building user space.
#[macro_export]
macro_rules! user_pod {
    ($($ty:ty),+ $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: every listed type is repr(C), Copy, and has no implicit padding.
            unsafe impl aya::Pod for $ty {}
        )+
    };
}
