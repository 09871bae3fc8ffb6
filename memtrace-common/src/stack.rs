//! The stack store every stack-recording tracer shares: a stack is kept once, in a hash map
//! keyed by a 64-bit hash of its frames, and tools' keys and events carry that hash as its id.

use crate::user_pod;

/// Deepest stack kept: the kernel's default `perf_event_max_stack`, and 1 KiB per stack.
pub const MAX_FRAMES: usize = 127;

/// One stack, innermost frame first. `ips[len..]` mean nothing (left from an earlier stack when
/// an unwinder of the tool's own filled the scratch copy): readers stop at `len`.
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct Stack {
    pub len: u32,
    pub _pad: u32,
    pub ips: [u64; MAX_FRAMES],
}

impl Default for Stack {
    fn default() -> Self {
        Stack { len: 0, _pad: 0, ips: [0; MAX_FRAMES] }
    }
}

/// Capacity of a store whose tool has no `--max-stacks`; entries are allocated on use, so an
/// unused capacity costs nothing.
pub const DEFAULT_CAPACITY: u32 = 16_384;

/// Indices of the store's per-CPU counters (`STACK_STATS`), read by user space.
/// Stacks inserted: entries are never removed, so this is the store's fill level.
pub const STORE_STORED: u32 = 0;
/// Captures dropped because the store was full (raise `--max-stacks`).
pub const STORE_FULL: u32 = 1;
/// Captures whose stack could not be read (no user registers, helper error, empty stack).
pub const STORE_UNREADABLE: u32 = 2;
/// Captures whose hash matched a different stored stack (64-bit hashes: practically never).
pub const STORE_COLLIDED: u32 = 3;
pub const STORE_STAT_COUNT: u32 = 4;

/// FNV-1a-like start, then a 64-bit multiply-rotate per frame and a final avalanche: cheap in
/// the verifier's eyes (no tables) and well spread over the map's buckets.
pub const HASH_SEED: u64 = 0xcbf2_9ce4_8422_2325;
const HASH_MUL: u64 = 0x9e37_79b9_7f4a_7c15;

#[inline(always)]
pub fn hash_step(h: u64, ip: u64) -> u64 {
    (h ^ ip).wrapping_mul(HASH_MUL).rotate_left(31)
}

/// The id of a stack: never `STACK_LOST` (0).
#[inline(always)]
pub fn hash_finish(h: u64, len: u32) -> u64 {
    let mut h = h ^ len as u64;
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    if h == crate::STACK_LOST { 1 } else { h }
}

/// The id of `ips` as the kernel side computes it (for tests and user-built stacks).
pub fn hash(ips: &[u64]) -> u64 {
    hash_finish(ips.iter().fold(HASH_SEED, |h, &ip| hash_step(h, ip)), ips.len() as u32)
}

user_pod!(Stack);
