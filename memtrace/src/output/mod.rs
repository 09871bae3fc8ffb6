//! What every tool prints: timestamps, stacks, the tool's own blind spots, and the
//! formats side by side (table and JSON lines here, folded stacks for flame graphs).

use std::{
    fmt::Write as _,
    io::{self, Write as _},
    os::unix::ffi::OsStrExt as _,
    path::Path,
    time::SystemTime,
};

use anyhow::{Result, bail};
use serde::Serialize;

use crate::symbolize::Frame;

pub mod decode;
pub mod events;
pub mod hex;
pub mod histogram;
pub mod ready;

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
/// not a directory, in a directory that exists, and writable. Creates nothing.
pub fn check_writable(option: &str, path: &Path) -> Result<()> {
    let shown = path.display();
    if path.is_dir() {
        bail!("{option} {shown} is a directory: give a file path");
    }
    let target = if path.exists() {
        path
    } else {
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if !parent.is_dir() {
            bail!("{option} {shown}: directory {} does not exist", parent.display());
        }
        parent
    };
    let c_path = std::ffi::CString::new(target.as_os_str().as_bytes())
        .map_err(|_| anyhow::anyhow!("{option} {shown}: the path holds a NUL byte"))?;
    // With the effective ids, as the write will be done; EROFS for a read-only file system.
    // SAFETY: a NUL-terminated path; faccessat reads it only.
    let mode = if target.is_dir() { libc::W_OK | libc::X_OK } else { libc::W_OK };
    if unsafe { libc::faccessat(libc::AT_FDCWD, c_path.as_ptr(), mode, libc::AT_EACCESS) } != 0 {
        let err = io::Error::last_os_error();
        bail!("{option} {shown}: cannot write {}: {err}", target.display());
    }
    Ok(())
}

/// What a tool could not see, stated in every report so that a quiet report is never
/// mistaken for a complete one.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Dropped {
    /// Allocations not tracked because the per-address map was full.
    pub map_full: u64,
    /// Allocations recorded without their stack.
    pub stacks_lost: u64,
    /// Frees of addresses never seen allocated (made before attach, or sampled out).
    pub unknown_frees: u64,
    /// Allocations at an address already tracked: its free was not seen, so the older
    /// block's record was replaced (its bytes no longer count).
    pub replaced: u64,
    /// Allocations not counted because the per-stack map was full.
    pub stacks_full: u64,
    /// Events that did not reach user space.
    pub events_lost: u64,
    /// Processes (forked children, new images) whose probes went in after they had started
    /// running (`-p --children`): their first moments were not seen.
    pub late_processes: u64,
    /// Images a followed process exec'd into whose allocator could not be probed.
    pub unprobed_images: u64,
    /// Children not followed because memleak's process table was full.
    pub untracked_children: u64,
    /// Frees a child made while its inheritance was being copied that could not be noted:
    /// the block may show as outstanding in the child.
    pub early_frees_lost: u64,
    /// Stacks the stack store had no room for (each one an allocation in `stacks_lost`), and
    /// the store's capacity (`--max-stacks`).
    pub stack_store_full: u64,
    pub stack_store_capacity: u32,
    /// How the user stacks' walks ended (all zero with `--unwind fp`).
    pub cut_stacks: crate::unwind::CutStacks,
}

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let store_full = stack_store_full(self.stack_store_capacity);
        let spots = [
            (self.map_full, "allocations untracked (allocation map full: raise --max-allocs)"),
            (self.stacks_lost, "allocations without a stack"),
            (self.stack_store_full, &store_full),
            (self.unknown_frees, "frees of addresses not seen allocated"),
            (self.replaced, "frees missed (an address allocated again without one)"),
            (self.stacks_full, "allocations uncounted (stack-totals map full: raise --max-stacks)"),
            (self.events_lost, "events lost (ring buffer full)"),
            (self.late_processes, "processes traced from a few ms after they started (allocations before not seen)"),
            (self.unprobed_images, "exec'd images whose allocator could not be probed (-v says why)"),
            (self.untracked_children, "child processes not followed (process table full)"),
            (self.early_frees_lost, "frees during a child's inheritance copy not noted (counts may be high)"),
        ];
        f.write_str(&stack_blind_spots(&spots, &self.cut_stacks))
    }
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

/// `blind_spots` of a tool that shows user stacks: its own counts, then its stacks cut short.
pub fn stack_blind_spots(counts: &[(u64, &str)], cut: &crate::unwind::CutStacks) -> String {
    let all: Vec<(u64, &str)> = counts.iter().copied().chain(cut.blind_spots()).collect();
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
        Frame { func: Some(name.into()), ..Frame::unknown(0x10) }
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
        assert_eq!(err("/proc/1/f"), "--folded /proc/1/f: cannot write /proc/1: Operation not permitted (os error 1)");
        assert!(check_writable("--folded", &std::env::temp_dir().join("memtrace-unwritten")).is_ok());
        assert!(!std::env::temp_dir().join("memtrace-unwritten").exists(), "the check creates nothing");
    }

    #[test]
    fn blind_spots_are_named() {
        assert_eq!(Dropped::default().to_string(), "blind spots: none");
        let d = Dropped { unknown_frees: 3, map_full: 2, ..Default::default() };
        let s = d.to_string();
        assert!(s.starts_with("blind spots: 2 allocations untracked"), "{s}");
        assert!(s.contains("3 frees of addresses not seen allocated"), "{s}");
        let d = Dropped { replaced: 2, ..Default::default() };
        assert_eq!(d.to_string(), "blind spots: 2 frees missed (an address allocated again without one)");
        let d = Dropped { stacks_lost: 5, stack_store_full: 4, stack_store_capacity: 64, ..Default::default() };
        assert_eq!(
            d.to_string(),
            "blind spots: 5 allocations without a stack, 4 stacks not stored (stack store of 64 full: raise \
             --max-stacks)"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
    }
}
