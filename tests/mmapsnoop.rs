//! mmapsnoop against the real kernel: the exact calls of tests/progs/mmapsnoop_maps.c (lengths,
//! decoded protection and flags, the file behind a file mapping, errno names, addresses that
//! match across calls), --failed, the table, bad input, and clean detach.

#[path = "common/mod.rs"]
mod common;
#[path = "common/ns.rs"]
mod ns;

use std::time::Duration;

use common::*;
use serde_json::json;

const PAGE: u64 = 4096;

#[test]
fn mmapsnoop_reports_each_call_exactly() {
    if !bpf_available("mmapsnoop_reports_each_call_exactly") {
        return;
    }
    let SnoopRun { pid, got, events, last, stdout } = snoop_one_act("mmapsnoop", "mmapsnoop_maps", 7);
    assert_eq!(last, json!({ "final": true, "events": 7, "events_lost": 0 }));

    let (anon, file, small, grown, closed) =
        (unhex(&got["anon"]), unhex(&got["file"]), unhex(&got["small"]), unhex(&got["grown"]), unhex(&got["closed"]));
    let fd: i64 = got["fd"].parse().unwrap();
    let path = &got["path"];
    let calls: Vec<&str> = events.iter().map(|e| e["call"].as_str().unwrap()).collect();
    assert_eq!(calls, ["mmap", "mmap", "mmap", "munmap", "mmap", "mremap", "mmap"], "{stdout}");
    for e in &events {
        assert_fields(e, &json!({ "pid": pid, "tid": pid, "comm": "mmapsnoop_maps" }));
    }
    assert_fields(
        &events[0],
        &json!({
            "addr": hx(anon), "ret": anon, "error": null, "hint": "0x0", "len": 3 * PAGE,
            "prot": "0x3", "prot_str": "PROT_READ|PROT_WRITE",
            "flags": "0x22", "flags_str": "MAP_PRIVATE|MAP_ANONYMOUS",
            "fd": -1, "offset": 0, "path": null, "path_source": null,
        }),
    );
    assert_fields(
        &events[1],
        &json!({
            "addr": hx(file), "error": null, "len": 5 * PAGE,
            "prot": "0x1", "prot_str": "PROT_READ", "flags": "0x1", "flags_str": "MAP_SHARED",
            "fd": fd, "offset": 0, "path": path, "path_source": "fd",
        }),
    );
    assert_fields(
        &events[2],
        &json!({
            "addr": null, "ret": -9, "error": "EBADF", "len": PAGE,
            "prot_str": "PROT_READ", "flags_str": "MAP_PRIVATE",
            "fd": 1000, "path": null, "path_source": "unknown",
        }),
    );
    assert_fields(&events[3], &json!({ "addr": hx(anon), "len": 3 * PAGE, "ret": 0, "error": null }));
    assert_fields(
        &events[4],
        &json!({ "addr": hx(small), "len": 2 * PAGE, "prot_str": "PROT_READ|PROT_WRITE", "flags_str": "MAP_PRIVATE|MAP_ANONYMOUS" }),
    );
    assert_fields(
        &events[5],
        &json!({
            "addr": hx(grown), "ret": grown, "error": null, "old_addr": hx(small),
            "old_len": 2 * PAGE, "new_len": 8 * PAGE, "flags": "0x1", "flags_str": "MREMAP_MAYMOVE",
        }),
    );
    // The program closed this fd right after mmap: found through the fd if memtrace was
    // quicker than close(), otherwise through the mapping; the same file either way.
    assert_fields(
        &events[6],
        &json!({
            "addr": hx(closed), "len": PAGE, "offset": PAGE, "prot_str": "PROT_READ", "flags_str": "MAP_PRIVATE",
            "fd": got["fd2"].parse::<i64>().unwrap(), "path": path,
        }),
    );
    let source = events[6]["path_source"].as_str().unwrap();
    assert!(source == "fd" || source == "maps", "{:#}", events[6]);
    assert_detached("mmapsnoop");
}

