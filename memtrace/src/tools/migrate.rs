//! migrate: pages migrated per interval, per reason (all tasks) and per process and reason
//! (the tasks -p/--comm keep), beside /proc/vmstat's counts over the same time.

use anyhow::{Result, bail};
use aya::maps::{HashMap, MapData, PerCpuArray};
use memtrace_common::migrate::{
    self, CALLS, COUNTERS, Counts, FAILED, FIELD_ABSENT, LARGE_SPLIT, MAX_REASON, Offsets, ProcKey, REASON_ROWS,
    STAT_PROCS_FULL, SUCCEEDED, THP_FAILED, THP_SPLIT, THP_SUCCEEDED,
};
use memtrace_common::names;
use serde::Serialize;

use crate::{
    kernel::{
        self, AttachPoint, Probe,
        cgroup::{Attribution, MemcgPaths},
        tracefs::{Format, Symbols},
        vmstat::{self, Migrations},
    },
    output::{self, reports::ReportPrinter},
    tools::registry::{Plan, ToolSpec},
    tools::tracer::Tracer,
    tools::{self, CommonArgs, args::Reports, c_str},
};

const OBJECT: crate::kernel::Object = crate::ebpf_object!("migrate");

const CATEGORY: &str = "migrate";
const TRACEPOINT: &str = "mm_migrate_pages";

/// How migrate attaches, as `memtrace probe` reports it.
pub const ATTACH: &[AttachPoint] = &[AttachPoint {
    label: "tracepoint migrate:mm_migrate_pages",
    probes: &[Probe::Tracepoint { prog: "migrate_pages", category: CATEGORY, names: &[TRACEPOINT] }],
}];

pub const SPEC: ToolSpec = ToolSpec {
    names: memtrace_common::migrate::names::ALL,
    name: "migrate",
    object: OBJECT,
    modes: &[("migrate", Plan::Points(ATTACH))],
    optional: &[],
};

/// The record's field of each counter, in `COUNTERS` order (CALLS is no field), oldest name
/// last.
const FIELDS: [&[&str]; COUNTERS] =
    [&["succeeded"], &["failed"], &["thp_succeeded"], &["thp_failed"], &["thp_split"], &["large_folio_split"], &[]];

/// Count page migrations per reason and process, per interval, against /proc/vmstat.
#[derive(clap::Args, Debug)]
#[command(after_help = "The REASON rows and the vmstat check count every task; the process rows only \
                        those -p/--comm keep. A migration is counted in the interval where it ends.")]
pub struct Args {
    #[command(flatten)]
    pub reports: Reports,
    #[command(flatten)]
    pub common: CommonArgs,
}

impl Args {
    /// Everything that can be checked before loading anything (and without root).
    pub fn validate(&self) -> Result<()> {
        self.reports.validate()?;
        self.common.validate()
    }
}

pub async fn run(args: Args) -> Result<()> {
    kernel::require_root()?;
    let filter = args.common.filter()?;
    let format = Format::read(CATEGORY, TRACEPOINT)?;
    let offsets = offsets(&format)?;
    let reasons = format.symbols("reason");
    if reasons.is_empty() {
        tracing::warn!("migrate: {TRACEPOINT}'s format names no reasons: they are shown as numbers");
    }
    let mut tracer = Tracer::load(&SPEC, |loader| {
        loader.override_global(names::FILTER, &filter, true).override_global(migrate::names::OFFSETS, &offsets, true);
    })?;
    tracer.attach(ATTACH)?;
    let mut state = Live {
        reasons,
        totals: tracer.map(migrate::names::TOTALS)?,
        procs: tracer.map(migrate::names::PROCS)?,
        stats: tracer.map(migrate::names::STATS)?,
        last: Reading::default(),
        start: Reading::default(),
        seen: std::collections::HashMap::new(),
        cgroups: MemcgPaths::new(),
        out: ReportPrinter::new("migrate", args.common.run.json),
    };
    // After attaching: from here on every migration is in both the maps and vmstat.
    state.start = state.read()?;
    state.last = state.start.clone();
    let every = args.reports.every_or(1);
    let ready = format!("counting page migrations, one report every {} s", every.as_secs());
    tracer.stream(&args.common, Some(every), args.reports.count(), &ready, &mut state).await?;
    Ok(())
}

