//! Real programs nobody here wrote (sqlite3, jq, redis-server), each untraced, under memleak
//! (-c, -c --uprobes when memtrace has that flag, -p), under heaptrack and under bcc's
//! memleak: the time each tracer adds, the ratios between tracers, and memtrace's outstanding
//! bytes at exit beside heaptrack's leaked total.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::{Check, Tracer, finish_tracer, median, ratio, start_tracer, stats, which};
use crate::cmd;

/// sqlite3 inserts this many rows into `:memory:`, one INSERT each, in one transaction
/// (about 20 allocator calls per row).
const SQLITE_ROWS: u64 = 50_000;
/// jq reads an array of this many small objects (about 5 MB).
const JQ_OBJECTS: u64 = 100_000;
const JQ_FILTER: &str = "[.[] | {a: .x, b: (.y|tostring)}] | length";
/// redis-benchmark's tests: (name as printed, `-t` test, requests per run, with --quick).
const REDIS_TESTS: &[(&str, &str, u64, u64)] = &[("SET", "set", 30_000, 10_000), ("MSET", "mset", 6_000, 2_000)];
/// bcc's memleak reports every second and never exits on its own: after the program ends it
/// gets this long for a last report, then SIGINT.
const BCC_LAST_REPORT: Duration = Duration::from_millis(1500);

/// How a program is run.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Mode {
    Untraced,
    /// `memtrace memleak --json ARGS -c CMD`.
    MemtraceC(&'static [&'static str]),
    /// `memtrace memleak -p PID`, attached before the program runs (a batch program waits in a
    /// shell that then execs it) or once it serves (redis).
    MemtraceP,
    /// `heaptrack -o FILE CMD`.
    Heaptrack,
    /// bcc's `memleak-bpfcc -p PID`, attached as memtrace's -p is.
    Bcc,
}

impl Mode {
    /// The name ratios and other programs use for this mode's row.
    pub(super) fn key(self) -> &'static str {
        match self {
            Mode::Untraced => "untraced",
            Mode::MemtraceC([]) => "memtrace_c",
            Mode::MemtraceC(["--no-errors"]) => "memtrace_c_no_errors",
            Mode::MemtraceC(["--errors-only"]) => "memtrace_c_errors_only",
            Mode::MemtraceC(["--watch", "4"]) => "memtrace_c_watch",
            Mode::MemtraceC(["--uprobes", "--no-errors"]) => "memtrace_c_uprobes_no_errors",
            Mode::MemtraceC(["--sample-bytes", "524288"]) => "memtrace_c_sample_512k",
            Mode::MemtraceC(["--sample-bytes", "65536"]) => "memtrace_c_sample_64k",
            Mode::MemtraceC(_) => "memtrace_c_uprobes",
            Mode::MemtraceP => "memtrace_p",
            Mode::Heaptrack => "heaptrack",
            Mode::Bcc => "bcc",
        }
    }

    pub(super) fn label(self, server: bool) -> String {
        let when = if server { "once it serves" } else { "before it runs" };
        match self {
            Mode::Untraced => "untraced".into(),
            Mode::MemtraceC(args) => {
                ["memtrace memleak -c"].into_iter().chain(args.iter().copied()).collect::<Vec<_>>().join(" ")
            }
            Mode::MemtraceP => format!("memtrace memleak -p PID, attached {when}"),
            Mode::Heaptrack => "heaptrack -o FILE CMD".into(),
            Mode::Bcc => format!("bcc memleak-bpfcc -p PID, attached {when}"),
        }
    }

    fn memtrace(self) -> bool {
        matches!(self, Mode::MemtraceC(_) | Mode::MemtraceP)
    }
}

/// memleak's `-c` by uprobes, kept beside the in-process recorder that became `-c`'s default.
const UPROBES: Mode = Mode::MemtraceC(&["--uprobes"]);

/// memleak's `-c` without its memory-error checks (a stack walk at each free): what they cost.
const NO_ERRORS: Mode = Mode::MemtraceC(&["--no-errors"]);

/// memleak's `-c` looking for memory errors only: no stack walked at allocations.
const ERRORS_ONLY: Mode = Mode::MemtraceC(&["--errors-only"]);

/// memleak's `-c` with four watchpoints moving over the blocks: what watching costs (its
/// probes are uprobes, so compare it with the `--uprobes` row).
const WATCH: Mode = Mode::MemtraceC(&["--watch", "4"]);

pub(super) struct Env {
    pub(super) memtrace: PathBuf,
    /// Generated inputs and heaptrack's files.
    pub(super) dir: PathBuf,
    /// memtrace has `memleak --uprobes`.
    pub(super) uprobes: bool,
}

/// A program that runs to its end.
pub(super) struct Batch {
    pub(super) name: &'static str,
    pub(super) what: String,
    pub(super) argv: Vec<String>,
    /// Options every memtrace mode gets for this program.
    pub(super) memtrace_args: &'static [&'static str],
}

