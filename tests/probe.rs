//! probe against the real kernel: features as the kernel shows them (hardware breakpoints and
//! counters included), every tracepoint the tools use, and each tool's attach method (or why
//! it cannot run), in JSON and as text.

#[path = "common/mod.rs"]
mod common;

use std::{path::Path, time::Duration};

use common::*;
use serde_json::Value;

fn probe_json() -> Value {
    let out = run(&["probe", "--json"], Duration::from_secs(30));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = json_lines(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(lines.len(), 1, "probe prints one JSON object");
    lines[0].clone()
}

fn tool<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["tools"].as_array().unwrap().iter().find(|t| t["tool"] == name).unwrap_or_else(|| panic!("no {name}"))
}

#[test]
fn probe_reports_features_as_the_kernel_has_them() {
    if !bpf_available("probe_reports_features_as_the_kernel_has_them") {
        return;
    }
    let r = probe_json();
    let state =
        |f: &str| r["features"][f]["state"].as_str().unwrap_or_else(|| panic!("no feature {f}: {r}")).to_string();
    let kprobes = kprobes();
    assert_eq!(state("kprobes"), if kprobes { "yes" } else { "no" });
    assert_eq!(state("bpf syscall"), "yes");
    assert_eq!(state("btf"), if Path::new("/sys/kernel/btf/vmlinux").exists() { "yes" } else { "no" });
    assert_eq!(state("uprobes"), "yes");
    assert_eq!(state("ring buffer"), "yes");
    // bpf_loop came in 5.17; the release read here, apart from memtrace's own reading.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let nums: Vec<u32> = release.split(['.', '-']).take(2).map(|n| n.trim().parse().unwrap()).collect();
    assert_eq!(state("unwind tables"), if (nums[0], nums[1]) >= (5, 17) { "yes" } else { "no" });
    let fentry = &r["features"]["fentry"];
    match fentry_attempt() {
        Ok(()) => assert_eq!(fentry["state"], "yes", "{fentry}"),
        Err(("load", libc::EPERM)) => {
            assert_eq!(fentry["state"], "no", "{fentry}");
            let detail = fentry["detail"].as_str().unwrap();
            assert!(
                detail.starts_with("loading a fentry program on bpf_fentry_test1: EPERM although root: "),
                "{detail}"
            );
        }
        Err(failed) => assert_eq!(fentry["state"], "no", "{failed:?}: {fentry}"),
    }
    for tp in ["kmem:kmalloc", "oom:mark_victim", "exceptions:page_fault_user", "vmscan:mm_vmscan_direct_reclaim_begin"]
    {
        assert_eq!(r["tracepoints"][tp], true, "{tp}: {}", r["tracepoints"]);
    }
    // Gone since 6.x: kmalloc_node was merged into kmalloc.
    assert_eq!(
        r["tracepoints"]["kmem:kmalloc_node"],
        Path::new("/sys/kernel/tracing/events/kmem/kmalloc_node").exists()
    );
}

