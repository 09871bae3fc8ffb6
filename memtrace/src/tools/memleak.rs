//! memleak: memory allocated and not freed, per stack, for processes (uprobes on their
//! allocator) or for the kernel (kmem and percpu tracepoints).

mod attach;
mod blind_spots;
mod errors;
mod inproc;
mod live;
pub(crate) mod oom;
mod procs;
mod report;
mod sampling;
mod watch;

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail};
use memtrace_common::memleak::Config;

use crate::{
    kernel,
    target::{self, Allocator},
    tools::Status,
    tools::args::{PidArg, Reports, RunArgs, Top},
    tools::registry::{Plan, ToolSpec},
    tools::tracer::{Run, Tracer},
    tracee::{Command, RunAs},
    unwind::{UnwindMode, Unwinder},
};
use attach::DutyCycle;
use live::Live;
pub use oom::HeapAtKill;
use procs::Procs;
use report::{Maps, Session};

const OBJECT: crate::kernel::Object = crate::ebpf_object!("memleak", walking_user_stacks);

pub const SPEC: ToolSpec = ToolSpec {
    names: memtrace_common::memleak::names::ALL,
    name: "memleak",
    object: OBJECT,
    modes: &[
        ("memleak", Plan::Uprobes("uprobes on the allocator (malloc, free, ...)")),
        ("memleak-kernel", Plan::Points(&[attach::KERNEL])),
    ],
    optional: &[
        attach::KERNEL_NODE[0],
        attach::KERNEL_NODE[1],
        attach::PERCPU[0],
        attach::PERCPU[1],
        attach::LIFECYCLE[0],
        attach::LIFECYCLE[1],
        attach::OOM,
    ],
};