/// jq holds about 1.6M blocks at its peak: memleak's default map (262,144 entries) would drop
/// most of them (and their cost), as its report says; this is the size it advises.
const JQ_MEMTRACE_ARGS: &[&str] = &["--max-allocs", "2097152"];

/// A mode's runs, or why it has none.
pub(super) type Outcome = Result<Vec<Run>, String>;

/// One run's figures; what does not apply stays None or empty.
#[derive(Default)]
pub(super) struct Run {
    /// Batch: seconds from the start (attached modes: from letting the program run) to its end.
    pub(super) wall_s: f64,
    /// Server: requests per second of each of REDIS_TESTS.
    rps: Vec<f64>,
    /// Attached modes: seconds from starting the tracer to its being ready.
    startup_s: Option<f64>,
    /// memtrace: total_bytes of the final report; heaptrack: its leaked bytes.
    pub(super) outstanding: Option<u64>,
    /// memtrace: file mappings still in place, apart from the total.
    file_mapped: Option<u64>,
    /// memtrace: allocations tracked; heaptrack: calls to allocation functions.
    alloc_calls: Option<u64>,
    /// memtrace: what its report counts as dropped (map or stack store full, events or
    /// stacks lost; with -c, frees of blocks it never saw); anything but 0 makes it partial.
    lost: Option<u64>,
}

/// Whether this memtrace has `memleak --uprobes` (the uprobe path of -c, once an in-process
/// recorder is the default): its row is measured only then.
pub fn has_uprobes(memtrace: &Path) -> bool {
    has_option(memtrace, "--uprobes")
}

/// Whether this memtrace's memleak takes `option` (an older build compared may not).
pub fn has_option(memtrace: &Path, option: &str) -> bool {
    let help = Command::new(memtrace).args(["memleak", "--help"]).output();
    help.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(option))
}

pub fn run(runs: usize, quick: bool, memtrace: &Path) -> Result<Value> {
    let dir = cmd::root().join("target/bench-programs");
    std::fs::create_dir_all(&dir)?;
    let env = Env { memtrace: memtrace.to_path_buf(), uprobes: has_uprobes(memtrace), dir };
    let mut modes = vec![Mode::Untraced, Mode::MemtraceC(&[])];
    if has_option(memtrace, "--no-errors") {
        modes.push(NO_ERRORS);
    }
    if has_option(memtrace, "--errors-only") {
        modes.push(ERRORS_ONLY);
    }
    if env.uprobes {
        modes.push(UPROBES);
    }
    if has_option(memtrace, "--watch") {
        modes.push(WATCH);
    }
    modes.extend([Mode::MemtraceP, Mode::Heaptrack, Mode::Bcc]);
    let mut programs = Vec::new();
    for batch in [sqlite(&env.dir)?, jq(&env.dir)?] {
        eprintln!("bench: {} ({} runs of each mode)", batch.name, runs);
        let results = each_run(&modes, runs, |mode| run_batch(&env, &batch, mode));
        programs.push(batch_report(&env, &batch, &results));
    }
    eprintln!("bench: redis-server under redis-benchmark ({runs} runs of each mode)");
    let results = each_run(&modes, runs, |mode| run_redis(&env, mode, quick));
    programs.push(redis_report(&env, quick, &results));
    Ok(json!(programs))
}

/// Every mode's runs, interleaved (run 1 of each mode, then run 2...) so that a change in the
/// machine's load touches all modes alike. A mode that fails once is not run again.
pub(super) fn each_run(modes: &[Mode], runs: usize, mut one: impl FnMut(Mode) -> Result<Run>) -> Vec<(Mode, Outcome)> {
    let mut results: Vec<_> = modes.iter().map(|&m| (m, Ok(Vec::new()))).collect();
    for _ in 0..runs {
        for (mode, result) in &mut results {
            if let Ok(done) = result {
                match one(*mode) {
                    Ok(run) => done.push(run),
                    Err(e) => *result = Err(format!("{e:#}")),
                }
            }
        }
    }
    results
}

pub(super) fn sqlite(dir: &Path) -> Result<Batch> {
    let script = dir.join("insert.sql");
    let mut sql = String::from("CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, value REAL);\nBEGIN;\n");
    for i in 0..SQLITE_ROWS {
        sql += &format!("INSERT INTO t VALUES({i}, 'name-{i}', {i}.5);\n");
    }
    sql += "COMMIT;\n";
    std::fs::write(&script, sql)?;
    Ok(Batch {
        name: "sqlite3",
        what: format!("{SQLITE_ROWS} INSERTs into :memory: in one transaction"),
        argv: vec!["sqlite3".into(), ":memory:".into(), format!(".read \"{}\"", script.display())],
        memtrace_args: &[],
    })
}

