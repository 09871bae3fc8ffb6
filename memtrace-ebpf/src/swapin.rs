//! swapin: a kprobe on the function that reads one page or folio from swap, counting per
//! (process, user stack). Swap readahead runs in the faulting task, so `current` is the task
//! that waits for the page.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    Global,
    btf_maps::{HashMap, PerCpuArray},
    helpers::bpf_get_current_comm,
    macros::{btf_map, kprobe},
    programs::ProbeContext,
};
use memtrace_common::{
    STACK_LOST,
    swapin::{Config, NewStack, STAT_COUNT, STAT_COUNTS_FULL, STAT_STACK_LOST, SwapKey},
};
use memtrace_ebpf::{BPF_NOEXIST, EEXIST, atomic_add, bump, current_pid_tgid, submit, wanted};

memtrace_ebpf::license!();

memtrace_ebpf::filter!();
#[unsafe(no_mangle)]
static CONFIG: Global<Config> = Global::new(Config { stacks: 0, _pad: 0 });

#[btf_map]
static COUNTS: HashMap<SwapKey, u64, 16_384> = HashMap::new();
memtrace_ebpf::stack_store!();
#[btf_map]
static STATS: PerCpuArray<u64, { STAT_COUNT as usize }> = PerCpuArray::new();
memtrace_ebpf::events!(NewStack, 64 * 1024);

/// swap_read_folio (6.10+) or swap_readpage: one call per page or folio read from swap.
#[kprobe]
pub fn swapin_read(ctx: ProbeContext) -> u32 {
    if !wanted(&FILTER.load()) {
        return 0;
    }
    let pid = (current_pid_tgid() >> 32) as u32;
    let stack_id = if CONFIG.load().stacks != 0 {
        match stacks().user_walked(&ctx, None, pid) {
            Ok(id) => id,
            Err(_) => {
                bump(&STATS, STAT_STACK_LOST);
                STACK_LOST
            }
        }
    } else {
        STACK_LOST
    };
    let key = SwapKey { pid, _pad: 0, stack_id, comm: bpf_get_current_comm().unwrap_or([0; 16]) };
    if let Some(n) = COUNTS.get_ptr_mut(&key) {
        atomic_add(n, 1);
        return 0;
    }
    match COUNTS.insert(&key, &1, BPF_NOEXIST) {
        Ok(()) if stack_id != STACK_LOST => submit(&EVENTS, &NewStack { pid, _pad: 0, stack_id }, &LOST),
        Ok(()) => {}
        // Another CPU created the row between our lookup and insert.
        Err(EEXIST) => {
            if let Some(n) = COUNTS.get_ptr_mut(&key) {
                atomic_add(n, 1);
            }
        }
        Err(_) => bump(&STATS, STAT_COUNTS_FULL),
    }
    0
}
