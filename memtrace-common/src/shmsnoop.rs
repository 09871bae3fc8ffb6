//! shmsnoop: one event per System V shared memory call, its arguments paired with its result.

/// Which call an event is.
pub const CALL_SHMGET: u32 = 0;
pub const CALL_SHMAT: u32 = 1;
pub const CALL_SHMDT: u32 = 2;
pub const CALL_SHMCTL: u32 = 3;

/// An `Event`'s `args`: shmget (key, size, shmflg), shmat (shmid, shmaddr, shmflg), shmdt
/// (shmaddr), shmctl (shmid, cmd, buf).
pub use crate::syscalls::{Config, Event, Offsets};
