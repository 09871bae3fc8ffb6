//! The shared stack store against the real kernel: a program with 8,192 distinct allocation
//! stacks keeps every one under memleak's defaults, and faults keeps the stacks of a
//! stress-ng memory hog, accounting per process for any it could not keep.

#[path = "common/mod.rs"]
mod common;

use std::{
    collections::{HashMap, HashSet},
    process::Command,
    time::Duration,
};

use common::*;
use serde_json::Value;

/// tests/progs/many_stacks.c: one 32-byte block from each of 2^13 call paths.
const PATHS: usize = 8192;

fn final_report(stdout: &str) -> Value {
    let last = json_lines(stdout).pop().unwrap_or_else(|| panic!("no JSON report in:\n{stdout}"));
    assert_eq!(last["final"], true, "the last report is not marked final: {last}");
    last
}

fn funcs(stack: &Value) -> Vec<String> {
    stack["frames"].as_array().unwrap().iter().map(|f| f["func"].as_str().unwrap_or("?").to_string()).collect()
}

/// Before the shared store, the kernel's stack map (32,768 buckets, one stack each) dropped
/// about a tenth of these stacks to bucket collisions.
#[test]
fn stacks_memleak_keeps_8192_distinct_stacks() {
    if !bpf_available("stacks_memleak_keeps_8192_distinct_stacks") {
        return;
    }
    let many = prog("many_stacks");
    // Running reads the report (tens of MB of JSON) while memtrace writes it.
    let mt = Running::start(&["memleak", "--json", "-T", "10000", "-c", many.to_str().unwrap()]);
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(180));
    assert!(status.success(), "exit {status}: {stderr}");
    assert!(warnings(&stderr).is_empty(), "{stderr}");
    let report = final_report(&stdout);
    let dropped = &report["blind_spots"];
    // Not events_lost: 8,192 new-stack notices can outrun the ring buffer, which costs only
    // symbolizing while the process lives (it is symbolized after exit from its snapshot).
    for field in ["map_full", "stacks_lost", "stacks_full", "stack_store_full"] {
        assert_eq!(dropped[field], 0, "blind spot {field}: {dropped}");
    }
    let paths = stacks_with(&report, "step");
    assert_eq!(paths.len(), PATHS, "one row per call path");
    let mut distinct = HashSet::new();
    for stack in &paths {
        assert_eq!((stack["bytes"].as_u64(), stack["allocs"].as_u64()), (Some(32), Some(1)), "{stack:#}");
        let path: Vec<String> = funcs(stack).into_iter().filter(|f| f == "left" || f == "right").collect();
        assert_eq!(path.len(), 13, "a full-depth stack: {stack:#}");
        distinct.insert(path);
    }
    assert_eq!(distinct.len(), PATHS, "each row is its own call path");
    let known = stacks_with(&report, "leak_known");
    assert_eq!(known.len(), 1, "{known:#?}");
    assert_eq!((known[0]["bytes"].as_u64(), known[0]["allocs"].as_u64()), (Some(7 * 1234), Some(7)));
    let frame = frame_of(known[0], "leak_known").unwrap();
    assert_eq!(frame["line"], marker_line("many_stacks.c", "leak_known"), "{frame:#}");
    // Ids are 64-bit hashes: JSON carries them as hex text, never as a rounded number.
    let id = known[0]["stack_id"].as_str().unwrap_or_else(|| panic!("stack_id as text: {:#}", known[0]));
    assert!(id.starts_with("0x") && id.len() == 18, "{id}");
    assert_detached("memleak");
}

