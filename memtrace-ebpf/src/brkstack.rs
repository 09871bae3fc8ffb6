//! brkstack: every brk call counted per (pid, user stack) in the kernel, with the bytes by
//! which it moved the process's break (new break minus the previous one, kept per process).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    Global,
    bindings::{pt_regs, task_struct},
    btf_maps::{HashMap, PerCpuArray, RingBuf},
    helpers::{bpf_get_current_comm, bpf_get_current_task_btf, bpf_probe_read_kernel, bpf_probe_read_user},
    macros::{btf_map, tracepoint},
    programs::TracePointContext,
};
use memtrace_common::{
    Filter, STACK_LOST,
    brkstack::{
        BrkKey, BrkTotal, CHAIN_FRAMES, Config, EV_CALL, EV_NEW_STACK, Event, FLAG_UNKNOWN_PREV, Offsets, SCAN_WORDS,
        STAT_COUNT, STAT_NO_ENTRY, STAT_STACK_COLLISION, STAT_STACK_LOST, STAT_TOTALS_FULL, STAT_UNKNOWN_PREV,
    },
    stack::MAX_FRAMES,
};
use memtrace_ebpf::{BPF_NOEXIST, EEXIST, atomic_add, bump, current_pid_tgid, stack::Lost, submit, tp_u64, wanted};

memtrace_ebpf::license!();

#[unsafe(no_mangle)]
static FILTER: Global<Filter> = Global::new(Filter { pid: 0, has_comm: 0, comm: [0; 16] });
#[unsafe(no_mangle)]
static CONFIG: Global<Config> = Global::new(Config { events: 0, self_pid: 0 });
// name: sys_enter_brk
//     field:int __syscall_nr;    offset:8;    size:4;    signed:1;
//     field:unsigned long brk;   offset:16;   size:8;    signed:0;
// name: sys_exit_brk
//     field:int __syscall_nr;    offset:8;    size:4;    signed:1;
//     field:long ret;            offset:16;   size:8;    signed:1;
#[unsafe(no_mangle)]
static OFFSETS: Global<Offsets> = Global::new(Offsets { enter_brk: 0, exit_ret: 0 });

#[btf_map]
static TOTALS: HashMap<BrkKey, BrkTotal, 16_384> = HashMap::new();
/// The break each process had after its last brk call seen.
#[btf_map]
static LAST_BRK: HashMap<u32, u64, 65_536> = HashMap::new();
/// The break asked for, per thread, between syscall entry and exit.
#[btf_map]
static PENDING: HashMap<u32, u64, 16_384> = HashMap::new();
memtrace_ebpf::stack_store!();
/// The frame-pointer chain's next link and the frames found so far, kept in map memory so the
/// verifier does not track their values across the scan (which would defeat its pruning).
#[repr(C)]
struct Scratch {
    chain: u64,
    frames: u64,
}

#[btf_map]
static SCRATCH: PerCpuArray<Scratch, 1> = PerCpuArray::new();
#[btf_map]
static STATS: PerCpuArray<u64, { STAT_COUNT as usize }> = PerCpuArray::new();
#[btf_map]
static EVENTS: RingBuf<Event, { 256 * 1024 }> = RingBuf::new();
#[btf_map]
static LOST: PerCpuArray<u64, 1> = PerCpuArray::new();

#[tracepoint]
pub fn brkstack_enter(ctx: TracePointContext) -> u32 {
    if !wanted(&FILTER.load()) || (current_pid_tgid() >> 32) as u32 == CONFIG.load().self_pid {
        return 0;
    }
    let tid = current_pid_tgid() as u32;
    let _ = PENDING.insert(tid, tp_u64(&ctx, OFFSETS.load().enter_brk), 0);
    0
}

