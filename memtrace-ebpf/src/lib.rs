//! Helpers shared by memtrace's eBPF programs. Each tracer is one binary (one object file).
#![cfg_attr(target_arch = "bpf", no_std)]
// The BPF target has no atomic read-modify-write types; the intrinsic lowers to BPF_ATOMIC add.
#![allow(internal_features, reason = "atomic_xadd is the only way to an atomic add on bpf")]
#![feature(core_intrinsics)]

use aya_ebpf::{
    Global,
    bindings::bpf_pidns_info,
    btf_maps::{PerCpuArray, RingBuf},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_get_ns_current_pid_tgid, bpf_probe_read_kernel,
    },
    macros::btf_map,
};
use memtrace_common::{FOREIGN_PID, Filter, MEMCG_BY_BTF, MEMCG_BY_V2_ID, MemcgId, PidNs};

pub mod stack;
pub mod syscalls;
pub mod unwind;
pub mod usdt;

/// `bpf_map_update_elem` flag: fail if the key exists.
pub const BPF_NOEXIST: u64 = 1;
/// Errno values as the helpers return them (negated).
pub const EEXIST: i32 = -17;

/// Adds `delta` (wrapping, so a negated value subtracts) to a counter shared between CPUs.
#[inline(always)]
pub fn atomic_add(counter: *mut u64, delta: u64) {
    // SAFETY: callers pass a pointer returned by a map lookup, valid and 8-byte aligned.
    unsafe { core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(counter, delta) };
}

/// A pointer to a global's value, so that a program reads the fields it needs
/// (`core::ptr::read_volatile`) instead of copying a large global onto its 512-byte stack,
/// as `Global::load` does.
#[inline(always)]
pub fn global_ptr<T>(global: &Global<T>) -> *const T {
    // Global<T> is repr(transparent) over a MaybeUninit<T> the loader always initialises.
    (global as *const Global<T>).cast()
}

/// Floor of log2, 0 for 0 and 1, without loops (the verifier prefers straight code): the
/// slot of a latency histogram.
#[inline(always)]
pub fn log2(mut v: u64) -> u32 {
    let mut r = 0;
    for shift in [32u32, 16, 8, 4, 2, 1] {
        if v >= 1u64 << shift {
            v >>= shift;
            r += shift;
        }
    }
    r
}

/// Bumps a per-CPU counter: no atomics needed, each CPU owns its slot.
#[inline(always)]
pub fn bump<const N: usize>(stats: &PerCpuArray<u64, N>, index: u32) {
    if let Some(slot) = stats.get_ptr_mut(index) {
        // SAFETY: the slot belongs to this CPU and programs do not preempt each other on it.
        unsafe { *slot += 1 };
    }
}

/// memtrace's pid namespace (see `PidNs`); one global shared by every program of an object.
#[unsafe(no_mangle)]
static PID_NS: Global<PidNs> = Global::new(PidNs { dev: 0, ino: 0 });

/// Probe hits skipped because their task has no pid in memtrace's namespace.
#[btf_map]
static OUTSIDE_PID_NS: PerCpuArray<u64, 1> = PerCpuArray::new();

/// The current task's `tgid << 32 | tid` as memtrace's pid namespace numbers them: use it
/// wherever a program reads the current pid, so reported pids match memtrace's /proc and `-p`.
/// A task outside that namespace gets its global ids with `FOREIGN_PID` set in both halves.
#[inline(always)]
pub fn current_pid_tgid() -> u64 {
    let ns = PID_NS.load();
    if ns.dev == 0 {
        return bpf_get_current_pid_tgid();
    }
    let mut ids = bpf_pidns_info { pid: 0, tgid: 0 };
    // SAFETY: `ids` is a writable local of the size passed.
    let ret = unsafe { bpf_get_ns_current_pid_tgid(ns.dev, ns.ino, &mut ids, size_of::<bpf_pidns_info>() as u32) };
    if ret == 0 {
        return (ids.tgid as u64) << 32 | ids.pid as u64;
    }
    // The helper only answers for tasks whose own namespace is memtrace's.
    let global = bpf_get_current_pid_tgid();
    global | ((FOREIGN_PID as u64) << 32 | FOREIGN_PID as u64)
}

/// How to find the current task's memory cgroup (see `MemcgId`); one global per object.
#[unsafe(no_mangle)]
static MEMCG_ID: Global<MemcgId> =
    Global::new(MemcgId { how: 0, task_cgroups: 0, css_set_memory: 0, css_cgroup: 0, cgroup_kn: 0, kn_id: 0 });

