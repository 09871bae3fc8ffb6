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
        let user_stacks = ["memleak", "oomkill", "brkstack", "faults", "swapin", "segv", "mallocstat"]
            .contains(&t["tool"].as_str().unwrap());
        let degraded = t.get("degraded").and_then(Value::as_str);
        assert_eq!(degraded.is_some(), old && user_stacks, "{t}");
        assert!(degraded.is_none_or(|d| d.contains("bpf_loop helper (Linux 5.17+)")), "{t}");
    }
    // Debian's glibc has no libc:memory_* probes: mallocstat's row says so.
    let libc = system_libc();
    if !has_usdt_notes(&libc) {
        let libc = libc.display();
        let m = tool(&r, "mallocstat");
        assert_eq!(m["method"], Value::Null, "{m}");
        assert_eq!(
            m["unusable"][0],
            format!(
                "{libc} has no libc:memory_* USDT probes (it was built without them: Debian's glibc is, Ubuntu's and Fedora's are not)"
            ),
            "{m}"
        );
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
            "segv",
            "mallocstat",
            "serve"
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

/// Debian's python3.11, which has USDT probes with semaphores (absent in the VM images).
const PYTHON: &str = "/usr/bin/python3.11";
/// Where libstdc++'s probes are (no semaphores).
const LIBSTDCXX: &str = "/lib/x86_64-linux-gnu/libstdc++.so.6";

/// `probe --usdt FILE --json`: the rows by `provider:name`.
fn usdt_rows(file: &str) -> Vec<Value> {
    let out = run(&["probe", "--usdt", file, "--json"], Duration::from_secs(30));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = json_lines(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(lines.len(), 1, "one JSON object");
    lines[0]["probes"].as_array().unwrap().clone()
}

fn row<'a>(rows: &'a [Value], name: &str) -> &'a Value {
    rows.iter().find(|r| format!("{}:{}", r["provider"], r["name"]).replace('"', "") == name).unwrap()
}

/// A 16-bit semaphore of a running process, read through its memory.
fn semaphore(pid: u32, address: u64) -> u16 {
    use std::os::unix::fs::FileExt as _;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut value = [0u8; 2];
    mem.read_exact_at(&mut value, address).unwrap();
    u16::from_le_bytes(value)
}

#[test]
fn probe_usdt_lists_probes_with_semaphores_and_arguments() {
    if !Path::new(PYTHON).exists() {
        return not_run("probe_usdt_lists_probes_with_semaphores_and_arguments", "no /usr/bin/python3.11 here");
    }
    let rows = usdt_rows(PYTHON);
    let entry = row(&rows, "python:function__entry");
    assert_eq!(entry["probe"], "usdt:/usr/bin/python3.11:python:function__entry");
    assert!(entry["semaphore"].is_string(), "{entry}");
    assert_eq!(entry["args_spec"], "8@%rbp 8@%r12 -4@%eax");
    let types: Vec<&str> = entry["args"].as_array().unwrap().iter().map(|a| a["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["u64", "u64", "s32"]);
    // As `bpftrace -l 'usdt:/usr/bin/python3.11:*'` names them, sorted.
    let names: Vec<String> = rows.iter().map(|r| format!("{}:{}", r["provider"], r["name"]).replace('"', "")).collect();
    for n in ["python:audit", "python:function__entry", "python:function__return", "python:gc__start", "python:line"] {
        assert!(names.contains(&n.to_string()), "{n}: {names:?}");
    }
    assert!(names.is_sorted(), "{names:?}");
    let rows = usdt_rows(LIBSTDCXX);
    let throw = row(&rows, "libstdcxx:throw");
    assert_eq!(throw["semaphore"], Value::Null);
    assert_eq!(throw["args_spec"], "8@%rdi 8@%rsi");
    // The text form: a header, then one row per probe.
    let out = run(&["probe", "--usdt", PYTHON], Duration::from_secs(30));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("python:function__entry ")).unwrap();
    assert!(line.ends_with("arg0 u64 8@%rbp, arg1 u64 8@%r12, arg2 s32 -4@%eax"), "{line}");
}

#[test]
fn probe_usdt_says_a_file_has_no_probes() {
    let libc = system_libc();
    if has_usdt_notes(&libc) {
        return not_run("probe_usdt_says_a_file_has_no_probes", "this libc has USDT probes");
    }
    let libc = libc.to_str().unwrap();
    let out = run(&["probe", "--usdt", libc], Duration::from_secs(30));
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{libc} has no USDT probes (no .note.stapsdt section: it was built without <sys/sdt.h> probes)\n")
    );
    assert_one_line_error(&["probe", "--usdt", "/etc/passwd"], "/etc/passwd is not a 64-bit ELF file");
    assert_one_line_error(
        &["probe", "--usdt", libc, "--trace", "libc:memory_heap_new", "-p", "1"],
        "has no USDT probes",
    );
}

