//! brkstack against the real kernel: the exact calls and growth of a known function's sbrk
//! loop, each call with --events, bad input, and clean detach; and a heap grown by malloc in a
//! program built without frame pointers, whose stacks the unwind tables walk from the brk
//! call through libc to the program's entry.

#[path = "common/mod.rs"]
mod common;

use std::{
    io::{BufReader, Lines, Write},
    process::{Child, ChildStdin, ChildStdout, Command},
    time::Duration,
};

use common::*;
use serde_json::Value;

/// tests/progs/brkstack_grow.c: sbrk(4096) this many times from grow_heap.
const GROWS: u64 = 5;
const PAGE: u64 = 4096;

/// The test program, started and waiting for its go line.
struct Grower {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Grower {
    fn start() -> Grower {
        Grower::start_as(&prog("brkstack_grow"))
    }

    /// Started by this path (a symlink to the program, say).
    fn start_as(path: &std::path::Path) -> Grower {
        let Ready { child, stdin, lines } = Ready::start(&mut Command::new(path));
        Grower { child, stdin, lines }
    }

    /// Grows the heap, then lets the program exit; returns what follows "grown" (the growth
    /// brkstack_malloc measured).
    fn grow_and_exit(mut self) -> String {
        writeln!(self.stdin).unwrap();
        let line = self.lines.next().unwrap().unwrap();
        let rest = line.strip_prefix("grown").unwrap_or_else(|| panic!("not grown: {line}"));
        drop(self.stdin);
        assert!(self.child.wait().unwrap().success());
        rest.trim().to_string()
    }
}

#[test]
fn brkstack_counts_grow_heap_exactly() {
    if !unwind_tables("brkstack_counts_grow_heap_exactly") {
        return;
    }
    let grower = Grower::start();
    let pid = grower.child.id();
    let mut mt = Running::start(&["brkstack", "--json", "-p", &pid.to_string()]);
    mt.wait_ready();
    grower.grow_and_exit();
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains(&format!("process {pid} exited")), "{stderr}");
    let report = final_report(&stdout);
    let stacks = stacks_with(&report, "grow_heap");
    assert_eq!(stacks.len(), 1, "one stack through grow_heap expected: {report:#}");
    let stack = stacks[0];
    assert_eq!(stack["calls"], GROWS, "{stack:#}");
    assert_eq!(stack["bytes"], GROWS * PAGE, "{stack:#}");
    assert_eq!(stack["pid"], pid, "{stack:#}");
    let frame = frame_of(stack, "grow_heap").unwrap();
    assert!(frame["file"].as_str().is_some_and(|f| f.ends_with("brkstack_grow.c")), "{frame:#}");
    assert_eq!(frame["line"], marker_line("brkstack_grow.c", "grow_heap"), "{frame:#}");
    // The stack runs from libc's brk wrapper through sbrk and grow_heap to main, in order:
    // the frames a frame-pointer walk loses inside glibc are found.
    let names: Vec<&str> =
        stack["frames"].as_array().unwrap().iter().map(|f| f["func"].as_str().unwrap_or("?")).collect();
    let at =
        |name: &str| names.iter().position(|n| n.ends_with(name)).unwrap_or_else(|| panic!("no {name}: {names:?}"));
    assert!(at("brk") < at("sbrk") && at("sbrk") < at("grow_heap"), "{names:?}");
    assert_eq!(names[at("grow_heap") + 1], "main", "{names:?}");
    assert!(stack["frames"][0]["module"].as_str().is_some_and(|m| m.starts_with("libc")), "{stack:#}");
    // Nothing else in the program moved the break after attach.
    assert_eq!(report["calls"], GROWS, "{report:#}");
    assert_eq!(report["bytes"], GROWS * PAGE, "{report:#}");
    for field in ["events_lost", "stacks_lost", "stacks_full", "growth_unknown"] {
        assert_eq!(report[field], 0, "blind spot {field}: {report:#}");
    }
    assert_detached("brkstack");
}

#[test]
fn brkstack_events_show_each_call() {
    if !bpf_available("brkstack_events_show_each_call") {
        return;
    }
    let grower = Grower::start();
    let pid = grower.child.id();
    let mut mt = Running::start(&["brkstack", "--json", "--events", "-p", &pid.to_string()]);
    mt.wait_ready();
    grower.grow_and_exit();
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    let lines = json_lines(&stdout);
    let calls: Vec<&Value> = lines.iter().filter(|l| l["event"] == "brk").collect();
    assert_eq!(calls.len() as u64, GROWS, "{stdout}");
    let first = u64::from_str_radix(calls[0]["result"].as_str().unwrap().trim_start_matches("0x"), 16).unwrap();
    for (i, call) in calls.iter().enumerate() {
        let i = i as u64;
        assert_eq!(call["pid"], pid, "{call}");
        assert_eq!(call["comm"], "brkstack_grow", "{call}");
        // Each call asks for one page more than the last break and gets it.
        assert_eq!(call["requested"], call["result"], "{call}");
        assert_eq!(call["result"], format!("{:#x}", first + i * PAGE), "addresses are hex strings: {call}");
        assert_eq!(call["growth"], PAGE, "{call}");
    }
    let report = final_report(&stdout);
    assert_eq!(report["events_lost"], 0, "{report}");
    assert_detached("brkstack");
}

