//! memleak on real targets: a live process under churn, commands that exec, wrappers and
//! shims, process trees (fork, double fork), `-p --children`, and a process that execs.

#[path = "common/mod.rs"]
mod common;

use std::{
    io::Write,
    os::unix::fs::PermissionsExt,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

/// The stacks of `pid` in `report` whose frames include `func`.
fn stacks_of<'a>(report: &'a Value, pid: u64, func: &str) -> Vec<&'a Value> {
    stacks_with(report, func).into_iter().filter(|s| s["pid"] == pid).collect()
}

/// `pid` has exactly one stack through `func`, holding `bytes` in `allocs` allocations.
fn assert_stack(report: &Value, pid: u64, func: &str, bytes: u64, allocs: u64) {
    let stacks = stacks_of(report, pid, func);
    assert_eq!(stacks.len(), 1, "pid {pid} {func}: expected one stack: {report:#}");
    let (stack, dropped) = (stacks[0], &report["blind_spots"]);
    assert_eq!(stack["bytes"], bytes, "pid {pid} {func}: {stack:#}, dropped: {dropped}");
    assert_eq!(stack["allocs"], allocs, "pid {pid} {func}: {stack:#}, dropped: {dropped}");
}

/// The pids of the processes in a report, with their parents, ordered by pid.
fn processes(report: &Value) -> Vec<(u64, Option<u64>)> {
    let mut list: Vec<(u64, Option<u64>)> = report["processes"]
        .as_array()
        .unwrap_or_else(|| panic!("no processes: {report:#}"))
        .iter()
        .map(|p| (p["pid"].as_u64().unwrap(), p["parent"].as_u64()))
        .collect();
    list.sort();
    list
}

/// Six threads churn the allocator while a leak of exactly 3,000 blocks sits still: every
/// report, live and final, must count it exactly (with the default age cut-off).
#[test]
fn memleak_live_reports_are_exact_under_churn() {
    if !bpf_available("memleak_live_reports_are_exact_under_churn") {
        return;
    }
    let Ready { child: mut target, mut stdin, mut lines } = Ready::start(&mut Command::new(prog("churn")));
    let pid = target.id();
    let mut mt = Running::start(&["memleak", "--json", "-T", "1000", "-p", &pid.to_string(), "1"]);
    mt.wait_ready();
    writeln!(stdin).unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "leaked");
    let leaked_at = Instant::now();
    // Reports that start after the leak is older than the 500 ms cut-off.
    mt.wait_for("10 reports after the leak", |out, _| {
        leaked_at.elapsed() > Duration::from_millis(600) && out.iter().filter(|l| l.starts_with('{')).count() >= 12
    });
    let first_counted = Instant::now();
    mt.wait_for("8 more reports", |out, _| {
        first_counted.elapsed() > Duration::from_millis(8500) && out.iter().filter(|l| l.starts_with('{')).count() >= 20
    });
    mt.signal(libc::SIGINT);
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(30));
    assert!(status.success(), "{status}: {stderr}");
    let reports = json_lines(&stdout);
    let counted: Vec<&Value> = reports.iter().filter(|r| !stacks_with(r, "leak_once").is_empty()).collect();
    assert!(counted.len() >= 9, "expected at least 8 live reports and a final one with the leak: {}", counted.len());
    for report in &counted {
        assert_stack(report, pid as u64, "leak_once", 3000 * 64, 3000);
    }
    // Reports made after the leak aged past the cut-off all show it.
    let last_missing = reports.iter().rposition(|r| stacks_with(r, "leak_once").is_empty());
    let first_with = reports.iter().position(|r| !stacks_with(r, "leak_once").is_empty()).unwrap();
    assert!(last_missing.is_none_or(|m| m < first_with), "a later report lost the leak: {stdout}");
    assert_eq!(reports.last().unwrap()["final"], true);
    drop(stdin);
    let _ = target.kill();
    let _ = target.wait();
    assert_detached("memleak");
}

