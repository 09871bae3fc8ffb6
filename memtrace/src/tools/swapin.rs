//! swapin: swap-ins per process per interval (like bcc's swapin), optionally per user stack.
//! A kprobe on the function that reads from swap; the counts live in the kernel and are read
//! and cleared each interval.

use anyhow::{Result, bail};
use aya::maps::{HashMap, MapData, PerCpuArray};
use memtrace_common::names;
use memtrace_common::swapin::{Config, NewStack, STAT_COUNTS_FULL, STAT_STACK_LOST, SwapKey};
use serde::Serialize;

use crate::{
    kernel::{
        self, AttachPoint, Probe,
        cgroup::{Attribution, MemcgPaths},
    },
    output::{self, reports::ReportPrinter},
    symbolize::{Frame, UnnamedFrames},
    tools::registry::{Plan, ToolSpec},
    tools::tracer::Tracer,
    tools::{
        self, CommonArgs,
        args::{Reports, Timestamp},
        c_str, read_event,
        stacks::{StackStore, Stacks},
    },
    unwind::Unwinder,
};

const OBJECT: crate::kernel::Object = crate::ebpf_object!("swapin", walking_user_stacks);

pub const SPEC: ToolSpec = ToolSpec {
    names: memtrace_common::swapin::names::ALL,
    name: "swapin",
    object: OBJECT,
    modes: &[("swapin", Plan::Points(ATTACH))],
    optional: &[],
};

/// No tracepoint fires on swap-in (6.1 to 6.18), so a kernel without kprobes cannot run this.
pub const ATTACH: &[AttachPoint] = &[AttachPoint {
    label: "kprobe swap_read_folio/swap_readpage",
    // Renamed from swap_readpage in 6.10.
    probes: &[Probe::Kprobe { prog: "swapin_read", funcs: &["swap_read_folio", "swap_readpage"] }],
}];

/// Count swap-ins per process (and per user stack with --stack).
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub reports: Reports,
    #[command(flatten)]
    pub timestamp: Timestamp,
    /// Also count per user stack of the task that swapped in.
    #[arg(long)]
    pub stack: bool,
    #[command(flatten)]
    pub unwind: tools::args::UnwindArgs,
    #[command(flatten)]
    pub common: CommonArgs,
}

impl Args {
    /// Everything that can be checked before loading anything (and without root).
    pub fn validate(&self) -> Result<()> {
        self.reports.validate()?;
        self.timestamp.validate()?;
        self.unwind.validate()?;
        // A kernel thread has no user stack to show.
        if self.stack { self.common.validate_user_target() } else { self.common.validate() }
    }
}

pub async fn run(args: Args) -> Result<()> {
    kernel::require_root()?;
    let filter = args.common.filter()?;
    if let Err(why) = kernel::resolve(&ATTACH[0]) {
        bail!("swapin needs a kprobe on swap_read_folio/swap_readpage and {why}; no tracepoint reports swap-ins");
    }
    let config = Config { stacks: args.stack.into(), _pad: 0 };
    let mut tracer = Tracer::load(&SPEC, |loader| {
        loader.override_global(names::FILTER, &filter, true).override_global(
            memtrace_common::swapin::names::CONFIG,
            &config,
            true,
        );
        args.unwind.configure(loader);
    })?;
    let unwinder = args.unwind.start(&mut tracer.bpf, &args.common)?;
    let how = tracer.attach(ATTACH)?;
    let counts = tracer.map(memtrace_common::swapin::names::COUNTS)?;
    let stats = tracer.map(memtrace_common::swapin::names::STATS)?;
    let mut stacks = Stacks::new(StackStore::take(&mut tracer.bpf, None)?, false)?;
    stacks.unwinder = Some(unwinder);
    if let Some(pid) = args.common.target.pid {
        stacks.watch(pid);
    }
    let out = ReportPrinter::new("swapin", args.common.run.json).with_timestamp(args.timestamp.timestamp);
    let unnamed = UnnamedFrames::default();
    let cgroups = MemcgPaths::new();
    let mut state =
        Live { args: &args, counts, stats, stacks, total: 0, seen: Default::default(), unnamed, cgroups, out };
    let ready = format!("counting swap-ins ({how})");
    let tick = Some(args.reports.every_or(1));
    tracer.stream(&args.common, tick, args.reports.count(), &ready, &mut state).await?;
    Ok(())
}