/// Trace outstanding allocations and report them per stack.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Without -p or -c, memleak traces kernel allocations (kmalloc, kmem_cache, pages; --percpu adds percpu)."
)]
pub struct Args {
    #[command(flatten)]
    pub target: PidArg,
    /// With -p: also trace the processes it forks from now on, and theirs.
    #[arg(long, requires = "pid")]
    pub children: bool,
    /// Run this command (with its arguments, as one string) and trace it from its first
    /// instruction, through every exec, with every process it forks.
    #[arg(short = 'c', long = "command", value_name = "CMD", conflicts_with = "pid")]
    pub command: Option<String>,
    /// With -c: run the command as this user (a name or uid; `root` keeps root), with the
    /// user's groups, HOME, USER and LOGNAME. Default: the user who ran sudo (SUDO_UID,
    /// SUDO_GID) when memtrace runs as root through sudo, else memtrace's own user.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    #[command(flatten)]
    pub reports: Reports,
    #[command(flatten)]
    pub top: Top,
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
    /// Record one allocation in N, at random (lower overhead); bytes and counts are reported
    /// times N, marked as estimates.
    #[arg(short, long, default_value_t = 1, value_name = "N")]
    pub sample_rate: u32,
    /// Record allocations by bytes, as tcmalloc and jemalloc sample: one every N bytes
    /// allocated on average (a random geometric interval). Allocations left out cost no map
    /// update and no stack walk; bytes and counts are unbiased estimates, marked as such.
    #[arg(long, value_name = "N")]
    pub sample_bytes: Option<u64>,
    /// List the address and size of each outstanding allocation.
    #[arg(short = 'a', long)]
    pub show_allocs: bool,
    /// Print every allocation and free as it happens.
    #[arg(short, long)]
    pub trace: bool,
    /// The library or executable holding the allocator. Default: a jemalloc, tcmalloc,
    /// mimalloc, Hoard or snmalloc library the process has mapped (or, at an exec, preloaded or
    /// linked), else its libc, else the executable itself when statically linked. What the
    /// allocator lacks (mmap, pvalloc) is still probed in libc; `--symbols-prefix` for `je_malloc`.
    #[arg(short = 'O', long = "obj", value_name = "PATH")]
    pub obj: Option<PathBuf>,
    /// Prefix of the allocator's symbols, e.g. `je_` for a prefixed jemalloc.
    #[arg(long, default_value = "", value_name = "PREFIX")]
    pub symbols_prefix: String,
    /// With -c: probe every process with uprobes, as -p does, instead of recording in the
    /// processes themselves (memtrace's preloaded recorder, several times cheaper).
    #[arg(long, requires = "command")]
    pub uprobes: bool,
    /// Kernel mode: also trace percpu allocations.
    #[arg(long)]
    pub percpu: bool,
    #[command(flatten)]
    pub run: RunArgs,
    /// Also write the final report as folded stacks (weight: bytes) to this file, for flame graphs.
    #[arg(long, value_name = "FILE")]
    pub folded: Option<PathBuf>,
    /// Also write each report as a gzipped pprof profile (inuse_space in bytes, inuse_objects
    /// in blocks) to this file, replaced at each report, for `go tool pprof` and profile servers.
    #[arg(long, value_name = "FILE")]
    pub pprof: Option<PathBuf>,
    /// Also draw the final report as a flame graph (SVG, widths in outstanding bytes) in this file.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// Low-overhead estimate: probe malloc, calloc and realloc only PCT% of the time (free stays
    /// probed); outstanding bytes are scaled by the share of activity recorded.
    #[arg(long, value_name = "PCT", value_parser = clap::value_parser!(u32).range(1..100))]
    pub duty_cycle: Option<u32>,
    /// Length of one --duty-cycle period, in milliseconds.
    #[arg(long, default_value_t = 1000, value_name = "MS", hide = true)]
    pub duty_period_ms: u64,
    /// Capacity of the outstanding-allocation map (taken as blocks come, not reserved).
    #[arg(long, default_value_t = 2_097_152, value_name = "N")]
    pub max_allocs: u32,
    /// Capacity of the stack store and the per-stack totals map. Stored stacks take memory only
    /// when used (about 1 KiB each); a warning comes when the store passes 80%.
    #[arg(long, default_value_t = 65_536, value_name = "N")]
    pub max_stacks: u32,
    /// User mode: do not look for memory errors (double and invalid frees, realloc of a freed
    /// block), which costs a stack walk at each free.
    #[arg(long)]
    pub no_errors: bool,
    /// User mode: report memory errors only, no leaks; an allocation keeps only its call site
    /// (the stack walk at each allocation is saved, so a double free's "allocated at" is the
    /// caller alone).
    #[arg(long, conflicts_with_all = ["no_errors", "trace", "show_allocs", "folded", "pprof", "svg"])]
    pub errors_only: bool,
    /// User mode: watch for writes past the end of live blocks and into freed ones with N of
    /// the CPU's 4 hardware breakpoints (debug registers), moved to other blocks every 250 ms or so,
    /// in every thread. Under -c the processes are probed with uprobes (the blocks must be in
    /// memtrace's maps).
    #[arg(long, value_name = "N")]
    pub watch: Option<u32>,
    /// Freed blocks remembered with the stack of their free, to tell a double free (the
    /// oldest are dropped for room, and counted).
    #[arg(long, default_value_t = 65_536, value_name = "N")]
    pub freed_record: u32,
    #[command(flatten)]
    pub unwind: super::args::UnwindArgs,
}

impl Args {
    /// Whether `-c` records in the processes (the default) rather than with probes: not when
    /// probes are asked for, nor for what only probes do (another allocator library or
    /// prefix, every call traced, sampling).
    fn records_in_process(&self) -> bool {
        self.command.is_some()
            && !self.uprobes
            && self.obj.is_none()
            && self.symbols_prefix.is_empty()
            && !self.trace
            && self.sample_rate <= 1
            && self.watch.is_none()
    }

    fn sampling(&self) -> sampling::Sampling {
        sampling::Sampling::new(self.sample_rate, self.sample_bytes)
    }

    fn recorder_config(&self) -> inproc::Config {
        inproc::Config {
            max_allocs: self.max_allocs,
            max_stacks: self.max_stacks,
            rows: self.unwind.unwind_rows,
            // Sampled: no memory-error checks, as with probes (a walk at each free).
            freed: if self.no_errors || self.sample_bytes.is_some() { 0 } else { self.freed_record.into() },
            sample_bytes: self.sample_bytes.unwrap_or(0),
            call_sites: self.errors_only,
            min_size: self.min_size.unwrap_or(0),
            max_size: self.max_size.unwrap_or(u64::MAX),
            // In the process, tables work on every kernel (no bpf_loop needed).
            unwind: match self.unwind.unwind {
                UnwindMode::Fp => memtrace_common::unwind::MODE_FP,
                UnwindMode::Auto => memtrace_common::unwind::MODE_AUTO,
                UnwindMode::Dwarf => memtrace_common::unwind::MODE_DWARF,
            },
        }
    }

