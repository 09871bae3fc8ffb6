//! `cargo xtask vm-test`: the tests the host kernel cannot run (kprobes, global reclaim, swap,
//! global OOM, hugetlb faults), in a QEMU VM booting a stock Debian kernel.
//!
//! Packages are fetched with `apt-get download` and unpacked with `dpkg -x` under target/vm/,
//! once; the initramfs holds busybox, a static (musl) memtrace, static test programs and
//! `vm_init.sh` as /init, which prints one `MEMTRACE-RESULT` line per smoke test.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::cmd;
use crate::vm_image::{BUSYBOX, build_memtrace, build_progs, find_file, initramfs, package};

/// Kernel packages the suite boots by default; `*` stands for Debian's ABI number and the
/// newest one apt knows (or the one already cached) is used. Add a line for another kernel.
pub const KERNELS: &[&str] =
    &["linux-image-5.10.0-*-cloud-amd64", "linux-image-6.1.0-*-cloud-amd64", "linux-image-6.12.*+deb12-cloud-amd64"];

/// Every result line /init must print; a missing one is a failure.
const TESTS: &[&str] = &[
    "probe",
    "memleak",
    "memleak-nofp",
    "memleak-kernel",
    "oomkill",
    "mmapsnoop",
    "brkstack",
    "shmsnoop",
    "faults",
    "vmscan",
    "drsnoop",
    "swapin",
    "hfaults",
];
pub const INIT: &str = include_str!("vm_init.sh");

#[derive(clap::Args)]
pub struct Options {
    /// Kernel package to boot (repeatable; `*` matches the ABI number). Default: KERNELS in xtask/src/vm.rs.
    #[arg(long = "kernel", value_name = "PACKAGE")]
    kernels: Vec<String>,
    /// Kill the VM after this many seconds.
    #[arg(long, default_value_t = 900, value_name = "SECONDS")]
    timeout: u64,
    /// Print every tool's output from inside the VM, not only for failures.
    #[arg(long)]
    show_output: bool,
    /// Run the integration tests (tests/*.rs) in the VM instead of the smoke suite.
    #[arg(long)]
    rust_tests: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { kernels: Vec::new(), timeout: 900, show_output: false, rust_tests: false }
    }
}

pub fn vm_dir() -> PathBuf {
    cmd::root().join("target/vm")
}

/// Builds the image, boots each kernel, prints the result table; the exit code is 0 only if
/// every test of every kernel printed PASS or SKIP.
pub fn run(opts: &Options) -> Result<u8> {
    let busybox = package(BUSYBOX)?.join("bin/busybox");
    let memtrace = build_memtrace()?;
    let progs = build_progs()?;
    let patterns: Vec<String> =
        if opts.kernels.is_empty() { KERNELS.iter().map(|k| k.to_string()).collect() } else { opts.kernels.clone() };
    if opts.rust_tests {
        let (_, failed) = crate::vm_tests::run(&patterns, &busybox, Duration::from_secs(opts.timeout))?;
        return Ok(if failed == 0 { 0 } else { 1 });
    }
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for pattern in &patterns {
        let pkg = package(pattern)?;
        let vmlinuz = find_file(&pkg.join("boot"), |n| n.starts_with("vmlinuz-"))?;
        let initrd = initramfs(&pkg, &busybox, &memtrace, &progs)?;
        let name = pkg.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let started = Instant::now();
        let serial = boot(&vmlinuz, &initrd, Duration::from_secs(opts.timeout), &name, opts.show_output, 512)?;
        let secs = started.elapsed().as_secs();
        let (p, f, s) = report(&name, &serial, secs);
        (passed, failed, skipped) = (passed + p, failed + f, skipped + s);
    }
    if failed == 0 && skipped == 0 {
        println!("vm-test: every test passed on {} kernel(s)", patterns.len());
    } else if failed == 0 {
        println!("vm-test: no test failed on {} kernel(s); skipped ones are listed above", patterns.len());
    } else {
        println!("vm-test: FAILED (serial logs in target/vm/)");
    }
    // The closing line CI reads: every test on every kernel.
    println!("vm-test: {passed} passed, {failed} failed, {skipped} skipped (the kernel lacks what the tool needs)");
    Ok(if failed == 0 { 0 } else { 1 })
}

