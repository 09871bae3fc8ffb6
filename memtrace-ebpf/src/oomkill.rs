//! oomkill: the victim of each OOM kill from `oom:mark_victim`, whose current task is the
//! trigger; with kprobes, `oom_kill_process` adds the trigger's user stack first. What makes
//! the kill a memory cgroup's is read at the kill itself, not after it: the trigger's kernel
//! stack (a memcg OOM runs under mem_cgroup_out_of_memory) and its memory cgroup chain with
//! how far each group is from its limit.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    EbpfContext as _, Global,
    btf_maps::PerCpuArray,
    helpers::{
        bpf_get_current_comm, bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_str_bytes, generated::bpf_get_stack,
    },
    macros::{btf_map, kprobe, tracepoint},
    programs::{ProbeContext, TracePointContext},
};
use memtrace_common::{
    STACK_LOST,
    oomkill::{
        EV_TRIGGER, EV_VICTIM, Event, FIELD_ABSENT, KSTACK_DEPTH, MARGIN_UNKNOWN, MEMCG_LEVELS, MemcgOffsets,
        VictimOffsets,
    },
};
use memtrace_ebpf::{current_pid_tgid, submit, tp_u32, tp_u64, wanted};

memtrace_ebpf::license!();

memtrace_ebpf::filter!();

#[unsafe(no_mangle)]
static VICTIM: Global<VictimOffsets> = Global::new(VictimOffsets::UNSET);

#[unsafe(no_mangle)]
static MEMCG: Global<MemcgOffsets> = Global::new(MemcgOffsets::UNSET);

/// The event is built here: it is too large for the 512-byte BPF stack.
#[btf_map]
static SCRATCH: PerCpuArray<Event, 1> = PerCpuArray::new();
memtrace_ebpf::events!(Event);
memtrace_ebpf::stack_store!();

/// The per-CPU event buffer, reset to an event about the current task (the trigger).
#[inline(always)]
fn trigger_event(kind: u32) -> Option<&'static mut Event> {
    // SAFETY: this CPU's slot; programs do not preempt each other on one CPU.
    let event = unsafe { &mut *SCRATCH.get_ptr_mut(0)? };
    let id = current_pid_tgid();
    *event = Event::default();
    event.kind = kind;
    event.trigger_pid = (id >> 32) as u32;
    event.trigger_tid = id as u32;
    event.trigger_comm = bpf_get_current_comm().unwrap_or_default();
    event.stack_id = STACK_LOST;
    // SAFETY: helper without preconditions.
    event.timestamp_ns = unsafe { bpf_ktime_get_ns() };
    Some(event)
}

/// Reads the u64 at `base + offset` in kernel memory; 0 when unreadable.
#[inline(always)]
fn read_u64(base: u64, offset: u32) -> u64 {
    // SAFETY: the helper checks the read; offsets come from the kernel's BTF.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const u64) }.unwrap_or(0)
}

/// Pages a page counter can still charge, or MARGIN_UNKNOWN when unreadable.
#[inline(always)]
fn margin_of(memcg: u64, usage: u32, max: u32) -> u64 {
    // SAFETY: the helper checks the reads; offsets come from the kernel's BTF.
    let read = |at: u32| unsafe { bpf_probe_read_kernel((memcg + at as u64) as *const u64) }.ok();
    match (read(usage), read(max)) {
        (Some(usage), Some(max)) => max.saturating_sub(usage),
        _ => MARGIN_UNKNOWN,
    }
}

/// The memory cgroup the current task charges, and its ancestors, deepest first.
#[inline(always)]
fn memcg_chain(event: &mut Event) {
    let off = MEMCG.load();
    if off.valid == 0 {
        return;
    }
    // SAFETY: helper without preconditions; the task is read through checked helpers only.
    let task = unsafe { bpf_get_current_task() };
    let active = if off.task_active_memcg != FIELD_ABSENT { read_u64(task, off.task_active_memcg) } else { 0 };
    let cgroups = read_u64(task, off.task_cgroups);
    let mut css = if active != 0 {
        active
    } else if cgroups != 0 {
        read_u64(cgroups, off.css_set_memory)
    } else {
        0
    };
    for level in 0..MEMCG_LEVELS {
        if css == 0 {
            break;
        }
        let cgroup = read_u64(css, off.css_cgroup);
        let kn = if cgroup != 0 { read_u64(cgroup, off.cgroup_kn) } else { 0 };
        event.memcg_ids[level] = if kn != 0 { read_u64(kn, off.kn_id) } else { 0 };
        // css is the first member of struct mem_cgroup: the counters are at offsets from it.
        let mut margin = margin_of(css, off.memory_usage, off.memory_max);
        if off.memsw_max != FIELD_ABSENT {
            margin = margin.min(margin_of(css, off.memsw_usage, off.memsw_max));
        }
        event.memcg_margin[level] = margin;
        event.memcg_levels = level as u32 + 1;
        css = read_u64(css, off.css_parent);
    }
}

