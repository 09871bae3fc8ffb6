//! `memtrace completions SHELL` and the man pages (`memtrace man DIR`, which `cargo xtask build`
//! runs), both generated from the command line itself: bash parses the script and completes
//! with it, and `man` renders the pages.

#[path = "common/mod.rs"]
mod common;

use std::{
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use common::*;

/// memtrace's stdout for `args`, which must succeed without a word on stderr.
fn stdout_of(args: &[&str]) -> String {
    let out = run(args, Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.is_empty(), "{args:?}: {}: {stderr}", out.status);
    String::from_utf8(out.stdout).unwrap()
}

/// bash's output for `script` given on stdin; bash must succeed.
fn bash(args: &[&str], script: &str) -> String {
    let mut child = Command::new("bash")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.is_empty(), "bash {args:?}: {}: {stderr}", out.status);
    String::from_utf8(out.stdout).unwrap()
}

/// What bash offers after the words of `line` (the last one being completed), with the script loaded.
fn complete(script: &str, line: &[&str]) -> Vec<String> {
    let words = line.iter().map(|w| format!("'{w}'")).collect::<Vec<_>>().join(" ");
    let text = line.join(" ");
    let ask = format!(
        "{script}\nCOMP_WORDS=({words}); COMP_CWORD={}; COMP_LINE='{text}'; COMP_POINT={}\n\
         _memtrace memtrace '{}' '{}'\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
        line.len() - 1,
        text.len(),
        line[line.len() - 1],
        line[line.len() - 2],
    );
    bash(&["-s"], &ask).lines().map(str::to_string).collect()
}

#[test]
fn bash_completions_parse_and_complete_tools_and_options() {
    let script = stdout_of(&["completions", "bash"]);
    bash(&["-n"], &script);
    assert!(script.contains("memleak") && script.contains("--pprof") && script.contains("--svg"), "{script}");
    assert_eq!(complete(&script, &["memtrace", "memle"]), ["memleak"]);
    let options = complete(&script, &["memtrace", "memleak", "--pp"]);
    assert_eq!(options, ["--pprof"]);
    let options = complete(&script, &["memtrace", "faults", "--s"]);
    assert_eq!(options, ["--svg"]);
}

#[test]
fn completions_are_written_for_every_shell_clap_knows() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let script = stdout_of(&["completions", shell]);
        assert!(script.contains("memleak") && script.contains("pprof"), "{shell}: {script}");
    }
    // Cut short by `| head`: no panic, no error.
    let mut child =
        memtrace().args(["completions", "zsh"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success() && out.stderr.is_empty(), "{}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    let out = run(&["completions", "tcsh"], Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("memtrace: error: invalid value 'tcsh'"), "{stderr}");
}

/// A man page as `man` shows it (plain text), or None where no `man` is installed (the VM).
fn rendered(page: &Path) -> Option<String> {
    let out = Command::new("man").arg("-l").arg(page).env("MANWIDTH", "100").env("LC_ALL", "C").output();
    let Ok(out) = out else {
        assert!(std::env::var_os("MEMTRACE_VM").is_some(), "man is not installed (Debian's man-db)");
        return None;
    };
    assert!(out.status.success(), "man -l {}: {}", page.display(), String::from_utf8_lossy(&out.stderr));
    Some(String::from_utf8(out.stdout).unwrap())
}

#[test]
fn man_pages_render_with_their_names_and_options() {
    let dir = tempdir("man-pages");
    let out = run(&["man", dir.to_str().unwrap()], Duration::from_secs(20));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout.is_empty() && out.stderr.is_empty());
    let mut pages: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    pages.sort();
    for page in ["memtrace.1", "memtrace-memleak.1", "memtrace-faults.1", "memtrace-completions.1"] {
        assert!(pages.iter().any(|p| p == page), "{page} not in {pages:?}");
    }
    // The hidden command that writes them has none.
    assert!(!pages.iter().any(|p| p == "memtrace-man.1"), "{pages:?}");

    let roff = std::fs::read_to_string(dir.join("memtrace-memleak.1")).unwrap();
    assert!(roff.contains(".SH NAME") && roff.contains("\\-\\-pprof"), "{roff}");
    if let Some(text) = rendered(&dir.join("memtrace.1")) {
        assert!(text.contains("NAME\n       memtrace - Linux memory debugging with eBPF"), "{text}");
        assert!(text.contains("memtrace-memleak(1)"), "the subcommands' pages are named: {text}");
    }
    if let Some(text) = rendered(&dir.join("memtrace-memleak.1")) {
        assert!(text.contains("NAME\n       memtrace-memleak - Memory allocated and not freed"), "{text}");
        assert!(text.contains("--pprof <FILE>") && text.contains("--svg <FILE>"), "{text}");
    }
    // A file where the directory should be: one line.
    let file = dir.join("memtrace.1");
    let out = run(&["man", file.to_str().unwrap()], Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        format!("memtrace: error: {} is not a directory: give the directory to write the man pages in", file.display())
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
