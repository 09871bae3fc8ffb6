//! mallocstat: each hit of glibc's `libc:memory_*` USDT probes (heap and arena growth, sbrk,
//! mallopt, retries, tcache double frees), with the user stack for the probes of heap growth.

use crate::user_pod;

/// Arguments kept per hit: glibc's memory probes have at most three.
pub const ARGS: usize = 4;

/// Set in a probe's `usdt::Spec::id` when its hits take a user stack (heap growth).
pub const WITH_STACK: u32 = 1 << 31;

/// One probe hit.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Event {
    pub pid: u32,
    pub tid: u32,
    /// The probe's number in user space's list (`WITH_STACK` cleared).
    pub id: u32,
    /// How many arguments the probe has (those past `ARGS` are not kept).
    pub count: u32,
    /// The probe's first arguments, extended to 64 bits as their specs say.
    pub args: [i64; ARGS],
    /// The user stack (`STACK_LOST` when none was asked for or it was lost).
    pub stack_id: u64,
    pub comm: [u8; 16],
}

user_pod!(Event);

/// Per-CPU counters of `STATS`: hits at an address with no spec (not a probe user space
/// attached), and stacks lost.
pub const STAT_NO_SPEC: u32 = 0;
pub const STAT_STACK_LOST: u32 = 1;
pub const STAT_STACK_COLLISION: u32 = 2;
pub const STAT_COUNT: u32 = 3;

/// The maps and globals user space finds by name in the object.
pub mod names {
    crate::names!(STACKS, STATS, USDT_SPECS);
}