pub(super) fn jq(dir: &Path) -> Result<Batch> {
    let data = dir.join("data.json");
    let mut json = String::from("[");
    for i in 0..JQ_OBJECTS {
        let sep = if i == 0 { "" } else { "," };
        json += &format!(r#"{sep}{{"x":{i},"y":{i}.5,"s":"item-{i}","t":[{},{}]}}"#, i % 7, i % 13);
    }
    json += "]";
    std::fs::write(&data, &json)?;
    Ok(Batch {
        name: "jq",
        what: format!("'{JQ_FILTER}' on {:.1} MB of JSON", json.len() as f64 / 1e6),
        argv: vec!["jq".into(), JQ_FILTER.into(), data.display().to_string()],
        memtrace_args: JQ_MEMTRACE_ARGS,
    })
}

/// `argv` as one string for `-c`, quoted the way a POSIX shell (and memtrace's shlex) reads it.
fn shell_line(argv: &[String]) -> String {
    let safe = |a: &str| !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "_./:=@%+-,".contains(c));
    let quote = |a: &String| if safe(a) { a.clone() } else { format!("'{}'", a.replace('\'', r"'\''")) };
    argv.iter().map(quote).collect::<Vec<_>>().join(" ")
}

/// The command that runs `argv` in a mode that starts it (untraced, memtrace -c, heaptrack).
fn launch(env: &Env, mode: Mode, argv: &[String], extra: &[&str], heaptrack_out: &Path) -> Result<Command> {
    let mut c = match mode {
        Mode::Untraced | Mode::MemtraceP | Mode::Bcc => {
            let mut c = Command::new(&argv[0]);
            c.args(&argv[1..]);
            c
        }
        Mode::MemtraceC(args) => {
            let mut c = Command::new(&env.memtrace);
            c.args(["memleak", "--json"]).args(args).args(extra).args(["-c", &shell_line(argv)]);
            c
        }
        Mode::Heaptrack => {
            let heaptrack = which("heaptrack").context("heaptrack is not installed (Debian's heaptrack)")?;
            for old in heaptrack_files(heaptrack_out) {
                let _ = std::fs::remove_file(old);
            }
            let mut c = Command::new(heaptrack);
            c.arg("-o").arg(heaptrack_out).args(argv);
            c
        }
    };
    c.stdin(Stdio::null());
    Ok(c)
}

pub(super) fn run_batch(env: &Env, p: &Batch, mode: Mode) -> Result<Run> {
    if matches!(mode, Mode::MemtraceP | Mode::Bcc) {
        return run_attached(env, p, mode);
    }
    let out = env.dir.join(format!("heaptrack.{}", p.name));
    let mut c = launch(env, mode, &p.argv, p.memtrace_args, &out)?;
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let t0 = Instant::now();
    let done = c.spawn().with_context(|| format!("cannot start {}", p.argv[0]))?.wait_with_output()?;
    let wall_s = t0.elapsed().as_secs_f64();
    if !done.status.success() {
        bail!("{} ({}): {}", p.argv[0], done.status, last_line(&done.stderr));
    }
    let mut run = Run { wall_s, ..Run::default() };
    counts(mode, &String::from_utf8_lossy(&done.stdout), &out, &mut run)?;
    Ok(run)
}

