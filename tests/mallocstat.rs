//! mallocstat against the real kernel: a program that declares glibc's `libc:memory_*` probes
//! (provider, names and argument layouts as glibc's malloc has them) fires each a known number
//! of times; the counts, sizes, events and the stacks of heap growth are exact. Debian's own
//! glibc has no such probes: mallocstat says so in one line.

#[path = "common/mod.rs"]
mod common;

use std::{process::Command, time::Duration};

use common::*;
use serde_json::{Value, json};

#[test]
fn mallocstat_counts_glibc_probes_exactly() {
    if !bpf_available("mallocstat_counts_glibc_probes_exactly") {
        return;
    }
    let mut program = Gated::start("mallocstat_probes");
    let pid = program.pid();
    let mut mt = Running::start(&["mallocstat", "-p", &pid.to_string(), "--json"]);
    mt.wait_ready();
    assert_eq!(program.act()["fired"], "12");
    program.end();
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains(&format!("process {pid} exited")), "{stderr}");
    let lines = json_lines(&stdout);
    // Tunables, retries and the double free, each as it happened, with its arguments.
    let events: Vec<(String, Value)> = lines
        .iter()
        .filter(|l| l["event"] == "probe")
        .map(|l| (l["probe"].as_str().unwrap().to_string(), l["args"].clone()))
        .collect();
    let heap_area = events.iter().find(|e| e.0 == "memory_tcache_double_free").unwrap().1[0].clone();
    assert_eq!(
        events,
        [
            ("memory_mallopt".to_string(), json!([-3, 262144])),
            ("memory_mallopt_mmap_threshold".to_string(), json!([262144, 131072, 0])),
            ("memory_malloc_retry".to_string(), json!([1000])),
            ("memory_malloc_retry".to_string(), json!([2000])),
            ("memory_tcache_double_free".to_string(), json!([heap_area, 3])),
        ]
    );
    let report = final_report(&stdout);
    assert_eq!(report["hits"], 12, "{report:#}");
    let probes = &report["probes"];
    let expected = json!({
        "memory_sbrk_more": {"hits": 3, "bytes": 12288},
        "memory_heap_new": {"hits": 2, "bytes": 200704},
        "memory_heap_more": {"hits": 1, "last_size": 200704},
        "memory_arena_new": {"hits": 1, "bytes": 2264},
        "memory_mallopt": {"hits": 1},
        "memory_mallopt_mmap_threshold": {"hits": 1},
        "memory_malloc_retry": {"hits": 2},
        "memory_tcache_double_free": {"hits": 1},
    });
    assert_eq!(probes, &expected, "{report:#}");
    // The stacks of heap growth: sbrk's from grow, at the probe's line, called from main.
    let stacks = stacks_with(&report, "grow");
    assert_eq!(stacks.len(), 5, "one per site of growth: {report:#}");
    let sbrk = stacks.iter().find(|s| s["probe"] == "memory_sbrk_more").unwrap();
    assert_eq!((sbrk["hits"].as_u64(), sbrk["bytes"].as_u64()), (Some(3), Some(12288)), "{sbrk:#}");
    assert_eq!(sbrk["pid"], pid);
    let frame = frame_of(sbrk, "grow").unwrap();
    assert_eq!(frame["line"], tagged_line("mallocstat_probes.c", "GROW:sbrk"), "{frame:#}");
    let names: Vec<&str> =
        sbrk["frames"].as_array().unwrap().iter().map(|f| f["func"].as_str().unwrap_or("?")).collect();
    assert_eq!(&names[..2], ["grow", "main"], "{names:?}");
    for field in ["events_lost", "stacks_lost", "unknown_sites", "stack_store_full"] {
        assert_eq!(report[field], 0, "blind spot {field}: {report:#}");
    }
    assert_detached("mallocstat");
}

/// -c: the command is held after its exec until its probes are in, so every hit counts,
/// including those of code that runs before main would have let a -p attach.
#[test]
fn mallocstat_runs_a_command() {
    if !bpf_available("mallocstat_runs_a_command") {
        return;
    }
    let program = prog("mallocstat_probes");
    let mut cmd = memtrace();
    cmd.args(["--ready-fd", "3", "mallocstat", "--json", "-c", program.to_str().unwrap()]);
    cmd.stdin(std::process::Stdio::null());
    let mt = Running::spawn(cmd);
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(30));
    assert!(status.success(), "{status}: {stderr}");
    let report = final_report(&stdout);
    assert_eq!(report["hits"], 12, "{report:#}");
    assert_eq!(report["probes"]["memory_sbrk_more"], json!({"hits": 3, "bytes": 12288}), "{report:#}");
    assert_eq!(report["stacks"].as_array().unwrap().len(), 5, "{report:#}");
    for field in ["events_lost", "stacks_lost", "unknown_sites"] {
        assert_eq!(report[field], 0, "blind spot {field}: {report:#}");
    }
    assert_detached("mallocstat");
}

/// Debian's glibc has no `libc:memory_*` notes: one line naming the libc the process maps.
#[test]
fn mallocstat_says_when_libc_has_no_probes() {
    if has_usdt_notes(&system_libc()) {
        return not_run("mallocstat_says_when_libc_has_no_probes", "this libc has USDT probes");
    }
    if !bpf_available("mallocstat_says_when_libc_has_no_probes") {
        return;
    }
    let mut program = Gated::spawn({
        let mut cmd = Command::new(prog("usdt_throw"));
        cmd.arg("wait");
        cmd
    });
    let libc = mapped_libc(program.pid());
    assert_exact_error(
        &["mallocstat", "-p", &program.pid().to_string()],
        &format!(
            "{libc} has no libc:memory_* USDT probes (it was built without them: Debian's glibc is, Ubuntu's and \
             Fedora's are not): mallocstat cannot see this process's allocator"
        ),
    );
    program.act();
    program.end();
}

#[test]
fn mallocstat_needs_a_process() {
    assert_exact_error(
        &["mallocstat"],
        "mallocstat needs -p PID or -c CMD: the probes are in the libc that process maps",
    );
}