/// Where each counter is in this kernel's record; FIELD_ABSENT for one it lacks (5.10 to 6.7
/// have no large_folio_split). The counts must be `unsigned long`s, as in every kernel so far.
fn offsets(format: &Format) -> Result<Offsets> {
    let mut offsets = Offsets::ABSENT;
    for (i, names) in FIELDS.iter().enumerate() {
        let Some(field) = names.iter().find_map(|n| format.field(n)) else { continue };
        if field.size != 8 {
            bail!(
                "{}'s {} is {} bytes, not 8: this kernel's layout is not supported",
                format.tracepoint,
                field.name,
                field.size
            );
        }
        offsets.counts[i] = field.offset;
    }
    for needed in [SUCCEEDED, FAILED] {
        if offsets.counts[needed] == FIELD_ABSENT {
            bail!("{} has no field {:?}: this kernel's layout is not supported", format.tracepoint, FIELDS[needed]);
        }
    }
    let reason = format.field("reason").ok_or_else(|| anyhow::anyhow!("{} has no reason", format.tracepoint))?;
    if reason.size != 4 {
        bail!("{}'s reason is {} bytes, not 4: this kernel's layout is not supported", format.tracepoint, reason.size);
    }
    offsets.reason = reason.offset;
    Ok(offsets)
}

/// The kernel's counters at one moment: per reason row, and /proc/vmstat's.
#[derive(Clone, Default, PartialEq, Eq)]
struct Reading {
    by_reason: Vec<[u64; COUNTERS]>,
    vmstat: Migrations,
}

struct Live {
    reasons: Symbols,
    totals: PerCpuArray<MapData, u64>,
    procs: HashMap<MapData, ProcKey, Counts>,
    stats: PerCpuArray<MapData, u64>,
    start: Reading,
    last: Reading,
    /// Each process row's counts at the last report: each report shows the increase.
    seen: std::collections::HashMap<ProcKey, [u64; COUNTERS]>,
    /// Processes' memory cgroups: from /proc at each report, else (gone by then) as the
    /// kernel side read it at the process's first migration.
    cgroups: MemcgPaths,
    out: ReportPrinter,
}

/// Counts of one reason or process over a span of time.
#[derive(Serialize, Clone, Default)]
struct Tally {
    succeeded: u64,
    failed: u64,
    thp_succeeded: u64,
    thp_failed: u64,
    thp_split: u64,
    large_split: u64,
    calls: u64,
}

impl Tally {
    fn of(n: &[u64; COUNTERS]) -> Tally {
        Tally {
            succeeded: n[SUCCEEDED],
            failed: n[FAILED],
            thp_succeeded: n[THP_SUCCEEDED],
            thp_failed: n[THP_FAILED],
            thp_split: n[THP_SPLIT],
            large_split: n[LARGE_SPLIT],
            calls: n[CALLS],
        }
    }

    fn columns(&self) -> String {
        format!(
            "{:>10} {:>8} {:>7} {:>8} {:>9} {:>6} {:>7}",
            self.succeeded,
            self.failed,
            self.thp_succeeded,
            self.thp_failed,
            self.thp_split,
            self.large_split,
            self.calls
        )
    }
}

const COLUMNS: &str = " SUCCEEDED   FAILED  THP_OK THP_FAIL THP_SPLIT  SPLIT   CALLS";

#[derive(Serialize)]
struct ReasonRow {
    reason: String,
    reason_code: u32,
    #[serde(flatten)]
    tally: Tally,
}

#[derive(Serialize)]
struct ProcRow {
    pid: u32,
    comm: String,
    reason: String,
    reason_code: u32,
    #[serde(flatten)]
    tally: Tally,
    #[serde(flatten)]
    cgroup: Attribution,
}

/// memtrace's totals over all tasks beside /proc/vmstat's over the same span.
#[derive(Serialize)]
struct Check {
    succeeded: u64,
    failed: u64,
    vmstat_pgmigrate_success: u64,
    vmstat_pgmigrate_fail: u64,
    agree: bool,
}

