//! memtrace's integration tests (tests/*.rs) inside the VM: cargo builds them static (musl),
//! and a small Rust /init (xtask/vm-init) runs each binary on the booted kernel and prints one
//! `MEMTRACE-TESTS` line per binary. The image holds what the tests reach by absolute path on
//! the host: the static memtrace they were built against, tests/progs and the programs built
//! from it in target/test-progs (with the host's C libraries they link to).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cmd;
use crate::vm::{boot, vm_dir};

use crate::progs;
use crate::vm_image::{MUSL, add_modules, find_file, package};

/// The host's programs the tests run, copied to the same paths with the libraries `ldd` names
/// for them: real workloads (python3.11, stress-ng), and util-linux and coreutils where the
/// tests use options busybox lacks.
const HOST_PROGRAMS: &[&str] = &[
    "/usr/bin/sleep",
    "/usr/bin/setpriv",
    "/usr/bin/unshare",
    "/usr/bin/nsenter",
    "/usr/bin/mount",
    "/usr/bin/umount",
    "/usr/bin/bash",
    "/usr/bin/nm",
    "/usr/bin/stress-ng",
    "/usr/bin/python3.11",
];

/// Libraries the test programs load (C and C++ runtimes, a preloaded allocator), data the
/// tests read, and libc's debug information (its internal functions have no symbols without it).
const HOST_FILES: &[&str] = &[
    "/lib64/ld-linux-x86-64.so.2",
    "/lib/x86_64-linux-gnu/libc.so.6",
    "/lib/x86_64-linux-gnu/libm.so.6",
    "/lib/x86_64-linux-gnu/libstdc++.so.6",
    "/lib/x86_64-linux-gnu/libgcc_s.so.1",
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/etc/passwd",
    "/etc/group",
];

/// Directories copied whole: python's standard library, separate debug information.
const HOST_TREES: &[&str] = &["/usr/lib/python3.11", "/usr/lib/debug"];

/// The libraries `ldd` lists for `program`.
fn libraries(program: &str) -> Result<Vec<PathBuf>> {
    let out = cmd::stdout(cmd::new("ldd").arg(program))?;
    Ok(out
        .lines()
        .filter_map(|l| l.split("=>").nth(1)?.split_whitespace().next().map(PathBuf::from))
        .filter(|p| p.is_absolute())
        .collect())
}

