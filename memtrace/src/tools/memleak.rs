//! memleak: memory allocated and not freed, per stack, for one process (uprobes on its
//! allocator) or for the kernel (kmem and percpu tracepoints).

use std::{
    collections::{HashMap as StdHashMap, VecDeque},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray, RingBuf, StackTraceMap},
};
use memtrace_common::{
    NO_PID, STACK_LOST,
    memleak::{
        AllocInfo, AllocKey, Config, EV_ALLOC, EV_FREE, EV_NEW_STACK, Event, FN_NAMES, KmemOffsets, STAT_EVENTS_LOST,
        STAT_MAP_FULL, STAT_STACK_LOST, STAT_STACKS_FULL, STAT_UNKNOWN_FREE, StackKey, StackTotal,
    },
};
use serde::Serialize;

use crate::{
    kernel::{self, UprobeError, tracefs::Format},
    output::{self, Dropped},
    symbolize::{Frame, KernelSymbolizer, UserSymbolizer},
    target::{self, Child, ChildEvent},
    tools::monotonic_ns,
};

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
    User { pid: u32, child: Option<Child> },
    Kernel,
}

struct Maps {
    allocs: HashMap<MapData, AllocKey, AllocInfo>,
    totals: HashMap<MapData, StackKey, StackTotal>,
    stacks: StackTraceMap<MapData>,
    stats: PerCpuArray<MapData, u64>,
}

impl Maps {
    fn take(bpf: &mut Ebpf) -> Result<(Maps, RingBuf<MapData>)> {
        let mut take = |name: &str| bpf.take_map(name).with_context(|| format!("internal: no map {name}"));
        let maps = Maps {
            allocs: HashMap::try_from(take("ALLOCS")?)?,
            totals: HashMap::try_from(take("TOTALS")?)?,
            stacks: StackTraceMap::try_from(take("STACKS")?)?,
            stats: PerCpuArray::try_from(take("STATS")?)?,
        };
        Ok((maps, RingBuf::try_from(take("EVENTS")?)?))
    }

    fn stat(&self, index: u32) -> u64 {
        self.stats.get(&index, 0).map(|v| v.iter().sum()).unwrap_or(0)
    }

    fn dropped(&self) -> Dropped {
        Dropped {
            map_full: self.stat(STAT_MAP_FULL),
            stacks_lost: self.stat(STAT_STACK_LOST),
            unknown_frees: self.stat(STAT_UNKNOWN_FREE),
            stacks_full: self.stat(STAT_STACKS_FULL),
            events_lost: self.stat(STAT_EVENTS_LOST),
        }
    }

    /// Outstanding bytes per stack: from the in-kernel totals, or, when an age cut-off or the
    /// list of allocations is wanted, from the per-address map.
    fn rows(&self, older_ns: u64, with_allocs: bool) -> Vec<Row> {
        let mut rows: StdHashMap<StackKey, Row> = StdHashMap::new();
        if older_ns == 0 && !with_allocs {
            for (key, total) in self.totals.iter().filter_map(Result::ok) {
                if total.allocs > 0 && total.allocs < u64::MAX / 2 {
                    rows.insert(key, Row { key, bytes: total.bytes, allocs: total.allocs, allocations: Vec::new() });
                }
            }
        } else {
            let now = monotonic_ns();
            for (key, info) in self.allocs.iter().filter_map(Result::ok) {
                let age = now.saturating_sub(info.timestamp_ns);
                if age < older_ns {
                    continue;
                }
                let skey = StackKey { pid: key.pid, stack_id: info.stack_id };
                let row =
                    rows.entry(skey).or_insert_with(|| Row { key: skey, bytes: 0, allocs: 0, allocations: Vec::new() });
                row.bytes += info.size;
                row.allocs += 1;
                if with_allocs {
                    row.allocations.push(Allocation { addr: key.addr, size: info.size, age_ms: age / 1_000_000 });
                }
            }
        }
        let mut rows: Vec<Row> = rows.into_values().collect();
        rows.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(b.allocs.cmp(&a.allocs)));
        rows
    }
}

