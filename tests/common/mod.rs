//! Shared by memtrace's integration tests: they run the real binary against the real kernel,
//! as root, one at a time (`--test-threads=1`: the kernel is shared state).
#![allow(dead_code, reason = "each test file uses a different part of this module")]

use std::{
    io::{BufRead, BufReader, Lines, Read},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio},
    sync::{Mutex, mpsc},
    time::{Duration, Instant},
};

use serde_json::Value;

mod progs;
mod running;
#[allow(unused_imports, reason = "each test file uses a different part")]
pub use running::{READY_FD, Running, ready_pipe};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The function and line of a JSON stack's first frame.
#[allow(dead_code, reason = "each test binary compiles this module; not all use everything")]
pub fn first_line(stack: &serde_json::Value) -> (String, u64) {
    let frame = stack.as_array().and_then(|f| f.first()).unwrap_or_else(|| panic!("empty stack: {stack}"));
    (frame["func"].as_str().unwrap_or("?").to_string(), frame["line"].as_u64().unwrap_or(0))
}

/// `func` at the line of tests/progs/`file` marked `tag`: what `first_line` should give.
#[allow(dead_code, reason = "each test binary compiles this module; not all use everything")]
pub fn tagged_at(file: &str, func: &str, tag: &str) -> (String, u64) {
    (func.to_string(), tagged_line(file, tag) as u64)
}