/// Hardware breakpoints and cache counters, as the test's own perf_event_open finds them:
/// on the project's host breakpoints work (and take an eBPF program) and there is no PMU.
#[test]
fn probe_reports_hardware_breakpoints_and_cache_events() {
    if !bpf_available("probe_reports_hardware_breakpoints_and_cache_events") {
        return;
    }
    let r = probe_json();
    let feature = |f: &str| {
        let v = &r["features"][f];
        (v["state"].as_str().unwrap_or_else(|| panic!("no feature {f}: {r}")).to_string(), v["detail"].to_string())
    };
    let (bp, bp_detail) = feature("hw breakpoints");
    let (bpf, bpf_detail) = feature("breakpoint bpf");
    let (cache, cache_detail) = feature("hw cache events");
    let breakpoint = "perf_event_open(PERF_TYPE_BREAKPOINT, HW_BREAKPOINT_W, 8 bytes)";
    match breakpoint_writes() {
        Ok(5) => {
            assert_eq!((bp.as_str(), bpf.as_str()), ("yes", "yes"), "{bp_detail} {bpf_detail}");
            assert_eq!(bp_detail, format!("\"{breakpoint} on a variable of memtrace counted 5 of 5 writes\""));
            assert_eq!(
                bpf_detail,
                "\"a perf_event eBPF program attached to that breakpoint (PERF_EVENT_IOC_SET_BPF)\""
            );
        }
        Ok(n) => panic!("the test's own breakpoint counted {n} of 5 writes"),
        Err(errno) => {
            assert_eq!((bp.as_str(), bpf.as_str()), ("no", "unknown"), "errno {errno}: {bp_detail}");
            assert!(bp_detail.starts_with(&format!("\"{breakpoint}: ")), "{bp_detail}");
        }
    }
    let counter = "perf_event_open(PERF_TYPE_HARDWARE, PERF_COUNT_HW_CACHE_MISSES)";
    match perf_open(0, 3, 0, 0) {
        Ok(fd) => {
            // SAFETY: closing the fd just opened.
            unsafe { libc::close(fd) };
            assert_eq!(cache, "yes", "{cache_detail}");
            assert_eq!(cache_detail, format!("\"{counter} works\""));
        }
        Err(libc::ENOENT) => {
            assert_eq!(cache, "no", "{cache_detail}");
            assert_eq!(
                cache_detail,
                format!("\"{counter}: ENOENT: no hardware counters (no PMU, as in many virtual machines)\"")
            );
        }
        Err(errno) => {
            assert_eq!(cache, "no", "errno {errno}: {cache_detail}");
            assert!(cache_detail.starts_with(&format!("\"{counter}: ")), "{cache_detail}");
        }
    }
    let out = run(&["probe"], Duration::from_secs(30));
    let text = String::from_utf8_lossy(&out.stdout);
    for (name, state) in [("hw breakpoints", &bp), ("breakpoint bpf", &bpf), ("hw cache events", &cache)] {
        assert!(text.contains(&format!("\n  {name:<18} {state:<8} ")), "{name}: {text}");
    }
}

/// perf_event_open for this thread with a perf_event_attr of 128 bytes (PERF_ATTR_SIZE_VER7),
/// user space only; the fd or the errno.
fn perf_open(kind: u32, config: u64, bp_addr: u64, bp_len: u64) -> Result<i32, i32> {
    let mut attr = [0u64; 16];
    attr[0] = u64::from(kind) | 128 << 32;
    attr[1] = config;
    attr[2] = 1; // sample_period
    attr[5] = 1 << 5 | 1 << 6; // exclude_kernel, exclude_hv
    attr[6] = u64::from(2u32) << 32; // bp_type HW_BREAKPOINT_W, after wakeup_events
    attr[7] = bp_addr;
    attr[8] = bp_len;
    // SAFETY: a zeroed perf_event_attr of the size it states.
    let fd = unsafe { libc::syscall(libc::SYS_perf_event_open, attr.as_ptr(), 0, -1, -1, 0) };
    if fd < 0 { Err(std::io::Error::last_os_error().raw_os_error().unwrap()) } else { Ok(fd as i32) }
}

/// Writes 5 times to a watched variable; what the breakpoint counted, or perf_event_open's errno.
fn breakpoint_writes() -> Result<u64, i32> {
    let mut watched = 0u64;
    let fd = perf_open(5, 0, (&raw mut watched) as u64, 8)?;
    for i in 0..5 {
        // SAFETY: a live local.
        unsafe { std::ptr::write_volatile(&raw mut watched, i) };
    }
    let mut n = 0u64;
    // SAFETY: reading 8 bytes into a live u64, then closing the fd just opened.
    unsafe {
        libc::read(fd, (&raw mut n).cast(), 8);
        libc::close(fd);
    }
    Ok(n)
}

/// The test's own fentry attempt, with aya's BTF parser and raw syscalls: `r0 = 0; exit` as a
/// BPF_PROG_TYPE_TRACING (26) program with expected attach type BPF_TRACE_FENTRY (24) on
/// bpf_fentry_test1, then BPF_RAW_TRACEPOINT_OPEN. Err names the failing step and its errno.
fn fentry_attempt() -> Result<(), (&'static str, i32)> {
    let btf = aya::Btf::from_sys_fs().map_err(|_| ("btf", 0))?;
    let id = btf.id_by_type_name_kind("bpf_fentry_test1", aya_obj::btf::BtfKind::Func).map_err(|_| ("btf", 0))?;
    let insns: [u64; 2] = [0xb7, 0x95];
    let mut attr = [0u64; 20];
    attr[0] = 26 | (insns.len() as u64) << 32;
    attr[1] = insns.as_ptr() as u64;
    attr[2] = c"GPL".as_ptr() as u64;
    attr[8] = 24 << 32; // expected_attach_type at byte 68
    attr[13] = u64::from(id) << 32; // attach_btf_id at byte 108
    let bpf = |cmd: i64, attr: &[u64]| {
        // SAFETY: attr is a zeroed bpf_attr prefix whose pointers outlive the call.
        let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_ptr(), size_of_val(attr)) };
        if fd < 0 { Err(std::io::Error::last_os_error().raw_os_error().unwrap()) } else { Ok(fd as i32) }
    };
    let prog = bpf(5, &attr).map_err(|e| ("load", e))?;
    let link = bpf(17, &[0, prog as u64]).map_err(|e| ("attach", e));
    // SAFETY: closing the fds just created.
    unsafe {
        libc::close(prog);
        link.map(|l| libc::close(l))?;
    }
    Ok(())
}