#[test]
fn brkstack_writes_folded_stacks() {
    if !unwind_tables("brkstack_writes_folded_stacks") {
        return;
    }
    let folded = std::env::temp_dir().join(format!("brkstack-folded-{}", std::process::id()));
    let grower = Grower::start();
    let pid = grower.child.id().to_string();
    let mut mt = Running::start(&["brkstack", "-p", &pid, "--folded", folded.to_str().unwrap()]);
    mt.wait_ready();
    grower.grow_and_exit();
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    assert!(stdout.contains(&format!("{GROWS} calls, +{} bytes: pid {pid} (brkstack_grow)", GROWS * PAGE)), "{stdout}");
    assert!(stdout.contains("blind spots: none"), "{stdout}");
    let text = std::fs::read_to_string(&folded).unwrap();
    std::fs::remove_file(&folded).unwrap();
    let line = text.lines().find(|l| l.contains(";grow_heap;")).unwrap_or_else(|| panic!("{text}"));
    assert!(line.ends_with(&format!(" {GROWS}")), "{line}");
    assert!(line.contains("main;grow_heap;"), "root first: {line}");
    assert!(line.starts_with(&format!("brkstack_grow ({pid});")), "the process is the root frame: {line}");
}

/// A program started through a symlink of another name is labelled with the name it was
/// started by (as `redis-server`, a symlink to redis-check-rdb), not the symlink's target.
#[test]
fn brkstack_labels_a_symlinked_program_by_its_name() {
    if !unwind_tables("brkstack_labels_a_symlinked_program_by_its_name") {
        return;
    }
    let alias = prog("brkstack_grow").with_file_name("grow-alias");
    let _ = std::fs::remove_file(&alias);
    std::os::unix::fs::symlink("brkstack_grow", &alias).unwrap();
    let grower = Grower::start_as(&alias);
    let pid = grower.child.id();
    let mut mt = Running::start(&["brkstack", "--json", "-p", &pid.to_string()]);
    mt.wait_ready();
    grower.grow_and_exit();
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    let report = final_report(&stdout);
    let stack = stacks_with(&report, "grow_heap")[0];
    assert_eq!(stack["comm"], "grow-alias", "{stack:#}");
    for func in ["grow_heap", "main"] {
        assert_eq!(frame_of(stack, func).unwrap()["module"], "grow-alias", "{func}: {stack:#}");
    }
    assert_detached("brkstack");
}

#[test]
fn brkstack_bad_input_gets_one_line_errors() {
    if !bpf_available("brkstack_bad_input_gets_one_line_errors") {
        return;
    }
    assert_one_line_error(&["brkstack", "-p", "999999999"], "no such process: 999999999");
    assert_one_line_error(&["brkstack", "-T", "0"], "-T/--top takes a number of rows of at least 1");
    assert_one_line_error(&["brkstack", "-T", "many"], "-T/--top takes a number of rows of at least 1");
    assert_one_line_error(
        &["brkstack", "0"],
        "the interval must be at least 1 second and at most 31536000 (a year), not 0",
    );
    assert_one_line_error(
        &["brkstack", "18446744073709551615"],
        "the interval must be at least 1 second and at most 31536000 (a year), not 18446744073709551615",
    );
    assert_one_line_error(
        &["brkstack", "x"],
        "the interval is a number of seconds from 1 to 31536000 (a year), not \"x\"",
    );
    assert_one_line_error(&["brkstack", "--max-stacks", "0"], "--max-stacks takes 1 to 16777216, not 0");
    assert_one_line_error(
        &["brkstack", "--max-stacks", "4294967295"],
        "--max-stacks takes 1 to 16777216, not 4294967295",
    );
    assert_one_line_error(
        &["brkstack", "-p", "2"],
        "process 2 (kthreadd) is a kernel thread: it has no user memory to trace",
    );
    assert_detached("brkstack");
}