/// Whether memtrace finds hardware breakpoints that take an eBPF program (its `probe` rows);
/// else why not.
#[allow(dead_code, reason = "each test binary compiles this module; not all use everything")]
pub fn breakpoints() -> Result<(), String> {
    let out = run(&["probe", "--json"], Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let probe: serde_json::Value =
        json_lines(&stdout).into_iter().next().unwrap_or_else(|| panic!("no probe JSON: {stdout}"));
    for name in ["hw breakpoints", "breakpoint bpf"] {
        let f = &probe["features"][name];
        if f["state"] != "yes" {
            return Err(format!("{name}: {}", f["detail"]));
        }
    }
    Ok(())
}

/// True when the test can run: BPF (see `bpf_available`) and breakpoints (else not run).
#[allow(dead_code, reason = "each test binary compiles this module; not all use everything")]
pub fn watchable(test: &str) -> bool {
    if !bpf_available(test) {
        return false;
    }
    if kernel_version() < (6, 1) {
        not_run(test, "before Linux 6.1 a breakpoint's eBPF program may use only preallocated maps");
        return false;
    }
    match breakpoints() {
        Ok(()) => true,
        Err(why) => {
            not_run(test, &format!("no hardware breakpoints for --watch ({why})"));
            false
        }
    }
}

/// An empty folder for test `name`'s files, under target/test-tmp.
#[allow(dead_code, reason = "each test binary compiles this module; not all use everything")]
pub fn tempdir(name: &str) -> PathBuf {
    let dir = repo().join("target/test-tmp").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A test program that has said "ready": it waits on `stdin` and talks on `lines`.
pub struct Ready {
    pub child: Child,
    pub stdin: ChildStdin,
    pub lines: Lines<BufReader<ChildStdout>>,
}

impl Ready {
    pub fn start(cmd: &mut Command) -> Ready {
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        assert_eq!(lines.next().unwrap().unwrap(), "ready");
        Ready { child, stdin, lines }
    }
}

/// memtrace, as root and not through sudo even when the tests run under sudo: with
/// SUDO_UID set it would run `-c` commands as that user (tests/memleak_runas.rs sets it).
pub fn memtrace() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_memtrace"));
    cmd.env_remove("SUDO_UID").env_remove("SUDO_GID").env_remove("SUDO_USER");
    cmd
}

/// True when BPF can be used. Without it a test fails, unless MEMTRACE_ALLOW_SKIP=1, in
/// which case the caller returns early (and says so).
pub fn bpf_available(test: &str) -> bool {
    let problem = bpf_problem();
    match problem {
        None => true,
        Some(why) if std::env::var("MEMTRACE_ALLOW_SKIP").as_deref() == Ok("1") => {
            eprintln!("{test}: not run: {why} (MEMTRACE_ALLOW_SKIP=1)");
            false
        }
        Some(why) => panic!("{test} needs BPF: {why}. Run as root on a kernel with BPF, or set MEMTRACE_ALLOW_SKIP=1"),
    }
}

/// Whether the kernel has kprobes (the host has none; the VM suite's kernels do).
pub fn kprobes() -> bool {
    Path::new("/sys/bus/event_source/devices/kprobe/type").exists()
}

/// Whether the kernel has `bpf_loop` (5.17+), which memtrace's unwind tables need.
pub fn bpf_loop() -> bool {
    kernel_version() >= (5, 17)
}

/// A test that cannot run on this kernel, for `why`. In the VM suite (`MEMTRACE_NOT_RUN`
/// names the file its /init reads) it is listed as not run and the test returns; anywhere
/// else, where the machine is expected to have what the tests need, it fails.
pub fn not_run(test: &str, why: &str) {
    let Some(file) = std::env::var_os("MEMTRACE_NOT_RUN") else {
        panic!("{test} cannot run here: {why}");
    };
    let mut list = std::fs::read_to_string(&file).unwrap_or_default();
    list.push_str(&format!("{test}: {why}\n"));
    std::fs::write(&file, list).unwrap();
}

/// Whether the tests run on a machine of their own (the VM suite sets MEMTRACE_VM), where
/// they may put the whole machine under memory pressure. Elsewhere that test says so and
/// does nothing: global reclaim or compaction on a shared host would slow everything on it.
pub fn machine_of_its_own(test: &str) -> bool {
    let own = std::env::var_os("MEMTRACE_VM").is_some();
    if !own {
        eprintln!("{test}: not run: global memory pressure only on a machine of its own (cargo xtask vm-test)");
    }
    own
}

/// For tests of stacks through code built without frame pointers: true where memtrace can
/// use unwind tables. Without `bpf_loop` (before 5.17) it cannot, and says so in one warning
/// (`tests/probe.rs` checks that); the test is listed as not run.
pub fn unwind_tables(test: &str) -> bool {
    if !bpf_available(test) {
        return false;
    }
    if !bpf_loop() {
        not_run(test, "stacks through code without frame pointers need unwind tables, and so bpf_loop (5.17+)");
        return false;
    }
    true
}

/// The warning lines of memtrace's stderr, less the one a kernel without `bpf_loop` always
/// gets (see `unwind_tables`).
pub fn warnings(stderr: &str) -> Vec<&str> {
    let expected = !bpf_loop();
    stderr.lines().filter(|l| l.contains("warning") && !(expected && l.contains("bpf_loop helper"))).collect()
}

fn bpf_problem() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root".into());
    }
    // Before 5.11 maps count against RLIMIT_MEMLOCK, summed over the user's processes; the
    // tests load maps of their own, as memtrace does, so they lift it the same way.
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: a valid rlimit read by the call.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    // BPF_MAP_CREATE of a one-element array: the cheapest proof that the bpf syscall works.
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        rest: [u8; 112],
    }
    let attr = MapCreate { map_type: 2, key_size: 4, value_size: 8, max_entries: 1, rest: [0; 112] };
    // SAFETY: the attr struct is larger than the kernel reads for BPF_MAP_CREATE and zeroed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 0, &attr as *const MapCreate, size_of::<MapCreate>()) };
    if fd < 0 {
        return Some(format!("bpf(BPF_MAP_CREATE) failed: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: closing the fd just created.
    unsafe { libc::close(fd as i32) };
    None
}

static BUILD_LOCK: Mutex<()> = Mutex::new(());

pub use progs::Flavour;
#[allow(unused_imports, reason = "each test file uses a different part")]
pub use progs::{DLOPEN_LIBS, dlopen_leak_bytes, dlopen_stripped};

/// The folder of the libraries tests/progs/dlopen_many opens (see `progs::dlopen_libs`).
pub fn dlopen_libs() -> PathBuf {
    let _guard = BUILD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    progs::dlopen_libs(&repo())
}

/// Builds `tests/progs/<name>` (a .c, .cpp or .rs file) once per test run, with frame pointers
/// and debug info, unoptimised so that each source call stays one call site.
pub fn prog(name: &str) -> PathBuf {
    build_prog(name, Flavour::Debug)
}

/// Builds `tests/progs/<name>` optimised and without frame pointers, with debug info.
pub fn prog_nofp(name: &str) -> PathBuf {
    build_prog(name, Flavour::NoFramePointers)
}

/// `progs::build`, one build at a time.
pub fn build_prog(name: &str, flavour: Flavour) -> PathBuf {
    let _guard = BUILD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    progs::build(&repo(), name, flavour)
}

/// target/progs/demo, built as `cargo xtask demo` builds it (the README's first example).
pub fn demo_program() -> PathBuf {
    let _guard = BUILD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    progs::demo(&repo())
}

/// The line of `tests/progs/<file>` that carries the marker `LEAK:<name>`.
pub fn marker_line(file: &str, name: &str) -> u32 {
    tagged_line(file, &format!("LEAK:{name}"))
}

/// The line of tests/progs/`file` that carries the comment tag `tag` (`ERROR:free_local`).
pub fn tagged_line(file: &str, tag: &str) -> u32 {
    let text = std::fs::read_to_string(repo().join("tests/progs").join(file)).unwrap();
    let marker = format!("{tag} ");
    let alt = format!("{tag}\n");
    text.lines()
        .position(|l| l.contains(&marker) || format!("{l}\n").contains(&alt))
        .map(|i| i as u32 + 1)
        .unwrap_or_else(|| panic!("no {tag} marker in {file}"))
}

/// (function, bytes, allocations) that tests/progs/leaky.c leaks.
pub const LEAKY_C: &[(&str, u64, u64)] = &[
    ("leak_malloc", 3000, 3),
    ("leak_calloc", 2000, 2),
    ("leak_realloc", 700, 1),
    ("leak_realloc_null", 300, 1),
    ("leak_reallocarray", 360, 1),
    ("leak_posix_memalign", 640, 1),
    ("leak_aligned_alloc", 1280, 1),
    ("leak_memalign", 2560, 1),
    ("leak_valloc", 5000, 1),
    ("leak_pvalloc", 6000, 1),
    ("leak_mmap", 12288, 1),
];

/// Each leaking function appears in exactly one stack with its exact bytes, count and the
/// file:line of its allocation call; freed memory appears nowhere.
pub fn assert_leaks(report: &Value, file: &str, leaks: &[(&str, u64, u64)], not_leaking: &str) {
    for &(func, bytes, allocs) in leaks {
        let stacks = stacks_with(report, func);
        assert_eq!(stacks.len(), 1, "{func}: expected one stack, got {}: {report:#}", stacks.len());
        let stack = stacks[0];
        assert_eq!(stack["bytes"], bytes, "{func}: bytes: {stack:#}");
        assert_eq!(stack["allocs"], allocs, "{func}: allocations: {stack:#}");
        let frame = frame_of(stack, func).unwrap();
        assert!(frame["file"].as_str().is_some_and(|f| f.ends_with(file)), "{func}: file: {frame:#}");
        assert_eq!(frame["line"], marker_line(file, func), "{func}: line: {frame:#}");
        assert_eq!(stack["pid"], report["pid"], "{func}: keyed by another pid: {stack:#}");
    }
    assert!(stacks_with(report, not_leaking).is_empty(), "freed memory reported: {report:#}");
}

/// Runs memtrace to completion with a time limit, returning its output.
pub fn run(args: &[&str], limit: Duration) -> Output {
    let child = memtrace().args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_output(child, limit)
}

/// Waits for a child with a time limit; a hang kills it and fails the test. Its output is read
/// meanwhile: a child that fills a pipe nobody reads never exits.
pub fn wait_output(mut child: Child, limit: Duration) -> Output {
    let (stdout, stderr) = (read_all(child.stdout.take()), read_all(child.stderr.take()));
    // A grandchild that outlives the child may hold the pipe open: wait a little, not forever.
    let collect = |rx: mpsc::Receiver<Vec<u8>>| rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Output { status, stdout: collect(stdout), stderr: collect(stderr) };
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "memtrace did not finish within {limit:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&collect(stdout)),
                String::from_utf8_lossy(&collect(stderr))
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Everything `pipe` yields until it closes, read on a thread of its own.
fn read_all<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut pipe) = pipe {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            let _ = tx.send(bytes);
        });
    }
    rx
}

