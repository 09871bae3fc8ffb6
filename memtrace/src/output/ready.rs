//! The moment a tool is live (its probes attached), told two ways: the human line on stderr
//! ("...; Ctrl-C to stop"), and for scripts and tests, with `--ready-fd N`, one JSON line
//! `{"ready": true, "tool": ..., "pid": ...}` written to descriptor N, which is then closed so
//! a reader also sees end-of-file. Nothing is parsed from the human text.

use std::{
    io::Write as _,
    os::fd::{FromRawFd as _, RawFd},
    sync::Mutex,
};

use anyhow::{Result, bail};

static READY_FD: Mutex<Option<RawFd>> = Mutex::new(None);

/// Warnings about what this run will lack, held until it is live: a run that ends in an
/// error before that says only the error, in one line.
static WARNINGS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Prints `text` as a warning when the tool is live (once, however often it is given).
pub fn warn_when_live(text: &str) {
    let mut held = WARNINGS.lock().unwrap_or_else(|e| e.into_inner());
    if !held.iter().any(|w| w == text) {
        held.push(text.to_string());
    }
}

/// Checks that `fd` is open for writing, and keeps it for `ready`.
pub fn set_fd(fd: RawFd) -> Result<()> {
    if fd <= 2 {
        bail!("--ready-fd {fd}: use a descriptor above 2 (stdin, stdout and stderr have their own uses), e.g. 3>file");
    }
    // SAFETY: F_GETFL only reads the descriptor's flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        bail!("--ready-fd {fd}: not an open file descriptor: open it for memtrace, e.g. {fd}>file");
    }
    if flags & libc::O_ACCMODE == libc::O_RDONLY {
        bail!("--ready-fd {fd}: open for reading only: open it for writing, e.g. {fd}>file");
    }
    *READY_FD.lock().unwrap_or_else(|e| e.into_inner()) = Some(fd);
    Ok(())
}

/// Says that `tool` is live: `line` on stderr, and the JSON line to `--ready-fd` (once).
pub fn ready(tool: &str, pid: Option<u32>, line: &str) {
    for warning in WARNINGS.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
        eprintln!("memtrace: warning: {warning}");
    }
    eprintln!("memtrace: {tool}: {line}; Ctrl-C to stop");
    let Some(fd) = READY_FD.lock().unwrap_or_else(|e| e.into_inner()).take() else { return };
    // SAFETY: the descriptor was checked open in `set_fd`, and is taken (and closed) once.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    let value = serde_json::json!({ "ready": true, "tool": tool, "pid": pid });
    // A reader that went away is not memtrace's failure.
    let _ = writeln!(file, "{value}");
}