impl Check {
    fn line(&self) -> String {
        let verdict = if self.agree { "agree" } else { "DIFFER" };
        format!(
            "migrated {} pages, {} failed; /proc/vmstat: pgmigrate_success +{}, pgmigrate_fail +{} ({verdict})",
            self.succeeded, self.failed, self.vmstat_pgmigrate_success, self.vmstat_pgmigrate_fail
        )
    }
}

#[derive(Serialize)]
struct Report {
    #[serde(flatten)]
    check: Check,
    reasons: Vec<ReasonRow>,
    processes: Vec<ProcRow>,
}

impl Live {
    fn reason_name(&self, code: u32) -> String {
        if code >= MAX_REASON {
            // The last row also holds every higher reason.
            return format!("reason{MAX_REASON}+");
        }
        self.reasons.get(code.into()).map_or_else(|| format!("reason{code}"), str::to_string)
    }

    fn by_reason(&self) -> Vec<[u64; COUNTERS]> {
        (0..REASON_ROWS)
            .map(|r| std::array::from_fn(|i| kernel::maps::sum(&self.totals, r * COUNTERS as u32 + i as u32)))
            .collect()
    }

    /// The maps and /proc/vmstat read together. The kernel counts a migrate_pages call in
    /// vmstat just before its tracepoint fires: the maps are read on both sides of vmstat,
    /// again while a migration ends in between.
    fn read(&self) -> Result<Reading> {
        let mut reading = Reading::default();
        for _ in 0..10 {
            let before = self.by_reason();
            let vmstat = vmstat::migrations()?;
            let after = self.by_reason();
            reading = Reading { by_reason: after, vmstat };
            if before == reading.by_reason {
                break;
            }
        }
        Ok(reading)
    }

    /// The increase from `from` to `to`, per reason, and the check against vmstat.
    fn between(&self, from: &Reading, to: &Reading) -> (Vec<ReasonRow>, Check) {
        let mut rows = Vec::new();
        let mut sum = [0u64; COUNTERS];
        for (r, (now, then)) in to.by_reason.iter().zip(&from.by_reason).enumerate() {
            let delta: [u64; COUNTERS] = std::array::from_fn(|i| now[i].wrapping_sub(then[i]));
            if delta[CALLS] == 0 {
                continue;
            }
            for i in 0..COUNTERS {
                sum[i] += delta[i];
            }
            rows.push(ReasonRow {
                reason: self.reason_name(r as u32),
                reason_code: r as u32,
                tally: Tally::of(&delta),
            });
        }
        let success = to.vmstat.success.wrapping_sub(from.vmstat.success);
        let fail = to.vmstat.fail.wrapping_sub(from.vmstat.fail);
        let check = Check {
            succeeded: sum[SUCCEEDED],
            failed: sum[FAILED],
            vmstat_pgmigrate_success: success,
            vmstat_pgmigrate_fail: fail,
            agree: success == sum[SUCCEEDED] && fail == sum[FAILED],
        };
        (rows, check)
    }

    /// The process rows' increase since the last call. The kernel side only adds to its
    /// counters (deleting a row it may be adding to would lose the addition).
    fn processes(&mut self) -> Vec<ProcRow> {
        let mut rows = Vec::new();
        for (key, counts) in kernel::maps::dump(&self.procs) {
            let before = self.seen.insert(key, counts.n).unwrap_or_default();
            let delta: [u64; COUNTERS] = std::array::from_fn(|i| counts.n[i].wrapping_sub(before[i]));
            if delta[CALLS] == 0 {
                continue;
            }
            rows.push(ProcRow {
                pid: key.pid,
                comm: c_str(&counts.comm),
                reason: self.reason_name(key.reason.min(MAX_REASON)),
                reason_code: key.reason,
                tally: Tally::of(&delta),
                cgroup: self.cgroups.attribution_of(key.pid, counts.memcg_id),
            });
        }
        rows.sort_by(|a, b| b.tally.succeeded.cmp(&a.tally.succeeded).then(a.pid.cmp(&b.pid)));
        rows
    }

