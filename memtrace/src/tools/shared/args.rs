//! The option groups tools share, and their checks. Each group means one thing in every tool
//! that takes it: `-T` is `--top` wherever it is taken, `[interval] [count]` always seconds and reports.
//! Each tool's `Args::validate` runs before anything is loaded or attached (and without root),
//! so bad input is a one-line error, never a panic or an error from deep inside a run.

use std::{ops::RangeInclusive, time::Duration};

use anyhow::{Result, bail};
use memtrace_common::Filter;

use crate::{
    target,
    unwind::{self, UnwindMode},
};

/// Options every tracer takes, the same way.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct CommonArgs {
    #[command(flatten)]
    pub target: PidArg,
    /// Only tasks with this command name (as in /proc/PID/comm, at most 15 characters).
    #[arg(long, value_name = "NAME")]
    pub comm: Option<String>,
    #[command(flatten)]
    pub run: RunArgs,
}

/// `-p PID`, in every tool that takes one (memleak, which has no `--comm`, takes it alone).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct PidArg {
    /// Only this process (and the run ends when it exits).
    #[arg(short, long)]
    pub pid: Option<u32>,
}

/// How long a run lasts and how it prints, in every tracer.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RunArgs {
    /// Stop after this many seconds.
    #[arg(short, long, value_name = "SECONDS")]
    pub duration: Option<u64>,
    /// One JSON object per line on stdout.
    #[arg(long)]
    pub json: bool,
}

impl CommonArgs {
    /// The eBPF-side filter; checks the PID and the name first.
    pub fn filter(&self) -> Result<Filter> {
        let mut filter = Filter::default();
        if let Some(pid) = self.target.pid {
            target::check_pid(pid)?;
            filter.pid = pid;
        }
        if let Some(comm) = &self.comm {
            check_comm(comm)?;
            filter.has_comm = 1;
            filter.comm[..comm.len()].copy_from_slice(comm.as_bytes());
        }
        Ok(filter)
    }
}

fn check_comm(comm: &str) -> Result<()> {
    if comm.is_empty() || comm.len() > 15 {
        bail!("--comm takes 1 to 15 bytes (the kernel keeps 15 of a task's name): {comm:?}");
    }
    Ok(())
}

/// `[interval] [count]`: a report every INTERVAL seconds, COUNT times. Taken as text so that a
/// bad value gets memtrace's own one-line error, the same in every tool.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Reports {
    /// Seconds between reports, 1 to 31536000 (default: 5 in memleak, 1 in vmscan, swapin and migrate;
    /// one report at the end in the others).
    #[arg(value_name = "INTERVAL")]
    interval: Option<String>,
    /// Number of reports, then exit (default: until Ctrl-C, --duration or the target exits).
    #[arg(value_name = "COUNT")]
    count: Option<String>,
}

impl Reports {
    pub fn validate(&self) -> Result<()> {
        parse_interval(self.interval.as_deref())?;
        parse_count(self.count.as_deref())?;
        Ok(())
    }

    /// The interval given, if any (after `validate`).
    pub fn every(&self) -> Option<Duration> {
        parse_interval(self.interval.as_deref()).ok().flatten()
    }

    /// The interval given, or `default_secs`.
    pub fn every_or(&self, default_secs: u64) -> Duration {
        self.every().unwrap_or(Duration::from_secs(default_secs))
    }

    /// The number of reports asked for, if any (after `validate`).
    pub fn count(&self) -> Option<u64> {
        parse_count(self.count.as_deref()).ok().flatten()
    }
}

/// `-T/--top N`: rows per table.
#[derive(clap::Args, Debug, Clone)]
pub struct Top {
    /// Show the N rows (stacks, processes) with the most weight in each table.
    #[arg(short = 'T', long = "top", default_value = "10", value_name = "N")]
    top: String,
}

impl Top {
    pub fn validate(&self) -> Result<()> {
        parse_top(&self.top).map(drop)
    }

    /// The number of rows (after `validate`).
    pub fn get(&self) -> usize {
        parse_top(&self.top).unwrap_or(10)
    }
}

/// `--timestamp`: time since the trace started on each line (or before each report). bcc spells
/// it `-T` in some tools, but memtrace's `-T` is `--top` everywhere: that spelling gets a
/// one-line pointer instead of a different meaning per tool.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Timestamp {
    /// Add seconds since tracing started: a TIME(s) column, or a time line before each report.
    #[arg(long)]
    pub timestamp: bool,
    #[arg(short = 'T', hide = true)]
    bcc_spelling: bool,
}

impl Timestamp {
    pub fn validate(&self) -> Result<()> {
        if self.bcc_spelling {
            bail!(
                "-T is not a timestamp option: use --timestamp (memtrace's -T is --top, rows per table, in memleak, brkstack and faults)"
            );
        }
        Ok(())
    }
}

/// The longest interval or duration, in seconds (a year): long enough for any real run, and
/// far below what would overflow a timer deadline.
pub const MAX_SECONDS: u64 = 365 * 24 * 3600;

/// Map capacities the kernel can allocate: 0 is refused by the kernel and past 2^24 entries
/// the maps take gigabytes (or more than the kernel's size limit).
pub const MAP_ENTRIES: RangeInclusive<u64> = 1..=1 << 24;

/// `[interval]` in seconds.
fn interval(secs: u64) -> Result<u64> {
    if !(1..=MAX_SECONDS).contains(&secs) {
        bail!("the interval must be at least 1 second and at most {MAX_SECONDS} (a year), not {secs}");
    }
    Ok(secs)
}