struct Row {
    key: StackKey,
    bytes: u64,
    allocs: u64,
    allocations: Vec<Allocation>,
}

#[derive(Serialize, Clone)]
struct Allocation {
    addr: u64,
    size: u64,
    age_ms: u64,
}

/// One report, as JSON.
#[derive(Serialize)]
struct Report {
    time: String,
    /// The traced process; null in kernel mode.
    pid: Option<u32>,
    mode: &'static str,
    /// True for the last report (target exited, Ctrl-C, count or duration reached).
    #[serde(rename = "final")]
    is_final: bool,
    /// Sampling rate: with N > 1 the numbers are those of one allocation in N.
    sample_rate: u32,
    total_bytes: u64,
    stacks: Vec<StackReport>,
    dropped: Dropped,
}

#[derive(Serialize)]
struct StackReport {
    pid: u32,
    stack_id: Option<u32>,
    bytes: u64,
    allocs: u64,
    /// growing / steady / shrinking / new: the stack's outstanding bytes over the last reports.
    trend: &'static str,
    /// Change of outstanding bytes per second over the reports seen so far.
    growth_bytes_per_sec: f64,
    frames: Vec<Frame>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    allocations: Vec<Allocation>,
}

/// Outstanding bytes of each stack over time: tells a leak (keeps growing) from a cache or
/// pool (grows, then holds steady), which an age cut-off alone cannot.
#[derive(Default)]
struct Trends {
    history: StdHashMap<StackKey, VecDeque<(Instant, u64)>>,
}

impl Trends {
    const KEEP: usize = 12;

    fn observe(&mut self, key: StackKey, bytes: u64, now: Instant) -> (&'static str, f64) {
        let h = self.history.entry(key).or_default();
        h.push_back((now, bytes));
        if h.len() > Self::KEEP {
            h.pop_front();
        }
        classify(h.iter().map(|&(t, b)| (t.duration_since(h[0].0).as_secs_f64(), b)).collect::<Vec<_>>().as_slice())
    }
}

