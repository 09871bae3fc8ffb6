//! `cargo xtask bench`: what memtrace costs the program it traces, measured side by side in
//! one run (untraced, the cheapest possible tracer, memleak's modes, bcc's memleak when
//! present), plus start-up, memory, exit latency and event throughput. Figures are ratios and
//! medians of several runs on this machine; nothing here is asserted by the tests.
//! programs.rs adds real programs (sqlite3, jq, redis) beside heaptrack and bcc; startup.rs
//! times memleak -c up to the command's first instruction.

mod programs;
mod sampling;
mod serve;
mod startup;

use std::{
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{cmd, setup, tasks};

/// bench_malloc.c leaks one 64-byte block from bench_leak every LEAK_EVERY iterations.
const LEAK_EVERY: u64 = 200;
const LEAK_SIZE: u64 = 64;

/// The steady mmap+munmap rate the mmapsnoop measurement generates.
const SNOOP_RATE: f64 = 200_000.0;

/// The leak a run of `iterations` makes: (bytes, allocations).
fn expected_leak(iterations: u64) -> (u64, u64) {
    let n = iterations.div_ceil(LEAK_EVERY);
    (n * LEAK_SIZE, n)
}

#[derive(clap::Args)]
pub struct Options {
    /// Runs of each mode (the median is reported); default 3, or 1 with --quick.
    #[arg(long, value_name = "N")]
    runs: Option<usize>,
    /// Loop iterations of the synthetic workload per run.
    #[arg(long, default_value_t = 200_000)]
    iterations: u64,
    /// One run of each mode and shorter redis benchmarks: a first look, not figures to quote.
    #[arg(long)]
    quick: bool,
    /// Measure only these parts, comma-separated (default: all).
    #[arg(long, value_delimiter = ',', value_enum, value_name = "PARTS")]
    only: Vec<Part>,
}

/// The bench's parts, each measured on its own.
#[derive(clap::ValueEnum, Clone, Copy, PartialEq)]
enum Part {
    /// bench_malloc.c under memleak's modes, the floor tracer and bcc; exit latency, kernel mode, mmapsnoop.
    Synthetic,
    /// sqlite3, jq and redis-server untraced, under memleak -c and -p, heaptrack and bcc.
    Programs,
    /// memleak -c up to the command's first instruction, and memleak -c /bin/true in all.
    Startup,
    /// sqlite3 and jq under memleak -c --sample-bytes 512 KiB and 64 KiB: added time, and the
    /// estimate's error against an unsampled run.
    Sampling,
    /// memtrace serve's CPU and memory over 60 s idle and under a page-fault load.
    Serve,
}

struct Opts {
    runs: usize,
    iterations: u64,
}

pub fn run(options: &Options) -> Result<u8> {
    // The floor tracer (`memtrace benchfloor`) is in the binary only with this feature.
    tasks::build_with(&["--features", "bench"])?;
    setup::bench()?;
    let runs = options.runs.unwrap_or(if options.quick { 1 } else { 3 }).max(1);
    let wants = |part| options.only.is_empty() || options.only.contains(&part);
    let opts = Opts { runs, iterations: options.iterations };
    let memtrace = cmd::root().join("target/release/memtrace");
    let mut report = json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "runs": opts.runs,
        "quick": options.quick,
        "load_before": load_average(),
    });
    let busy_at_start = (machine_cpu_s(), own_cpu_s(), Instant::now());
    let mut failures = Vec::new();
    if wants(Part::Synthetic) {
        let synthetic = synthetic(&opts, &memtrace, &mut failures)?;
        merge(&mut report, synthetic);
        print_table(&report);
    }
    if wants(Part::Programs) {
        let programs = programs::run(opts.runs, options.quick, &memtrace)?;
        programs::print(&programs);
        report["programs"] = programs;
    }
    if wants(Part::Sampling) {
        let sampled = sampling::run(opts.runs, &memtrace)?;
        sampling::print(&sampled);
        report["sampling"] = sampled;
    }
    if wants(Part::Startup) {
        let startup = startup::run(opts.runs, &memtrace)?;
        startup::print(&startup);
        report["startup"] = startup;
    }
    if wants(Part::Serve) {
        let window = std::time::Duration::from_secs(if options.quick { 10 } else { 60 });
        let serve = serve::run(window, if options.quick { 1 } else { 2 }, &memtrace)?;
        serve::print(&serve);
        report["serve"] = serve;
    }
    let (machine, own, t0) = busy_at_start;
    let other = ((machine_cpu_s() - machine) - (own_cpu_s() - own)).max(0.0);
    let wall = t0.elapsed().as_secs_f64();
    report["other_cpu_s"] = json!(other);
    report["wall_s"] = json!(wall);
    println!(
        "\nother work on the machine: load average {} before the bench; {other:.0} CPU-seconds used by processes \
         outside the bench during its {wall:.0} s (on {} cores){}",
        report["load_before"],
        report["cores"],
        if other > 0.05 * wall { ": figures from a loaded machine" } else { "" }
    );
    report["failures"] = json!(failures);
    for f in &failures {
        println!("FAILURE: {f}");
    }
    let out = cmd::root().join("target/bench.json");
    std::fs::write(&out, serde_json::to_string_pretty(&report)?)?;
    println!("\nwritten to {}", out.display());
    if !failures.is_empty() {
        eprintln!("bench: a traced run did not report the workload's leak exactly (see failures)");
        return Ok(1);
    }
    Ok(0)
}

