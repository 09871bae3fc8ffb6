//! What a memleak report could not see: its blind spots, counted in the kernel and in user
//! space, named in every report so that a quiet one is never mistaken for a complete one.

use serde::Serialize;

use crate::output::{stack_blind_spots, stack_store_full};

/// memleak's blind spots.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct BlindSpots {
    /// Allocations not tracked because the per-address map was full.
    pub map_full: u64,
    /// Allocations recorded without their stack.
    pub stacks_lost: u64,
    /// Frees of addresses never seen allocated (made before attach, or sampled out).
    pub unknown_frees: u64,
    /// Allocations at an address already tracked: its free was not seen, so the older
    /// block's record was replaced (its bytes no longer count).
    pub replaced: u64,
    /// Allocations not counted because the per-stack map was full.
    pub stacks_full: u64,
    /// Events that did not reach user space.
    pub events_lost: u64,
    /// Processes (forked children, new images) whose probes went in after they had started
    /// running (`-p --children`): their first moments were not seen.
    pub late_processes: u64,
    /// Images a followed process exec'd into whose allocator could not be probed.
    pub unprobed_images: u64,
    /// Children not followed because memleak's process table was full.
    pub untracked_children: u64,
    /// Processes recording in themselves that ended without an exit stop (SIGKILL): what
    /// they did after the report before is not seen.
    pub unread_exits: u64,
    /// Frees a child made while its inheritance was being copied that could not be noted:
    /// the block may show as outstanding in the child.
    pub early_frees_lost: u64,
    /// Stacks the stack store had no room for (each one an allocation in `stacks_lost`), and
    /// the store's capacity (`--max-stacks`).
    pub stack_store_full: u64,
    pub stack_store_capacity: u32,
    /// Freed blocks the record of freed blocks dropped for room (`--freed-record`): a second
    /// free of one is told as an invalid free, not as a double free.
    pub freed_evicted: u64,
    /// Memory errors found but not reported (overwritten before memtrace read them).
    pub errors_lost: u64,
    /// How the user stacks' walks ended (all zero with `--unwind fp`).
    pub cut_stacks: crate::unwind::CutStacks,
    /// The frames of the stacks shown, and those without a function name by cause.
    pub unnamed_frames: crate::symbolize::UnnamedFrames,
}

impl std::fmt::Display for BlindSpots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let store_full = stack_store_full(self.stack_store_capacity);
        let spots = [
            (self.map_full, "allocations untracked (allocation map full: raise --max-allocs)"),
            (self.stacks_lost, "allocations without a stack"),
            (self.stack_store_full, &store_full),
            (self.unknown_frees, "frees of addresses not seen allocated"),
            (
                self.freed_evicted,
                "freed blocks dropped from the freed-block record (a second free of one shows as an invalid free: raise --freed-record)",
            ),
            (self.errors_lost, "memory errors lost before memtrace read them"),
            (self.replaced, "frees missed (an address allocated again without one)"),
            (self.stacks_full, "allocations uncounted (stack-totals map full: raise --max-stacks)"),
            (self.events_lost, "events lost (ring buffer full)"),
            (self.late_processes, "processes traced from a few ms after they started (allocations before not seen)"),
            (self.unprobed_images, "exec'd images whose allocator could not be probed (-v says why)"),
            (self.untracked_children, "child processes not followed (process table full)"),
            (self.early_frees_lost, "frees during a child's inheritance copy not noted (counts may be high)"),
            (
                self.unread_exits,
                "processes killed before their in-process recorder was read at exit (their last report's blocks are shown)",
            ),
        ];
        f.write_str(&stack_blind_spots(&spots, &self.cut_stacks, &self.unnamed_frames))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blind_spots_are_named() {
        assert_eq!(BlindSpots::default().to_string(), "blind spots: none");
        let d = BlindSpots { unknown_frees: 3, map_full: 2, ..Default::default() };
        let s = d.to_string();
        assert!(s.starts_with("blind spots: 2 allocations untracked"), "{s}");
        assert!(s.contains("3 frees of addresses not seen allocated"), "{s}");
        let d = BlindSpots { replaced: 2, ..Default::default() };
        assert_eq!(d.to_string(), "blind spots: 2 frees missed (an address allocated again without one)");
        let d = BlindSpots { stacks_lost: 5, stack_store_full: 4, stack_store_capacity: 64, ..Default::default() };
        assert_eq!(
            d.to_string(),
            "blind spots: 5 allocations without a stack, 4 stacks not stored (stack store of 64 full: raise \
             --max-stacks)"
        );
        // A frame without a name is a blind spot: "none" is never said over one.
        let unnamed_frames = crate::symbolize::UnnamedFrames { frames: 40, no_symbol: 3, ..Default::default() };
        let d = BlindSpots { unnamed_frames, ..Default::default() };
        assert_eq!(d.to_string(), "blind spots: 3 frames without a name (no symbol in their file)");
    }
}
