//! vmscan: reclaim activity per interval (time in slab shrinking, direct and memcg reclaim,
//! kswapd wake-ups, pages written by reclaim), then latency histograms at exit.

use anyhow::{Result, bail};
use aya::maps::{MapData, PerCpuArray};
use memtrace_common::names;
use memtrace_common::vmscan::{
    HIST_SLOTS, KIND_DIRECT, KIND_MEMCG, KIND_NAMES, KIND_SLAB, KINDS, Offsets, STAT_CALLS, STAT_COUNT,
    STAT_KSWAPD_WAKEUPS, STAT_NS, STAT_PAGES_WRITTEN, STAT_RECLAIMED,
};
use serde::Serialize;

use crate::{
    kernel::{self, tracefs::Format},
    output::{self, histogram, reports::ReportPrinter},
    tools::registry::{Plan, ToolSpec},
    tools::tracer::Tracer,
    tools::{self, CommonArgs, args::Reports},
};

const OBJECT: crate::kernel::Object = crate::ebpf_object!("vmscan");

pub const SPEC: ToolSpec = ToolSpec {
    names: memtrace_common::vmscan::names::ALL,
    name: "vmscan",
    object: OBJECT,
    modes: &[("vmscan", Plan::AnyOf("tracepoints vmscan:*", "vmscan", TRACEPOINTS))],
    optional: &[],
};

/// (program, tracepoint names, newest first): kernels rename some of them.
pub const TRACEPOINTS: &[(&str, &[&str])] = &[
    ("vmscan_slab_start", &["mm_shrink_slab_start"]),
    ("vmscan_slab_end", &["mm_shrink_slab_end"]),
    ("vmscan_direct_begin", &["mm_vmscan_direct_reclaim_begin"]),
    ("vmscan_direct_end", &["mm_vmscan_direct_reclaim_end"]),
    ("vmscan_memcg_begin", &["mm_vmscan_memcg_reclaim_begin"]),
    ("vmscan_memcg_end", &["mm_vmscan_memcg_reclaim_end"]),
    ("vmscan_kswapd", &["mm_vmscan_wakeup_kswapd"]),
    ("vmscan_write", &["mm_vmscan_write_folio", "mm_vmscan_writepage"]),
];

/// Summarize reclaim per interval, with latency histograms at exit.
#[derive(clap::Args, Debug)]
#[command(after_help = "Times are summed over CPUs; a reclaim is counted in the interval where it ends.")]
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
    let offsets = Offsets {
        direct_end_reclaimed: reclaimed_offset("mm_vmscan_direct_reclaim_end")?,
        memcg_end_reclaimed: reclaimed_offset("mm_vmscan_memcg_reclaim_end")?,
    };
    let mut tracer = Tracer::load(&SPEC, |loader| {
        loader.override_global(names::FILTER, &filter, true).override_global(
            memtrace_common::vmscan::names::OFFSETS,
            &offsets,
            true,
        );
    })?;
    let mut attached = Vec::new();
    for &(prog, names) in TRACEPOINTS {
        match kernel::tracepoint_name("vmscan", names) {
            Ok(name) => {
                kernel::attach_tracepoint(&mut tracer.bpf, prog, "vmscan", name)?;
                attached.push(name);
            }
            Err(why) => tracing::warn!("vmscan: {why}: its column stays 0"),
        }
    }
    if attached.is_empty() {
        bail!("this kernel has none of the vmscan tracepoints (CONFIG_TRACEPOINTS off?)");
    }
    let every = args.reports.every_or(1);
    let mut state = Live {
        interval: every.as_secs(),
        stats: tracer.map(memtrace_common::vmscan::names::STATS)?,
        hist: tracer.map(memtrace_common::vmscan::names::HIST)?,
        last: [0; STAT_COUNT as usize],
        rows: 0,
        out: ReportPrinter::new("vmscan", args.common.run.json),
    };
    let ready = format!("tracing reclaim ({} tracepoints), one row every {} s", attached.len(), every.as_secs());
    let count = args.reports.count();
    tracer.stream(&args.common, Some(every), count, &ready, &mut state).await?;
    Ok(())
}

/// Offset of `nr_reclaimed` in an end tracepoint; 0 (never read) when the kernel lacks it.
fn reclaimed_offset(name: &str) -> Result<u32> {
    if !kernel::tracefs::exists("vmscan", name) {
        return Ok(0);
    }
    Format::read("vmscan", name)?.offset("nr_reclaimed")
}

