//! memleak's watchpoints (`--watch`): user space arms hardware breakpoints on a few blocks,
//! chosen among those the probes offer here, and this program runs at each write they catch.

use aya_ebpf::{
    btf_maps::{Array, HashMap},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    macros::{btf_map, perf_event},
    programs::PerfEventContext,
};
use memtrace_common::{
    STACK_LOST,
    memleak::{
        AllocKey, Candidate, ERR_USE_AFTER_FREE_WRITE, ERR_WRITE_PAST_END, EV_ERROR, FN_FREE, MemError, PICKS,
        STAT_EVENTS_LOST, STAT_WATCH_DISARMED, STAT_WATCH_HITS, STAT_WATCH_IN_ALLOCATOR, STAT_WATCH_STALE,
        WATCH_PAST_END, Watch, WatchKey,
    },
};
use memtrace_ebpf::{bump, unwind::UserRegs};

use super::{ALLOCS, CONFIG, EVENTS, FREED, PENDING, STATS, ids, stacks};

/// Armed watchpoints; user space writes and clears them with each rotation.
#[btf_map]
static WATCHES: HashMap<WatchKey, Watch, 64> = HashMap::new();

/// Recent blocks offered for watching (see `Candidate`).
#[btf_map]
static LIVE_PICKS: Array<Candidate, { PICKS as usize }> = Array::new();
#[btf_map]
static FREED_PICKS: Array<Candidate, { PICKS as usize }> = Array::new();

/// Offers a block just allocated (`free_ns` 0) or just freed, when watching: one write at a
/// random slot, no look-up, so the probes' cost barely moves.
#[inline(always)]
pub(super) fn offer(key: &AllocKey, size: u64, free_ns: u64) {
    if CONFIG.load().watch == 0 {
        return;
    }
    // SAFETY: helper without preconditions.
    let slot = unsafe { bpf_get_prandom_u32() } % PICKS;
    let picks = if free_ns == 0 { &LIVE_PICKS } else { &FREED_PICKS };
    if let Some(c) = picks.get_ptr_mut(slot) {
        // SAFETY: pointer from the map lookup. A torn write (two CPUs at one slot) names a
        // block user space then does not find, and skips.
        unsafe { *c = Candidate { pid: key.pid, image: key.image, addr: key.addr, size, free_ns } };
    }
}

/// A write to watched bytes. x86's data breakpoints trap after the write: the registers are
/// the thread's at the next instruction, which the report's stack symbolizes as a return
/// address (one byte back: the writing instruction).
#[perf_event]
pub fn memleak_watch(ctx: PerfEventContext) -> u32 {
    bump(&STATS, STAT_WATCH_HITS);
    let data = ctx.ctx;
    // Direct context loads: the verifier rewrites them to the sample's address and the
    // registers of the trapped thread (a probe read would see the kernel's own layout).
    // SAFETY: reads of the program's context.
    let (addr, regs) = unsafe {
        let r = &raw const (*data).regs;
        let regs = UserRegs {
            ip: core::ptr::read_volatile(&raw const (*r).rip),
            sp: core::ptr::read_volatile(&raw const (*r).rsp),
            bp: core::ptr::read_volatile(&raw const (*r).rbp),
        };
        (core::ptr::read_volatile(&raw const (*data).addr), regs)
    };
    let (pid, tid) = ids();
    let wkey = WatchKey { pid, _pad: 0, addr };
    // SAFETY: value copied out of the map at once.
    let Some(w) = (unsafe { WATCHES.get(&wkey) }).copied() else {
        // A child process that inherited the breakpoint, or a watch already reported.
        bump(&STATS, STAT_WATCH_DISARMED);
        return 0;
    };
    // SAFETY: presence check only.
    if unsafe { PENDING.get(&tid) }.is_some() {
        // Inside malloc, calloc or realloc: glibc's calloc ends in a tail call to memset, so no
        // frame of the stack would tell its write from the program's.
        bump(&STATS, STAT_WATCH_IN_ALLOCATOR);
        return 0;
    }
    let key = AllocKey { pid, image: w.image, addr: w.block };
    let mut err = MemError {
        kind: EV_ERROR,
        pid,
        tid,
        func: FN_FREE,
        image: w.image,
        addr: w.block,
        size: w.size,
        alloc_stack: STACK_LOST,
        free_stack: STACK_LOST,
        sp: addr,
        ..Default::default()
    };
    if w.kind == WATCH_PAST_END {
        // SAFETY: value copied out of the map at once.
        match unsafe { ALLOCS.get(&key) }.copied() {
            Some(info) if info.size == w.size => {
                err.error = ERR_WRITE_PAST_END;
                err.alloc_stack = info.stack_id;
                err.alloc_func = info.func;
            }
            // Freed since: the bytes may be the allocator's or another block's now.
            _ => return stale(&wkey),
        }
    } else {
        // SAFETY: value copied out of the map at once.
        match unsafe { FREED.get(&key) }.copied() {
            Some(f) if f.free_ns == w.free_ns => {
                err.error = ERR_USE_AFTER_FREE_WRITE;
                err.alloc_stack = f.alloc_stack;
                err.free_stack = f.free_stack;
                err.alloc_func = f.func;
                err.free_tid = f.tid;
                err.freed_ns = f.free_ns;
            }
            // Allocated again: its writes are its new owner's.
            _ => return stale(&wkey),
        }
    }
    // One report per watched block: a loop writing past the end would flood the ring.
    if WATCHES.remove(&wkey).is_err() {
        return 0;
    }
    err.stack_id = stacks().user_walked(&ctx, Some(regs), pid).unwrap_or(STACK_LOST);
    // SAFETY: helper without preconditions.
    err.timestamp_ns = unsafe { bpf_ktime_get_ns() };
    let Some(mut entry) = EVENTS.reserve_untyped::<MemError>(0) else {
        bump(&STATS, STAT_EVENTS_LOST);
        return 0;
    };
    entry.write(err);
    entry.submit(0);
    0
}

#[inline(always)]
fn stale(wkey: &WatchKey) -> u32 {
    bump(&STATS, STAT_WATCH_STALE);
    let _ = WATCHES.remove(wkey);
    0
}
