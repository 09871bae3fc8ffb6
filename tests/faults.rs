//! faults against the real kernel: a known number of write faults from a known function, per
//! process, per stack and one by one; kernel-mode faults with kernel stacks; bad input;
//! clean detach; and the same faults in a program built without frame pointers, whose stacks
//! the unwind tables walk to the program's entry.

#[path = "common/mod.rs"]
mod common;

use std::{
    io::{BufReader, Lines, Write},
    process::{Child, ChildStdin, ChildStdout, Command},
    time::Duration,
};

use common::*;
use serde_json::Value;

/// tests/progs/faults_touch.c writes one byte to each of this many fresh pages.
const PAGES: u64 = 256;

struct Toucher {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

/// What the program said it did: the touched mapping, and the buffer read() filled.
struct Touched {
    start: u64,
    len: u64,
    /// Bytes read() copied into its fresh buffer.
    read: u64,
}

fn hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap()
}

impl Toucher {
    fn start() -> Toucher {
        Toucher::start_as(&prog("faults_touch"))
    }

    /// Started from this build of the program.
    fn start_as(path: &std::path::Path) -> Toucher {
        let Ready { child, stdin, lines } = Ready::start(&mut Command::new(path));
        Toucher { child, stdin, lines }
    }

    /// Touches the pages and reads into a fresh buffer, then lets the program exit.
    fn touch_and_exit(mut self) -> Touched {
        writeln!(self.stdin).unwrap();
        let mut next = || self.lines.next().unwrap().unwrap();
        let mapping = next();
        let parts: Vec<&str> = mapping.split(' ').collect();
        assert_eq!(parts[0], "mapping", "{mapping}");
        let read = next();
        let read_parts: Vec<&str> = read.split(' ').collect();
        assert_eq!(read_parts[0], "read", "{read}");
        let touched =
            Touched { start: hex(parts[1]), len: parts[2].parse().unwrap(), read: read_parts[3].parse().unwrap() };
        assert_eq!(next(), "done");
        drop(self.stdin);
        self.child.wait().unwrap();
        touched
    }
}

