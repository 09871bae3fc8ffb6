//! memleak -c as a command runner, against the real kernel: the command's exit status passed
//! through, job control (stop signals, SIGCONT, Ctrl-Z of memtrace and its command), an early
//! stop that ends the command as the README says, commands that use ptrace, bad input refused
//! before anything is attached, and an exec from a thread other than the main one.

#[path = "common/mod.rs"]
mod common;
#[path = "common/ns.rs"]
mod ns;

use std::{
    io::Write,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

/// The one-letter state of a task (`T` stopped, `t` stopped under a tracer, `S` sleeping...);
/// `-` once it is gone.
fn state(pid: u32) -> char {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return '-' };
    stat.rsplit_once(')').unwrap().1.trim_start().chars().next().unwrap()
}

/// The ticks tests/progs/ticker.c has made so far.
fn ticks(file: &Path) -> u32 {
    std::fs::read_to_string(file).unwrap_or_default().trim().parse().unwrap_or(0)
}

/// `pid` is stopped and makes no progress. Under a tracer the kernel shows a stopped task as
/// `t` (tracing stop), whatever stopped it; the ticks tell it does not run.
fn assert_stopped(pid: u32, file: &Path, what: &str) {
    // The stop takes effect once the signal is delivered through memtrace.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !matches!(state(pid), 'T' | 't') {
        assert!(Instant::now() < deadline, "{what}: pid {pid} not stopped: state {}", state(pid));
        std::thread::sleep(Duration::from_millis(10));
    }
    let before = ticks(file);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(ticks(file), before, "{what}: pid {pid} ticked while stopped");
    assert!(matches!(state(pid), 'T' | 't'), "{what}: pid {pid} state {}", state(pid));
}