/// The 1-minute load average: how busy the machine was around the measurements.
fn load_average() -> Value {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().next().and_then(|l| l.parse::<f64>().ok()).map_or(Value::Null, |l| json!(l))
}

/// CPU-seconds the whole machine has spent busy since boot (/proc/stat: all but idle and iowait).
fn machine_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> =
        stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|t| t.parse().ok()).collect();
    let busy: f64 = ticks.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, t)| t).sum();
    // SAFETY: sysconf has no preconditions.
    busy / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// CPU-seconds of this process and of the children it (and theirs) waited for: the bench's own.
fn own_cpu_s() -> f64 {
    let secs = |who| {
        // SAFETY: getrusage writes the struct it is given.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(who, &mut u) };
        let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
        t(u.ru_utime) + t(u.ru_stime)
    };
    secs(libc::RUSAGE_SELF) + secs(libc::RUSAGE_CHILDREN)
}

/// Adds `from`'s keys to `into` (both objects).
fn merge(into: &mut Value, from: Value) {
    if let (Some(into), Value::Object(from)) = (into.as_object_mut(), from) {
        into.extend(from);
    }
}

/// The synthetic workload (bench_malloc.c) under each mode, then exit latency, kernel-mode
/// memleak and mmapsnoop; the report's top-level keys, as they always were.
fn synthetic(opts: &Opts, memtrace: &Path, failures: &mut Vec<String>) -> Result<Value> {
    let workload = build_workload()?;
    let mut rows = Vec::new();

    let n = opts.iterations;
    let untraced = measure(opts, n, &workload, None, failures)?;
    let base = untraced.median_ns_per_call();
    rows.push(untraced.row("untraced", base));
    // The same workload built the way distributions build (no frame pointers), with
    // libstdc++ mapped too: full stacks need the unwind tables, whose building start-up counts.
    let nofp = build_workload_nofp()?;
    let untraced_nofp = measure(opts, n, &nofp, None, failures)?;
    let base_nofp = untraced_nofp.median_ns_per_call();
    let untraced_nofp_row = untraced_nofp.row("untraced, built without frame pointers (+libstdc++)", base_nofp);
    // A traced run of `args` on `workload`, measured and added as a row.
    let mut traced = |iterations: u64, workload: &Path, args: &[&str], check: Check, mode: &str, base: f64| {
        let samples = measure(opts, iterations, workload, Some(Tracer::new(memtrace, args, check)), failures)?;
        rows.push(samples.row(mode, base));
        anyhow::Ok(samples)
    };
    // The floor as naive tracers place probes (at each function's first instruction, as bcc
    // does), and the same floor placed like memleak's probes: the second is the fair floor.
    let naive = traced(
        n,
        &workload,
        &["benchfloor", "--naive"],
        Check::None,
        "floor, probes at +0 (empty uprobe + uretprobe insert + free delete)",
        base,
    )?;
    let floor = traced(n, &workload, &["benchfloor"], Check::None, "floor, probes placed as memleak's", base)?;
    let memleak = traced(n, &workload, &["memleak", "--json"], Check::Exact, "memtrace memleak -p PID", base)?;
    if programs::has_option(memtrace, "--no-errors") {
        let args = ["memleak", "--json", "--no-errors"];
        traced(n, &workload, &args, Check::Exact, "memtrace memleak --no-errors -p PID (no walk at free)", base)?;
    }
    if programs::has_option(memtrace, "--errors-only") {
        let args = ["memleak", "--json", "--errors-only"];
        let label = "memtrace memleak --errors-only -p PID (no walk at allocations)";
        traced(n, &workload, &args, Check::Exact, label, base)?;
    }
    if programs::has_option(memtrace, "--watch") {
        let args = ["memleak", "--json", "--watch", "4"];
        traced(n, &workload, &args, Check::Exact, "memtrace memleak --watch 4 -p PID (4 watchpoints)", base)?;
    }
    traced(n, &workload, &["memleak", "--json", "-s", "10"], Check::None, "memtrace memleak -s 10 -p PID", base)?;
    // Most calls run untraced here, so a longer run spans several recording windows.
    let duty = traced(
        n * 10,
        &workload,
        &["memleak", "--json", "--duty-cycle", "10"],
        Check::Within(0.2),
        "memtrace memleak --duty-cycle 10 -p PID (estimate)",
        base,
    )?;
    let auto = traced(
        n,
        &nofp,
        &["memleak", "--json", "--unwind", "auto"],
        Check::Exact,
        "memleak --unwind auto -p PID, no frame pointers (full stacks)",
        base_nofp,
    )?;
    let fp = traced(
        n,
        &nofp,
        &["memleak", "--json", "--unwind", "fp"],
        Check::Exact,
        "memleak --unwind fp -p PID, no frame pointers (cut stacks)",
        base_nofp,
    )?;
    // The rows in the table's order: the no-frame-pointer baseline above its traced runs.
    let at = rows.len() - 2;
    rows.insert(at, untraced_nofp_row);
    let auto_added = auto.median_ns_per_call() - base_nofp;
    let mut bcc_added = None;
    if let Some(bcc) = which("memleak-bpfcc") {
        let mode = "bcc memleak-bpfcc -o 0 1 -p PID (start-up: to its first report)";
        // A peer that cannot run here is a finding for the table, not the end of the bench.
        match measure(opts, n, &workload, Some(Tracer::bcc(&bcc)), failures) {
            Ok(bcc) => {
                bcc_added = Some(bcc.median_ns_per_call() - base);
                rows.push(bcc.row(mode, base));
            }
            Err(e) => rows.push(json!({ "mode": mode, "failed": format!("{e:#}") })),
        }
    }

    let exit_ms = json!({
        "uprobe_multi": exit_latency(opts, &workload, memtrace, true)?,
        "perf_links": exit_latency(opts, &workload, memtrace, false)?,
    });
    let kernel = kernel_events(memtrace)?;
    let snoop = snoop_events(memtrace)?;

    Ok(json!({
        "runs": opts.runs,
        "iterations": opts.iterations,
        "modes": rows,
        "memleak_added_over_floor_added": ratio(memleak.median_ns_per_call() - base, floor.median_ns_per_call() - base),
        "memleak_added_over_naive_floor_added": ratio(memleak.median_ns_per_call() - base, naive.median_ns_per_call() - base),
        "duty_added_over_floor_added": ratio(duty.median_ns_per_call() - base, floor.median_ns_per_call() - base),
        "memleak_added_over_bcc_added": bcc_added.map(|b| ratio(memleak.median_ns_per_call() - base, b)),
        "duty_added_over_bcc_added": bcc_added.map(|b| ratio(duty.median_ns_per_call() - base, b)),
        "unwind_auto_added_over_bcc_added": bcc_added.map(|b| ratio(auto_added, b)),
        "unwind_auto_added_over_naive_floor_added": ratio(auto_added, naive.median_ns_per_call() - base),
        "unwind_auto_added_over_fp_added": ratio(auto_added, fp.median_ns_per_call() - base_nofp),
        "exit_after_sigint": exit_ms,
        "kernel_memleak": kernel,
        "mmapsnoop": snoop,
    }))
}