/// A tracer attached by pid before the program runs: a shell waits on a pipe, the tracer
/// attaches to it, and the shell then execs the program (both tracers follow an exec). The
/// time runs from the go to the program's end; the tracer's start-up is kept apart.
fn run_attached(env: &Env, p: &Batch, mode: Mode) -> Result<Run> {
    let tracer = tracer(env, mode, p.memtrace_args, None)?;
    let (gate_read, mut gate_write) = pipe()?;
    let fd = gate_read.as_raw_fd();
    let mut shell = Command::new("sh");
    shell.args(["-c", r#"read _ <&3; exec "$@" 3<&-"#, "sh"]).args(&p.argv);
    shell.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    // SAFETY: dup2 and fcntl are async-signal-safe.
    unsafe {
        shell.pre_exec(move || {
            // dup2 onto itself would leave close-on-exec set: clear it by hand then.
            let r = if fd == 3 { libc::fcntl(fd, libc::F_SETFD, 0) } else { libc::dup2(fd, 3) };
            if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
        });
    }
    let mut program = Reap(Some(shell.spawn().context("cannot start sh")?));
    drop(gate_read);
    let (child, startup, out) = start_tracer(&tracer, program.id())?;
    let t0 = Instant::now();
    gate_write.write_all(b"go\n")?;
    drop(gate_write);
    let status = program.wait()?;
    let wall_s = t0.elapsed().as_secs_f64();
    if mode == Mode::Bcc {
        std::thread::sleep(BCC_LAST_REPORT);
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    }
    let (_, stdout) = finish_tracer(child, out)?;
    if !status.success() {
        bail!("{} ({status})", p.argv[0]);
    }
    let mut run = Run { wall_s, startup_s: Some(startup.as_secs_f64()), ..Run::default() };
    counts(mode, &stdout, Path::new(""), &mut run)?;
    Ok(run)
}

/// memtrace -p or bcc on a pid, bcc on `allocator` when the program's is not libc's.
fn tracer(env: &Env, mode: Mode, extra: &[&str], allocator: Option<&Path>) -> Result<Tracer> {
    match mode {
        Mode::MemtraceP => {
            let args: Vec<&str> = ["memleak", "--json"].into_iter().chain(extra.iter().copied()).collect();
            Ok(Tracer::new(&env.memtrace, &args, Check::None))
        }
        Mode::Bcc => {
            let bcc = which("memleak-bpfcc").context("memleak-bpfcc is not installed (Debian's bpfcc-tools)")?;
            let mut t = Tracer::bcc(&bcc);
            t.check = Check::None;
            if let Some(obj) = allocator {
                t.argv.extend(["-O".into(), obj.display().to_string()]);
            }
            Ok(t)
        }
        _ => bail!("not an attaching mode"),
    }
}

/// A child killed and reaped when dropped unwaited, so an error half-way leaves nothing running.
struct Reap(Option<Child>);

impl Reap {
    fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }

    fn wait(&mut self) -> Result<std::process::ExitStatus> {
        Ok(self.0.take().context("already waited for")?.wait()?)
    }
}

impl Drop for Reap {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn pipe() -> Result<(std::os::fd::OwnedFd, std::fs::File)> {
    use std::os::fd::FromRawFd as _;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors. Close-on-exec keeps other children off the pipe.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe2: {}", std::io::Error::last_os_error());
    }
    // SAFETY: just created, owned by nobody else.
    Ok(unsafe { (std::os::fd::OwnedFd::from_raw_fd(fds[0]), std::fs::File::from_raw_fd(fds[1])) })
}

/// The outstanding bytes and calls a run reports: memtrace's final JSON report on its stdout,
/// or heaptrack's file read by heaptrack_print.
fn counts(mode: Mode, stdout: &str, heaptrack_out: &Path, run: &mut Run) -> Result<()> {
    if mode.memtrace() {
        let last = stdout.lines().rfind(|l| l.starts_with('{') && l.contains(r#""final":true"#));
        let report: Value = serde_json::from_str(last.context("memtrace printed no final report")?)?;
        run.outstanding = report["total_bytes"].as_u64();
        run.file_mapped = report["file_mappings"]["bytes"].as_u64();
        run.alloc_calls = report["tracked"].as_u64();
        let d = &report["blind_spots"];
        let mut lost = vec!["map_full", "stacks_lost", "events_lost", "stacks_full", "stack_store_full"];
        // Attached by pid, frees of blocks allocated before the attach are expected.
        if mode != Mode::MemtraceP {
            lost.push("unknown_frees");
        }
        run.lost = Some(lost.iter().filter_map(|k| d[k].as_u64()).sum());
    } else if mode == Mode::Heaptrack {
        let (leaked, calls) = heaptrack_leaked(heaptrack_out)?;
        run.outstanding = Some(leaked);
        run.alloc_calls = calls;
    }
    Ok(())
}

/// heaptrack writes FILE.zst (or FILE.gz) for `-o FILE`.
fn heaptrack_files(out: &Path) -> Vec<PathBuf> {
    ["zst", "gz"].iter().map(|ext| PathBuf::from(format!("{}.{ext}", out.display()))).collect()
}

/// heaptrack's leaked bytes, exactly (the summary line rounds to "1.59K"), with none of its
/// suppressions applied, summed from its folded stacks weighted by leaked bytes; and its count
/// of calls to allocation functions.
fn heaptrack_leaked(out: &Path) -> Result<(u64, Option<u64>)> {
    let file = heaptrack_files(out).into_iter().find(|f| f.is_file()).context("heaptrack wrote no file")?;
    let folded = PathBuf::from(format!("{}.leaked", out.display()));
    let text = cmd::stdout(
        Command::new("heaptrack_print")
            .arg("-f")
            .arg(&file)
            .args(["--disable-builtin-suppressions", "--disable-embedded-suppressions"])
            .args(["--print-peaks=0", "--print-allocators=0", "--print-temporary=0", "--print-leaks=0"])
            .args(["--flamegraph-cost-type", "leaked", "-F"])
            .arg(&folded),
    )?;
    let leaked = folded_total(&std::fs::read_to_string(&folded)?);
    Ok((leaked, allocation_calls(&text)))
}

/// The sum of the weights of folded stacks ("a;b;c 123" per line).
fn folded_total(text: &str) -> u64 {
    text.lines().filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok()).sum()
}

/// heaptrack_print's "calls to allocation functions: 1000768 (1047924/s)".
fn allocation_calls(text: &str) -> Option<u64> {
    let rest = text.lines().find_map(|l| l.strip_prefix("calls to allocation functions: "))?;
    rest.split_whitespace().next()?.parse().ok()
}

fn last_line(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    text.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string()
}

/// The figures of one mode's runs, or why it has none.
fn result_row(mode: Mode, server: bool, result: &Outcome, figures: impl Fn(&[Run]) -> Value) -> Value {
    let mut row = json!({ "mode": mode.label(server), "key": mode.key() });
    match result {
        Err(why) => row["failed"] = json!(why),
        Ok(runs) => {
            super::merge(&mut row, figures(runs));
            let all = |f: fn(&Run) -> Option<u64>| {
                let v: Vec<u64> = runs.iter().filter_map(f).collect();
                (!v.is_empty()).then(|| json!(v))
            };
            let startup: Vec<f64> = runs.iter().filter_map(|r| r.startup_s).collect();
            row["startup_s"] = if startup.is_empty() { Value::Null } else { stats(&startup) };
            row["outstanding_bytes"] = json!(all(|r| r.outstanding));
            row["file_mapped_bytes"] = json!(all(|r| r.file_mapped));
            row["allocation_calls"] = json!(all(|r| r.alloc_calls));
            row["lost"] = json!(all(|r| r.lost));
        }
    }
    row
}

fn batch_report(env: &Env, p: &Batch, results: &[(Mode, Outcome)]) -> Value {
    let wall = |runs: &[Run]| runs.iter().map(|r| r.wall_s).collect::<Vec<_>>();
    let medians: Vec<(Mode, f64)> =
        results.iter().filter_map(|(m, r)| Some((*m, median(&wall(r.as_ref().ok()?))))).collect();
    let base = medians.iter().find(|(m, _)| *m == Mode::Untraced).map_or(f64::NAN, |(_, b)| *b);
    let added = |mode: Mode| medians.iter().find(|(m, _)| *m == mode).map(|(_, w)| w - base);
    let mut rows: Vec<Value> = results
        .iter()
        .map(|(mode, result)| {
            result_row(*mode, false, result, |runs| {
                let med = median(&wall(runs));
                json!({ "wall_s": stats(&wall(runs)), "x_untraced": ratio(med, base), "added_s": med - base })
            })
        })
        .collect();
    if !env.uprobes {
        rows.push(not_measured());
    }
    json!({
        "program": p.name,
        "what": p.what,
        "command": shell_line(&p.argv),
        "memtrace_args": p.memtrace_args,
        "modes": rows,
        "ratios": ratios(added),
        "exactness": exactness(results),
    })
}

/// The row that says why `-c --uprobes` has no figures.
fn not_measured() -> Value {
    json!({ "mode": UPROBES.label(false), "key": UPROBES.key(), "failed": "not measured: this memtrace has no memleak --uprobes (measured as soon as it has)" })
}

/// The issue's ratios: each memtrace mode's added time over heaptrack's and bcc's.
fn ratios(added: impl Fn(Mode) -> Option<f64>) -> Value {
    let over = |a: Mode, b: Mode| Some(ratio(added(a)?, added(b)?));
    json!({
        "memtrace_c_added_over_heaptrack_added": over(Mode::MemtraceC(&[]), Mode::Heaptrack),
        "memtrace_c_uprobes_added_over_heaptrack_added": over(UPROBES, Mode::Heaptrack),
        "memtrace_p_added_over_bcc_added": over(Mode::MemtraceP, Mode::Bcc),
        "memtrace_c_added_over_bcc_added": over(Mode::MemtraceC(&[]), Mode::Bcc),
    })
}

/// memtrace's outstanding bytes at exit (-c, and its file mappings apart) beside heaptrack's
/// leaked bytes, medians over the runs. They count different things at the edges (heaptrack
/// sees what its preload sees; memtrace counts from the first instruction, mmaps included).
fn exactness(results: &[(Mode, Outcome)]) -> Value {
    let med = |mode: Mode, f: fn(&Run) -> Option<u64>| {
        let runs = results.iter().find(|(m, _)| *m == mode)?.1.as_ref().ok()?;
        let v: Vec<f64> = runs.iter().filter_map(f).map(|b| b as f64).collect();
        (!v.is_empty()).then(|| median(&v) as u64)
    };
    let memtrace = med(Mode::MemtraceC(&[]), |r| r.outstanding);
    let heaptrack = med(Mode::Heaptrack, |r| r.outstanding);
    json!({
        "memtrace_c_outstanding_bytes": memtrace,
        "memtrace_c_file_mapped_bytes": med(Mode::MemtraceC(&[]), |r| r.file_mapped),
        "memtrace_c_allocations_tracked": med(Mode::MemtraceC(&[]), |r| r.alloc_calls),
        "heaptrack_leaked_bytes": heaptrack,
        "heaptrack_allocation_calls": med(Mode::Heaptrack, |r| r.alloc_calls),
        "memtrace_minus_heaptrack_bytes": memtrace.zip(heaptrack).map(|(m, h)| m as i64 - h as i64),
    })
}

/// redis-server, started in `mode` (or untraced with a tracer attached once it serves), under
/// each of REDIS_TESTS, then shut down.
fn run_redis(env: &Env, mode: Mode, quick: bool) -> Result<Run> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let argv: Vec<String> = ["redis-server", "--bind", "127.0.0.1", "--port", &port.to_string()]
        .into_iter()
        .chain(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
        .map(String::from)
        .collect();
    which("redis-server").context("redis-server is not installed (Debian's redis-server)")?;
    let out = env.dir.join("heaptrack.redis");
    let mut c = launch(env, mode, &argv, &[], &out)?;
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut top = Server { port, child: Reap(Some(c.spawn().context("cannot start redis-server")?)) };
    let stdout = read_all(top.child.0.as_mut().and_then(|c| c.stdout.take()));
    let stderr = read_all(top.child.0.as_mut().and_then(|c| c.stderr.take()));
    wait_until_serving(port, &mut top.child)?;
    let attached = match mode {
        Mode::MemtraceP | Mode::Bcc => {
            let allocator = allocator_of(top.child.id());
            Some(start_tracer(&tracer(env, mode, &[], allocator.as_deref())?, top.child.id())?)
        }
        _ => None,
    };
    let mut rps = Vec::new();
    for &(_, test, requests, quick_requests) in REDIS_TESTS {
        rps.push(redis_benchmark(port, test, if quick { quick_requests } else { requests })?);
    }
    redis_command(port, "SHUTDOWN NOSAVE")?;
    let status = top.child.wait()?;
    let mut stdout = stdout.join().unwrap_or_default();
    let mut run = Run { rps, ..Run::default() };
    if let Some((child, startup, out)) = attached {
        if mode == Mode::Bcc {
            std::thread::sleep(BCC_LAST_REPORT);
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        }
        stdout = finish_tracer(child, out)?.1;
        run.startup_s = Some(startup.as_secs_f64());
    }
    if !status.success() {
        bail!("redis-server ({status}): {}", last_line(stderr.join().unwrap_or_default().as_bytes()));
    }
    counts(mode, &stdout, &out, &mut run)?;
    Ok(run)
}

/// A server shut down politely, then killed, when dropped before it ended.
struct Server {
    port: u16,
    child: Reap,
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.0.is_some() {
            let _ = redis_command(self.port, "SHUTDOWN NOSAVE");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

fn read_all(from: Option<impl std::io::Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut r) = from {
            let _ = r.read_to_string(&mut s);
        }
        s
    })
}

/// Waits until redis answers PING (under a tracer that starts it, start-up takes a while).
fn wait_until_serving(port: u16, top: &mut Reap) -> Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(60) {
        if redis_command(port, "PING").is_ok_and(|r| r.starts_with("+PONG")) {
            return Ok(());
        }
        if let Some(c) = &mut top.0
            && let Some(status) = c.try_wait()?
        {
            bail!("redis-server ended ({status}) before it served");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("redis-server did not answer PING within 60 s")
}

/// One inline command to redis; its first reply line (SHUTDOWN's is the connection closing).
fn redis_command(port: u16, command: &str) -> Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("{command}\r\n").as_bytes())?;
    let mut buf = [0; 256];
    let n = s.read(&mut buf).unwrap_or(0);
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn redis_benchmark(port: u16, test: &str, requests: u64) -> Result<f64> {
    let text = cmd::stdout(Command::new("redis-benchmark").args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-t",
        test,
        "-n",
        &requests.to_string(),
        "-q",
    ]))?;
    requests_per_sec(&text).with_context(|| format!("redis-benchmark -t {test} printed no rate: {text:?}"))
}

