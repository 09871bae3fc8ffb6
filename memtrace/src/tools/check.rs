//! Argument checks every tool shares. Each tool's `Args::validate` runs before anything is
//! loaded or attached (and without root), so bad input is a one-line error, never a panic or
//! an error from deep inside a run.

use std::ops::RangeInclusive;

use anyhow::{Result, bail};

use super::CommonArgs;
use crate::target;

/// The longest interval or duration, in seconds (a year): long enough for any real run, and
/// far below what would overflow a timer deadline.
pub const MAX_SECONDS: u64 = 365 * 24 * 3600;

/// Map capacities the kernel can allocate: 0 is refused by the kernel and past 2^24 entries
/// the maps take gigabytes (or more than the kernel's size limit).
pub const MAP_ENTRIES: RangeInclusive<u64> = 1..=1 << 24;

/// `[interval]` in seconds.
pub fn interval(secs: u64) -> Result<u64> {
    if !(1..=MAX_SECONDS).contains(&secs) {
        bail!("the interval must be at least 1 second and at most {MAX_SECONDS} (a year), not {secs}");
    }
    Ok(secs)
}

/// `[count]` of reports.
pub fn count(n: Option<u64>) -> Result<()> {
    if n == Some(0) {
        bail!("the count must be at least 1");
    }
    Ok(())
}

/// A value that must lie in `range`, named by its option.
pub fn in_range(option: &str, value: u64, range: RangeInclusive<u64>) -> Result<()> {
    if !range.contains(&value) {
        bail!("{option} takes {} to {}, not {value}", range.start(), range.end());
    }
    Ok(())
}

/// Parses a `-T/--top` value (taken as text so a bad one is a one-line error, not clap's).
pub fn parse_top(s: &str) -> Result<usize> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => bail!("-T/--top takes a number of rows of at least 1, not {s:?}"),
    }
}

/// Parses the optional `[interval]` (seconds) the same way.
pub fn parse_interval(s: Option<&str>) -> Result<Option<std::time::Duration>> {
    let Some(s) = s else { return Ok(None) };
    match s.parse::<u64>() {
        Ok(n) => Ok(Some(std::time::Duration::from_secs(interval(n)?))),
        Err(_) => bail!("the interval is a number of seconds from 1 to {MAX_SECONDS} (a year), not {s:?}"),
    }
}

impl CommonArgs {
    /// What can be checked before a run: the duration, the name, and that the PID lives.
    pub fn validate(&self) -> Result<()> {
        if let Some(secs) = self.duration {
            in_range("-d/--duration", secs, 1..=MAX_SECONDS)?;
        }
        if let Some(comm) = &self.comm
            && (comm.is_empty() || comm.len() > 15)
        {
            bail!("--comm takes 1 to 15 bytes (the kernel keeps 15 of a task's name): {comm:?}");
        }
        if let Some(pid) = self.pid {
            target::check_pid(pid)?;
        }
        Ok(())
    }

    /// For tools that read the target's user stacks: a kernel thread has none.
    pub fn validate_user_target(&self) -> Result<()> {
        self.validate()?;
        if let Some(pid) = self.pid {
            target::check_user_pid(pid)?;
        }
        Ok(())
    }
}

/// The options of a tool that reports stacks per interval (brkstack, faults): `-T`, the
/// interval, `--max-stacks` and `--folded`, checked the same way.
pub fn stack_report(
    top: &str,
    interval: Option<&str>,
    max_stacks: u32,
    folded: Option<&std::path::Path>,
) -> Result<()> {
    parse_top(top)?;
    parse_interval(interval)?;
    in_range("--max-stacks", max_stacks.into(), MAP_ENTRIES)?;
    if let Some(path) = folded {
        crate::output::check_writable("--folded", path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_named() {
        assert_eq!(
            interval(u64::MAX).unwrap_err().to_string(),
            "the interval must be at least 1 second and at most 31536000 (a year), not 18446744073709551615"
        );
        assert!(interval(MAX_SECONDS).is_ok());
        assert_eq!(
            in_range("--max-stacks", 0, MAP_ENTRIES).unwrap_err().to_string(),
            "--max-stacks takes 1 to 16777216, not 0"
        );
        assert_eq!(parse_interval(Some("2")).unwrap(), Some(std::time::Duration::from_secs(2)));
        assert!(parse_interval(Some("x")).is_err());
        assert!(parse_top("0").is_err());
    }
}