/// --comm and --failed together: only the EBADF of the test program, and the table shows it decoded.
#[test]
fn mmapsnoop_failed_only_in_a_table() {
    if !bpf_available("mmapsnoop_failed_only_in_a_table") {
        return;
    }
    let mut maps = Gated::start("mmapsnoop_maps");
    let pid = maps.pid();
    let mut mt = Running::start(&["mmapsnoop", "--failed", "--timestamp", "--comm", "mmapsnoop_maps"]);
    mt.wait_ready();
    maps.act();
    mt.wait_lines("", 2);
    maps.end();
    mt.signal(libc::SIGINT);
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "a header and one failed call expected:\n{stdout}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        ["TIME(s)", "TIME", "PID", "COMM", "CALL", "RET", "ADDR", "LEN", "PROT", "FLAGS", "FD", "CGROUP", "PATH"]
    );
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert!(row[0].parse::<f64>().is_ok_and(|s| s > 0.0) && row[1].len() == 8, "{}", lines[1]);
    assert_eq!(
        row[2..],
        [
            &pid.to_string(),
            "mmapsnoop_maps",
            "mmap",
            "EBADF",
            "0x0",
            "4096",
            "PROT_READ",
            "MAP_PRIVATE",
            "1000",
            memory_cgroup(std::process::id()).as_deref().unwrap_or("-"),
            "[unknown]"
        ],
        "{}",
        lines[1]
    );
    assert_detached("mmapsnoop");
}

#[test]
fn mmapsnoop_rejects_bad_input() {
    for (args, want) in [
        (&["mmapsnoop", "-p", "999999999"][..], "no such process: 999999999"),
        (&["mmapsnoop", "--comm", "a_name_too_long_for_comm"][..], "--comm takes 1 to 15 bytes"),
    ] {
        assert_one_line_error(args, want);
    }
}

/// Six programs live while it runs, none after SIGTERM; the final object still comes out.
#[test]
fn mmapsnoop_detaches_cleanly() {
    if !bpf_available("mmapsnoop_detaches_cleanly") {
        return;
    }
    let mut mt = Running::start(&["mmapsnoop", "--json", "--comm", "no_such_comm"]);
    mt.wait_ready();
    let live = loaded_program_names().into_iter().filter(|n| n.starts_with("mmapsnoop_")).count();
    assert_eq!(live, 6, "{:?}", loaded_program_names());
    mt.signal(libc::SIGTERM);
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    let (events, last) = events_and_final(&stdout);
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(last, json!({ "final": true, "events": 0, "events_lost": 0 }));
    assert_detached("mmapsnoop");
}

/// memtrace in a pid namespace (a container): `-p` takes the pid the namespace shows, and
/// events carry it, so the filter keeps exactly the program's calls.
#[test]
fn mmapsnoop_pid_filter_inside_a_pid_namespace() {
    if !bpf_available("mmapsnoop_pid_filter_inside_a_pid_namespace") {
        return;
    }
    let mut maps = ns::Contained::start(&["--pid", "--fork", "--mount-proc"], "", &prog("mmapsnoop_maps"), &[]);
    assert_ne!(maps.inside, maps.global, "unshare --pid gave no new pid namespace");
    let pid = maps.inside;
    let mut mt = Running::spawn(maps.memtrace_inside(&["mmapsnoop", "--json", "-p", &pid.to_string()]));
    mt.wait_ready();
    let got = maps.act();
    assert!(got.contains("anon="), "{got}");
    mt.wait_lines("{", 7);
    maps.end();
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains(&format!("process {pid} exited")), "{stderr}");
    let (events, _) = events_and_final(&stdout);
    let calls: Vec<&str> = events.iter().map(|e| e["call"].as_str().unwrap()).collect();
    assert_eq!(calls, ["mmap", "mmap", "mmap", "munmap", "mmap", "mremap", "mmap"], "{stdout}");
    for e in &events {
        assert_fields(e, &json!({ "pid": pid, "tid": pid, "comm": "mmapsnoop_maps" }));
    }
    assert_detached("mmapsnoop");
}