    fn table(report: &Report) -> String {
        let mut text = format!("{} {}", output::hms(), report.check.line());
        if !report.reasons.is_empty() {
            text += &format!("\n{:<24}{COLUMNS}", "REASON");
            for row in &report.reasons {
                text += &format!("\n{:<24}{}", row.reason, row.tally.columns());
            }
        }
        if !report.processes.is_empty() {
            text += &format!("\n{:<7} {:<16} {:<18}{COLUMNS} CGROUP", "PID", "COMM", "REASON");
            for row in &report.processes {
                let (pid, comm, reason, cgroup) = (row.pid, &row.comm, &row.reason, row.cgroup.short());
                text += &format!("\n{pid:<7} {comm:<16} {reason:<18}{} {cgroup}", row.tally.columns());
            }
        }
        text
    }
}

impl tools::Stream for Live {
    type Side = ();

    fn event(&mut self, _data: &[u8]) -> Result<()> {
        Ok(())
    }

    fn tick(&mut self) -> Result<()> {
        self.report(true)
    }

    fn finish(&mut self, lost: u64) -> Result<()> {
        // What ended since the last report, then the whole run.
        self.report(false)?;
        let now = self.read()?;
        let (reasons, check) = self.between(&self.start, &now);
        let full = kernel::maps::sum(&self.stats, STAT_PROCS_FULL);
        self.out.finish(
            lost,
            || {
                serde_json::json!({
                    "totals": check, "reasons": reasons, "procs_full": full,
                })
            },
            || {
                let mut text = format!("total: {}", check.line());
                if !reasons.is_empty() {
                    text += &format!("\n{:<24}{COLUMNS}", "REASON");
                }
                for row in &reasons {
                    text += &format!("\n{:<24}{}", row.reason, row.tally.columns());
                }
                Some(text)
            },
            || Some(output::blind_spots(&[(full, "migrations not counted per process (process map full)")])),
        )
    }
}

impl Live {
    /// The report since the last one; unless `always`, only when something migrated.
    fn report(&mut self, always: bool) -> Result<()> {
        let now = self.read()?;
        let (reasons, check) = self.between(&self.last, &now);
        let changed = now != self.last;
        self.last = now;
        let report = Report { check, reasons, processes: self.processes() };
        if !always && !changed && report.processes.is_empty() {
            return Ok(());
        }
        self.out.interval(
            |time| {
                #[derive(Serialize)]
                struct Row<'a> {
                    time: String,
                    #[serde(flatten)]
                    report: &'a Report,
                }
                Row { time, report: &report }
            },
            || Live::table(&report),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT_5_10: &str = "format:
\tfield:unsigned long succeeded;\toffset:8;\tsize:8;\tsigned:0;
\tfield:unsigned long failed;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned long thp_succeeded;\toffset:24;\tsize:8;\tsigned:0;
\tfield:unsigned long thp_failed;\toffset:32;\tsize:8;\tsigned:0;
\tfield:unsigned long thp_split;\toffset:40;\tsize:8;\tsigned:0;
\tfield:enum migrate_mode mode;\toffset:48;\tsize:4;\tsigned:0;
\tfield:int reason;\toffset:52;\tsize:4;\tsigned:1;
";

    #[test]
    fn a_field_the_kernel_lacks_is_left_out() {
        let offsets = offsets(&Format::parse("migrate:mm_migrate_pages", FORMAT_5_10)).unwrap();
        assert_eq!(offsets.counts[..LARGE_SPLIT], [8, 16, 24, 32, 40]);
        assert_eq!(offsets.counts[LARGE_SPLIT], FIELD_ABSENT);
        assert_eq!(offsets.counts[CALLS], FIELD_ABSENT);
        assert_eq!(offsets.reason, 52);
    }

    #[test]
    fn a_layout_it_cannot_read_is_refused_in_one_line() {
        let narrow = FORMAT_5_10.replace("offset:8;\tsize:8;", "offset:8;\tsize:4;");
        let err = offsets(&Format::parse("migrate:mm_migrate_pages", &narrow)).unwrap_err().to_string();
        assert_eq!(
            err,
            "migrate:mm_migrate_pages's succeeded is 4 bytes, not 8: this kernel's layout is not supported"
        );
    }
}