fn build_workload() -> Result<PathBuf> {
    let dir = cmd::root().join("target/progs");
    std::fs::create_dir_all(&dir)?;
    let out = dir.join("bench_malloc");
    cmd::run(
        cmd::new("cc").args(["-O2", "-g", "-fno-omit-frame-pointer", "-o"]).arg(&out).arg("tests/progs/bench_malloc.c"),
    )?;
    Ok(out)
}

/// The workload without frame pointers, linked against libstdc++ (kept though unused) so the
/// process maps libc and libstdc++ as a C++ program does.
fn build_workload_nofp() -> Result<PathBuf> {
    let out = cmd::root().join("target/progs/bench_malloc_nofp");
    cmd::run(
        cmd::new("cc")
            .args(["-O2", "-g", "-fomit-frame-pointer", "-o"])
            .arg(&out)
            .arg("tests/progs/bench_malloc.c")
            .args(["-Wl,--no-as-needed", "-lstdc++"]),
    )?;
    Ok(out)
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(name)).find(|p| p.is_file())
}

/// How closely a traced run must report the workload's leak.
#[derive(Clone, Copy)]
enum Check {
    /// Every call is probed: bytes and allocations exactly.
    Exact,
    /// An estimate: bytes within this fraction of the truth.
    Within(f64),
    /// Not checked (sampling with -s is partial by design; bcc's output is not parsed).
    None,
}

