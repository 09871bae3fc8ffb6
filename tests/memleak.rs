//! memleak against the real kernel: exact leaks per entry point, attach by PID, kernel mode,
//! bad input, and clean detach.

#[path = "common/mod.rs"]
mod common;
#[path = "common/ns.rs"]
mod ns;

use std::{
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
    time::Duration,
};

use common::*;
use serde_json::Value;

/// (function, bytes, allocations) that tests/progs/leaky.c leaks.
const LEAKY_C: &[(&str, u64, u64)] = &[
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

fn final_report(stdout: &str) -> Value {
    let reports = json_lines(stdout);
    let last = reports.last().unwrap_or_else(|| panic!("no JSON report in:\n{stdout}")).clone();
    assert_eq!(last["final"], true, "the last report is not marked final: {last}");
    last
}

/// Each leaking function appears in exactly one stack with its exact bytes, count and the
/// file:line of its allocation call; freed memory appears nowhere.
fn assert_leaks(report: &Value, file: &str, leaks: &[(&str, u64, u64)], not_leaking: &str) {
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

#[test]
fn memleak_command_reports_every_entry_point_exactly() {
    if !bpf_available("memleak_command_reports_every_entry_point_exactly") {
        return;
    }
    let leaky = prog("leaky");
    let out = run(&["memleak", "--json", "-T", "100", "-c", leaky.to_str().unwrap()], Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {}: {stderr}", out.status);
    assert!(stderr.contains("command exited with status 0"), "{stderr}");
    let report = final_report(&stdout);
    assert_leaks(&report, "leaky.c", LEAKY_C, "no_leak");
    let dropped = &report["dropped"];
    for field in ["map_full", "stacks_lost", "stacks_full", "events_lost"] {
        assert_eq!(dropped[field], 0, "blind spot {field}: {dropped}");
    }
    assert_detached("memleak");
}

#[test]
fn memleak_rust_program_through_the_global_allocator() {
    if !bpf_available("memleak_rust_program_through_the_global_allocator") {
        return;
    }
    let leaky = prog("leaky_rs");
    let out = run(&["memleak", "--json", "-T", "100", "-c", leaky.to_str().unwrap()], Duration::from_secs(60));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report = final_report(&String::from_utf8_lossy(&out.stdout));
    assert_leaks(&report, "leaky_rs.rs", &[("leak_boxed_array", 4096, 1), ("leak_vec_capacity", 3000, 2)], "no_leak");
    // Rust names come out demangled, with their module path.
    let stack = stacks_with(&report, "leak_boxed_array")[0];
    assert_eq!(frame_of(stack, "leak_boxed_array").unwrap()["func"], "leaky_rs::leak_boxed_array");
}

/// Attach to a running process by PID; it leaks after attach, then exits while traced:
/// memleak prints its final report and exits 0 by itself.
#[test]
fn memleak_pid_follows_a_process_until_it_exits() {
    if !bpf_available("memleak_pid_follows_a_process_until_it_exits") {
        return;
    }
    let mut target =
        Command::new(prog("leaky")).arg("wait").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(target.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    let pid = target.id().to_string();
    let mut mt = Running::start(&["memleak", "--json", "-T", "100", "-o", "0", "-p", &pid, "1"]);
    mt.wait_ready();
    let mut stdin = target.stdin.take().unwrap();
    writeln!(stdin).unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "leaked");
    // Let one periodic report pass while the process is alive, then let it exit.
    std::thread::sleep(Duration::from_millis(1500));
    drop(stdin);
    target.wait().unwrap();
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains(&format!("process {pid} exited")), "{stderr}");
    let reports = json_lines(&stdout);
    assert!(reports.len() >= 2, "expected a periodic and a final report: {stdout}");
    let report = final_report(&stdout);
    assert_eq!(report["pid"], target.id());
    assert_leaks(&report, "leaky.c", LEAKY_C, "no_leak");
    assert_detached("memleak");
}

#[test]
fn memleak_kernel_mode_shows_kmalloc_stacks() {
    if !bpf_available("memleak_kernel_mode_shows_kmalloc_stacks") {
        return;
    }
    let mut mt = Running::start(&["memleak", "--json", "-o", "0", "-T", "400", "2", "1"]);
    mt.wait_ready();
    // Pipes allocate their pipe_inode_info with kmalloc and keep it while open.
    let mut pipes = Vec::new();
    for _ in 0..64 {
        let mut fds = [0; 2];
        // SAFETY: pipe writes two fds.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        pipes.push(fds);
    }
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(30));
    for fds in pipes {
        // SAFETY: closing fds we opened.
        unsafe { libc::close(fds[0]) };
        unsafe { libc::close(fds[1]) };
    }
    assert!(status.success(), "{status}: {stderr}");
    let report = final_report(&stdout);
    assert_eq!(report["mode"], "kernel");
    let pipe_stacks = stacks_with(&report, "alloc_pipe_info");
    assert!(!pipe_stacks.is_empty(), "no stack through alloc_pipe_info: {report:#}");
    let allocs: u64 = pipe_stacks.iter().map(|s| s["allocs"].as_u64().unwrap()).sum();
    assert!(allocs >= 64, "64 pipes held open, {allocs} allocations seen: {report:#}");
    assert!(pipe_stacks[0]["frames"][0]["module"] == "[kernel]", "{:#}", pipe_stacks[0]);
    assert_detached("memleak");
}

#[test]
fn memleak_bad_input_gets_one_line_errors() {
    if !bpf_available("memleak_bad_input_gets_one_line_errors") {
        return;
    }
    assert_one_line_error(&["memleak", "-p", "999999999"], "no such process: 999999999");
    assert_one_line_error(&["memleak", "-c", "/nonexistent/prog"], "no such program: /nonexistent/prog");
    let me = std::process::id().to_string();
    assert_one_line_error(&["memleak", "-p", &me, "-O", "/etc/passwd"], "/etc/passwd is not an ELF");
    let true_bin = prog("leaky");
    assert_one_line_error(
        &["memleak", "-p", &me, "--symbols-prefix", "nosuch_", "-O", true_bin.to_str().unwrap()],
        "has no nosuch_malloc",
    );
    assert_one_line_error(&["memleak", "-p", &me, "-s", "0"], "--sample-rate must be at least 1");
}

#[test]
fn memleak_refuses_to_run_without_root() {
    // Needs no BPF: the check comes first. setpriv drops to nobody.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            env!("CARGO_BIN_EXE_memtrace"),
            "memleak",
            "-p",
            "1",
        ])
        .output()
        .expect("setpriv (util-linux) runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.trim()
            == "memtrace: error: must run as root: loading eBPF programs needs CAP_BPF and CAP_PERFMON (try sudo)",
        "{stderr}"
    );
}