/// The kernfs id of the current task's memory cgroup (the inode number of its directory in
/// the memory hierarchy), which user space turns into a path; 0 when unknown. Four checked
/// reads (bpf_probe_read_kernel, 5.5+), so it is cheap enough for every event.
#[inline(always)]
pub fn current_memcg_id() -> u64 {
    let off = MEMCG_ID.load();
    if off.how == MEMCG_BY_V2_ID {
        // SAFETY: helper without preconditions.
        return unsafe { bpf_get_current_cgroup_id() };
    }
    if off.how != MEMCG_BY_BTF {
        return 0;
    }
    // SAFETY: the helper checks each read; offsets come from the kernel's BTF.
    let read = |base: u64, at: u32| unsafe { bpf_probe_read_kernel((base + at as u64) as *const u64) }.unwrap_or(0);
    // SAFETY: helper without preconditions; the task is only read through checked helpers.
    let task = unsafe { bpf_get_current_task() };
    let cgroups = read(task, off.task_cgroups);
    if cgroups == 0 {
        return 0;
    }
    let css = read(cgroups, off.css_set_memory);
    if css == 0 {
        return 0;
    }
    let cgroup = read(css, off.css_cgroup);
    if cgroup == 0 {
        return 0;
    }
    let kn = read(cgroup, off.cgroup_kn);
    if kn == 0 { 0 } else { read(kn, off.kn_id) }
}

/// The current process id (tgid) as memtrace sees it; see `current_pid_tgid`.
#[inline(always)]
pub fn current_pid() -> u32 {
    (current_pid_tgid() >> 32) as u32
}

/// Whether the current task passes the `-p`/`--comm` filter. Tasks outside memtrace's pid
/// namespace never do: they are counted in `OUTSIDE_PID_NS` instead.
#[inline(always)]
pub fn wanted(filter: &Filter) -> bool {
    let pid = current_pid();
    if pid & FOREIGN_PID != 0 {
        bump(&OUTSIDE_PID_NS, 0);
        return false;
    }
    if filter.pid != 0 && pid != filter.pid {
        return false;
    }
    if filter.has_comm != 0 {
        let Ok(comm) = bpf_get_current_comm() else { return false };
        return comm == filter.comm;
    }
    true
}

/// Sends `event` to user space, counting it in `lost[0]` when the ring buffer is full.
#[inline(always)]
pub fn submit<T, const N: usize, const L: usize>(ring: &RingBuf<T, N>, event: &T, lost: &PerCpuArray<u64, L>) {
    if ring.output(event, 0).is_err() {
        bump(lost, 0);
    }
}

/// Reads the `u64` at `offset` bytes into a tracepoint record; 0 when unreadable.
#[inline(always)]
pub fn tp_u64(ctx: &aya_ebpf::programs::TracePointContext, offset: u32) -> u64 {
    // SAFETY: the offset comes from the tracepoint's format file; the read is checked by the helper.
    unsafe { ctx.read_at::<u64>(offset as usize) }.unwrap_or(0)
}

/// Reads the `u32` at `offset` bytes into a tracepoint record; 0 when unreadable.
#[inline(always)]
pub fn tp_u32(ctx: &aya_ebpf::programs::TracePointContext, offset: u32) -> u32 {
    // SAFETY: as for `tp_u64`.
    unsafe { ctx.read_at::<u32>(offset as usize) }.unwrap_or(0)
}

/// Declares `FILTER` (`memtrace_common::names::FILTER`), the `-p`/`--comm` filter user space
/// sets before load; `wanted(&FILTER.load())` applies it.
#[macro_export]
macro_rules! filter {
    () => {
        #[unsafe(no_mangle)]
        static FILTER: aya_ebpf::Global<memtrace_common::Filter> = aya_ebpf::Global::new(memtrace_common::Filter::ALL);
    };
}

/// Declares `EVENTS`, the ring buffer of `$event`s to user space (256 KiB unless `$bytes`),
/// and `LOST`, the per-CPU count of events it could not take (`memtrace_common::names`).
#[macro_export]
macro_rules! events {
    ($event:ty) => {
        $crate::events!($event, 256 * 1024);
    };
    ($event:ty, $bytes:expr) => {
        #[aya_ebpf::macros::btf_map]
        static EVENTS: aya_ebpf::btf_maps::RingBuf<$event, { $bytes }> = aya_ebpf::btf_maps::RingBuf::new();
        #[aya_ebpf::macros::btf_map]
        static LOST: aya_ebpf::btf_maps::PerCpuArray<u64, 1> = aya_ebpf::btf_maps::PerCpuArray::new();
    };
}

/// The license section every object needs: the tracing helpers used are GPL-only.
#[macro_export]
macro_rules! license {
    () => {
        #[unsafe(link_section = "license")]
        #[unsafe(no_mangle)]
        static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

        #[cfg(target_arch = "bpf")]
        #[panic_handler]
        fn panic(_info: &core::panic::PanicInfo) -> ! {
            // SAFETY: the verifier rejects any program that could reach a panic.
            unsafe { core::hint::unreachable_unchecked() }
        }

        #[cfg(not(target_arch = "bpf"))]
        fn main() {}
    };
}
