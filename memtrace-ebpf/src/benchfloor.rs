//! benchfloor: the least an allocation tracer can do (an empty entry probe, one map insert on
//! return, one delete on free), so the bench can show what the traps themselves cost.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    btf_maps::HashMap,
    macros::{btf_map, uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};

memtrace_ebpf::license!();

#[btf_map]
static LIVE: HashMap<u64, u64, 262_144> = HashMap::new();

#[uprobe]
pub fn benchfloor_enter(_ctx: ProbeContext) -> u32 {
    0
}

#[uretprobe]
pub fn benchfloor_ret(ctx: RetProbeContext) -> u32 {
    let addr: u64 = ctx.ret();
    let _ = LIVE.insert(addr, 1u64, 0);
    0
}

#[uprobe]
pub fn benchfloor_free(ctx: ProbeContext) -> u32 {
    let addr: u64 = ctx.arg(0).unwrap_or(0);
    let _ = LIVE.remove(addr);
    0
}
