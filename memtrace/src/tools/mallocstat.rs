//! mallocstat: glibc's own account of its allocator, from its `libc:memory_*` USDT probes: new
//! heaps and arenas, heap and sbrk growth and shrinking with their sizes, counted per interval
//! with the user stacks of heap growth; mallopt tunables, allocation retries and tcache double
//! frees each as it happens. The probes are looked for in the libc the process maps and in its
//! executable. Debian builds glibc without them: mallocstat then says so and stops.

use std::{collections::BTreeMap, fmt::Write as _, path::PathBuf};

use anyhow::{Result, bail};
use aya::maps::{HashMap, MapData};
use memtrace_common::{
    mallocstat::{Event, STAT_NO_SPEC, STAT_STACK_COLLISION, STAT_STACK_LOST, WITH_STACK},
    names,
    usdt::{SPECS, Spec},
};
use serde::Serialize;

use crate::{
    kernel::{
        self,
        usdt::{self as usdt_notes, UsdtProbe},
    },
    output,
    symbolize::Frame,
    target,
    tools::{
        Ctx, End, Flow, Stream,
        args::StackReportArgs,
        c_str, read_event,
        registry::{Plan, ToolSpec},
        stack_report::{ShowsFrames, StackReport, StackRun},
        stacks,
        tracer::{Run, Tracer},
    },
    tracee::{Command, CommandEvent},
    unwind::Unwinder,
};

const OBJECT: crate::kernel::Object = crate::ebpf_object!("mallocstat", walking_user_stacks);

pub const SPEC: ToolSpec = ToolSpec {
    name: "mallocstat",
    object: OBJECT,
    modes: &[(
        "mallocstat",
        Plan::Usdt {
            label: "uprobes on glibc's libc:memory_* USDT probes",
            prog: PROG,
            provider: PROVIDER,
            prefix: PREFIX,
        },
    )],
    optional: &[],
};

/// The program attached to every probe.
const PROG: &str = "mallocstat_hit";
const PROVIDER: &str = "libc";
const PREFIX: &str = "memory_";

/// What a probe's hits mean, by its name (glibc's manual/probes.texi).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Meaning {
    /// Argument `.0` is an amount of bytes: summed (sbrk growth, a new heap's size).
    Bytes(usize),
    /// Argument `.0` is a heap's size after the change: the last one is kept.
    Size(usize),
    /// Printed as it happens, with its arguments (tunables, retries, double frees).
    Event,
    /// Counted only.
    Count,
}

/// (name, meaning, whether a hit takes the user stack) of the probes glibc 2.26-2.40 declares.
const KNOWN: &[(&str, Meaning, bool)] = &[
    ("memory_sbrk_more", Meaning::Bytes(1), true),
    ("memory_sbrk_less", Meaning::Bytes(1), false),
    ("memory_heap_new", Meaning::Bytes(1), true),
    ("memory_heap_free", Meaning::Bytes(1), false),
    ("memory_heap_more", Meaning::Size(1), true),
    ("memory_heap_less", Meaning::Size(1), false),
    ("memory_arena_new", Meaning::Bytes(1), true),
    ("memory_arena_reuse", Meaning::Count, false),
    ("memory_arena_reuse_free_list", Meaning::Count, false),
    ("memory_arena_reuse_wait", Meaning::Count, false),
];

fn meaning(name: &str) -> (Meaning, bool) {
    if let Some((_, m, stack)) = KNOWN.iter().find(|(n, ..)| *n == name) {
        return (*m, *stack);
    }
    // Tunables, retries and tcache double frees: rare, and each worth seeing.
    let events = ["memory_mallopt", "memory_tunable_", "_retry", "memory_tcache_double_free"];
    if events.iter().any(|e| name.starts_with(e) || name.ends_with(e)) {
        (Meaning::Event, false)
    } else {
        (Meaning::Count, false)
    }
}

/// Count glibc's allocator events (libc:memory_* USDT probes) of one process.
#[derive(clap::Args, Debug)]
#[command(after_help = "Needs a glibc built with its USDT probes (Ubuntu's, Fedora's; not Debian's). \
                        Interval reports count the hits since the previous report; the final one, \
                        the whole run. Stacks are those of heap growth (sbrk, new heaps and arenas).")]
pub struct Args {
    #[command(flatten)]
    pub report: StackReportArgs,
    /// Run this command and trace its first process (instead of -p).
    #[arg(short = 'c', long = "command", value_name = "CMD", conflicts_with = "pid")]
    pub command: Option<String>,
}

