//! memleak: outstanding allocations per (pid, address), aggregated per (pid, stack) in the kernel.

use crate::user_pod;

/// One outstanding allocation. User mode keys by (tgid, image, address) so that two
/// processes' heaps never alias, nor a process's heaps before and after an exec; kernel
/// mode uses `pid = NO_PID`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct AllocKey {
    pub pid: u32,
    /// How many execs the process made since tracing began (`Tracked::image`).
    pub image: u32,
    pub addr: u64,
}

/// A process memleak follows, keyed by tgid in `TRACKED`. User space adds the first one;
/// the kernel side adds the children it forks (with `Config::children`).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Tracked {
    /// Bumped at each exec: the old image's allocations end with it.
    pub image: u32,
    /// The tracked process that forked it; 0 for the first one.
    pub parent: u32,
}

/// Byte offsets of `task:task_newtask`'s fields on the running kernel.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct ForkOffsets {
    pub pid: u32,
    pub clone_flags: u32,
}

/// Byte offsets of `sched:sched_process_exec`'s fields on the running kernel. On 6.18:
/// ```text
/// field:__data_loc char[] filename; offset:8; size:4; signed:0;
/// field:pid_t pid; offset:12; size:4; signed:1;
/// field:pid_t old_pid; offset:16; size:4; signed:1;
/// ```
/// `old_pid` is the exec'ing thread's id before the exec, `pid` its id after: they differ when
/// a thread other than the process's first made the exec (it takes over the process's pid).
/// Both are the initial pid namespace's numbers, so the comparison holds in any namespace.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct ExecOffsets {
    pub pid: u32,
    pub old_pid: u32,
}

/// Byte offset of `oom:mark_victim`'s `pid`, the one field every kernel records (5.10 has no
/// other; newer ones add comm and memory):
/// ```text
/// field:int pid; offset:8; size:4; signed:1;
/// ```
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct OomOffsets {
    pub pid: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct AllocInfo {
    pub size: u64,
    pub timestamp_ns: u64,
    pub stack_id: u64,
    /// One of the `FN_*` values: which entry point made it.
    pub func: u32,
    pub _pad: u32,
}

/// A stack of one process image: the same stack id in two processes, or before and after
/// an exec, is two rows.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct StackKey {
    pub pid: u32,
    pub image: u32,
    pub stack_id: u64,
}

/// A block freed lately, in `FREED` (keyed as `ALLOCS`) until its address is allocated again.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Freed {
    pub size: u64,
    pub alloc_stack: u64,
    /// Walked at the free's entry: its first address is inside the allocator's free.
    pub free_stack: u64,
    pub free_ns: u64,
    pub func: u32,
    pub tid: u32,
}

/// `Pending::func` of a `realloc(p, 0)`: it frees `p` (glibc through its own free, whose
/// probe must not take it for a second free) and allocates nothing.
pub const FN_REALLOC_FREE: u32 = u32::MAX;

/// A call in flight on one thread, between the allocator's entry and its return.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Pending {
    pub size: u64,
    /// posix_memalign's out-pointer (user address), 0 for the others.
    pub memptr: u64,
    /// Allocator calls nested inside this one (glibc's realloc(NULL, n) calls malloc).
    pub depth: u32,
    pub func: u32,
}

/// Settings written into the object before it is loaded.
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct Config {
    pub min_size: u64,
    pub max_size: u64,
    /// Record one allocation in `sample_rate` (at random); 1 records all.
    pub sample_rate: u32,
    /// Non-zero: send every call to user space (`--trace`).
    pub trace: u32,
    /// Non-zero: allocations are recorded only while `WINDOW[0]` is set (`--duty-cycle`).
    pub duty: u32,
    /// Non-zero: children forked by a tracked process are tracked too (`-c`, `--children`).
    pub children: u32,
    /// Non-zero: look for memory errors (a stack walk at each free).
    pub errors: u32,
    /// Non-zero: every allocation of the processes is seen (`-c`, nothing sampled out), so a
    /// free of an address never allocated is an invalid free, not a blind spot.
    pub judge_invalid: u32,
    /// Non-zero: an allocation keeps only its call site, not its whole stack
    /// (`--errors-only`: the stack walk at each allocation is what it saves).
    pub call_sites: u32,
    /// Non-zero: `--watch`: offer allocated and freed blocks to user space as candidates
    /// for a watchpoint (`LIVE_PICKS`, `FREED_PICKS`).
    pub watch: u32,
    /// Non-zero: `--sample-bytes`: record an allocation when a countdown of bytes, drawn from
    /// `SAMPLE_INTERVALS` with this mean, crosses zero.
    pub sample_bytes: u64,
}