    /// Everything that can be checked before loading anything (and without root).
    pub fn validate(&self) -> Result<()> {
        use crate::tools::args::{MAP_ENTRIES, MAX_SECONDS, in_range};
        if let Some(pid) = self.target.pid {
            target::check_pid(pid)?;
            target::check_user_pid(pid)?;
        }
        // Not clap's `requires`: it lets `--user` through beside -p, which conflicts with -c.
        if self.user.is_some() && self.command.is_none() {
            bail!("--user names whom a command runs as: it goes with -c (memtrace memleak --user NAME -c CMD)");
        }
        if self.errors_only && self.target.pid.is_none() && self.command.is_none() {
            bail!("--errors-only goes with -p or -c: memory errors are found in user space allocators");
        }
        if self.children && self.command.is_some() {
            bail!("--children goes with -p: -c always follows every process the command starts");
        }
        if let Some(cmd) = &self.command {
            let argv = shlex::split(cmd).filter(|a| !a.is_empty() && !a[0].is_empty());
            target::find_program(&argv.context("-c needs a command, e.g. -c \"./prog arg\"")?[0])?;
            RunAs::choose(self.user.as_deref())?;
        }
        if let Some(obj) = &self.obj {
            target::check_elf(obj)?;
        }
        self.reports.validate()?;
        self.top.validate()?;
        in_range("-o/--older", self.older, 0..=MAX_SECONDS * 1000)?;
        if let (Some(min), Some(max)) = (self.min_size, self.max_size)
            && min > max
        {
            bail!("-z/--min-size ({min}) is larger than -Z/--max-size ({max}): no allocation would be counted");
        }
        if self.sample_rate == 0 {
            bail!("--sample-rate must be at least 1");
        }
        if let Some(n) = self.sample_bytes {
            if self.sample_rate != 1 {
                bail!("--sample-bytes and -s/--sample-rate are two ways to sample: give one of them");
            }
            in_range("--sample-bytes", n, 1..=1 << 40)?;
            if self.errors_only || self.watch.is_some() {
                bail!("--sample-bytes samples leaks: memory errors (--errors-only, --watch) need every block recorded");
            }
        }
        let user = self.target.pid.is_some() || self.command.is_some();
        if self.percpu && user {
            bail!("--percpu applies to kernel mode (without -p or -c): percpu memory is the kernel's");
        }
        if self.duty_cycle.is_some() && (self.target.pid.is_none() || self.children) {
            bail!("--duty-cycle works with -p PID alone (not with -c, --children or kernel mode)");
        }
        in_range("--duty-period-ms", self.duty_period_ms, 10..=3_600_000)?;
        if let Some(n) = self.watch {
            in_range("--watch", n.into(), 1..=4)?;
            if !user {
                bail!("--watch watches a process's blocks (with -p or -c): the kernel's are not watched");
            }
            if self.no_errors {
                bail!("--watch needs the record of freed blocks that --no-errors turns off");
            }
        }
        if let Some(secs) = self.run.duration {
            in_range("-d/--duration", secs, 1..=MAX_SECONDS)?;
        }
        in_range("--max-allocs", self.max_allocs.into(), MAP_ENTRIES)?;
        in_range("--max-stacks", self.max_stacks.into(), MAP_ENTRIES)?;
        in_range("--freed-record", self.freed_record.into(), MAP_ENTRIES)?;
        self.unwind.validate()?;
        if let Some(path) = &self.folded {
            crate::output::check_writable("--folded", path)?;
        }
        if let Some(path) = &self.pprof {
            crate::output::check_writable("--pprof", path)?;
        }
        if let Some(path) = &self.svg {
            crate::output::check_writable("--svg", path)?;
        }
        Ok(())
    }
}

/// Where the report's numbers come from.
enum Mode {
    /// Processes, through uprobes on their allocator: a running one (`-p`), or a command
    /// memtrace starts and follows (`-c`).
    Pid(u32, Allocator),
    /// The command, the in-process recorder preloaded into it unless probes were asked, and
    /// the user it runs as when not root.
    Command(Command, Option<inproc::Shim>, Option<RunAs>),
    Kernel,
}

/// Where `run_keeping` sends the heap of each traced process the OOM killer chooses, at its
/// kill (what `serve` keeps after the process is gone).
pub type KillSink = tokio::sync::mpsc::UnboundedSender<HeapAtKill>;