impl Args {
    pub fn validate(&self) -> Result<()> {
        self.report.validate()?;
        if self.report.common.target.pid.is_none() && self.command.is_none() {
            bail!("mallocstat needs -p PID or -c CMD: the probes are in the libc that process maps");
        }
        if let Some(cmd) = &self.command {
            argv(cmd)?;
        }
        self.report.common.validate_user_target()
    }
}

fn argv(cmd: &str) -> Result<Vec<String>> {
    shlex::split(cmd)
        .filter(|a| !a.is_empty() && !a[0].is_empty())
        .ok_or_else(|| anyhow::anyhow!("-c needs a command, e.g. -c \"./prog arg\""))
}

/// The `libc:memory_*` probes of `pid`'s libc and executable, with the file of each; the
/// libc looked at is named when neither has any.
fn find_probes(pid: u32, just_exec: bool) -> Result<Vec<(PathBuf, UsdtProbe)>> {
    // Right after an exec the loader has mapped no library yet: the one it will map.
    let alloc = if just_exec { target::allocator_after_exec(pid)? } else { target::allocator_of_pid(pid)? };
    let libc = alloc.libc.clone().unwrap_or(alloc.primary.clone());
    let exe = crate::procfs::exe(pid)?;
    let mut found = Vec::new();
    for file in [&libc, &exe] {
        let probes = usdt_notes::probes_named(file, PROVIDER, PREFIX)?;
        found.extend(probes.into_iter().map(|p| (file.clone(), p)));
    }
    if found.is_empty() {
        bail!("{}: mallocstat cannot see this process's allocator", usdt_notes::missing(&libc, PROVIDER, PREFIX));
    }
    Ok(found)
}

pub async fn run(args: Args) -> Result<()> {
    kernel::require_root()?;
    // A command is held right after its exec, until its probes are in.
    let (pid, mut command, exec_ack) = match &args.command {
        Some(cmd) => {
            let mut command = Command::spawn(&argv(cmd)?, &[], None)?;
            match command.events.recv().await {
                Some(CommandEvent::Exec { pid, ack, .. }) => (pid, Some(command), Some(ack)),
                _ => bail!("{cmd}: the command ended before it ran"),
            }
        }
        None => (args.report.common.target.pid.expect("validated"), None, None),
    };
    let started = start(&args, pid, command.is_some()).await;
    let (mut tracer, mut state) = match started {
        Ok(started) => started,
        Err(e) => {
            if let Some(c) = &command {
                c.signal(libc::SIGKILL);
            }
            return Err(e);
        }
    };
    drop(exec_ack);
    state.command = command.take();
    let ready = format!("tracing {} libc:memory_* probes of pid {pid} ({})", state.names.len(), target::comm(pid));
    let watch = state.command.is_none().then_some(pid);
    let run = Run {
        duration: args.report.common.run.duration,
        watch,
        ready_pid: Some(pid),
        tick: args.report.reports.every(),
        max_ticks: args.report.reports.count(),
        ready: &ready,
    };
    tracer.run(run, &mut state).await?;
    Ok(())
}

/// Loads the object and attaches to every probe of `pid`; the probes of a library not mapped
/// yet get their addresses when it is (`State::mapped`).
async fn start(args: &Args, pid: u32, just_exec: bool) -> Result<(Tracer, State)> {
    let probes = find_probes(pid, just_exec)?;
    let filter = memtrace_common::Filter { pid, ..memtrace_common::Filter::ALL };
    let mut tracer = Tracer::load(&SPEC, |loader| {
        loader.override_global(names::FILTER, &filter, true).map_max_entries("STACKS", args.report.max_stacks);
        args.report.unwind.configure(loader);
    })?;
    let specs: HashMap<MapData, u64, Spec> = tracer.map(SPECS)?;
    // The process traced, however it was given: what the unwinder loads and the report names.
    let mut report = args.report.clone();
    report.common.target.pid = Some(pid);
    let unwinder = Unwinder::start(&mut tracer.bpf, &report.unwind, &report.common)?;
    for (file, p) in &probes {
        usdt_notes::attach(&mut tracer.bpf, PROG, file, p, Some(pid))?;
    }
    let header = format!("{:>7} {:>7} {:<16} {:<36} ARGUMENTS", "PID", "TID", "COMM", "PROBE");
    let run = StackRun::new(&mut tracer, &report, unwinder, false, header)?;
    let names = probes.iter().map(|(_, p)| p.name.clone()).collect();
    let mut state = State {
        run,
        names,
        interval: BTreeMap::new(),
        total: BTreeMap::new(),
        stacks: BTreeMap::new(),
        pid,
        specs,
        unplaced: probes.into_iter().enumerate().map(|(id, (file, p))| (id as u32, file, p)).collect(),
        command: None,
    };
    state.place()?;
    Ok((tracer, state))
}

