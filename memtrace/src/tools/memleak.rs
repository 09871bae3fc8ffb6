//! memleak: memory allocated and not freed, per stack, for one process (uprobes on its
//! allocator) or for the kernel (kmem and percpu tracepoints).

mod report;

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf,
    maps::{Array, MapData},
};
use memtrace_common::memleak::{Config, Event, KmemOffsets};

use crate::{
    kernel::{self, UProbeLinkId, UprobeError, placement::Placement, tracefs::Format},
    target::{self, Allocator, Child, ChildEvent},
};
use report::{Maps, Session};

const OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/memleak"));

/// Trace outstanding allocations and report them per stack.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Without -p or -c, memleak traces kernel allocations (kmalloc, kmem_cache, pages; --percpu adds percpu)."
)]
pub struct Args {
    /// Trace the process with this PID.
    #[arg(short, long, conflicts_with = "command")]
    pub pid: Option<u32>,
    /// Run this command (with its arguments, as one string) and trace it from its first instruction.
    #[arg(short = 'c', long = "command", value_name = "CMD")]
    pub command: Option<String>,
    /// Seconds between reports (default 5).
    pub interval: Option<u64>,
    /// Number of reports, then exit (default: until Ctrl-C or the target exits).
    pub count: Option<u64>,
    /// Show the N stacks with the most outstanding bytes.
    #[arg(short = 'T', long = "top", default_value_t = 10, value_name = "N")]
    pub top: usize,
    /// Only count allocations older than this many milliseconds (ignored in the final report
    /// after the target exits: everything left then was never freed).
    #[arg(short, long, default_value_t = 500, value_name = "MS")]
    pub older: u64,
    /// Ignore allocations smaller than this many bytes.
    #[arg(short = 'z', long, value_name = "BYTES")]
    pub min_size: Option<u64>,
    /// Ignore allocations larger than this many bytes.
    #[arg(short = 'Z', long, value_name = "BYTES")]
    pub max_size: Option<u64>,
    /// Record one allocation in N (lower overhead, partial counts).
    #[arg(short, long, default_value_t = 1, value_name = "N")]
    pub sample_rate: u32,
    /// List the address and size of each outstanding allocation.
    #[arg(short = 'a', long)]
    pub show_allocs: bool,
    /// Print every allocation and free as it happens.
    #[arg(short, long)]
    pub trace: bool,
    /// The library or executable holding the allocator (default: the target's libc, or the
    /// executable itself when statically linked).
    #[arg(short = 'O', long = "obj", value_name = "PATH")]
    pub obj: Option<PathBuf>,
    /// Prefix of the allocator's symbols, e.g. `je_` for a prefixed jemalloc.
    #[arg(long, default_value = "", value_name = "PREFIX")]
    pub symbols_prefix: String,
    /// Kernel mode: also trace percpu allocations.
    #[arg(long)]
    pub percpu: bool,
    /// Stop after this many seconds.
    #[arg(short, long, value_name = "SECONDS")]
    pub duration: Option<u64>,
    /// One JSON object per report on stdout.
    #[arg(long)]
    pub json: bool,
    /// Also write the final report as folded stacks (weight: bytes) to this file, for flame graphs.
    #[arg(long, value_name = "FILE")]
    pub folded: Option<PathBuf>,
    /// Low-overhead estimate: probe malloc, calloc and realloc only PCT% of the time (free stays
    /// probed); outstanding bytes are scaled by the share of activity recorded.
    #[arg(long, value_name = "PCT", value_parser = clap::value_parser!(u32).range(1..100))]
    pub duty_cycle: Option<u32>,
    /// Length of one --duty-cycle period, in milliseconds.
    #[arg(long, default_value_t = 1000, value_name = "MS", hide = true)]
    pub duty_period_ms: u64,
    /// Capacity of the outstanding-allocation map.
    #[arg(long, default_value_t = 262_144, value_name = "N")]
    pub max_allocs: u32,
    /// Capacity of the stack and per-stack totals maps.
    #[arg(long, default_value_t = 32_768, value_name = "N")]
    pub max_stacks: u32,
}

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

