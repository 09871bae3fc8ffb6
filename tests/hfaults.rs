//! hfaults against the real kernel: exact hugetlb fault counts per process and per file, by
//! PID and system-wide, bad input, and clean detach. Huge pages are reserved for each test
//! (`/proc/sys/vm/nr_hugepages`) and given back after it.

#[path = "common/mod.rs"]
mod common;

use std::{
    io::{BufRead, BufReader, Write},
    path::PathBuf,
    process::{Child, ChildStdin, Command, Stdio},
    time::Duration,
};

use common::*;
use serde_json::Value;

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// Reserves huge pages for a test and restores the previous pool size on drop.
struct HugePages(String);

impl HugePages {
    fn reserve(n: u32) -> HugePages {
        let before = std::fs::read_to_string(NR_HUGEPAGES).unwrap();
        std::fs::write(NR_HUGEPAGES, n.to_string()).unwrap();
        let now: u32 = std::fs::read_to_string(NR_HUGEPAGES).unwrap().trim().parse().unwrap();
        assert!(now >= n, "only {now} of {n} huge pages could be reserved");
        HugePages(before)
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, self.0.trim());
    }
}

/// hfaults_touch with -w: maps `pages` huge pages, then waits for us before touching them.
fn toucher(pages: u32, file: Option<&str>) -> (Child, ChildStdin, impl BufRead) {
    let mut cmd = Command::new(prog("hfaults_touch"));
    cmd.arg("-w").arg(pages.to_string()).args(file);
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    expect_line(&mut out, "ready");
    (child, stdin, out)
}

fn expect_line(out: &mut impl BufRead, want: &str) {
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), want, "hfaults_touch said {line:?}");
}

/// The last report before the final line.
fn report(stdout: &str) -> Value {
    let lines = json_lines(stdout);
    assert!(lines.len() >= 2, "expected a report and a final line: {stdout}");
    let last = &lines[lines.len() - 1];
    assert_eq!(last["final"], true, "{last}");
    assert_eq!(last["events_lost"], 0, "{last}");
    lines[lines.len() - 2].clone()
}

fn faults_of(report: &Value, key: &str, field: &str, value: &Value) -> u64 {
    report[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key} in {report}"))
        .iter()
        .find(|row| &row[field] == value)
        .map_or(0, |row| row["faults"].as_u64().unwrap())
}

#[test]
fn hfaults_pid_counts_each_huge_page_once() {
    if !bpf_available("hfaults_pid_counts_each_huge_page_once") {
        return;
    }
    let _pool = HugePages::reserve(8);
    let (mut child, mut stdin, mut out) = toucher(4, None);
    let pid = child.id().to_string();
    let mut tool = Running::start(&["hfaults", "--json", "-p", &pid]);
    tool.wait_ready();
    writeln!(stdin).unwrap();
    expect_line(&mut out, "touched");
    drop(stdin);
    child.wait().unwrap();
    let (status, stdout, stderr) = tool.finish(Duration::from_secs(30));
    assert!(status.success(), "{status}: {stderr}");
    let report = report(&stdout);
    assert_eq!(faults_of(&report, "processes", "pid", &child.id().into()), 4, "{report}");
    assert_eq!(faults_of(&report, "files", "file", &"anon_hugepage".into()), 4, "{report}");
    assert_eq!(report["processes"].as_array().unwrap().len(), 1, "-p leaked other processes: {report}");
    assert_detached("hfaults");
}

#[test]
fn hfaults_system_wide_sees_a_mapping_touched_at_once() {
    if !bpf_available("hfaults_system_wide_sees_a_mapping_touched_at_once") {
        return;
    }
    let _pool = HugePages::reserve(8);
    let mut tool = Running::start(&["hfaults", "--json", "-d", "3"]);
    tool.wait_ready();
    // No waiting between mmap and the first touch: the range must be known as mmap returns.
    let out = Command::new(prog("hfaults_touch")).arg("3").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let (status, stdout, stderr) = tool.finish(Duration::from_secs(30));
    assert!(status.success(), "{status}: {stderr}");
    let report = report(&stdout);
    let rows: Vec<&Value> =
        report["processes"].as_array().unwrap().iter().filter(|r| r["comm"] == "hfaults_touch").collect();
    assert_eq!(rows.len(), 1, "{report}");
    assert_eq!(rows[0]["faults"], 3, "{report}");
    // Named though the process may be gone by the time the events are read.
    assert!(faults_of(&report, "files", "file", &"anon_hugepage".into()) >= 3, "{report}");
    assert_detached("hfaults");
}

