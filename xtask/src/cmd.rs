//! Starting child processes: one place for PATH, working directory and error text.

use std::env;
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use anyhow::{Context, Result, bail};

/// The workspace root; every task runs from there so relative paths mean the same thing.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives one level below the workspace root")
}

/// Where `cargo install` puts binaries (bpf-linker), honouring CARGO_HOME like cargo does.
pub fn cargo_bin_dir() -> PathBuf {
    let home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
    home.join("bin")
}

/// PATH with cargo's bin dir first, so a freshly installed bpf-linker is found by aya-build.
fn path_with_cargo_bin() -> OsString {
    let bin = cargo_bin_dir();
    let rest = env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![bin.clone()];
    dirs.extend(env::split_paths(&rest).filter(|d| *d != bin));
    env::join_paths(dirs).unwrap_or(rest)
}

/// A command run from the workspace root with the PATH every child needs.
pub fn new(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(root()).env("PATH", path_with_cargo_bin());
    cmd
}

/// The cargo that started us (same toolchain), or the one on PATH.
pub fn cargo() -> Command {
    new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn describe(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// Runs with inherited stdio and returns the exit status, failing only if it cannot start.
pub fn status(cmd: &mut Command) -> Result<ExitStatus> {
    cmd.status().with_context(|| format!("cannot start `{}`", describe(cmd)))
}

/// Runs with inherited stderr, passing each stdout line on and to `line`; returns the exit
/// status, failing only if it cannot start.
pub fn status_lines(cmd: &mut Command, mut line: impl FnMut(&str)) -> Result<ExitStatus> {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    if let Some(out) = child.stdout.take() {
        for text in std::io::BufRead::lines(std::io::BufReader::new(out)).map_while(Result::ok) {
            println!("{text}");
            line(&text);
        }
    }
    Ok(child.wait()?)
}

/// Runs with inherited stdio; a non-zero exit is an error.
pub fn run(cmd: &mut Command) -> Result<()> {
    let st = status(cmd)?;
    if !st.success() {
        bail!("`{}` failed ({st})", describe(cmd));
    }
    Ok(())
}

/// Runs quietly and returns stdout; a non-zero exit is an error.
pub fn stdout(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    if !out.status.success() {
        bail!("`{}` failed ({}): {}", describe(cmd), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs quietly; true if it started and exited 0 (used by "is it already there?" checks).
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.output().is_ok_and(|out| out.status.success())
}

/// A shell-style exit code: the child's own, or 128 + signal when it was killed.
pub fn exit_code(st: ExitStatus) -> u8 {
    match (st.code(), st.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(1),
        (None, Some(sig)) => u8::try_from(128 + sig).unwrap_or(1),
        (None, None) => 1,
    }
}
