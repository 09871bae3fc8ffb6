//! Attaching memleak's programs: allocator uprobes per process (and the `--duty-cycle`
//! windows), or the kernel's allocation tracepoints.

use std::{path::PathBuf, time::Duration};

use anyhow::{Result, bail};
use aya::{
    Ebpf,
    maps::{Array, MapData},
};
use memtrace_common::memleak::{ExecOffsets, ForkOffsets, KmemOffsets, OomOffsets};

use crate::{
    kernel::{self, AttachPoint, Probe, UProbeLinkId, UprobeError, placement::Placement, tracefs::Format},
    target::Allocator,
};

/// Allocator entry points: (symbol without prefix, entry program). All share one return probe.
const USER_PROBES: &[(&str, &str)] = &[
    ("malloc", "memleak_malloc"),
    ("calloc", "memleak_calloc"),
    ("realloc", "memleak_realloc"),
    ("reallocarray", "memleak_reallocarray"),
    ("posix_memalign", "memleak_posix_memalign"),
    ("aligned_alloc", "memleak_aligned_alloc"),
    ("memalign", "memleak_memalign"),
    ("valloc", "memleak_valloc"),
    ("pvalloc", "memleak_pvalloc"),
    ("mmap", "memleak_mmap"),
];

/// Attaches the allocator probes and returns their links. Each function is probed in the
/// allocator library, else in libc (a jemalloc program still gets mmap and pvalloc from libc);
/// missing optional functions are skipped with a note. On an error, what was attached is
/// detached again.
pub(super) fn user(
    bpf: &mut Ebpf,
    alloc: &Allocator,
    prefix: &str,
    pid: u32,
    skip: &[&str],
) -> Result<Vec<(&'static str, UProbeLinkId)>> {
    let mut links = Vec::new();
    let result = user_into(bpf, alloc, prefix, pid, skip, &mut links);
    if let Err(e) = result {
        detach(bpf, links);
        return Err(e);
    }
    Ok(links)
}

