//! /init of the VM in which `cargo xtask vm-test` runs memtrace's integration tests (the
//! binaries cargo builds from tests/*.rs, static) on a stock kernel. It mounts what the tests
//! expect of a host, loads the image's kernel modules, runs each test binary under /tests one
//! at a time, and prints for each one a line the host parses:
//!
//! `MEMTRACE-TESTS <file> passed=N failed=N not-run=N`
//!
//! then `MEMTRACE-TESTS-DONE` and powers the VM off. Tests that cannot run in the VM say so on
//! stderr as `memtrace-test: not run: <test>: <why>`; they count as not run, not as passed.

use std::{
    ffi::CString,
    fs,
    io::{BufRead, BufReader},
    os::unix::fs::symlink,
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

/// Shared with xtask: reading libtest's summary line.
#[path = "../../src/summary.rs"]
mod summary;

fn mount(source: &str, target: &str, fstype: &str, data: &str) -> bool {
    let _ = fs::create_dir_all(target);
    let c = |s: &str| CString::new(s).unwrap_or_default();
    let (src, dst, ty, opts) = (c(source), c(target), c(fstype), c(data));
    // SAFETY: NUL-terminated strings that outlive the call.
    let r = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), ty.as_ptr(), 0, opts.as_ptr().cast()) };
    if r != 0 {
        println!("vm-init: mount {fstype} on {target}: {}", std::io::Error::last_os_error());
    }
    r == 0
}

fn umount(target: &str) {
    let c = CString::new(target).unwrap_or_default();
    // SAFETY: a NUL-terminated path that outlives the call.
    unsafe { libc::umount(c.as_ptr()) };
}

/// Loads /lib/modules/<name>.ko in the order the image lists them (dependencies first).
fn load_modules() {
    let Ok(order) = fs::read_to_string("/lib/modules/order") else { return };
    for name in order.lines().filter(|l| !l.is_empty()) {
        let path = format!("/lib/modules/{name}.ko");
        let Ok(file) = fs::File::open(&path) else { continue };
        let params = CString::default();
        // SAFETY: an open module file and an empty parameter string.
        let r = unsafe {
            libc::syscall(libc::SYS_finit_module, std::os::fd::AsRawFd::as_raw_fd(&file), params.as_ptr(), 0)
        };
        if r != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
            println!("vm-init: module {name}: {}", std::io::Error::last_os_error());
        }
    }
}

/// The host file system the tests expect: procfs, sysfs, tracefs, memcg v1, a tmpfs /tmp,
/// busybox's applets where scripts look for them, and loopback up.
fn set_up() {
    for (source, target, fstype) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
        ("tmpfs", "/tmp", "tmpfs"),
        ("tracefs", "/sys/kernel/tracing", "tracefs"),
        ("debugfs", "/sys/kernel/debug", "debugfs"),
    ] {
        mount(source, target, fstype, "");
    }
    // cgroup v1's memory controller where the kernel has it, as the host does; else v2 at
    // /sys/fs/cgroup, as a systemd host without v1 (Debian's 6.12 is built without it).
    mount("tmpfs", "/sys/fs/cgroup", "tmpfs", "");
    if !mount("memory", "/sys/fs/cgroup/memory", "cgroup", "memory") {
        umount("/sys/fs/cgroup");
        if mount("cgroup2", "/sys/fs/cgroup", "cgroup2", "") {
            println!("vm-init: no cgroup v1 memory controller: cgroup v2 at /sys/fs/cgroup");
        }
    }
    load_modules();
    let _ = Command::new("/bin/busybox").args(["--install", "-s", "/bin"]).status();
    // Nothing else brings loopback up here: without it 127.0.0.1 binds but nothing connects
    // (serve's tests scrape it there).
    if !Command::new("/bin/busybox").args(["ip", "link", "set", "lo", "up"]).status().is_ok_and(|s| s.success()) {
        println!("vm-init: could not bring up lo");
    }
    // The host's programs (util-linux, coreutils, bash) were copied to /usr/bin; busybox
    // stands in for the rest.
    let _ = fs::create_dir_all("/usr/bin");
    for tool in ["env", "sh", "true", "cat"] {
        let _ = symlink(format!("/bin/{tool}"), format!("/usr/bin/{tool}"));
    }
    // SAFETY: single-threaded here, before any child exists.
    unsafe {
        std::env::set_var("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        // Where a test that cannot run on this kernel writes why (see `not_run_count`).
        std::env::set_var("MEMTRACE_NOT_RUN", "/tmp/memtrace-not-run");
        // A machine of the tests' own: they may put all of it under memory pressure.
        std::env::set_var("MEMTRACE_VM", "1");
    }
    // The kernel's own messages would interleave with the result lines.
    let _ = fs::write("/proc/sys/kernel/printk", "1");
}

/// Runs one test binary; returns (passed, failed, not run).
fn run_tests(path: &Path) -> (u32, u32, u32) {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    println!("vm-init: running {name}");
    let started = Instant::now();
    let child = Command::new(path)
        .args(["--test-threads=1", "--nocapture"])
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            println!("vm-init: cannot run {name}: {e}");
            return (0, 1, 0);
        }
    };
    let (mut passed, mut failed) = (0, 0);
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("{name}: {line}");
            if let Some((p, f)) = summary::counts(&line) {
                (passed, failed) = (p, f);
            }
        }
    }
    let status = child.wait();
    if !status.as_ref().is_ok_and(|s| s.success()) && failed == 0 {
        // Crashed or killed before its summary.
        failed = 1;
    }
    let not_run = not_run_count(&name);
    println!(
        "MEMTRACE-TESTS {name} passed={} failed={failed} not-run={not_run} secs={}",
        passed.saturating_sub(not_run),
        started.elapsed().as_secs()
    );
    (passed.saturating_sub(not_run), failed, not_run)
}

/// Tests of `name` that said they could not run here: they write their reason to
/// /tmp/memtrace-not-run (one line each), read and cleared after each binary.
fn not_run_count(name: &str) -> u32 {
    let text = fs::read_to_string("/tmp/memtrace-not-run").unwrap_or_default();
    let _ = fs::remove_file("/tmp/memtrace-not-run");
    for line in text.lines() {
        println!("MEMTRACE-NOT-RUN {name} {line}");
    }
    text.lines().count() as u32
}

fn main() {
    set_up();
    // /only (MEMTRACE_VM_TESTS on the host) names the binaries to run; /debug.sh
    // (MEMTRACE_VM_DEBUG) runs first: both for working on one failure.
    let only: Vec<String> = fs::read_to_string("/only")
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if Path::new("/debug.sh").exists() {
        let _ = Command::new("/bin/sh").arg("/debug.sh").status();
    }
    let mut bins: Vec<_> = fs::read_dir("/tests")
        .map(|d| d.filter_map(|e| Some(e.ok()?.path())).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter(|p: &std::path::PathBuf| {
            only.is_empty() || p.file_name().is_some_and(|n| only.iter().any(|o| n == o.as_str()))
        })
        .collect();
    bins.sort();
    for bin in &bins {
        run_tests(bin);
    }
    println!("MEMTRACE-TESTS-DONE");
    // SAFETY: flushes nothing of ours (stdout is line-buffered to the console); powers off.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
}