/// Hits of one probe.
#[derive(Serialize, Clone, Default)]
struct Hits {
    hits: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes: Option<u64>,
    /// The heap's size after its last change.
    #[serde(skip_serializing_if = "Option::is_none")]
    last_size: Option<u64>,
}

impl Hits {
    fn add(&mut self, meaning: Meaning, args: &[i64]) {
        self.hits += 1;
        match meaning {
            Meaning::Bytes(i) => *self.bytes.get_or_insert(0) += args[i] as u64,
            Meaning::Size(i) => self.last_size = Some(args[i] as u64),
            Meaning::Event | Meaning::Count => {}
        }
    }
}

struct State {
    run: StackRun,
    /// Probe names by id.
    names: Vec<String>,
    interval: BTreeMap<String, Hits>,
    total: BTreeMap<String, Hits>,
    /// (pid, probe, stack id) of heap growth, with its hits and comm.
    stacks: BTreeMap<(u32, String, u64), (Hits, [u8; 16])>,
    pid: u32,
    /// Each probe's spec by its address in the process, for the eBPF side.
    specs: HashMap<MapData, u64, Spec>,
    /// Probes (id, file, probe) whose file the process has not mapped yet.
    unplaced: Vec<(u32, PathBuf, UsdtProbe)>,
    /// The command of -c, held at each mapping of new code until its probes are placed.
    command: Option<Command>,
}

impl State {
    /// Gives the eBPF side the spec of each probe whose file the process maps now.
    fn place(&mut self) -> Result<()> {
        let mut left = Vec::new();
        for (id, file, p) in std::mem::take(&mut self.unplaced) {
            match usdt_notes::address_in(self.pid, &file, &p) {
                Ok(address) => {
                    let mut spec = p.spec(id)?;
                    if meaning(&p.name).1 {
                        spec.id |= WITH_STACK;
                    }
                    self.specs.insert(address, spec, 0)?;
                }
                Err(_) => left.push((id, file, p)),
            }
        }
        self.unplaced = left;
        Ok(())
    }
}

#[derive(Serialize)]
struct Counts<'a> {
    hits: u64,
    probes: &'a BTreeMap<String, Hits>,
}

#[derive(Serialize)]
struct StackRow {
    pid: u32,
    comm: String,
    probe: String,
    #[serde(flatten)]
    hits: Hits,
    stack_id: Option<String>,
    frames: Vec<Frame>,
}

impl ShowsFrames for StackRow {
    fn shown_frames(&self) -> impl Iterator<Item = &Frame> {
        self.frames.iter()
    }
}

#[derive(Serialize)]
struct Spots {
    /// Hits at an address without a spec: a probe the process mapped elsewhere.
    unknown_sites: u64,
}

#[derive(Serialize)]
struct HitEvent<'a> {
    event: &'a str,
    pid: u32,
    tid: u32,
    comm: String,
    probe: &'a str,
    args: &'a [i64],
}

impl Stream for State {
    type Side = Option<CommandEvent>;

    fn unwinder(&mut self) -> Option<&mut Unwinder> {
        self.run.stacks.unwinder.as_mut()
    }

    async fn side(&mut self) -> Option<CommandEvent> {
        match &mut self.command {
            Some(c) => c.events.recv().await,
            None => std::future::pending().await,
        }
    }

    fn on_side(&mut self, _ctx: &mut Ctx<'_>, event: Option<CommandEvent>) -> Result<Flow> {
        match event {
            Some(CommandEvent::Mapped { ack, .. }) => {
                // Held until its probes are placed and its tables loaded: none of the new code
                // has run.
                self.place()?;
                if let Some(unwinder) = self.run.stacks.unwinder.as_mut() {
                    unwinder.load(self.pid);
                }
                let _ = ack.send(());
            }
            Some(CommandEvent::Exec { ack, .. })
            | Some(CommandEvent::Fork { ack, .. })
            | Some(CommandEvent::Exiting { ack, .. }) => {
                let _ = ack.send(());
            }
            Some(CommandEvent::Exited { pid, .. }) if pid == self.pid => {
                eprintln!("memtrace: mallocstat: process {pid} exited");
            }
            Some(CommandEvent::Exited { .. }) | Some(CommandEvent::PtraceRefused { .. }) => {}
            Some(CommandEvent::Done) | None => return Ok(Flow::Done),
        }
        Ok(Flow::Go)
    }

