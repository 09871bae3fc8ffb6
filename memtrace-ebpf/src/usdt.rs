//! Reading a USDT probe's arguments in its uprobe program: the probe's `Spec` is found under
//! its address (the instruction pointer) in the map user space filled, and each argument is
//! read from the saved registers or the memory they point at.

use aya_ebpf::{
    btf_maps::HashMap,
    helpers::{bpf_probe_read_kernel, bpf_probe_read_user},
    programs::ProbeContext,
};
use memtrace_common::usdt::{ARG_CONST, ARG_DEREF, ARG_REG, MAX_ARGS, Spec};

/// Declares `USDT_SPECS` (`memtrace_common::names::USDT_SPECS`): the probes' specs by address.
#[macro_export]
macro_rules! usdt_specs {
    () => {
        #[aya_ebpf::macros::btf_map]
        static USDT_SPECS: aya_ebpf::btf_maps::HashMap<u64, memtrace_common::usdt::Spec, 256> =
            aya_ebpf::btf_maps::HashMap::new();
    };
}

/// Offset of `ip` in x86-64's `struct pt_regs`.
const IP: usize = 128;
/// Past the last register of `struct pt_regs` (`ss`).
const REGS_END: u32 = 168;

/// The spec of the probe that fired, None when user space gave none for this address.
#[inline(always)]
pub fn spec<'a, const N: usize>(ctx: &ProbeContext, specs: &'a HashMap<u64, Spec, N>) -> Option<&'a Spec> {
    let ip = reg(ctx, IP as u32)?;
    // SAFETY: the value stays in the map while the program runs (nothing deletes it meanwhile).
    specs.get_ptr(ip).map(|p| unsafe { &*p })
}

/// Argument `i` of the probe, extended to 64 bits as its spec says; None when it has no
/// such argument or its memory is unreadable.
#[inline(always)]
pub fn arg(ctx: &ProbeContext, spec: &Spec, i: usize) -> Option<i64> {
    if i >= MAX_ARGS || i as u32 >= spec.count {
        return None;
    }
    let a = &spec.args[i];
    let raw = match a.kind {
        ARG_CONST => a.value as u64,
        ARG_REG => reg(ctx, a.reg_offset)?,
        ARG_DEREF => {
            let at = (reg(ctx, a.reg_offset)? as i64).wrapping_add(a.value) as u64;
            // Eight bytes, the low ones kept below: one read whatever the size, as libbpf does.
            // SAFETY: the helper checks the read.
            unsafe { bpf_probe_read_user(at as *const u64) }.ok()?
        }
        _ => return None,
    };
    if a.size == 0 || a.size > 8 {
        return None;
    }
    let shift = 64 - a.size * 8;
    Some(if a.signed != 0 { ((raw << shift) as i64) >> shift } else { ((raw << shift) >> shift) as i64 })
}

/// The saved register at byte `offset` of the probed task's `struct pt_regs`.
#[inline(always)]
fn reg(ctx: &ProbeContext, offset: u32) -> Option<u64> {
    if offset >= REGS_END || !offset.is_multiple_of(8) {
        return None;
    }
    // SAFETY: the helper checks the read; the offset is inside the struct.
    unsafe { bpf_probe_read_kernel((ctx.regs as *const u8).add(offset as usize) as *const u64) }.ok()
}