/// Classifies a series of (seconds since first sample, bytes).
fn classify(samples: &[(f64, u64)]) -> (&'static str, f64) {
    let (Some(&(t0, b0)), Some(&(t1, b1))) = (samples.first(), samples.last()) else { return ("new", 0.0) };
    if samples.len() < 2 {
        return ("new", 0.0);
    }
    let rate = if t1 > t0 { (b1 as f64 - b0 as f64) / (t1 - t0) } else { 0.0 };
    let recent = &samples[samples.len().saturating_sub(4)..];
    let steps: Vec<i128> = recent.windows(2).map(|w| w[1].1 as i128 - w[0].1 as i128).collect();
    let trend = if steps.iter().all(|&d| d > 0) {
        "growing"
    } else if steps.iter().all(|&d| d == 0) {
        "steady"
    } else if steps.iter().all(|&d| d <= 0) {
        "shrinking"
    } else if b1 > b0 {
        "growing"
    } else {
        "steady"
    };
    (trend, rate)
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
            let obj = match &args.obj {
                Some(obj) => obj.clone(),
                None => target::allocator_of_program(&exe)?,
            };
            target::check_elf(&obj)?;
            let child = Child::spawn(&argv)?;
            Mode::User { pid: child.pid, child: Some(child) }.with_obj(obj)
        }
        (None, Some(pid)) => {
            target::check_pid(pid)?;
            let obj = match &args.obj {
                Some(obj) => obj.clone(),
                None => target::allocator_of_pid(pid)?,
            };
            target::check_elf(&obj)?;
            Mode::User { pid, child: None }.with_obj(obj)
        }
        (None, None) => (Mode::Kernel, None),
    };
    let (mode, obj) = mode;

    let config = Config {
        min_size: args.min_size.unwrap_or(0),
        max_size: args.max_size.unwrap_or(u64::MAX),
        sample_rate: args.sample_rate,
        trace: args.trace as u32,
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

    let (pid, mut child) = match mode {
        Mode::User { pid, child } => {
            let obj = obj.expect("user mode has an allocator object");
            let probes = attach_user(&mut bpf, &obj, &args.symbols_prefix, pid)?;
            eprintln!(
                "memtrace: memleak: tracing pid {pid} ({}) through {} with {probes} probes; Ctrl-C to stop",
                if child.is_some() { args.command.clone().unwrap_or_default() } else { target::comm(pid) },
                obj.display()
            );
            (Some(pid), child)
        }
        Mode::Kernel => {
            let attached = attach_kernel(&mut bpf, args.percpu)?;
            eprintln!("memtrace: memleak: tracing kernel allocations ({}); Ctrl-C to stop", attached.join(", "));
            (None, None)
        }
    };
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

impl Mode {
    fn with_obj(self, obj: PathBuf) -> (Mode, Option<PathBuf>) {
        (self, Some(obj))
    }
}

/// Attaches the allocator probes; missing optional functions are skipped with a note.
fn attach_user(bpf: &mut Ebpf, obj: &std::path::Path, prefix: &str, pid: u32) -> Result<usize> {
    let mut attached = 0;
    let mut attach = |bpf: &mut Ebpf, prog: &str, func: &str, required: bool| -> Result<bool> {
        let symbol = format!("{prefix}{func}");
        match kernel::attach_uprobe(bpf, prog, obj, &symbol, Some(pid)) {
            Ok(()) => {
                attached += 1;
                Ok(true)
            }
            Err(UprobeError::NoSymbol) if !required => {
                tracing::info!("{} has no {symbol}: not traced", obj.display());
                Ok(false)
            }
            Err(UprobeError::NoSymbol) => bail!(
                "{} has no {symbol}: it is not the allocator (give the right library with -O, or the prefix with --symbols-prefix)",
                obj.display()
            ),
            Err(UprobeError::Other(e)) => Err(e),
        }
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

/// Reporting state: maps, symbolizers and caches.
struct Session<'a> {
    args: &'a Args,
    pid: Option<u32>,
    maps: Maps,
    user_sym: UserSymbolizer,
    kernel_sym: Option<KernelSymbolizer>,
    stack_cache: StdHashMap<StackKey, Vec<Frame>>,
    trends: Trends,
}

impl<'a> Session<'a> {
    fn new(args: &'a Args, pid: Option<u32>, maps: Maps) -> Result<Self> {
        let kernel_sym = if pid.is_none() { Some(KernelSymbolizer::new()?) } else { None };
        Ok(Session {
            args,
            pid,
            maps,
            user_sym: UserSymbolizer::new(),
            kernel_sym,
            stack_cache: StdHashMap::new(),
            trends: Trends::default(),
        })
    }

    fn on_event(&mut self, event: &Event) -> Result<()> {
        match event.kind {
            // Symbolize while the process is alive; the result is cached for every report.
            EV_NEW_STACK => {
                let _ = self.frames(StackKey { pid: event.pid, stack_id: event.stack_id });
            }
            EV_ALLOC | EV_FREE if self.args.trace => {
                let func = FN_NAMES.get(event.func as usize).copied().unwrap_or("?");
                let text = if event.kind == EV_ALLOC {
                    format!("pid {} tid {}: {func}({}) = {:#x}", event.pid, event.tid, event.size, event.addr)
                } else {
                    format!("pid {} tid {}: {func}({:#x}) frees {} bytes", event.pid, event.tid, event.addr, event.size)
                };
                if self.args.json {
                    output::json_line(&serde_json::json!({
                        "event": if event.kind == EV_ALLOC { "alloc" } else { "free" },
                        "pid": event.pid, "tid": event.tid, "func": func, "addr": event.addr, "size": event.size,
                    }))?;
                } else {
                    output::line(&text)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn frames(&mut self, key: StackKey) -> Vec<Frame> {
        if key.stack_id == STACK_LOST {
            return Vec::new();
        }
        if let Some(frames) = self.stack_cache.get(&key) {
            return frames.clone();
        }
        let Ok(trace) = self.maps.stacks.get(&key.stack_id, 0) else { return Vec::new() };
        let ips: Vec<u64> = trace.frames().iter().map(|f| f.ip).filter(|&ip| ip != 0).collect();
        let frames = if key.pid == NO_PID {
            self.kernel_sym.as_ref().map(|k| k.symbolize_stack(&ips)).unwrap_or_default()
        } else {
            // Every user frame is a return address: look up the call instruction before it,
            // so file:line names the line that called, not the one after.
            let calls: Vec<u64> = ips.iter().map(|ip| ip.saturating_sub(1)).collect();
            let mut frames = self.user_sym.symbolize_stack(key.pid, &calls);
            for f in &mut frames {
                f.addr += 1;
            }
            frames
        };
        self.stack_cache.insert(key, frames.clone());
        frames
    }

    /// Builds and prints one report. After the target exited, no age cut-off applies.
    fn report(&mut self, is_final: bool, target_gone: bool) -> Result<()> {
        let older_ns = if target_gone { 0 } else { self.args.older * 1_000_000 };
        let rows = self.maps.rows(older_ns, self.args.show_allocs);
        let now = Instant::now();
        let total_bytes = rows.iter().map(|r| r.bytes).sum();
        let mut stacks = Vec::new();
        for row in rows.iter() {
            let (trend, rate) = self.trends.observe(row.key, row.bytes, now);
            if stacks.len() < self.args.top {
                stacks.push(StackReport {
                    pid: row.key.pid,
                    stack_id: (row.key.stack_id != STACK_LOST).then_some(row.key.stack_id),
                    bytes: row.bytes,
                    allocs: row.allocs,
                    trend,
                    growth_bytes_per_sec: rate,
                    frames: self.frames(row.key),
                    allocations: row.allocations.clone(),
                });
            }
        }
        let report = Report {
            time: output::now(),
            pid: self.pid,
            mode: if self.pid.is_some() { "user" } else { "kernel" },
            is_final,
            sample_rate: self.args.sample_rate,
            total_bytes,
            stacks,
            dropped: self.maps.dropped(),
        };
        if self.args.json {
            output::json_line(&report)?;
        } else {
            output::line(&render(&report, self.args.sample_rate))?;
        }
        if is_final && let Some(path) = &self.args.folded {
            let text: String = report.stacks.iter().map(|s| output::folded(&s.frames, s.bytes) + "\n").collect();
            std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
        }
        Ok(())
    }
}

fn render(report: &Report, sample_rate: u32) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let whose = match report.pid {
        Some(pid) => format!("pid {pid}"),
        None => "kernel".into(),
    };
    let sampled = if sample_rate > 1 { format!(", sampled 1 in {sample_rate}") } else { String::new() };
    let _ = writeln!(
        out,
        "[{}] {}{whose}: {} outstanding in {} stacks{sampled}",
        report.time,
        if report.is_final { "final report, " } else { "" },
        output::bytes(report.total_bytes),
        report.stacks.len()
    );
    for s in &report.stacks {
        let rate = if s.trend == "new" { String::new() } else { format!(", {:+.0} B/s", s.growth_bytes_per_sec) };
        let _ = writeln!(out, "  {} bytes in {} allocations from stack [{}{rate}]", s.bytes, s.allocs, s.trend);
        output::write_stack(&mut out, &s.frames, "      ");
        for a in s.allocations.iter().take(16) {
            let _ = writeln!(out, "      addr {:#x} size {} age {} ms", a.addr, a.size, a.age_ms);
        }
    }
    let _ = write!(out, "  {}", report.dropped);
    out
}

#[cfg(test)]
mod tests {
    use super::classify;

    #[test]
    fn tells_growth_from_a_plateau() {
        assert_eq!(classify(&[(0.0, 100)]).0, "new");
        let growing = classify(&[(0.0, 100), (1.0, 200), (2.0, 300), (3.0, 400)]);
        assert_eq!(growing.0, "growing");
        assert!((growing.1 - 100.0).abs() < 1e-9);
        assert_eq!(classify(&[(0.0, 100), (1.0, 400), (2.0, 400), (3.0, 400), (4.0, 400)]).0, "steady");
        assert_eq!(classify(&[(0.0, 400), (1.0, 300), (2.0, 300)]).0, "shrinking");
    }
}
