//! segv: `signal:signal_deliver` for SIGSEGV, SIGBUS and SIGABRT, in the task that receives
//! the signal while its memory is whole: the page fault's address (`thread.cr2`), the mapping
//! there (`bpf_find_vma`, 5.17+) and its class, the user stack, and for an abort raised by
//! glibc's allocator the message a uprobe on `malloc_printerr` caught just before.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    Global,
    btf_maps::{HashMap, PerCpuArray},
    helpers::{bpf_get_current_comm, bpf_probe_read_kernel, generated::bpf_probe_read_user_str},
    macros::{btf_map, tracepoint, uprobe},
    programs::{ProbeContext, TracePointContext},
};
use memtrace_common::{
    STACK_LOST,
    segv::{
        CLASS_ABORT, CLASS_HEAP, CLASS_NO_ADDRESS, Config, Event, Fault, MESSAGE_LEN, Offsets, SIGABRT, SIGBUS,
        SIGSEGV, STAT_COUNT, STAT_MESSAGES_FULL, STAT_USTACK_LOST, Vma, X86_TRAP_PF,
    },
};
use memtrace_ebpf::{bump, current_pid_tgid, submit, tp_u32, tp_u64, wanted};

memtrace_ebpf::license!();

memtrace_ebpf::filter!();
#[unsafe(no_mangle)]
static CONFIG: Global<Config> = Global::new(Config { all: 0, self_pid: 0, mmap_min_addr: 4096 });
// name: signal_deliver
//     field:int sig;                    offset:8;   size:4;  signed:1;
//     field:int errno;                  offset:12;  size:4;  signed:1;
//     field:int code;                   offset:16;  size:4;  signed:1;
//     field:unsigned long sa_handler;   offset:24;  size:8;  signed:0;
//     field:unsigned long sa_flags;     offset:32;  size:8;  signed:0;
#[unsafe(no_mangle)]
static OFFSETS: Global<Offsets> = Global::new(Offsets {
    sig: 0,
    code: 0,
    sa_handler: 0,
    cr2: 0,
    trap_nr: 0,
    error_code: 0,
    task_mm: 0,
    mm_start_stack: 0,
    vm_start: 0,
    vm_end: 0,
    vm_flags: 0,
    vm_file: 0,
    task_stack: 0,
    thread_size: 0,
});

/// Where glibc's last message is, per thread, taken by the signal that follows it. Read then,
/// not at the probe: by then glibc has written it out, so its page is surely present (a BPF
/// read cannot fault a page in).
#[btf_map]
static MESSAGES: HashMap<u32, u64, 4096> = HashMap::new();
/// The event is built here: it is too large for the 512-byte BPF stack.
#[btf_map]
static SCRATCH: PerCpuArray<Event, 1> = PerCpuArray::new();
#[btf_map]
static STATS: PerCpuArray<u64, { STAT_COUNT as usize }> = PerCpuArray::new();
memtrace_ebpf::stack_store!();
memtrace_ebpf::events!(Event);

/// glibc's `malloc_printerr(const char *str)`, entered just before it aborts.
#[uprobe]
pub fn segv_printerr(ctx: ProbeContext) -> u32 {
    if !wanted(&FILTER.load()) {
        return 0;
    }
    let Some(text) = ctx.arg::<u64>(0) else { return 0 };
    if MESSAGES.insert(current_pid_tgid() as u32, text, 0).is_err() {
        bump(&STATS, STAT_MESSAGES_FULL);
    }
    0
}

#[tracepoint]
pub fn segv_deliver(ctx: TracePointContext) -> u32 {
    let o = OFFSETS.load();
    let sig = tp_u32(&ctx, o.sig);
    if sig != SIGSEGV && sig != SIGBUS && sig != SIGABRT {
        return 0;
    }
    let config = CONFIG.load();
    // SIG_DFL: these three signals' default action ends the process.
    let fatal = tp_u64(&ctx, o.sa_handler) == 0;
    if !fatal && config.all == 0 {
        return 0;
    }
    if !wanted(&FILTER.load()) {
        return 0;
    }
    let id = current_pid_tgid();
    let (pid, tid) = ((id >> 32) as u32, id as u32);
    if pid == config.self_pid {
        return 0;
    }
    let Some(event) = SCRATCH.get_ptr_mut(0) else { return 0 };
    // SAFETY: this CPU's slot; programs do not preempt each other on one CPU.
    let event = unsafe { &mut *event };
    event.pid = pid;
    event.tid = tid;
    event.sig = sig;
    event.code = tp_u32(&ctx, o.code) as i32;
    event.fatal = fatal as u32;
    event.comm = bpf_get_current_comm().unwrap_or_default();
    event.cgroup = memtrace_ebpf::current_memcg_id();
    // SAFETY: helper without preconditions.
    let task = unsafe { aya_ebpf::helpers::bpf_get_current_task() };
    let (ip, sp) = user_ip_sp(task, &o);
    event.ip = ip;
    event.sp = sp;
    let trap = kread(task + o.trap_nr as u64);
    // cr2 is the last page fault's: this signal's only when that fault raised it.
    event.has_address = (sig != SIGABRT && trap == X86_TRAP_PF) as u32;
    event.address = if event.has_address != 0 { kread(task + o.cr2 as u64) } else { 0 };
    event.error_code = if event.has_address != 0 { kread(task + o.error_code as u64) } else { 0 };
    let mm = kread(task + o.task_mm as u64);
    event.start_stack = if mm != 0 { kread(mm + o.mm_start_stack as u64) } else { 0 };
    event.has_vma = 0;
    event.vma = Vma::default();
    event.has_message = 0;
    event.class = if sig == SIGABRT {
        match MESSAGES.get_ptr(tid) {
            Some(m) => {
                // SAFETY: pointer from the lookup, read before the entry is removed; the helper
                // writes at most MESSAGE_LEN bytes into the event's buffer.
                unsafe {
                    event.message.text[0] = 0;
                    bpf_probe_read_user_str((&raw mut event.message.text).cast(), MESSAGE_LEN as u32, *m as *const _);
                }
                event.has_message = 1;
                let _ = MESSAGES.remove(tid);
                CLASS_HEAP
            }
            None => CLASS_ABORT,
        }
    } else if event.has_address == 0 {
        CLASS_NO_ADDRESS
    } else {
        let fault = Fault {
            sig,
            code: event.code,
            address: event.address,
            sp: event.sp,
            error_code: event.error_code,
            start_stack: event.start_stack,
            mmap_min_addr: config.mmap_min_addr,
        };
        classify(&fault, event, &o)
    };
    let walked = match stacks().user_walked(&ctx, None, pid) {
        Ok(id) => id,
        Err(_) => STACK_LOST,
    };
    // A process whose tables are not loaded yet: its walk stops at once, and may go further
    // through frame pointers.
    let short = walked == STACK_LOST
        || stacks().stacks.get_ptr(walked).is_none_or(|s| {
            // SAFETY: pointer from the lookup; stored stacks are never removed while tracing.
            unsafe { (*s).len <= 1 }
        });
    event.fp_stack = if short { stacks().user(&ctx).unwrap_or(STACK_LOST) } else { STACK_LOST };
    event.user_stack = walked;
    if walked == STACK_LOST && event.fp_stack == STACK_LOST {
        bump(&STATS, STAT_USTACK_LOST);
    }
    submit(&EVENTS, event, &LOST);
    0
}

