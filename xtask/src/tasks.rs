//! `build`, `demo` and `test`: each starts from setup so a fresh machine needs one command.

use std::fs;
use std::io;
use std::process::{Child, ExitStatus};

use anyhow::{Context, Result};

use crate::{cmd, setup};

pub fn build() -> Result<()> {
    setup::run()?;
    cmd::run(cmd::cargo().args(["build", "--release", "-p", "memtrace"]))
}

/// Builds memtrace and the demo, runs `memleak` on it and returns memtrace's exit code.
pub fn demo() -> Result<u8> {
    build()?;
    fs::create_dir_all(cmd::root().join("target/progs"))?;
    // Frame pointers so memtrace can walk the demo's user stacks.
    cmd::run(cmd::new("cc").args([
        "-g",
        "-O1",
        "-fno-omit-frame-pointer",
        "-o",
        "target/progs/demo",
        "tests/progs/demo.c",
    ]))?;

    eprintln!("demo: memtrace memleak -c target/progs/demo 3 (the demo runs about 12 s)");
    let mut child = cmd::new(cmd::root().join("target/release/memtrace"))
        .args(["memleak", "-c", "target/progs/demo", "3"])
        .spawn()
        .context("cannot start target/release/memtrace")?;
    let status = wait_ignoring_sigint(&mut child)?;
    Ok(cmd::exit_code(status))
}

/// Ctrl-C reaches memtrace too; we wait so its final report and exit code are not lost.
fn wait_ignoring_sigint(child: &mut Child) -> io::Result<ExitStatus> {
    // SAFETY: swapping a signal disposition has no memory-safety preconditions; set after
    // spawn so the child keeps the default disposition.
    let previous = unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let status = child.wait();
    // SAFETY: as above, restoring what was there.
    unsafe { libc::signal(libc::SIGINT, previous) };
    status
}

/// Runs the host test suite; `args` go to the test harness (e.g. a name filter).
pub fn test(args: &[String]) -> Result<u8> {
    setup::run()?;
    let status = cmd::status(
        cmd::cargo()
            .args(["test", "--release", "--workspace"])
            .args(["--exclude", "memtrace-ebpf", "--exclude", "xtask"])
            // Tests attach to the one shared kernel, so they run one at a time.
            .args(["--", "--test-threads=1"])
            .args(args),
    )?;
    // The kprobe/reclaim/swap/OOM suite the host kernel cannot run, in a QEMU VM. It runs even
    // after a host failure: the two suites cover different kernels and say different things.
    // A filter means one test is wanted, not three minutes of VM.
    let vm = if args.is_empty() {
        crate::vm::run(&crate::vm::Options::default())?
    } else {
        println!("xtask: VM suite not run with a test filter (cargo xtask vm-test runs it)");
        0
    };
    if !status.success() {
        eprintln!("xtask: host tests failed ({status})");
        return Ok(cmd::exit_code(status).max(1));
    }
    Ok(vm)
}
