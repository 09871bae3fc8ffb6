//! mmapsnoop: every mmap, munmap and mremap. Each call's entry and exit tracepoints go
//! through `memtrace_ebpf::syscall_snoop!`, which pairs them into one event.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use memtrace_common::mmapsnoop::{CALL_MMAP, CALL_MREMAP, CALL_MUNMAP};

memtrace_ebpf::license!();

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
memtrace_ebpf::syscall_snoop!(16_384);

#[tracepoint]
pub fn mmapsnoop_mmap_enter(ctx: TracePointContext) -> u32 {
    enter(&ctx, CALL_MMAP)
}

#[tracepoint]
pub fn mmapsnoop_mmap_exit(ctx: TracePointContext) -> u32 {
    exit(&ctx, CALL_MMAP)
}

#[tracepoint]
pub fn mmapsnoop_munmap_enter(ctx: TracePointContext) -> u32 {
    enter(&ctx, CALL_MUNMAP)
}

#[tracepoint]
pub fn mmapsnoop_munmap_exit(ctx: TracePointContext) -> u32 {
    exit(&ctx, CALL_MUNMAP)
}

#[tracepoint]
pub fn mmapsnoop_mremap_enter(ctx: TracePointContext) -> u32 {
    enter(&ctx, CALL_MREMAP)
}

#[tracepoint]
pub fn mmapsnoop_mremap_exit(ctx: TracePointContext) -> u32 {
    exit(&ctx, CALL_MREMAP)
}