#[test]
fn hfaults_names_the_hugetlbfs_file() {
    if !bpf_available("hfaults_names_the_hugetlbfs_file") {
        return;
    }
    let _pool = HugePages::reserve(8);
    let mnt = PathBuf::from(format!("/tmp/memtrace-hugetlbfs-{}", std::process::id()));
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount").args(["-t", "hugetlbfs", "none"]).arg(&mnt).status().unwrap();
    assert!(mounted.success(), "cannot mount hugetlbfs on {}", mnt.display());
    let file = mnt.join("hfaults-test-file");
    let (mut child, mut stdin, mut out) = toucher(2, file.to_str());
    let pid = child.id().to_string();
    let mut tool = Running::start(&["hfaults", "--json", "-p", &pid]);
    tool.wait_ready();
    writeln!(stdin).unwrap();
    expect_line(&mut out, "touched");
    // Give the one-second rescan no part in this: the file was mapped before hfaults started.
    drop(stdin);
    child.wait().unwrap();
    let (status, stdout, stderr) = tool.finish(Duration::from_secs(30));
    let _ = Command::new("umount").arg(&mnt).status();
    let _ = std::fs::remove_dir(&mnt);
    assert!(status.success(), "{status}: {stderr}");
    let report = report(&stdout);
    assert_eq!(faults_of(&report, "files", "file", &"hfaults-test-file".into()), 2, "{report}");
    assert_eq!(faults_of(&report, "processes", "pid", &child.id().into()), 2, "{report}");
}

#[test]
fn hfaults_bad_input_is_one_line_error() {
    for (args, want) in [(&["hfaults", "-p", "999999999"][..], "999999999"), (&["hfaults", "0"][..], "at least 1")] {
        let out = run(args, Duration::from_secs(10));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.starts_with("memtrace: error:") && stderr.contains(want), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
    }
}

/// Ordinary memory placed where hugetlb mappings were (after munmap, after mremap moved them,
/// after exec) faults thousands of times; only the 5 hugetlb faults of hfaults_reuse count.
/// It all happens well within the one-second rescan, so only following the changes as they
/// happen gets it right.
#[test]
fn hfaults_ignores_ordinary_memory_where_hugetlb_was() {
    if !bpf_available("hfaults_ignores_ordinary_memory_where_hugetlb_was") {
        return;
    }
    let _pool = HugePages::reserve(8);
    let mut child = Command::new(prog("hfaults_reuse")).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    expect_line(&mut out, "ready");
    let pid = child.id().to_string();
    let mut tool = Running::start(&["hfaults", "--json", "-p", &pid]);
    tool.wait_ready();
    writeln!(stdin).unwrap();
    expect_line(&mut out, "touched");
    drop(stdin);
    assert!(child.wait().unwrap().success());
    let (status, stdout, stderr) = tool.finish(Duration::from_secs(30));
    assert!(status.success(), "{status}: {stderr}");
    let report = report(&stdout);
    assert_eq!(faults_of(&report, "processes", "pid", &child.id().into()), 5, "{report}");
    assert_eq!(faults_of(&report, "files", "file", &"anon_hugepage".into()), 5, "{report}");
    assert_eq!(report["files"].as_array().unwrap().len(), 1, "{report}");
    let last = json_lines(&stdout).pop().unwrap();
    assert_eq!(last["ranges_untracked"], 0, "{last}");
    assert_eq!(last["total"], 5, "{last}");
    assert_detached("hfaults");
}
