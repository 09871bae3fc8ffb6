//! The shared stack store, kernel side. A tool declares it with `stack_store!()` and asks
//! `stacks().user(&ctx)` / `.kernel(&ctx)` for an id; an unwinder of its own fills
//! `stacks().scratch()` and calls `.store()`. Stacks live in a hash map keyed by a 64-bit hash of
//! their frames, allocated on use (no preallocation), so a size limit costs nothing until used.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_NO_PREALLOC, BPF_F_USER_STACK},
    btf_maps::{HashMap, PerCpuArray},
    helpers::generated::bpf_get_stack,
};
use memtrace_common::stack::{
    HASH_SEED, MAX_FRAMES, STORE_COLLIDED, STORE_FULL, STORE_STAT_COUNT, STORE_STORED, STORE_UNREADABLE, Stack,
    hash_finish, hash_step,
};

use crate::{
    BPF_NOEXIST, EEXIST, bump,
    unwind::{self, UserRegs},
};

/// End of the x86-64 user address space (47-bit, and 56-bit with 5-level paging).
const USER_END: u64 = 1 << 56;

/// Map flags of the store: entries are allocated when inserted.
pub const STORE_FLAGS: usize = BPF_F_NO_PREALLOC as usize;
/// Default capacity; user space sets the real one (`--max-stacks`) before load.
pub const DEFAULT_CAPACITY: usize = memtrace_common::stack::DEFAULT_CAPACITY as usize;
pub const STAT_SLOTS: usize = STORE_STAT_COUNT as usize;

/// Why a capture has no id.
#[derive(Copy, Clone, PartialEq, Eq)]
pub enum Lost {
    /// The store reached its capacity.
    Full,
    /// The helper could not read the stack (no user registers, fault) or it was empty.
    Unreadable,
    /// The hash matched another stack already stored.
    Collided,
}

/// A capture's id, or `STACK_LOST` counted in `stats`: a collision at `collided`, any other
/// loss at `lost`.
#[inline(always)]
pub fn id_or_counted<const N: usize>(
    capture: Result<u64, Lost>,
    stats: &PerCpuArray<u64, N>,
    collided: u32,
    lost: u32,
) -> u64 {
    match capture {
        Ok(id) => id,
        Err(why) => {
            bump(stats, if why == Lost::Collided { collided } else { lost });
            memtrace_common::STACK_LOST
        }
    }
}

/// The three maps of one tool's store, by reference (see `stack_store!`).
pub struct Store<const N: usize> {
    pub stacks: &'static HashMap<u64, Stack, N, STORE_FLAGS>,
    pub scratch: &'static PerCpuArray<Stack, 1>,
    pub stats: &'static PerCpuArray<u64, STAT_SLOTS>,
}

impl<const N: usize> Store<N> {
    /// The user stack of the current task.
    #[inline(always)]
    pub fn user<C: EbpfContext>(&self, ctx: &C) -> Result<u64, Lost> {
        self.capture(ctx, BPF_F_USER_STACK as u64)
    }

    /// The user stack of the current task, in process `pid`: walked with the unwind tables
    /// when user space enabled them (see `unwind`), else by `bpf_get_stack` (frame pointers).
    /// `regs`: the user registers when the program has them (a uprobe), else None to take
    /// those the task saved on entering the kernel.
    #[inline(always)]
    pub fn user_walked<C: EbpfContext>(&self, ctx: &C, regs: Option<UserRegs>, pid: u32) -> Result<u64, Lost> {
        if !unwind::tables_enabled() {
            unwind::count_fp_walk();
            return self.user(ctx);
        }
        let Some(regs) = regs.or_else(UserRegs::current) else { return Err(self.lost(Lost::Unreadable)) };
        // Kernel threads have no user registers (all zero).
        if regs.ip == 0 || regs.ip >= USER_END {
            return Err(self.lost(Lost::Unreadable));
        }
        match unwind::walk(regs, pid) {
            Some((stack, id)) => self.store_as(stack, id),
            None => Err(self.lost(Lost::Unreadable)),
        }
    }

    /// A stack of one frame, the return address `regs` are at (a uretprobe's): the call
    /// site alone, without a walk.
    #[inline(always)]
    pub fn call_site(&self, regs: Option<UserRegs>) -> Result<u64, Lost> {
        let Some(regs) = regs else { return Err(self.lost(Lost::Unreadable)) };
        let Some(stack) = self.scratch() else { return Err(self.lost(Lost::Unreadable)) };
        // SAFETY: this CPU's scratch slot.
        let stack = unsafe { &mut *stack };
        stack.ips[0] = regs.ip;
        stack.len = 1;
        self.store(stack)
    }

    /// The kernel stack at this point.
    #[inline(always)]
    pub fn kernel<C: EbpfContext>(&self, ctx: &C) -> Result<u64, Lost> {
        self.capture(ctx, 0)
    }