/// By name, without -p: the process was already running, so its previous break comes from
/// /proc at start, and the growth of its very first traced call is still known.
#[test]
fn brkstack_comm_filter_seeds_running_processes() {
    if !unwind_tables("brkstack_comm_filter_seeds_running_processes") {
        return;
    }
    let mut grower = Grower::start();
    let pid = grower.child.id();
    let mut mt = Running::start(&["brkstack", "--json", "--comm", "brkstack_grow"]);
    mt.wait_ready();
    writeln!(grower.stdin).unwrap();
    assert_eq!(grower.lines.next().unwrap().unwrap(), "grown");
    // Stop while the program lives, so its stack symbolizes from its own mappings.
    mt.signal(libc::SIGINT);
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    drop(grower.stdin);
    grower.child.wait().unwrap();
    assert!(status.success(), "{status}: {stderr}");
    let report = final_report(&stdout);
    assert_eq!(report["pid"], Value::Null);
    let stacks = report["stacks"].as_array().unwrap();
    assert!(stacks.iter().all(|s| s["comm"] == "brkstack_grow"), "other processes reported: {report:#}");
    // Its unwind tables too are loaded at start, like its break: its first calls' stacks are
    // whole, not cut at libc's brk wrapper for want of tables.
    assert_eq!(report["cut_stacks"]["not_loaded"], 0, "stacks of a process running before attach: {report:#}");
    let grow = stacks_with(&report, "grow_heap");
    assert_eq!(grow.len(), 1, "{report:#}");
    assert_eq!(grow[0]["pid"], pid);
    assert_eq!(grow[0]["calls"], GROWS);
    assert_eq!(grow[0]["bytes"], GROWS * PAGE);
    assert_eq!(report["growth_unknown"], 0, "{report:#}");
    assert_unnamed_counted(&report, &report["unnamed_frames"]);
    assert_detached("brkstack");
}

/// A long system-wide run forgets the maps of processes that exited once a report has shown
/// them, and later reports still name their stacks (symbolized at first sighting).
#[test]
fn brkstack_forgets_exited_processes_but_keeps_their_stacks() {
    if !unwind_tables("brkstack_forgets_exited_processes_but_keeps_their_stacks") {
        return;
    }
    let mut grower = Grower::start();
    let pid = grower.child.id();
    let mut mt = Running::start(&["-vv", "brkstack", "--json", "--comm", "brkstack_grow", "1"]);
    mt.wait_ready();
    writeln!(grower.stdin).unwrap();
    assert_eq!(grower.lines.next().unwrap().unwrap(), "grown");
    // Alive a moment longer: without -p its maps are read when its new stack's event arrives.
    std::thread::sleep(Duration::from_millis(300));
    drop(grower.stdin);
    grower.child.wait().unwrap();
    // Two ticks: the first report after the exit, then the forgetting after it.
    std::thread::sleep(Duration::from_millis(2500));
    mt.signal(libc::SIGINT);
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    assert_eq!(stderr.matches("forgot the maps of 1 exited processes").count(), 1, "{stderr}");
    let report = final_report(&stdout);
    assert_eq!(report["cut_stacks"]["not_loaded"], 0, "stacks of a process running before attach: {report:#}");
    let grow = stacks_with(&report, "grow_heap");
    assert_eq!(grow.len(), 1, "{report:#}");
    assert_eq!((grow[0]["pid"].as_u64(), grow[0]["calls"].as_u64()), (Some(u64::from(pid)), Some(GROWS)));
}

/// tests/progs/brkstack_malloc.c: mallocs of this many 64 KiB chunks from grow_by_malloc, each
/// growing the break by its chunk (the program turns off malloc's top padding).
const MALLOC_GROWS: u64 = 5;
const MALLOC_CHUNK: u64 = 64 << 10;

/// Runs brkstack with `args` on brkstack_malloc, built without frame pointers and started
/// before brkstack attaches by -p; returns stdout after checking the program's own measure
/// of its growth.
fn brkstack_nofp(args: &[&str]) -> String {
    let grower = Grower::start_as(&prog_nofp("brkstack_malloc"));
    let pid = grower.child.id().to_string();
    let mut all = vec!["brkstack"];
    all.extend(args);
    all.extend(["-p", &pid]);
    let mut mt = Running::start(&all);
    mt.wait_ready();
    let grown = grower.grow_and_exit();
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains(&format!("process {pid} exited")), "{stderr}");
    assert_eq!(grown, (MALLOC_GROWS * MALLOC_CHUNK).to_string(), "the program's own sbrk(0) before and after");
    assert_detached("brkstack");
    stdout
}

/// The frames' names, innermost first ("?" for an unnamed one).
fn names(stack: &Value) -> Vec<&str> {
    stack["frames"].as_array().unwrap().iter().map(|f| f["func"].as_str().unwrap_or("?")).collect()
}

