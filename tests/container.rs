//! Container attribution against the real kernel: processes run in memory cgroups named as
//! docker and the kubelet name theirs (`docker/<id>`, `kubepods/besteffort/pod<uid>/<id>`),
//! in namespaces of their own (`unshare`, without a fork, so their pid stays the one started),
//! and each tool's JSON names exactly that group and that container. cgroup v1 on the host,
//! v2 in the VM suite's kernels; every group is removed after the test, even on failure.

#[path = "common/mod.rs"]
mod common;
#[path = "common/memcg.rs"]
mod memcg;

use std::{
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use common::*;
use memcg::Memcg;
use serde_json::Value;

const ID: &str = "c0ffee00d15ea5e0123456789abcdef0123456789abcdef0123456789abcdef0";
const POD: &str = "5b0e3f1c-7a2d-4e9b-8c61-0d4f2a9b3e57";

/// A docker-like group (`.../docker/<ID>`).
fn docker(test: &str, limit_mib: u64) -> Option<Memcg> {
    Memcg::nested(test, &format!("docker/{ID}"), limit_mib)
}

/// `unshare --uts --ipc -- program args`: new namespaces, the same pid (unshare execs it).
fn unshared(group: &Memcg, program: &Path, args: &[&str]) -> Command {
    let mut cmd = group.command(Path::new("/usr/bin/unshare"));
    cmd.args(["--uts", "--ipc", "--"]).arg(program).args(args);
    cmd
}

/// oomkill_hog (512 MiB) in `group`, in new namespaces as `unshared`, waiting for `go`.
fn unshared_hog(group: &Memcg) -> memcg::Hog {
    let hog = prog("oomkill_hog");
    group.spawn(Path::new("/usr/bin/unshare"), &["--uts", "--ipc", "--", hog.to_str().unwrap(), "512"])
}

/// The attribution every record about a process of `group` carries.
fn assert_in(record: &Value, group: &Memcg) {
    assert_eq!(record["cgroup"], group.path.as_str(), "{record:#}");
    assert_eq!(record["container"], ID, "{record:#}");
}

#[test]
fn container_oomkill_names_the_victims_container() {
    if !bpf_available("container_oomkill_names_the_victims_container") {
        return;
    }
    let Some(group) = docker("ctr-oomkill", 32) else { return };
    let mut hog = unshared_hog(&group);
    let mut mt = Running::start(&["oomkill", "--json"]);
    mt.wait_ready();
    hog.go_until_oom_killed(Duration::from_secs(60));
    mt.wait_lines("{", 1);
    mt.signal(libc::SIGINT);
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    let (events, _) = events_and_final(&stdout);
    let kill = events.iter().find(|e| e["victim_pid"] == hog.pid).unwrap_or_else(|| panic!("no kill: {stdout}"));
    assert_in(kill, &group);
    assert_eq!(kill["memcg"], group.path.as_str(), "{kill:#}");
    assert_detached("oomkill");
}

#[test]
fn container_drsnoop_names_the_reclaimers_container() {
    if !bpf_available("container_drsnoop_names_the_reclaimers_container") {
        return;
    }
    let Some(group) = docker("ctr-drsnoop", 32) else { return };
    let mut hog = unshared_hog(&group);
    let mut mt = Running::start(&["drsnoop", "--memcg", "--json", "-p", &hog.pid.to_string()]);
    mt.wait_ready();
    hog.go_until_oom_killed(Duration::from_secs(60));
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    let (events, _) = events_and_final(&stdout);
    assert!(!events.is_empty(), "no reclaim: {stdout}");
    for e in &events {
        assert_eq!(e["pid"], hog.pid, "{e:#}");
        // Read in the kernel at each reclaim: it holds after the process is gone.
        assert_in(e, &group);
    }
    assert_detached("drsnoop");
}

#[test]
fn container_faults_per_process_and_per_stack() {
    if !bpf_available("container_faults_per_process_and_per_stack") {
        return;
    }
    let Some(group) = docker("ctr-faults", 256) else { return };
    let mut target = Ready::start(&mut unshared(&group, &prog("faults_touch"), &[]));
    let pid = target.child.id();
    let mut mt = Running::start(&["faults", "--json", "-p", &pid.to_string()]);
    mt.wait_ready();
    writeln!(target.stdin).unwrap();
    assert!(target.lines.next().unwrap().unwrap().starts_with("mapping "));
    // Ends the process: its row is read after it exited, from what the kernel side recorded.
    drop(target.stdin);
    assert!(target.child.wait().unwrap().success());
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(30));
    assert!(status.success(), "{status}: {stderr}");
    let report = final_report(&stdout);
    let procs = report["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 1, "{report:#}");
    assert_eq!(procs[0]["pid"], pid, "{report:#}");
    assert_in(&procs[0], &group);
    let stacks = report["stacks"].as_array().unwrap();
    assert!(!stacks.is_empty(), "{report:#}");
    stacks.iter().for_each(|s| assert_in(s, &group));
    assert_detached("faults");
}

#[test]
fn container_segv_names_the_crashed_container() {
    if !bpf_available("container_segv_names_the_crashed_container") {
        return;
    }
    let Some(group) = docker("ctr-segv", 256) else { return };
    let mut victim = Ready::start(unshared(&group, &prog("segv_crash"), &["null"]).stderr(Stdio::null()));
    let pid = victim.child.id();
    let mut mt = Running::start(&["segv", "--json", "-p", &pid.to_string()]);
    mt.wait_ready();
    writeln!(victim.stdin).unwrap();
    assert!(!victim.child.wait().unwrap().success());
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(30));
    assert!(status.success(), "{status}: {stderr}");
    let (events, _) = events_and_final(&stdout);
    assert_eq!(events.len(), 1, "{stdout}");
    assert_in(&events[0], &group);
    assert_detached("segv");
}

#[test]
fn container_memleak_per_process_in_kubepods() {
    if !bpf_available("container_memleak_per_process_in_kubepods") {
        return;
    }
    let below = format!("kubepods/besteffort/pod{POD}/{ID}");
    let Some(group) = Memcg::nested("ctr-memleak", &below, 256) else { return };
    let mut target = Gated::spawn(unshared(&group, &prog("leaky"), &["wait"]));
    let pid = target.pid();
    let mut mt = Running::start(&["memleak", "--json", "-p", &pid.to_string()]);
    mt.wait_ready();
    assert_eq!(target.act_line(), "leaked");
    target.end();
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(30));
    assert!(status.success(), "{status}: {stderr}");
    let report = final_report(&stdout);
    let procs = report["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 1, "{report:#}");
    assert_eq!(procs[0]["pid"], pid, "{report:#}");
    // Read while it ran, kept after it exited.
    assert_in(&procs[0], &group);
    assert_eq!(procs[0]["pod"], POD, "{report:#}");
    assert_detached("memleak");
}

#[test]
fn container_compaction_and_mmapsnoop_read_the_group_in_the_kernel() {
    if !bpf_available("container_compaction_and_mmapsnoop_read_the_group_in_the_kernel") {
        return;
    }
    let Some(group) = docker("ctr-compaction", 256) else { return };
    let mut mt = Running::start(&["compaction", "--json"]);
    mt.wait_ready();
    let status = unshared(&group, Path::new("/bin/sh"), &["-c", "echo 1 > /proc/sys/vm/compact_memory"])
        .stdin(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "{status}");
    mt.wait_for("a manual compaction", |out, _| out.iter().any(|l| l.contains("\"manual\"")));
    mt.signal(libc::SIGINT);
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(30));
    assert!(status.success(), "{status}: {stderr}");
    let (events, _) = events_and_final(&stdout);
    let manual: Vec<&Value> = events.iter().filter(|e| e["kind"] == "manual").collect();
    assert!(!manual.is_empty(), "{stdout}");
    // The writer was a shell that has exited by the time the record is printed.
    manual.iter().for_each(|e| assert_in(e, &group));
    assert_detached("compaction");

    let mut target = Gated::spawn(unshared(&group, &prog("mmapsnoop_maps"), &[]));
    let pid = target.pid();
    let mut mt = Running::start(&["mmapsnoop", "--json", "-p", &pid.to_string()]);
    mt.wait_ready();
    target.act();
    mt.wait_lines("{", 1);
    target.end();
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    let (events, _) = events_and_final(&stdout);
    assert!(!events.is_empty(), "{stdout}");
    events.iter().for_each(|e| assert_in(e, &group));
    assert_detached("mmapsnoop");
}
