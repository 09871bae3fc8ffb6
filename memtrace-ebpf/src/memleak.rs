//! memleak: outstanding allocations keyed by (pid, address), totals per (pid, stack) kept in
//! the kernel so that a report reads one small map instead of every allocation.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    Global,
    bindings::BPF_F_USER_STACK,
    btf_maps::{Array, HashMap, PerCpuArray, RingBuf, StackTrace},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_probe_read_user},
    macros::{btf_map, tracepoint, uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext, TracePointContext, tracing::StackIdContext},
};
use memtrace_common::{
    NO_PID, STACK_LOST,
    memleak::{
        AllocInfo, AllocKey, Config, EV_ALLOC, EV_FREE, EV_NEW_STACK, Event, FN_ALIGNED_ALLOC, FN_CALLOC, FN_FREE,
        FN_KFREE, FN_KMALLOC, FN_KMEM_CACHE_ALLOC, FN_MALLOC, FN_MEMALIGN, FN_MMAP, FN_MUNMAP, FN_PAGE_ALLOC,
        FN_PERCPU_ALLOC, FN_POSIX_MEMALIGN, FN_PVALLOC, FN_REALLOC, FN_REALLOCARRAY, FN_VALLOC, KmemOffsets, Pending,
        STAT_COUNT, STAT_EVENTS_LOST, STAT_FAILED, STAT_FREE_CALLS, STAT_FREE_CALLS_IN_WINDOW, STAT_FREED,
        STAT_MAP_FULL, STAT_REPLACED, STAT_STACK_LOST, STAT_STACKS_FULL, STAT_TRACKED, STAT_UNKNOWN_FREE, StackKey,
        StackTotal,
    },
};
use memtrace_ebpf::{BPF_NOEXIST, EEXIST, atomic_add, bump, current_pid_tgid, tp_u32, tp_u64};

memtrace_ebpf::license!();

#[unsafe(no_mangle)]
static CONFIG: Global<Config> =
    Global::new(Config { min_size: 0, max_size: u64::MAX, sample_rate: 1, trace: 0, duty: 0, _pad: 0 });

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

// Sizes here are defaults; user space resizes ALLOCS and STACKS (`--max-allocs`, `--max-stacks`).
#[btf_map]
static ALLOCS: HashMap<AllocKey, AllocInfo, 262_144> = HashMap::new();
#[btf_map]
static TOTALS: HashMap<StackKey, StackTotal, 16_384> = HashMap::new();
#[btf_map]
static PENDING: HashMap<u32, Pending, 16_384> = HashMap::new();
// 64 frames keep a bucket at 512 bytes, so the table can be large enough that hash collisions
// (which lose a stack) stay rare.
#[btf_map]
static STACKS: StackTrace<32_768, 0, 64> = StackTrace::new();
#[btf_map]
static STATS: PerCpuArray<u64, { STAT_COUNT as usize }> = PerCpuArray::new();
#[btf_map]
static EVENTS: RingBuf<Event, { 256 * 1024 }> = RingBuf::new();
/// Set by user space while the recording window of `--duty-cycle` is open.
#[btf_map]
static WINDOW: Array<u32, 1> = Array::new();

#[inline(always)]
fn window_open() -> bool {
    WINDOW.get(0).is_some_and(|open| *open != 0)
}

#[inline(always)]
fn emit(kind: u32, pid: u32, tid: u32, stack_id: u32, addr: u64, size: u64, func: u32) {
    let event = Event {
        kind,
        pid,
        tid,
        stack_id,
        addr,
        size,
        // SAFETY: helper without preconditions.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        func,
        _pad: 0,
    };
    if EVENTS.output(&event, 0).is_err() {
        bump(&STATS, STAT_EVENTS_LOST);
    }
}

/// Adds `bytes`/`allocs` (wrapping: negated values subtract) to a stack's totals.
#[inline(always)]
fn add_to_stack(key: &StackKey, bytes: u64, allocs: u64) -> bool {
    if let Some(total) = TOTALS.get_ptr_mut(key) {
        // SAFETY: the pointer comes from the map lookup and fields are 8-byte aligned.
        unsafe {
            atomic_add(&raw mut (*total).bytes, bytes);
            atomic_add(&raw mut (*total).allocs, allocs);
        }
        return true;
    }
    false
}

