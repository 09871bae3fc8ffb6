//! brkstack: brk calls per (pid, user stack), with the heap growth each one caused.

use crate::user_pod;

/// Key of the per-stack totals: the same stack id in two processes is two rows.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct BrkKey {
    pub pid: u32,
    pub _pad: u32,
    pub stack_id: u64,
}

/// brk calls of one stack and the net bytes by which they moved the break.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct BrkTotal {
    pub calls: u64,
    /// Signed (two's complement): a shrinking break subtracts.
    pub bytes: u64,
    pub comm: [u8; 16],
}

// A user stack is walked by the shared unwinder (`unwind`): glibc's sbrk uses rbp as a
// general register, so a frame-pointer walk stops in libc, while the unwind tables go on.

/// Settings written into the object before it is loaded.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Config {
    /// Non-zero: send every call to user space (`--events`).
    pub events: u32,
    /// memtrace itself: its own symbolizing would otherwise feed back into the counts.
    pub self_pid: u32,
}

/// Offsets of the fields read in syscalls:sys_enter_brk (`brk`) and sys_exit_brk (`ret`).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Offsets {
    pub enter_brk: u32,
    pub exit_ret: u32,
}

/// Event kinds on the ring buffer.
pub const EV_CALL: u32 = 1;
/// First call seen from a (pid, stack): user space symbolizes it while the process lives.
pub const EV_NEW_STACK: u32 = 2;

/// `Event::flags`: the previous break of the process was not known, so growth is unknown.
pub const FLAG_UNKNOWN_PREV: u32 = 1;

#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Event {
    pub kind: u32,
    pub pid: u32,
    pub tid: u32,
    pub flags: u32,
    pub stack_id: u64,
    /// The break asked for (0 asks for the current one).
    pub requested: u64,
    /// The break after the call (the old one when the kernel refused).
    pub result: u64,
    /// result minus the previous break (signed); 0 when `FLAG_UNKNOWN_PREV`.
    pub growth: u64,
    pub comm: [u8; 16],
}

/// Indices of the per-CPU counters in `STATS`: the tool's own blind spots.
/// Calls whose stack could not be recorded (counted under a "[lost stack]" row).
pub const STAT_STACK_LOST: u32 = 0;
/// Calls not counted because the per-stack map was full.
pub const STAT_TOTALS_FULL: u32 = 1;
/// Calls that moved the break of a process whose previous break was unknown.
pub const STAT_UNKNOWN_PREV: u32 = 2;
/// Exits seen without their entry (attached mid-call, or the pending map was full).
pub const STAT_NO_ENTRY: u32 = 3;
/// Two different stacks hashed to the same id: the later one is counted without a stack.
pub const STAT_STACK_COLLISION: u32 = 4;
pub const STAT_COUNT: u32 = 5;

user_pod!(BrkKey, BrkTotal, Config, Offsets, Event);

/// The maps and globals user space finds by name in the object.
pub mod names {
    crate::names!(CONFIG, OFFSETS, STACKS, TOTALS, LAST_BRK, STATS);
}
