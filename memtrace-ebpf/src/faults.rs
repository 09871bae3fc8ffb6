//! faults: page faults counted in the kernel per (pid, user stack, kernel stack) and per
//! process; each fault goes to user space only with `--events`.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    Global,
    btf_maps::{HashMap, PerCpuArray},
    helpers::bpf_get_current_comm,
    macros::{btf_map, tracepoint},
    programs::TracePointContext,
};
use memtrace_common::{
    STACK_LOST,
    faults::{
        Config, EV_FAULT, EV_NEW_STACK, Event, FaultKey, KIND_KERNEL, KIND_USER, Offsets, ProcFaults, STAT_COUNT,
        STAT_COUNTS_FULL, STAT_KSTACK_LOST, STAT_PROCS_FULL, STAT_USTACK_LOST,
    },
};
use memtrace_ebpf::{BPF_NOEXIST, EEXIST, atomic_add, bump, current_pid_tgid, submit, tp_u64, wanted};

memtrace_ebpf::license!();

memtrace_ebpf::filter!();
#[unsafe(no_mangle)]
static CONFIG: Global<Config> = Global::new(Config { events: 0, self_pid: 0 });
// name: page_fault_user (page_fault_kernel has the same layout)
//     field:unsigned long address;      offset:8;     size:8;    signed:0;
//     field:unsigned long ip;           offset:16;    size:8;    signed:0;
//     field:unsigned long error_code;   offset:24;    size:8;    signed:0;
#[unsafe(no_mangle)]
static OFFSETS: Global<Offsets> = Global::new(Offsets { address: 0, ip: 0, error_code: 0, _pad: 0 });

#[btf_map]
static COUNTS: HashMap<FaultKey, u64, 16_384> = HashMap::new();
#[btf_map]
static PROCS: HashMap<u32, ProcFaults, 16_384> = HashMap::new();
memtrace_ebpf::stack_store!();
#[btf_map]
static STATS: PerCpuArray<u64, { STAT_COUNT as usize }> = PerCpuArray::new();
memtrace_ebpf::events!(Event);

#[tracepoint]
pub fn faults_user(ctx: TracePointContext) -> u32 {
    fault(&ctx, KIND_USER)
}

#[tracepoint]
pub fn faults_kernel(ctx: TracePointContext) -> u32 {
    fault(&ctx, KIND_KERNEL)
}

#[inline(always)]
fn fault(ctx: &TracePointContext, mode: u32) -> u32 {
    if !wanted(&FILTER.load()) {
        return 0;
    }
    let id = current_pid_tgid();
    let (pid, tid) = ((id >> 32) as u32, id as u32);
    if pid == CONFIG.load().self_pid {
        return 0;
    }
    // A stack this fault should have and does not: counted for the process too.
    let mut missing = false;
    let user_stack = match stacks().user_walked(ctx, None, pid) {
        Ok(id) => id,
        Err(_) => {
            // Kernel threads have no user stack to lose.
            if mode == KIND_USER {
                bump(&STATS, STAT_USTACK_LOST);
                missing = true;
            }
            STACK_LOST
        }
    };
    let kernel_stack = if mode == KIND_KERNEL {
        match stacks().kernel(ctx) {
            Ok(id) => id,
            Err(_) => {
                bump(&STATS, STAT_KSTACK_LOST);
                missing = true;
                STACK_LOST
            }
        }
    } else {
        STACK_LOST
    };
    let comm = bpf_get_current_comm().unwrap_or([0; 16]);
    let offsets = OFFSETS.load();
    let mut event = Event {
        kind: EV_FAULT,
        pid,
        tid,
        mode,
        user_stack,
        kernel_stack,
        address: tp_u64(ctx, offsets.address),
        ip: tp_u64(ctx, offsets.ip),
        error_code: tp_u64(ctx, offsets.error_code),
        comm,
    };
    let key = FaultKey { pid, kind: mode, user_stack, kernel_stack };
    if let Some(n) = COUNTS.get_ptr_mut(&key) {
        atomic_add(n, 1);
    } else {
        match COUNTS.insert(&key, &1, BPF_NOEXIST) {
            Ok(()) if user_stack != STACK_LOST || kernel_stack != STACK_LOST => {
                event.kind = EV_NEW_STACK;
                submit(&EVENTS, &event, &LOST);
                event.kind = EV_FAULT;
            }
            Ok(()) => {}
            // Another CPU created the row between our lookup and insert.
            Err(EEXIST) => {
                if let Some(n) = COUNTS.get_ptr_mut(&key) {
                    atomic_add(n, 1);
                }
            }
            Err(_) => {
                bump(&STATS, STAT_COUNTS_FULL);
                missing = true;
            }
        }
    }
    count_process(pid, mode, comm, missing);
    if CONFIG.load().events != 0 {
        submit(&EVENTS, &event, &LOST);
    }
    0
}

#[inline(always)]
fn count_process(pid: u32, mode: u32, comm: [u8; 16], missing: bool) {
    let bump_proc = |p: *mut ProcFaults| {
        // SAFETY: pointer from the map lookup; fields are 8-byte aligned.
        unsafe {
            if mode == KIND_USER {
                atomic_add(&raw mut (*p).user, 1);
            } else {
                atomic_add(&raw mut (*p).kernel, 1);
            }
            if missing {
                atomic_add(&raw mut (*p).no_stack, 1);
            }
        }
    };
    if let Some(p) = PROCS.get_ptr_mut(pid) {
        bump_proc(p);
        return;
    }
    let first = ProcFaults {
        user: (mode == KIND_USER) as u64,
        kernel: (mode == KIND_KERNEL) as u64,
        no_stack: missing as u64,
        comm,
        // Once per process: a fault's hot path does not read its cgroup.
        memcg_id: memtrace_ebpf::current_memcg_id(),
    };
    match PROCS.insert(pid, &first, BPF_NOEXIST) {
        Ok(()) => {}
        Err(EEXIST) => {
            if let Some(p) = PROCS.get_ptr_mut(pid) {
                bump_proc(p);
            }
        }
        Err(_) => bump(&STATS, STAT_PROCS_FULL),
    }
}
