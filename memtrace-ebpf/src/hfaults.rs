//! hfaults: hugetlb page faults. The kprobe on hugetlb_fault(mm, vma, address, flags) reads
//! the mapping's start and file name through BTF offsets; the fallback, for kernels without
//! kprobes, keeps the user page faults that land in the hugetlb ranges of the faulting
//! process. Those ranges are kept here as the mappings change (mmap, munmap, mremap, shmdt,
//! exec, exit, fork), so that an ordinary mapping placed where a hugetlb one was is never
//! counted; user space adds what no syscall shows (hugetlbfs files, SysV SHM_HUGETLB) from
//! /proc/PID/smaps.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    Global,
    btf_maps::{HashMap, LruHashMap, PerCpuArray},
    helpers::{bpf_get_current_comm, bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes},
    macros::{btf_map, kprobe, tracepoint},
    programs::{ProbeContext, TracePointContext},
};
use memtrace_common::hfaults::{
    CALL_MMAP, CALL_MREMAP, CALL_MUNMAP, CALL_SHMDT, Call, DROPPED_RANGES, Event, FIELD_ABSENT, KernelOffsets,
    MAP_HUGE_MASK, MAP_HUGE_SHIFT, MAP_HUGETLB, MAX_RANGES, MREMAP_DONTUNMAP, Ranges, SRC_KPROBE, SRC_TRACEPOINT,
};
use memtrace_ebpf::{BPF_NOEXIST, bump, current_pid_tgid, submit, tp_u32, tp_u64, wanted};

memtrace_ebpf::license!();

memtrace_ebpf::filter!();
#[unsafe(no_mangle)]
static OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets {
    vm_start: 0,
    vm_file: 0,
    f_path_dentry: 0,
    d_name_name: 0,
    valid: 0,
    tp_address: 0,
    mmap_len: 0,
    mmap_flags: 0,
    mmap_ret: 0,
    munmap_addr: 0,
    munmap_len: 0,
    munmap_ret: 0,
    mremap_addr: 0,
    mremap_old_len: 0,
    mremap_new_len: 0,
    mremap_flags: 0,
    mremap_ret: 0,
    shmdt_addr: 0,
    shmdt_ret: 0,
    exit_group_dead: FIELD_ABSENT,
    newtask_pid: 0,
    newtask_flags: 0,
    default_huge: 2 << 20,
});

#[btf_map]
static RANGES: HashMap<u32, Ranges, 4096> = HashMap::new();
/// Syscalls in flight, by thread (LRU: a thread that dies inside one leaves no slot taken).
#[btf_map]
static CALLS: LruHashMap<u32, Call, 4096> = LruHashMap::new();
memtrace_ebpf::events!(Event);
/// What the fallback could not keep (`DROPPED_RANGES`).
#[btf_map]
static DROPPED: PerCpuArray<u64, 1> = PerCpuArray::new();

const PAGE: u64 = 4096;

#[inline(always)]
fn page_align(len: u64) -> u64 {
    (len + PAGE - 1) & !(PAGE - 1)
}

#[inline(always)]
fn current() -> (u32, u32) {
    let id = current_pid_tgid();
    ((id >> 32) as u32, id as u32)
}

/// Errors are -4095..-1.
#[inline(always)]
fn failed(ret: u64) -> bool {
    ret >= (-4095i64) as u64
}

/// The ranges of `pid`, for changing them.
#[inline(always)]
fn ranges_mut(pid: u32) -> Option<&'static mut Ranges> {
    // SAFETY: a map value pointer, valid for this program run. Two threads of one process
    // changing their mappings at the same instant could interleave here; mmap_lock orders the
    // changes themselves, and the next rescan compares with smaps.
    RANGES.get_ptr_mut(&pid).map(|p| unsafe { &mut *p })
}

/// Adds `[start, end)` in a free slot, or counts it as dropped.
#[inline(always)]
fn add(r: &mut Ranges, start: u64, end: u64) {
    for i in 0..MAX_RANGES {
        if r.end[i] == 0 {
            r.start[i] = start;
            r.end[i] = end;
            r.generation += 1;
            return;
        }
    }
    bump(&DROPPED, DROPPED_RANGES);
}

