//! compaction against the real kernel: a write to /proc/sys/vm/compact_memory compacts every
//! zone with pages in the writer's context, one line each; -p keeps other processes out;
//! direct compaction in the VM suite; bad input; detach.

#[path = "common/mod.rs"]
mod common;
#[path = "common/compact.rs"]
mod compact;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// memtrace `args` while a shell writes compact_memory; (the shell's pid, the JSON events,
/// the final line).
fn trace_compact_memory(args: &[&str]) -> (u32, Vec<Value>, Value) {
    let mut mt = Running::start(args);
    mt.wait_ready();
    let pid = compact::compact_memory();
    // Events already sent are read before the run ends; give the ring buffer a moment.
    std::thread::sleep(Duration::from_millis(300));
    mt.signal(libc::SIGINT);
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(30));
    assert!(status.success(), "{status}: {stderr}");
    let (events, last) = events_and_final(&stdout);
    assert_eq!(last["events_lost"], 0, "{last}");
    assert_eq!(last["compactions"], events.len(), "{last}");
    assert_detached("compaction");
    (pid, events, last)
}

#[test]
fn compaction_shows_each_zone_compact_memory_compacts() {
    if !bpf_available("compaction_shows_each_zone_compact_memory_compacts") {
        return;
    }
    let (pid, events, _) = trace_compact_memory(&["compaction", "--json"]);
    let mine: Vec<&Value> = events.iter().filter(|e| e["pid"] == pid).collect();
    // One compaction per zone with pages, in the kernel's order, all in the writer.
    let zones: Vec<(i64, String)> =
        mine.iter().map(|e| (e["node"].as_i64().unwrap(), e["zone"].as_str().unwrap().to_string())).collect();
    assert_eq!(zones, compact::populated_zones(), "{events:?}");
    // The writer's cgroup is the test's (a child stays in its parent's group).
    let cgroup = memory_cgroup(std::process::id());
    for e in &mine {
        assert_eq!(e["tid"], pid, "{e}");
        assert_eq!(e["comm"], "sh", "{e}");
        assert_eq!(e["kind"], "manual", "{e}");
        assert_eq!(e["order"], -1, "{e}");
        // compact_memory compacts synchronously (MIGRATE_SYNC_LIGHT).
        assert_eq!(e["sync"], true, "{e}");
        assert!(e["latency_ns"].as_u64().unwrap() > 0, "{e}");
        let status = e["status"].as_str().unwrap();
        assert!(!status.starts_with("status"), "status not decoded: {e}");
        assert!(e["zone_end_pfn"].as_u64().unwrap() > e["zone_start_pfn"].as_u64().unwrap(), "{e}");
        match &cgroup {
            Some(group) => assert_eq!(e["cgroup"], group.as_str(), "{e}"),
            None => assert_eq!(e["cgroup"], Value::Null, "{e}"),
        }
    }
}

/// -p of another process: the writer's compactions are not shown.
#[test]
fn compaction_pid_filter_leaves_others_out() {
    if !bpf_available("compaction_pid_filter_leaves_others_out") {
        return;
    }
    let mut other = std::process::Command::new("sleep").arg("60").spawn().unwrap();
    let other_pid = other.id().to_string();
    let (_, events, last) = trace_compact_memory(&["compaction", "--json", "-p", &other_pid]);
    let _ = other.kill();
    let _ = other.wait();
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(last["compactions"], 0, "{last}");
}

/// --comm keeps the writer; the table's columns.
#[test]
fn compaction_table_with_comm_shows_the_writer() {
    if !bpf_available("compaction_table_with_comm_shows_the_writer") {
        return;
    }
    let mut mt = Running::start(&["compaction", "--comm", "sh", "--timestamp"]);
    mt.wait_ready();
    let pid = compact::compact_memory();
    let zones = compact::populated_zones();
    mt.wait_for("a row per zone", |out, _| out.len() > zones.len());
    mt.signal(libc::SIGINT);
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(30));
    assert!(status.success(), "{status}: {stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["TIME(s)", "TIME", "COMM", "PID", "NODE", "ZONE", "ORDER", "KIND", "LAT(ms)", "STATUS", "CGROUP"]
    );
    let rows: Vec<Vec<&str>> = lines[1..].iter().map(|l| l.split_whitespace().collect()).collect();
    let mine: Vec<&Vec<&str>> = rows.iter().filter(|r| r[3] == pid.to_string()).collect();
    assert_eq!(mine.len(), zones.len(), "{stdout}");
    for (row, (node, zone)) in mine.iter().zip(&zones) {
        assert_eq!(row.len(), 11, "{row:?}");
        assert_eq!((row[2], row[4], row[5], row[6], row[7]), ("sh", &*node.to_string(), zone.as_str(), "-1", "manual"));
    }
    assert!(rows.iter().all(|r| r[2] == "sh"), "{stdout}");
    assert_detached("compaction");
}

/// Fragmented memory and then huge pages asked for (the VM suite's machine is its own): the
/// allocation compacts for itself, in the writer's context, for the huge page's order.
#[test]
fn compaction_shows_direct_compaction_of_a_huge_page_allocation() {
    let test = "compaction_shows_direct_compaction_of_a_huge_page_allocation";
    if !bpf_available(test) || !machine_of_its_own(test) {
        return;
    }
    let stalls = compact::vmstat("compact_stall");
    let mut mt = Running::start(&["compaction", "--json"]);
    mt.wait_ready();
    let pid = compact::huge_pages_in_pieces();
    std::thread::sleep(Duration::from_millis(500));
    mt.signal(libc::SIGINT);
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(60));
    assert!(status.success(), "{status}: {stderr}");
    let stalled = compact::vmstat("compact_stall") - stalls;
    let (events, last) = events_and_final(&stdout);
    assert_eq!(last["events_lost"], 0, "{last}");
    let direct: Vec<&Value> = events.iter().filter(|e| e["pid"] == pid && e["kind"] == "direct").collect();
    if stalled == 0 {
        not_run(test, "the huge page allocation did not compact (no compact_stall)");
        return;
    }
    assert!(!direct.is_empty(), "{stalled} compact_stall, no direct compaction shown: {stdout}");
    eprintln!("{test}: compact_stall +{stalled}, {} direct compactions of compact_frag shown", direct.len());
    for e in direct {
        assert_eq!(e["comm"], "compact_frag", "{e}");
        assert_eq!(e["order"], compact::HUGE_ORDER, "{e}");
        assert!(!e["status"].as_str().unwrap().starts_with("status"), "{e}");
    }
    assert_detached("compaction");
}

#[test]
fn compaction_bad_input_gets_one_line_errors() {
    if !bpf_available("compaction_bad_input_gets_one_line_errors") {
        return;
    }
    for (args, expect) in [
        (&["compaction", "-p", "999999999"][..], "no such process: 999999999"),
        (&["compaction", "-T"][..], "-T is not a timestamp option: use --timestamp"),
        (&["compaction", "-d", "0"][..], "-d/--duration takes 1 to 31536000"),
    ] {
        assert_one_line_error(args, expect);
    }
    assert_detached("compaction");
}