/// How to start a tracer on a PID, and how its report of the leak is checked.
struct Tracer {
    argv: Vec<String>,
    check: Check,
    /// bcc's ready line on stdout; None for memtrace, which says so on `--ready-fd`.
    ready: Option<&'static str>,
}

impl Tracer {
    fn new(memtrace: &Path, args: &[&str], check: Check) -> Tracer {
        let mut argv = vec![memtrace.display().to_string()];
        argv.extend(args.iter().map(|a| a.to_string()));
        Tracer { argv, check, ready: None }
    }

    /// bcc's memleak prints "Attaching to pid" before its probes are attached, so its first
    /// report (after a 1 s interval, `-o 0` so nothing is hidden by age) is the ready signal.
    fn bcc(path: &Path) -> Tracer {
        let argv = [path.display().to_string(), "-o".into(), "0".into(), "1".into()].to_vec();
        Tracer { argv, check: Check::Exact, ready: Some("Top 10 stacks with outstanding allocations") }
    }
}

#[derive(Default)]
struct Samples {
    ns_per_call: Vec<f64>,
    startup_ms: Vec<f64>,
    peak_rss_kib: Vec<f64>,
    leak_bytes: Vec<u64>,
    /// |reported - true| / true of the leak's bytes, per run.
    leak_error: Vec<f64>,
}

impl Samples {
    fn median_ns_per_call(&self) -> f64 {
        median(&self.ns_per_call)
    }

    fn row(&self, mode: &str, base: f64) -> Value {
        let med = self.median_ns_per_call();
        json!({
            "mode": mode,
            "ns_per_call": stats(&self.ns_per_call),
            "traced_over_untraced": ratio(med, base),
            "added_ns_per_call": med - base,
            "startup_ms": (!self.startup_ms.is_empty()).then(|| stats(&self.startup_ms)),
            "peak_rss_mib": (!self.peak_rss_kib.is_empty()).then(|| median(&self.peak_rss_kib) / 1024.0),
            "leak_bytes_reported": self.leak_bytes,
            "leak_error": (!self.leak_error.is_empty()).then(|| stats(&self.leak_error)),
        })
    }
}

fn stats(v: &[f64]) -> Value {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    json!({ "median": median(v), "min": min, "max": max })
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b.abs() < f64::EPSILON { f64::NAN } else { a / b }
}

