//! What every tool prints: timestamps, stacks, the tool's own blind spots, and the
//! formats side by side (table and JSON lines here, folded stacks for flame graphs).

use std::{
    fmt::Write as _,
    io::{self, Write as _},
    time::SystemTime,
};

use anyhow::Result;
use serde::Serialize;

use crate::symbolize::Frame;

pub mod decode;
pub mod histogram;

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

/// One line of folded stacks (root first, `;`-separated, then the value), the input of
/// flamegraph.pl and inferno.
pub fn folded(frames: &[Frame], value: u64) -> String {
    let mut names: Vec<String> = frames
        .iter()
        .rev()
        .map(|f| f.func.clone().unwrap_or_else(|| format!("{:#x}", f.addr)).replace(';', ":"))
        .collect();
    if names.is_empty() {
        names.push("[lost stack]".into());
    }
    format!("{} {value}", names.join(";"))
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
    /// Allocations not counted because the per-stack map was full.
    pub stacks_full: u64,
    /// Events that did not reach user space.
    pub events_lost: u64,
    /// Stacks the stack store had no room for (each one an allocation in `stacks_lost`), and
    /// the store's capacity (`--max-stacks`).
    pub stack_store_full: u64,
    pub stack_store_capacity: u32,
}

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let store_full = stack_store_full(self.stack_store_capacity);
        f.write_str(&blind_spots(&[
            (self.map_full, "allocations untracked (allocation map full: raise --max-allocs)"),
            (self.stacks_lost, "allocations without a stack"),
            (self.stack_store_full, &store_full),
            (self.unknown_frees, "frees of addresses not seen allocated"),
            (self.stacks_full, "allocations uncounted (stack-totals map full: raise --max-stacks)"),
            (self.events_lost, "events lost (ring buffer full)"),
        ]))
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
        assert_eq!(folded(&[frame("leaf"), frame("mid"), frame("main")], 42), "main;mid;leaf 42");
        assert_eq!(folded(&[], 7), "[lost stack] 7");
    }

    #[test]
    fn blind_spots_are_named() {
        assert_eq!(Dropped::default().to_string(), "blind spots: none");
        let d = Dropped { unknown_frees: 3, map_full: 2, ..Default::default() };
        let s = d.to_string();
        assert!(s.starts_with("blind spots: 2 allocations untracked"), "{s}");
        assert!(s.contains("3 frees of addresses not seen allocated"), "{s}");
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