    /// The stack `bpf_get_stack` gives for `flags` (`BPF_F_USER_STACK` or 0).
    #[inline(always)]
    pub fn capture<C: EbpfContext>(&self, ctx: &C, flags: u64) -> Result<u64, Lost> {
        let Some(stack) = self.scratch() else { return Err(self.lost(Lost::Unreadable)) };
        // SAFETY: the helper writes at most the size given into the scratch slot, and zeroes
        // what it does not fill.
        let bytes =
            unsafe { bpf_get_stack(ctx.as_ptr(), (&raw mut (*stack).ips).cast(), (MAX_FRAMES * 8) as u32, flags) };
        if bytes <= 0 {
            return Err(self.lost(Lost::Unreadable));
        }
        // SAFETY: this CPU's scratch slot.
        let stack = unsafe { &mut *stack };
        stack.len = (bytes as u32 / 8).min(MAX_FRAMES as u32);
        self.store(stack)
    }

    /// This CPU's scratch stack, for an unwinder that fills it itself: set `ips[..len]` and
    /// `len`, then call `store`.
    #[inline(always)]
    pub fn scratch(&self) -> Option<*mut Stack> {
        self.scratch.get_ptr_mut(0)
    }

    /// Stores `stack` (the scratch one: the helpers want map memory) unless already there;
    /// returns its id.
    #[inline(always)]
    pub fn store(&self, stack: &Stack) -> Result<u64, Lost> {
        let len = stack.len;
        if len == 0 {
            return Err(self.lost(Lost::Unreadable));
        }
        let mut h = HASH_SEED;
        for i in 0..MAX_FRAMES {
            if i as u32 >= len {
                break;
            }
            h = hash_step(h, stack.ips[i]);
        }
        self.store_as(stack, hash_finish(h, len))
    }

    /// `store` for a stack whose id its walker already has (`stack::hash` of its frames).
    #[inline(always)]
    pub fn store_as(&self, stack: &Stack, id: u64) -> Result<u64, Lost> {
        let len = stack.len;
        if len == 0 {
            return Err(self.lost(Lost::Unreadable));
        }
        // The common case, a stack seen before: one lock-free lookup. Comparing the length and
        // the innermost frame catches a colliding hash at no real cost.
        if let Some(known) = self.stacks.get_ptr(id) {
            // SAFETY: pointer from the lookup; entries are never removed while tracing.
            return if unsafe { (*known).len == len && (*known).ips[0] == stack.ips[0] } {
                Ok(id)
            } else {
                Err(self.lost(Lost::Collided))
            };
        }
        match self.stacks.insert(id, stack, BPF_NOEXIST) {
            Ok(()) => {
                bump(self.stats, STORE_STORED);
                Ok(id)
            }
            // Another CPU stored the same stack in between.
            Err(EEXIST) => Ok(id),
            // E2BIG at capacity, ENOMEM when the kernel cannot allocate the entry.
            Err(_) => Err(self.lost(Lost::Full)),
        }
    }

    #[inline(always)]
    fn lost(&self, why: Lost) -> Lost {
        let slot = match why {
            Lost::Full => STORE_FULL,
            Lost::Unreadable => STORE_UNREADABLE,
            Lost::Collided => STORE_COLLIDED,
        };
        bump(self.stats, slot);
        why
    }
}

/// Declares the stack store's maps (`STACKS`, `STACK_SCRATCH`, `STACK_STATS`, names user space
/// reads) in the calling object, and `fn stacks()` to use them.
#[macro_export]
macro_rules! stack_store {
    () => {
        #[aya_ebpf::macros::btf_map]
        static STACKS: aya_ebpf::btf_maps::HashMap<
            u64,
            memtrace_common::stack::Stack,
            { $crate::stack::DEFAULT_CAPACITY },
            { $crate::stack::STORE_FLAGS },
        > = aya_ebpf::btf_maps::HashMap::new();
        #[aya_ebpf::macros::btf_map]
        static STACK_SCRATCH: aya_ebpf::btf_maps::PerCpuArray<memtrace_common::stack::Stack, 1> =
            aya_ebpf::btf_maps::PerCpuArray::new();
        #[aya_ebpf::macros::btf_map]
        static STACK_STATS: aya_ebpf::btf_maps::PerCpuArray<u64, { $crate::stack::STAT_SLOTS }> =
            aya_ebpf::btf_maps::PerCpuArray::new();

        /// This object's stack store.
        #[inline(always)]
        fn stacks() -> $crate::stack::Store<{ $crate::stack::DEFAULT_CAPACITY }> {
            $crate::stack::Store { stacks: &STACKS, scratch: &STACK_SCRATCH, stats: &STACK_STATS }
        }
    };
}
