//! memleak: outstanding allocations keyed by (pid, address), totals per (pid, stack) kept in
//! the kernel so that a report reads one small map instead of every allocation.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    EbpfContext, Global,
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_probe_read_user},
    macros::{btf_map, tracepoint, uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext, TracePointContext},
};
use memtrace_common::{
    NO_PID, STACK_LOST,
    memleak::{
        AllocInfo, AllocKey, CLONE_THREAD, CLONE_VM, Config, ERR_DOUBLE_FREE, ERR_INVALID_FREE, ERR_REALLOC_FREED,
        EV_ALLOC, EV_ERROR, EV_EXEC, EV_FORK, EV_FREE, EV_NEW_STACK, EV_OOM, Event, ExecOffsets, FN_ALIGNED_ALLOC,
        FN_CALLOC, FN_FREE, FN_KFREE, FN_KMALLOC, FN_KMEM_CACHE_ALLOC, FN_MALLOC, FN_MEMALIGN, FN_MMAP, FN_MMAP_FILE,
        FN_MUNMAP, FN_PAGE_ALLOC, FN_PERCPU_ALLOC, FN_POSIX_MEMALIGN, FN_PVALLOC, FN_REALLOC, FN_REALLOC_FREE,
        FN_REALLOCARRAY, FN_VALLOC, ForkOffsets, Freed, KmemOffsets, MAP_ANONYMOUS, MemError, OomOffsets, Pending,
        ProcEvent, SAMPLE_TABLE_LEN, STAT_COUNT, STAT_EARLY_FULL, STAT_EVENTS_LOST, STAT_FAILED, STAT_FREE_CALLS,
        STAT_FREE_CALLS_IN_WINDOW, STAT_FREED, STAT_FREED_RECORDED, STAT_FREED_REUSED, STAT_INVALID_FREES,
        STAT_MAP_FULL, STAT_REPLACED, STAT_STACK_LOST, STAT_STACKS_FULL, STAT_TRACKED, STAT_UNKNOWN_FREE,
        STAT_UNTRACKED_CHILDREN, StackKey, Tracked,
    },
};
use memtrace_ebpf::{BPF_NOEXIST, EEXIST, bump, current_pid_tgid, tp_u32, tp_u64, unwind::UserRegs};

memtrace_ebpf::license!();

// A crate root looks for modules beside it: this one sits under memleak/, as user space has it.
#[path = "memleak/watch.rs"]
mod watch;

#[unsafe(no_mangle)]
static CONFIG: Global<Config> = Global::new(Config::DEFAULT);

#[unsafe(no_mangle)]
static FORK: Global<ForkOffsets> = Global::new(ForkOffsets { pid: 0, clone_flags: 0 });

#[unsafe(no_mangle)]
static EXEC: Global<ExecOffsets> = Global::new(ExecOffsets { pid: 0, old_pid: 0 });

#[unsafe(no_mangle)]
static OOM: Global<OomOffsets> = Global::new(OomOffsets { pid: 0, _pad: 0 });

#[unsafe(no_mangle)]
static KMEM: Global<KmemOffsets> = Global::new(KmemOffsets {
    kmalloc_ptr: 0,
    kmalloc_bytes: 0,
    kmalloc_node_ptr: 0,
    kmalloc_node_bytes: 0,
    cache_alloc_ptr: 0,
    cache_alloc_bytes: 0,
    cache_alloc_node_ptr: 0,
    cache_alloc_node_bytes: 0,
    kfree_ptr: 0,
    cache_free_ptr: 0,
    page_alloc_pfn: 0,
    page_alloc_order: 0,
    page_free_pfn: 0,
    page_free_order: 0,
    percpu_alloc_ptr: 0,
    percpu_alloc_bytes: 0,
    percpu_free_ptr: 0,
    page_shift: 12,
});

