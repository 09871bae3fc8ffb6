//! Types shared by memtrace's eBPF programs and its user space: one module per tracer.
//!
//! Every struct is `#[repr(C)]` with explicit padding fields so that it is a plain byte
//! image on both sides (aya's `Pod` requires that no byte is implicit padding).
#![no_std]

pub mod brkstack;
pub mod compaction;
pub mod drsnoop;
pub mod faults;
pub mod hfaults;
pub mod mallocstat;
pub mod memleak;
pub mod migrate;
pub mod mmapsnoop;
pub mod oomkill;
pub mod segv;
pub mod serve;
pub mod shmsnoop;
pub mod stack;
pub mod swapin;
pub mod syscalls;
pub mod unwind;
pub mod usdt;
pub mod vmscan;

/// Names by which user space finds what every tracer's object declares the same way (the
/// eBPF side declares them through `memtrace_ebpf::filter!` and `memtrace_ebpf::events!`).
pub mod names {
    crate::names!(
        /// The `Filter` global.
        FILTER,
        /// The tool's ring buffer of events.
        EVENTS,
        /// Per-CPU count of events the ring buffer could not take.
        LOST,
        /// memtrace's pid namespace (`PidNs`), and the per-CPU count of tasks outside it.
        PID_NS,
        OUTSIDE_PID_NS,
        /// How the kernel side finds the current task's memory cgroup (`MemcgId`).
        MEMCG_ID,
        /// A tool's per-CPU counters.
        STATS,
        /// The stack store (`stack` module) and its counters.
        STACKS,
        STACK_STATS,
        /// The user-stack walker's globals, tables and counters (`unwind` module).
        UNWIND_MODE,
        UNWIND_TRAMPOLINE,
        UNWIND_ROWS,
        UNWIND_MAPPINGS,
        UNWIND_WANTED,
        UNWIND_STATS,
        /// USDT argument specs by probe address (`usdt` module).
        USDT_SPECS,
    );
}

