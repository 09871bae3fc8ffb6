//! What uprobes leave in a traced process, and how fast memtrace lets go of it on Ctrl-C.

use std::{
    fs::File,
    io::{BufRead, BufReader},
    os::unix::fs::FileExt as _,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use super::memtrace;

/// Bytes of `pid`'s libc code that differ from the file: a registered uprobe is a breakpoint
/// (int3) written into the process's copy of the code, and unregistering removes it.
pub fn breakpoints_in_libc(pid: u32) -> usize {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let line = maps
        .lines()
        .find(|l| l.contains(" r-xp ") && l.contains("/libc.so.6"))
        .unwrap_or_else(|| panic!("no libc code in /proc/{pid}/maps:\n{maps}"));
    let f: Vec<&str> = line.split_whitespace().collect();
    let (start, end) = f[0].split_once('-').unwrap();
    let (start, end) = (u64::from_str_radix(start, 16).unwrap(), u64::from_str_radix(end, 16).unwrap());
    let offset = u64::from_str_radix(f[2], 16).unwrap();
    let path = f[5..].join(" ");
    let mut in_process = vec![0u8; (end - start) as usize];
    File::open(format!("/proc/{pid}/mem")).unwrap().read_exact_at(&mut in_process, start).unwrap();
    let mut on_disk = vec![0u8; in_process.len()];
    let n = File::open(&path).unwrap().read_at(&mut on_disk, offset).unwrap();
    in_process[..n].iter().zip(&on_disk[..n]).filter(|(a, b)| a != b).count()
}

/// How a Ctrl-C went: milliseconds from SIGINT to the final report and to exit.
pub struct CtrlC {
    pub report_ms: f64,
    pub exit_ms: f64,
    pub stdout: String,
    pub stderr: String,
    pub success: bool,
}

/// Starts `memtrace memleak --json -p PID` with `env`, waits until it is attached and its
/// breakpoints are in the target's libc, then sends SIGINT and times what follows.
pub fn ctrl_c_memleak(pid: u32, env: &[(&str, &str)]) -> CtrlC {
    let mut child = memtrace()
        .args(["memleak", "--json", "-p", &pid.to_string()])
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (err_tx, err_rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = err_tx.send(line);
        }
    });
    let (out_tx, out_rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = out_tx.send((Instant::now(), line));
        }
    });
    let mut err_lines = Vec::new();
    let ready_by = Instant::now() + Duration::from_secs(30);
    while !err_lines.iter().any(|l: &String| l.contains("Ctrl-C to stop")) {
        assert!(Instant::now() < ready_by, "memtrace was not ready within 30 s: {err_lines:?}");
        assert!(child.try_wait().unwrap().is_none(), "memtrace exited before it was ready: {err_lines:?}");
        err_lines.extend(err_rx.recv_timeout(Duration::from_millis(50)).ok());
    }
    assert!(breakpoints_in_libc(pid) > 0, "attached, yet no breakpoint in the target's libc");
    let t0 = Instant::now();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("memtrace did not exit within 30 s of SIGINT: {err_lines:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let exit_ms = t0.elapsed().as_secs_f64() * 1e3;
    let out: Vec<(Instant, String)> = std::iter::from_fn(|| out_rx.recv_timeout(Duration::from_secs(2)).ok()).collect();
    let report_ms = out.first().map_or(f64::INFINITY, |(t, _)| t.duration_since(t0).as_secs_f64() * 1e3);
    err_lines.extend(std::iter::from_fn(|| err_rx.recv_timeout(Duration::from_millis(200)).ok()));
    CtrlC {
        report_ms,
        exit_ms,
        stdout: out.into_iter().map(|(_, l)| l + "\n").collect(),
        stderr: err_lines.join("\n"),
        success: status.success(),
    }
}

/// Lines of tracefs' uprobe_events that memtrace or aya could have left.
pub fn our_uprobe_events() -> Vec<String> {
    let events = std::fs::read_to_string("/sys/kernel/tracing/uprobe_events").unwrap_or_default();
    events.lines().filter(|l| l.contains("aya_") || l.contains("memleak")).map(String::from).collect()
}

/// An idle process to trace: `sleep`, linked against libc.
pub fn idle_target() -> std::process::Child {
    Command::new("sleep").arg("120").spawn().unwrap()
}
