//! oomkill against the real kernel: a process allocating past a 32 MiB memory cgroup is
//! OOM-killed, and oomkill names it, its memory, its group and its trigger; -p filters by
//! trigger; bad input; clean detach.

#[path = "common/mod.rs"]
mod common;
#[path = "common/memcg.rs"]
mod memcg;

use std::time::Duration;

use common::*;
use memcg::{Hog, Memcg};
use serde_json::Value;

const HOG_MIB: u64 = 512;
const LIMIT_MIB: u64 = 32;
const SCORE_ADJ: i64 = 321;

/// Starts the hog in `group` with a known oom_score_adj, lets it allocate, and waits for the
/// OOM killer's SIGKILL.
fn provoke(group: &Memcg, start: impl FnOnce(&Hog)) -> Hog {
    let mut hog = group.spawn(&prog("oomkill_hog"), &[&HOG_MIB.to_string()]);
    std::fs::write(format!("/proc/{}/oom_score_adj", hog.pid), SCORE_ADJ.to_string()).unwrap();
    start(&hog);
    hog.go_until_oom_killed(Duration::from_secs(60));
    assert_eq!(group.oom_kills(), 1, "{} counted no OOM kill", group.path);
    hog
}

fn kills(stdout: &str) -> (Vec<Value>, Value) {
    let mut lines = json_lines(stdout);
    let last = lines.pop().unwrap_or_else(|| panic!("no JSON output:\n{stdout}"));
    assert_eq!(last["final"], true, "last line is not the final summary: {last}");
    assert_eq!(last["events_lost"], 0, "{last}");
    (lines, last)
}

#[test]
fn oomkill_victim_names_the_memcg_hog() {
    if !bpf_available("oomkill_victim_names_the_memcg_hog") {
        return;
    }
    let Some(group) = Memcg::new("oomkill", LIMIT_MIB) else { return };
    let mut mt = None;
    let hog = provoke(&group, |_| {
        let mut running = Running::start(&["-v", "oomkill", "--json"]);
        running.wait_ready();
        mt = Some(running);
    });
    let mt = mt.unwrap();
    mt.signal(libc::SIGINT);
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    let expected =
        if kprobes() { "oomkill: using kprobe oom_kill_process" } else { "oomkill: using tracepoint oom:mark_victim" };
    assert!(stderr.contains(expected), "{stderr}");

    let (events, last) = kills(&stdout);
    let ours: Vec<&Value> = events.iter().filter(|e| e["victim_pid"] == hog.pid).collect();
    assert_eq!(ours.len(), 1, "expected one kill of pid {}: {stdout}", hog.pid);
    let kill = ours[0];
    assert_eq!(kill["victim_comm"], "oomkill_hog", "{kill:#}");
    // A memcg OOM runs in the task whose charge failed: the hog itself.
    assert_eq!(kill["trigger_pid"], hog.pid, "{kill:#}");
    assert_eq!(kill["trigger_tid"], hog.pid, "{kill:#}");
    assert_eq!(kill["trigger_comm"], "oomkill_hog", "{kill:#}");
    assert_eq!(kill["constraint"], "memcg", "{kill:#}");
    assert_eq!(kill["memcg"], group.path.as_str(), "{kill:#}");
    assert_eq!(kill["victim_memcg"], group.path.as_str(), "{kill:#}");
    if !mark_victim_has_memory() {
        // An older kernel records only the victim's pid (Debian's 5.10): what it does not say
        // is null, never a made-up 0.
        for field in ["oom_score_adj", "uid", "total_vm_kb", "anon_rss_kb", "file_rss_kb", "shmem_rss_kb"] {
            assert_eq!(kill[field], Value::Null, "{field}: {kill:#}");
        }
        assert_detached("oomkill");
        return;
    }
    assert_eq!(kill["oom_score_adj"], SCORE_ADJ, "{kill:#}");
    assert_eq!(kill["uid"], 0, "{kill:#}");
    // The whole malloc'd region is mapped; what is resident is bounded by the group's limit.
    let total_vm = kill["total_vm_kb"].as_u64().unwrap();
    assert!(total_vm >= HOG_MIB * 1024, "{kill:#}");
    let anon = kill["anon_rss_kb"].as_u64().unwrap();
    assert!(anon > LIMIT_MIB * 1024 / 2 && anon <= LIMIT_MIB * 1024, "{kill:#}");
    assert!(kill["pgtables_kb"].as_u64().unwrap() > 0, "{kill:#}");
    // Shared memory only where the program and its libraries are files of a tmpfs (a VM's
    // initramfs): none on a disk.
    let shmem = kill["shmem_rss_kb"].as_u64().unwrap();
    assert!(kill["file_rss_kb"].is_u64() && (shmem == 0 || on_tmpfs(&prog("oomkill_hog"))), "{kill:#}");
    assert_eq!(kill["loadavg"].as_str().unwrap().split_whitespace().count(), 5, "{kill:#}");
    assert!(last["kills"].as_u64().unwrap() >= 1, "{last}");
    assert_detached("oomkill");
}

