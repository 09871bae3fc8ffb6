//! shmsnoop: System V shared memory calls. The entry tracepoint keeps the arguments per
//! thread until the exit tracepoint brings the result; the pair goes out as one event.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    Global,
    btf_maps::LruHashMap,
    helpers::{bpf_get_current_comm, bpf_ktime_get_ns},
    macros::{btf_map, tracepoint},
    programs::TracePointContext,
};
use memtrace_common::shmsnoop::{CALL_SHMAT, CALL_SHMCTL, CALL_SHMDT, CALL_SHMGET, Config, Event, Offsets};
use memtrace_ebpf::{current_pid_tgid, submit, tp_u64, wanted};

memtrace_ebpf::license!();

memtrace_ebpf::filter!();

#[unsafe(no_mangle)]
static CONFIG: Global<Config> = Global::new(Config { failed_only: 0, _pad: 0 });

// Layouts of a 6.18 kernel, for reference; the offsets used come from the running kernel:
//
// name: sys_enter_shmget
//   field:key_t key;               offset:16; size:8; signed:0;
//   field:size_t size;             offset:24; size:8; signed:0;
//   field:int shmflg;              offset:32; size:8; signed:0;
// name: sys_enter_shmat
//   field:int shmid;               offset:16; size:8; signed:0;
//   field:char * shmaddr;          offset:24; size:8; signed:0;
//   field:int shmflg;              offset:32; size:8; signed:0;
// name: sys_enter_shmdt
//   field:char * shmaddr;          offset:16; size:8; signed:0;
// name: sys_enter_shmctl
//   field:int shmid;               offset:16; size:8; signed:0;
//   field:int cmd;                 offset:24; size:8; signed:0;
//   field:struct shmid_ds * buf;   offset:32; size:8; signed:0;
// name: sys_exit_shmget (and sys_exit_shmat, sys_exit_shmdt, sys_exit_shmctl)
//   field:long ret;                offset:16; size:8; signed:1;
#[unsafe(no_mangle)]
static OFFSETS: Global<Offsets> =
    Global::new(Offsets { shmget: [0; 3], shmat: [0; 3], shmdt: 0, shmctl: [0; 3], ret: [0; 4] });

// LRU: a thread killed inside the call never reaches the exit tracepoint; its entry ages out.
#[btf_map]
static PENDING: LruHashMap<u32, Event, 4096> = LruHashMap::new();
memtrace_ebpf::events!(Event);

/// Remembers the call's arguments, read at `offsets`, until it returns.
#[inline(always)]
fn enter<const N: usize>(ctx: &TracePointContext, call: u32, offsets: &[u32; N]) -> u32 {
    if !wanted(&FILTER.load()) {
        return 0;
    }
    let id = current_pid_tgid();
    let tid = id as u32;
    let mut event = Event {
        // SAFETY: helper without preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        pid: (id >> 32) as u32,
        tid,
        call,
        _pad: 0,
        args: [0; 3],
        ret: 0,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    };
    let mut i = 0;
    while i < N && i < event.args.len() {
        event.args[i] = tp_u64(ctx, offsets[i]);
        i += 1;
    }
    let _ = PENDING.insert(tid, event, 0);
    0
}

/// Completes the thread's pending call with its return value and sends it.
#[inline(always)]
fn exit(ctx: &TracePointContext, call: u32) -> u32 {
    let tid = current_pid_tgid() as u32;
    let Some(pending) = PENDING.get_ptr(tid) else {
        return 0;
    };
    // SAFETY: pointer from the map lookup; copied before the entry is removed.
    let mut event = unsafe { *pending };
    let _ = PENDING.remove(tid);
    if event.call != call {
        return 0;
    }
    let offsets = OFFSETS.load().ret;
    event.ret = tp_u64(ctx, offsets[(call & 3) as usize]) as i64;
    // Errors are -4095..-1; shmat addresses are never that high.
    if CONFIG.load().failed_only != 0 && !(-4095..0).contains(&event.ret) {
        return 0;
    }
    submit(&EVENTS, &event, &LOST);
    0
}

#[tracepoint]
pub fn shmsnoop_shmget_enter(ctx: TracePointContext) -> u32 {
    enter(&ctx, CALL_SHMGET, &OFFSETS.load().shmget)
}

#[tracepoint]
pub fn shmsnoop_shmget_exit(ctx: TracePointContext) -> u32 {
    exit(&ctx, CALL_SHMGET)
}

#[tracepoint]
pub fn shmsnoop_shmat_enter(ctx: TracePointContext) -> u32 {
    enter(&ctx, CALL_SHMAT, &OFFSETS.load().shmat)
}

#[tracepoint]
pub fn shmsnoop_shmat_exit(ctx: TracePointContext) -> u32 {
    exit(&ctx, CALL_SHMAT)
}

#[tracepoint]
pub fn shmsnoop_shmdt_enter(ctx: TracePointContext) -> u32 {
    enter(&ctx, CALL_SHMDT, &[OFFSETS.load().shmdt])
}

#[tracepoint]
pub fn shmsnoop_shmdt_exit(ctx: TracePointContext) -> u32 {
    exit(&ctx, CALL_SHMDT)
}

#[tracepoint]
pub fn shmsnoop_shmctl_enter(ctx: TracePointContext) -> u32 {
    enter(&ctx, CALL_SHMCTL, &OFFSETS.load().shmctl)
}

#[tracepoint]
pub fn shmsnoop_shmctl_exit(ctx: TracePointContext) -> u32 {
    exit(&ctx, CALL_SHMCTL)
}
