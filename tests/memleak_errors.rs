//! memleak's memory errors on a program that makes each one (tests/progs/bad_free.c): double
//! frees, invalid frees and realloc of a freed block, from both recorders, each with its
//! stacks named to the line, out before glibc aborts the process; and not one under churn.

mod common;

use std::{process::Output, time::Duration};

use common::*;
use serde_json::Value;

const JEMALLOC: &str = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2";

/// The recorders a command can have: the in-process one (the default), and uprobes, whose
/// stacks from a free's entry need unwind tables (5.17+).
fn recorders(test: &str) -> Vec<&'static str> {
    let mut all = vec!["--older=500"];
    if bpf_loop() {
        all.push("--uprobes");
    } else {
        not_run(&format!("{test} --uprobes"), "stacks from a free's entry need unwind tables, and so bpf_loop (5.17+)");
    }
    all
}

/// memtrace memleak --json `how` -c `cmd`: its output, its memory_error records, and the
/// final report.
fn run_errors(how: &str, cmd: &str) -> (Output, Vec<Value>, Value) {
    let out = run(&["memleak", "--json", how, "-c", cmd], Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines = json_lines(&stdout);
    let errors: Vec<Value> = lines.iter().filter(|l| l["type"] == "memory_error").cloned().collect();
    (out, errors, final_report(&stdout))
}

/// `func` at the line of bad_free.c marked `tag`.
fn at(func: &str, tag: &str) -> (String, u64) {
    tagged_at("bad_free.c", func, tag)
}

/// The one error of a run, printed before the final report and in it.
fn the_error(errors: &[Value], report: &Value, what: &str) -> Value {
    assert_eq!(errors.len(), 1, "{what}: {errors:#?}");
    assert_eq!(report["errors"].as_array().map(Vec::len), Some(1), "{what}: {report:#}");
    errors[0].clone()
}

#[test]
fn memleak_glibc_double_free_is_reported_with_three_stacks_before_the_abort() {
    let test = "memleak_glibc_double_free_is_reported_with_three_stacks_before_the_abort";
    if !bpf_available(test) {
        return;
    }
    for how in recorders(test) {
        let cmd = format!("{} double", prog("bad_free").display());
        let (out, errors, report) = run_errors(how, &cmd);
        let stderr = String::from_utf8_lossy(&out.stderr);
        // glibc saw it too, and aborted: memtrace passes the status on.
        assert_eq!(out.status.code(), Some(128 + libc::SIGABRT), "{how}: {stderr}");
        assert!(stderr.contains("free(): double free detected in tcache 2"), "{how}: {stderr}");
        let e = the_error(&errors, &report, how);
        assert_eq!(e["kind"], "double_free", "{how}: {e:#}");
        assert_eq!(e["call"], "free", "{how}: {e:#}");
        assert_eq!(e["size"], 40, "{how}: {e:#}");
        assert_eq!(first_line(&e["stack"]), at("release_twice", "ERROR:release_twice"), "{how}: {e:#}");
        assert_eq!(first_line(&e["free_stack"]), at("release_once", "FREE:release_once"), "{how}: {e:#}");
        assert_eq!(first_line(&e["alloc_stack"]), at("make_block", "ALLOC:make_block"), "{how}: {e:#}");
        assert_eq!(e["pid"], e["freed_by_tid"], "{how}: one thread made both frees: {e:#}");
    }
}

/// jemalloc does not check: the program runs on, and memtrace is the only witness.
#[test]
fn memleak_double_free_under_jemalloc_is_reported_and_the_program_runs_on() {
    let test = "memleak_double_free_under_jemalloc_is_reported_and_the_program_runs_on";
    if !bpf_available(test) {
        return;
    }
    assert!(
        std::path::Path::new(JEMALLOC).exists(),
        "{JEMALLOC} is missing: `cargo xtask setup` installs libjemalloc2"
    );
    // The command's own LD_PRELOAD replaces memtrace's recorder, so jemalloc's free is probed
    // by uprobes under either option.
    if !bpf_loop() {
        not_run(test, "stacks from a free's entry need unwind tables, and so bpf_loop (5.17+)");
        return;
    }
    for how in recorders(test) {
        let cmd = format!("env LD_PRELOAD={JEMALLOC} {} double", prog("bad_free").display());
        let (out, errors, report) = run_errors(how, &cmd);
        assert_eq!(out.status.code(), Some(0), "{how}: {}", String::from_utf8_lossy(&out.stderr));
        let e = the_error(&errors, &report, how);
        assert_eq!(e["kind"], "double_free", "{how}: {e:#}");
        assert_eq!(first_line(&e["stack"]), at("release_twice", "ERROR:release_twice"), "{how}: {e:#}");
        assert_eq!(first_line(&e["free_stack"]), at("release_once", "FREE:release_once"), "{how}: {e:#}");
        assert_eq!(first_line(&e["alloc_stack"]), at("make_block", "ALLOC:make_block"), "{how}: {e:#}");
    }
}

#[test]
fn memleak_invalid_frees_say_what_the_address_is() {
    let test = "memleak_invalid_frees_say_what_the_address_is";
    if !bpf_available(test) {
        return;
    }
    for how in recorders(test) {
        for (mode, func, is) in [
            ("stack", "free_local", "on the calling thread's stack".to_string()),
            ("interior", "free_inside", "16 bytes into a live block of 64 bytes".to_string()),
        ] {
            let cmd = format!("{} {mode}", prog("bad_free").display());
            let (out, errors, report) = run_errors(how, &cmd);
            assert_eq!(out.status.code(), Some(128 + libc::SIGABRT), "{how} {mode}");
            let e = the_error(&errors, &report, &format!("{how} {mode}"));
            assert_eq!(e["kind"], "invalid_free", "{how} {mode}: {e:#}");
            assert!(e["address_is"].as_str().is_some_and(|s| s.starts_with(&is)), "{how} {mode}: {e:#}");
            assert_eq!(first_line(&e["stack"]), at(func, &format!("ERROR:{func}")), "{how} {mode}: {e:#}");
            assert!(e.get("free_stack").is_none() && e.get("alloc_stack").is_none(), "{how} {mode}: {e:#}");
        }
    }
}

#[test]
fn memleak_realloc_of_a_freed_block_is_a_use_after_free() {
    let test = "memleak_realloc_of_a_freed_block_is_a_use_after_free";
    if !bpf_available(test) {
        return;
    }
    for how in recorders(test) {
        let cmd = format!("{} realloc", prog("bad_free").display());
        let (out, errors, report) = run_errors(how, &cmd);
        assert_eq!(out.status.code(), Some(0), "{how}");
        let e = the_error(&errors, &report, how);
        assert_eq!(e["kind"], "realloc_of_freed", "{how}: {e:#}");
        assert_eq!(e["call"], "realloc", "{how}: {e:#}");
        assert_eq!(e["size"], 24, "{how}: {e:#}");
        assert_eq!(first_line(&e["stack"]), at("grow_freed", "ERROR:grow_freed"), "{how}: {e:#}");
        assert_eq!(first_line(&e["free_stack"]), at("release_once", "FREE:release_once"), "{how}: {e:#}");
        assert_eq!(first_line(&e["alloc_stack"]), at("make_block", "ALLOC:make_block"), "{how}: {e:#}");
    }
}

/// Four threads free each other's blocks two million times, with realloc; glibc hands each
/// exiting thread's cached blocks back through free. Not one error, from either recorder,
/// and the table says so by saying nothing.
#[test]
fn memleak_churn_across_threads_gives_no_error() {
    let test = "memleak_churn_across_threads_gives_no_error";
    if !bpf_available(test) {
        return;
    }
    for how in recorders(test) {
        let cmd = format!("{} churn", prog("bad_free").display());
        let (out, errors, report) = run_errors(how, &cmd);
        assert_eq!(out.status.code(), Some(0), "{how}");
        assert!(errors.is_empty(), "{how}: {errors:#?}");
        assert!(report.get("errors").is_none(), "{how}: {report:#}");
        assert!(report["tracked"].as_u64().unwrap() > 200_000, "{how}: {report:#}");
    }
}

/// --no-errors: the same double free goes unreported (and costs no walk at free).
#[test]
fn memleak_no_errors_turns_the_checks_off() {
    if !bpf_available("memleak_no_errors_turns_the_checks_off") {
        return;
    }
    let cmd = format!("{} realloc", prog("bad_free").display());
    let out = run(&["memleak", "--json", "--no-errors", "-c", &cmd], Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("memory_error"), "{stdout}");
}

/// --errors-only: the double free with the stacks of both frees, the allocation's call site
/// alone (no stack is walked at allocations), and the final report of errors only.
#[test]
fn memleak_errors_only_keeps_the_allocation_call_site_and_reports_no_leaks() {
    let test = "memleak_errors_only_keeps_the_allocation_call_site_and_reports_no_leaks";
    if !bpf_available(test) {
        return;
    }
    for how in recorders(test) {
        let cmd = format!("{} double", prog("bad_free").display());
        let out = run(&["memleak", "--json", "--errors-only", how, "-c", &cmd], Duration::from_secs(120));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(128 + libc::SIGABRT), "{how}: {}", String::from_utf8_lossy(&out.stderr));
        let errors: Vec<Value> = json_lines(&stdout).into_iter().filter(|l| l["type"] == "memory_error").collect();
        let report = final_report(&stdout);
        let e = the_error(&errors, &report, how);
        assert_eq!(e["kind"], "double_free", "{how}: {e:#}");
        assert_eq!(first_line(&e["stack"]), at("release_twice", "ERROR:release_twice"), "{how}: {e:#}");
        assert_eq!(first_line(&e["free_stack"]), at("release_once", "FREE:release_once"), "{how}: {e:#}");
        assert_eq!(e["alloc_stack"].as_array().map(Vec::len), Some(1), "{how}: {e:#}");
        assert_eq!(first_line(&e["alloc_stack"]), at("make_block", "ALLOC:make_block"), "{how}: {e:#}");
        assert_eq!(e["alloc_call_site_only"], true, "{how}: {e:#}");
        assert_eq!(report["errors_only"], true, "{how}: {report:#}");
        assert_eq!(report["stacks"].as_array().map(Vec::len), Some(0), "{how}: {report:#}");
    }
    // A program that leaks 100 bytes a tick for 2 s, reported every second: no interval
    // report, no error, and a final report without stacks.
    let dir = tempdir("memleak_errors_only");
    let cmd = format!("{} 100 {}", prog("ticker").display(), dir.join("ticks").display());
    let out = run(&["memleak", "--errors-only", "-c", &cmd, "1"], Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let reports: Vec<&str> = stdout.lines().filter(|l| l.starts_with('[')).collect();
    assert_eq!(reports.len(), 1, "{stdout}");
    assert!(reports[0].ends_with(": 0 memory errors (--errors-only: leaks not reported)"), "{stdout}");
    assert!(!stdout.contains("leak_tick"), "{stdout}");
}

#[test]
fn memleak_freed_record_takes_a_positive_size() {
    for bad in ["0", "x", "16777217", "4294967296"] {
        let out = run(&["memleak", "--freed-record", bad, "-c", "true"], Duration::from_secs(10));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{bad}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{bad}: {stderr}");
        assert!(stderr.contains("--freed-record"), "{bad}: {stderr}");
    }
    let out = run(&["memleak", "--freed-record", "0", "-c", "true"], Duration::from_secs(10));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "memtrace: error: --freed-record takes 1 to 16777216, not 0\n");
    assert_exact_error(
        &["memleak", "--errors-only"],
        "--errors-only goes with -p or -c: memory errors are found in user space allocators",
    );
    let out = run(&["memleak", "--errors-only", "--no-errors", "-c", "true"], Duration::from_secs(10));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!((out.status.code(), stderr.lines().count()), (Some(1), 1), "{stderr}");
    assert!(stderr.contains("--no-errors") && stderr.contains("--errors-only"), "{stderr}");
}