/// `file` ticks on within a few seconds.
fn assert_moving(file: &Path, what: &str) {
    let before = ticks(file);
    let deadline = Instant::now() + Duration::from_secs(5);
    while ticks(file) <= before + 2 {
        assert!(Instant::now() < deadline, "{what}: no progress from tick {before}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The ticker's final report: exactly `n` ticks of 100 bytes each from leak_tick.
fn assert_ticker_leak(stdout: &str, n: u64) {
    let report = final_report(stdout);
    let stacks = stacks_with(&report, "leak_tick");
    assert_eq!(stacks.len(), 1, "{report:#}");
    assert_eq!(stacks[0]["bytes"], 100 * n, "{:#}", stacks[0]);
    assert_eq!(stacks[0]["allocs"], n, "{:#}", stacks[0]);
    let frame = frame_of(stacks[0], "leak_tick").unwrap();
    assert_eq!(frame["line"], marker_line("ticker.c", "leak_tick"), "{frame:#}");
}

/// memtrace running `ticker TICKS FILE`, ready, with the command's pid.
fn ticker_under_memtrace(dir: &Path, ticks: u32, own_group: bool) -> (Running, u32, PathBuf) {
    let file = dir.join("ticks");
    let cmd = format!("{} {ticks} {}", prog("ticker").display(), file.display());
    let mut memtrace = common::memtrace();
    memtrace.args(["--ready-fd", "3", "memleak", "--json", "-c", &cmd]);
    if own_group {
        memtrace.process_group(0);
    }
    let mut mt = Running::spawn(memtrace);
    let pid = mt.wait_ready()["pid"].as_u64().unwrap() as u32;
    assert_moving(&file, "the ticker's start");
    (mt, pid, file)
}

#[test]
fn memleak_command_exit_status_is_passed_through() {
    if !bpf_available("memleak_command_exit_status_is_passed_through") {
        return;
    }
    let exit_with = prog("exit_with");
    for (arg, code) in [("3", 3), ("-11", 128 + libc::SIGSEGV), ("0", 0)] {
        let cmd = format!("{} {arg}", exit_with.display());
        let out = run(&["memleak", "--json", "-c", &cmd], Duration::from_secs(60));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{cmd}: {stderr}");
        assert!(stderr.contains(&format!("memtrace: memleak: command exited with status {code}\n")), "{stderr}");
        final_report(&String::from_utf8_lossy(&out.stdout));
    }
    // A SIGTRAP the kernel sends the command is said, with its cause, before it ends it.
    let cmd = format!("{} int3", exit_with.display());
    let out = run(&["memleak", "--json", "-c", &cmd], Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + libc::SIGTRAP), "{cmd}: {stderr}");
    let said = stderr.lines().find(|l| l.contains("gets SIGTRAP")).unwrap_or_else(|| panic!("{stderr}"));
    assert!(said.contains("from the kernel (SI_KERNEL: an int3 where no probe is registered) (si_code 128"), "{said}");
    // -p leaves the target's status alone: memtrace succeeded.
    let mut target = Command::new(&exit_with).args(["5", "read"]).stdin(Stdio::piped()).spawn().unwrap();
    let mut mt = Running::start(&["memleak", "--json", "-p", &target.id().to_string()]);
    mt.wait_ready();
    drop(target.stdin.take());
    assert_eq!(target.wait().unwrap().code(), Some(5));
    let (status, _, stderr) = mt.finish(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{stderr}");
}

/// kill -STOP and kill -TSTP stop the command, and SIGCONT continues it, as without memtrace;
/// the run then ends by itself with every tick's leak. 600 ticks (12 s): a loaded machine may take
/// seconds to deliver a stop through memtrace, and the ticker must outlast both rounds.
#[test]
fn memleak_command_stops_and_continues_with_job_control() {
    if !bpf_available("memleak_command_stops_and_continues_with_job_control") {
        return;
    }
    let dir = tempdir("memleak_job_control");
    // Its own process group: the kernel drops SIGTSTP sent to an orphaned group (as the test's
    // group is when init runs the tests, in the VM), with memtrace or without.
    let (mt, pid, file) = ticker_under_memtrace(&dir, 600, true);
    for sig in [libc::SIGSTOP, libc::SIGTSTP] {
        // SAFETY: signalling the command memtrace runs for this test.
        unsafe { libc::kill(pid as i32, sig) };
        assert_stopped(pid, &file, &format!("signal {sig}"));
        // SAFETY: as above.
        unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        assert_moving(&file, &format!("SIGCONT after signal {sig}"));
    }
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_ticker_leak(&stdout, 600);
}

/// SIGTSTP to memtrace (alone, or to its process group as a terminal's Ctrl-Z does) stops the
/// command, then memtrace, so a shell gets the terminal back; SIGCONT (`fg`) continues both.
#[test]
fn memleak_ctrl_z_stops_memtrace_and_its_command() {
    if !bpf_available("memleak_ctrl_z_stops_memtrace_and_its_command") {
        return;
    }
    let dir = tempdir("memleak_ctrl_z");
    // Its own process group, as a shell gives a job; the test (its parent) stays outside it.
    // Long enough (8 s of ticks) not to end while stopped only at its exit.
    let (mt, pid, file) = ticker_under_memtrace(&dir, 400, true);
    let memtrace = mt.pid();
    for (target, whom) in [(memtrace, "memtrace"), (-memtrace, "memtrace's process group")] {
        // SAFETY: signalling memtrace (and its command) started by this test.
        unsafe { libc::kill(target, libc::SIGTSTP) };
        assert_stopped(pid, &file, &format!("SIGTSTP to {whom}"));
        let deadline = Instant::now() + Duration::from_secs(5);
        while state(memtrace as u32) != 'T' {
            assert!(Instant::now() < deadline, "SIGTSTP to {whom}: memtrace not stopped: {}", state(memtrace as u32));
            std::thread::sleep(Duration::from_millis(10));
        }
        // SAFETY: as above.
        unsafe { libc::kill(target, libc::SIGCONT) };
        assert_moving(&file, &format!("SIGCONT to {whom}"));
        assert_ne!(state(memtrace as u32), 'T', "memtrace still stopped after SIGCONT to {whom}");
    }
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_ticker_leak(&stdout, 400);
}

/// `-d` before the command ends: the final report comes first, then the command gets SIGTERM
/// (said in one line) and memtrace exits with its status; one that ignores SIGTERM gets
/// SIGKILL after 2 s.
#[test]
fn memleak_early_stop_ends_the_command_with_sigterm() {
    if !bpf_available("memleak_early_stop_ends_the_command_with_sigterm") {
        return;
    }
    let dir = tempdir("memleak_early_stop");
    let ticker = prog("ticker");
    for (extra, code) in [("", 128 + libc::SIGTERM), (" ignore-term", 128 + libc::SIGKILL)] {
        let cmd = format!("{} 1000 {}{extra}", ticker.display(), dir.join("ticks").display());
        let started = Instant::now();
        let mut mt = Running::start(&["memleak", "--json", "-d", "1", "-c", &cmd]);
        let pid = mt.wait_ready()["pid"].as_u64().unwrap();
        let (status, stdout, stderr) = mt.finish(Duration::from_secs(30));
        let took = started.elapsed();
        assert_eq!(status.code(), Some(code), "{cmd}: {stderr}");
        let lines: Vec<&str> = stderr
            .lines()
            .filter(|l| {
                !l.starts_with("memtrace: memleak: running ")
                    && !l.starts_with("memtrace: warning: ")
                    && !l.contains(" probed through ")
                    && !l.contains(" recorded in the process ")
            })
            .collect();
        let mut expected =
            vec!["memtrace: memleak: stopped early: sent SIGTERM to the command's 1 process".to_string()];
        if code == 128 + libc::SIGKILL {
            expected.push("memtrace: memleak: 1 process of the command still running after 2 s: sent SIGKILL".into());
            assert!(took >= Duration::from_secs(3), "SIGKILL before the 2 s of grace: {took:?}");
        }
        expected.push(format!("memtrace: memleak: command exited with status {code}"));
        assert_eq!(lines, expected, "{stderr}");
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "the command outlived memtrace");
        // One final report, of what the command held when the run stopped.
        let report = final_report(&stdout);
        assert_eq!(json_lines(&stdout).iter().filter(|r| r["final"] == true).count(), 1, "{stdout}");
        let stack = stacks_with(&report, "leak_tick")[0];
        let allocs = stack["allocs"].as_u64().unwrap();
        assert!(allocs > 0, "{stack:#}");
        assert_eq!(stack["bytes"].as_u64().unwrap(), 100 * allocs, "{stack:#}");
        assert_detached("memleak");
    }
}

/// A command that asks to trace (a debugger, strace) is told in one line why it cannot.
#[test]
fn memleak_command_using_ptrace_is_told_why_it_fails() {
    if !bpf_available("memleak_command_using_ptrace_is_told_why_it_fails") {
        return;
    }
    let ptracer = prog("ptracer");
    for mode in ["traceme", "seize"] {
        let cmd = format!("{} {mode}", ptracer.display());
        let out = run(&["memleak", "--json", "-c", &cmd], Duration::from_secs(60));
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        assert!(stdout.contains(&format!("{mode}=Operation not permitted")), "{stdout}");
        let told: Vec<&str> = stderr.lines().filter(|l| l.contains("refused ptrace")).collect();
        assert_eq!(told.len(), 1, "{stderr}");
        assert!(
            told[0].starts_with("memtrace: memleak: pid ")
                && told[0].ends_with(
                    "(ptracer) was refused ptrace (Operation not permitted): memtrace already traces every process of -c, and a process has one tracer; run the program without memtrace and attach with -p PID instead"
                ),
            "{}",
            told[0]
        );
    }
}

/// Each is one line before anything is attached.
#[test]
fn memleak_command_bad_input_is_refused_before_attach() {
    if !bpf_available("memleak_command_bad_input_is_refused_before_attach") {
        return;
    }
    let dir = tempdir("memleak_runner_bad_input");
    let plain = dir.join("plain");
    std::fs::write(&plain, "#!/bin/sh\nexit 0\n").unwrap();
    let garbage = dir.join("garbage");
    std::fs::write(&garbage, [0u8, 1, 2, 3]).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&garbage, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (plain, garbage) = (plain.to_str().unwrap(), garbage.to_str().unwrap());
    assert_exact_error(
        &["memleak", "-c", plain],
        &format!(
            "{plain} is not executable (no x permission, or on a noexec mount): chmod +x it, or run it through its interpreter (-c \"sh {plain}\")"
        ),
    );
    assert_exact_error(&["memleak", "-c", garbage], &format!("cannot run {garbage}: Exec format error (os error 8)"));
    assert_exact_error_of(
        &["memleak", "--folded", "/proc/version", "-c", "true"],
        &[
            "--folded /proc/version: cannot write /proc/version: Input/output error (os error 5); give a path memtrace can write",
            "--folded /proc/version: cannot write /proc/version: I/O error (os error 5); give a path memtrace can write",
        ],
    );
    assert_exact_error(
        &["memleak", "--children", "-c", "true"],
        "--children goes with -p: -c always follows every process the command starts",
    );
}

/// tests/progs/thread_exec.c's second image: exactly its 9 blocks of 400 bytes, and nothing of
/// the first image's.
fn assert_thread_exec_leak(report: &Value, pid: u64) {
    let stacks = stacks_with(report, "leak_after_thread_exec");
    assert_eq!(stacks.len(), 1, "{report:#}");
    assert_eq!(stacks[0]["pid"], pid, "{:#}", stacks[0]);
    assert_eq!(stacks[0]["bytes"], 3600, "{:#}", stacks[0]);
    assert_eq!(stacks[0]["allocs"], 9, "{:#}", stacks[0]);
    let frame = frame_of(stacks[0], "leak_after_thread_exec").unwrap();
    assert_eq!(frame["line"], marker_line("thread_exec.c", "leak_after_thread_exec"), "{frame:#}");
    assert!(stacks_with(report, "leak_before_exec").is_empty(), "the old image's blocks live on: {report:#}");
}

/// Waits for a periodic report naming the second image's leak (`-p ... 1`).
fn wait_named(mt: &mut Running) {
    mt.wait_for("a report naming the leak", |out, _| out.iter().any(|l| l.contains("\"leak_after_thread_exec\"")));
}

/// An exec from a thread other than the main one: the exec'ing thread takes over the pid and
/// the main thread, which probes filtered by pid were tied to, is gone. Under -c the new image
/// is probed before it runs: exact, with no blind spot; also with memtrace in a pid namespace.
#[test]
fn memleak_command_follows_an_exec_from_another_thread() {
    if !bpf_available("memleak_command_follows_an_exec_from_another_thread") {
        return;
    }
    let target = prog("thread_exec");
    // Both kinds of uprobe link tie a pid filter to the main thread: uprobe_multi (6.10+) and
    // perf (MEMTRACE_UPROBE_MULTI=0, and older kernels).
    for multi in ["1", "0"] {
        let mut cmd = common::memtrace();
        cmd.env("MEMTRACE_UPROBE_MULTI", multi).args(["memleak", "--json", "-c", target.to_str().unwrap()]);
        let out =
            wait_output(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap(), Duration::from_secs(60));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        let report = final_report(&String::from_utf8_lossy(&out.stdout));
        assert_thread_exec_leak(&report, report["pid"].as_u64().unwrap());
        assert_eq!(report["blind_spots"]["late_processes"], 0, "{}", report["blind_spots"]);
    }

    let out = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", env!("CARGO_BIN_EXE_memtrace")])
        .args(["memleak", "--json", "-c", target.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_output(out, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let report = final_report(&String::from_utf8_lossy(&out.stdout));
    assert!(report["pid"].as_u64().unwrap() < 50, "a host pid: {report:#}");
    assert_thread_exec_leak(&report, report["pid"].as_u64().unwrap());
    assert_detached("memleak");
}

/// The same exec under -p: the new image is probed again once the exec is seen, and its
/// leaks, made after that, are exact.
#[test]
fn memleak_pid_follows_an_exec_from_another_thread() {
    if !bpf_available("memleak_pid_follows_an_exec_from_another_thread") {
        return;
    }
    let Ready { child: mut target, mut stdin, mut lines } = Ready::start(Command::new(prog("thread_exec")).arg("wait"));
    let pid = target.id();
    let mut mt = Running::start(&["-v", "memleak", "--json", "-o", "0", "-p", &pid.to_string(), "1"]);
    mt.wait_ready();
    writeln!(stdin).unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "exec'd");
    let followed = format!("pid {pid}: exec by a thread other than its first: probes attached again");
    mt.wait_for("the exec followed", |_, err| err.iter().any(|l| l.contains(&followed)));
    writeln!(stdin).unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "leaked");
    // Frames are named from the process's maps while it lives: end it once a report has them.
    wait_named(&mut mt);
    drop(stdin);
    assert!(target.wait().unwrap().success());
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_thread_exec_leak(&final_report(&stdout), pid as u64);
    assert_detached("memleak");
}

/// The same with memtrace and the process in a pid namespace of their own (a container): the
/// kernel side tells the exec from another thread by the host's pids, which memtrace cannot see.
#[test]
fn memleak_pid_in_a_pid_namespace_follows_an_exec_from_another_thread() {
    if !bpf_available("memleak_pid_in_a_pid_namespace_follows_an_exec_from_another_thread") {
        return;
    }
    let mut target = ns::Contained::start(&["--pid", "--fork", "--mount-proc"], "", &prog("thread_exec"), &["wait"]);
    assert_ne!(target.inside, target.global, "unshare --pid gave no new pid namespace");
    let pid = target.inside;
    let mut mt =
        Running::spawn(target.memtrace_inside(&["-v", "memleak", "--json", "-o", "0", "-p", &pid.to_string(), "1"]));
    mt.wait_ready();
    assert_eq!(target.act(), "exec'd");
    let followed = format!("pid {pid}: exec by a thread other than its first: probes attached again");
    mt.wait_for("the exec followed", |_, err| err.iter().any(|l| l.contains(&followed)));
    assert_eq!(target.act(), "leaked");
    wait_named(&mut mt);
    target.end();
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_thread_exec_leak(&final_report(&stdout), pid as u64);
    assert_detached("memleak");
}

/// A command killed with SIGKILL: where the kernel still stops it at its exit (6.18 does, even
/// with other threads), its in-process recorder is read there and the leak is exact, one tick
/// of 100 bytes per tick the ticker wrote (or one more, leaked before it could write it);
/// where the kernel skips that stop, the final report shows the last read's blocks and says
/// that a process's last moments were not seen.
#[test]
fn memleak_command_killed_by_sigkill_keeps_its_last_blocks() {
    if !bpf_available("memleak_command_killed_by_sigkill_keeps_its_last_blocks") {
        return;
    }
    let dir = tempdir("memleak_sigkill");
    let file = dir.join("ticks");
    let cmd = format!("{} 100000 {}", prog("ticker").display(), file.display());
    let mut mt = Running::start(&["memleak", "--json", "-o", "0", "-c", &cmd, "1"]);
    let pid = mt.wait_ready()["pid"].as_u64().unwrap() as i32;
    mt.wait_for("a live report with the ticks", |lines, _| {
        lines.iter().any(|l| l.starts_with('{') && l.contains("leak_tick"))
    });
    // SAFETY: kill has no memory preconditions; pid is the command, alive under memtrace.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(30));
    assert_eq!(status.code(), Some(128 + libc::SIGKILL), "{stderr}");
    let ticked = ticks(&file) as u64;
    let report = final_report(&stdout);
    let stack = stacks_with(&report, "leak_tick")[0];
    let allocs = stack["allocs"].as_u64().unwrap();
    assert_eq!(stack["bytes"].as_u64().unwrap(), 100 * allocs, "{stack:#}");
    match report["blind_spots"]["unread_exits"].as_u64() {
        Some(0) => assert!(allocs == ticked || allocs == ticked + 1, "{allocs} blocks after {ticked} ticks"),
        Some(1) => assert!(allocs > 0 && allocs <= ticked, "{allocs} blocks after {ticked} ticks"),
        other => panic!("unread_exits {other:?}: {}", report["blind_spots"]),
    }
    assert_detached("memleak");
}