/// python:function__entry, whose semaphore must be set for it to fire, with the script's file,
/// the function's name and its line; the semaphore back at 0 once memtrace is gone.
#[test]
fn probe_usdt_traces_python_function_entry() {
    let test = "probe_usdt_traces_python_function_entry";
    if !Path::new(PYTHON).exists() {
        return not_run(test, "no /usr/bin/python3.11 here");
    }
    if !bpf_available(test) {
        return;
    }
    let script = repo().join("tests/progs/usdt_py.py");
    let mut py = Gated::spawn({
        let mut cmd = std::process::Command::new(PYTHON);
        cmd.arg(&script);
        cmd
    });
    let pid = py.pid();
    let sem = unhex(row(&usdt_rows(PYTHON), "python:function__entry")["semaphore"].as_str().unwrap());
    assert_eq!(semaphore(pid, sem), 0, "nothing traces python yet");
    let mut mt = Running::start(&[
        "probe",
        "--usdt",
        PYTHON,
        "--trace",
        "python:function__entry",
        "-p",
        &pid.to_string(),
        "--json",
    ]);
    mt.wait_ready();
    assert_eq!(semaphore(pid, sem), 1, "memtrace's uprobe counts the semaphore");
    assert_eq!(py.act_line(), "called");
    mt.wait_lines("{\"args\"", 3);
    mt.signal(libc::SIGINT);
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    assert_eq!(semaphore(pid, sem), 0, "the semaphore is released at exit");
    py.end();
    let lines = json_lines(&stdout);
    let line = tagged_line("usdt_py.py", "USDT:greet");
    let hits: Vec<&Value> = lines.iter().filter(|l| l["probe"] == "python:function__entry").collect();
    assert_eq!(hits.len(), 3, "{stdout}");
    for hit in hits {
        assert_eq!(hit["pid"], pid, "{hit}");
        assert_eq!(hit["strings"][0], script.to_str().unwrap(), "{hit}");
        assert_eq!(hit["strings"][1], "greet", "{hit}");
        assert_eq!(hit["args"][2], line, "{hit}");
    }
    let last = lines.last().unwrap();
    assert_eq!(last["final"], true);
    assert_eq!(last["hits"]["python:function__entry"], 3, "{last}");
    assert_eq!(last["events_lost"], 0);
    assert_detached("usdtprobe");
}