/// Records one allocation: its per-address entry and its stack's totals.
#[inline(always)]
fn record<C: StackIdContext>(ctx: &C, pid: u32, tid: u32, addr: u64, size: u64, func: u32, stack_flags: u64) {
    let stack_id = match ctx.get_stackid(&STACKS, stack_flags) {
        Ok(id) => id as u32,
        Err(_) => {
            bump(&STATS, STAT_STACK_LOST);
            STACK_LOST
        }
    };
    let key = AllocKey { pid, _pad: 0, addr };
    let info = AllocInfo {
        size,
        // SAFETY: helper without preconditions.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        stack_id,
        func,
    };
    match ALLOCS.insert(&key, &info, BPF_NOEXIST) {
        Ok(()) => {}
        Err(EEXIST) => {
            // A free we never saw: take the stale record off its stack before replacing it.
            // SAFETY: value copied out of the map at once.
            if let Some(old) = unsafe { ALLOCS.get(&key) }.copied() {
                let old_key = StackKey { pid, stack_id: old.stack_id };
                add_to_stack(&old_key, old.size.wrapping_neg(), u64::MAX);
            }
            bump(&STATS, STAT_REPLACED);
            if ALLOCS.insert(&key, &info, 0).is_err() {
                bump(&STATS, STAT_MAP_FULL);
                return;
            }
        }
        Err(_) => {
            bump(&STATS, STAT_MAP_FULL);
            return;
        }
    }
    let skey = StackKey { pid, stack_id };
    if !add_to_stack(&skey, size, 1) {
        let total = StackTotal { bytes: size, allocs: 1 };
        match TOTALS.insert(&skey, &total, BPF_NOEXIST) {
            Ok(()) => {
                if pid != NO_PID && stack_id != STACK_LOST {
                    emit(EV_NEW_STACK, pid, tid, stack_id, addr, size, func);
                }
            }
            // Another CPU created the row between our lookup and insert.
            Err(EEXIST) => {
                add_to_stack(&skey, size, 1);
            }
            Err(_) => {
                // Keep the two maps consistent: an allocation is counted in both or neither.
                let _ = ALLOCS.remove(&key);
                bump(&STATS, STAT_STACKS_FULL);
                return;
            }
        }
    }
    bump(&STATS, STAT_TRACKED);
    if CONFIG.load().trace != 0 {
        emit(EV_ALLOC, pid, tid, stack_id, addr, size, func);
    }
}

/// Forgets the allocation at `addr`; `count_unknown` says whether a miss is a blind spot.
#[inline(always)]
fn forget(pid: u32, tid: u32, addr: u64, func: u32, count_unknown: bool) {
    let key = AllocKey { pid, _pad: 0, addr };
    // SAFETY: value copied out of the map at once.
    let Some(info) = (unsafe { ALLOCS.get(&key) }).copied() else {
        if count_unknown {
            bump(&STATS, STAT_UNKNOWN_FREE);
        }
        return;
    };
    // Only the caller whose delete succeeds subtracts, so a double free cannot count twice.
    if ALLOCS.remove(&key).is_err() {
        return;
    }
    add_to_stack(&StackKey { pid, stack_id: info.stack_id }, info.size.wrapping_neg(), u64::MAX);
    bump(&STATS, STAT_FREED);
    if CONFIG.load().trace != 0 {
        emit(EV_FREE, pid, tid, info.stack_id, addr, info.size, func);
    }
}

#[inline(always)]
fn ids() -> (u32, u32) {
    let id = current_pid_tgid();
    ((id >> 32) as u32, id as u32)
}

#[inline(always)]
fn sampled_in(size: u64) -> bool {
    let config = CONFIG.load();
    if size < config.min_size || size > config.max_size {
        return false;
    }
    // SAFETY: helper without preconditions.
    config.sample_rate <= 1 || unsafe { bpf_get_prandom_u32() } % config.sample_rate == 0
}

/// Allocator entry: remember the size until the call returns the address.
#[inline(always)]
fn enter(size: u64, memptr: u64, func: u32) -> u32 {
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
    realloc_enter(arg(&ctx, 0), arg(&ctx, 1), FN_REALLOC)
}

#[uprobe]
pub fn memleak_reallocarray(ctx: ProbeContext) -> u32 {
    realloc_enter(arg(&ctx, 0), arg(&ctx, 1).wrapping_mul(arg(&ctx, 2)), FN_REALLOCARRAY)
}

/// realloc is a free of the old block plus an allocation of the new one.
#[inline(always)]
fn realloc_enter(old: u64, size: u64, func: u32) -> u32 {
    let (pid, tid) = ids();
    if old != 0 {
        forget(pid, tid, old, func, true);
    }
    if size == 0 && old != 0 {
        // realloc(p, 0) frees p and returns NULL: not a failed allocation.
        return 0;
    }
    enter(size, 0, func)
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

#[uprobe]
pub fn memleak_mmap(ctx: ProbeContext) -> u32 {
    enter(arg(&ctx, 1), 0, FN_MMAP)
}

/// One return probe serves every allocator: the pending entry says what was called.
#[uretprobe]
pub fn memleak_alloc_ret(ctx: RetProbeContext) -> u32 {
    let (pid, tid) = ids();
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
    record(&ctx, pid, tid, addr, call.size, call.func, BPF_F_USER_STACK as u64);
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
    if addr != 0 {
        let (pid, tid) = ids();
        forget(pid, tid, addr, FN_FREE, true);
    }
    0
}

#[uprobe]
pub fn memleak_munmap(ctx: ProbeContext) -> u32 {
    let (pid, tid) = ids();
    // The allocator unmaps its own chunks from inside free(): a miss here is not a blind spot.
    forget(pid, tid, arg(&ctx, 0), FN_MUNMAP, false);
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
    record(ctx, NO_PID, tid, addr, size, func, 0);
    0
}

#[inline(always)]
fn kernel_free(ctx: &TracePointContext, ptr_off: u32) -> u32 {
    let addr = tp_u64(ctx, ptr_off);
    if addr > 16 {
        let (_, tid) = ids();
        // Most kernel frees are of objects allocated before tracing: not worth a blind-spot line.
        forget(NO_PID, tid, addr, FN_KFREE, false);
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
    record(&ctx, NO_PID, tid, pfn, size, FN_PAGE_ALLOC, 0);
    0
}

#[tracepoint]
pub fn memleak_page_free(ctx: TracePointContext) -> u32 {
    let pfn = tp_u64(&ctx, KMEM.load().page_free_pfn);
    let (_, tid) = ids();
    forget(NO_PID, tid, pfn, FN_KFREE, false);
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