/// Entries of `SAMPLE_INTERVALS`: quantiles of an exponential distribution, which the kernel
/// side picks from at random (it has no logarithm).
pub const SAMPLE_TABLE_LEN: u32 = 1024;

impl Config {
    /// Everything recorded, nothing checked: what the object holds until user space writes.
    pub const DEFAULT: Config = Config {
        min_size: 0,
        max_size: u64::MAX,
        sample_rate: 1,
        trace: 0,
        duty: 0,
        children: 0,
        errors: 0,
        judge_invalid: 0,
        call_sites: 0,
        watch: 0,
        sample_bytes: 0,
    };
}

impl Default for Config {
    fn default() -> Self {
        Config::DEFAULT
    }
}

/// Byte offsets of the fields memleak reads in each kmem/percpu tracepoint record,
/// taken from the running kernel's `format` files (layouts differ across versions).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct KmemOffsets {
    pub kmalloc_ptr: u32,
    pub kmalloc_bytes: u32,
    pub kmalloc_node_ptr: u32,
    pub kmalloc_node_bytes: u32,
    pub cache_alloc_ptr: u32,
    pub cache_alloc_bytes: u32,
    pub cache_alloc_node_ptr: u32,
    pub cache_alloc_node_bytes: u32,
    pub kfree_ptr: u32,
    pub cache_free_ptr: u32,
    pub page_alloc_pfn: u32,
    pub page_alloc_order: u32,
    pub page_free_pfn: u32,
    pub page_free_order: u32,
    pub percpu_alloc_ptr: u32,
    pub percpu_alloc_bytes: u32,
    pub percpu_free_ptr: u32,
    pub page_shift: u32,
}

/// Event kinds on the ring buffer.
pub const EV_ALLOC: u32 = 1;
pub const EV_FREE: u32 = 2;
/// First allocation seen from a (pid, stack): user space symbolizes it while the process lives.
pub const EV_NEW_STACK: u32 = 3;
/// A tracked process forked a child: the record is a `ProcEvent`.
pub const EV_FORK: u32 = 4;
/// A tracked process called exec: the record is a `ProcEvent`.
pub const EV_EXEC: u32 = 5;

/// A tracked process's fork or exec (`kind` = `EV_FORK` or `EV_EXEC`), on the same ring as
/// `Event`, whose `kind` it shares.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct ProcEvent {
    pub kind: u32,
    /// The child (fork) or the process that exec'd.
    pub pid: u32,
    /// Fork: the parent.
    pub parent: u32,
    /// Exec: the process's new image (`AllocKey::image`).
    pub image: u32,
    /// Fork: the clone flags.
    pub clone_flags: u64,
    /// Exec: 1 when a thread other than the process's first made it (see `ExecOffsets`).
    pub from_thread: u32,
    pub _pad: u32,
    pub timestamp_ns: u64,
}

/// memleak found a memory error: the record is a `MemError`.
pub const EV_ERROR: u32 = 6;
/// The OOM killer chose a tracked process (`oom:mark_victim`): the record is a `ProcEvent`
/// whose `pid` is the victim, sent before the kill's SIGKILL.
pub const EV_OOM: u32 = 7;

/// A free of a block that was freed and not allocated again since.
pub const ERR_DOUBLE_FREE: u32 = 1;
/// A free or realloc of an address the allocator never returned (a stack or global address,
/// an interior pointer), in a process memleak saw every allocation of.
pub const ERR_INVALID_FREE: u32 = 2;
/// A realloc of a block that was freed: a use after free.
pub const ERR_REALLOC_FREED: u32 = 3;

/// A write into the bytes just past a live block's requested end, caught by a watchpoint.
pub const ERR_WRITE_PAST_END: u32 = 4;
/// A write into a block freed and not allocated again since, caught by a watchpoint.
pub const ERR_USE_AFTER_FREE_WRITE: u32 = 5;

