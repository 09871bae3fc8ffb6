//! migrate against the real kernel: compaction through /proc/sys/vm/compact_memory moves
//! pages of memory left in pieces, and migrate's totals over the run equal /proc/vmstat's
//! pgmigrate_success and pgmigrate_fail deltas exactly; the writer's process row; -p keeps
//! other processes' rows out but not the totals; rows by count; bad input; detach.

#[path = "common/mod.rs"]
mod common;
#[path = "common/compact.rs"]
mod compact;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// memtrace `args` (JSON) while a shell writes compact_memory with 16 MiB of this process
/// in pieces; (the shell's pid, the interval reports, the final line).
fn trace_compact_memory(args: &[&str]) -> (u32, Vec<Value>, Value) {
    let pieces = compact::Pieces::new(16);
    let mut mt = Running::start(args);
    mt.wait_ready();
    let pid = compact::compact_memory();
    drop(pieces);
    // One report after the compaction, so the interval rows hold all of it.
    std::thread::sleep(Duration::from_millis(1500));
    mt.signal(libc::SIGINT);
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(30));
    assert!(status.success(), "{status}: {stderr}");
    let mut reports = json_lines(&stdout);
    let last = reports.pop().expect("final line");
    assert_eq!(last["final"], true, "{last}");
    assert_eq!(last["events_lost"], 0, "{last}");
    assert_eq!(last["procs_full"], 0, "{last}");
    assert_detached("migrate");
    (pid, reports, last)
}

fn sum(rows: impl Iterator<Item = Value>, key: &str) -> u64 {
    rows.map(|r| r[key].as_u64().unwrap()).sum()
}

#[test]
fn migrate_totals_equal_vmstat_deltas() {
    if !bpf_available("migrate_totals_equal_vmstat_deltas") {
        return;
    }
    let (pid, reports, last) = trace_compact_memory(&["migrate", "--json", "1"]);
    let totals = &last["totals"];
    // All tasks, against the kernel's own counts over the same time.
    assert_eq!(totals["succeeded"], totals["vmstat_pgmigrate_success"], "{last}");
    assert_eq!(totals["failed"], totals["vmstat_pgmigrate_fail"], "{last}");
    assert_eq!(totals["agree"], true, "{last}");
    let moved = totals["succeeded"].as_u64().unwrap() + totals["failed"].as_u64().unwrap();
    assert!(moved > 0, "compaction of memory in pieces migrated nothing: {last}");
    eprintln!("migrate_totals_equal_vmstat_deltas: {totals}");
    // The reports add up to the totals, per reason.
    let in_reports = |key: &str| sum(reports.iter().flat_map(|r| r["reasons"].as_array().unwrap().clone()), key);
    let in_totals = |key: &str| sum(last["reasons"].as_array().unwrap().iter().cloned(), key);
    for key in ["succeeded", "failed", "thp_succeeded", "thp_failed", "thp_split", "large_split", "calls"] {
        assert_eq!(in_reports(key), in_totals(key), "{key}: {reports:?} {last}");
    }
    assert_eq!(in_totals("succeeded"), totals["succeeded"].as_u64().unwrap());
    // The writer compacted: its rows carry the reason the kernel names "compaction" (0).
    let writer: Vec<Value> =
        reports.iter().flat_map(|r| r["processes"].as_array().unwrap().clone()).filter(|p| p["pid"] == pid).collect();
    assert!(!writer.is_empty(), "no row of the writer {pid}: {reports:?}");
    for row in &writer {
        assert_eq!(
            (&row["comm"], &row["reason"], &row["reason_code"]),
            (&"sh".into(), &"compaction".into(), &0.into())
        );
    }
    assert!(sum(writer.into_iter(), "calls") > 0);
    for r in &reports {
        assert!(r["time"].is_string(), "{r}");
    }
}

/// -p of another process: no process rows, and the totals (all tasks) still agree.
#[test]
fn migrate_pid_filter_keeps_rows_out_but_not_totals() {
    if !bpf_available("migrate_pid_filter_keeps_rows_out_but_not_totals") {
        return;
    }
    let mut other = std::process::Command::new("sleep").arg("60").spawn().unwrap();
    let other_pid = other.id().to_string();
    let (_, reports, last) = trace_compact_memory(&["migrate", "--json", "-p", &other_pid, "1"]);
    let _ = other.kill();
    let _ = other.wait();
    for r in &reports {
        assert_eq!(r["processes"], serde_json::json!([]), "{r}");
    }
    let totals = &last["totals"];
    assert_eq!(totals["agree"], true, "{last}");
    assert!(totals["succeeded"].as_u64().unwrap() + totals["failed"].as_u64().unwrap() > 0, "{last}");
}

/// `migrate 1 2`: two reports (their first line each), the total and the blind spots; exit 0.
#[test]
fn migrate_table_stops_after_count_reports() {
    if !bpf_available("migrate_table_stops_after_count_reports") {
        return;
    }
    let out = run(&["migrate", "1", "2"], Duration::from_secs(30));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let firsts: Vec<&str> = stdout.lines().filter(|l| l.contains("/proc/vmstat:")).collect();
    assert_eq!(firsts.len(), 3, "{stdout}");
    for line in &firsts[..2] {
        assert_eq!(line.as_bytes()[2], b':', "{stdout}");
        assert!(line.contains(" pages, ") && line.contains("pgmigrate_success +"), "{stdout}");
    }
    assert!(firsts[2].starts_with("total: migrated "), "{stdout}");
    assert!(stderr.contains("memtrace: migrate: blind spots: none"), "{stderr}");
    assert_detached("migrate");
}

#[test]
fn migrate_bad_input_gets_one_line_errors() {
    if !bpf_available("migrate_bad_input_gets_one_line_errors") {
        return;
    }
    for (args, expect) in [
        (&["migrate", "0"][..], "the interval must be at least 1 second"),
        (&["migrate", "1", "0"][..], "the count must be at least 1"),
        (&["migrate", "-p", "999999999"][..], "no such process: 999999999"),
        (&["migrate", "--comm", "a-name-longer-than-15"][..], "--comm"),
    ] {
        assert_one_line_error(args, expect);
    }
    assert_detached("migrate");
}