#[test]
fn faults_counts_touch_pages_per_process_and_stack() {
    if !bpf_available("faults_counts_touch_pages_per_process_and_stack") {
        return;
    }
    let toucher = Toucher::start();
    let pid = toucher.child.id();
    let mut mt = Running::start(&["faults", "--json", "-p", &pid.to_string()]);
    mt.wait_ready();
    toucher.touch_and_exit();
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains(&format!("process {pid} exited")), "{stderr}");
    let report = final_report(&stdout);
    let procs = report["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 1, "only the -p process: {report:#}");
    assert_eq!(procs[0]["pid"], pid);
    assert_eq!(procs[0]["comm"], "faults_touch");
    assert!(procs[0]["faults"].as_u64().unwrap() >= PAGES, "{report:#}");
    // Without --kernel, no kernel-mode faults are counted.
    assert_eq!(procs[0]["kernel_faults"], 0, "{report:#}");
    let stacks = stacks_with(&report, "touch_pages");
    assert_eq!(stacks.len(), 1, "one stack through touch_pages: {report:#}");
    let stack = stacks[0];
    assert!(stack["faults"].as_u64().unwrap() >= PAGES, "{stack:#}");
    assert_eq!(stack["mode"], "user");
    // The faulting instruction itself is the first frame, in touch_pages, called from main.
    assert!(stack["frames"][0]["func"].as_str().is_some_and(|f| f.ends_with("touch_pages")), "{stack:#}");
    assert!(frame_of(stack, "main").is_some(), "{stack:#}");
    for field in ["events_lost", "stacks_lost", "stacks_full", "processes_full"] {
        assert_eq!(report[field], 0, "blind spot {field}: {report:#}");
    }
    assert_detached("faults");
}

#[test]
fn faults_events_decode_address_and_error_code() {
    if !bpf_available("faults_events_decode_address_and_error_code") {
        return;
    }
    let toucher = Toucher::start();
    let pid = toucher.child.id();
    let mut mt = Running::start(&["faults", "--json", "--events", "-p", &pid.to_string()]);
    mt.wait_ready();
    let touched = toucher.touch_and_exit();
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    let lines = json_lines(&stdout);
    let in_mapping: Vec<&Value> = lines
        .iter()
        .filter(|l| l["event"] == "fault")
        .filter(|l| (touched.start..touched.start + touched.len).contains(&hex(l["address"].as_str().unwrap())))
        .collect();
    assert_eq!(in_mapping.len() as u64, PAGES, "one fault per page: {stdout}");
    let mut pages: Vec<u64> =
        in_mapping.iter().map(|e| (hex(e["address"].as_str().unwrap()) - touched.start) / 4096).collect();
    pages.sort_unstable();
    pages.dedup();
    assert_eq!(pages.len() as u64, PAGES, "each page faulted once");
    for e in &in_mapping {
        assert_eq!(e["pid"], pid, "{e}");
        assert_eq!(e["mode"], "user", "{e}");
        assert_eq!(e["error_code"], "0x6", "flags are hex strings: {e}");
        assert!(e["ip"].as_str().is_some_and(|ip| ip.starts_with("0x")), "{e}");
        assert_eq!(e["flags"], "write|user|not-present", "{e}");
    }
    assert_eq!(final_report(&stdout)["events_lost"], 0);
    assert_detached("faults");
}

#[test]
fn faults_kernel_mode_shows_copy_to_user_stacks() {
    if !bpf_available("faults_kernel_mode_shows_copy_to_user_stacks") {
        return;
    }
    let toucher = Toucher::start();
    let pid = toucher.child.id();
    let mut mt = Running::start(&["faults", "--json", "--kernel", "-T", "50", "-p", &pid.to_string()]);
    mt.wait_ready();
    let touched = toucher.touch_and_exit();
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    let report = final_report(&stdout);
    // read() into an untouched buffer: the kernel faults in while copying to user space.
    let kernel: Vec<&Value> = report["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["mode"] == "kernel")
        .filter(|s| s["kernel_frames"].as_array().unwrap().iter().any(|f| f["func"] == "ksys_read"))
        .collect();
    assert!(!kernel.is_empty(), "no kernel-mode fault under read(): {report:#}");
    let stack = kernel[0];
    assert_eq!(stack["pid"], pid);
    assert!(stack["kernel_frames"][0]["module"] == "[kernel]", "{stack:#}");
    // One fault per page the copy reached: each is a fresh page of an untouched buffer.
    let faults: u64 = kernel.iter().map(|s| s["faults"].as_u64().unwrap()).sum();
    assert_eq!(faults, touched.read.div_ceil(4096), "{report:#}");
    assert!(touched.read > 4096, "the read must span pages");
    let procs = report["processes"].as_array().unwrap();
    assert!(procs[0]["kernel_faults"].as_u64().unwrap() >= 1, "{report:#}");
    assert_eq!(report["kernel_stacks_lost"], 0, "{report:#}");
    assert_detached("faults");
}

#[test]
fn faults_bad_input_gets_one_line_errors() {
    if !bpf_available("faults_bad_input_gets_one_line_errors") {
        return;
    }
    assert_one_line_error(&["faults", "-p", "999999999"], "no such process: 999999999");
    assert_one_line_error(&["faults", "-T", "0"], "-T/--top takes a number of rows of at least 1");
    assert_one_line_error(&["faults", "-T", "x"], "-T/--top takes a number of rows of at least 1");
    assert_exact_error(
        &["faults", "18446744073709551615"],
        "the interval must be at least 1 second and at most 31536000 (a year), not 18446744073709551615",
    );
    assert_exact_error(&["faults", "--max-stacks", "0"], "--max-stacks takes 1 to 16777216, not 0");
    assert_exact_error(
        &["faults", "-p", "2"],
        "process 2 (kthreadd) is a kernel thread: it has no user memory to trace",
    );
    assert_detached("faults");
}

#[test]
fn faults_table_and_interval_reports() {
    if !bpf_available("faults_table_and_interval_reports") {
        return;
    }
    let toucher = Toucher::start();
    let pid = toucher.child.id();
    let mut mt = Running::start(&["faults", "-p", &pid.to_string(), "1"]);
    mt.wait_ready();
    std::thread::sleep(Duration::from_millis(1500));
    toucher.touch_and_exit();
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    assert!(stdout.matches("page faults in").count() >= 2, "an interval and a final report: {stdout}");
    let last = stdout.rsplit("final report: ").next().unwrap();
    assert!(last.contains("faults_touch"), "{last}");
    assert!(last.contains("touch_pages+0x"), "{last}");
    assert!(last.contains("blind spots: none"), "{last}");
    assert_detached("faults");
}

/// By name, without -p: only that command's faults are counted.
#[test]
fn faults_comm_filter_keeps_only_that_command() {
    if !bpf_available("faults_comm_filter_keeps_only_that_command") {
        return;
    }
    let mut toucher = Toucher::start();
    let pid = toucher.child.id();
    let mut mt = Running::start(&["faults", "--json", "--comm", "faults_touch", "-T", "100"]);
    mt.wait_ready();
    writeln!(toucher.stdin).unwrap();
    while toucher.lines.next().unwrap().unwrap() != "done" {}
    // Stop while the program lives, so its stacks symbolize from its own mappings.
    mt.signal(libc::SIGINT);
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    drop(toucher.stdin);
    toucher.child.wait().unwrap();
    assert!(status.success(), "{status}: {stderr}");
    let report = final_report(&stdout);
    let procs = report["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 1, "{report:#}");
    assert_eq!(procs[0]["pid"], pid);
    assert_eq!(procs[0]["comm"], "faults_touch");
    // Its unwind tables are loaded at start: no stack is cut short for want of them (nor split
    // into several stacks cut at different depths while they load).
    assert_eq!(report["cut_stacks"]["not_loaded"], 0, "stacks of a process running before attach: {report:#}");
    let stacks = stacks_with(&report, "touch_pages");
    assert_eq!(stacks.len(), 1, "{report:#}");
    assert!(stacks[0]["faults"].as_u64().unwrap() >= PAGES);
    assert!(report["stacks"].as_array().unwrap().iter().all(|s| s["pid"] == pid), "{report:#}");
    assert_detached("faults");
}

/// faults_touch built without frame pointers, started before faults attaches by -p with
/// `unwind` (None: without --unwind): one stack of exactly PAGES faults, in touch_pages at
/// its write, then main, then libc's `__libc_start_call_main`; every walk complete but where
/// code has no table.
fn faults_nofp_reach_main(unwind: Option<&str>) {
    let toucher = Toucher::start_as(&prog_nofp("faults_touch"));
    let pid = toucher.child.id().to_string();
    let mut args = vec!["faults", "--json", "-T", "100"];
    if let Some(how) = unwind {
        args.extend(["--unwind", how]);
    }
    args.extend(["-p", &pid]);
    let mut mt = Running::start(&args);
    mt.wait_ready();
    toucher.touch_and_exit();
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    let report = final_report(&stdout);
    let stacks = stacks_with(&report, "touch_pages");
    assert_eq!(stacks.len(), 1, "one stack through touch_pages: {report:#}");
    let stack = stacks[0];
    assert_eq!(stack["faults"], PAGES, "one fault per page, nothing else in touch_pages: {stack:#}");
    assert_eq!(stack["mode"], "user");
    let frames = stack["frames"].as_array().unwrap();
    let names: Vec<&str> = frames.iter().map(|f| f["func"].as_str().unwrap_or("?")).collect();
    assert_eq!(names.get(..3), Some(&["touch_pages", "main", "__libc_start_call_main"][..]), "{stack:#}");
    assert_eq!(frames[0]["line"], marker_line("faults_touch.c", "touch_pages"), "{stack:#}");
    assert_eq!(frames[2]["module"], "libc.so.6", "{stack:#}");
    // Every fault walked a stack; the process's tables were loaded at attach, so none was
    // cut for want of them, and only code without a table (crt's __do_global_dtors_aux, at
    // exit) may end one short of the entry.
    let cut = &report["cut_stacks"];
    assert_eq!(cut["walks"], report["faults"], "{report:#}");
    for field in ["not_loaded", "table_full", "depth", "unreadable", "unsupported", "bad_frame"] {
        assert_eq!(cut[field], 0, "stacks cut ({field}): {report:#}");
    }
    let complete = cut["complete"].as_u64().unwrap();
    assert!(complete >= PAGES, "touch_pages' walks complete: {report:#}");
    assert_eq!(complete + cut["no_table"].as_u64().unwrap(), cut["walks"].as_u64().unwrap(), "{report:#}");
    assert_unnamed_counted(&report, &report["unnamed_frames"]);
    for field in ["events_lost", "stacks_lost", "stacks_full", "processes_full"] {
        assert_eq!(report[field], 0, "blind spot {field}: {report:#}");
    }
    assert_detached("faults");
}

#[test]
fn faults_nofp_dwarf_stack_reaches_main() {
    if !unwind_tables("faults_nofp_dwarf_stack_reaches_main") {
        return;
    }
    faults_nofp_reach_main(Some("dwarf"));
}

#[test]
fn faults_nofp_default_unwind_stack_reaches_main() {
    if !unwind_tables("faults_nofp_default_unwind_stack_reaches_main") {
        return;
    }
    faults_nofp_reach_main(None);
}

/// faults beside memleak on one process: memleak's uretprobe on malloc has replaced malloc's
/// return address with the kernel's trampoline, and a page fault inside malloc must still be
/// walked to the program's entry (the kernel's record of the call gives the real address).
/// Its stacks used to end at the trampoline, blamed on tables "not loaded yet".
#[test]
fn faults_walk_through_memleaks_uretprobe_trampoline() {
    if !unwind_tables("faults_walk_through_memleaks_uretprobe_trampoline") {
        return;
    }
    /// tests/progs/faults_in_malloc.c: blocks whose header malloc writes in a fresh page.
    const BLOCKS: u64 = 64;
    let Ready { mut child, mut stdin, mut lines } = Ready::start(&mut Command::new(prog_nofp("faults_in_malloc")));
    let pid = child.id().to_string();
    let mut memleak = Running::start(&["memleak", "--json", "-p", &pid]);
    memleak.wait_ready();
    let mut faults = Running::start(&["faults", "--json", "-T", "100", "-p", &pid]);
    faults.wait_ready();
    writeln!(stdin).unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "done");
    drop(stdin);
    child.wait().unwrap();
    let (status, stdout, stderr) = faults.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    let report = final_report(&stdout);
    let stacks = stacks_with(&report, "sysmalloc");
    assert_eq!(stacks.len(), 1, "one stack of faults in malloc: {report:#}");
    let names: Vec<&str> =
        stacks[0]["frames"].as_array().unwrap().iter().map(|f| f["func"].as_str().unwrap_or("?")).collect();
    let from_malloc = names.iter().position(|n| *n == "malloc" || n.ends_with("libc_malloc")).expect("malloc");
    assert_eq!(
        names.get(from_malloc + 1..from_malloc + 4),
        Some(&["grow", "main", "__libc_start_call_main"][..]),
        "{names:?}"
    );
    assert_eq!(stacks[0]["faults"], BLOCKS, "{names:?}");
    let cut = &report["cut_stacks"];
    assert!(cut["trampoline_frames"].as_u64().unwrap() >= BLOCKS, "{cut}");
    assert_eq!(cut["trampoline"], 0, "{cut}");
    let (status, stdout, stderr) = memleak.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    let leaks = final_report(&stdout);
    let grown = stacks_with(&leaks, "grow");
    assert_eq!(grown.len(), 1, "{leaks:#}");
    assert_eq!(grown[0]["bytes"], BLOCKS * 256 * 1024, "{leaks:#}");
    assert_detached("faults");
    assert_detached("memleak");
}