pub async fn run(args: Args) -> Result<Status> {
    run_keeping(args, None).await
}

/// `run`, also sending each heap at an OOM kill to `kills` once it is reported.
#[allow(dead_code, reason = "for `memtrace serve`, which keeps the heaps; the CLI reports them only")]
pub async fn run_keeping(args: Args, kills: Option<KillSink>) -> Result<Status> {
    kernel::require_root()?;
    if args.watch.is_some() {
        watch::available()?;
    }
    // Before anything is attached: a Ctrl-C from here on ends with a final report.
    let signals = crate::tools::Signals::catch()?;
    let mode = match (&args.command, args.target.pid) {
        (Some(cmd), _) => {
            let argv =
                shlex::split(cmd).filter(|a| !a.is_empty()).context("-c needs a command, e.g. -c \"./prog arg\"")?;
            let shim = match args.records_in_process().then(inproc::Shim::install) {
                Some(Err(e)) => {
                    // A read-only /run costs speed, not answers: probes see the same calls.
                    eprintln!("memtrace: memleak: cannot set up the in-process recorder ({e:#}): probing with uprobes");
                    None
                }
                shim => shim.transpose()?,
            };
            let env = shim.as_ref().map(|s| s.env(&args.recorder_config())).unwrap_or_default();
            let user = RunAs::choose(args.user.as_deref())?;
            Mode::Command(Command::spawn(&argv, &env, user.as_ref())?, shim, user)
        }
        (None, Some(pid)) => {
            target::check_pid(pid)?;
            Mode::Pid(pid, with_obj(target::allocator_of_pid(pid)?, args.obj.as_ref())?)
        }
        (None, None) => Mode::Kernel,
    };
    let user = !matches!(mode, Mode::Kernel);
    let own_pid_ns = kernel::pidns::in_own_namespace();
    if args.children && own_pid_ns {
        bail!(
            "--children needs memtrace in the host's pid namespace (in its own, the kernel names new children by pids it cannot see): start the command with -c instead"
        );
    }

    // A sampled run checks no memory errors: most frees are of blocks it left out, and the
    // unsampled path stays cheap (no stack walk at each free).
    let checks_errors = user && !args.no_errors && !args.sampling().is_sampled();
    let config = Config {
        min_size: args.min_size.unwrap_or(0),
        max_size: args.max_size.unwrap_or(u64::MAX),
        sample_rate: args.sample_rate,
        trace: args.trace as u32,
        duty: args.duty_cycle.is_some() as u32,
        // In a pid namespace of its own, memtrace learns of a command's children through
        // ptrace only (the fork tracepoint names them by pids it cannot see).
        children: (args.children || (args.command.is_some() && !own_pid_ns)) as u32,
        errors: checks_errors as u32,
        // Only a command is seen from its first allocation, and only if nothing is left out.
        judge_invalid: (args.command.is_some()
            && !args.sampling().is_sampled()
            && args.min_size.is_none()
            && args.max_size.is_none()
            && args.duty_cycle.is_none()) as u32,
        call_sites: (user && args.errors_only) as u32,
        watch: args.watch.is_some() as u32,
        sample_bytes: args.sample_bytes.unwrap_or(0),
    };
    let kmem = if user { None } else { Some(attach::kmem_offsets()?) };
    // Kernel mode walks no user stack.
    let unwind = if user { args.unwind.mode() } else { UnwindMode::Fp };
    let fork = if user { Some(attach::fork_offsets()?) } else { None };
    let exec = if user { Some(attach::exec_offsets()?) } else { None };
    let oom = if user { attach::oom_offsets() } else { None };
    let mut tracer = Tracer::load_caught(&SPEC, signals, |loader| {
        loader
            .override_global(memtrace_common::memleak::names::CONFIG, &config, true)
            .map_max_entries(memtrace_common::memleak::names::ALLOCS, args.max_allocs)
            .map_max_entries(memtrace_common::memleak::names::SEEN, args.max_stacks)
            .map_max_entries(memtrace_common::memleak::names::STACKS, args.max_stacks)
            .map_max_entries(memtrace_common::memleak::names::FREED, if checks_errors { args.freed_record } else { 1 });
        args.unwind.configure_as(loader, unwind);
        if let Some(k) = &kmem {
            loader.override_global(memtrace_common::memleak::names::KMEM, k, true);
        }
        if let Some(f) = &fork {
            loader.override_global(memtrace_common::memleak::names::FORK, f, true);
        }
        if let Some(e) = &exec {
            loader.override_global(memtrace_common::memleak::names::EXEC, e, true);
        }
        if let Some(o) = &oom {
            loader.override_global(memtrace_common::memleak::names::OOM, o, true);
        }
    })?;
    if let Some(n) = args.sample_bytes {
        // Borrowed, not taken: a map taken and dropped before its programs load closes the fd they refer to.
        let name = memtrace_common::memleak::names::SAMPLE_INTERVALS;
        let map = tracer.bpf.map_mut(name).with_context(|| format!("internal: no map {name} in memleak"))?;
        sampling::fill(&mut aya::maps::Array::try_from(map)?, n)?;
    }
    let skip = if args.duty_cycle.is_some() { DutyCycle::HOT } else { &[] };
    let mut procs = Procs::new(&mut tracer, &args.symbols_prefix, args.obj.clone(), skip)?;
    let maps = Maps::take(&mut tracer)?;
    let watcher = match args.watch {
        Some(n) => Some(watch::Watcher::new(&mut tracer, n)?),
        None => None,
    };
    let mut unwinder = Unwinder::take(&mut tracer.bpf, unwind)?;
    let mut duty = None;
    let mut command = None;
    let mut user_sym = crate::symbolize::UserSymbolizer::new();
    let (root, ready) = match mode {
        Mode::Pid(pid, alloc) => {
            let obj = alloc.primary.clone();
            attach::lifecycle(&mut tracer.bpf)?;
            unwinder.load(pid);
            let probes = procs.start(&mut tracer.bpf, pid, alloc)?;
            if let Some(pct) = args.duty_cycle {
                let period = Duration::from_millis(args.duty_period_ms.max(10));
                let window = tracer.map(memtrace_common::memleak::names::WINDOW)?;
                let mut cycle = DutyCycle::new(obj.clone(), &args.symbols_prefix, pid, window, pct, period);
                cycle.open(&mut tracer.bpf)?;
                duty = Some(cycle);
            }
            let sampled =
                args.duty_cycle.map(|p| format!(", malloc/calloc/realloc {p}% of the time")).unwrap_or_default();
            let children = if args.children { " and the processes it forks" } else { "" };
            let line = format!(
                "tracing pid {pid} ({}){children} through {} with {probes} probes{sampled}",
                target::comm(pid),
                obj.display()
            );
            // A map of the process while it surely lives, before anyone is told to go on: a
            // target that allocates and exits at once still gets named frames.
            let _ = user_sym.refresh(pid);
            (Some(pid), line)
        }
        Mode::Command(cmd, shim, user) => {
            // Probes go in at the command's first exec, when its program is known.
            attach::lifecycle(&mut tracer.bpf)?;
            procs.begin_command(cmd.pid)?;
            if let Some(shim) = shim {
                procs.record_in_process(shim);
            }
            let line = format!(
                "running {} (pid {}){} and following its processes",
                args.command.as_deref().unwrap_or_default(),
                cmd.pid,
                user.map(|u| format!(" as {}", u.describe())).unwrap_or_default()
            );
            let pid = cmd.pid;
            command = Some(cmd);
            (Some(pid), line)
        }
        Mode::Kernel => {
            let attached = attach::kernel(&mut tracer.bpf, args.percpu)?;
            (None, format!("tracing kernel allocations ({})", attached.join(", ")))
        }
    };
    let mut session = Session::new(&args, root, maps, unwinder, user_sym)?;
    session.watch = watcher;
    let mut live = Live::new(procs, session, command, duty, root, own_pid_ns, args.reports.count())?;
    live.keep_kills(kills);
    let run = Run {
        duration: args.run.duration,
        // Exits are memleak's own news (`Live`): a command's, or each followed process's.
        watch: None,
        ready_pid: root,
        tick: Some(args.reports.every_or(5)),
        max_ticks: args.reports.count(),
        ready: &ready,
    };
    tracer.run(run, &mut live).await?;
    // With a command, its status as it ended: its exit code, or 128 + the signal that ended it.
    Ok(Status(live.ending.status.map_or(0, |code| code as u8)))
}

/// `-O` replaces the detected allocator; the detected libc still serves what it lacks.
pub(super) fn with_obj(detected: Allocator, obj: Option<&PathBuf>) -> Result<Allocator> {
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