/// Boots the VM and returns its serial output; kills it after `limit`. Progress lines are
/// echoed; the whole log goes to target/vm/serial-<kernel>.log.
pub fn boot(
    vmlinuz: &Path,
    initrd: &Path,
    limit: Duration,
    kernel: &str,
    show: bool,
    mem_mb: u32,
) -> Result<Vec<String>> {
    println!("vm-test: booting {kernel} (TCG, up to {} s)", limit.as_secs());
    let mut child = cmd::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", &mem_mb.to_string()])
        .args(["-nographic", "-no-reboot", "-net", "none", "-kernel"])
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(if show { "console=ttyS0 quiet panic=-1 memtrace.show" } else { "console=ttyS0 quiet panic=-1" })
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start qemu-system-x86_64 (cargo xtask setup installs it)")?;
    let stdout = child.stdout.take().context("qemu has no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut buf = Vec::new();
        while reader.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
            let line = String::from_utf8_lossy(&buf).trim_end().to_string();
            if tx.send(line).is_err() {
                break;
            }
            buf.clear();
        }
    });
    // The kernel's version is enough to tell VMs booting side by side apart.
    let label = kernel.trim_start_matches("tests-").trim_start_matches("linux-image-").trim_end_matches("-cloud-amd64");
    let deadline = Instant::now() + limit;
    let mut log = fs::File::create(vm_dir().join(format!("serial-{kernel}.log")))?;
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                writeln!(log, "{line}")?;
                if line.starts_with("MEMTRACE-")
                    || line.starts_with("vm:")
                    || line.starts_with("vm-init:")
                    || line.contains("Kernel panic")
                {
                    println!("  {label}: {line}");
                }
                lines.push(line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                println!("vm-test: no power-off after {} s: killing qemu", limit.as_secs());
                let _ = child.kill();
                lines.push(format!("vm-test: killed after {} s", limit.as_secs()));
                break;
            }
        }
    }
    let _ = child.wait();
    Ok(lines)
}

/// A test's result: SKIP is /init's word for a tool this kernel cannot run (the detail says
/// why); it counts as neither a pass nor a failure, but is printed.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Verdict {
    Pass,
    Fail,
    Skip,
}

/// One test's outcome as /init reported it.
struct Outcome {
    test: String,
    method: String,
    verdict: Verdict,
    detail: String,
}

fn parse(serial: &[String]) -> Vec<Outcome> {
    serial
        .iter()
        .filter_map(|line| {
            let rest = &line[line.find("MEMTRACE-RESULT ")? + "MEMTRACE-RESULT ".len()..];
            let mut fields = rest.splitn(4, " | ");
            let test = fields.next()?.trim().to_string();
            let method = fields.next()?.trim().to_string();
            let verdict = match fields.next()?.trim() {
                "PASS" => Verdict::Pass,
                "SKIP" => Verdict::Skip,
                _ => Verdict::Fail,
            };
            let detail = fields.next().unwrap_or("").trim().to_string();
            Some(Outcome { test, method, verdict, detail })
        })
        .collect()
}

/// Prints the table; returns (passed, failed, skipped), a panic or an unfinished /init counting
/// as a failure.
fn report(kernel: &str, serial: &[String], secs: u64) -> (u32, u32, u32) {
    let outcomes = parse(serial);
    let panicked = serial.iter().find(|l| l.contains("Kernel panic"));
    let done = serial.iter().any(|l| l.starts_with("MEMTRACE-DONE"));
    let rows: Vec<(&str, &str, Verdict, &str)> = TESTS
        .iter()
        .map(|&test| match outcomes.iter().find(|o| o.test == test) {
            Some(o) => (test, o.method.as_str(), o.verdict, o.detail.as_str()),
            None => (test, "-", Verdict::Fail, "no result line (VM hung, panicked or /init stopped)"),
        })
        .collect();
    let width = rows.iter().map(|r| r.1.len()).max().unwrap_or(0).max("ATTACH METHOD".len());
    println!("\nvm-test: {kernel}, {secs} s");
    println!("{:<16} {:<width$} {:<6} DETAIL", "TEST", "ATTACH METHOD", "RESULT");
    let (mut passed_count, mut failed_count, mut skipped_count) = (0, 0, 0);
    for (test, method, verdict, detail) in rows {
        let word = match verdict {
            Verdict::Pass => {
                passed_count += 1;
                "PASS"
            }
            Verdict::Fail => {
                failed_count += 1;
                "FAIL"
            }
            Verdict::Skip => {
                skipped_count += 1;
                "SKIP"
            }
        };
        println!("{test:<16} {method:<width$} {word:<6} {detail}");
    }
    if let Some(line) = panicked {
        println!("vm-test: {line}");
        failed_count += 1;
    }
    if !done {
        println!("vm-test: /init did not finish (see target/vm/serial-{kernel}.log)");
        failed_count += 1;
    }
    println!("vm-test: {kernel}: {passed_count} passed, {failed_count} failed, {skipped_count} skipped");
    (passed_count, failed_count, skipped_count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_result_lines() {
        let serial = vec![
            "noise".to_string(),
            "MEMTRACE-RESULT oomkill | kprobe oom_kill_process | PASS | victim pid 7".to_string(),
            "MEMTRACE-RESULT swapin | - | FAIL | memtrace: error: x".to_string(),
            "MEMTRACE-RESULT memleak-nofp | - | SKIP | needs bpf_loop".to_string(),
        ];
        let o = parse(&serial);
        assert_eq!(o.len(), 3);
        assert_eq!(
            (o[0].test.as_str(), o[0].method.as_str(), o[0].verdict),
            ("oomkill", "kprobe oom_kill_process", Verdict::Pass)
        );
        assert_eq!(o[1].verdict, Verdict::Fail);
        assert_eq!(o[1].detail, "memtrace: error: x");
        assert_eq!((o[2].verdict, o[2].detail.as_str()), (Verdict::Skip, "needs bpf_loop"));
    }
}