/// `[count]` of reports.
fn parse_count(s: Option<&str>) -> Result<Option<u64>> {
    let Some(s) = s else { return Ok(None) };
    match s.parse::<u64>() {
        Ok(0) => bail!("the count must be at least 1"),
        Ok(n) => Ok(Some(n)),
        Err(_) => bail!("the count is a number of reports of at least 1, not {s:?}"),
    }
}

/// A value that must lie in `range`, named by its option.
pub fn in_range(option: &str, value: u64, range: RangeInclusive<u64>) -> Result<()> {
    if !range.contains(&value) {
        bail!("{option} takes {} to {}, not {value}", range.start(), range.end());
    }
    Ok(())
}

/// Parses a `-T/--top` value.
fn parse_top(s: &str) -> Result<usize> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => bail!("-T/--top takes a number of rows of at least 1, not {s:?}"),
    }
}

/// Parses the optional `[interval]` (seconds).
fn parse_interval(s: Option<&str>) -> Result<Option<std::time::Duration>> {
    let Some(s) = s else { return Ok(None) };
    match s.parse::<u64>() {
        Ok(n) => Ok(Some(std::time::Duration::from_secs(interval(n)?))),
        Err(_) => bail!("the interval is a number of seconds from 1 to {MAX_SECONDS} (a year), not {s:?}"),
    }
}

impl CommonArgs {
    /// What can be checked before a run: the duration, the name, and that the PID lives.
    pub fn validate(&self) -> Result<()> {
        if let Some(secs) = self.run.duration {
            in_range("-d/--duration", secs, 1..=MAX_SECONDS)?;
        }
        if let Some(comm) = &self.comm {
            check_comm(comm)?;
        }
        if let Some(pid) = self.target.pid {
            target::check_pid(pid)?;
        }
        Ok(())
    }

    /// For tools that read the target's user stacks: a kernel thread has none.
    pub fn validate_user_target(&self) -> Result<()> {
        self.validate()?;
        if let Some(pid) = self.target.pid {
            target::check_user_pid(pid)?;
        }
        Ok(())
    }
}

/// The options of a tool that counts per stack in the kernel and reports per interval
/// (brkstack, faults), taken and checked the same way.
#[derive(clap::Args, Debug, Clone)]
pub struct StackReportArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub reports: Reports,
    #[command(flatten)]
    pub top: Top,
    /// Also write the final report's stacks as folded stacks to this file, for flame graphs.
    #[arg(long, value_name = "FILE")]
    pub folded: Option<std::path::PathBuf>,
    /// Also write the final report's stacks as a gzipped pprof profile to this file, for
    /// `go tool pprof` and profile servers.
    #[arg(long, value_name = "FILE")]
    pub pprof: Option<std::path::PathBuf>,
    /// Also draw the final report's stacks as a flame graph (SVG) in this file.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<std::path::PathBuf>,
    /// Capacity of the stack store and the per-stack counts (a full map is reported as a blind
    /// spot). Stacks take memory only when stored, about 1 KiB each.
    #[arg(long, default_value_t = 65_536, value_name = "N")]
    pub max_stacks: u32,
    #[command(flatten)]
    pub unwind: UnwindArgs,
}

impl StackReportArgs {
    /// Checks everything but the target (whose rules are the tool's).
    pub fn validate(&self) -> Result<()> {
        self.top.validate()?;
        self.reports.validate()?;
        in_range("--max-stacks", self.max_stacks.into(), MAP_ENTRIES)?;
        if let Some(path) = &self.folded {
            crate::output::check_writable("--folded", path)?;
        }
        if let Some(path) = &self.pprof {
            crate::output::check_writable("--pprof", path)?;
        }
        if let Some(path) = &self.svg {
            crate::output::check_writable("--svg", path)?;
        }
        self.unwind.validate()
    }
}

/// The options of every tool that shows user stacks.
#[derive(clap::Args, Debug, Clone)]
pub struct UnwindArgs {
    /// How user stacks are walked.
    #[arg(long, value_enum, default_value_t = UnwindMode::Auto, value_name = "HOW")]
    pub unwind: UnwindMode,
    /// Rows of unwind tables that may be loaded (16 bytes of kernel memory each, reserved at
    /// start); -v shows what each module takes.
    #[arg(long, default_value_t = unwind::DEFAULT_ROWS, value_name = "N")]
    pub unwind_rows: u32,
}

impl UnwindArgs {
    /// The mode asked for, as this kernel can do it.
    pub fn mode(&self) -> UnwindMode {
        unwind::mode_on_this_kernel(self.unwind)
    }

    pub fn validate(&self) -> Result<()> {
        in_range("--unwind-rows", self.unwind_rows.into(), 1024..=unwind::MAX_ROWS.into())
    }

    /// Sets the unwinder's globals and map sizes on a loader, before the object is loaded.
    pub fn configure(&self, loader: &mut aya::EbpfLoader<'_>) {
        self.configure_as(loader, self.mode());
    }

    /// `configure` with another mode (memleak's kernel mode walks no user stack).
    pub fn configure_as(&self, loader: &mut aya::EbpfLoader<'_>, mode: UnwindMode) {
        unwind::configure(loader, mode, self.unwind_rows);
    }

    /// The unwinder of a loaded object, with the tables of the processes `common` selects
    /// loaded now, so their stacks are whole from the start.
    pub fn start(&self, bpf: &mut aya::Ebpf, common: &CommonArgs) -> Result<unwind::Unwinder> {
        unwind::Unwinder::start(bpf, self.mode(), common.target.pid, common.comm.as_deref())
    }
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
