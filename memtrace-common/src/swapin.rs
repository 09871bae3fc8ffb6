//! swapin: swap-ins counted in the kernel per (process, user stack), read each interval.

use crate::user_pod;

/// Key of the counts map. `stack_id` is `STACK_LOST` unless `--stack` asked for stacks.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct SwapKey {
    pub pid: u32,
    pub _pad: u32,
    pub stack_id: u64,
    pub comm: [u8; 16],
}

#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Config {
    /// Non-zero: record the user stack of each swap-in (`--stack`).
    pub stacks: u32,
    pub _pad: u32,
}

/// Sent the first time a (pid, stack) is counted, so user space symbolizes it while the
/// process still lives.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct NewStack {
    pub pid: u32,
    pub _pad: u32,
    pub stack_id: u64,
}

/// `STATS` slots.
pub const STAT_COUNTS_FULL: u32 = 0;
pub const STAT_STACK_LOST: u32 = 1;
pub const STAT_COUNT: u32 = 2;

user_pod!(SwapKey, Config, NewStack);

/// The maps and globals user space finds by name in the object.
pub mod names {
    crate::names!(CONFIG, COUNTS, STATS);
}
