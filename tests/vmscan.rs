//! vmscan against the real kernel: a process allocating past a 32 MiB memory cgroup makes
//! the kernel reclaim in that group, and vmscan counts and times it; rows by count; bad
//! input; clean detach.

#[path = "common/mod.rs"]
mod common;
#[path = "common/memcg.rs"]
mod memcg;

use std::time::Duration;

use common::*;
use memcg::Memcg;

#[test]
fn vmscan_counts_memcg_reclaim_of_the_hog() {
    if !bpf_available("vmscan_counts_memcg_reclaim_of_the_hog") {
        return;
    }
    let Some(group) = Memcg::new("vmscan", 32) else { return };
    let mut hog = group.spawn(&prog("oomkill_hog"), &["512"]);
    // Only the hog's reclaim, so that the numbers are its own.
    let mut mt = Running::start(&["vmscan", "--json", "--comm", "oomkill_hog", "1"]);
    mt.wait_ready();
    hog.go_until_oom_killed(Duration::from_secs(60));
    // Let one more row pass, so that the rows hold all of the hog's reclaim.
    std::thread::sleep(Duration::from_millis(1500));
    mt.signal(libc::SIGINT);
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");

    let mut lines = json_lines(&stdout);
    let last = lines.pop().expect("final summary");
    assert_eq!(last["final"], true, "{last}");
    assert_eq!(last["events_lost"], 0, "{last}");
    assert!(!lines.is_empty(), "no interval rows: {stdout}");
    let fields = [
        "slab_ms",
        "slab_calls",
        "direct_reclaim_ms",
        "direct_reclaim_calls",
        "direct_reclaim_pages",
        "memcg_reclaim_ms",
        "memcg_reclaim_calls",
        "memcg_reclaim_pages",
        "kswapd_wakeups",
        "pages_written",
    ];
    for row in &lines {
        assert_eq!(row["interval_s"], 1, "{row}");
        assert!(row["time"].is_string(), "{row}");
        for f in fields {
            assert!(row[f].is_number(), "{f} missing: {row}");
        }
    }
    let totals = &last["totals"];
    let calls = totals["memcg_reclaim_calls"].as_u64().unwrap();
    assert!(calls > 0, "no memcg reclaim seen: {last}");
    assert!(totals["memcg_reclaim_ms"].as_f64().unwrap() > 0.0, "{last}");
    // Every reclaim ended before the last row: the rows add up to the totals.
    let row_calls: u64 = lines.iter().map(|r| r["memcg_reclaim_calls"].as_u64().unwrap()).sum();
    assert_eq!(row_calls, calls, "{stdout}");
    let row_ms: f64 = lines.iter().map(|r| r["memcg_reclaim_ms"].as_f64().unwrap()).sum();
    assert!((row_ms - totals["memcg_reclaim_ms"].as_f64().unwrap()).abs() < 0.01, "{stdout}");
    // One histogram entry per timed reclaim.
    assert_eq!(last["histogram_unit"], "usecs");
    let buckets = last["histograms"]["memcg_reclaim"].as_array().unwrap();
    let in_hist: u64 = buckets.iter().map(|b| b["count"].as_u64().unwrap()).sum();
    assert_eq!(in_hist, calls, "{last}");
    for b in buckets {
        let (low, high) = (b["low"].as_u64().unwrap(), b["high"].as_u64().unwrap());
        assert!(low == 0 || (low.is_power_of_two() && high == 2 * low - 1), "{b}");
    }
    assert_eq!(group.oom_kills(), 1);
    assert_detached("vmscan");
}

/// Pressure on the whole machine (the VM suite's): kswapd wakes, and every direct reclaim the
/// kernel counts in /proc/vmstat is one of vmscan's.
#[test]
fn vmscan_counts_global_reclaim_as_the_kernel_does() {
    let test = "vmscan_counts_global_reclaim_as_the_kernel_does";
    let Some((stalls, stdout)) = memcg::trace_global_pressure(test, &["vmscan", "--json", "60"]) else { return };
    let last = json_lines(&stdout).pop().expect("final summary");
    let totals = &last["totals"];
    assert_eq!(totals["direct_reclaim_calls"], stalls, "against /proc/vmstat allocstall_*: {last}");
    assert!(totals["kswapd_wakeups"].as_u64().unwrap() > 0, "{last}");
    assert_eq!(last["events_lost"], 0, "{last}");
}

/// `vmscan 1 2`: a header, two rows, the three histograms, exit 0.
#[test]
fn vmscan_table_stops_after_count_rows() {
    if !bpf_available("vmscan_table_stops_after_count_rows") {
        return;
    }
    let out = run(&["vmscan", "1", "2"], Duration::from_secs(30));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["TIME", "S-SLABms", "D-RECLAIMms", "M-RECLAIMms", "M-RECLAIMS", "KSWAPD", "WRITEPAGE"]
    );
    for row in &lines[1..3] {
        assert_eq!(row.split_whitespace().count(), 7, "{stdout}");
        assert_eq!(row.as_bytes()[2], b':', "{stdout}");
    }
    for kind in ["shrink_slab", "direct_reclaim", "memcg_reclaim"] {
        assert_eq!(lines.iter().filter(|l| **l == format!("{kind} latency:")).count(), 1, "{stdout}");
    }
    assert_detached("vmscan");
}

#[test]
fn vmscan_bad_input_gets_one_line_errors() {
    if !bpf_available("vmscan_bad_input_gets_one_line_errors") {
        return;
    }
    for (args, expect) in [
        (&["vmscan", "0"][..], "the interval must be at least 1 second"),
        (&["vmscan", "1", "0"][..], "the count must be at least 1"),
        (
            &["vmscan", "18446744073709551615", "1"][..],
            "the interval must be at least 1 second and at most 31536000 (a year), not 18446744073709551615",
        ),
        (&["vmscan", "-d", "18446744073709551615"][..], "-d/--duration takes 1 to 31536000, not 18446744073709551615"),
        (&["vmscan", "-p", "999999999"][..], "no such process: 999999999"),
    ] {
        assert_one_line_error(args, expect);
    }
    assert_detached("vmscan");
}