/// The running kernel's (major, minor) version.
pub fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// A hex string (`0x...`, as the test programs print addresses) as a number.
pub fn unhex(v: &str) -> u64 {
    u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap_or_else(|e| panic!("{v}: {e}"))
}

/// What `snoop_one_act` saw.
pub struct SnoopRun {
    pub pid: u32,
    /// The `key=value` pairs the program printed when it acted.
    pub got: std::collections::HashMap<String, String>,
    pub events: Vec<Value>,
    pub last: Value,
    pub stdout: String,
}

/// `memtrace TOOL --json -p PID` following tests/progs/<prog> while it acts once and exits,
/// with the `n` events the tool sent waited for while the program still lives (tools read its
/// /proc).
pub fn snoop_one_act(tool: &str, prog: &str, n: usize) -> SnoopRun {
    let mut target = Gated::start(prog);
    let pid = target.pid();
    let mut mt = Running::start(&[tool, "--json", "-p", &pid.to_string()]);
    mt.wait_ready();
    let got = target.act();
    mt.wait_lines("{", n);
    target.end();
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains(&format!("process {pid} exited")), "{stderr}");
    let (events, last) = events_and_final(&stdout);
    SnoopRun { pid, got, events, last, stdout }
}

/// An address, hint or flags value as memtrace's JSON writes it: a hex string.
pub fn hx(v: u64) -> String {
    format!("{v:#x}")
}