/// The same under `-c`, where the blocks are recorded in the process itself (memtrace's
/// preloaded recorder) and read out of its memory for each report: every live report and the
/// final one count the 3,000 still blocks exactly while six threads churn.
#[test]
fn memleak_command_live_reports_are_exact_under_churn_in_process() {
    if !bpf_available("memleak_command_live_reports_are_exact_under_churn_in_process") {
        return;
    }
    let dir = tempdir("churn-in-process");
    let (fifo, out) = (dir.join("in"), dir.join("out"));
    let made = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a path we own, NUL-terminated.
    assert_eq!(unsafe { libc::mkfifo(made.as_ptr(), 0o600) }, 0);
    let cmd = format!("sh -c 'exec {} < {} > {}'", prog("churn").display(), fifo.display(), out.display());
    let mut mt = Running::start(&["memleak", "--json", "-T", "1000", "-c", &cmd, "1"]);
    mt.wait_ready();
    let mut input = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    let said = |line: &str| std::fs::read_to_string(&out).unwrap_or_default().lines().any(|l| l == line);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !said("ready") {
        assert!(Instant::now() < deadline, "churn never got ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    writeln!(input).unwrap();
    while !said("leaked") {
        assert!(Instant::now() < deadline, "churn never leaked");
        std::thread::sleep(Duration::from_millis(20));
    }
    let leaked_at = Instant::now();
    mt.wait_for("6 reports after the leak", |lines, _| {
        leaked_at.elapsed() > Duration::from_millis(6700) && lines.iter().filter(|l| l.starts_with('{')).count() >= 7
    });
    drop(input);
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(30));
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains("(churn) recorded in the process"), "{stderr}");
    let reports = json_lines(&stdout);
    let pid = pid_with(reports.last().unwrap(), "leak_once");
    let counted: Vec<&Value> = reports.iter().filter(|r| !stacks_with(r, "leak_once").is_empty()).collect();
    assert!(counted.len() >= 5, "expected live reports and a final one with the leak: {}", counted.len());
    for report in &counted {
        assert_stack(report, pid, "leak_once", 3000 * 64, 3000);
        assert_eq!(report["blind_spots"]["replaced"], 0, "{}", report["blind_spots"]);
    }
    assert_eq!(reports.last().unwrap()["final"], true);
    assert_detached("memleak");
}

/// An executable that defines malloc itself takes every call, so no preloaded recorder can
/// see them: memleak probes the executable instead, and counts its leak exactly.
#[test]
fn memleak_command_probes_an_executable_with_its_own_malloc() {
    if !bpf_available("memleak_command_probes_an_executable_with_its_own_malloc") {
        return;
    }
    let (report, stderr) = run_command(prog("own_malloc").to_str().unwrap());
    assert!(stderr.contains("(own_malloc) probed through "), "{stderr}");
    assert!(!stderr.contains("recorded in the process"), "{stderr}");
    let pid = pid_with(&report, "leak_own");
    assert_stack(&report, pid, "leak_own", 1000, 4);
}

fn leaky_leaks() -> Vec<(&'static str, u64, u64)> {
    vec![("leak_malloc", 3000, 3), ("leak_calloc", 2000, 2), ("leak_valloc", 5000, 1), ("leak_mmap", 12288, 1)]
}

/// Runs `memleak -c CMD` and returns (its final report, stderr); it must exit 0.
fn run_command(cmd: &str) -> (Value, String) {
    run_command_with(&[], cmd)
}