/// Where the report's numbers come from.
enum Mode {
    /// One process, through uprobes on its allocator; `child` when memtrace started it.
    User {
        pid: u32,
        child: Option<Child>,
        alloc: Allocator,
    },
    Kernel,
}

pub async fn run(args: Args) -> Result<()> {
    kernel::require_root()?;
    // Before anything is attached: a Ctrl-C from here on ends with a final report.
    let mut signals = crate::tools::Signals::catch()?;
    if args.sample_rate == 0 {
        bail!("--sample-rate must be at least 1");
    }
    if args.interval == Some(0) {
        bail!("the interval must be at least 1 second");
    }
    let mode = match (&args.command, args.pid) {
        (Some(cmd), _) => {
            let argv =
                shlex::split(cmd).filter(|a| !a.is_empty()).context("-c needs a command, e.g. -c \"./prog arg\"")?;
            let exe = target::find_program(&argv[0])?;
            let alloc = with_obj(target::allocator_of_program(&exe)?, args.obj.as_ref())?;
            let child = Child::spawn(&argv)?;
            Mode::User { pid: child.pid, child: Some(child), alloc }
        }
        (None, Some(pid)) => {
            target::check_pid(pid)?;
            let alloc = with_obj(target::allocator_of_pid(pid)?, args.obj.as_ref())?;
            Mode::User { pid, child: None, alloc }
        }
        (None, None) => Mode::Kernel,
    };

    let config = Config {
        min_size: args.min_size.unwrap_or(0),
        max_size: args.max_size.unwrap_or(u64::MAX),
        sample_rate: args.sample_rate,
        trace: args.trace as u32,
        duty: args.duty_cycle.is_some() as u32,
        _pad: 0,
    };
    let kmem = match mode {
        Mode::Kernel => Some(kmem_offsets()?),
        Mode::User { .. } => None,
    };
    let mut bpf = kernel::load(OBJECT, |loader| {
        loader
            .override_global("CONFIG", &config, true)
            .map_max_entries("ALLOCS", args.max_allocs)
            .map_max_entries("TOTALS", args.max_stacks)
            .map_max_entries("STACKS", args.max_stacks);
        if let Some(k) = &kmem {
            loader.override_global("KMEM", k, true);
        }
    })?;

    let mut duty = None;
    let (pid, mut child) = match mode {
        Mode::User { pid, child, alloc } => {
            let obj = alloc.primary.clone();
            let skip = if args.duty_cycle.is_some() { DutyCycle::HOT } else { &[] };
            let probes = attach_user(&mut bpf, &alloc, &args.symbols_prefix, pid, skip)?;
            if let Some(pct) = args.duty_cycle {
                let period = Duration::from_millis(args.duty_period_ms.max(10));
                let window = Array::try_from(bpf.take_map("WINDOW").context("internal: no WINDOW map")?)?;
                let mut cycle = DutyCycle::new(obj.clone(), &args.symbols_prefix, pid, window, pct, period);
                cycle.open(&mut bpf)?;
                duty = Some(cycle);
            }
            let sampled =
                args.duty_cycle.map(|p| format!(", malloc/calloc/realloc {p}% of the time")).unwrap_or_default();
            eprintln!(
                "memtrace: memleak: tracing pid {pid} ({}) through {} with {probes} probes{sampled}; Ctrl-C to stop",
                if child.is_some() { args.command.clone().unwrap_or_default() } else { target::comm(pid) },
                obj.display()
            );
            (Some(pid), child)
        }
        Mode::Kernel => {
            if args.duty_cycle.is_some() {
                bail!("--duty-cycle applies to user mode (-p or -c)");
            }
            let attached = attach_kernel(&mut bpf, args.percpu)?;
            eprintln!("memtrace: memleak: tracing kernel allocations ({}); Ctrl-C to stop", attached.join(", "));
            (None, None)
        }
    };
    let duty_timer = tokio::time::sleep(duty.as_ref().map_or(Duration::from_secs(u64::MAX / 4), |d| d.open_for));
    tokio::pin!(duty_timer);
    let (maps, ring) = Maps::take(&mut bpf)?;
    let mut session = Session::new(&args, pid, maps)?;
    if let Some(pid) = pid {
        // Keep a map of the process while it surely lives; symbolization uses it after exit.
        let _ = session.user_sym.refresh(pid);
    }
    if let Some(child) = child.as_mut() {
        child.release()?;
    }
    let mut ring = crate::tools::async_readable(ring)?;

    let every = Duration::from_secs(args.interval.unwrap_or(5));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let deadline = tokio::time::sleep(args.duration.map_or(Duration::from_secs(u64::MAX / 4), Duration::from_secs));
    tokio::pin!(deadline);
    let watch_pid = pid.filter(|_| child.is_none());
    let target_exit = async move {
        match watch_pid {
            Some(pid) => target::exited(pid).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(target_exit);
    let mut reports = 0u64;
    let mut target_gone = false;

    loop {
        tokio::select! {
            _ = &mut duty_timer, if duty.is_some() => {
                let cycle = duty.as_mut().expect("guarded by the branch condition");
                let next = if cycle.is_open() { cycle.close(&mut bpf)? } else { cycle.open(&mut bpf)? };
                duty_timer.as_mut().reset(tokio::time::Instant::now() + next);
            }
            _ = ticker.tick() => {
                reports += 1;
                let last = args.count.is_some_and(|c| reports >= c);
                session.report(last, false)?;
                if last {
                    return Ok(());
                }
            }
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                while let Some(item) = guard.get_inner_mut().next() {
                    if item.len() >= size_of::<Event>() {
                        // SAFETY: the kernel side writes whole `Event`s; read unaligned.
                        let event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) };
                        session.on_event(&event)?;
                    }
                }
                guard.clear_ready();
            }
            event = recv_child(&mut child) => match event {
                Some(ChildEvent::Exiting { ack }) => {
                    // The command is stopped at exit with its memory map intact: snapshot it.
                    if let Some(pid) = pid {
                        let _ = session.user_sym.refresh(pid);
                    }
                    let _ = ack.send(());
                }
                Some(ChildEvent::Exited(code)) => {
                    eprintln!("memtrace: memleak: command exited with status {code}");
                    target_gone = true;
                    break;
                }
                None => { child = None; }
            },
            res = &mut target_exit => {
                res?;
                eprintln!("memtrace: memleak: process {} exited", pid.unwrap_or_default());
                target_gone = true;
                break;
            }
            _ = signals.recv() => break,
            _ = &mut deadline => break,
        }
    }
    session.report(true, target_gone)?;
    Ok(())
}