#[tracepoint]
pub fn brkstack_exit(ctx: TracePointContext) -> u32 {
    let id = current_pid_tgid();
    let (pid, tid) = ((id >> 32) as u32, id as u32);
    // SAFETY: value copied out of the map at once.
    let Some(requested) = (unsafe { PENDING.get(tid) }).copied() else {
        // Filtered out at entry, or entered before attach.
        if wanted(&FILTER.load()) && pid != CONFIG.load().self_pid {
            bump(&STATS, STAT_NO_ENTRY);
        }
        return 0;
    };
    let _ = PENDING.remove(tid);
    let result = tp_u64(&ctx, OFFSETS.load().exit_ret);
    // SAFETY: value copied out of the map at once.
    let previous = (unsafe { LAST_BRK.get(pid) }).copied();
    let _ = LAST_BRK.insert(pid, result, 0);
    let (growth, flags) = match previous {
        Some(prev) => (result.wrapping_sub(prev), 0),
        // brk(0) only reads the break: it establishes the baseline with nothing to miss.
        None if requested == 0 => (0, 0),
        None => {
            bump(&STATS, STAT_UNKNOWN_PREV);
            (0, FLAG_UNKNOWN_PREV)
        }
    };
    let stack_id = user_stack();
    let comm = bpf_get_current_comm().unwrap_or([0; 16]);
    let mut event = Event { kind: EV_CALL, pid, tid, flags, stack_id, requested, result, growth, comm };
    let key = BrkKey { pid, _pad: 0, stack_id };
    if !add(&key, growth) {
        match TOTALS.insert(&key, &BrkTotal { calls: 1, bytes: growth, comm }, BPF_NOEXIST) {
            Ok(()) if stack_id != STACK_LOST => {
                event.kind = EV_NEW_STACK;
                submit(&EVENTS, &event, &LOST);
                event.kind = EV_CALL;
            }
            Ok(()) => {}
            // Another CPU created the row between our lookup and insert.
            Err(EEXIST) => {
                add(&key, growth);
            }
            Err(_) => bump(&STATS, STAT_TOTALS_FULL),
        }
    }
    if CONFIG.load().events != 0 {
        submit(&EVENTS, &event, &LOST);
    }
    0
}

/// `bpf_task_pt_regs` (helper 175, kernel 5.15+): the user registers saved at syscall entry.
#[inline(always)]
fn task_pt_regs(task: *mut task_struct) -> *mut pt_regs {
    // SAFETY: helper 175 takes a BTF task pointer and returns its saved user registers.
    unsafe {
        let helper: unsafe extern "C" fn(*mut task_struct) -> *mut pt_regs = core::mem::transmute(175usize);
        helper(task)
    }
}

/// Whether `addr` follows a call instruction: `e8 rel32`, `ff 15 disp32`, `ff 9x disp32`,
/// `ff 5x disp8` or `ff dx` (call through a register). Data rarely looks like that.
#[inline(always)]
fn after_call(addr: u64) -> bool {
    if !(4096..0x0000_8000_0000_0000).contains(&addr) {
        return false;
    }
    // SAFETY: reads user memory through the checked helper.
    let Ok(word) = (unsafe { bpf_probe_read_user((addr - 8) as *const u64) }) else { return false };
    let b = word.to_le_bytes();
    b[3] == 0xe8
        || (b[2] == 0xff && (b[3] == 0x15 || b[3] & 0xf8 == 0x90))
        || (b[5] == 0xff && b[6] & 0xf8 == 0x50)
        || (b[6] == 0xff && b[7] & 0xf8 == 0xd0)
}

