//! drsnoop against the real kernel: the memory-cgroup reclaim of a process allocating past
//! a 32 MiB limit, one line each with --memcg; none without it; filters; bad input; detach.

#[path = "common/mod.rs"]
mod common;
#[path = "common/memcg.rs"]
mod memcg;

use std::{os::unix::process::ExitStatusExt, time::Duration};

use common::*;
use memcg::{Hog, Memcg};
use serde_json::Value;

/// Runs drsnoop (started once the hog's pid is known) while the hog is OOM-killed in a 32 MiB
/// group; returns the hog, drsnoop's JSON lines and its final summary.
/// None when this kernel cannot run it (listed as not run).
fn trace_hog(tag: &str, args: impl Fn(&Hog) -> Vec<String>) -> Option<(Hog, Vec<Value>, Value)> {
    let group = Memcg::new(tag, 32)?;
    let mut hog = group.spawn(&prog("oomkill_hog"), &["512"]);
    let args = args(&hog);
    let mut mt = Running::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    mt.wait_ready();
    hog.go_until_oom_killed(Duration::from_secs(60));
    // With -p the run ends by itself when the hog is gone.
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains(&format!("process {} exited", hog.pid)), "{stderr}");
    let mut lines = json_lines(&stdout);
    let last = lines.pop().unwrap_or_else(|| panic!("no JSON output: {stdout}"));
    assert_eq!(last["final"], true, "{last}");
    assert_eq!(last["events_lost"], 0, "{last}");
    assert_eq!(last["reclaims"], lines.len(), "{last}");
    assert_detached("drsnoop");
    Some((hog, lines, last))
}

#[test]
fn drsnoop_memcg_shows_each_reclaim_of_the_hog() {
    if !bpf_available("drsnoop_memcg_shows_each_reclaim_of_the_hog") {
        return;
    }
    let Some((hog, lines, _)) = trace_hog("drsnoop", |hog| {
        ["drsnoop", "--memcg", "--json", "-p", &hog.pid.to_string()].map(String::from).into()
    }) else {
        return;
    };
    assert!(!lines.is_empty(), "no reclaim reported");
    for line in &lines {
        assert_eq!(line["pid"], hog.pid, "{line}");
        assert_eq!(line["tid"], hog.pid, "{line}");
        assert_eq!(line["comm"], "oomkill_hog", "{line}");
        assert_eq!(line["kind"], "memcg", "{line}");
        assert!(line["latency_ns"].as_u64().unwrap() > 0, "{line}");
        assert!(line["latency_ms"].as_f64().unwrap() > 0.0, "{line}");
        assert!(line["pages"].is_u64() && line["ts_s"].as_f64().unwrap() >= 0.0, "{line}");
    }
}

/// Without --memcg only global direct reclaim is traced, which a 32 MiB group never causes.
#[test]
fn drsnoop_without_memcg_reports_no_memcg_reclaim() {
    if !bpf_available("drsnoop_without_memcg_reports_no_memcg_reclaim") {
        return;
    }
    let Some((_, lines, _)) =
        trace_hog("drsnoop-direct", |hog| ["drsnoop", "--json", "-p", &hog.pid.to_string()].map(String::from).into())
    else {
        return;
    };
    for line in &lines {
        assert_eq!(line["kind"], "direct", "{line}");
    }
}

/// Pressure on the whole machine (the VM suite's): one line per direct reclaim the kernel
/// counts in /proc/vmstat.
#[test]
fn drsnoop_shows_each_global_direct_reclaim() {
    let test = "drsnoop_shows_each_global_direct_reclaim";
    let Some((stalls, stdout)) = memcg::trace_global_pressure(test, &["drsnoop", "--json"]) else { return };
    let mut lines = json_lines(&stdout);
    let last = lines.pop().expect("final line");
    assert_eq!(last["events_lost"], 0, "{last}");
    assert!(lines.iter().all(|l| l["kind"] == "direct"), "{stdout}");
    assert_eq!(lines.len() as u64, stalls, "against /proc/vmstat allocstall_*");
    assert!(lines.iter().any(|l| l["comm"] == "vm_mem"), "the hog reclaimed: {stdout}");
}

/// -t keeps one thread: the hog's reclaim is not another thread's.
#[test]
fn drsnoop_tid_filter_skips_other_threads() {
    if !bpf_available("drsnoop_tid_filter_skips_other_threads") {
        return;
    }
    let me = std::process::id().to_string();
    let Some((_, lines, last)) = trace_hog("drsnoop-tid", |hog| {
        ["drsnoop", "--memcg", "--json", "-p", &hog.pid.to_string(), "-t", &me].map(String::from).into()
    }) else {
        return;
    };
    assert!(lines.is_empty(), "{lines:?}");
    assert_eq!(last["reclaims"], 0);
}

/// The table with -T and -n: a TIME(s) column and the KIND column. `-n` takes a part of the
/// name, as bcc's does: "kill_ho" keeps oomkill_hog.
#[test]
fn drsnoop_table_with_timestamps_and_name() {
    if !bpf_available("drsnoop_table_with_timestamps_and_name") {
        return;
    }
    let Some(group) = Memcg::new("drsnoop-table", 32) else { return };
    let mut hog = group.spawn(&prog("oomkill_hog"), &["512"]);
    let mut mt = Running::start(&["drsnoop", "--memcg", "--timestamp", "-n", "kill_ho"]);
    mt.wait_ready();
    hog.go();
    let status = hog.wait(Duration::from_secs(60));
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    mt.signal(libc::SIGINT);
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["TIME(s)", "TIME", "COMM", "PID", "TID", "KIND", "LAT(ms)", "PAGES", "CGROUP"]
    );
    assert!(lines.len() > 1, "{stdout}");
    for row in &lines[1..] {
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols.len(), 9, "{row}");
        assert_eq!(cols[8], group.path, "{row}");
        assert!(cols[0].parse::<f64>().is_ok(), "{row}");
        assert_eq!((cols[2], cols[3], cols[5]), ("oomkill_hog", hog.pid.to_string().as_str(), "memcg"), "{row}");
    }
    assert_detached("drsnoop");
}

#[test]
fn drsnoop_bad_input_gets_one_line_errors() {
    if !bpf_available("drsnoop_bad_input_gets_one_line_errors") {
        return;
    }
    for (args, expect) in [
        (&["drsnoop", "-p", "999999999"][..], "no such process: 999999999"),
        (&["drsnoop", "-t", "999999999"][..], "no such thread: 999999999"),
        (&["drsnoop", "-n", "a-name-longer-than-15"][..], "-n takes 1 to 15 bytes"),
        (&["drsnoop", "-n", ""][..], "-n takes 1 to 15 bytes"),
    ] {
        assert_one_line_error(args, expect);
    }
    assert_detached("drsnoop");
}