/// A store too small for the run: the blind spots say how many allocations lost their stack
/// and what to raise, and a warning came before the store filled.
#[test]
fn stacks_memleak_full_store_says_what_to_raise() {
    if !bpf_available("stacks_memleak_full_store_says_what_to_raise") {
        return;
    }
    let many = prog("many_stacks");
    let out = run(&["memleak", "--max-stacks", "1000", "-c", many.to_str().unwrap()], Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {}: {stderr}", out.status);
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.starts_with("memtrace: warning: stack store")).collect();
    assert_eq!(warnings.len(), 1, "one early warning: {stderr}");
    assert!(warnings[0].ends_with("of 1000 stacks full: raise --max-stacks to keep every stack"), "{stderr}");
    let blind = stdout.lines().rev().find(|l| l.contains("blind spots:")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(blind.contains("allocations without a stack"), "{blind}");
    assert!(blind.contains("stacks not stored (stack store of 1000 full: raise --max-stacks)"), "{blind}");
    assert_detached("memleak");
}

/// Runs `stress-ng --vm 1 --vm-bytes 256M` for 3 s under `faults --comm stress-ng-vm`.
fn faults_under_stress_ng(extra: &[&str]) -> Value {
    let mut args = vec!["faults", "--json", "-T", "100000", "--comm", "stress-ng-vm"];
    args.extend_from_slice(extra);
    let mut mt = Running::start(&args);
    mt.wait_ready();
    let stress = Command::new("stress-ng")
        // Left to itself stress-ng picks a random madvise for its buffer: MADV_HUGEPAGE
        // (a few hundred 2 MiB faults) or MADV_POPULATE_WRITE (none) made this test fail
        // now and then. No huge pages: one fault per 4 KiB page written.
        .args(["--vm", "1", "--vm-bytes", "256M", "--vm-madvise", "nohugepage", "--timeout", "3s"])
        .output()
        .expect("stress-ng runs (cargo xtask setup installs it)");
    assert!(stress.status.success(), "{}", String::from_utf8_lossy(&stress.stderr));
    mt.signal(libc::SIGINT);
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(120));
    assert!(status.success(), "{status}: {stderr}");
    assert_detached("faults");
    final_report(&stdout)
}

/// Per process: the faults in its rows with a stack, and the process's own count of faults
/// without their stack, add up to its faults exactly.
fn assert_accounted(report: &Value) -> u64 {
    let mut stacked: HashMap<u64, u64> = HashMap::new();
    for s in report["stacks"].as_array().unwrap() {
        if !s["user_stack_id"].is_null() {
            *stacked.entry(s["pid"].as_u64().unwrap()).or_default() += s["faults"].as_u64().unwrap();
        }
    }
    let procs = report["processes"].as_array().unwrap();
    assert!(!procs.is_empty(), "stress-ng's workers were seen: {report:#}");
    let mut missing = 0;
    for p in procs {
        let pid = p["pid"].as_u64().unwrap();
        let (faults, no_stack) = (p["faults"].as_u64().unwrap(), p["no_stack"].as_u64().unwrap());
        assert_eq!(stacked.get(&pid).copied().unwrap_or(0), faults - no_stack, "pid {pid}: {p:#}");
        missing += no_stack;
    }
    missing
}

/// Before the shared store, a third of these faults had no stack.
#[test]
fn stacks_faults_keep_every_stack_under_stress_ng() {
    if !bpf_available("stacks_faults_keep_every_stack_under_stress_ng") {
        return;
    }
    let report = faults_under_stress_ng(&[]);
    let total = report["faults"].as_u64().unwrap();
    // One pass over 256 MiB is 65,536 faults; a loaded machine may not finish it in 3 s.
    assert!(total > 16_384, "stress-ng faulted its memory in: {total}");
    assert_eq!(assert_accounted(&report), 0, "faults without a stack at the defaults");
    for field in ["stacks_lost", "stacks_full", "processes_full", "stack_store_full"] {
        assert_eq!(report[field], 0, "blind spot {field}");
    }
}

/// Overload: a store far too small still counts every fault, and says per process how many
/// have no stack.
#[test]
fn stacks_faults_overload_counts_what_is_missing_per_process() {
    if !bpf_available("stacks_faults_overload_counts_what_is_missing_per_process") {
        return;
    }
    let report = faults_under_stress_ng(&["--max-stacks", "8"]);
    let missing = assert_accounted(&report);
    assert!(missing > 0, "8 stacks cannot hold stress-ng's");
    assert!(report["stack_store_full"].as_u64().unwrap() > 0, "the store said it was full");
}