/// The JSON reports memtrace printed, one per line.
pub fn json_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l}: {e}")))
        .collect()
}

/// The stacks of a report that have a frame whose function name ends with `func`.
pub fn stacks_with<'a>(report: &'a Value, func: &str) -> Vec<&'a Value> {
    report["stacks"].as_array().expect("report has stacks").iter().filter(|s| frame_of(s, func).is_some()).collect()
}

pub fn frame_of<'a>(stack: &'a Value, func: &str) -> Option<&'a Value> {
    stack["frames"].as_array()?.iter().find(|f| is_named(f, func))
}

/// True when the frame's function is `func`, or `func` in some module (`crate::func`).
pub fn is_named(frame: &Value, func: &str) -> bool {
    frame["func"].as_str().is_some_and(|n| n == func || n.ends_with(&format!("::{func}")))
}

/// Checks a report's count of the frames its stacks show (`counts`, its `unnamed_frames`):
/// every frame counted, and every frame without a function name counted once, by its cause.
pub fn assert_unnamed_counted(report: &Value, counts: &Value) {
    let frames: Vec<&Value> =
        report["stacks"].as_array().unwrap().iter().flat_map(|s| s["frames"].as_array().unwrap()).collect();
    assert_eq!(counts["frames"], frames.len(), "frames shown: {counts} {report:#}");
    let bare: Vec<&&Value> = frames.iter().filter(|f| f["func"].is_null()).collect();
    let counted: u64 = ["no_mapping", "anonymous", "unreadable", "no_symbol", "vdso"]
        .iter()
        .map(|k| counts[k].as_u64().unwrap_or_else(|| panic!("no unnamed_frames.{k}: {counts}")))
        .sum();
    assert_eq!(bare.len() as u64, counted, "frames without a name: {counts} {bare:#?}");
    assert!(bare.iter().all(|f| f["unnamed"].is_string()), "a frame without a name says why: {bare:#?}");
}

/// Names of the BPF programs loaded in the kernel right now.
pub fn loaded_program_names() -> Vec<String> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| p.name_as_str().unwrap_or_default().to_string())
        .collect()
}

