//! `cargo xtask vm-test`: memtrace's integration tests (tests/*.rs) on stock Debian kernels
//! in QEMU VMs, beside the host's: kprobes, swap and global reclaim, which the host lacks or
//! cannot risk, and the kernels users run. See vm_tests.rs for the image and its /init.
//!
//! Packages are fetched with `apt-get download` and unpacked with `dpkg -x` under target/vm/,
//! once.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::cmd;
use crate::vm_image::{BUSYBOX, build_memtrace, package};

/// Kernel packages the suite boots by default; `*` stands for Debian's ABI number and the
/// newest one apt knows (or the one already cached) is used. Add a line for another kernel.
pub const KERNELS: &[&str] =
    &["linux-image-5.10.0-*-cloud-amd64", "linux-image-6.1.0-*-cloud-amd64", "linux-image-6.12.*+deb12-cloud-amd64"];

#[derive(clap::Args)]
pub struct Options {
    /// Kernel package to boot (repeatable; `*` matches the ABI number). Default: KERNELS in xtask/src/vm.rs.
    #[arg(long = "kernel", value_name = "PACKAGE")]
    kernels: Vec<String>,
    /// Kill a VM after this many seconds.
    #[arg(long, default_value_t = 1500, value_name = "SECONDS")]
    timeout: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options { kernels: Vec::new(), timeout: 1500 }
    }
}

pub fn vm_dir() -> PathBuf {
    cmd::root().join("target/vm")
}

/// Builds the images, boots each kernel, prints one `N passed, N failed` line per kernel; the
/// exit code is 0 only if no test failed on any kernel.
pub fn run(opts: &Options) -> Result<u8> {
    let busybox = package(BUSYBOX)?.join("bin/busybox");
    build_memtrace()?;
    let patterns: Vec<String> =
        if opts.kernels.is_empty() { KERNELS.iter().map(|k| k.to_string()).collect() } else { opts.kernels.clone() };
    let (_, failed) = crate::vm_tests::run(&patterns, &busybox, Duration::from_secs(opts.timeout))?;
    Ok(if failed == 0 { 0 } else { 1 })
}

/// Boots the VM and returns its serial output; kills it after `limit`. Progress lines are
/// echoed; the whole log goes to target/vm/serial-<kernel>.log.
pub fn boot(vmlinuz: &Path, initrd: &Path, limit: Duration, kernel: &str, mem_mb: u32) -> Result<Vec<String>> {
    println!("vm-test: booting {kernel} (TCG, up to {} s)", limit.as_secs());
    let mut child = cmd::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", &mem_mb.to_string()])
        .args(["-nographic", "-no-reboot", "-net", "none", "-kernel"])
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg("console=ttyS0 quiet panic=-1")
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
                if line.starts_with("MEMTRACE-") || line.starts_with("vm-init:") || line.contains("Kernel panic") {
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
