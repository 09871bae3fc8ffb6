//! shmsnoop: System V shared memory calls. Each call's entry and exit tracepoints go
//! through `memtrace_ebpf::syscall_snoop!`, which pairs them into one event.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use memtrace_common::shmsnoop::{CALL_SHMAT, CALL_SHMCTL, CALL_SHMDT, CALL_SHMGET};

memtrace_ebpf::license!();

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
memtrace_ebpf::syscall_snoop!(4096);

#[tracepoint]
pub fn shmsnoop_shmget_enter(ctx: TracePointContext) -> u32 {
    enter(&ctx, CALL_SHMGET)
}

#[tracepoint]
pub fn shmsnoop_shmget_exit(ctx: TracePointContext) -> u32 {
    exit(&ctx, CALL_SHMGET)
}

#[tracepoint]
pub fn shmsnoop_shmat_enter(ctx: TracePointContext) -> u32 {
    enter(&ctx, CALL_SHMAT)
}

#[tracepoint]
pub fn shmsnoop_shmat_exit(ctx: TracePointContext) -> u32 {
    exit(&ctx, CALL_SHMAT)
}

#[tracepoint]
pub fn shmsnoop_shmdt_enter(ctx: TracePointContext) -> u32 {
    enter(&ctx, CALL_SHMDT)
}

#[tracepoint]
pub fn shmsnoop_shmdt_exit(ctx: TracePointContext) -> u32 {
    exit(&ctx, CALL_SHMDT)
}

#[tracepoint]
pub fn shmsnoop_shmctl_enter(ctx: TracePointContext) -> u32 {
    enter(&ctx, CALL_SHMCTL)
}

#[tracepoint]
pub fn shmsnoop_shmctl_exit(ctx: TracePointContext) -> u32 {
    exit(&ctx, CALL_SHMCTL)
}