/// Removes `[a, b)` from every range, splitting one that contains it.
#[inline(always)]
fn trim(r: &mut Ranges, a: u64, b: u64) {
    let mut tail = (0u64, 0u64);
    for i in 0..MAX_RANGES {
        let (s, e) = (r.start[i], r.end[i]);
        if e == 0 || b <= s || a >= e {
            continue;
        }
        r.generation += 1;
        if a <= s && b >= e {
            r.start[i] = 0;
            r.end[i] = 0;
        } else if a <= s {
            r.start[i] = b;
        } else {
            r.end[i] = a;
            if b < e {
                tail = (b, e);
            }
        }
    }
    if tail.1 != 0 {
        add(r, tail.0, tail.1);
    }
}

#[inline(always)]
fn overlaps(r: &Ranges, a: u64, b: u64) -> bool {
    for i in 0..MAX_RANGES {
        if r.end[i] != 0 && a < r.end[i] && r.start[i] < b {
            return true;
        }
    }
    false
}

/// Takes the call that `tid` entered, if it is of `kind`.
#[inline(always)]
fn take_call(tid: u32, kind: u32) -> Option<Call> {
    // SAFETY: keyed by thread id, so no other program run writes this entry meanwhile.
    let call = unsafe { CALLS.get(&tid) }.copied()?;
    let _ = CALLS.remove(&tid);
    (call.kind == kind).then_some(call)
}

#[inline(always)]
fn has_ranges(pid: u32) -> bool {
    // SAFETY: only checks presence.
    unsafe { RANGES.get(&pid) }.is_some()
}

#[inline(always)]
fn event(address: u64, vm_start: u64, source: u32) -> Event {
    let id = current_pid_tgid();
    Event {
        pid: (id >> 32) as u32,
        tid: id as u32,
        address,
        vm_start,
        source,
        _pad: 0,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        file: [0; 32],
    }
}

/// Reads the pointer at `base + offset` in kernel memory; 0 when unreadable.
#[inline(always)]
fn read_ptr(base: u64, offset: u32) -> u64 {
    // SAFETY: the helper checks the read; the offset comes from the kernel's BTF.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const u64) }.unwrap_or(0)
}

#[kprobe]
pub fn hfaults_kprobe(ctx: ProbeContext) -> u32 {
    if !wanted(&FILTER.load()) {
        return 0;
    }
    let vma: u64 = ctx.arg(1).unwrap_or(0);
    let address: u64 = ctx.arg(2).unwrap_or(0);
    let off = OFFSETS.load();
    let mut ev = event(address, 0, SRC_KPROBE);
    if off.valid != 0 && vma != 0 {
        ev.vm_start = read_ptr(vma, off.vm_start);
        let file = read_ptr(vma, off.vm_file);
        if file != 0 {
            let dentry = read_ptr(file, off.f_path_dentry);
            let name = if dentry != 0 { read_ptr(dentry, off.d_name_name) } else { 0 };
            if name != 0 {
                // SAFETY: the helper checks the read and stops at the buffer's end.
                let _ = unsafe { bpf_probe_read_kernel_str_bytes(name as *const u8, &mut ev.file) };
            }
        }
    }
    submit(&EVENTS, &ev, &LOST);
    0
}

#[tracepoint]
pub fn hfaults_user_fault(ctx: TracePointContext) -> u32 {
    let pid = (current_pid_tgid() >> 32) as u32;
    // Cheap first: most faulting processes have no hugetlb mapping at all.
    // SAFETY: the value is read at once; a concurrent update can only change which range matches.
    let Some(ranges) = (unsafe { RANGES.get(&pid) }) else { return 0 };
    if !wanted(&FILTER.load()) {
        return 0;
    }
    let address = tp_u64(&ctx, OFFSETS.load().tp_address);
    for i in 0..MAX_RANGES {
        if ranges.start[i] <= address && address < ranges.end[i] {
            submit(&EVENTS, &event(address, ranges.start[i], SRC_TRACEPOINT), &LOST);
            break;
        }
    }
    0
}

