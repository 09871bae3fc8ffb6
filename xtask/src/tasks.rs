//! `build`, `demo` and `test`: each starts from setup so a fresh machine needs one command.

use std::fs;
use std::io;
use std::process::{Child, Command, ExitStatus};

use anyhow::{Context, Result};

use crate::{cmd, setup};

pub fn build() -> Result<()> {
    build_with(&[])
}

/// The static binary: built as the VM suite builds it (musl, checked to have no loader and to
/// run), then stripped into target/static/memtrace; prints its path and size.
pub fn build_static() -> Result<()> {
    setup::run()?;
    let built = crate::vm_image::build_memtrace()?;
    let out = cmd::root().join("target/static/memtrace");
    fs::create_dir_all(out.parent().context("target/static has a parent")?)?;
    cmd::run(cmd::new("strip").arg("--strip-all").arg("-o").arg(&out).arg(&built))?;
    let bytes = fs::metadata(&out)?.len();
    println!(
        "xtask: target/static/memtrace: static x86-64 binary, stripped, {bytes} bytes ({:.1} MiB); \
         copy it to the machine to debug and run it as root",
        bytes as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}

/// `build` with extra cargo arguments, e.g. `--features bench`; leaves the man pages beside
/// the binary.
pub fn build_with(extra: &[&str]) -> Result<()> {
    setup::run()?;
    cmd::run(cmd::cargo().args(["build", "--release", "-p", "memtrace"]).args(extra))?;
    cmd::run(&mut man_pages())
}

/// target/release/memtrace.1 and its subcommands' pages, written by the binary just built from
/// its own command line (so xtask needs none of memtrace's code).
fn man_pages() -> Command {
    let dir = cmd::root().join("target/release");
    let mut man = cmd::new(dir.join("memtrace"));
    man.arg("man").arg(dir);
    man
}

/// Builds memtrace and the demo, runs `memleak` on it and returns memtrace's exit code.
pub fn demo() -> Result<u8> {
    build()?;
    // Built as the README's test of this example builds it.
    crate::progs::demo(cmd::root());

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
    let [mut own, mut host] = host_suites(args);
    let own = cmd::status(&mut own)?;
    let (mut passed, mut failed) = (0, 0);
    let status = cmd::status_lines(&mut host, |line| {
        if let Some((p, f)) = crate::summary::counts(line) {
            (passed, failed) = (passed + p, failed + f);
        }
    })?;
    // A suite that died before its summary still failed.
    if !status.success() && failed == 0 {
        failed = 1;
    }
    let host_line = format!(
        "test: host {}: {passed} passed, {failed} failed (unit and integration tests)",
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim()
    );
    // The same tests on the stock kernels users run (and with the kprobes, swap and global
    // reclaim the host lacks or cannot risk), in QEMU VMs. They run even after a host failure:
    // each kernel says different things. A filter means one test is wanted, not the VMs.
    let vm = if args.is_empty() {
        crate::vm::run(&crate::vm::Options::default())?
    } else {
        println!("xtask: VM suite not run with a test filter (cargo xtask vm-test runs it)");
        0
    };
    // The host's line last, below the VMs' lines: one per kernel.
    println!("{host_line}");
    for (suite, status) in [("xtask's own tests", own), ("host tests", status)] {
        if !status.success() {
            eprintln!("xtask: {suite} failed ({status})");
            return Ok(cmd::exit_code(status).max(1));
        }
    }
    Ok(vm)
}

/// xtask's own unit tests (quick, no BPF), then memtrace's, with the same harness arguments.
fn host_suites(args: &[String]) -> [Command; 2] {
    let mut own = cmd::cargo();
    own.args(["test", "-p", "xtask", "--"]).args(args);
    let mut host = cmd::cargo();
    // Every suite runs, whatever fails before it: the summary counts them all.
    host.args(["test", "--release", "--workspace", "--no-fail-fast"])
        .args(["--exclude", "memtrace-ebpf", "--exclude", "xtask"])
        // Tests attach to the one shared kernel, so they run one at a time.
        .args(["--", "--test-threads=1"])
        .args(args);
    [own, host]
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_test_task_runs_xtasks_own_tests() {
        let [own, host] = super::host_suites(&["filter".into()]);
        let args =
            |c: &std::process::Command| c.get_args().map(|a| a.to_str().unwrap().to_string()).collect::<Vec<_>>();
        assert_eq!(args(&own), ["test", "-p", "xtask", "--", "filter"]);
        assert_eq!(args(&host).last().map(String::as_str), Some("filter"));
        assert!(args(&host).contains(&"--workspace".to_string()));
    }

    /// The build's last step: the binary writes its man pages beside itself.
    #[test]
    fn the_build_leaves_the_man_pages_beside_the_binary() {
        let man = super::man_pages();
        let release = crate::cmd::root().join("target/release");
        assert_eq!(std::path::Path::new(man.get_program()), release.join("memtrace"));
        let args: Vec<&std::ffi::OsStr> = man.get_args().collect();
        assert_eq!(args, [std::ffi::OsStr::new("man"), release.as_os_str()]);
    }
}
