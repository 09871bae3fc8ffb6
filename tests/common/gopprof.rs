//! Reading a profile back with the real pprof (`go tool pprof`, Debian's golang-go): the
//! pprof, memleak_oom and serve tests.
#![allow(dead_code, reason = "each test file uses a different part of this module")]

use std::process::Command;

use crate::common::{marker_line, not_run};

/// Whether `go tool pprof` is here to read the profile back. The VM suite's image has no Go
/// toolchain: there the test says so and is not run (the host runs it, where setup installs
/// golang-go and its absence fails the test).
pub fn pprof_tool(test: &str) -> bool {
    if Command::new("go").arg("version").output().is_ok_and(|o| o.status.success()) {
        return true;
    }
    assert!(
        std::env::var_os("MEMTRACE_VM").is_some(),
        "{test}: go is not installed (cargo xtask setup installs golang-go)"
    );
    not_run(test, "go tool pprof is not in the VM's image (the host runs this test)");
    false
}

/// `go tool pprof ARGS FILE`'s stdout; pprof's own failure fails the test.
pub fn go_pprof(args: &[&str], source: impl AsRef<std::ffi::OsStr>) -> String {
    let out = Command::new("go")
        .args(["tool", "pprof"])
        .args(args)
        .arg(source)
        .output()
        .expect("go tool pprof runs (golang-go; cargo xtask setup installs it)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "go tool pprof {args:?}: {}: {stderr}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `go tool pprof` is here, for a test whose read-back is one check among others: in
/// the VM suite's image, which has no Go, that check alone is left out (and said), the test
/// still runs; on a host without it the test fails.
pub fn has_go(test: &str) -> bool {
    if Command::new("go").arg("version").output().is_ok_and(|o| o.status.success()) {
        return true;
    }
    assert!(
        std::env::var_os("MEMTRACE_VM").is_some(),
        "{test}: go is not installed (cargo xtask setup installs golang-go)"
    );
    eprintln!("{test}: the profile is not read back: go tool pprof is not in the VM's image (the host reads it)");
    false
}

/// A row of `-top -lines`: the flat and cumulative values as printed, the function and its
/// file:line.
#[derive(Debug)]
pub struct Row {
    pub flat: String,
    pub cum: String,
    pub func: String,
    pub at: String,
}

pub fn top_rows(text: &str) -> Vec<Row> {
    text.lines()
        .skip_while(|l| !l.trim_start().starts_with("flat"))
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.len() >= 7).then(|| Row {
                flat: cols[0].into(),
                cum: cols[3].into(),
                func: cols[5].into(),
                at: cols[6].into(),
            })
        })
        .collect()
}

/// The one row of `func`, which must be at `file`'s line marked `LEAK:func`.
pub fn row_of<'a>(rows: &'a [Row], func: &str, file: &str) -> &'a Row {
    let found: Vec<&Row> = rows.iter().filter(|r| r.func == func).collect();
    assert_eq!(found.len(), 1, "{func}: one line: {rows:#?}");
    let at = format!("/{file}:{}", marker_line(file, func));
    assert!(found[0].at.ends_with(&at), "{func}: at {at}: {:?}", found[0]);
    found[0]
}