/// `run_command` with more of memleak's options.
fn run_command_with(extra: &[&str], cmd: &str) -> (Value, String) {
    let mut args = vec!["-v", "memleak", "--json", "-T", "200"];
    args.extend(extra);
    args.extend(["-c", cmd]);
    let out = run(&args, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{cmd}: exit {}: {stderr}", out.status);
    assert!(stderr.contains("command exited with status 0"), "{cmd}: {stderr}");
    (final_report(&String::from_utf8_lossy(&out.stdout)), stderr)
}

/// The process of `report` whose image ran `func` (the one that exec'd the leaky program).
fn pid_with(report: &Value, func: &str) -> u64 {
    let stacks = stacks_with(report, func);
    assert!(!stacks.is_empty(), "no {func} in {report:#}");
    stacks[0]["pid"].as_u64().unwrap()
}

/// A libc the loader takes from the program's own search path (DT_RPATH, then DT_RUNPATH,
/// `$ORIGIN/lib`): a copy beside the program, not the system's. memleak probes the file the
/// loader maps and counts every leak; it used to probe the system's libc and report 0 B
/// with "blind spots: none".
#[test]
fn memleak_command_probes_the_libc_its_search_path_names() {
    if !bpf_available("memleak_command_probes_the_libc_its_search_path_names") {
        return;
    }
    for flavour in [Flavour::Rpath, Flavour::Runpath] {
        let leaky = build_prog("leaky", flavour);
        let lib = leaky.parent().unwrap().join("lib");
        std::fs::create_dir_all(&lib).unwrap();
        // A copy: another file (inode) than the system's libc, with the same code.
        let copy = lib.join("libc.so.6");
        if !copy.exists() {
            std::fs::copy("/lib/x86_64-linux-gnu/libc.so.6", &copy).unwrap();
        }
        // Probes on the copy; the in-process recorder calls whatever malloc the loader bound.
        for extra in [&["--uprobes"][..], &[]] {
            let (report, stderr) = run_command_with(extra, leaky.to_str().unwrap());
            if !extra.is_empty() {
                assert!(stderr.contains(&format!("probed through {} with", copy.display())), "{flavour:?}: {stderr}");
            }
            let pid = pid_with(&report, "leak_malloc");
            for (func, bytes, allocs) in leaky_leaks() {
                assert_stack(&report, pid, func, bytes, allocs);
            }
        }
    }
}

/// A replacement allocator preloaded by name and found through LD_LIBRARY_PATH (a copy in a
/// folder of the user's): memleak probes that copy, as the loader maps it, not the system's
/// jemalloc of the same name (which used to report 0 B).
#[test]
fn memleak_command_probes_the_jemalloc_ld_library_path_names() {
    if !bpf_available("memleak_command_probes_the_jemalloc_ld_library_path_names") {
        return;
    }
    let system = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2";
    assert!(std::path::Path::new(system).exists(), "{system} is missing: `cargo xtask setup` installs libjemalloc2");
    let dir = tempdir("jemalloc-path");
    let copy = dir.join("libjemalloc.so.2");
    std::fs::copy(system, &copy).unwrap();
    let leaky = prog("leaky");
    let cmd = format!("env LD_LIBRARY_PATH={} LD_PRELOAD=libjemalloc.so.2 {}", dir.display(), leaky.display());
    for extra in [&["--uprobes"][..], &[]] {
        let (report, stderr) = run_command_with(extra, &cmd);
        if !extra.is_empty() {
            assert!(stderr.contains(&format!("probed through {} with", copy.display())), "{stderr}");
        }
        let pid = pid_with(&report, "leak_malloc");
        for (func, bytes, allocs) in leaky_leaks() {
            assert_stack(&report, pid, func, bytes, allocs);
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `-c` runs anything the kernel can exec and follows it to its final image: a shell that
/// execs, `env`, a wrapper script, and a shim found through PATH.
#[test]
fn memleak_command_follows_exec_through_shells_env_and_scripts() {
    if !bpf_available("memleak_command_follows_exec_through_shells_env_and_scripts") {
        return;
    }
    let leaky = prog("leaky");
    let leaky = leaky.to_str().unwrap();
    let dir = tempdir("memleak-shim");
    let wrapper = dir.join("wrapper.sh");
    std::fs::write(&wrapper, format!("#!/bin/sh\n# a wrapper, as many launchers are\nexec {leaky} \"$@\"\n")).unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let shim = dir.join("leaky-shim");
    std::fs::write(&shim, format!("#!/usr/bin/env bash\nexec \"{leaky}\" \"$@\"\n")).unwrap();
    std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();

    let cases = [
        format!("/bin/sh -c 'exec {leaky}'"),
        format!("env LEAKY_TEST=1 {leaky}"),
        wrapper.to_str().unwrap().to_string(),
        format!("env PATH={}:/usr/bin:/bin leaky-shim", dir.display()),
    ];
    for cmd in &cases {
        let (report, stderr) = run_command(cmd);
        assert!(!stacks_with(&report, "leak_malloc").is_empty(), "{cmd}: no leak_malloc: {stderr}\n{report:#}");
        let pid = pid_with(&report, "leak_malloc");
        for (func, bytes, allocs) in leaky_leaks() {
            assert_stack(&report, pid, func, bytes, allocs);
        }
        assert!(stacks_with(&report, "no_leak").is_empty(), "{cmd}: freed memory reported");
        assert_eq!(report["blind_spots"]["late_processes"], 0, "{cmd}: {}", report["blind_spots"]);
    }
    // A shell that runs the program as a child: the child is followed too.
    let (report, _) = run_command(&format!("/bin/sh -c '{leaky}; true'"));
    let pid = pid_with(&report, "leak_malloc");
    assert_ne!(pid, report["pid"].as_u64().unwrap(), "the leak is the child's");
    for (func, bytes, allocs) in leaky_leaks() {
        assert_stack(&report, pid, func, bytes, allocs);
    }
    assert!(processes(&report).contains(&(pid, report["pid"].as_u64())), "{:#}", report["processes"]);
    // A launcher memleak cannot probe (static, without symbols, as busybox): its child is
    // followed all the same, into the program it execs.
    let launcher = build_prog("launcher", Flavour::Static);
    let (report, stderr) = run_command(&format!("{} {leaky}", launcher.display()));
    assert!(!stacks_with(&report, "leak_malloc").is_empty(), "no leak_malloc: {stderr}\n{report:#}");
    let pid = pid_with(&report, "leak_malloc");
    assert_ne!(pid, report["pid"].as_u64().unwrap(), "the leak is the child's");
    for (func, bytes, allocs) in leaky_leaks() {
        assert_stack(&report, pid, func, bytes, allocs);
    }
    assert_eq!(report["blind_spots"]["unprobed_images"], 1, "the launcher: {}", report["blind_spots"]);
    assert_detached("memleak");
}

/// A process tree under `-c`: each process is reported with its own leaks and its copy of
/// what it inherited; a block a child frees of its inheritance is gone from the child only.
#[test]
fn memleak_command_follows_forks_and_inheritance_exactly() {
    if !bpf_available("memleak_command_follows_forks_and_inheritance_exactly") {
        return;
    }
    let family = prog("family");
    let (report, _) = run_command(family.to_str().unwrap());
    assert_family(&report);
}

/// The same tree with memtrace itself in a pid namespace of its own (as in a container): the
/// kernel's fork tracepoint names children by pids memtrace cannot see, so ptrace tells it.
#[test]
fn memleak_command_inside_a_pid_namespace_follows_forks() {
    if !bpf_available("memleak_command_inside_a_pid_namespace_follows_forks") {
        return;
    }
    let family = prog("family");
    let out = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", env!("CARGO_BIN_EXE_memtrace")])
        .args(["memleak", "--json", "-T", "200", "-c", family.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_output(out, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report = final_report(&String::from_utf8_lossy(&out.stdout));
    // Numbered by the new namespace (memtrace is its pid 1), not by the host's thousands.
    assert!(report["pid"].as_u64().unwrap() < 50, "a host pid: {report:#}");
    assert_family(&report);
    // -p --children cannot work there: said in one line, before anything is attached.
    let out = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", env!("CARGO_BIN_EXE_memtrace")])
        .args(["memleak", "-p", "1", "--children"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("memtrace: error: --children needs memtrace in the host's pid namespace"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

/// Parent, child and grandchild of tests/progs/family.c, each with exactly its own leaks and
/// its copy of what it inherited.
fn assert_family(report: &Value) {
    let report = report.clone();
    let root = report["pid"].as_u64().unwrap();
    let procs = processes(&report);
    assert_eq!(procs.len(), 3, "parent, child and grandchild: {:#}", report["processes"]);
    let child = procs.iter().find(|p| p.1 == Some(root)).expect("a child of the root").0;
    let grandchild = procs.iter().find(|p| p.1 == Some(child)).expect("a grandchild").0;

    assert_stack(&report, root, "inherited", 500, 1);
    assert_stack(&report, root, "leak_parent", 1000, 10);
    assert!(stacks_of(&report, root, "leak_child").is_empty());

    assert!(stacks_of(&report, child, "inherited").is_empty(), "the child freed its copy: {report:#}");
    assert_stack(&report, child, "leak_parent", 1000, 10);
    assert_stack(&report, child, "leak_child", 2000, 20);

    assert_stack(&report, grandchild, "leak_parent", 1000, 10);
    assert_stack(&report, grandchild, "leak_child", 2000, 20);
    assert_stack(&report, grandchild, "leak_grandchild", 3000, 30);
    let dropped = &report["blind_spots"];
    for field in ["late_processes", "unknown_frees", "map_full", "stacks_lost"] {
        assert_eq!(dropped[field], 0, "{field}: {dropped}");
    }
    for p in report["processes"].as_array().unwrap() {
        assert_eq!(p["exited"], true, "{p}");
        assert_eq!(p["exit_code"], 0, "{p}");
    }
}

/// stress-ng's malloc stressor allocates in a worker two forks below the command: the worker
/// must be in the report, with its own allocations.
#[test]
fn memleak_command_follows_stress_ng_workers() {
    if !bpf_available("memleak_command_follows_stress_ng_workers") {
        return;
    }
    let (report, _) = run_command("stress-ng --malloc 1 --malloc-ops 20000 --timeout 10s --quiet");
    let procs = processes(&report);
    assert!(procs.len() >= 3, "stress-ng, its stressor and the malloc worker: {:#}", report["processes"]);
    let worker = report["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["comm"].as_str().is_some_and(|c| c.starts_with("stress-ng-mallo")))
        .unwrap_or_else(|| panic!("no malloc worker: {:#}", report["processes"]));
    assert!(worker["parent"].is_u64(), "{worker}");
    // The parents make a few hundred allocations; only the worker's loop makes thousands.
    assert!(
        report["tracked"].as_u64().unwrap() > 10_000,
        "the worker's allocations were not seen: {}",
        report["tracked"]
    );
}

/// `-p` on a process that execs: what the old image held ends with it.
#[test]
fn memleak_pid_drops_the_old_image_at_exec() {
    if !bpf_available("memleak_pid_drops_the_old_image_at_exec") {
        return;
    }
    let Ready { child: mut target, mut stdin, mut lines } = Ready::start(&mut Command::new(prog("reexec")));
    let pid = target.id();
    let mut mt = Running::start(&["-v", "memleak", "--json", "-T", "100", "-o", "0", "-p", &pid.to_string(), "1"]);
    mt.wait_ready();
    writeln!(stdin).unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "leaked");
    // The new image is read while the process lives: a slow machine (a VM under emulation)
    // may take longer than the reports below to get there.
    let followed = format!("pid {pid}: exec into image ");
    mt.wait_for("the exec followed", |_, err| err.iter().any(|l| l.contains(&followed)));
    std::thread::sleep(Duration::from_millis(1500));
    drop(stdin);
    target.wait().unwrap();
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    for report in json_lines(&stdout).iter().skip(1) {
        assert!(stacks_with(report, "leak_before_exec").is_empty(), "the old image's blocks live on: {report:#}");
    }
    let report = final_report(&stdout);
    assert_stack(&report, pid as u64, "leak_after_exec", 2100, 7);
    assert_detached("memleak");
}

/// `-p PID --children` on a running process: its children are followed from the fork on,
/// with their inheritance; the report says they were attached late.
#[test]
fn memleak_pid_children_follows_new_processes() {
    if !bpf_available("memleak_pid_children_follows_new_processes") {
        return;
    }
    let Ready { child: mut target, mut stdin, mut lines } = Ready::start(Command::new(prog("family")).arg("wait"));
    let pid = target.id() as u64;
    let mut mt = Running::start(&["-v", "memleak", "--json", "-T", "100", "-p", &pid.to_string(), "--children"]);
    mt.wait_ready();
    writeln!(stdin).unwrap();
    // Each child waits until memtrace has followed it: attaching after the fork takes a few
    // ms here, and far longer in a VM under emulation.
    for _ in ["child", "grandchild"] {
        let line = lines.next().unwrap().unwrap();
        let forked = line.strip_prefix("child ").unwrap_or_else(|| panic!("family said {line:?}")).to_string();
        let followed = format!("pid {forked}: fork of pid ");
        mt.wait_for("the child followed", |_, err| err.iter().any(|l| l.contains(&followed)));
        writeln!(stdin).unwrap();
    }
    drop(stdin);
    assert!(target.wait().unwrap().success());
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    let report = final_report(&stdout);
    let procs = processes(&report);
    assert_eq!(procs.len(), 3, "{:#}", report["processes"]);
    let child = procs.iter().find(|p| p.1 == Some(pid)).expect("a child").0;
    let grandchild = procs.iter().find(|p| p.1 == Some(child)).expect("a grandchild").0;
    assert_stack(&report, pid, "leak_parent", 1000, 10);
    assert_stack(&report, child, "leak_parent", 1000, 10);
    assert_stack(&report, child, "leak_child", 2000, 20);
    assert!(stacks_of(&report, child, "inherited").is_empty(), "{report:#}");
    assert_stack(&report, grandchild, "leak_child", 2000, 20);
    assert_stack(&report, grandchild, "leak_grandchild", 3000, 30);
    assert_eq!(report["blind_spots"]["late_processes"], 2, "{}", report["blind_spots"]);
    assert_detached("memleak");
}