/// Runs the workload `opts.runs` times, traced by `tracer` when given.
fn measure(
    opts: &Opts,
    iterations: u64,
    workload: &Path,
    tracer: Option<Tracer>,
    failures: &mut Vec<String>,
) -> Result<Samples> {
    let mut samples = Samples::default();
    let (true_bytes, true_allocs) = expected_leak(iterations);
    for _ in 0..opts.runs {
        let mut w = Command::new(workload)
            .arg(iterations.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start the workload")?;
        let mut lines = BufReader::new(w.stdout.take().context("workload stdout")?).lines();
        expect_line(&mut lines, "ready")?;
        let traced = match tracer.as_ref().map(|t| start_tracer(t, w.id())).transpose() {
            Ok(traced) => traced,
            Err(e) => {
                let _ = w.kill();
                let _ = w.wait();
                return Err(e);
            }
        };
        let mut stdin = w.stdin.take().context("workload stdin")?;
        writeln!(stdin, "go")?;
        let result = lines.next().context("workload said nothing")??;
        let (calls, ns) = parse_result(&result)?;
        samples.ns_per_call.push(ns as f64 / calls as f64);
        drop(stdin);
        w.wait()?;
        if let Some((child, startup, out_rx)) = traced {
            samples.startup_ms.push(startup.as_secs_f64() * 1e3);
            let (rss_kib, stdout) = finish_tracer(child, out_rx)?;
            samples.peak_rss_kib.push(rss_kib as f64);
            let t = tracer.as_ref().expect("traced");
            let is_bcc = t.argv[0].ends_with("memleak-bpfcc");
            if is_bcc || t.argv.iter().any(|a| a == "memleak") {
                let (bytes, allocs) = if is_bcc { bcc_reported_leak(&stdout) } else { reported_leak(&stdout) };
                samples.leak_bytes.push(bytes);
                let error = (bytes as f64 - true_bytes as f64).abs() / true_bytes as f64;
                samples.leak_error.push(error);
                let bad = match t.check {
                    Check::Exact => (bytes, allocs) != (true_bytes, true_allocs),
                    Check::Within(limit) => error > limit,
                    Check::None => false,
                };
                if bad {
                    failures.push(format!(
                        "{}: reported {bytes} bytes in {allocs} allocations from bench_leak, truth {true_bytes} in {true_allocs}",
                        t.argv.join(" ")
                    ));
                }
            }
        }
    }
    Ok(samples)
}

fn expect_line(lines: &mut impl Iterator<Item = std::io::Result<String>>, want: &str) -> Result<()> {
    match lines.next() {
        Some(Ok(l)) if l.trim() == want => Ok(()),
        other => bail!("workload: expected {want:?}, got {other:?}"),
    }
}

fn parse_result(line: &str) -> Result<(u64, u64)> {
    let f: Vec<&str> = line.split_whitespace().collect();
    match f.as_slice() {
        ["calls", c, "ns", n] => Ok((c.parse()?, n.parse()?)),
        _ => bail!("workload: unexpected result line {line:?}"),
    }
}

type Started = (Child, Duration, mpsc::Receiver<String>);

/// Starts a tracer on `pid` and waits for its ready line; returns how long that took.
fn start_tracer(t: &Tracer, pid: u32) -> Result<Started> {
    let log_mark = kernel_log_clock();
    let t0 = Instant::now();
    let mut cmd = Command::new(&t.argv[0]);
    cmd.args(&t.argv[1..])
        .args(["-p", &pid.to_string()])
        // bcc is Python: without this its report lines sit in a buffer.
        .env("PYTHONUNBUFFERED", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (ready_tx, ready_rx) = mpsc::channel();
    let mut child = match t.ready {
        Some(_) => cmd.spawn().with_context(|| format!("cannot start {}", t.argv[0]))?,
        None => {
            let (child, said) = crate::ready::spawn(&mut cmd).with_context(|| format!("cannot start {}", t.argv[0]))?;
            let tx = ready_tx.clone();
            std::thread::spawn(move || {
                if said.recv().is_ok() {
                    let _ = tx.send(());
                }
            });
            child
        }
    };
    // bcc prints its ready line on stdout; stderr keeps the last words of either.
    let stderr = child.stderr.take().context("stderr")?;
    let ready = t.ready;
    let last_err = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let last = last_err.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !line.trim().is_empty() {
                *last.lock().unwrap_or_else(|p| p.into_inner()) = line;
            }
        }
    });
    let stdout = child.stdout.take().context("stdout")?;
    let (out_tx, out_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if ready.is_some_and(|r| line.contains(r)) {
                let _ = ready_tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        let _ = out_tx.send(all);
    });
    while t0.elapsed() < Duration::from_secs(60) {
        if ready_rx.recv_timeout(Duration::from_millis(50)).is_ok() {
            return Ok((child, t0.elapsed(), out_rx));
        }
        if let Some(status) = child.try_wait()? {
            // Its stderr reader may still hold the last line.
            std::thread::sleep(Duration::from_millis(100));
            let last = last_err.lock().unwrap_or_else(|p| p.into_inner()).clone();
            bail!("{} exited ({status}) before it was ready: {last}{}", t.argv[0], kernel_says(log_mark));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let last = last_err.lock().unwrap_or_else(|p| p.into_inner()).clone();
    bail!("{} was not ready within 60 s; its last words: {last}", t.argv[0])
}

/// Seconds since boot on the clock the kernel log stamps its lines with.
fn kernel_log_clock() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// The kernel's reason when a uprobe could not be registered, which tracers do not print:
/// a `ref_ctr_offset mismatch` line the kernel logged at or after `since` (kernel_log_clock).
fn kernel_says(since: f64) -> String {
    let out = Command::new("dmesg").output().map(|o| o.stdout).unwrap_or_default();
    let log = String::from_utf8_lossy(&out);
    let stamp = |l: &str| l.strip_prefix('[')?.split(']').next()?.trim().parse::<f64>().ok();
    // local_clock and CLOCK_MONOTONIC may drift apart a little: a second of slack.
    let mut recent = log.lines().filter(|l| stamp(l).is_some_and(|t| t >= since - 1.0));
    let line = recent.rfind(|l| l.contains("ref_ctr_offset mismatch"));
    line.map(|l| format!(" (kernel: {})", l.trim())).unwrap_or_default()
}

/// Waits for a tracer to exit (it follows the workload's exit, or gets SIGINT), returning its
/// peak RSS in KiB and its stdout.
fn finish_tracer(mut child: Child, out: mpsc::Receiver<String>) -> Result<(i64, String)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let pid = child.id() as i32;
    loop {
        let mut status = 0;
        // SAFETY: rusage is written by wait4 for our own child.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            let stdout = out.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
            return Ok((usage.ru_maxrss, stdout));
        }
        if Instant::now() > deadline {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid, libc::SIGINT) };
        }
        if Instant::now() > deadline + Duration::from_secs(10) {
            let _ = child.kill();
            bail!("a tracer did not exit");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Bytes and allocations memleak's final JSON report gives the stack through bench_leak.
fn reported_leak(stdout: &str) -> (u64, u64) {
    let Some(last) = stdout.lines().rfind(|l| l.starts_with('{')) else { return (0, 0) };
    let Ok(report) = serde_json::from_str::<Value>(last) else { return (0, 0) };
    let mut found = (0, 0);
    for s in report["stacks"].as_array().into_iter().flatten() {
        let through = s["frames"].as_array().into_iter().flatten().any(|f| f["func"] == "bench_leak");
        if through {
            found.0 += s["bytes"].as_u64().unwrap_or(0);
            found.1 += s["allocs"].as_u64().unwrap_or(0);
        }
    }
    found
}

/// Bytes and allocations of the stack through bench_leak in bcc's last text report
/// ("\t64000 bytes in 1000 allocations from stack" followed by its frames).
fn bcc_reported_leak(stdout: &str) -> (u64, u64) {
    let last = stdout.rsplit("Top 10 stacks").next().unwrap_or("");
    let mut found = (0, 0);
    let mut current = None;
    for line in last.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let [bytes, "bytes", "in", allocs, "allocations", ..] = words.as_slice() {
            current = Some((bytes.parse().unwrap_or(0), allocs.parse().unwrap_or(0)));
        } else if line.contains("bench_leak")
            && let Some(c) = current.take()
        {
            found = c;
        }
    }
    found
}