    fn stopping(&mut self, _ctx: &mut Ctx<'_>, _why: End) -> Result<bool> {
        // The command cannot go on without memtrace (its seccomp filter needs a tracer).
        if let Some(c) = &self.command {
            c.signal(libc::SIGKILL);
        }
        Ok(true)
    }

    fn tick(&mut self) -> Result<()> {
        self.report(false)?;
        self.run.stacks.forget_exited();
        Ok(())
    }

    fn finish(&mut self, lost: u64) -> Result<()> {
        self.run.set_lost(lost);
        self.report(true)
    }

    fn event(&mut self, data: &[u8]) -> Result<()> {
        let Some(e) = read_event::<Event>(data) else { return Ok(()) };
        let Some(name) = self.names.get(e.id as usize).cloned() else { return Ok(()) };
        let (meaning, stack) = meaning(&name);
        self.interval.entry(name.clone()).or_default().add(meaning, &e.args);
        self.total.entry(name.clone()).or_default().add(meaning, &e.args);
        if stack {
            // Symbolized while the process lives; reports use the cached frames.
            self.run.stacks.user(e.pid, e.stack_id, false);
            let row = self.stacks.entry((e.pid, name.clone(), e.stack_id)).or_insert((Hits::default(), e.comm));
            row.0.add(meaning, &e.args);
        }
        if meaning == Meaning::Event {
            let comm = c_str(&e.comm);
            let args = &e.args[..(e.count as usize).min(e.args.len())];
            let value = || HitEvent { event: "probe", pid: e.pid, tid: e.tid, comm: comm.clone(), probe: &name, args };
            let shown: Vec<String> = args.iter().map(i64::to_string).collect();
            let row = || format!("{:>7} {:>7} {:<16} {:<36} {}", e.pid, e.tid, comm, name, shown.join(" "));
            self.run.events.record(0, value, row)?;
        }
        Ok(())
    }
}

impl State {
    fn report(&mut self, is_final: bool) -> Result<()> {
        let counts = if is_final { &self.total } else { &self.interval };
        let counts = Counts { hits: counts.values().map(|h| h.hits).sum(), probes: counts };
        let mut rows: Vec<_> = self.stacks.iter().collect();
        rows.sort_by(|a, b| b.1.0.hits.cmp(&a.1.0.hits).then_with(|| a.0.cmp(b.0)));
        let shown = self.run.shown(is_final);
        let stack_rows: Vec<StackRow> = rows
            .iter()
            .take(shown)
            .map(|((pid, probe, id), (hits, comm))| StackRow {
                pid: *pid,
                comm: c_str(comm),
                probe: probe.clone(),
                hits: hits.clone(),
                stack_id: stacks::id_json(*id),
                frames: self.run.stacks.user(*pid, *id, false),
            })
            .collect();
        if let Some(path) = self.run.folded(is_final) {
            let folded =
                stack_rows.iter().map(|s| (output::process_root(s.pid, &s.comm), s.frames.as_slice(), s.hits.hits));
            stacks::write_folded(path, folded)?;
        }
        let run = &self.run;
        let stacks_lost = run.stat(STAT_STACK_LOST) + run.stat(STAT_STACK_COLLISION);
        let spots = Spots { unknown_sites: run.stat(STAT_NO_SPEC) };
        run.report(is_final, counts, stack_rows, stacks_lost, spots, render)?;
        self.interval.clear();
        Ok(())
    }
}

fn render(r: &StackReport<Counts<'_>, StackRow, Spots>) -> String {
    let mut out = format!("{}{} libc:memory_* probe hits\n", r.title(), r.counts.hits);
    if !r.counts.probes.is_empty() {
        let _ = writeln!(out, "  {:<36} {:>8} {:>12} {:>12}", "PROBE", "HITS", "BYTES", "LAST SIZE");
    }
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    for (name, h) in r.counts.probes {
        let _ = writeln!(out, "  {name:<36} {:>8} {:>12} {:>12}", h.hits, opt(h.bytes), opt(h.last_size));
    }
    for s in &r.stacks {
        let bytes = s.hits.bytes.map(|b| format!(", {b} bytes")).unwrap_or_default();
        let _ = writeln!(out, "  {} x {}{bytes}: pid {} ({})", s.hits.hits, s.probe, s.pid, s.comm);
        output::write_stack(&mut out, &s.frames, "      ");
    }
    let (store_full, store) = r.store_full();
    out += &r.blind_spots(&[
        (r.stacks_lost, "heap growths without a stack"),
        (store_full, &store),
        (r.spots.unknown_sites, "hits at probe sites not set up"),
    ]);
    out
}