#[test]
fn probe_picks_the_attach_method_each_tool_would_use() {
    if !bpf_available("probe_picks_the_attach_method_each_tool_would_use") {
        return;
    }
    let r = probe_json();
    assert!(tool(&r, "memleak")["method"].as_str().unwrap().starts_with("uprobes"), "{r}");
    let kmem = tool(&r, "memleak-kernel");
    assert!(kmem["method"].as_str().unwrap().starts_with("tracepoints kmem"), "{kmem}");
    assert!(kmem["targets"].as_array().unwrap().contains(&"tracepoint:kmem:kmalloc".into()), "{kmem}");
    // Before 5.17 (no bpf_loop) the tools that show user stacks run on frame pointers alone
    // and say so; the others lose nothing.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut version = release.split(|c: char| !c.is_ascii_digit()).map(|n| n.parse::<u32>().unwrap());
    let old = (version.next().unwrap(), version.next().unwrap()) < (5, 17);
    for t in r["tools"].as_array().unwrap() {
        let user_stacks =
            ["memleak", "oomkill", "brkstack", "faults", "swapin", "segv"].contains(&t["tool"].as_str().unwrap());
        let degraded = t.get("degraded").and_then(Value::as_str);
        assert_eq!(degraded.is_some(), old && user_stacks, "{t}");
        assert!(degraded.is_none_or(|d| d.contains("bpf_loop helper (Linux 5.17+)")), "{t}");
    }
    if kprobes() {
        assert_eq!(tool(&r, "oomkill")["method"], "kprobe oom_kill_process");
        assert_eq!(tool(&r, "hfaults")["method"], "kprobe hugetlb_fault");
        return;
    }
    // No kprobes here: the tracepoint fallbacks, and swapin cannot run at all.
    assert_eq!(tool(&r, "oomkill")["method"], "tracepoint oom:mark_victim");
    let oom_why = tool(&r, "oomkill")["unusable"][0].as_str().unwrap().to_string();
    assert!(oom_why.starts_with("kprobe oom_kill_process: ") && oom_why.contains("no kprobes"), "{oom_why}");
    assert_eq!(tool(&r, "hfaults")["method"], "tracepoint exceptions:page_fault_user in hugetlb ranges");
    let swapin = tool(&r, "swapin");
    assert_eq!(swapin["method"], Value::Null, "{swapin}");
    assert!(swapin["unusable"][0].as_str().unwrap().contains("CONFIG_KPROBES"), "{swapin}");
    for name in ["mmapsnoop", "brkstack", "shmsnoop", "faults", "vmscan", "drsnoop", "compaction", "migrate"] {
        assert!(tool(&r, name)["method"].as_str().is_some_and(|m| m.starts_with("tracepoint")), "{name}: {r}");
    }
}

#[test]
fn probe_text_lists_every_tool_once() {
    let out = run(&["probe"], Duration::from_secs(30));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let tools = text.split("tools:\n").nth(1).expect("a tools: section");
    let names: Vec<&str> = tools.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert_eq!(
        names,
        [
            "memleak",
            "memleak-kernel",
            "oomkill",
            "mmapsnoop",
            "brkstack",
            "shmsnoop",
            "faults",
            "vmscan",
            "drsnoop",
            "compaction",
            "migrate",
            "swapin",
            "hfaults",
            "segv"
        ]
    );
    assert!(text.contains("\n  kprobes "), "{text}");
}

/// Without root, tracefs and BPF look absent: probe must say it needs root, not blame the kernel.
#[test]
fn probe_without_root_says_it_needs_root() {
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", env!("CARGO_BIN_EXE_memtrace"), "probe"])
        .output()
        .expect("setpriv (util-linux) runs");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "memtrace: error: must run as root: loading eBPF programs needs CAP_BPF and CAP_PERFMON (try sudo)\n"
    );
    assert!(out.stdout.is_empty());
}