/// Milliseconds from SIGINT on an idle target to memleak's final report and to its exit, with
/// uprobe_multi links (`multi`) or the per-probe perf links older kernels get.
fn exit_latency(opts: &Opts, workload: &Path, memtrace: &Path, multi: bool) -> Result<Value> {
    let (mut report_ms, mut exit_ms) = (Vec::new(), Vec::new());
    for _ in 0..opts.runs {
        let mut w = Command::new(workload).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
        let mut lines = BufReader::new(w.stdout.take().context("stdout")?).lines();
        expect_line(&mut lines, "ready")?;
        let (mut child, ready) = crate::ready::spawn(
            Command::new(memtrace)
                .args(["memleak", "--json", "-p", &w.id().to_string()])
                .env("MEMTRACE_UPROBE_MULTI", if multi { "1" } else { "0" })
                .stdout(Stdio::piped())
                .stderr(Stdio::null()),
        )?;
        crate::ready::wait(&ready, &mut child)?;
        // The only report is the final one (the first interval is 5 s away).
        let (tx, rx) = mpsc::channel();
        let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
        std::thread::spawn(move || {
            let mut l = String::new();
            if stdout.read_line(&mut l).is_ok_and(|n| n > 0) {
                let _ = tx.send(Instant::now());
            }
            let _ = std::io::copy(&mut stdout, &mut std::io::sink());
        });
        let t0 = Instant::now();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let status = child.wait()?;
        exit_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        let reported = rx.recv_timeout(Duration::from_secs(5)).context("memleak printed no final report")?;
        report_ms.push(reported.duration_since(t0).as_secs_f64() * 1e3);
        if !status.success() {
            bail!("memleak exited with {status} after SIGINT");
        }
        let _ = w.kill();
        let _ = w.wait();
    }
    Ok(json!({ "report_ms": stats(&report_ms), "exit_ms": stats(&exit_ms) }))
}