/// SIGINT and SIGTERM: final report, detach, exit 0; the target keeps running unharmed.
#[test]
fn memleak_signals_print_a_final_report_and_detach() {
    if !bpf_available("memleak_signals_print_a_final_report_and_detach") {
        return;
    }
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let mut target =
            Command::new(prog("leaky")).arg("wait").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
        let mut lines = BufReader::new(target.stdout.take().unwrap()).lines();
        assert_eq!(lines.next().unwrap().unwrap(), "ready");
        let pid = target.id().to_string();
        let mut mt = Running::start(&["memleak", "--json", "-T", "100", "-o", "0", "-p", &pid]);
        mt.wait_ready();
        let mut stdin = target.stdin.take().unwrap();
        writeln!(stdin).unwrap();
        assert_eq!(lines.next().unwrap().unwrap(), "leaked");
        mt.signal(sig);
        let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
        assert!(status.success(), "signal {sig}: {status}: {stderr}");
        let report = final_report(&stdout);
        assert_eq!(stacks_with(&report, "leak_malloc")[0]["bytes"], 3000, "signal {sig}: {report:#}");
        assert_detached("memleak");
        assert!(target.try_wait().unwrap().is_none(), "the target died with memtrace");
        drop(stdin);
        assert!(target.wait().unwrap().success());
    }
}

/// A replacement allocator preloaded into the command is found and probed by default; what it
/// lacks (mmap, pvalloc) is still probed in libc, so every leak is reported exactly.
#[test]
fn memleak_follows_a_preloaded_jemalloc() {
    if !bpf_available("memleak_follows_a_preloaded_jemalloc") {
        return;
    }
    let jemalloc = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2";
    assert!(
        std::path::Path::new(jemalloc).exists(),
        "{jemalloc} is missing: `cargo xtask setup` installs libjemalloc2"
    );
    let leaky = prog("leaky");
    let child = memtrace()
        .args(["memleak", "--json", "-T", "100", "-c", leaky.to_str().unwrap()])
        .env("LD_PRELOAD", jemalloc)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_output(child, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("through {jemalloc}")), "{stderr}");
    let report = final_report(&String::from_utf8_lossy(&out.stdout));
    assert_leaks(&report, "leaky.c", LEAKY_C, "no_leak");
    assert_detached("memleak");
}