/// Detaches probes `user` attached: entries before returns, so no call is seen entering
/// without being seen leaving.
pub(super) fn detach(bpf: &mut Ebpf, mut links: Vec<(&'static str, UProbeLinkId)>) {
    links.sort_by_key(|(prog, _)| *prog == "memleak_alloc_ret");
    for (prog, id) in links {
        let _ = kernel::detach_uprobe(bpf, prog, id);
    }
}

/// Detaches probes that can no longer fire (their image is gone) on a thread of their own:
/// nobody waits for their grace periods.
pub(super) fn detach_later(links: Vec<(&'static str, UProbeLinkId)>) {
    kernel::detach_uprobes_later(links.into_iter().map(|(_, id)| id).collect());
}

fn user_into(
    bpf: &mut Ebpf,
    alloc: &Allocator,
    prefix: &str,
    pid: u32,
    skip: &[&str],
    links: &mut Vec<(&'static str, UProbeLinkId)>,
) -> Result<()> {
    let placements: Vec<(&std::path::Path, Placement, &str)> = std::iter::once((alloc.primary.as_path(), prefix))
        .chain(alloc.libc.as_deref().map(|l| (l, "")))
        .map(|(obj, prefix)| (obj, Placement::new(obj), prefix))
        .collect();
    let obj = alloc.primary.as_path();
    let mut attach = |bpf: &mut Ebpf, prog: &'static str, func: &str, required: bool| -> Result<bool> {
        if skip.contains(&func) {
            return Ok(false);
        }
        for (lib, placement, prefix) in &placements {
            let symbol = format!("{prefix}{func}");
            let offset = entry_offset(placement, prog, &symbol, func);
            match kernel::attach_uprobe(bpf, prog, lib, &symbol, offset, Some(pid)) {
                Ok(id) => {
                    links.push((prog, id));
                    return Ok(true);
                }
                // malloc and free must come from the allocator itself.
                Err(UprobeError::NoSymbol) if required => bail!(
                    "{} has no {symbol}: it is not the allocator (give the right library with -O, or the prefix with --symbols-prefix)",
                    lib.display()
                ),
                Err(UprobeError::NoSymbol) => continue,
                Err(UprobeError::Other(e)) => return Err(e),
            }
        }
        tracing::info!("{} has no {prefix}{func}: not traced", obj.display());
        Ok(false)
    };
    // Return probes and frees first, so no call is seen entering without being seen leaving.
    for &(func, _) in USER_PROBES {
        attach(bpf, "memleak_alloc_ret", func, func == "malloc")?;
    }
    attach(bpf, "memleak_free", "free", true)?;
    attach(bpf, "memleak_munmap", "munmap", false)?;
    for &(func, prog) in USER_PROBES {
        attach(bpf, prog, func, func == "malloc")?;
    }
    Ok(())
}

/// Where an allocator probe goes: return probes at the entry (the kernel needs it there), entry
/// probes on an instruction the kernel can emulate; free may step over its NULL check.
fn entry_offset(placement: &Placement, prog: &str, symbol: &str, func: &str) -> u64 {
    if prog == "memleak_alloc_ret" { 0 } else { placement.entry_offset(symbol, func == "free") }
}

/// `--duty-cycle`: the busiest allocator functions are probed only during short windows, so
/// most calls take no trap; free stays probed so recorded blocks are still matched.
pub(super) struct DutyCycle {
    obj: PathBuf,
    pid: u32,
    /// (program, symbol, offset) of each hot probe, returns first.
    probes: Vec<(&'static str, String, u64)>,
    window: Array<MapData, u32>,
    links: Vec<(&'static str, UProbeLinkId)>,
    pub(super) open_for: Duration,
    closed_for: Duration,
}

impl DutyCycle {
    /// The functions whose traps dominate: malloc, calloc, realloc.
    pub(super) const HOT: &'static [&'static str] = &["malloc", "calloc", "realloc"];

    pub(super) fn is_open(&self) -> bool {
        !self.links.is_empty()
    }

    pub(super) fn new(
        obj: PathBuf,
        prefix: &str,
        pid: u32,
        window: Array<MapData, u32>,
        pct: u32,
        period: Duration,
    ) -> Self {
        let placement = Placement::new(&obj);
        let mut probes = Vec::new();
        for &func in Self::HOT {
            let entry = USER_PROBES.iter().find(|(f, _)| *f == func).map_or("memleak_malloc", |(_, p)| *p);
            for prog in ["memleak_alloc_ret", entry] {
                let symbol = format!("{prefix}{func}");
                let offset = entry_offset(&placement, prog, &symbol, func);
                probes.push((prog, symbol, offset));
            }
        }
        DutyCycle {
            obj,
            pid,
            probes,
            window,
            links: Vec::new(),
            open_for: period * pct / 100,
            closed_for: period * (100 - pct) / 100,
        }
    }

    /// Attaches the hot probes (returns first), then opens the window; returns how long to stay.
    pub(super) fn open(&mut self, bpf: &mut Ebpf) -> Result<Duration> {
        for (prog, symbol, offset) in &self.probes {
            match kernel::attach_uprobe(bpf, prog, &self.obj, symbol, *offset, Some(self.pid)) {
                Ok(id) => self.links.push((prog, id)),
                Err(UprobeError::NoSymbol) => {}
                Err(UprobeError::Other(e)) => return Err(e),
            }
        }
        self.window.set(0, 1, 0)?;
        Ok(self.open_for)
    }

    /// Closes the window, then detaches entries before returns; returns how long to stay closed.
    pub(super) fn close(&mut self, bpf: &mut Ebpf) -> Result<Duration> {
        self.window.set(0, 0, 0)?;
        let started = std::time::Instant::now();
        detach(bpf, std::mem::take(&mut self.links));
        // Detaching takes a grace period per probe; count it as closed time.
        Ok(self.closed_for.saturating_sub(started.elapsed()))
    }
}

/// Offsets of the kmem/percpu tracepoint fields on this kernel.
pub(super) fn kmem_offsets() -> Result<KmemOffsets> {
    let fmt = |name| Format::read("kmem", name);
    let optional =
        |cat, name| if crate::kernel::tracefs::exists(cat, name) { Format::read(cat, name).ok() } else { None };
    let kmalloc = fmt("kmalloc")?;
    let cache_alloc = fmt("kmem_cache_alloc")?;
    let page_alloc = fmt("mm_page_alloc")?;
    let page_free = fmt("mm_page_free")?;
    let mut k = KmemOffsets {
        kmalloc_ptr: kmalloc.offset("ptr")?,
        kmalloc_bytes: kmalloc.offset("bytes_alloc")?,
        cache_alloc_ptr: cache_alloc.offset("ptr")?,
        cache_alloc_bytes: cache_alloc.offset("bytes_alloc")?,
        kfree_ptr: fmt("kfree")?.offset("ptr")?,
        cache_free_ptr: fmt("kmem_cache_free")?.offset("ptr")?,
        page_alloc_pfn: page_alloc.offset("pfn")?,
        page_alloc_order: page_alloc.offset("order")?,
        page_free_pfn: page_free.offset("pfn")?,
        page_free_order: page_free.offset("order")?,
        // SAFETY: sysconf has no preconditions.
        page_shift: (unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64).trailing_zeros(),
        ..Default::default()
    };
    // The _node variants exist only before 6.1-era kernels merged them into the plain ones.
    if let Some(f) = optional("kmem", "kmalloc_node") {
        (k.kmalloc_node_ptr, k.kmalloc_node_bytes) = (f.offset("ptr")?, f.offset("bytes_alloc")?);
    }
    if let Some(f) = optional("kmem", "kmem_cache_alloc_node") {
        (k.cache_alloc_node_ptr, k.cache_alloc_node_bytes) = (f.offset("ptr")?, f.offset("bytes_alloc")?);
    }
    if let Some(f) = optional("percpu", "percpu_alloc_percpu") {
        // Older kernels have no bytes_alloc; size is what was asked.
        (k.percpu_alloc_ptr, k.percpu_alloc_bytes) = (f.offset("ptr")?, f.offset_of_any(&["bytes_alloc", "size"])?);
    }
    if let Some(f) = optional("percpu", "percpu_free_percpu") {
        k.percpu_free_ptr = f.offset("ptr")?;
    }
    Ok(k)
}

const fn tp(prog: &'static str, category: &'static str, names: &'static [&'static str]) -> Probe {
    Probe::Tracepoint { prog, category, names }
}

/// Kernel mode's tracepoints, all needed.
pub(super) const KERNEL: AttachPoint = AttachPoint {
    label: "tracepoints kmem:{kmalloc,kfree,kmem_cache_alloc,kmem_cache_free,mm_page_alloc,mm_page_free}",
    probes: &[
        tp("memleak_kmalloc", "kmem", &["kmalloc"]),
        tp("memleak_kfree", "kmem", &["kfree"]),
        tp("memleak_cache_alloc", "kmem", &["kmem_cache_alloc"]),
        tp("memleak_cache_free", "kmem", &["kmem_cache_free"]),
        tp("memleak_page_alloc", "kmem", &["mm_page_alloc"]),
        tp("memleak_page_free", "kmem", &["mm_page_free"]),
    ],
};

/// The `_node` variants, which newer kernels merged into the plain ones.
pub(super) const KERNEL_NODE: &[Probe] = &[
    tp("memleak_kmalloc_node", "kmem", &["kmalloc_node"]),
    tp("memleak_cache_alloc_node", "kmem", &["kmem_cache_alloc_node"]),
];

/// `--percpu`.
pub(super) const PERCPU: &[Probe] = &[
    tp("memleak_percpu_alloc", "percpu", &["percpu_alloc_percpu"]),
    tp("memleak_percpu_free", "percpu", &["percpu_free_percpu"]),
];

/// Forks (for `-c` and `--children`) and execs.
pub(super) const LIFECYCLE: &[Probe] =
    &[tp("memleak_newtask", "task", &["task_newtask"]), tp("memleak_exec", "sched", &["sched_process_exec"])];

/// The OOM killer's choice of a victim: a traced process's heap is read at its kill.
pub(super) const OOM: Probe = tp("memleak_oom_victim", "oom", &["mark_victim"]);

fn attach(bpf: &mut Ebpf, probe: &Probe) -> Result<&'static str> {
    let Probe::Tracepoint { prog, category, names: &[name] } = *probe else {
        unreachable!("memleak's kernel probes are single tracepoints")
    };
    kernel::attach_tracepoint(bpf, prog, category, name)?;
    Ok(name)
}

pub(super) fn kernel(bpf: &mut Ebpf, percpu: bool) -> Result<Vec<String>> {
    let mut attached = Vec::new();
    for probe in KERNEL.probes.iter().chain(if percpu { PERCPU } else { &[] }) {
        attached.push(attach(bpf, probe)?.to_string());
    }
    for probe in KERNEL_NODE {
        let Probe::Tracepoint { category, names: &[name], .. } = *probe else { continue };
        if !crate::kernel::tracefs::exists(category, name) {
            tracing::info!("tracepoint {category}:{name} absent on this kernel (merged into its plain variant)");
            continue;
        }
        attached.push(attach(bpf, probe)?.to_string());
    }
    Ok(attached)
}

/// Offsets of `task:task_newtask`'s fields, through which the kernel side follows forks.
pub(super) fn fork_offsets() -> Result<ForkOffsets> {
    let f = Format::read("task", "task_newtask")?;
    Ok(ForkOffsets { pid: f.offset("pid")?, clone_flags: f.offset("clone_flags")? })
}

/// Offsets of `sched:sched_process_exec`'s fields, through which the kernel side tells an exec
/// by another thread than the process's first.
pub(super) fn exec_offsets() -> Result<ExecOffsets> {
    let f = Format::read("sched", "sched_process_exec")?;
    Ok(ExecOffsets { pid: f.offset("pid")?, old_pid: f.offset("old_pid")? })
}

/// Offset of `oom:mark_victim`'s pid; None where the kernel lacks the tracepoint.
pub(super) fn oom_offsets() -> Option<OomOffsets> {
    let f = Format::read("oom", "mark_victim").ok()?;
    Some(OomOffsets { pid: f.offset("pid").ok()?, _pad: 0 })
}

/// Attaches the OOM victim tracepoint; without it (no such tracepoint) a process the OOM
/// killer ends is reported as any SIGKILLed one.
pub(super) fn oom(bpf: &mut Ebpf) {
    if let Err(e) = attach(bpf, &OOM) {
        tracing::warn!("no heap at OOM kills: cannot attach tracepoint oom:mark_victim: {e:#}");
    }
}

/// The tracepoints that follow processes: forks (for `-c` and `--children`), execs and OOM kills.
pub(super) fn lifecycle(bpf: &mut Ebpf) -> Result<()> {
    for probe in LIFECYCLE {
        attach(bpf, probe)?;
    }
    oom(bpf);
    Ok(())
}
