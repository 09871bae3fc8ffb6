//! mallocstat: glibc's own account of its allocator, from its `libc:memory_*` USDT probes: new
//! heaps and arenas, heap and sbrk growth and shrinking with their sizes, counted per interval
//! with the user stacks of heap growth; mallopt tunables, allocation retries and tcache double
//! frees each as it happens. The probes are looked for in the libc the process maps and in its
//! executable. Debian builds glibc without them: mallocstat then says so and stops.

mod report;

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::{Result, bail};
use aya::maps::{HashMap, MapData};
use memtrace_common::{
    mallocstat::{Event, WITH_STACK},
    names,
    names::USDT_SPECS as SPECS,
    usdt::Spec,
};
use report::{HitEvent, Hits, Meaning, meaning};

use crate::{
    kernel::{
        self,
        cgroup::{Attribution, MemcgPaths},
        usdt::{self as usdt_notes, UsdtProbe},
    },
    target,
    tools::{
        Ctx, End, Flow, Stream,
        args::StackReportArgs,
        c_str, read_event,
        registry::{Plan, ToolSpec},
        stack_report::StackRun,
        tracer::{Run, Tracer},
    },
    tracee::{Command, CommandEvent},
    unwind::Unwinder,
};

const OBJECT: crate::kernel::Object = crate::ebpf_object!("mallocstat", walking_user_stacks);

pub const SPEC: ToolSpec = ToolSpec {
    names: memtrace_common::mallocstat::names::ALL,
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
/// yet get their addresses when it is (`Live::mapped`).
async fn start(args: &Args, pid: u32, just_exec: bool) -> Result<(Tracer, Live)> {
    let probes = find_probes(pid, just_exec)?;
    let filter = memtrace_common::Filter { pid, ..memtrace_common::Filter::ALL };
    let mut tracer = Tracer::load(&SPEC, |loader| {
        loader.override_global(names::FILTER, &filter, true).map_max_entries(names::STACKS, args.report.max_stacks);
        args.report.unwind.configure(loader);
    })?;
    let specs: HashMap<MapData, u64, Spec> = tracer.map(SPECS)?;
    // The process traced, however it was given: what the unwinder loads and the report names.
    let mut report = args.report.clone();
    report.common.target.pid = Some(pid);
    let unwinder = report.unwind.start(&mut tracer.bpf, &report.common)?;
    for (file, p) in &probes {
        usdt_notes::attach(&mut tracer.bpf, PROG, file, p, Some(pid))?;
    }
    let header = format!("{:>7} {:>7} {:<16} {:<14} {:<36} ARGUMENTS", "PID", "TID", "COMM", "CGROUP", "PROBE");
    let run = StackRun::new(&mut tracer, &report, unwinder, false, header)?;
    let names = probes.iter().map(|(_, p)| p.name.clone()).collect();
    let mut state = Live {
        run,
        names,
        interval: BTreeMap::new(),
        total: BTreeMap::new(),
        stacks: BTreeMap::new(),
        pid,
        specs,
        unplaced: probes.into_iter().enumerate().map(|(id, (file, p))| (id as u32, file, p)).collect(),
        command: None,
        cgroups: MemcgPaths::new(),
        cgroup: Attribution::default(),
    };
    state.cgroup(pid);
    state.place()?;
    Ok((tracer, state))
}

struct Live {
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
    /// The traced process's memory cgroup, from /proc: as last read while it ran.
    cgroups: MemcgPaths,
    cgroup: Attribution,
}

impl Live {
    /// The memory cgroup of the traced process (one process: its last reading stands once
    /// it has exited).
    fn cgroup(&mut self, pid: u32) -> Attribution {
        if let Some(path) = self.cgroups.of_pid(pid) {
            self.cgroup = Attribution::of_path(Some(path));
        }
        self.cgroup.clone()
    }

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

impl Stream for Live {
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
            let cgroup = self.cgroup(e.pid);
            let value = || HitEvent {
                event: "probe",
                pid: e.pid,
                tid: e.tid,
                comm: comm.clone(),
                probe: &name,
                args,
                cgroup: &cgroup,
            };
            let shown: Vec<String> = args.iter().map(i64::to_string).collect();
            let row = || {
                format!(
                    "{:>7} {:>7} {:<16} {:<14} {:<36} {}",
                    e.pid,
                    e.tid,
                    comm,
                    cgroup.short(),
                    name,
                    shown.join(" ")
                )
            };
            self.run.events.record(0, value, row)?;
        }
        Ok(())
    }
}