/// Run system-wide inside a pid namespace, memtrace sees that namespace's processes only: the
/// host's (this test's own mappings) have no pid there, and are skipped and counted.
#[test]
fn mmapsnoop_inside_a_pid_namespace_skips_the_host_and_says_so() {
    if !bpf_available("mmapsnoop_inside_a_pid_namespace_skips_the_host_and_says_so") {
        return;
    }
    let mut maps = ns::Contained::start(&["--pid", "--fork", "--mount-proc"], "", &prog("mmapsnoop_maps"), &[]);
    let mut mt = Running::spawn(maps.memtrace_inside(&["mmapsnoop", "--json", "-d", "3"]));
    mt.wait_ready();
    for _ in 0..5 {
        // SAFETY: an anonymous mapping unmapped at once.
        unsafe {
            let p =
                libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_READ, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
            assert_ne!(p, libc::MAP_FAILED);
            libc::munmap(p, 4096);
        }
    }
    maps.act();
    mt.wait_lines("{", 7);
    maps.end();
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    let (events, _) = events_and_final(&stdout);
    // Inside: the program, then its shell's `sleep` (pids 2 and 3); nothing from the host.
    let inside: Vec<&str> =
        events.iter().filter(|e| e["pid"] == maps.inside).map(|e| e["call"].as_str().unwrap()).collect();
    assert_eq!(inside, ["mmap", "mmap", "mmap", "munmap", "mmap", "mremap", "mmap"], "{stdout}");
    for e in &events {
        let comm = e["comm"].as_str().unwrap();
        assert!(["mmapsnoop_maps", "sh", "sleep"].contains(&comm), "a process outside the namespace: {e:#}");
    }
    assert!(
        stderr.lines().last().is_some_and(|l| l.starts_with("memtrace: note: ")
            && l.contains("probe hits from processes outside memtrace's pid namespace were skipped")),
        "{stderr}"
    );
}

/// A process in a pid namespace nested in memtrace's own has pids memtrace cannot follow:
/// -p says so instead of reporting nothing.
#[test]
fn mmapsnoop_refuses_a_process_in_a_nested_pid_namespace() {
    if !bpf_available("mmapsnoop_refuses_a_process_in_a_nested_pid_namespace") {
        return;
    }
    let maps = prog("mmapsnoop_maps");
    let flags = ["--pid", "--fork", "--mount-proc"];
    let mut argv = vec!["unshare"];
    argv.extend(flags);
    argv.push(maps.to_str().unwrap());
    let nested = ns::Contained::start_as(&flags, "", &argv, &maps);
    let pids = ns::nspids(nested.global);
    assert_eq!(pids.len(), 3, "host, outer and inner namespace expected: {pids:?}");
    let mut cmd = nested.memtrace_inside(&["mmapsnoop", "-p", &pids[1].to_string()]);
    let _ready = ready_pipe(&mut cmd);
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr
            .starts_with(&format!("memtrace: error: process {} runs in a pid namespace nested in memtrace's", pids[1])),
        "{stderr}"
    );
    assert_detached("mmapsnoop");
}

/// memtrace in a new pid namespace whose /proc is still the host's: the pids it reports
/// would not name the processes /proc shows, and it says so.
#[test]
fn mmapsnoop_warns_when_proc_is_not_its_pid_namespace() {
    if !bpf_available("mmapsnoop_warns_when_proc_is_not_its_pid_namespace") {
        return;
    }
    let out = std::process::Command::new("unshare")
        .args(["--pid", "--fork", env!("CARGO_BIN_EXE_memtrace"), "mmapsnoop", "--json", "-d", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.lines().any(|l| l == "memtrace: warning: /proc belongs to another pid namespace than memtrace: pids will not match; mount a /proc for this namespace (e.g. unshare --mount-proc)"),
        "{stderr}"
    );
    assert_detached("mmapsnoop");
}