// Sizes here are defaults; user space resizes ALLOCS, SEEN and the stack store (`--max-allocs`, `--max-stacks`).
/// Entries are allocated as blocks come (no preallocation): a capacity in the millions
/// costs nothing until used, and nothing to create at start.
#[btf_map]
static ALLOCS: HashMap<AllocKey, AllocInfo, 2_097_152, { aya_ebpf::bindings::BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();
/// (pid, image, stack) rows already announced to user space with `EV_NEW_STACK`.
#[btf_map]
static SEEN: HashMap<StackKey, u32, 16_384> = HashMap::new();
/// The processes traced in user mode, and the image each is in.
#[btf_map]
static TRACKED: HashMap<u32, Tracked, 4096> = HashMap::new();
/// Children forked with their own copy of the parent's heap, until user space has copied the
/// parent's records of it to the child's pid.
#[btf_map]
static COPYING: HashMap<u32, u32, 1024> = HashMap::new();
/// Frees of unknown addresses by children in `COPYING`: user space skips these addresses
/// when it copies.
#[btf_map]
static EARLY_FREES: HashMap<AllocKey, u32, 16_384> = HashMap::new();
#[btf_map]
static PENDING: HashMap<u32, Pending, 16_384> = HashMap::new();
memtrace_ebpf::stack_store!();
#[btf_map]
static STATS: PerCpuArray<u64, { STAT_COUNT as usize }> = PerCpuArray::new();
#[btf_map]
static EVENTS: RingBuf<Event, { 256 * 1024 }> = RingBuf::new();
/// Blocks freed lately with the stack of their free (`--freed-record`), until their address
/// is allocated again; the least recently used are dropped for room.
#[btf_map]
static FREED: LruHashMap<AllocKey, Freed, 65_536> = LruHashMap::new();
/// Set once an allocation of a tracked process went unrecorded (allocation map full): a free
/// of an unknown address is then not judged an invalid free.
#[btf_map]
static UNSEEN: Array<u32, 1> = Array::new();
/// Set by user space while the recording window of `--duty-cycle` is open.
#[btf_map]
static WINDOW: Array<u32, 1> = Array::new();

/// `--sample-bytes`: bytes left until the next sampled allocation, per CPU. Per CPU rather
/// than per thread because an exponential countdown is memoryless: whoever consumed the bytes
/// before, what is left is again exponential, so each allocation is sampled with the same
/// probability 1 - exp(-size/N) either way. A per-CPU slot is a plain write with no map
/// update, needs no task storage (absent on 5.10) and nothing to clean up when threads end.
#[btf_map]
static COUNTDOWN: PerCpuArray<Countdown, 1> = PerCpuArray::new();
/// The countdown's intervals: the means of `SAMPLE_TABLE_LEN` equally likely slices of an
/// exponential distribution of mean N, written by user space (tools/memleak/sampling.rs).
#[btf_map]
static SAMPLE_INTERVALS: Array<u64, { SAMPLE_TABLE_LEN as usize }> = Array::new();

#[derive(Clone, Copy)]
struct Countdown {
    left: u64,
    /// 0 until this CPU drew its first interval.
    armed: u64,
}

#[inline(always)]
fn next_interval(mean: u64) -> u64 {
    // SAFETY: helper without preconditions.
    let slice = unsafe { bpf_get_prandom_u32() } % SAMPLE_TABLE_LEN;
    SAMPLE_INTERVALS.get(slice).copied().unwrap_or(mean)
}

/// Whether an allocation of `size` bytes is sampled under `--sample-bytes` (mean `mean`):
/// the countdown goes down by its size; crossing zero samples it and draws a new interval.
#[inline(always)]
fn sampled_by_bytes(size: u64, mean: u64) -> bool {
    let Some(c) = COUNTDOWN.get_ptr_mut(0) else { return false };
    // SAFETY: pointer from the map lookup, this CPU's own slot.
    unsafe {
        if (*c).armed == 0 {
            (*c).left = next_interval(mean);
            (*c).armed = 1;
        }
        if (*c).left > size {
            (*c).left -= size;
            return false;
        }
        (*c).left = next_interval(mean);
    }
    true
}

#[inline(always)]
fn window_open() -> bool {
    WINDOW.get(0).is_some_and(|open| *open != 0)
}

#[inline(always)]
fn emit(kind: u32, pid: u32, image: u32, tid: u32, stack_id: u64, addr: u64, size: u64, func: u32) {
    let event = Event {
        kind,
        pid,
        tid,
        func,
        stack_id,
        addr,
        size,
        // SAFETY: helper without preconditions.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        image,
        _pad: 0,
    };
    if EVENTS.output(&event, 0).is_err() {
        bump(&STATS, STAT_EVENTS_LOST);
    }
}

/// Sends a process's fork or exec, stamped now.
fn emit_proc(mut event: ProcEvent) {
    // SAFETY: helper without preconditions.
    event.timestamp_ns = unsafe { bpf_ktime_get_ns() };
    if EVENTS.output_untyped::<ProcEvent>(&event, 0).is_err() {
        bump(&STATS, STAT_EVENTS_LOST);
    }
}

/// Records one allocation in the per-address map, and tells user space about a stack the
/// first time a process image uses it.
#[inline(always)]
fn record<C: EbpfContext>(ctx: &C, key: AllocKey, tid: u32, size: u64, func: u32, user: bool) {
    let stack = if user {
        // A uretprobe's context is the user registers at the return.
        let regs = UserRegs::from_probe(ctx.as_ptr().cast());
        if CONFIG.load().call_sites != 0 { stacks().call_site(regs) } else { stacks().user_walked(ctx, regs, key.pid) }
    } else {
        stacks().kernel(ctx)
    };
    let stack_id = match stack {
        Ok(id) => id,
        Err(_) => {
            bump(&STATS, STAT_STACK_LOST);
            STACK_LOST
        }
    };
    let info = AllocInfo {
        size,
        // SAFETY: helper without preconditions.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        stack_id,
        func,
        _pad: 0,
    };
    match ALLOCS.insert(&key, &info, BPF_NOEXIST) {
        Ok(()) => {}
        Err(EEXIST) => {
            // A free we never saw: the newer block replaces the stale record.
            bump(&STATS, STAT_REPLACED);
            if ALLOCS.insert(&key, &info, 0).is_err() {
                bump(&STATS, STAT_MAP_FULL);
                return;
            }
        }
        Err(_) => {
            bump(&STATS, STAT_MAP_FULL);
            if let Some(unseen) = UNSEEN.get_ptr_mut(0) {
                // SAFETY: pointer from the map lookup.
                unsafe { *unseen = 1 };
            }
            return;
        }
    }
    if CONFIG.load().errors != 0 && FREED.remove(&key).is_ok() {
        bump(&STATS, STAT_FREED_REUSED);
    }
    if key.pid != NO_PID && stack_id != STACK_LOST {
        let skey = StackKey { pid: key.pid, image: key.image, stack_id };
        match SEEN.insert(&skey, &0, BPF_NOEXIST) {
            Ok(()) => emit(EV_NEW_STACK, key.pid, key.image, tid, stack_id, key.addr, size, func),
            Err(EEXIST) => {}
            // Still counted; user space symbolizes it at report time instead.
            Err(_) => bump(&STATS, STAT_STACKS_FULL),
        }
    }
    bump(&STATS, STAT_TRACKED);
    if key.pid != NO_PID {
        watch::offer(&key, size, 0);
    }
    if CONFIG.load().trace != 0 {
        emit(EV_ALLOC, key.pid, key.image, tid, stack_id, key.addr, size, func);
    }
}

/// Forgets the allocation at `key`; `count_unknown` says whether a miss is a blind spot.
#[inline(always)]
fn forget(key: AllocKey, tid: u32, func: u32, count_unknown: bool) {
    // SAFETY: value copied out of the map at once.
    let Some(info) = (unsafe { ALLOCS.get(&key) }).copied() else {
        // SAFETY: presence check only.
        if key.pid != NO_PID && unsafe { COPYING.get(&key.pid) }.is_some() {
            // The block may be one the child inherited and user space has yet to copy.
            if EARLY_FREES.insert(&key, &0, 0).is_err() {
                bump(&STATS, STAT_EARLY_FULL);
            }
        } else if count_unknown {
            bump(&STATS, STAT_UNKNOWN_FREE);
        }
        return;
    };
    // Only the caller whose delete succeeds counts it, so a double free cannot count twice.
    if ALLOCS.remove(&key).is_err() {
        return;
    }
    bump(&STATS, STAT_FREED);
    if CONFIG.load().trace != 0 {
        emit(EV_FREE, key.pid, key.image, tid, info.stack_id, key.addr, info.size, func);
    }
}

/// The tracked process the current task belongs to: its tgid and image generation. None:
/// not traced.
#[inline(always)]
fn tracked() -> Option<(u32, u32)> {
    let (pid, _) = ids();
    // SAFETY: value copied out of the map at once.
    let t = unsafe { TRACKED.get(&pid) }.copied()?;
    Some((pid, t.image))
}

#[inline(always)]
fn ids() -> (u32, u32) {
    let id = current_pid_tgid();
    ((id >> 32) as u32, id as u32)
}

/// Whether allocations are sampled: a free of an unknown address is then mostly one of a
/// block left out, not a blind spot.
#[inline(always)]
fn sampling() -> bool {
    let config = CONFIG.load();
    config.sample_bytes != 0 || config.sample_rate > 1
}

#[inline(always)]
fn sampled_in(size: u64) -> bool {
    let config = CONFIG.load();
    if size < config.min_size || size > config.max_size {
        return false;
    }
    if config.sample_bytes != 0 {
        return sampled_by_bytes(size, config.sample_bytes);
    }
    // SAFETY: helper without preconditions.
    config.sample_rate <= 1 || unsafe { bpf_get_prandom_u32() } % config.sample_rate == 0
}

/// Allocator entry: remember the size until the call returns the address.
#[inline(always)]
fn enter(size: u64, memptr: u64, func: u32) -> u32 {
    if tracked().is_none() {
        return 0;
    }
    let (_, tid) = ids();
    if let Some(pending) = PENDING.get_ptr_mut(tid) {
        // A call nested in another allocator call (realloc(NULL, n) -> malloc): the outer one
        // returns the same block and records it.
        // SAFETY: pointer from the map lookup.
        unsafe { (*pending).depth += 1 };
        return 0;
    }
    if sampled_in(size) && (CONFIG.load().duty == 0 || window_open()) {
        let _ = PENDING.insert(tid, Pending { size, memptr, depth: 0, func }, 0);
    }
    0
}

#[inline(always)]
fn arg(ctx: &ProbeContext, n: usize) -> u64 {
    ctx.arg::<u64>(n).unwrap_or(0)
}

#[uprobe]
pub fn memleak_malloc(ctx: ProbeContext) -> u32 {
    enter(arg(&ctx, 0), 0, FN_MALLOC)
}

#[uprobe]
pub fn memleak_calloc(ctx: ProbeContext) -> u32 {
    enter(arg(&ctx, 0).wrapping_mul(arg(&ctx, 1)), 0, FN_CALLOC)
}

#[uprobe]
pub fn memleak_realloc(ctx: ProbeContext) -> u32 {
    realloc_enter(&ctx, arg(&ctx, 0), arg(&ctx, 1), FN_REALLOC)
}

#[uprobe]
pub fn memleak_reallocarray(ctx: ProbeContext) -> u32 {
    realloc_enter(&ctx, arg(&ctx, 0), arg(&ctx, 1).wrapping_mul(arg(&ctx, 2)), FN_REALLOCARRAY)
}

/// realloc is a free of the old block plus an allocation of the new one.
#[inline(always)]
fn realloc_enter(ctx: &ProbeContext, old: u64, size: u64, func: u32) -> u32 {
    let Some((pid, image)) = tracked() else { return 0 };
    let (_, tid) = ids();
    let errors = CONFIG.load().errors != 0;
    // SAFETY: presence check only.
    if errors && unsafe { PENDING.get(&tid) }.is_some() {
        // Inside another allocator call (glibc's reallocarray calls realloc): the outer one's.
        return enter(size, 0, func);
    }
    if old != 0 {
        let key = AllocKey { pid, image, addr: old };
        if errors { free_checked(ctx, key, tid, func) } else { forget(key, tid, func, !sampling()) }
    }
    if size == 0 && old != 0 {
        // realloc(p, 0) frees p and returns NULL: not a failed allocation. Pending all the
        // same, so that the free glibc makes of p inside it is not a second one.
        if errors {
            let _ = PENDING.insert(tid, Pending { size: 0, memptr: 0, depth: 0, func: FN_REALLOC_FREE }, 0);
        }
        return 0;
    }
    enter(size, 0, func)
}

/// A free (or realloc's) with errors on: the block moves to `FREED` with the stack of this
/// call, or the call is an error. At the call's entry, before the allocator's own checks,
/// which may abort the process.
#[inline(always)]
fn free_checked(ctx: &ProbeContext, key: AllocKey, tid: u32, func: u32) {
    let regs = UserRegs::from_probe(ctx.as_ptr().cast());
    let sp = regs.as_ref().map_or(0, |r| r.sp);
    let stack = stacks().user_walked(ctx, regs, key.pid).unwrap_or(STACK_LOST);
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: value copied out of the map at once.
    if let Some(info) = unsafe { ALLOCS.get(&key) }.copied() {
        // Only the caller whose delete succeeds counts it.
        if ALLOCS.remove(&key).is_err() {
            return;
        }
        bump(&STATS, STAT_FREED);
        let freed = Freed {
            size: info.size,
            alloc_stack: info.stack_id,
            free_stack: stack,
            free_ns: now,
            func: info.func,
            tid,
        };
        if FREED.insert(&key, &freed, 0).is_ok() {
            bump(&STATS, STAT_FREED_RECORDED);
            watch::offer(&key, info.size, now);
        }
        if CONFIG.load().trace != 0 {
            emit(EV_FREE, key.pid, key.image, tid, info.stack_id, key.addr, info.size, func);
        }
        return;
    }
    // SAFETY: presence check only.
    if unsafe { COPYING.get(&key.pid) }.is_some() {
        // The block may be one the child inherited and user space has yet to copy.
        if EARLY_FREES.insert(&key, &0, 0).is_err() {
            bump(&STATS, STAT_EARLY_FULL);
        }
        return;
    }
    // SAFETY: value copied out of the map at once.
    let freed = unsafe { FREED.get(&key) }.copied();
    let error = match freed {
        Some(_) if func == FN_FREE => ERR_DOUBLE_FREE,
        Some(_) => ERR_REALLOC_FREED,
        None => {
            if !sampling() {
                bump(&STATS, STAT_UNKNOWN_FREE);
            }
            let unseen = UNSEEN.get(0).is_some_and(|u| *u != 0);
            if CONFIG.load().judge_invalid == 0 || unseen {
                return;
            }
            bump(&STATS, STAT_INVALID_FREES);
            ERR_INVALID_FREE
        }
    };
    let Some(mut entry) = EVENTS.reserve_untyped::<MemError>(0) else {
        bump(&STATS, STAT_EVENTS_LOST);
        return;
    };
    let f = freed.unwrap_or_default();
    entry.write(MemError {
        kind: EV_ERROR,
        error,
        pid: key.pid,
        tid,
        func,
        image: key.image,
        addr: key.addr,
        size: f.size,
        stack_id: stack,
        alloc_stack: if freed.is_some() { f.alloc_stack } else { STACK_LOST },
        free_stack: if freed.is_some() { f.free_stack } else { STACK_LOST },
        alloc_func: f.func,
        free_tid: f.tid,
        freed_ns: f.free_ns,
        timestamp_ns: now,
        sp,
        seq: 0,
    });
    entry.submit(0);
}

#[uprobe]
pub fn memleak_posix_memalign(ctx: ProbeContext) -> u32 {
    enter(arg(&ctx, 2), arg(&ctx, 0), FN_POSIX_MEMALIGN)
}

#[uprobe]
pub fn memleak_aligned_alloc(ctx: ProbeContext) -> u32 {
    enter(arg(&ctx, 1), 0, FN_ALIGNED_ALLOC)
}

#[uprobe]
pub fn memleak_memalign(ctx: ProbeContext) -> u32 {
    enter(arg(&ctx, 1), 0, FN_MEMALIGN)
}

#[uprobe]
pub fn memleak_valloc(ctx: ProbeContext) -> u32 {
    enter(arg(&ctx, 0), 0, FN_VALLOC)
}

#[uprobe]
pub fn memleak_pvalloc(ctx: ProbeContext) -> u32 {
    enter(arg(&ctx, 0), 0, FN_PVALLOC)
}

/// mmap(addr, length, prot, flags, fd, offset). A file's mapping is kept apart: its pages
/// are the file's, not memory the process allocated.
#[uprobe]
pub fn memleak_mmap(ctx: ProbeContext) -> u32 {
    let func = if arg(&ctx, 3) & MAP_ANONYMOUS != 0 { FN_MMAP } else { FN_MMAP_FILE };
    enter(arg(&ctx, 1), 0, func)
}

/// One return probe serves every allocator: the pending entry says what was called.
#[uretprobe]
pub fn memleak_alloc_ret(ctx: RetProbeContext) -> u32 {
    let (_, tid) = ids();
    let Some(pending) = PENDING.get_ptr_mut(tid) else {
        return 0;
    };
    // SAFETY: pointer from the map lookup; copied before the entry is removed.
    let call = unsafe {
        if (*pending).depth > 0 {
            (*pending).depth -= 1;
            return 0;
        }
        *pending
    };
    let _ = PENDING.remove(tid);
    if call.func == FN_REALLOC_FREE {
        return 0;
    }
    let ret: u64 = ctx.ret();
    let addr = if call.memptr != 0 {
        // posix_memalign returns 0 and stores the block through its first argument.
        if ret != 0 {
            0
        } else {
            // SAFETY: reads user memory through the checked helper.
            unsafe { bpf_probe_read_user(call.memptr as *const u64) }.unwrap_or(0)
        }
    } else {
        ret
    };
    // NULL, or MAP_FAILED for mmap.
    if addr == 0 || addr == u64::MAX {
        bump(&STATS, STAT_FAILED);
        return 0;
    }
    // An exec between entry and return would have ended the call; the image is the current one.
    let Some((pid, image)) = tracked() else { return 0 };
    record(&ctx, AllocKey { pid, image, addr }, tid, call.size, call.func, true);
    0
}

#[uprobe]
pub fn memleak_free(ctx: ProbeContext) -> u32 {
    if CONFIG.load().duty != 0 {
        bump(&STATS, STAT_FREE_CALLS);
        if window_open() {
            bump(&STATS, STAT_FREE_CALLS_IN_WINDOW);
        }
    }
    let addr = arg(&ctx, 0);
    if addr != 0
        && let Some((pid, image)) = tracked()
    {
        let (key, tid) = (AllocKey { pid, image, addr }, ids().1);
        if CONFIG.load().errors == 0 {
            forget(key, tid, FN_FREE, !sampling());
        } else if unsafe { PENDING.get(&tid) }.is_some() {
            // SAFETY (above): presence check only. A free inside an allocator call (glibc's
            // realloc(p, 0) frees p through free) is the outer call's.
            forget(key, tid, FN_FREE, false);
        } else {
            free_checked(&ctx, key, tid, FN_FREE);
        }
    }
    0
}

#[uprobe]
pub fn memleak_munmap(ctx: ProbeContext) -> u32 {
    if let Some((pid, image)) = tracked() {
        // The allocator unmaps its own chunks from inside free(): a miss here is not a blind spot.
        forget(AllocKey { pid, image, addr: arg(&ctx, 0) }, ids().1, FN_MUNMAP, false);
    }
    0
}

/// A tracked process forks: follow the child (a new process, not a thread) from its first
/// instruction, keyed by its own pid.
#[tracepoint]
pub fn memleak_newtask(ctx: TracePointContext) -> u32 {
    if CONFIG.load().children == 0 {
        return 0;
    }
    let Some((parent, _)) = tracked() else { return 0 };
    let offsets = FORK.load();
    let flags = tp_u64(&ctx, offsets.clone_flags);
    if flags & CLONE_THREAD != 0 {
        return 0;
    }
    let child = tp_u32(&ctx, offsets.pid);
    // Never insert a constant struct: the compiler may share its bytes with a read-only global
    // of the same contents, which user space then overwrites before load.
    if TRACKED.insert(&child, &Tracked { image: 0, parent }, BPF_NOEXIST).is_err() {
        bump(&STATS, STAT_UNTRACKED_CHILDREN);
        return 0;
    }
    // A child sharing its parent's memory (vfork, posix_spawn) inherits nothing to copy.
    if flags & CLONE_VM == 0 && COPYING.insert(&child, &0, 0).is_err() {
        bump(&STATS, STAT_EARLY_FULL);
    }
    emit_proc(ProcEvent { kind: EV_FORK, pid: child, parent, clone_flags: flags, ..Default::default() });
    0
}

/// A tracked process execs: its old image's allocations are gone with that image.
#[tracepoint]
pub fn memleak_exec(ctx: TracePointContext) -> u32 {
    let (pid, _) = ids();
    if let Some(t) = TRACKED.get_ptr_mut(&pid) {
        // SAFETY: pointer from the map lookup; only this task (now alone in its process) writes it.
        let image = unsafe {
            (*t).image += 1;
            (*t).image
        };
        let offsets = EXEC.load();
        // Another thread's exec: probes tied to the process's first thread are gone with it.
        let from_thread = tp_u32(&ctx, offsets.pid) != tp_u32(&ctx, offsets.old_pid);
        emit_proc(ProcEvent { kind: EV_EXEC, pid, image, from_thread: from_thread as u32, ..Default::default() });
    }
    0
}

/// The OOM killer chose a victim: when it is a tracked process, user space reads its heap now,
/// before the SIGKILL that follows ends it. The current task is the one whose allocation
/// failed, not the victim.
#[tracepoint]
pub fn memleak_oom_victim(ctx: TracePointContext) -> u32 {
    let pid = tp_u32(&ctx, OOM.load().pid);
    if TRACKED.get_ptr(&pid).is_some() {
        emit_proc(ProcEvent { kind: EV_OOM, pid, ..Default::default() });
    }
    0
}

// Kernel mode. Offsets come from each tracepoint's format file (see memtrace's kernel module).

#[inline(always)]
fn kernel_alloc(ctx: &TracePointContext, ptr_off: u32, bytes_off: u32, func: u32) -> u32 {
    let addr = tp_u64(ctx, ptr_off);
    let size = tp_u64(ctx, bytes_off);
    // ZERO_SIZE_PTR and failures are not allocations.
    if addr <= 16 || !sampled_in(size) {
        return 0;
    }
    let (_, tid) = ids();
    record(ctx, AllocKey { pid: NO_PID, image: 0, addr }, tid, size, func, false);
    0
}

#[inline(always)]
fn kernel_free(ctx: &TracePointContext, ptr_off: u32) -> u32 {
    let addr = tp_u64(ctx, ptr_off);
    if addr > 16 {
        let (_, tid) = ids();
        // Most kernel frees are of objects allocated before tracing: not worth a blind-spot line.
        forget(AllocKey { pid: NO_PID, image: 0, addr }, tid, FN_KFREE, false);
    }
    0
}

#[tracepoint]
pub fn memleak_kmalloc(ctx: TracePointContext) -> u32 {
    let k = KMEM.load();
    kernel_alloc(&ctx, k.kmalloc_ptr, k.kmalloc_bytes, FN_KMALLOC)
}

#[tracepoint]
pub fn memleak_kmalloc_node(ctx: TracePointContext) -> u32 {
    let k = KMEM.load();
    kernel_alloc(&ctx, k.kmalloc_node_ptr, k.kmalloc_node_bytes, FN_KMALLOC)
}

#[tracepoint]
pub fn memleak_cache_alloc(ctx: TracePointContext) -> u32 {
    let k = KMEM.load();
    kernel_alloc(&ctx, k.cache_alloc_ptr, k.cache_alloc_bytes, FN_KMEM_CACHE_ALLOC)
}

#[tracepoint]
pub fn memleak_cache_alloc_node(ctx: TracePointContext) -> u32 {
    let k = KMEM.load();
    kernel_alloc(&ctx, k.cache_alloc_node_ptr, k.cache_alloc_node_bytes, FN_KMEM_CACHE_ALLOC)
}

#[tracepoint]
pub fn memleak_kfree(ctx: TracePointContext) -> u32 {
    kernel_free(&ctx, KMEM.load().kfree_ptr)
}

#[tracepoint]
pub fn memleak_cache_free(ctx: TracePointContext) -> u32 {
    kernel_free(&ctx, KMEM.load().cache_free_ptr)
}

#[tracepoint]
pub fn memleak_page_alloc(ctx: TracePointContext) -> u32 {
    let k = KMEM.load();
    let pfn = tp_u64(&ctx, k.page_alloc_pfn);
    let order = tp_u32(&ctx, k.page_alloc_order);
    // pfn -1 marks a failed allocation.
    if pfn == u64::MAX || order > 20 {
        return 0;
    }
    let size = 1u64 << (k.page_shift + order);
    if !sampled_in(size) {
        return 0;
    }
    let (_, tid) = ids();
    record(&ctx, AllocKey { pid: NO_PID, image: 0, addr: pfn }, tid, size, FN_PAGE_ALLOC, false);
    0
}

#[tracepoint]
pub fn memleak_page_free(ctx: TracePointContext) -> u32 {
    let pfn = tp_u64(&ctx, KMEM.load().page_free_pfn);
    let (_, tid) = ids();
    forget(AllocKey { pid: NO_PID, image: 0, addr: pfn }, tid, FN_KFREE, false);
    0
}

#[tracepoint]
pub fn memleak_percpu_alloc(ctx: TracePointContext) -> u32 {
    let k = KMEM.load();
    kernel_alloc(&ctx, k.percpu_alloc_ptr, k.percpu_alloc_bytes, FN_PERCPU_ALLOC)
}

#[tracepoint]
pub fn memleak_percpu_free(ctx: TracePointContext) -> u32 {
    kernel_free(&ctx, KMEM.load().percpu_free_ptr)
}