/// libstdcxx:throw, in a shared library without semaphores: one hit per throw.
#[test]
fn probe_usdt_counts_libstdcxx_throws() {
    let test = "probe_usdt_counts_libstdcxx_throws";
    if !Path::new(LIBSTDCXX).exists() {
        return not_run(test, "no libstdc++ here");
    }
    if !bpf_available(test) {
        return;
    }
    let mut thrower = Gated::spawn({
        let mut cmd = std::process::Command::new(prog("usdt_throw"));
        cmd.arg("wait");
        cmd
    });
    let pid = thrower.pid();
    let mut mt = Running::start(&["probe", "--usdt", LIBSTDCXX, "--trace", "throw", "-p", &pid.to_string(), "--json"]);
    mt.wait_ready();
    assert_eq!(thrower.act()["thrown"], "4");
    thrower.end();
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains(&format!("process {pid} exited")), "{stderr}");
    let lines = json_lines(&stdout);
    let hits: Vec<&Value> = lines.iter().filter(|l| l["probe"] == "libstdcxx:throw").collect();
    assert_eq!(hits.len(), 4, "{stdout}");
    // Its arguments: the exception object and its type_info, both pointers.
    assert!(hits.iter().all(|h| h["args"][0].as_i64() != Some(0) && h["args"][1].as_i64() != Some(0)), "{stdout}");
    assert_eq!(lines.last().unwrap()["hits"]["libstdcxx:throw"], 4);
    assert_detached("usdtprobe");
}

#[test]
fn probe_usdt_refuses_an_unknown_probe_in_one_line() {
    if !Path::new(LIBSTDCXX).exists() {
        return not_run("probe_usdt_refuses_an_unknown_probe_in_one_line", "no libstdc++ here");
    }
    let me = std::process::id().to_string();
    assert_one_line_error(
        &["probe", "--usdt", LIBSTDCXX, "--trace", "nosuch", "-p", &me],
        &format!("{LIBSTDCXX} has no USDT probe nosuch: `memtrace probe --usdt {LIBSTDCXX}` lists its probes"),
    );
}

/// A uprobe without a reference counter at python:function__entry, as another tracer would
/// hold it: the kernel refuses memtrace's, which counts the semaphore, and memtrace says why
/// in one line.
#[test]
fn probe_usdt_names_a_clash_with_another_uprobe() {
    let test = "probe_usdt_names_a_clash_with_another_uprobe";
    if !Path::new(PYTHON).exists() {
        return not_run(test, "no /usr/bin/python3.11 here");
    }
    if !bpf_available(test) {
        return;
    }
    let py = Gated::spawn({
        let mut cmd = std::process::Command::new(PYTHON);
        cmd.arg(repo().join("tests/progs/usdt_py.py"));
        cmd
    });
    let offset = unhex(row(&usdt_rows(PYTHON), "python:function__entry")["file_offset"].as_str().unwrap());
    let other = plain_uprobe(PYTHON, offset, py.pid());
    assert_one_line_error(
        &["probe", "--usdt", PYTHON, "--trace", "function__entry", "-p", &py.pid().to_string()],
        &format!(
            "attaching a uprobe to USDT probe python:function__entry in {PYTHON} failed (EINVAL): most likely another \
             tracer (bcc, bpftrace, or a probe left by an earlier run) holds a uprobe at offset {offset:#x} without \
             this probe's semaphore counter (dmesg: ref_ctr_offset mismatch); stop it and retry"
        ),
    );
    drop(other);
    py.end();
    assert_detached("usdtprobe");
}

/// A counting uprobe perf event at `offset` of `file` for `pid`, without a reference counter.
fn plain_uprobe(file: &str, offset: u64, pid: u32) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd as _;
    let pmu: u32 =
        std::fs::read_to_string("/sys/bus/event_source/devices/uprobe/type").unwrap().trim().parse().unwrap();
    let path = std::ffi::CString::new(file).unwrap();
    // SAFETY: plain data; all zero is "no options".
    let mut attr: aya_obj::generated::perf_event_attr = unsafe { std::mem::zeroed() };
    attr.type_ = pmu;
    attr.size = size_of::<aya_obj::generated::perf_event_attr>() as u32;
    attr.__bindgen_anon_3.config1 = path.as_ptr() as u64;
    attr.__bindgen_anon_4.config2 = offset;
    // SAFETY: a complete attr; path outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_perf_event_open, &attr as *const _, pid as i32, -1, -1, 8) };
    assert!(fd >= 0, "perf_event_open of a uprobe: {}", std::io::Error::last_os_error());
    // SAFETY: a new fd nothing else owns.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }
}
