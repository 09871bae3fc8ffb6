//! oomkill: the victim of each OOM kill from `oom:mark_victim`, whose current task is the
//! trigger; with kprobes, `oom_kill_process` adds the trigger's user stack first.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    EbpfContext as _, Global,
    bindings::BPF_F_USER_STACK,
    btf_maps::{PerCpuArray, RingBuf, StackTrace},
    helpers::{bpf_get_current_comm, bpf_ktime_get_ns, bpf_probe_read_kernel_str_bytes},
    macros::{btf_map, kprobe, tracepoint},
    programs::{ProbeContext, TracePointContext, tracing::StackIdContext},
};
use memtrace_common::{
    Filter, STACK_LOST,
    oomkill::{EV_TRIGGER, EV_VICTIM, Event, FIELD_ABSENT, VictimOffsets},
};
use memtrace_ebpf::{current_pid_tgid, submit, tp_u32, tp_u64, wanted};

memtrace_ebpf::license!();

#[unsafe(no_mangle)]
static FILTER: Global<Filter> = Global::new(Filter { pid: 0, has_comm: 0, comm: [0; 16] });

#[unsafe(no_mangle)]
static VICTIM: Global<VictimOffsets> = Global::new(VictimOffsets {
    pid: FIELD_ABSENT,
    comm: FIELD_ABSENT,
    total_vm: FIELD_ABSENT,
    anon_rss: FIELD_ABSENT,
    file_rss: FIELD_ABSENT,
    shmem_rss: FIELD_ABSENT,
    uid: FIELD_ABSENT,
    pgtables: FIELD_ABSENT,
    oom_score_adj: FIELD_ABSENT,
    _pad: 0,
});

#[btf_map]
static EVENTS: RingBuf<Event, { 256 * 1024 }> = RingBuf::new();
#[btf_map]
static LOST: PerCpuArray<u64, 1> = PerCpuArray::new();
#[btf_map]
static STACKS: StackTrace<1024, 0, 64> = StackTrace::new();

/// An event about the current task (the trigger), other fields zero.
#[inline(always)]
fn trigger_event(kind: u32) -> Event {
    let id = current_pid_tgid();
    Event {
        kind,
        trigger_pid: (id >> 32) as u32,
        trigger_tid: id as u32,
        trigger_comm: bpf_get_current_comm().unwrap_or_default(),
        stack_id: STACK_LOST,
        // SAFETY: helper without preconditions.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        ..Event::default()
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
    let mut event = trigger_event(EV_VICTIM);
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
    submit(&EVENTS, &event, &LOST);
    0
}

/// `oom_kill_process(struct oom_control *oc, const char *message)` runs in the trigger just
/// before the victim is marked; the victim (oc->chosen) needs BTF offsets, so it comes from
/// mark_victim, and this adds what only the trigger has: its user stack.
#[kprobe]
pub fn oomkill_kprobe(ctx: ProbeContext) -> u32 {
    if !wanted(&FILTER.load()) {
        return 0;
    }
    let mut event = trigger_event(EV_TRIGGER);
    if let Ok(id) = ctx.get_stackid(&STACKS, BPF_F_USER_STACK as u64) {
        event.stack_id = id as u32;
    }
    submit(&EVENTS, &event, &LOST);
    0
}
