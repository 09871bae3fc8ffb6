//! brkstack: every brk call counted per (pid, user stack) in the kernel, with the bytes by
//! which it moved the process's break (new break minus the previous one, kept per process).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    Global,
    btf_maps::{HashMap, PerCpuArray},
    helpers::bpf_get_current_comm,
    macros::{btf_map, tracepoint},
    programs::TracePointContext,
};
use memtrace_common::{
    STACK_LOST,
    brkstack::{
        BrkKey, BrkTotal, Config, EV_CALL, EV_NEW_STACK, Event, FLAG_UNKNOWN_PREV, Offsets, STAT_COUNT, STAT_NO_ENTRY,
        STAT_STACK_COLLISION, STAT_STACK_LOST, STAT_TOTALS_FULL, STAT_UNKNOWN_PREV,
    },
};
use memtrace_ebpf::{BPF_NOEXIST, EEXIST, atomic_add, bump, current_pid_tgid, submit, tp_u64, wanted};

memtrace_ebpf::license!();

memtrace_ebpf::filter!();
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
#[btf_map]
static STATS: PerCpuArray<u64, { STAT_COUNT as usize }> = PerCpuArray::new();
memtrace_ebpf::events!(Event);

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
    let stack_id = user_stack(&ctx, pid);
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

/// The caller's user stack, walked by the shared unwinder (tables, or frame pointers with
/// `--unwind fp`). Returns its id in the stack store, or STACK_LOST.
#[inline(always)]
fn user_stack(ctx: &TracePointContext, pid: u32) -> u64 {
    memtrace_ebpf::stack::id_or_counted(
        stacks().user_walked(ctx, None, pid),
        &STATS,
        STAT_STACK_COLLISION,
        STAT_STACK_LOST,
    )
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