/// The static test binaries, by the name of their tests/*.rs file.
fn build_tests() -> Result<Vec<(String, PathBuf)>> {
    let out = cmd::stdout(cmd::cargo().args([
        "test",
        "--release",
        "-p",
        "memtrace",
        "--target",
        MUSL,
        "--no-run",
        "--message-format=json",
    ]))?;
    let mut tests = Vec::new();
    for line in out.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let is_test = msg["target"]["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "test"));
        if let (true, Some(exe), Some(name)) = (is_test, msg["executable"].as_str(), msg["target"]["name"].as_str()) {
            tests.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    if tests.is_empty() {
        bail!("cargo built no integration test binaries");
    }
    cmd::run(cmd::cargo().args(["build", "--release", "-p", "vm-init", "--target", MUSL]))?;
    // The VM has no compiler: every program the tests run is built here first.
    progs::build_all(cmd::root());
    Ok(tests)
}

/// Copies `from` to the same absolute path under `stage`, following symlinks.
fn copy_same_path(stage: &Path, from: &Path) -> Result<()> {
    let to = stage.join(from.strip_prefix("/").unwrap_or(from));
    fs::create_dir_all(to.parent().context("a path without a parent")?)?;
    fs::copy(from, &to).with_context(|| format!("copying {}", from.display()))?;
    Ok(())
}

/// Copies a directory tree to the same absolute path under `stage`, keeping modification times
/// (the tests rebuild a program only when its source is newer).
fn copy_tree(stage: &Path, from: &Path) -> Result<()> {
    let to = stage.join(from.strip_prefix("/").unwrap_or(from));
    fs::create_dir_all(to.parent().context("a path without a parent")?)?;
    cmd::run(cmd::new("cp").arg("-a").arg(from).arg(&to))
}

fn strip_into(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to.parent().context("a path without a parent")?)?;
    cmd::run(cmd::new("objcopy").arg("--strip-debug").arg(from).arg(to))
}

/// The image for one kernel (each its own, so kernels can boot side by side).
fn initramfs(kernel_pkg: &Path, kernel: &str, busybox: &Path, tests: &[(String, PathBuf)]) -> Result<PathBuf> {
    let root = cmd::root();
    let stage = vm_dir().join(format!("tests-initramfs-{kernel}"));
    let _ = fs::remove_dir_all(&stage);
    fs::create_dir_all(stage.join("bin"))?;
    fs::copy(busybox, stage.join("bin/busybox"))?;
    fs::copy(root.join(format!("target/{MUSL}/release/vm-init")), stage.join("init"))?;
    for (name, exe) in tests {
        strip_into(exe, &stage.join("tests").join(name))?;
    }
    // The tests run the memtrace they were built with, by its absolute path.
    let memtrace = root.join(format!("target/{MUSL}/release/memtrace"));
    strip_into(&memtrace, &stage.join(memtrace.strip_prefix("/").unwrap_or(&memtrace)))?;
    copy_tree(&stage, &root.join("tests/progs"))?;
    copy_tree(&stage, &root.join("target/test-progs"))?;
    copy_tree(&stage, &root.join("target/progs"))?;
    // tests/readme.rs compares the README's examples with what memtrace prints on each kernel.
    copy_same_path(&stage, &root.join("README.md"))?;
    for file in HOST_FILES {
        copy_same_path(&stage, Path::new(file))?;
    }
    for program in HOST_PROGRAMS.iter().filter(|p| Path::new(p).exists()) {
        copy_same_path(&stage, Path::new(program))?;
        for lib in libraries(program)? {
            copy_same_path(&stage, &lib)?;
        }
    }
    for tree in HOST_TREES.iter().filter(|t| Path::new(t).is_dir()) {
        copy_tree(&stage, Path::new(tree))?;
    }
    add_modules(kernel_pkg, &stage.join("lib/modules"))?;
    // For working on one failure: MEMTRACE_VM_TESTS=unwind,probe runs only those binaries, and
    // MEMTRACE_VM_DEBUG=script.sh runs a shell script in the VM first.
    if let Ok(only) = std::env::var("MEMTRACE_VM_TESTS") {
        fs::write(stage.join("only"), only)?;
    }
    if let Ok(script) = std::env::var("MEMTRACE_VM_DEBUG") {
        fs::copy(&script, stage.join("debug.sh")).with_context(|| format!("MEMTRACE_VM_DEBUG={script}"))?;
    }
    let initrd = vm_dir().join(format!("tests-initrd-{kernel}.gz"));
    cmd::run(
        cmd::new("sh")
            .arg("-c")
            .arg(format!("find . | cpio -o -H newc --quiet | gzip -1 > '{}'", initrd.display()))
            .current_dir(&stage),
    )?;
    // The staged copy is large (python, debug information) and no longer needed.
    let _ = fs::remove_dir_all(&stage);
    Ok(initrd)
}

/// One binary's counts, as /init printed them.
#[derive(Debug, Default, PartialEq, Eq)]
struct Counts {
    passed: u32,
    failed: u32,
    not_run: u32,
}

fn parse(serial: &[String]) -> Vec<(String, Counts)> {
    serial
        .iter()
        .filter_map(|line| {
            let rest = line.strip_prefix("MEMTRACE-TESTS ")?;
            let mut words = rest.split_whitespace();
            let name = words.next()?.to_string();
            let mut c = Counts::default();
            for w in words {
                let (k, v) = w.split_once('=')?;
                let v = v.parse().ok()?;
                match k {
                    "passed" => c.passed = v,
                    "failed" => c.failed = v,
                    "not-run" => c.not_run = v,
                    _ => {}
                }
            }
            Some((name, c))
        })
        .collect()
}

/// How many VMs boot at once: TCG runs a VM on one host thread, so one per CPU
/// (`MEMTRACE_VM_PARALLEL` overrides).
fn parallel() -> usize {
    std::env::var("MEMTRACE_VM_PARALLEL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1)
}

/// One kernel's run: its name, counts and seconds.
struct KernelRun {
    name: String,
    counts: Counts,
    secs: u64,
    notes: Vec<String>,
}

/// Counts one kernel's serial log against the binaries that should have run.
fn tally(name: &str, serial: &[String], tests: &[(String, PathBuf)]) -> (Counts, Vec<String>) {
    let got = parse(serial);
    let mut k = Counts::default();
    let mut notes = Vec::new();
    for (test, _) in tests {
        match got.iter().find(|(n, _)| n == test) {
            Some((_, c)) => {
                k.passed += c.passed;
                k.failed += c.failed;
                k.not_run += c.not_run;
            }
            None => {
                notes.push(format!("{test}: no result line (see target/vm/serial-tests-{name}.log)"));
                k.failed += 1;
            }
        }
    }
    for line in serial.iter().filter(|l| l.starts_with("MEMTRACE-NOT-RUN ")) {
        notes.push(format!("not run: {}", &line["MEMTRACE-NOT-RUN ".len()..]));
    }
    for line in serial.iter().filter(|l| l.contains(": test ") && l.ends_with("... FAILED")) {
        notes.push(format!("failed: {line}"));
    }
    (k, notes)
}

/// Boots each kernel with the tests, side by side up to `parallel()`; prints one
/// `N passed, N failed` line per kernel and returns the totals. A binary without a result
/// line counts as one failure.
pub fn run(patterns: &[String], busybox: &Path, limit: Duration) -> Result<(u32, u32)> {
    let mut tests = build_tests()?;
    if let Ok(only) = std::env::var("MEMTRACE_VM_TESTS") {
        tests.retain(|(name, _)| only.split(',').any(|o| o.trim() == name));
    }
    let mut images = Vec::new();
    for pattern in patterns {
        let pkg = package(pattern)?;
        let vmlinuz = find_file(&pkg.join("boot"), |n| n.starts_with("vmlinuz-"))?;
        let name = pkg.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let initrd = initramfs(&pkg, &name, busybox, &tests)?;
        images.push((name, vmlinuz, initrd));
    }
    let width = parallel().min(images.len().max(1));
    println!("vm-test: {} kernel(s), {width} at a time", images.len());
    // A VM starts as soon as one before it ends: the kernels take very different times.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let done = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..width {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((name, vmlinuz, initrd)) = images.get(i) else { break };
                    let started = Instant::now();
                    let outcome = boot(vmlinuz, initrd, limit, &format!("tests-{name}"), 1024).map(|serial| {
                        let (counts, notes) = tally(name, &serial, &tests);
                        KernelRun { name: name.clone(), counts, secs: started.elapsed().as_secs(), notes }
                    });
                    done.lock().unwrap_or_else(|e| e.into_inner()).push((i, outcome));
                }
            });
        }
    });
    let mut done = done.into_inner().unwrap_or_else(|e| e.into_inner());
    done.sort_by_key(|(i, _)| *i);
    let mut runs: Vec<KernelRun> = Vec::new();
    for (_, outcome) in done {
        runs.push(outcome?);
    }
    let (mut passed, mut failed) = (0, 0);
    for run in &runs {
        for note in &run.notes {
            println!("vm-test: {}: {note}", run.name);
        }
    }
    // The closing lines: one per kernel.
    for run in &runs {
        let k = &run.counts;
        println!(
            "vm-test: {}: {} passed, {} failed, {} not run (tests/*.rs, {} s)",
            run.name, k.passed, k.failed, k.not_run, run.secs
        );
        (passed, failed) = (passed + k.passed, failed + k.failed);
    }
    Ok((passed, failed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_test_lines() {
        let serial = vec![
            "vm-init: running probe".to_string(),
            "MEMTRACE-TESTS probe passed=4 failed=0 not-run=0 secs=3".to_string(),
            "MEMTRACE-TESTS oomkill passed=4 failed=1 not-run=1 secs=50".to_string(),
        ];
        let got = parse(&serial);
        assert_eq!(got[0], ("probe".to_string(), Counts { passed: 4, failed: 0, not_run: 0 }));
        assert_eq!(got[1], ("oomkill".to_string(), Counts { passed: 4, failed: 1, not_run: 1 }));
    }
}