/// Fails if any program of `tool` is still loaded after memtrace exited.
pub fn assert_detached(tool: &str) {
    // Program fds close with the process; the kernel frees the programs after RCU grace
    // periods, which take seconds on a slow (emulated) machine.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left: Vec<String> =
            loaded_program_names().into_iter().filter(|n| n.starts_with(&format!("{tool}_"))).collect();
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "programs still loaded after memtrace exited: {left:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs memtrace with bad input: it must exit 1 with one line, `memtrace: error: ...` containing
/// `expect`, print nothing on stdout, and leave none of the tool's (`args[0]`) programs loaded.
pub fn assert_one_line_error(args: &[&str], expect: &str) {
    let out = run(args, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one line: {stderr}");
    assert!(lines[0].starts_with("memtrace: error: ") && lines[0].contains(expect), "{args:?}: {stderr}");
    assert!(out.stdout.is_empty(), "{args:?}: {}", String::from_utf8_lossy(&out.stdout));
    assert_detached(args[0]);
}

/// Like `assert_one_line_error`, with the whole message given: `memtrace: error: {message}`.
pub fn assert_exact_error(args: &[&str], message: &str) {
    assert_exact_error_of(args, &[message]);
}

/// `assert_exact_error` where the message is one of `messages`: a system error's text is
/// glibc's or musl's ("Input/output error", "I/O error"), as memtrace was built.
pub fn assert_exact_error_of(args: &[&str], messages: &[&str]) {
    let out = run(args, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(
        messages.iter().any(|m| stderr == format!("memtrace: error: {m}\n")),
        "{args:?}: {stderr:?} is none of {messages:?}"
    );
    assert!(out.stdout.is_empty(), "{args:?}: {}", String::from_utf8_lossy(&out.stdout));
    assert_detached(args[0]);
}

/// A test program that prints "ready", acts when it reads a line, prints one line of
/// `key=value` results, and exits at end of input: the tracer attaches in between.
pub struct Gated {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    stdout: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Gated {
    /// Starts tests/progs/<name> and waits for its "ready".
    pub fn start(name: &str) -> Gated {
        Gated::spawn(Command::new(prog(name)))
    }

    /// Starts `cmd`, a gated program run some other way (with arguments or environment), and
    /// waits for its "ready".
    pub fn spawn(mut cmd: Command) -> Gated {
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        assert_eq!(stdout.next().unwrap().unwrap(), "ready", "{cmd:?}");
        Gated { stdin: child.stdin.take(), child, stdout }
    }

    /// Whether the program is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Makes the program act; returns the line it printed.
    pub fn act_line(&mut self) -> String {
        use std::io::Write as _;
        writeln!(self.stdin.as_mut().unwrap()).unwrap();
        self.stdout.next().unwrap().unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Makes the program act; returns the `key=value` pairs it printed.
    pub fn act(&mut self) -> std::collections::HashMap<String, String> {
        let line = self.act_line();
        line.split(' ').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// Lets the program exit, and checks it succeeded.
    pub fn end(mut self) {
        drop(self.stdin.take());
        assert!(self.child.wait().unwrap().success());
    }
}

/// Checks the fields of `expected` in `event`, naming the event on failure.
pub fn assert_fields(event: &Value, expected: &Value) {
    for (key, want) in expected.as_object().unwrap() {
        assert_eq!(&event[key], want, "field {key} of {event:#}");
    }
}

/// The last JSON report, which must be marked final.
pub fn final_report(stdout: &str) -> Value {
    let last = json_lines(stdout).pop().unwrap_or_else(|| panic!("no JSON report in:\n{stdout}"));
    assert_eq!(last["final"], true, "the last report is not marked final: {last}");
    last
}

/// Splits a tracer's JSON output into its events and its final object.
pub fn events_and_final(stdout: &str) -> (Vec<Value>, Value) {
    let mut lines = json_lines(stdout);
    let last = lines.pop().unwrap_or_else(|| panic!("no JSON in:\n{stdout}"));
    assert_eq!(last["final"], true, "the last object is not the final one: {last}");
    (lines, last)
}

/// The system's glibc where `memtrace probe` looks for it (merged /usr first).
pub fn system_libc() -> PathBuf {
    [
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/usr/lib64/libc.so.6",
        "/lib64/libc.so.6",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .expect("a libc.so.6")
}

/// Whether the ELF file at `path` has USDT probes: a `.note.stapsdt` section named in it.
pub fn has_usdt_notes(path: &Path) -> bool {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes.windows(b".note.stapsdt".len()).any(|w| w == b".note.stapsdt")
}

/// The libc.so.6 process `pid` maps, by the path in its /proc/PID/maps.
pub fn mapped_libc(pid: u32) -> String {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let line = maps.lines().find(|l| l.ends_with("/libc.so.6")).unwrap_or_else(|| panic!("no libc in {maps}"));
    line.split_whitespace().last().unwrap().to_string()
}

/// `memtrace faults --json -p PID EXTRA...` on tests/progs/faults_touch, which writes one byte
/// to each of 256 fresh pages: the final report, and touch_pages's faults (one stack, at
/// least one fault per page).
pub fn faults_of_touch_pages(extra: &[&str]) -> (Value, u64) {
    const PAGES: u64 = 256;
    use std::io::Write as _;
    let Ready { mut child, mut stdin, lines } = Ready::start(&mut Command::new(prog("faults_touch")));
    let pid = child.id().to_string();
    let mut args = vec!["faults", "--json", "-p", &pid];
    args.extend_from_slice(extra);
    let mut mt = Running::start(&args);
    mt.wait_ready();
    writeln!(stdin).unwrap();
    let said: Vec<String> = lines.map(Result::unwrap).take_while(|l| l != "done").collect();
    assert_eq!(said.len(), 2, "{said:?}");
    drop(stdin);
    child.wait().unwrap();
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    assert_detached("faults");
    let report = final_report(&stdout);
    let stacks = stacks_with(&report, "touch_pages");
    assert_eq!(stacks.len(), 1, "{report:#}");
    let faults = stacks[0]["faults"].as_u64().unwrap();
    assert!(faults >= PAGES, "{report:#}");
    (report, faults)
}

/// The memory cgroup of a live process, as records carry it: the `memory` line of
/// /proc/PID/cgroup on cgroup v1, the `0::` line on v2; None without a memory hierarchy.
pub fn memory_cgroup(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let v1 = text.lines().find_map(|l| {
        let (_, rest) = l.split_once(':')?;
        let (controllers, path) = rest.split_once(':')?;
        controllers.split(',').any(|c| c == "memory").then(|| path.to_string())
    });
    v1.or_else(|| {
        let v2_memory = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"));
        if v2_memory { text.lines().find_map(|l| l.strip_prefix("0::")).map(str::to_string) } else { None }
    })
}