/// The table names the same kill on one line.
#[test]
fn oomkill_table_line() {
    if !bpf_available("oomkill_table_line") {
        return;
    }
    let Some(group) = Memcg::new("oomkill-table", LIMIT_MIB) else { return };
    let mut mt = None;
    let hog = provoke(&group, |_| {
        let mut running = Running::start(&["oomkill", "--comm", "oomkill_hog", "-d", "60"]);
        running.wait_ready();
        mt = Some(running);
    });
    let mt = mt.unwrap();
    mt.signal(libc::SIGTERM);
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    let lines: Vec<&str> =
        stdout.lines().filter(|l| l.contains(&format!("killed {} (oomkill_hog)", hog.pid))).collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    let line = lines[0];
    let trigger = format!(" {} (oomkill_hog) ", hog.pid);
    let memory = [" anon-rss=", " total-vm=", " oom_score_adj=321 ", " uid=0 "];
    for part in [trigger.as_str(), " loadavg: "] {
        assert!(line.contains(part), "{part:?} missing: {line}");
    }
    for part in memory {
        // Only what the kernel recorded is shown.
        assert_eq!(line.contains(part), mark_victim_has_memory(), "{part:?}: {line}");
    }
    assert!(line.contains(&format!(" memcg={} ", group.path)), "{line}");
    assert_detached("oomkill");
}

/// -p selects the trigger: a kill triggered by another process is not reported.
#[test]
fn oomkill_pid_filter_skips_other_triggers() {
    if !bpf_available("oomkill_pid_filter_skips_other_triggers") {
        return;
    }
    let Some(group) = Memcg::new("oomkill-filter", LIMIT_MIB) else { return };
    let me = std::process::id().to_string();
    let mut mt = None;
    provoke(&group, |_| {
        let mut running = Running::start(&["oomkill", "--json", "-p", &me]);
        running.wait_ready();
        mt = Some(running);
    });
    let mt = mt.unwrap();
    mt.signal(libc::SIGINT);
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    let (events, last) = kills(&stdout);
    assert!(events.is_empty(), "kills of other triggers reported: {stdout}");
    assert_eq!(last["kills"], 0, "{last}");
    assert_detached("oomkill");
}