/// mmapsnoop following this process while it maps and unmaps at a steady SNOOP_RATE calls/s
/// for 2 s: events delivered per second and events lost.
fn snoop_events(memtrace: &Path) -> Result<Value> {
    let (mut child, ready) = crate::ready::spawn(
        Command::new(memtrace)
            .args(["mmapsnoop", "--json", "-d", "3", "-p", &std::process::id().to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    )?;
    crate::ready::wait(&ready, &mut child)?;
    // Drain its output while the load runs: a full pipe would stall it and lose events.
    let mut out = child.stdout.take().context("stdout")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t0 = Instant::now();
    let mut calls = 0u64;
    while t0.elapsed() < Duration::from_secs(2) {
        for _ in 0..500 {
            // SAFETY: an anonymous page mapped and unmapped at once.
            unsafe {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                libc::munmap(p, 4096);
            }
        }
        calls += 1000;
        // Keep to the rate: a steady load, not a flood.
        let due = Duration::from_secs_f64(calls as f64 / SNOOP_RATE);
        if let Some(wait) = due.checked_sub(t0.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    let stdout = reader.join().map_err(|_| anyhow::anyhow!("the output reader panicked"))?;
    child.wait()?;
    let events = stdout.lines().filter(|l| l.starts_with('{') && !l.contains("\"final\"")).count() as u64;
    let last: Value =
        stdout.lines().rfind(|l| l.contains("\"final\"")).map(serde_json::from_str).transpose()?.unwrap_or_default();
    Ok(
        json!({ "calls_per_sec": calls as f64 / 2.0, "events_per_sec": events as f64 / 2.0, "events": events, "calls": calls, "lost": last["events_lost"] }),
    )
}

/// Kernel-mode memleak under a generated load (pipes: kmalloc and free in the kernel):
/// allocations tracked per second and anything lost.
fn kernel_events(memtrace: &Path) -> Result<Value> {
    let (mut child, ready) = crate::ready::spawn(
        Command::new(memtrace)
            .args(["memleak", "--json", "-o", "0", "2", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    )?;
    crate::ready::wait(&ready, &mut child)?;
    let t0 = Instant::now();
    let mut pipes = 0u64;
    while t0.elapsed() < Duration::from_millis(1800) {
        let mut fds = [0; 2];
        // SAFETY: pipe fills two fds, closed right after.
        if unsafe { libc::pipe(fds.as_mut_ptr()) } == 0 {
            unsafe { libc::close(fds[0]) };
            unsafe { libc::close(fds[1]) };
            pipes += 1;
        }
    }
    let mut stdout = String::new();
    child.stdout.take().context("stdout")?.read_to_string(&mut stdout)?;
    child.wait()?;
    let report: Value =
        stdout.lines().rfind(|l| l.starts_with('{')).map(serde_json::from_str).transpose()?.unwrap_or_default();
    let tracked = report["tracked"].as_u64().unwrap_or(0);
    let d = &report["blind_spots"];
    let lost = d["map_full"].as_u64().unwrap_or(0)
        + d["stacks_full"].as_u64().unwrap_or(0)
        + d["events_lost"].as_u64().unwrap_or(0);
    Ok(
        json!({ "allocations_tracked_per_sec": tracked as f64 / 2.0, "pipes_per_sec": pipes as f64 / 1.8, "lost": lost }),
    )
}

fn print_table(r: &Value) {
    println!(
        "\nmemtrace bench: {} cores, {} runs each, {} workload iterations; figures are medians [min-max]\n",
        r["cores"], r["runs"], r["iterations"]
    );
    println!(
        "{:<66} {:>24} {:>9} {:>12} {:>16} {:>9}",
        "mode", "ns/call", "x untr.", "added ns", "start-up ms", "RSS MiB"
    );
    for m in r["modes"].as_array().into_iter().flatten() {
        if let Some(why) = m["failed"].as_str() {
            println!("{:<66} failed: {why}", m["mode"].as_str().unwrap_or(""));
            continue;
        }
        let ns = &m["ns_per_call"];
        let su = &m["startup_ms"];
        println!(
            "{:<66} {:>24} {:>9.2} {:>12.0} {:>16} {:>9}",
            m["mode"].as_str().unwrap_or(""),
            format!(
                "{:.0} [{:.0}-{:.0}]",
                ns["median"].as_f64().unwrap_or(0.0),
                ns["min"].as_f64().unwrap_or(0.0),
                ns["max"].as_f64().unwrap_or(0.0)
            ),
            m["traced_over_untraced"].as_f64().unwrap_or(f64::NAN),
            m["added_ns_per_call"].as_f64().unwrap_or(0.0),
            if su.is_null() {
                "-".into()
            } else {
                format!(
                    "{:.0} [{:.0}-{:.0}]",
                    su["median"].as_f64().unwrap_or(0.0),
                    su["min"].as_f64().unwrap_or(0.0),
                    su["max"].as_f64().unwrap_or(0.0)
                )
            },
            m["peak_rss_mib"].as_f64().map_or("-".into(), |v| format!("{v:.1}")),
        );
    }
    let num = |key: &str| r[key].as_f64().unwrap_or(f64::NAN);
    println!("\nmemleak's added cost / the placed floor's: {:.3}", num("memleak_added_over_floor_added"));
    println!("memleak's added cost / the naive (+0) floor's: {:.3}", num("memleak_added_over_naive_floor_added"));
    println!("--duty-cycle 10 added cost / the placed floor's: {:.3}", num("duty_added_over_floor_added"));
    println!(
        "--unwind auto added cost / the naive (+0) floor's: {:.3}",
        num("unwind_auto_added_over_naive_floor_added")
    );
    println!("--unwind auto added cost / --unwind fp's: {:.3}", num("unwind_auto_added_over_fp_added"));
    if r["memleak_added_over_bcc_added"].is_number() {
        println!("memleak's added cost / bcc memleak's: {:.3}", num("memleak_added_over_bcc_added"));
        println!("--duty-cycle 10 added cost / bcc memleak's: {:.3}", num("duty_added_over_bcc_added"));
        println!(
            "--unwind auto (no frame pointers) added cost / bcc memleak's: {:.3}",
            num("unwind_auto_added_over_bcc_added")
        );
    } else if r["modes"].as_array().into_iter().flatten().any(|m| m["failed"].is_string()) {
        println!("bcc memleak-bpfcc: could not run here (see its row), not compared");
    } else {
        println!("bcc memleak-bpfcc: not installed here, not measured");
    }
    for m in r["modes"].as_array().into_iter().flatten() {
        let e = &m["leak_error"];
        if e.is_object() {
            println!(
                "{}: leak bytes off by {:.1}% [{:.1}-{:.1}%]",
                m["mode"].as_str().unwrap_or(""),
                100.0 * e["median"].as_f64().unwrap_or(0.0),
                100.0 * e["min"].as_f64().unwrap_or(0.0),
                100.0 * e["max"].as_f64().unwrap_or(0.0)
            );
        }
    }
    let ms = |v: &Value| {
        let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        format!("{:.0} ms [{:.0}-{:.0}]", f("median"), f("min"), f("max"))
    };
    for (key, how) in [("uprobe_multi", "uprobe_multi links"), ("perf_links", "perf links, as before 6.10")] {
        let e = &r["exit_after_sigint"][key];
        println!(
            "exit after Ctrl-C, idle target, {how}: final report {}, process gone {}",
            ms(&e["report_ms"]),
            ms(&e["exit_ms"])
        );
    }
    let k = &r["kernel_memleak"];
    println!(
        "kernel-mode memleak: {:.0} allocations tracked/s under {:.0} pipe()+close() pairs/s, {} lost",
        k["allocations_tracked_per_sec"].as_f64().unwrap_or(0.0),
        k["pipes_per_sec"].as_f64().unwrap_or(0.0),
        k["lost"]
    );
    let m = &r["mmapsnoop"];
    println!(
        "mmapsnoop: {:.0} events/s delivered of {:.0} mmap+munmap calls/s made, {} lost",
        m["events_per_sec"].as_f64().unwrap_or(0.0),
        m["calls_per_sec"].as_f64().unwrap_or(0.0),
        m["lost"]
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer whose attach fails (as bcc's did: "cannot attach uprobe, Invalid argument") is
    /// reported at once with its last words, not after 60 s as "never said it was ready".
    #[test]
    fn a_peer_that_fails_to_start_says_why() {
        let script = "echo 'cannot attach uprobe, Invalid argument' >&2; \
                      echo 'Exception: Failed to attach BPF to uprobe' >&2; exit 1";
        let peer = Tracer {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            check: Check::None,
            ready: Some("Top 10 stacks"),
        };
        let t0 = Instant::now();
        let Err(err) = start_tracer(&peer, std::process::id()) else { panic!("the peer cannot be ready") };
        assert!(t0.elapsed() < Duration::from_secs(5), "took {:?}", t0.elapsed());
        let msg = format!("{err:#}");
        assert!(msg.starts_with("sh exited (exit status: 1) before it was ready: "), "{msg}");
        assert!(msg.contains("Exception: Failed to attach BPF to uprobe"), "{msg}");
    }
}