/// A field the record lacks reads as 0 (older kernels record only pid). The check also
/// keeps the verifier from seeing pointer math with the FIELD_ABSENT constant.
#[inline(always)]
fn field_u64(ctx: &TracePointContext, offset: u32) -> u64 {
    if offset == FIELD_ABSENT { 0 } else { tp_u64(ctx, offset) }
}

#[inline(always)]
fn field_u32(ctx: &TracePointContext, offset: u32) -> u32 {
    if offset == FIELD_ABSENT { 0 } else { tp_u32(ctx, offset) }
}

// name: mark_victim
// format:
//  field:int pid;                    offset:8;  size:4; signed:1;
//  field:__data_loc char[] comm;     offset:12; size:4; signed:0;
//  field:unsigned long total_vm;     offset:16; size:8; signed:0;
//  field:unsigned long anon_rss;     offset:24; size:8; signed:0;
//  field:unsigned long file_rss;     offset:32; size:8; signed:0;
//  field:unsigned long shmem_rss;    offset:40; size:8; signed:0;
//  field:uid_t uid;                  offset:48; size:4; signed:0;
//  field:unsigned long pgtables;     offset:56; size:8; signed:0;
//  field:short oom_score_adj;        offset:64; size:2; signed:1;
// (6.18; kernels before 6.8 record only pid)
#[tracepoint]
pub fn oomkill_victim(ctx: TracePointContext) -> u32 {
    if !wanted(&FILTER.load()) {
        return 0;
    }
    let off = VICTIM.load();
    let Some(event) = trigger_event(EV_VICTIM) else { return 0 };
    event.victim_pid = field_u32(&ctx, off.pid);
    if off.comm != FIELD_ABSENT {
        let loc = tp_u32(&ctx, off.comm);
        let src = (ctx.as_ptr() as usize + (loc & 0xffff) as usize) as *const u8;
        // SAFETY: the helper checks the read; the string lies inside the record.
        let _ = unsafe { bpf_probe_read_kernel_str_bytes(src, &mut event.victim_comm) };
    }
    event.total_vm_kb = field_u64(&ctx, off.total_vm);
    event.anon_rss_kb = field_u64(&ctx, off.anon_rss);
    event.file_rss_kb = field_u64(&ctx, off.file_rss);
    event.shmem_rss_kb = field_u64(&ctx, off.shmem_rss);
    event.pgtables_kb = field_u64(&ctx, off.pgtables);
    event.uid = field_u32(&ctx, off.uid);
    if off.oom_score_adj != FIELD_ABSENT {
        // SAFETY: offset from the format file; the read is checked by the helper.
        event.oom_score_adj = unsafe { ctx.read_at::<i16>(off.oom_score_adj as usize) }.unwrap_or(0) as i32;
    }
    let size = (KSTACK_DEPTH * 8) as u32;
    // SAFETY: the buffer is the event's own array of `size` bytes; flags 0: the kernel stack.
    let got = unsafe { bpf_get_stack(ctx.as_ptr(), event.kstack.as_mut_ptr().cast(), size, 0) };
    event.kstack_len = if got > 0 { (got / 8) as u32 } else { 0 };
    memcg_chain(event);
    submit(&EVENTS, event, &LOST);
    0
}

/// `oom_kill_process(struct oom_control *oc, const char *message)` runs in the trigger just
/// before the victim is marked. The victim comes from mark_victim; this adds what only the
/// trigger has, its user stack, and the victim's name from oc->chosen for kernels whose
/// mark_victim records only the pid.
#[kprobe]
pub fn oomkill_kprobe(ctx: ProbeContext) -> u32 {
    if !wanted(&FILTER.load()) {
        return 0;
    }
    let Some(event) = trigger_event(EV_TRIGGER) else { return 0 };
    let off = VICTIM.load();
    if off.oc_chosen != FIELD_ABSENT
        && let Some(oc) = ctx.arg::<u64>(0)
    {
        let chosen = read_u64(oc, off.oc_chosen);
        if chosen != 0 {
            let src = (chosen + off.task_comm as u64) as *const u8;
            // SAFETY: the helper checks the read; offsets come from the kernel's BTF.
            let _ = unsafe { bpf_probe_read_kernel_str_bytes(src, &mut event.victim_comm) };
        }
    }
    if let Ok(id) = stacks().user_walked(&ctx, None, event.trigger_pid) {
        event.stack_id = id;
    }
    submit(&EVENTS, event, &LOST);
    0
}