/// The user stack by scanning: the instruction pointer, then every word of the top of the
/// stack that is the address after a call. Returns its id in the stack store, or STACK_LOST.
#[inline(always)]
fn user_stack() -> u64 {
    // SAFETY: helper without preconditions.
    let regs = task_pt_regs(unsafe { bpf_get_current_task_btf() });
    // SAFETY: reads kernel memory through the checked helper.
    let (Ok(ip), Ok(sp)) =
        (unsafe { (bpf_probe_read_kernel(&raw const (*regs).rip), bpf_probe_read_kernel(&raw const (*regs).rsp)) })
    else {
        bump(&STATS, STAT_STACK_LOST);
        return STACK_LOST;
    };
    let (Some(scratch), Some(stack)) = (SCRATCH.get_ptr_mut(0), stacks().scratch()) else { return STACK_LOST };
    // SAFETY: per-CPU scratch slots; programs do not preempt each other on one CPU.
    let (chain, count) = unsafe { (&raw mut (*scratch).chain, &raw mut (*scratch).frames) };
    // SAFETY (all chain accesses): a field of the scratch slot above.
    let set_chain = |v: u64| unsafe { chain.write_volatile(v) };
    let get_chain = || unsafe { chain.read_volatile() };
    // SAFETY: the count lives in map memory; the index is checked against MAX_FRAMES.
    let push = |ret: u64| unsafe {
        let n = count.read_volatile();
        if ret != 0 && n < MAX_FRAMES as u64 {
            (*stack).ips[n as usize] = ret;
            count.write_volatile(n + 1);
        }
    };
    // SAFETY: as above.
    unsafe { count.write_volatile(0) };
    push(ip);
    set_chain(0);
    // Phase 1: scan for return addresses until a frame record [saved rbp][return address].
    let mut prev = 0u64;
    for i in 0..SCAN_WORDS {
        let at = sp + 8 * i as u64;
        // SAFETY: reads user memory through the checked helper.
        let word = unsafe { bpf_probe_read_user(at as *const u64) }.unwrap_or(0);
        // Pointers into the stack itself are saved frame pointers and locals, never code.
        let ret = if get_chain() == 0 && word.abs_diff(sp) >= (8 << 20) && after_call(word) { word } else { 0 };
        // The word before a return address points up the stack, 16-aligned: a saved rbp.
        if ret != 0 && links_up(prev, at - 8) {
            set_chain(prev);
        }
        push(ret);
        prev = word;
    }
    // Phase 2: follow the frame-pointer chain from that record.
    for _ in 0..CHAIN_FRAMES {
        let fp = get_chain();
        if fp == 0 {
            break;
        }
        // SAFETY: reads user memory through the checked helper.
        let (next, r) = unsafe { (bpf_probe_read_user(fp as *const u64), bpf_probe_read_user((fp + 8) as *const u64)) };
        // A link that does not end in a return address was not a frame record: stop.
        let ret = r.ok().filter(|&r| after_call(r)).unwrap_or(0);
        let next = next.unwrap_or(0);
        set_chain(if ret != 0 && links_up(next, fp) { next } else { 0 });
        push(ret);
    }
    // SAFETY: as above; at most MAX_FRAMES. No closure uses the slot any more.
    let stack = unsafe {
        (*stack).len = count.read_volatile() as u32;
        &*stack
    };
    match stacks().store(stack) {
        Ok(id) => id,
        Err(Lost::Collided) => {
            bump(&STATS, STAT_STACK_COLLISION);
            STACK_LOST
        }
        Err(_) => {
            bump(&STATS, STAT_STACK_LOST);
            STACK_LOST
        }
    }
}

/// Whether `fp`, found at stack address `at`, is a saved frame pointer: the next frame record
/// sits higher on the stack (within 1 MiB), 16-byte aligned as the x86-64 ABI keeps it.
#[inline(always)]
fn links_up(fp: u64, at: u64) -> bool {
    fp > at && fp - at < (1 << 20) && fp & 15 == 0
}

#[inline(always)]
fn add(key: &BrkKey, growth: u64) -> bool {
    let Some(total) = TOTALS.get_ptr_mut(key) else { return false };
    // SAFETY: pointer from the map lookup; fields are 8-byte aligned.
    unsafe {
        atomic_add(&raw mut (*total).calls, 1);
        atomic_add(&raw mut (*total).bytes, growth);
    }
    true
}

/// A new program image has a new break: the next call (ld.so's brk(0)) sets the baseline.
#[tracepoint]
pub fn brkstack_exec(_ctx: TracePointContext) -> u32 {
    let _ = LAST_BRK.remove((current_pid_tgid() >> 32) as u32);
    0
}

/// Keeps LAST_BRK from filling with the dead: forget a process when its leader exits.
#[tracepoint]
pub fn brkstack_gone(_ctx: TracePointContext) -> u32 {
    let id = current_pid_tgid();
    if (id >> 32) as u32 == id as u32 {
        let _ = LAST_BRK.remove((id >> 32) as u32);
    }
    let _ = PENDING.remove(id as u32);
    0
}