/// A burst: stress-ng's vm workers, restarted as each is killed, OOM a 32 MiB group hundreds
/// of times in a few seconds. memtrace is stopped for a while in the middle, as a loaded
/// machine would delay it, so that it reads many kills at once: each must still be the
/// group's, with the group's path, whatever the counters say by the time it is read.
#[test]
fn oomkill_labels_every_kill_of_a_burst() {
    if !bpf_available("oomkill_labels_every_kill_of_a_burst") {
        return;
    }
    let stress = std::path::Path::new("/usr/bin/stress-ng");
    assert!(stress.exists(), "stress-ng is missing: run `cargo xtask setup`");
    let Some(group) = Memcg::new("oomkill-burst", LIMIT_MIB) else { return };
    let mut mt = Running::start(&["oomkill", "--json"]);
    mt.wait_ready();
    let mut stress = group
        .command(stress)
        .args(["--vm", "4", "--vm-bytes", "64M", "--timeout", "6s", "--quiet"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    mt.signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(1500));
    mt.signal(libc::SIGCONT);
    let status = stress.wait().unwrap();
    assert!(status.code().is_some(), "stress-ng itself was killed: {status}");
    let kills_in_group = group.oom_kills();
    mt.signal(libc::SIGINT);
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    let (events, _) = kills(&stdout);
    let ours: Vec<&Value> =
        events.iter().filter(|e| e["victim_comm"].as_str().is_some_and(|c| c.starts_with("stress-ng"))).collect();
    // 4 workers re-spawned for 6 s: hundreds of kills on the host, 15 under TCG on 5.10.
    assert!(kills_in_group >= 10, "only {kills_in_group} OOM kills: not a burst");
    assert_eq!(ours.len() as u64, kills_in_group, "{stdout}");
    for kill in &ours {
        assert_eq!(kill["constraint"], "memcg", "{kill:#}");
        assert_eq!(kill["memcg"], group.path.as_str(), "{kill:#}");
    }
    assert_detached("oomkill");
}

#[test]
fn oomkill_bad_input_gets_one_line_errors() {
    if !bpf_available("oomkill_bad_input_gets_one_line_errors") {
        return;
    }
    for (args, expect) in [
        (&["oomkill", "-p", "999999999"][..], "no such process: 999999999"),
        (&["oomkill", "--comm", "a-name-longer-than-15"][..], "--comm takes 1 to 15 bytes"),
    ] {
        assert_one_line_error(args, expect);
    }
    assert_detached("oomkill");
}

/// The kprobe path cannot attach on a kernel without kprobes, but its program must still
/// pass the verifier wherever the kprobe program type exists (it does with uprobes).
#[test]
fn oomkill_kprobe_program_passes_the_verifier() {
    if !bpf_available("oomkill_kprobe_program_passes_the_verifier") {
        return;
    }
    // The build memtrace loads on this kernel: before bpf_loop (5.17), the one without the
    // stack walker, which older verifiers refuse to see named.
    let object: &[u8] = if bpf_loop() {
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/oomkill"))
    } else {
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/no-bpf-loop/oomkill"))
    };
    let mut bpf = aya::Ebpf::load(object).expect("the oomkill object loads");
    for name in ["oomkill_kprobe", "oomkill_victim"] {
        let prog = bpf.program_mut(name).unwrap_or_else(|| panic!("no program {name}"));
        match prog {
            aya::programs::Program::KProbe(p) => p.load().unwrap_or_else(|e| panic!("{name}: {e:?}")),
            aya::programs::Program::TracePoint(p) => p.load().unwrap_or_else(|e| panic!("{name}: {e:?}")),
            _ => panic!("{name} has an unexpected program type"),
        }
    }
    drop(bpf);
    assert_detached("oomkill");
}

/// Whether the kernel's oom:mark_victim record has the victim's memory, uid and score (it
/// has only the pid before they were added; Debian's 5.10 has only the pid).
fn mark_victim_has_memory() -> bool {
    std::fs::read_to_string("/sys/kernel/tracing/events/oom/mark_victim/format")
        .expect("tracefs at /sys/kernel/tracing")
        .contains(" total_vm;")
}

/// Whether `path` is a file of a tmpfs or ramfs, whose mapped pages count as shared memory.
fn on_tmpfs(path: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path and a statfs the call fills.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statfs(c.as_ptr(), &mut fs) }, 0, "statfs {}", path.display());
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    matches!(fs.f_type as i64, TMPFS_MAGIC | RAMFS_MAGIC)
}