/// The user registers saved at the entry to the kernel (the fault, the kill syscall).
#[cfg(feature = "bpf-loop")]
#[inline(always)]
fn user_ip_sp(_task: u64, _o: &Offsets) -> (u64, u64) {
    memtrace_ebpf::unwind::UserRegs::current().map_or((0, 0), |r| (r.ip, r.sp))
}

/// Without bpf_task_pt_regs (5.15): x86-64 keeps them at the top of the task's kernel stack.
#[cfg(not(feature = "bpf-loop"))]
#[inline(always)]
fn user_ip_sp(task: u64, o: &Offsets) -> (u64, u64) {
    let stack = kread(task + o.task_stack as u64);
    if stack == 0 {
        return (0, 0);
    }
    let regs = stack + o.thread_size as u64 - size_of::<aya_ebpf::bindings::pt_regs>() as u64;
    let field = |f: usize| kread(regs + f as u64);
    (
        field(core::mem::offset_of!(aya_ebpf::bindings::pt_regs, rip)),
        field(core::mem::offset_of!(aya_ebpf::bindings::pt_regs, rsp)),
    )
}

#[inline(always)]
fn kread(addr: u64) -> u64 {
    // SAFETY: a checked read of kernel memory.
    unsafe { bpf_probe_read_kernel(addr as *const u64) }.unwrap_or(0)
}

/// The class from the mapping at the address, found with bpf_find_vma (5.17+).
#[cfg(feature = "bpf-loop")]
#[inline(always)]
fn classify(fault: &Fault, event: &mut Event, _o: &Offsets) -> u32 {
    use memtrace_common::segv::{CLASS_NULL, CLASS_VMA_BUSY, classify};
    if fault.address < fault.mmap_min_addr {
        return CLASS_NULL;
    }
    let mut found = Vma::default();
    // SAFETY: the helper wants a BTF task pointer, the callback's signature and a stack
    // pointer for its context; the callback only reads through checked helpers.
    let ret = unsafe {
        let task = aya_ebpf::helpers::generated::bpf_get_current_task_btf();
        aya_ebpf::helpers::generated::bpf_find_vma(
            task.cast(),
            fault.address,
            vma_found as *mut core::ffi::c_void,
            (&raw mut found).cast(),
            0,
        )
    };
    match ret {
        0 => {
            event.vma = found;
            event.has_vma = 1;
            classify(fault, Some(&found))
        }
        // -ENOENT: no mapping there.
        -2 => classify(fault, None),
        _ => CLASS_VMA_BUSY,
    }
}

/// bpf_find_vma's callback: the mapping's range, flags and whether it maps a file.
#[cfg(feature = "bpf-loop")]
extern "C" fn vma_found(
    _task: *mut core::ffi::c_void,
    vma: *mut core::ffi::c_void,
    out: *mut core::ffi::c_void,
) -> i64 {
    let o = OFFSETS.load();
    let vma = vma as u64;
    let out = out as *mut Vma;
    // SAFETY: `out` is the caller's stack slot of a Vma.
    unsafe {
        (*out).start = kread(vma + o.vm_start as u64);
        (*out).end = kread(vma + o.vm_end as u64);
        (*out).flags = kread(vma + o.vm_flags as u64);
        (*out).file = (kread(vma + o.vm_file as u64) != 0) as u64;
    }
    0
}

/// Without bpf_find_vma only the NULL page is known here; user space reads the process's maps.
#[cfg(not(feature = "bpf-loop"))]
#[inline(always)]
fn classify(fault: &Fault, _event: &mut Event, _o: &Offsets) -> u32 {
    use memtrace_common::segv::{CLASS_NEEDS_MAPS, CLASS_NULL};
    if fault.address < fault.mmap_min_addr { CLASS_NULL } else { CLASS_NEEDS_MAPS }
}