/// Built without frame pointers (grow_by_malloc keeps a pointer in rbp), every call's stack
/// still goes from libc's brk wrapper through sbrk and malloc into grow_by_malloc, at its
/// line, and on to main and libc's `__libc_start_call_main`: each walk complete.
#[test]
fn brkstack_nofp_malloc_growth_reaches_main_through_libc() {
    if !unwind_tables("brkstack_nofp_malloc_growth_reaches_main_through_libc") {
        return;
    }
    let report = final_report(&brkstack_nofp(&["--unwind", "dwarf", "--json"]));
    // Nothing else in the program moved the break after attach.
    assert_eq!(report["calls"], MALLOC_GROWS, "{report:#}");
    assert_eq!(report["bytes"], MALLOC_GROWS * MALLOC_CHUNK, "{report:#}");
    let stacks = stacks_with(&report, "grow_by_malloc");
    assert_eq!(stacks.len(), 1, "one stack through grow_by_malloc expected: {report:#}");
    let stack = stacks[0];
    assert_eq!(stack["calls"], MALLOC_GROWS, "{stack:#}");
    assert_eq!(stack["bytes"], MALLOC_GROWS * MALLOC_CHUNK, "{stack:#}");
    let frames = stack["frames"].as_array().unwrap();
    let names = names(stack);
    let at =
        |name: &str| names.iter().position(|n| n.ends_with(name)).unwrap_or_else(|| panic!("no {name}: {names:?}"));
    let grow = at("grow_by_malloc");
    assert_eq!(frames[grow]["line"], marker_line("brkstack_malloc.c", "grow_by_malloc"), "{names:?}");
    let libc = |i: usize| frames[i]["module"] == "libc.so.6";
    // The brk syscall's wrapper, then sbrk, in libc; malloc is what grow_by_malloc called
    // (libc's own names with libc6-dbg: __GI___sbrk, __GI___libc_malloc).
    assert!(libc(0) && names[0].contains("brk"), "{names:?}");
    let sbrk = at("sbrk");
    assert!(libc(sbrk) && sbrk < grow, "{names:?}");
    assert!(names[grow - 1].ends_with("malloc") && libc(grow - 1), "malloc calls sbrk for grow_by_malloc: {names:?}");
    assert!(names[sbrk + 1..grow].iter().all(|n| *n != "?"), "an unnamed frame between sbrk and malloc: {names:?}");
    assert_eq!(names[grow + 1], "main", "{names:?}");
    assert_eq!(names[grow + 2], "__libc_start_call_main", "{names:?}");
    assert!(libc(grow + 2), "{names:?}");
    // One walk per call, each to the process's first frame: the tables were loaded at attach.
    let cut: Value = serde_json::json!({
        "walks": MALLOC_GROWS, "complete": MALLOC_GROWS, "no_table": 0, "not_loaded": 0, "table_full": 0,
        "depth": 0, "unreadable": 0, "unsupported": 0, "bad_frame": 0, "unusable_table": 0, "trampoline": 0,
        "fp_frames": 0, "trampoline_frames": 0, "fp_walks": 0, "fp_short": 0,
    });
    assert_eq!(report["cut_stacks"], cut, "{report:#}");
    for field in ["events_lost", "stacks_lost", "stacks_full", "growth_unknown"] {
        assert_eq!(report[field], 0, "blind spot {field}: {report:#}");
    }
}

/// The same without --unwind (tables where a module has them), in the text and folded
/// outputs: the stack reaches main, and no stack was cut.
#[test]
fn brkstack_nofp_default_unwind_shows_whole_stacks() {
    if !unwind_tables("brkstack_nofp_default_unwind_shows_whole_stacks") {
        return;
    }
    let folded = std::env::temp_dir().join(format!("brkstack-nofp-folded-{}", std::process::id()));
    let stdout = brkstack_nofp(&["--folded", folded.to_str().unwrap()]);
    let text = std::fs::read_to_string(&folded).unwrap();
    std::fs::remove_file(&folded).unwrap();
    assert!(
        stdout.contains(&format!("{MALLOC_GROWS} calls, +{} bytes: pid ", MALLOC_GROWS * MALLOC_CHUNK)),
        "{stdout}"
    );
    assert!(stdout.contains("blind spots: none"), "{stdout}");
    let lines: Vec<&str> = text.lines().filter(|l| l.contains(";grow_by_malloc;")).collect();
    assert_eq!(lines.len(), 1, "{text}");
    let line = lines[0];
    assert!(line.ends_with(&format!(" {MALLOC_GROWS}")), "{line}");
    assert!(line.contains(";__libc_start_call_main;main;grow_by_malloc;"), "root first, whole: {line}");
    assert!(line.starts_with("brkstack_malloc ("), "{line}");
}