struct Live<'a> {
    args: &'a Args,
    counts: HashMap<MapData, SwapKey, u64>,
    stats: PerCpuArray<MapData, u64>,
    stacks: Stacks,
    total: u64,
    /// The cumulative counts at the last report: each report shows the increase.
    seen: std::collections::HashMap<SwapKey, u64>,
    /// The frames the reports showed so far, and those without a name.
    unnamed: UnnamedFrames,
    /// Processes' memory cgroups, from /proc at each report (swap-ins are counted per
    /// process in the kernel; a process gone by the report shows none).
    cgroups: MemcgPaths,
    out: ReportPrinter,
}

#[derive(Serialize)]
struct Row {
    pid: u32,
    comm: String,
    count: u64,
    #[serde(flatten)]
    cgroup: Attribution,
    #[serde(skip_serializing_if = "Option::is_none")]
    stack: Option<Vec<Frame>>,
}

impl Live<'_> {
    /// The swap-ins since the last report. The kernel side only ever adds to its counters;
    /// deleting a row it may be adding to would lose the increment, so the interval's figure
    /// is the difference from the previous read.
    fn drain(&mut self) -> Vec<Row> {
        let mut rows: Vec<Row> = Vec::new();
        for (key, now) in crate::kernel::maps::dump(&self.counts) {
            let before = self.seen.insert(key, now).unwrap_or(0);
            let count = now.saturating_sub(before);
            if count == 0 {
                continue;
            }
            let stack = self.args.stack.then(|| self.stacks.user(key.pid, key.stack_id, true));
            let cgroup = self.cgroups.attribution_of_pid(key.pid);
            rows.push(Row { pid: key.pid, comm: c_str(&key.comm), count, cgroup, stack });
        }
        rows.sort_by(|a, b| b.count.cmp(&a.count).then(a.pid.cmp(&b.pid)));
        self.total += rows.iter().map(|r| r.count).sum::<u64>();
        rows
    }

    fn stat(&self, index: u32) -> u64 {
        crate::kernel::maps::sum(&self.stats, index)
    }

    fn report(&mut self, rows: Vec<Row>) -> Result<()> {
        self.unnamed += UnnamedFrames::of(rows.iter().flat_map(|r| r.stack.iter().flatten()));
        self.out.interval(
            |time| serde_json::json!({ "time": time, "swapins": rows }),
            || {
                let mut text = format!("{:<16} {:>7} {:>8} CGROUP\n", "COMM", "PID", "COUNT");
                for row in &rows {
                    text += &format!("{:<16} {:>7} {:>8} {}\n", row.comm, row.pid, row.count, row.cgroup.short());
                    if let Some(frames) = &row.stack {
                        output::write_stack(&mut text, frames, "    ");
                    }
                }
                text
            },
        )
    }
}

impl tools::Stream for Live<'_> {
    type Side = ();

    fn unwinder(&mut self) -> Option<&mut Unwinder> {
        self.stacks.unwinder.as_mut()
    }

    fn event(&mut self, data: &[u8]) -> Result<()> {
        // Symbolize a new stack while its process lives; the result is cached.
        if let Some(new) = read_event::<NewStack>(data) {
            let _ = self.stacks.user(new.pid, new.stack_id, true);
            self.cgroups.of_pid(new.pid);
        }
        Ok(())
    }

    fn tick(&mut self) -> Result<()> {
        let rows = self.drain();
        self.report(rows)?;
        self.stacks.forget_exited();
        Ok(())
    }

    fn finish(&mut self, lost: u64) -> Result<()> {
        // Swap-ins since the last tick belong to the run too.
        let rows = self.drain();
        if !rows.is_empty() {
            self.report(rows)?;
        }
        let (full, stacks_lost) = (self.stat(STAT_COUNTS_FULL), self.stat(STAT_STACK_LOST));
        let (cut, unnamed) = (self.stacks.cut(), self.unnamed);
        self.out.finish(
            lost,
            || {
                serde_json::json!({
                    "total": self.total, "counts_full": full, "stacks_lost": stacks_lost, "cut_stacks": cut,
                    "unnamed_frames": unnamed,
                })
            },
            || None,
            || {
                let spots = [(full, "swap-ins not counted (map full)"), (stacks_lost, "swap-ins without a stack")];
                Some(output::stack_blind_spots(&spots, &cut, &unnamed))
            },
        )
    }
}