// syscalls:sys_enter_mmap
//	field:unsigned long len;	offset:24;	size:8;	signed:0;
//	field:unsigned long flags;	offset:40;	size:8;	signed:0;
#[tracepoint]
pub fn hfaults_mmap_enter(ctx: TracePointContext) -> u32 {
    let off = OFFSETS.load();
    let (pid, tid) = current();
    let flags = tp_u64(&ctx, off.mmap_flags);
    // Any mmap of a process with hugetlb ranges: MAP_FIXED may put it over one of them.
    if flags & MAP_HUGETLB != 0 || has_ranges(pid) {
        let call = Call { kind: CALL_MMAP, len: tp_u64(&ctx, off.mmap_len), flags, ..Call::default() };
        let _ = CALLS.insert(&tid, &call, 0);
    }
    0
}

// syscalls:sys_exit_mmap
//	field:long ret;	offset:16;	size:8;	signed:1;
#[tracepoint]
pub fn hfaults_mmap_exit(ctx: TracePointContext) -> u32 {
    let (pid, tid) = current();
    let Some(call) = take_call(tid, CALL_MMAP) else { return 0 };
    let off = OFFSETS.load();
    let start = tp_u64(&ctx, off.mmap_ret);
    if failed(start) {
        return 0;
    }
    if let Some(r) = ranges_mut(pid) {
        trim(r, start, start + page_align(call.len));
    }
    if call.flags & MAP_HUGETLB == 0 {
        return 0;
    }
    // The kernel rounds a hugetlb length up to the huge page size.
    let shift = (call.flags >> MAP_HUGE_SHIFT) & MAP_HUGE_MASK;
    let huge = if shift != 0 && shift < 40 { 1u64 << shift } else { off.default_huge };
    let len = (call.len + huge - 1) / huge * huge;
    if !has_ranges(pid) {
        let _ = RANGES.insert(&pid, &Ranges::default(), BPF_NOEXIST);
    }
    if let Some(r) = ranges_mut(pid) {
        add(r, start, start + len);
    }
    0
}

// syscalls:sys_enter_munmap
//	field:unsigned long addr;	offset:16;	size:8;	signed:0;
//	field:size_t len;	offset:24;	size:8;	signed:0;
#[tracepoint]
pub fn hfaults_munmap_enter(ctx: TracePointContext) -> u32 {
    let (pid, tid) = current();
    if has_ranges(pid) {
        let off = OFFSETS.load();
        let call = Call {
            kind: CALL_MUNMAP,
            addr: tp_u64(&ctx, off.munmap_addr),
            len: tp_u64(&ctx, off.munmap_len),
            ..Call::default()
        };
        let _ = CALLS.insert(&tid, &call, 0);
    }
    0
}

// syscalls:sys_exit_munmap
//	field:long ret;	offset:16;	size:8;	signed:1;
#[tracepoint]
pub fn hfaults_munmap_exit(ctx: TracePointContext) -> u32 {
    let (pid, tid) = current();
    let Some(call) = take_call(tid, CALL_MUNMAP) else { return 0 };
    if tp_u64(&ctx, OFFSETS.load().munmap_ret) != 0 {
        return 0;
    }
    if let Some(r) = ranges_mut(pid) {
        trim(r, call.addr, call.addr + page_align(call.len));
    }
    0
}

// syscalls:sys_enter_mremap
//	field:unsigned long addr;	offset:16;	size:8;	signed:0;
//	field:unsigned long old_len;	offset:24;	size:8;	signed:0;
//	field:unsigned long new_len;	offset:32;	size:8;	signed:0;
//	field:unsigned long flags;	offset:40;	size:8;	signed:0;
#[tracepoint]
pub fn hfaults_mremap_enter(ctx: TracePointContext) -> u32 {
    let (pid, tid) = current();
    if has_ranges(pid) {
        let off = OFFSETS.load();
        let call = Call {
            kind: CALL_MREMAP,
            _pad: 0,
            addr: tp_u64(&ctx, off.mremap_addr),
            len: tp_u64(&ctx, off.mremap_old_len),
            new_len: tp_u64(&ctx, off.mremap_new_len),
            flags: tp_u64(&ctx, off.mremap_flags),
        };
        let _ = CALLS.insert(&tid, &call, 0);
    }
    0
}