struct Live {
    interval: u64,
    stats: PerCpuArray<MapData, u64>,
    hist: PerCpuArray<MapData, u64>,
    /// Totals at the previous row.
    last: [u64; STAT_COUNT as usize],
    /// Rows so far: a table's header comes again every 20.
    rows: u64,
    out: ReportPrinter,
}

/// The table's header, repeated every 20 rows.
const HEADER: &str = "TIME       S-SLABms  D-RECLAIMms  M-RECLAIMms  M-RECLAIMS  KSWAPD  WRITEPAGE\n";

/// Activity over a span of time: one interval, or the whole run.
#[derive(Serialize)]
struct Activity {
    slab_ms: f64,
    slab_calls: u64,
    direct_reclaim_ms: f64,
    direct_reclaim_calls: u64,
    direct_reclaim_pages: u64,
    memcg_reclaim_ms: f64,
    memcg_reclaim_calls: u64,
    memcg_reclaim_pages: u64,
    kswapd_wakeups: u64,
    pages_written: u64,
}

impl Activity {
    fn from(counts: &[u64; STAT_COUNT as usize]) -> Activity {
        let at = |kind: u32, stat: u32| counts[(kind * 3 + stat) as usize];
        let ms = |kind: u32| at(kind, STAT_NS) as f64 / 1e6;
        Activity {
            slab_ms: ms(KIND_SLAB),
            slab_calls: at(KIND_SLAB, STAT_CALLS),
            direct_reclaim_ms: ms(KIND_DIRECT),
            direct_reclaim_calls: at(KIND_DIRECT, STAT_CALLS),
            direct_reclaim_pages: at(KIND_DIRECT, STAT_RECLAIMED),
            memcg_reclaim_ms: ms(KIND_MEMCG),
            memcg_reclaim_calls: at(KIND_MEMCG, STAT_CALLS),
            memcg_reclaim_pages: at(KIND_MEMCG, STAT_RECLAIMED),
            kswapd_wakeups: counts[STAT_KSWAPD_WAKEUPS as usize],
            pages_written: counts[STAT_PAGES_WRITTEN as usize],
        }
    }
}

impl Live {
    fn totals(&self) -> [u64; STAT_COUNT as usize] {
        std::array::from_fn(|i| crate::kernel::maps::sum(&self.stats, i as u32))
    }

    fn histogram(&self, kind: u32) -> Vec<u64> {
        (0..HIST_SLOTS).map(|slot| crate::kernel::maps::sum(&self.hist, kind * HIST_SLOTS + slot)).collect()
    }
}

impl tools::Stream for Live {
    type Side = ();

    fn event(&mut self, _data: &[u8]) -> Result<()> {
        Ok(())
    }

    fn tick(&mut self) -> Result<()> {
        let now = self.totals();
        let delta: [u64; STAT_COUNT as usize] = std::array::from_fn(|i| now[i].wrapping_sub(self.last[i]));
        self.last = now;
        let a = Activity::from(&delta);
        let header = self.rows.is_multiple_of(20);
        self.rows += 1;
        self.out.interval(
            |time| {
                #[derive(Serialize)]
                struct Row<'a> {
                    time: String,
                    interval_s: u64,
                    #[serde(flatten)]
                    activity: &'a Activity,
                }
                Row { time, interval_s: self.interval, activity: &a }
            },
            || {
                let head = if header { HEADER } else { "" };
                format!(
                    "{head}{:<8} {:>10.2} {:>12.2} {:>12.2} {:>11} {:>7} {:>10}",
                    output::hms(),
                    a.slab_ms,
                    a.direct_reclaim_ms,
                    a.memcg_reclaim_ms,
                    a.memcg_reclaim_calls,
                    a.kswapd_wakeups,
                    a.pages_written
                )
            },
        )
    }

    fn finish(&mut self, lost: u64) -> Result<()> {
        self.out.finish(
            lost,
            || {
                let totals = Activity::from(&self.totals());
                let histograms: serde_json::Map<String, serde_json::Value> = (0..KINDS)
                    .map(|k| {
                        let buckets = histogram::log2_buckets(&self.histogram(k));
                        (KIND_NAMES[k as usize].to_string(), serde_json::to_value(buckets).unwrap_or_default())
                    })
                    .collect();
                serde_json::json!({ "totals": totals, "histogram_unit": "usecs", "histograms": histograms })
            },
            || {
                let latencies = (0..KINDS).map(|kind| {
                    let hist = histogram::render_log2(&self.histogram(kind), "usecs");
                    format!("\n{} latency:\n{hist}", KIND_NAMES[kind as usize])
                });
                Some(latencies.collect::<Vec<_>>().join("\n"))
            },
            || None,
        )
    }
}