/// A container whose libc differs from the host's: the target maps its own file at the usual
/// path, and memleak must probe that file (through /proc/PID/root), not the host's.
#[test]
fn memleak_probes_the_libc_of_a_target_in_another_mount_namespace() {
    if !bpf_available("memleak_probes_the_libc_of_a_target_in_another_mount_namespace") {
        return;
    }
    let host_libc = std::fs::canonicalize("/lib/x86_64-linux-gnu/libc.so.6").unwrap();
    // Same content, another inode: a probe on the host's file never fires in the container.
    let copy = repo().join("target/test-progs/container-libc.so.6");
    std::fs::copy(&host_libc, &copy).unwrap();
    let setup = format!("mount --bind '{}' '{}' || exit 99", copy.display(), host_libc.display());
    let mut target = ns::Contained::start(&["--mount", "--propagation", "private"], &setup, &prog("leaky"), &["wait"]);
    let pid = target.global.to_string();
    let host_inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&host_libc).unwrap());
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mapped = maps.lines().find(|l| l.ends_with(host_libc.to_str().unwrap())).expect("the target maps libc");
    let mapped_inode: u64 = mapped.split_whitespace().nth(4).unwrap().parse().unwrap();
    assert_ne!(mapped_inode, host_inode, "the bind mount did not give the target another libc: {mapped}");

    let mut mt = Running::start(&["memleak", "--json", "-T", "100", "-o", "0", "-p", &pid, "1"]);
    mt.wait_ready();
    assert_eq!(target.act(), "leaked");
    std::thread::sleep(Duration::from_millis(1500));
    target.end();
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    let through = format!("through /proc/{pid}/root{}", host_libc.display());
    assert!(stderr.contains(&through), "expected {through:?}: {stderr}");
    let report = final_report(&stdout);
    assert_eq!(report["pid"], target.global);
    assert_leaks(&report, "leaky.c", LEAKY_C, "no_leak");
    assert_detached("memleak");
}

/// memtrace itself in a pid namespace (as in a container) tracing a process there: the pids
/// the kernel side reports are the namespace's, so /proc is read for the right process and
/// every leak is named.
#[test]
fn memleak_inside_a_pid_namespace_names_every_frame() {
    if !bpf_available("memleak_inside_a_pid_namespace_names_every_frame") {
        return;
    }
    let mut target = ns::Contained::start(&["--pid", "--fork", "--mount-proc"], "", &prog("leaky"), &["wait"]);
    assert_ne!(target.inside, target.global, "unshare --pid gave no new pid namespace");
    let pid = target.inside.to_string();
    let mut mt =
        Running::spawn(target.memtrace_inside(&["memleak", "--json", "-T", "100", "-o", "0", "-p", &pid, "1"]));
    mt.wait_ready();
    assert_eq!(target.act(), "leaked");
    std::thread::sleep(Duration::from_millis(1500));
    target.end();
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains(&format!("process {pid} exited")), "{stderr}");
    let report = final_report(&stdout);
    assert_eq!(report["pid"], target.inside);
    assert_leaks(&report, "leaky.c", LEAKY_C, "no_leak");
    for (func, _, _) in LEAKY_C {
        let stack = stacks_with(&report, func)[0];
        assert!(frame_of(stack, "main").is_some(), "{func}: no main frame: {stack:#}");
    }
    assert_detached("memleak");
}

/// A library replaced on disk after the target loaded it (an upgrade): the path now names
/// another file, and memleak must probe the one mapped, through /proc/PID/map_files.
#[test]
fn memleak_probes_a_replaced_libc_through_map_files() {
    if !bpf_available("memleak_probes_a_replaced_libc_through_map_files") {
        return;
    }
    let dir = repo().join("target/test-progs/replaced-libc");
    std::fs::create_dir_all(&dir).unwrap();
    let libc = dir.join("libc.so.6");
    std::fs::copy(std::fs::canonicalize("/lib/x86_64-linux-gnu/libc.so.6").unwrap(), &libc).unwrap();
    let mut target = Command::new(prog("leaky"))
        .arg("wait")
        .env("LD_LIBRARY_PATH", &dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(target.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    let pid = target.id().to_string();
    // Replace it as a package manager does: a new file renamed over the old one.
    let new = dir.join("libc.so.6.new");
    std::fs::copy(&libc, &new).unwrap();
    std::fs::rename(&new, &libc).unwrap();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(maps.contains(&format!("{} (deleted)", libc.display())), "the target does not map the old file: {maps}");

    let mut mt = Running::start(&["memleak", "--json", "-T", "100", "-o", "0", "-p", &pid, "1"]);
    mt.wait_ready();
    let mut stdin = target.stdin.take().unwrap();
    writeln!(stdin).unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "leaked");
    std::thread::sleep(Duration::from_millis(1500));
    drop(stdin);
    target.wait().unwrap();
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains(&format!("through /proc/{pid}/map_files/")), "{stderr}");
    let report = final_report(&stdout);
    assert_leaks(&report, "leaky.c", LEAKY_C, "no_leak");
    assert_detached("memleak");
}