// syscalls:sys_exit_mremap
//	field:long ret;	offset:16;	size:8;	signed:1;
#[tracepoint]
pub fn hfaults_mremap_exit(ctx: TracePointContext) -> u32 {
    let (pid, tid) = current();
    let Some(call) = take_call(tid, CALL_MREMAP) else { return 0 };
    let new = tp_u64(&ctx, OFFSETS.load().mremap_ret);
    if failed(new) {
        return 0;
    }
    let Some(r) = ranges_mut(pid) else { return 0 };
    let old_end = call.addr + page_align(call.len);
    // mremap moves within one mapping: hugetlb if it overlaps a hugetlb range.
    if !overlaps(r, call.addr, old_end) {
        return 0;
    }
    if call.flags & MREMAP_DONTUNMAP == 0 {
        trim(r, call.addr, old_end);
    }
    add(r, new, new + page_align(call.new_len));
    0
}

// syscalls:sys_enter_shmdt
//	field:char * shmaddr;	offset:16;	size:8;	signed:0;
#[tracepoint]
pub fn hfaults_shmdt_enter(ctx: TracePointContext) -> u32 {
    let (pid, tid) = current();
    if has_ranges(pid) {
        let call = Call { kind: CALL_SHMDT, addr: tp_u64(&ctx, OFFSETS.load().shmdt_addr), ..Call::default() };
        let _ = CALLS.insert(&tid, &call, 0);
    }
    0
}

// syscalls:sys_exit_shmdt: detaches the whole segment mapped at shmaddr.
#[tracepoint]
pub fn hfaults_shmdt_exit(ctx: TracePointContext) -> u32 {
    let (pid, tid) = current();
    let Some(call) = take_call(tid, CALL_SHMDT) else { return 0 };
    if tp_u64(&ctx, OFFSETS.load().shmdt_ret) != 0 {
        return 0;
    }
    let Some(r) = ranges_mut(pid) else { return 0 };
    for i in 0..MAX_RANGES {
        if r.end[i] != 0 && r.start[i] == call.addr {
            let end = r.end[i];
            trim(r, call.addr, end);
            break;
        }
    }
    0
}

// sched:sched_process_exec: the new image starts with no hugetlb mapping.
#[tracepoint]
pub fn hfaults_exec(_ctx: TracePointContext) -> u32 {
    let _ = RANGES.remove(&current().0);
    0
}

// sched:sched_process_exit
//	field:bool group_dead;	offset:32;	size:1;	signed:0;	(6.16+; older kernels: the rescan)
#[tracepoint]
pub fn hfaults_exit(ctx: TracePointContext) -> u32 {
    let at = OFFSETS.load().exit_group_dead;
    if at == FIELD_ABSENT {
        return 0;
    }
    // SAFETY: offset from the format file; the read is checked by the helper.
    if unsafe { ctx.read_at::<u8>(at as usize) }.unwrap_or(0) != 0 {
        let _ = RANGES.remove(&current().0);
    }
    0
}

// task:task_newtask, in the parent: a new process (not a thread) inherits its parent's
// hugetlb mappings, and a CLONE_VM child shares them.
//	field:pid_t pid;	offset:8;	size:4;	signed:1;
//	field:u64 clone_flags;	offset:32;	size:8;	signed:0;
#[tracepoint]
pub fn hfaults_newtask(ctx: TracePointContext) -> u32 {
    const CLONE_THREAD: u64 = 0x10000;
    let off = OFFSETS.load();
    if tp_u64(&ctx, off.newtask_flags) & CLONE_THREAD != 0 {
        return 0;
    }
    // SAFETY: the value is copied out at once.
    let Some(r) = (unsafe { RANGES.get(&current().0) }).copied() else { return 0 };
    let _ = RANGES.insert(&tp_u32(&ctx, off.newtask_pid), &r, 0);
    0
}
