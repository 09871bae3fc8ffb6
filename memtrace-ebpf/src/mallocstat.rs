//! mallocstat: every hit of the `libc:memory_*` USDT probes user space attached, with its first
//! arguments decoded by the probe's spec, and the user stack for the probes of heap growth.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    EbpfContext as _,
    btf_maps::PerCpuArray,
    helpers::bpf_get_current_comm,
    macros::{btf_map, uprobe},
    programs::ProbeContext,
};
use memtrace_common::{
    STACK_LOST,
    mallocstat::{ARGS, Event, STAT_COUNT, STAT_NO_SPEC, STAT_STACK_COLLISION, STAT_STACK_LOST, WITH_STACK},
};
use memtrace_ebpf::{bump, current_pid_tgid, submit, unwind::UserRegs, usdt, wanted};

memtrace_ebpf::license!();

memtrace_ebpf::filter!();

memtrace_ebpf::usdt_specs!();
memtrace_ebpf::stack_store!();
#[btf_map]
static STATS: PerCpuArray<u64, { STAT_COUNT as usize }> = PerCpuArray::new();
memtrace_ebpf::events!(Event);

#[uprobe]
pub fn mallocstat_hit(ctx: ProbeContext) -> u32 {
    if !wanted(&FILTER.load()) {
        return 0;
    }
    let Some(spec) = usdt::spec(&ctx, &USDT_SPECS) else {
        bump(&STATS, STAT_NO_SPEC);
        return 0;
    };
    let id = current_pid_tgid();
    let pid = (id >> 32) as u32;
    let mut event = Event {
        pid,
        tid: id as u32,
        id: spec.id & !WITH_STACK,
        count: spec.count,
        stack_id: STACK_LOST,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        ..Event::default()
    };
    for i in 0..ARGS {
        event.args[i] = usdt::arg(&ctx, spec, i).unwrap_or(0);
    }
    if spec.id & WITH_STACK != 0 {
        event.stack_id = user_stack(&ctx, pid);
    }
    submit(&EVENTS, &event, &LOST);
    0
}

/// The probed code's user stack, walked by the shared unwinder from the uprobe's registers.
#[inline(always)]
fn user_stack(ctx: &ProbeContext, pid: u32) -> u64 {
    let regs = UserRegs::from_probe(ctx.as_ptr().cast());
    memtrace_ebpf::stack::id_or_counted(
        stacks().user_walked(ctx, regs, pid),
        &STATS,
        STAT_STACK_COLLISION,
        STAT_STACK_LOST,
    )
}
