//! usdtprobe: each hit of the USDT probes `memtrace probe --usdt FILE --trace` attached,
//! with its arguments decoded by their specs, and the first ones read as strings too.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    btf_maps::PerCpuArray,
    helpers::bpf_probe_read_user_str_bytes,
    macros::{btf_map, uprobe},
    programs::ProbeContext,
};
use memtrace_common::usdt::{Hit, MAX_ARGS, STRING_ARGS};
use memtrace_ebpf::{current_pid_tgid, submit, usdt, wanted};

memtrace_ebpf::license!();

memtrace_ebpf::filter!();

memtrace_ebpf::usdt_specs!();

/// The hit is built here: it is too large for the 512-byte BPF stack.
#[btf_map]
static SCRATCH: PerCpuArray<Hit, 1> = PerCpuArray::new();
memtrace_ebpf::events!(Hit);

#[uprobe]
pub fn usdtprobe_hit(ctx: ProbeContext) -> u32 {
    let _ = try_usdtprobe_hit(&ctx);
    0
}

#[inline(always)]
fn try_usdtprobe_hit(ctx: &ProbeContext) -> Option<()> {
    if !wanted(&FILTER.load()) {
        return None;
    }
    let spec = usdt::spec(ctx, &USDT_SPECS)?;
    // SAFETY: this CPU's slot; programs do not preempt each other on one CPU.
    let hit = unsafe { &mut *SCRATCH.get_ptr_mut(0)? };
    let id = current_pid_tgid();
    (hit.pid, hit.tid, hit.id, hit.count) = ((id >> 32) as u32, id as u32, spec.id, spec.count);
    for i in 0..MAX_ARGS {
        hit.args[i] = usdt::arg(ctx, spec, i).unwrap_or(0);
    }
    for i in 0..STRING_ARGS {
        hit.string_len[i] = 0;
        if (i as u32) < spec.count && spec.args[i].size == 8 && hit.args[i] != 0 {
            // SAFETY: the helper checks the read.
            let read = unsafe { bpf_probe_read_user_str_bytes(hit.args[i] as *const u8, &mut hit.strings[i]) };
            hit.string_len[i] = read.map_or(0, |s| s.len() as u32 + 1);
        }
    }
    submit(&EVENTS, hit, &LOST);
    Some(())
}