/// The final rate of `redis-benchmark -q` ("SET: 136612.02 requests per second, p50=..."),
/// after progress lines ended by carriage returns.
fn requests_per_sec(text: &str) -> Option<f64> {
    text.split(['\r', '\n'])
        .filter_map(|l| l.split_once(" requests per second")?.0.rsplit(' ').next()?.parse().ok())
        .next_back()
}

/// A replacement allocator the process maps (redis links jemalloc), for bcc's -O; memtrace
/// finds it by itself.
fn allocator_of(pid: u32) -> Option<PathBuf> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let path = maps.lines().filter_map(|l| l.split_whitespace().nth(5)).find(|p| {
        let name = p.rsplit('/').next().unwrap_or("");
        ["libjemalloc", "libtcmalloc", "libmimalloc"].iter().any(|a| name.starts_with(a))
    })?;
    Some(PathBuf::from(path))
}

fn redis_report(env: &Env, quick: bool, results: &[(Mode, Outcome)]) -> Value {
    let rate = |runs: &[Run], i: usize| runs.iter().filter_map(|r| r.rps.get(i).copied()).collect::<Vec<_>>();
    let base: Vec<f64> = (0..REDIS_TESTS.len())
        .map(|i| {
            let untraced = results.iter().find(|(m, _)| *m == Mode::Untraced).and_then(|(_, r)| r.as_ref().ok());
            untraced.map_or(f64::NAN, |runs| median(&rate(runs, i)))
        })
        .collect();
    // Time per request is what a tracer adds to: 1/rate.
    let added_us = |runs: &[Run], i: usize| 1e6 / median(&rate(runs, i)) - 1e6 / base[i];
    let mut rows: Vec<Value> = results
        .iter()
        .map(|(mode, result)| {
            result_row(*mode, true, result, |runs| {
                let mut rps = json!({});
                let mut slower = json!({});
                let mut added = json!({});
                for (i, (name, ..)) in REDIS_TESTS.iter().enumerate() {
                    rps[name] = stats(&rate(runs, i));
                    slower[name] = json!(ratio(base[i], median(&rate(runs, i))));
                    added[name] = json!(added_us(runs, i));
                }
                json!({ "requests_per_sec": rps, "x_slower": slower, "added_us_per_request": added })
            })
        })
        .collect();
    if !env.uprobes {
        let mut row = not_measured();
        row["mode"] = json!(UPROBES.label(true));
        rows.push(row);
    }
    let mut ratios_per_test = json!({});
    for (i, (name, ..)) in REDIS_TESTS.iter().enumerate() {
        let added = |mode: Mode| {
            let runs = results.iter().find(|(m, _)| *m == mode)?.1.as_ref().ok()?;
            Some(added_us(runs, i))
        };
        ratios_per_test[name] = ratios(added);
    }
    let requests: Vec<Value> = REDIS_TESTS
        .iter()
        .map(|(name, _, n, nq)| json!({ "test": name, "requests": if quick { nq } else { n } }))
        .collect();
    json!({
        "program": "redis-server",
        "what": "redis-benchmark -q, 50 clients, against redis-server (jemalloc), no persistence",
        "requests": requests,
        "modes": rows,
        "ratios": ratios_per_test,
        "exactness": exactness(results),
    })
}