/// Declares the names of an object's maps and globals that user space finds by name: each
/// constant is its own identifier, as is the eBPF side's `static`, so a misspelt name does
/// not compile, and `ALL` lets a test hold every one against the object.
#[macro_export]
macro_rules! names {
    ($($(#[$doc:meta])* $name:ident),+ $(,)?) => {
        $($(#[$doc])* pub const $name: &str = stringify!($name);)+
        /// Every name above.
        pub const ALL: &[&str] = &[$($name),+];
    };
}

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

impl Filter {
    /// Every task.
    pub const ALL: Filter = Filter { pid: 0, has_comm: 0, comm: [0; 16] };
}

user_pod!(Filter);

/// memtrace's own pid namespace, set by user space before load so that programs report
/// pids as memtrace (and its /proc) sees them. `dev` 0: memtrace runs in the initial
/// namespace, where the kernel's global ids are already the right ones.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct PidNs {
    /// Device of the nsfs inode, in the kernel's internal `dev_t` encoding (major << 20 | minor).
    pub dev: u64,
    pub ino: u64,
}

user_pod!(PidNs);

/// How the kernel side names the current task's memory cgroup, set by user space before load:
/// offsets from the kernel's BTF for `task->cgroups->subsys[memory_cgrp_id]->cgroup->kn->id`,
/// the kernfs id of the group's directory (its inode number in the memory hierarchy's mount,
/// on cgroup v1 and v2 alike).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct MemcgId {
    /// MEMCG_BY_* below.
    pub how: u32,
    pub task_cgroups: u32,
    /// `css_set.subsys` plus 8 * memory_cgrp_id.
    pub css_set_memory: u32,
    pub css_cgroup: u32,
    pub cgroup_kn: u32,
    pub kn_id: u32,
}

/// No memory cgroup is read (0 is recorded).
pub const MEMCG_BY_NONE: u32 = 0;
/// Walked from the task through the offsets.
pub const MEMCG_BY_BTF: u32 = 1;
/// No BTF, but the memory controller is on cgroup v2: the task's own v2 group
/// (bpf_get_current_cgroup_id), which is its memory cgroup or a child of it.
pub const MEMCG_BY_V2_ID: u32 = 2;

user_pod!(MemcgId);

/// Set in both halves of the id of a task outside memtrace's pid namespace, which has no pid
/// there: the rest is its global id, so per-thread keys stay unique, and no real pid has it.
pub const FOREIGN_PID: u32 = 1 << 31;

/// `pid` value meaning "no process": kernel allocations, or no filter.
pub const NO_PID: u32 = 0;

/// Stack id stored when the kernel could not record a stack (store full, unreadable stack).
/// Ids are 64-bit hashes of the frames (see `stack`), never 0.
pub const STACK_LOST: u64 = 0;

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

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use crate::{Filter, memleak::*};

    // aya reads these as plain bytes: a size above the sum of the fields would be implicit
    // padding, whose contents are undefined.
    #[test]
    fn shared_structs_have_no_implicit_padding() {
        assert_eq!(size_of::<Filter>(), 4 + 4 + 16);
        assert_eq!(size_of::<crate::PidNs>(), 8 + 8);
        assert_eq!(size_of::<crate::MemcgId>(), 4 * 6);
        assert_eq!(size_of::<crate::usdt::Arg>(), 8 + 4 * 4);
        assert_eq!(size_of::<crate::mallocstat::Event>(), 4 * 4 + 8 * 4 + 8 + 16);
        assert_eq!(size_of::<crate::usdt::Spec>(), 24 * 12 + 4 + 4);
        assert_eq!(size_of::<crate::usdt::Hit>(), 4 * 4 + 8 * 12 + 4 * 4 + 64 * 4);
        assert_eq!(size_of::<AllocKey>(), 4 + 4 + 8);
        assert_eq!(size_of::<AllocInfo>(), 8 + 8 + 8 + 4 + 4);
        assert_eq!(size_of::<StackKey>(), 4 + 4 + 8);
        assert_eq!(size_of::<Tracked>(), 4 + 4);
        assert_eq!(size_of::<ForkOffsets>(), 4 + 4);
        assert_eq!(size_of::<Pending>(), 8 + 8 + 4 + 4);
        assert_eq!(size_of::<Config>(), 8 + 8 + 4 * 8 + 8);
        assert_eq!(size_of::<Event>(), 4 * 4 + 8 * 4 + 4 + 4);
        assert_eq!(size_of::<KmemOffsets>(), 18 * 4);
        assert_eq!(size_of::<Freed>(), 8 * 4 + 4 + 4);
        assert_eq!(size_of::<MemError>(), 4 * 6 + 8 * 5 + 4 + 4 + 8 * 4);
    }

    // Stack ids are u64 hashes: every struct that carries one keeps it 8-aligned by hand.
    #[test]
    fn stack_id_carriers_have_no_implicit_padding() {
        use crate::{brkstack, faults, stack, swapin};
        assert_eq!(size_of::<stack::Stack>(), 4 + 4 + 8 * stack::MAX_FRAMES);
        assert_eq!(size_of::<brkstack::BrkKey>(), 4 + 4 + 8);
        assert_eq!(size_of::<brkstack::Event>(), 4 * 4 + 8 * 4 + 16);
        assert_eq!(size_of::<faults::FaultKey>(), 4 + 4 + 8 + 8);
        assert_eq!(size_of::<faults::ProcFaults>(), 8 * 3 + 16 + 8);
        assert_eq!(size_of::<faults::Event>(), 4 * 4 + 8 * 5 + 16);
        assert_eq!(size_of::<swapin::SwapKey>(), 4 + 4 + 8 + 16);
        assert_eq!(size_of::<swapin::NewStack>(), 4 + 4 + 8);
    }

    #[test]
    fn compaction_and_migrate_records_have_no_implicit_padding() {
        use crate::{compaction, migrate};
        assert_eq!(size_of::<compaction::Offsets>(), 4 * 8);
        assert_eq!(size_of::<compaction::Running>(), 8 * 3 + 4 * 4);
        assert_eq!(size_of::<compaction::Event>(), 4 * 2 + 16 + 8 * 5 + 4 * 6);
        assert_eq!(size_of::<migrate::Offsets>(), 4 * (migrate::COUNTERS + 1));
        assert_eq!(size_of::<migrate::ProcKey>(), 4 + 4);
        assert_eq!(size_of::<migrate::Counts>(), 8 * migrate::COUNTERS + 16 + 8);
    }

    #[test]
    fn stack_ids_are_never_the_lost_id() {
        use crate::{STACK_LOST, stack::hash};
        assert_ne!(hash(&[]), STACK_LOST);
        assert_ne!(hash(&[0x401000]), hash(&[0x401001]));
        // Order matters: the same frames in another order are another stack.
        assert_ne!(hash(&[1, 2]), hash(&[2, 1]));
        assert_ne!(hash(&[1]), hash(&[1, 0]));
    }

    #[test]
    fn every_allocator_function_has_a_name() {
        assert_eq!(FN_NAMES.len(), FN_MMAP_FILE as usize + 1);
        assert_eq!(FN_NAMES[FN_POSIX_MEMALIGN as usize], "posix_memalign");
        assert_eq!(FN_NAMES[FN_MUNMAP as usize], "munmap");
    }
}
