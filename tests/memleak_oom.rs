//! memleak at an OOM kill, against the real kernel: tests/progs/oom_grow grows through `grow`
//! in a 64 MiB memory cgroup until the OOM killer ends it, traced with -c (the in-process
//! recorder) and with -p (uprobes). memleak reports its heap at the kill, marked as such,
//! with `grow`'s stack the largest, writes it as a pprof profile of its own, and marks the
//! process in the final report; -c ends with the command's SIGKILL status.

#[path = "common/mod.rs"]
mod common;
#[path = "common/gopprof.rs"]
mod gopprof;
#[path = "common/memcg.rs"]
mod memcg;

use std::{path::Path, time::Duration};

use common::*;
use memcg::Memcg;
use serde_json::Value;

const LIMIT_MIB: u64 = 64;
/// tests/progs/oom_grow.c's blocks: grow's and drip's.
const BLOCK: u64 = 1 << 20;
const DRIP: u64 = 4096;
/// What of the limit is not grow's at the kill: the program, its libraries' data, the
/// recorder's tables, page tables.
const SLACK_MIB: u64 = 8;
/// grow's bytes at the kill: nearly the limit, at most the block being touched past it.
const GROWN: std::ops::RangeInclusive<u64> = (LIMIT_MIB - SLACK_MIB) * BLOCK..=(LIMIT_MIB + 1) * BLOCK;

/// A 64 MiB group whose pages cannot go to swap.
fn group(tag: &str) -> Option<Memcg> {
    let group = Memcg::new(tag, LIMIT_MIB)?;
    group.no_swap();
    Some(group)
}

/// Checks the stacks of a heap at the kill (largest first): grow's holds nearly the whole
/// limit in whole blocks, drip's one block per 8 of grow's. Returns grow's bytes.
fn assert_grow_is_largest(stacks: &[Value], what: &str) -> u64 {
    let grow = &stacks[0];
    assert_eq!(grow["frames"][0]["func"], "grow", "{what}: the largest stack is not grow's: {grow:#}");
    let (bytes, allocs) = (grow["bytes"].as_u64().unwrap(), grow["allocs"].as_u64().unwrap());
    assert_eq!(bytes, allocs * BLOCK, "{what}: grow's blocks are 1 MiB each: {grow:#}");
    assert!(GROWN.contains(&bytes), "{what}: grow holds {bytes} bytes at the kill of a {LIMIT_MIB} MiB group");
    let drip = stacks.iter().find(|s| s["frames"][0]["func"] == "drip").unwrap_or_else(|| panic!("{what}: no drip"));
    let drips = drip["allocs"].as_u64().unwrap();
    assert_eq!(drip["bytes"].as_u64().unwrap(), drips * DRIP, "{what}: {drip:#}");
    // One drip after each 8th grow, the last grow (killed in its memset) perhaps not done.
    assert!(drips.abs_diff(allocs.div_ceil(8)) <= 1, "{what}: {drips} drips for {allocs} grows");
    bytes
}

/// The top function of the pprof profile at `path` by inuse_space, read by `go tool pprof`.
fn pprof_top(path: &Path) -> String {
    let text = gopprof::go_pprof(&["-top", "-sample_index=inuse_space", "-unit=B"], path);
    let row = text.lines().skip_while(|l| !l.trim_start().starts_with("flat")).nth(1);
    row.and_then(|r| r.split_whitespace().nth(5)).unwrap_or_else(|| panic!("no row in {text}")).to_string()
}