pub fn print(programs: &Value) {
    println!("\nreal programs: medians [min-max]; added = traced - untraced; -p and bcc attach before the");
    println!("program runs (redis: once it serves) and their start-up is shown apart, not added. At exit, heaptrack");
    println!("counts the malloc family's blocks; memtrace also anonymous mmaps still in place (thread stacks, arenas)");
    let num = |v: &Value| v.as_f64().map_or("-".to_string(), |v| format!("{v:.2}"));
    let range = |s: &Value, scale: f64, digits: usize| {
        let f = |k: &str| s[k].as_f64().unwrap_or(f64::NAN) * scale;
        if s.is_null() {
            "-".into()
        } else {
            format!("{:.digits$} [{:.digits$}-{:.digits$}]", f("median"), f("min"), f("max"))
        }
    };
    for p in programs.as_array().into_iter().flatten() {
        let redis = p["program"] == "redis-server";
        println!("\n{}: {}", p["program"].as_str().unwrap_or(""), p["what"].as_str().unwrap_or(""));
        let args: Vec<&str> = p["memtrace_args"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        if !args.is_empty() {
            println!(
                "memtrace's modes run with {} (the default would drop blocks: see xtask's bench/programs.rs)",
                args.join(" ")
            );
        }
        if redis {
            println!(
                "{:<48} {:>24} {:>24} {:>8} {:>8} {:>10} {:>10} {:>11}",
                "mode", "SET req/s", "MSET req/s", "SET x", "MSET x", "SET +us", "MSET +us", "start-up s"
            );
        } else {
            println!(
                "{:<48} {:>20} {:>9} {:>9} {:>18} {:>14}",
                "mode", "wall s", "x untr.", "added s", "start-up s", "outstanding B"
            );
        }
        for m in p["modes"].as_array().into_iter().flatten() {
            let mode = m["mode"].as_str().unwrap_or("");
            if let Some(why) = m["failed"].as_str() {
                println!("{mode:<48} {why}");
                continue;
            }
            let outstanding =
                m["outstanding_bytes"].as_array().and_then(|v| v.first()).map_or("-".into(), |b| b.to_string());
            if redis {
                let r = &m["requests_per_sec"];
                println!(
                    "{mode:<48} {:>24} {:>24} {:>8} {:>8} {:>10} {:>10} {:>11}",
                    range(&r["SET"], 1.0, 0),
                    range(&r["MSET"], 1.0, 0),
                    num(&m["x_slower"]["SET"]),
                    num(&m["x_slower"]["MSET"]),
                    num(&m["added_us_per_request"]["SET"]),
                    num(&m["added_us_per_request"]["MSET"]),
                    range(&m["startup_s"], 1.0, 2),
                );
            } else {
                println!(
                    "{mode:<48} {:>20} {:>9} {:>9} {:>18} {:>14}",
                    range(&m["wall_s"], 1.0, 2),
                    num(&m["x_untraced"]),
                    num(&m["added_s"]),
                    range(&m["startup_s"], 1.0, 2),
                    outstanding,
                );
            }
        }
        let print_ratios = |r: &Value, prefix: &str| {
            println!(
                "{prefix}added time: memtrace -c / heaptrack {}, memtrace -c --uprobes / heaptrack {}, memtrace -p / bcc {}, memtrace -c / bcc {}",
                num(&r["memtrace_c_added_over_heaptrack_added"]),
                num(&r["memtrace_c_uprobes_added_over_heaptrack_added"]),
                num(&r["memtrace_p_added_over_bcc_added"]),
                num(&r["memtrace_c_added_over_bcc_added"]),
            )
        };
        if redis {
            for (name, ..) in REDIS_TESTS {
                print_ratios(&p["ratios"][name], &format!("{name}: "));
            }
        } else {
            print_ratios(&p["ratios"], "");
        }
        for m in p["modes"].as_array().into_iter().flatten() {
            let lost: u64 = m["lost"].as_array().into_iter().flatten().filter_map(Value::as_u64).max().unwrap_or(0);
            if lost > 0 {
                println!(
                    "PARTIAL: {} reported up to {lost} allocations or frees dropped (its figures are partial)",
                    m["mode"]
                );
            }
        }
        let e = &p["exactness"];
        println!(
            "at exit: memtrace -c {} B outstanding (+{} B of files still mapped, not counted), {} allocations tracked; heaptrack {} B leaked, {} allocation calls",
            e["memtrace_c_outstanding_bytes"],
            e["memtrace_c_file_mapped_bytes"],
            e["memtrace_c_allocations_tracked"],
            e["heaptrack_leaked_bytes"],
            e["heaptrack_allocation_calls"],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_line_for_dash_c_reads_back_as_its_words() {
        let argv: Vec<String> = ["jq", JQ_FILTER, "/a b/it's.json", ".read \"/x/y.sql\"", ":memory:"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let line = shell_line(&argv);
        let out = Command::new("sh").args(["-c", &format!("printf '%s\\n' {line}")]).output().unwrap();
        let words: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(String::from).collect();
        assert_eq!(words, argv, "{line}");
    }

    /// The row the lead flips on by adding `memleak --uprobes`: its command and its ratio.
    #[test]
    fn the_uprobes_row_runs_dash_c_with_uprobes_and_has_its_own_ratio() {
        let env = Env { memtrace: "/m".into(), dir: "/d".into(), uprobes: true };
        let argv = vec!["jq".to_string(), ".".to_string()];
        let c = launch(&env, UPROBES, &argv, JQ_MEMTRACE_ARGS, Path::new("/d/h")).unwrap();
        let args: Vec<_> = c.get_args().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(args, ["memleak", "--json", "--uprobes", "--max-allocs", "2097152", "-c", "jq ."]);
        assert_eq!(UPROBES.label(false), "memtrace memleak -c --uprobes");
        let added = |m: Mode| match m.key() {
            "memtrace_c_uprobes" => Some(3.0),
            "memtrace_c" => Some(0.5),
            "heaptrack" => Some(1.5),
            _ => None,
        };
        let r = ratios(added);
        assert_eq!(r["memtrace_c_uprobes_added_over_heaptrack_added"], 2.0);
        assert_eq!(r["memtrace_c_added_over_heaptrack_added"], json!(0.5 / 1.5));
        assert!(r["memtrace_p_added_over_bcc_added"].is_null());
    }

    #[test]
    fn redis_benchmark_rates_are_read_past_its_progress_lines() {
        let text = "SET: rps=0.0 (overall: 0.0) avg_msec=-nan (overall: -nan)\r\
                    SET: rps=136464.0 (overall: 135920.3) avg_msec=0.199 (overall: 0.199)\r\
                    SET: 136612.02 requests per second, p50=0.191 msec\n\n";
        assert_eq!(requests_per_sec(text), Some(136612.02));
        let mset = "MSET (10 keys): rps=79632.0 (overall: 149684.2)\rMSET (10 keys): 147929.00 requests per second, p50=0.183 msec\n";
        assert_eq!(requests_per_sec(mset), Some(147929.0));
        assert_eq!(requests_per_sec("SET: rps=1.0 (overall: 1.0)\r"), None);
    }

    #[test]
    fn heaptrack_totals_are_read_exactly() {
        let folded = "a (x.c);b; 0\nmain;sqlite3_initialize;sqlite3Malloc; 4096\nmain;f 745\n";
        assert_eq!(folded_total(folded), 4841);
        let summary =
            "total runtime: 0.95s.\ncalls to allocation functions: 1000768 (1047924/s)\ntotal memory leaked: 1.59K\n";
        assert_eq!(allocation_calls(summary), Some(1000768));
    }
}
