//! What every tool prints: timestamps, stacks, the tool's own blind spots, and the
//! formats side by side (table and JSON lines here, folded stacks for flame graphs, pprof, SVG).

use std::{
    fmt::Write as _,
    io::{self, Write as _},
    os::unix::ffi::OsStrExt as _,
    path::Path,
    time::SystemTime,
};

use anyhow::{Result, bail};
use serde::Serialize;

use crate::symbolize::{Frame, UnnamedFrames};

pub mod decode;
pub mod events;
pub mod hex;
pub mod histogram;
pub mod pprof;
pub mod ready;
pub mod reports;
pub mod svg;

/// Writes one line to stdout. A closed pipe surfaces as an io::Error that `main` turns
/// into a quiet exit.
pub fn line(text: &str) -> Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

/// Writes `value` as one JSON object on one line.
pub fn json_line<T: Serialize>(value: &T) -> Result<()> {
    line(&serde_json::to_string(value)?)
}

/// Adds the fields of `extra` (a struct serialized as an object) to the JSON object `record`.
pub fn add_fields(record: &mut serde_json::Value, extra: &impl Serialize) {
    if let (Some(obj), Ok(serde_json::Value::Object(more))) = (record.as_object_mut(), serde_json::to_value(extra)) {
        obj.extend(more);
    }
}

/// The last JSON line of a run: `{"final": true, "events_lost": L}` plus `extra`'s fields.
pub fn final_line(lost: u64, extra: serde_json::Value) -> Result<()> {
    let mut end = serde_json::Map::new();
    end.insert("final".into(), true.into());
    end.insert("events_lost".into(), lost.into());
    if let serde_json::Value::Object(more) = extra {
        end.extend(more);
    }
    json_line(&end)
}

/// Wall-clock time as RFC 3339 in UTC, to the second.
pub fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Wall-clock time as RFC 3339 in UTC, to the millisecond: the `time` of JSON events.
pub fn now_ms() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Wall-clock `HH:MM:SS` (UTC), the TIME column of tables.
pub fn hms() -> String {
    now()[11..19].to_string()
}

/// Appends a stack, one frame a line, innermost first.
pub fn write_stack(out: &mut String, frames: &[Frame], indent: &str) {
    if frames.is_empty() {
        let _ = writeln!(out, "{indent}[stack not recorded]");
    }
    for frame in frames {
        let _ = writeln!(out, "{indent}{frame}");
    }
}

/// One line of folded stacks (`root` first, `;`-separated, then the value), the input of
/// flamegraph.pl and inferno. `root` names the process (see `process_root`), so each
/// process gets its own tower in the flame graph.
pub fn folded(root: &str, frames: &[Frame], value: u64) -> String {
    let mut names: Vec<String> = std::iter::once(root.replace(';', ":"))
        .chain(
            frames.iter().rev().map(|f| f.func.clone().unwrap_or_else(|| format!("{:#x}", f.addr)).replace(';', ":")),
        )
        .collect();
    if names.len() == 1 {
        names.push("[lost stack]".into());
    }
    format!("{} {value}", names.join(";"))
}

/// The root frame of a process's folded stacks: `comm (pid)`, or `[pid N]` when the name is
/// not known.
pub fn process_root(pid: u32, comm: &str) -> String {
    if comm.is_empty() { format!("[pid {pid}]") } else { format!("{comm} ({pid})") }
}

