//! mmapsnoop: one event per mmap, munmap or mremap, its arguments paired with its result.

/// Which call an event is.
pub const CALL_MMAP: u32 = 0;
pub const CALL_MUNMAP: u32 = 1;
pub const CALL_MREMAP: u32 = 2;

/// An `Event`'s `args`: mmap (addr, len, prot, flags, fd, off), munmap (addr, len), mremap
/// (addr, old_len, new_len, flags, new_addr).
pub use crate::syscalls::{Config, Event, Offsets};