/// One memory error, as the eBPF side sends it (`kind` = `EV_ERROR`) and as the in-process
/// recorder keeps it in its error ring (`seq` = its index + 1 once written).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct MemError {
    pub kind: u32,
    /// One of the `ERR_*` values.
    pub error: u32,
    pub pid: u32,
    pub tid: u32,
    /// The call that made it: `FN_FREE`, `FN_REALLOC` or `FN_REALLOCARRAY`.
    pub func: u32,
    pub image: u32,
    pub addr: u64,
    /// The freed block's requested size (0 when no block is known).
    pub size: u64,
    /// Where the bad call was made.
    pub stack_id: u64,
    /// Where the freed block was allocated and first freed (`STACK_LOST` when unknown).
    pub alloc_stack: u64,
    pub free_stack: u64,
    pub alloc_func: u32,
    /// The thread that first freed it.
    pub free_tid: u32,
    pub freed_ns: u64,
    pub timestamp_ns: u64,
    /// The calling thread's stack pointer: tells a free of a stack address. For a watchpoint's
    /// hit (`ERR_WRITE_PAST_END`, `ERR_USE_AFTER_FREE_WRITE`): the first watched address.
    pub sp: u64,
    pub seq: u64,
}

#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Event {
    pub kind: u32,
    pub pid: u32,
    pub tid: u32,
    pub func: u32,
    pub stack_id: u64,
    pub addr: u64,
    pub size: u64,
    pub timestamp_ns: u64,
    /// The process image (`AllocKey::image`) the event belongs to.
    pub image: u32,
    pub _pad: u32,
}

/// Allocator entry points, in `AllocInfo::func` and `Event::func`.
pub const FN_MALLOC: u32 = 0;
pub const FN_CALLOC: u32 = 1;
pub const FN_REALLOC: u32 = 2;
pub const FN_REALLOCARRAY: u32 = 3;
pub const FN_POSIX_MEMALIGN: u32 = 4;
pub const FN_ALIGNED_ALLOC: u32 = 5;
pub const FN_MEMALIGN: u32 = 6;
pub const FN_VALLOC: u32 = 7;
pub const FN_PVALLOC: u32 = 8;
pub const FN_MMAP: u32 = 9;
pub const FN_FREE: u32 = 10;
pub const FN_MUNMAP: u32 = 11;
pub const FN_KMALLOC: u32 = 12;
pub const FN_KMEM_CACHE_ALLOC: u32 = 13;
pub const FN_PAGE_ALLOC: u32 = 14;
pub const FN_PERCPU_ALLOC: u32 = 15;
pub const FN_KFREE: u32 = 16;
/// `mmap` of a file (no MAP_ANONYMOUS): memory the file backs, not an allocation. Tracked so
/// reports can say what is still mapped, apart from the leak total.
pub const FN_MMAP_FILE: u32 = 17;

/// `mmap`'s flag for memory no file backs.
pub const MAP_ANONYMOUS: u64 = 0x20;

/// Names of the `FN_*` values, indexed by value.
pub const FN_NAMES: [&str; 18] = [
    "malloc",
    "calloc",
    "realloc",
    "reallocarray",
    "posix_memalign",
    "aligned_alloc",
    "memalign",
    "valloc",
    "pvalloc",
    "mmap",
    "free",
    "munmap",
    "kmalloc",
    "kmem_cache_alloc",
    "mm_page_alloc",
    "percpu_alloc",
    "kfree",
    "mmap (file)",
];