async fn recv_child(child: &mut Option<Child>) -> Option<ChildEvent> {
    match child {
        Some(c) => c.events.recv().await,
        None => std::future::pending().await,
    }
}

/// `-O` replaces the detected allocator; the detected libc still serves what it lacks.
fn with_obj(detected: Allocator, obj: Option<&PathBuf>) -> Result<Allocator> {
    let alloc = match obj {
        None => detected,
        Some(obj) => {
            let libc = detected.libc.unwrap_or(detected.primary);
            Allocator { libc: Some(libc).filter(|l| l != obj), primary: obj.clone() }
        }
    };
    target::check_elf(&alloc.primary)?;
    Ok(alloc)
}

/// Attaches the allocator probes. Each function is probed in the allocator library, else in
/// libc (a jemalloc program still gets mmap and pvalloc from libc); missing optional functions
/// are skipped with a note.
fn attach_user(bpf: &mut Ebpf, alloc: &Allocator, prefix: &str, pid: u32, skip: &[&str]) -> Result<usize> {
    let mut attached = 0;
    let placements: Vec<(&std::path::Path, Placement, &str)> = std::iter::once((alloc.primary.as_path(), prefix))
        .chain(alloc.libc.as_deref().map(|l| (l, "")))
        .map(|(obj, prefix)| (obj, Placement::new(obj), prefix))
        .collect();
    let obj = alloc.primary.as_path();
    let mut attach = |bpf: &mut Ebpf, prog: &str, func: &str, required: bool| -> Result<bool> {
        if skip.contains(&func) {
            return Ok(false);
        }
        for (lib, placement, prefix) in &placements {
            let symbol = format!("{prefix}{func}");
            let offset = entry_offset(placement, prog, &symbol, func);
            match kernel::attach_uprobe(bpf, prog, lib, &symbol, offset, Some(pid)) {
                Ok(_) => {
                    attached += 1;
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
    Ok(attached)
}

/// Where an allocator probe goes: return probes at the entry (the kernel needs it there), entry
/// probes on an instruction the kernel can emulate; free may step over its NULL check.
fn entry_offset(placement: &Placement, prog: &str, symbol: &str, func: &str) -> u64 {
    if prog == "memleak_alloc_ret" { 0 } else { placement.entry_offset(symbol, func == "free") }
}

/// `--duty-cycle`: the busiest allocator functions are probed only during short windows, so
/// most calls take no trap; free stays probed so recorded blocks are still matched.
struct DutyCycle {
    obj: PathBuf,
    pid: u32,
    /// (program, symbol, offset) of each hot probe, returns first.
    probes: Vec<(&'static str, String, u64)>,
    window: Array<MapData, u32>,
    links: Vec<(&'static str, UProbeLinkId)>,
    open_for: Duration,
    closed_for: Duration,
}

impl DutyCycle {
    /// The functions whose traps dominate: malloc, calloc, realloc.
    const HOT: &'static [&'static str] = &["malloc", "calloc", "realloc"];

    fn is_open(&self) -> bool {
        !self.links.is_empty()
    }

    fn new(obj: PathBuf, prefix: &str, pid: u32, window: Array<MapData, u32>, pct: u32, period: Duration) -> Self {
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
    fn open(&mut self, bpf: &mut Ebpf) -> Result<Duration> {
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
    fn close(&mut self, bpf: &mut Ebpf) -> Result<Duration> {
        self.window.set(0, 0, 0)?;
        let mut links = std::mem::take(&mut self.links);
        links.sort_by_key(|(prog, _)| *prog == "memleak_alloc_ret");
        let started = std::time::Instant::now();
        for (prog, id) in links {
            kernel::detach_uprobe(bpf, prog, id)?;
        }
        // Detaching takes a grace period per probe; count it as closed time.
        Ok(self.closed_for.saturating_sub(started.elapsed()))
    }
}

/// Offsets of the kmem/percpu tracepoint fields on this kernel.
fn kmem_offsets() -> Result<KmemOffsets> {
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

fn attach_kernel(bpf: &mut Ebpf, percpu: bool) -> Result<Vec<String>> {
    let mut points = vec![
        ("memleak_kmalloc", "kmem", "kmalloc", true),
        ("memleak_kmalloc_node", "kmem", "kmalloc_node", false),
        ("memleak_kfree", "kmem", "kfree", true),
        ("memleak_cache_alloc", "kmem", "kmem_cache_alloc", true),
        ("memleak_cache_alloc_node", "kmem", "kmem_cache_alloc_node", false),
        ("memleak_cache_free", "kmem", "kmem_cache_free", true),
        ("memleak_page_alloc", "kmem", "mm_page_alloc", true),
        ("memleak_page_free", "kmem", "mm_page_free", true),
    ];
    if percpu {
        points.push(("memleak_percpu_alloc", "percpu", "percpu_alloc_percpu", true));
        points.push(("memleak_percpu_free", "percpu", "percpu_free_percpu", true));
    }
    let mut attached = Vec::new();
    for (prog, category, name, required) in points {
        if !required && !crate::kernel::tracefs::exists(category, name) {
            tracing::info!("tracepoint {category}:{name} absent on this kernel (merged into its plain variant)");
            continue;
        }
        kernel::attach_tracepoint(bpf, prog, category, name)?;
        attached.push(name.to_string());
    }
    Ok(attached)
}