#[test]
fn memleak_oom_c_reports_the_heap_at_the_kill() {
    const TEST: &str = "memleak_oom_c_reports_the_heap_at_the_kill";
    if !bpf_available(TEST) {
        return;
    }
    let Some(group) = group("memleak-oom-c") else { return };
    let file = std::env::temp_dir().join(format!("memleak-oom-{}.pb.gz", std::process::id()));
    let command = format!("{} {}", prog_nofp("oom_grow").display(), group.procs_file().display());
    let args = ["memleak", "--json", "--pprof", file.to_str().unwrap(), "-c", &command];
    let out = run(&args, Duration::from_secs(120));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // The command's own end: 128 + SIGKILL.
    assert_eq!(out.status.code(), Some(128 + libc::SIGKILL), "{}: {stderr}", out.status);
    assert_eq!(group.oom_kills(), 1, "{} counted no OOM kill: {stderr}", group.path);
    assert_detached("memleak");

    let pid: u64 = stderr
        .split_once(" (pid ")
        .and_then(|(_, rest)| rest.split(')').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no command pid in {stderr}"));
    let lines = json_lines(&stdout);
    let kills: Vec<&Value> = lines.iter().filter(|l| l["oom_killed"] == true).collect();
    assert_eq!(kills.len(), 1, "one heap at a kill: {stdout}");
    let kill = kills[0];
    assert_eq!(kill["pid"], pid, "{kill:#}");
    assert_eq!(kill["comm"], "oom_grow", "{kill:#}");
    assert_eq!(kill["read_at_kill"], true, "{kill:#}");
    let at_kill = assert_grow_is_largest(kill["stacks"].as_array().unwrap(), "heap at the kill");
    let total: u64 = kill["stacks"].as_array().unwrap().iter().map(|s| s["bytes"].as_u64().unwrap()).sum();
    assert_eq!(kill["total_bytes"], total, "{kill:#}");

    // The final report is the usual one, its process marked, its blocks those of the kill.
    let last = final_report(&stdout);
    assert_eq!(last["processes"][0]["pid"], pid, "{last:#}");
    assert_eq!(last["processes"][0]["oom_killed"], true, "{last:#}");
    assert_eq!(assert_grow_is_largest(last["stacks"].as_array().unwrap(), "final report"), at_kill);

    // The profile of the kill has its own file; the run's own is the final report's.
    let at = file.with_file_name(format!("memleak-oom-{}.oom-{pid}.pb.gz", std::process::id()));
    let said = format!("memtrace: memleak: pid {pid}'s heap at its OOM kill written to {}", at.display());
    assert!(stderr.lines().any(|l| l == said), "{said:?} in {stderr}");
    let tops = gopprof::has_go(TEST).then(|| (pprof_top(&at), pprof_top(&file)));
    std::fs::remove_file(&at).unwrap();
    std::fs::remove_file(&file).unwrap();
    if let Some((at_kill, at_end)) = tops {
        assert_eq!((at_kill.as_str(), at_end.as_str()), ("grow", "grow"));
    }
}

#[test]
fn memleak_oom_p_reports_the_heap_at_the_kill() {
    if !bpf_available("memleak_oom_p_reports_the_heap_at_the_kill") {
        return;
    }
    let Some(group) = group("memleak-oom-p") else { return };
    let mut hog = group.spawn(&prog_nofp("oom_grow"), &[]);
    let pid = hog.pid.to_string();
    let mut mt = Running::start(&["memleak", "-T", "2", "-p", &pid]);
    mt.wait_ready();
    hog.go_until_oom_killed(Duration::from_secs(120));
    assert_eq!(group.oom_kills(), 1, "{} counted no OOM kill", group.path);
    // memleak -p ends with its process.
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(30));
    assert!(status.success(), "{status}: {stderr}");
    assert_detached("memleak");

    // The table: the kill's report, then the final one naming the kill.
    let head = format!("pid {pid} (oom_grow) killed by the OOM killer: ");
    let at = stdout.find(&head).unwrap_or_else(|| panic!("{head:?} in {stdout}"));
    let mut lines = stdout[at..].lines();
    assert!(lines.next().unwrap().ends_with("outstanding in 2 stacks at the kill"), "{stdout}");
    let (bytes, blocks) = bytes_in_allocations(lines.next().unwrap());
    assert_eq!(bytes, blocks * BLOCK, "{stdout}");
    assert!(GROWN.contains(&bytes), "{stdout}");
    assert!(lines.next().unwrap().trim_start().starts_with("grow+"), "grow's stack is the largest: {stdout}");
    let final_at = stdout.find("final report, ").unwrap_or_else(|| panic!("no final report: {stdout}"));
    assert!(final_at > at, "{stdout}");
    let mut last = stdout[final_at..].lines().skip(1);
    assert_eq!(last.next().unwrap(), format!("  pid {pid} (oom_grow) was killed by the OOM killer"), "{stdout}");
    assert_eq!(bytes_in_allocations(last.next().unwrap()), (bytes, blocks), "{stdout}");
}

/// (bytes, allocations) of a table's `N bytes in K allocations from stack` line.
fn bytes_in_allocations(line: &str) -> (u64, u64) {
    let words: Vec<&str> = line.split_whitespace().collect();
    assert!(words.len() > 4 && words[1] == "bytes" && words[4] == "allocations", "{line}");
    (words[0].parse().unwrap(), words[3].parse().unwrap())
}