/// Indices of the per-CPU counters in the `STATS` map: the tool's own blind spots.
pub const STAT_TRACKED: u32 = 0;
pub const STAT_FREED: u32 = 1;
/// Allocations not tracked because the per-address map was full.
pub const STAT_MAP_FULL: u32 = 2;
/// Allocations whose stack could not be recorded (counted under a "[lost stack]" row).
pub const STAT_STACK_LOST: u32 = 3;
/// free() of an address memleak never saw allocated (allocated before attach, or sampled out).
pub const STAT_UNKNOWN_FREE: u32 = 4;
/// Allocations that returned NULL.
pub const STAT_FAILED: u32 = 5;
/// New stacks not announced to user space because the `SEEN` set was full (they are still
/// counted, and symbolized at report time instead of at once).
pub const STAT_STACKS_FULL: u32 = 6;
/// Ring-buffer events dropped because user space fell behind.
pub const STAT_EVENTS_LOST: u32 = 7;
/// An address allocated again without a free in between: the older record was replaced.
pub const STAT_REPLACED: u32 = 8;
/// Every free() call, and those made while the recording window was open (`--duty-cycle`):
/// their ratio estimates what share of the allocator's activity was recorded.
pub const STAT_FREE_CALLS: u32 = 9;
pub const STAT_FREE_CALLS_IN_WINDOW: u32 = 10;
/// Children not followed because the `TRACKED` map was full.
pub const STAT_UNTRACKED_CHILDREN: u32 = 11;
/// Frees of unknown addresses not remembered while a child's inheritance was being copied
/// (`EARLY_FREES` full): such a block may then show as outstanding in the child.
pub const STAT_EARLY_FULL: u32 = 12;
/// Blocks put in the record of freed blocks, and taken out of it by an allocation at their
/// address: more put than taken out and than `FREED` holds means some were dropped for room.
pub const STAT_FREED_RECORDED: u32 = 13;
pub const STAT_FREED_REUSED: u32 = 14;
/// Frees reported as invalid (`ERR_INVALID_FREE`): errors, not blind spots.
pub const STAT_INVALID_FREES: u32 = 15;
/// Watchpoint hits (`--watch`), and those that were no error: on a block freed (past-end
/// watch) or allocated again (freed-block watch) since it was armed, or on a watch already
/// disarmed (one report per watched block).
pub const STAT_WATCH_HITS: u32 = 16;
pub const STAT_WATCH_STALE: u32 = 17;
pub const STAT_WATCH_DISARMED: u32 = 18;
/// Watchpoint hits made inside an allocator call (calloc's memset, realloc's copy): the
/// allocator's own writes, not errors.
pub const STAT_WATCH_IN_ALLOCATOR: u32 = 19;
pub const STAT_COUNT: u32 = 20;

/// `clone` flags that decide whether a new task is a process of its own.
pub const CLONE_VM: u64 = 0x100;
pub const CLONE_VFORK: u64 = 0x4000;
pub const CLONE_THREAD: u64 = 0x10000;

/// What a watchpoint watches, in `WATCHES` keyed by `WatchKey`.
pub const WATCH_PAST_END: u32 = 1;
pub const WATCH_FREED: u32 = 2;

/// A watchpoint: the process and the first address its breakpoint covers.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct WatchKey {
    pub pid: u32,
    pub _pad: u32,
    pub addr: u64,
}

/// The block a watchpoint is armed for. A hit is an error only while the block is as it was
/// when armed: still live with this size, or still freed by the same free (`free_ns`).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Watch {
    pub block: u64,
    pub size: u64,
    pub free_ns: u64,
    pub image: u32,
    /// `WATCH_PAST_END` or `WATCH_FREED`.
    pub kind: u32,
}

/// A block offered for watching: written at a random slot of `LIVE_PICKS` at its allocation,
/// of `FREED_PICKS` at its free (`free_ns` non-zero), so the slots hold recent blocks, more of
/// them from the stacks that allocate most.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Candidate {
    pub pid: u32,
    pub image: u32,
    pub addr: u64,
    pub size: u64,
    pub free_ns: u64,
}

/// Slots of `LIVE_PICKS` and `FREED_PICKS`.
pub const PICKS: u32 = 64;

user_pod!(
    WatchKey,
    Watch,
    Candidate,
    AllocKey,
    AllocInfo,
    StackKey,
    Tracked,
    ForkOffsets,
    ExecOffsets,
    OomOffsets,
    Pending,
    Config,
    KmemOffsets,
    Event,
    ProcEvent,
    MemError,
    Freed
);

/// The maps and globals user space finds by name in the object.
pub mod names {
    crate::names!(
        CONFIG,
        FORK,
        EXEC,
        OOM,
        KMEM,
        ALLOCS,
        SEEN,
        STACKS,
        FREED,
        WINDOW,
        TRACKED,
        COPYING,
        EARLY_FREES,
        STATS,
        WATCHES,
        LIVE_PICKS,
        FREED_PICKS,
        SAMPLE_INTERVALS
    );
}
