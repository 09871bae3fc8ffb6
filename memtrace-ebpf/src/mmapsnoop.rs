//! mmapsnoop: every mmap, munmap and mremap. The entry tracepoint keeps the arguments per
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
use memtrace_common::mmapsnoop::{CALL_MMAP, CALL_MREMAP, CALL_MUNMAP, Config, Event, Offsets};
use memtrace_ebpf::{current_pid_tgid, submit, tp_u64, wanted};

memtrace_ebpf::license!();

memtrace_ebpf::filter!();

#[unsafe(no_mangle)]
static CONFIG: Global<Config> = Global::new(Config { failed_only: 0, self_pid: 0 });

// Layouts of a 6.18 kernel, for reference; the offsets used come from the running kernel:
//
// name: sys_enter_mmap
//   field:int __syscall_nr;       offset:8;   size:4; signed:1;
//   field:unsigned long addr;     offset:16;  size:8; signed:0;
//   field:unsigned long len;      offset:24;  size:8; signed:0;
//   field:unsigned long prot;     offset:32;  size:8; signed:0;
//   field:unsigned long flags;    offset:40;  size:8; signed:0;
//   field:unsigned long fd;       offset:48;  size:8; signed:0;
//   field:unsigned long off;      offset:56;  size:8; signed:0;
// name: sys_enter_munmap
//   field:unsigned long addr;     offset:16;  size:8; signed:0;
//   field:size_t len;             offset:24;  size:8; signed:0;
// name: sys_enter_mremap
//   field:unsigned long addr;     offset:16;  size:8; signed:0;
//   field:unsigned long old_len;  offset:24;  size:8; signed:0;
//   field:unsigned long new_len;  offset:32;  size:8; signed:0;
//   field:unsigned long flags;    offset:40;  size:8; signed:0;
//   field:unsigned long new_addr; offset:48;  size:8; signed:0;
// name: sys_exit_mmap (and sys_exit_munmap, sys_exit_mremap)
//   field:long ret;               offset:16;  size:8; signed:1;
#[unsafe(no_mangle)]
static OFFSETS: Global<Offsets> =
    Global::new(Offsets { mmap: [0; 6], munmap: [0; 2], mremap: [0; 5], mmap_ret: 0, munmap_ret: 0, mremap_ret: 0 });

// LRU: a thread killed inside the call never reaches the exit tracepoint; its entry ages out.
#[btf_map]
static PENDING: LruHashMap<u32, Event, 16_384> = LruHashMap::new();
memtrace_ebpf::events!(Event);

/// Remembers the call's arguments, read at `offsets`, until it returns.
#[inline(always)]
fn enter<const N: usize>(ctx: &TracePointContext, call: u32, offsets: &[u32; N]) -> u32 {
    let id = current_pid_tgid();
    let (pid, tid) = ((id >> 32) as u32, id as u32);
    if pid == CONFIG.load().self_pid || !wanted(&FILTER.load()) {
        return 0;
    }
    let mut event = Event {
        // SAFETY: helper without preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        pid,
        tid,
        call,
        _pad: 0,
        args: [0; 6],
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
fn exit(ctx: &TracePointContext, call: u32, ret_offset: u32) -> u32 {
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
    event.ret = tp_u64(ctx, ret_offset) as i64;
    // Errors are -4095..-1; mmap addresses are never that high.
    let failed = (-4095..0).contains(&event.ret);
    if CONFIG.load().failed_only != 0 && !failed {
        return 0;
    }
    submit(&EVENTS, &event, &LOST);
    0
}

#[tracepoint]
pub fn mmapsnoop_mmap_enter(ctx: TracePointContext) -> u32 {
    enter(&ctx, CALL_MMAP, &OFFSETS.load().mmap)
}

#[tracepoint]
pub fn mmapsnoop_mmap_exit(ctx: TracePointContext) -> u32 {
    exit(&ctx, CALL_MMAP, OFFSETS.load().mmap_ret)
}

#[tracepoint]
pub fn mmapsnoop_munmap_enter(ctx: TracePointContext) -> u32 {
    enter(&ctx, CALL_MUNMAP, &OFFSETS.load().munmap)
}

#[tracepoint]
pub fn mmapsnoop_munmap_exit(ctx: TracePointContext) -> u32 {
    exit(&ctx, CALL_MUNMAP, OFFSETS.load().munmap_ret)
}

#[tracepoint]
pub fn mmapsnoop_mremap_enter(ctx: TracePointContext) -> u32 {
    enter(&ctx, CALL_MREMAP, &OFFSETS.load().mremap)
}

#[tracepoint]
pub fn mmapsnoop_mremap_exit(ctx: TracePointContext) -> u32 {
    exit(&ctx, CALL_MREMAP, OFFSETS.load().mremap_ret)
}