/// Checks, before a run, that an output file (`--folded`, ...) can be written at the end:
/// not a directory, in a directory that exists, and writable. An existing file is opened for
/// writing (not truncated) and written nothing, which a pseudo-file such as /proc/version
/// refuses; a new one is created and removed at once. Leaves the file system as it was.
pub fn check_writable(option: &str, path: &Path) -> Result<()> {
    use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
    let shown = path.display();
    if path.is_dir() {
        bail!("{option} {shown} is a directory: give a file path");
    }
    let cannot = |err: io::Error| {
        anyhow::anyhow!("{option} {shown}: cannot write {shown}: {err}; give a path memtrace can write")
    };
    if let Ok(meta) = path.metadata() {
        // A FIFO's write waits for its reader, which may come only later.
        if meta.file_type().is_fifo() {
            return Ok(());
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
            .map_err(cannot)?;
        // Zero bytes: no change to a file, an error from a pseudo-file without a write handler.
        file.write(&[]).map_err(cannot)?;
        return Ok(());
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !parent.is_dir() {
        bail!("{option} {shown}: directory {} does not exist", parent.display());
    }
    let c_path = std::ffi::CString::new(parent.as_os_str().as_bytes())
        .map_err(|_| anyhow::anyhow!("{option} {shown}: the path holds a NUL byte"))?;
    // With the effective ids, as the write will be done; EROFS for a read-only file system.
    // SAFETY: a NUL-terminated path; faccessat reads it only.
    if unsafe { libc::faccessat(libc::AT_FDCWD, c_path.as_ptr(), libc::W_OK | libc::X_OK, libc::AT_EACCESS) } != 0 {
        let err = io::Error::last_os_error();
        bail!("{option} {shown}: cannot write {}: {err}; give a path memtrace can write", parent.display());
    }
    // Root passes that check in any directory, even one of /proc: create the file to be sure.
    std::fs::OpenOptions::new().write(true).create_new(true).open(path).map_err(cannot)?;
    std::fs::remove_file(path).map_err(cannot)?;
    Ok(())
}

/// The blind-spot entry for captures the stack store of `capacity` had no room for.
pub fn stack_store_full(capacity: u32) -> String {
    format!("stacks not stored (stack store of {capacity} full: raise --max-stacks)")
}

/// The line every report ends with: each non-zero count of what the tool could not see, or
/// "none", so a quiet report is never mistaken for a complete one.
pub fn blind_spots(counts: &[(u64, &str)]) -> String {
    let parts: Vec<String> = counts.iter().filter(|(n, _)| *n > 0).map(|(n, what)| format!("{n} {what}")).collect();
    if parts.is_empty() { "blind spots: none".into() } else { format!("blind spots: {}", parts.join(", ")) }
}

/// `blind_spots` of a tool that shows user stacks: its own counts, then its stacks cut short,
/// then the frames it showed without a function name.
pub fn stack_blind_spots(counts: &[(u64, &str)], cut: &crate::unwind::CutStacks, unnamed: &UnnamedFrames) -> String {
    let all: Vec<(u64, &str)> = counts.iter().copied().chain(cut.blind_spots()).chain(unnamed.blind_spots()).collect();
    blind_spots(&all)
}

/// "1.5 KiB"-style sizes for tables.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(name: &str) -> Frame {
        Frame { func: Some(name.into()), unnamed: None, ..Frame::unknown(0x10) }
    }

    #[test]
    fn folded_is_root_first() {
        let root = process_root(42, "app");
        assert_eq!(folded(&root, &[frame("leaf"), frame("mid"), frame("main")], 42), "app (42);main;mid;leaf 42");
        assert_eq!(folded(&process_root(7, ""), &[], 7), "[pid 7];[lost stack] 7");
        assert_eq!(folded("a;b (1)", &[frame("f")], 1), "a:b (1);f 1");
    }

    #[test]
    fn unwritable_output_paths_are_named() {
        let err = |p: &str| check_writable("--folded", Path::new(p)).unwrap_err().to_string();
        assert_eq!(err("/tmp"), "--folded /tmp is a directory: give a file path");
        assert_eq!(err("/nonexistent/f"), "--folded /nonexistent/f: directory /nonexistent does not exist");
        assert_eq!(
            err("/proc/1/f"),
            "--folded /proc/1/f: cannot write /proc/1: Operation not permitted (os error 1); give a path memtrace can write"
        );
        let new = std::env::temp_dir().join(format!("memtrace-unwritten-{}", std::process::id()));
        assert!(check_writable("--folded", &new).is_ok());
        assert!(!new.exists(), "the check left {}", new.display());
        // An existing file keeps its content; a pseudo-file that refuses writes is refused.
        std::fs::write(&new, "kept").unwrap();
        assert!(check_writable("--folded", &new).is_ok());
        assert_eq!(std::fs::read_to_string(&new).unwrap(), "kept");
        std::fs::remove_file(&new).unwrap();
        assert_eq!(
            err("/proc/version"),
            "--folded /proc/version: cannot write /proc/version: Input/output error (os error 5); give a path memtrace can write"
        );
        assert!(!std::env::temp_dir().join("memtrace-unwritten").exists(), "the check creates nothing");
    }

    #[test]
    fn sizes() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
    }
}
