//! hfaults: hugetlb page faults. The kprobe on hugetlb_fault(mm, vma, address, flags) reads
//! the mapping's start and file name through BTF offsets; the fallback, for kernels without
//! kprobes, keeps the user page faults that land in hugetlb ranges: those user space found
//! in /proc/PID/smaps, and those of MAP_HUGETLB mmaps, added here as the mmap returns (so
//! that a mapping touched right after it was made is not missed).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    Global,
    btf_maps::{HashMap, PerCpuArray, RingBuf},
    helpers::{bpf_get_current_comm, bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes},
    macros::{btf_map, kprobe, tracepoint},
    programs::{ProbeContext, TracePointContext},
};
use memtrace_common::{
    Filter,
    hfaults::{Event, KernelOffsets, MAP_HUGETLB, MAX_RANGES, Ranges, SRC_KPROBE, SRC_TRACEPOINT},
};
use memtrace_ebpf::{BPF_NOEXIST, current_pid_tgid, submit, tp_u64, wanted};

memtrace_ebpf::license!();

#[unsafe(no_mangle)]
static FILTER: Global<Filter> = Global::new(Filter { pid: 0, has_comm: 0, comm: [0; 16] });
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
    _pad: 0,
});

#[btf_map]
static RANGES: HashMap<u32, Ranges, 4096> = HashMap::new();
/// Length of a MAP_HUGETLB mmap in flight, by thread.
#[btf_map]
static PENDING: HashMap<u32, u64, 4096> = HashMap::new();
#[btf_map]
static EVENTS: RingBuf<Event, { 256 * 1024 }> = RingBuf::new();
#[btf_map]
static LOST: PerCpuArray<u64, 1> = PerCpuArray::new();

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
    if tp_u64(&ctx, off.mmap_flags) & MAP_HUGETLB == 0 {
        return 0;
    }
    let tid = current_pid_tgid() as u32;
    let _ = PENDING.insert(&tid, &tp_u64(&ctx, off.mmap_len), 0);
    0
}

// syscalls:sys_exit_mmap
//	field:long ret;	offset:16;	size:8;	signed:1;
#[tracepoint]
pub fn hfaults_mmap_exit(ctx: TracePointContext) -> u32 {
    let id = current_pid_tgid();
    let (pid, tid) = ((id >> 32) as u32, id as u32);
    // SAFETY: keyed by thread id, so no other program run writes this entry meanwhile.
    let Some(&len) = (unsafe { PENDING.get(&tid) }) else { return 0 };
    let _ = PENDING.remove(&tid);
    let start = tp_u64(&ctx, OFFSETS.load().mmap_ret);
    // Errors are -4095..-1.
    if start >= (-4095i64) as u64 {
        return 0;
    }
    // SAFETY: only checks presence.
    if unsafe { RANGES.get(&pid) }.is_none() {
        let _ = RANGES.insert(&pid, &Ranges { start: [0; MAX_RANGES], end: [0; MAX_RANGES] }, BPF_NOEXIST);
    }
    let Some(ranges) = RANGES.get_ptr_mut(&pid) else { return 0 };
    // SAFETY: a map value pointer, valid for this program run.
    let ranges = unsafe { &mut *ranges };
    // A free slot, else the last one (user space's next rescan puts every range back).
    let mut slot = MAX_RANGES - 1;
    for i in 0..MAX_RANGES {
        if ranges.end[i] == 0 {
            slot = i;
            break;
        }
    }
    ranges.start[slot] = start;
    ranges.end[slot] = start + len;
    0
}
