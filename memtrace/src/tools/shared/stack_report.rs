//! What the tools that count per stack in the kernel and report per interval (brkstack, faults)
//! share past their probes: the stack store and its walks, the kernel's counters, the printers,
//! `--folded`, `--pprof` and `--svg`, and the report's frame (its end, its lost events and stacks, the stack store).

use std::path::PathBuf;

use anyhow::Result;
use aya::maps::{MapData, PerCpuArray};
use serde::Serialize;

use super::{
    Stream,
    args::StackReportArgs,
    stacks::{StackStore, Stacks, write_folded},
    tracer::Tracer,
};
use crate::{
    output::{self, events::Events, reports::ReportPrinter},
    symbolize::{Frame, UnnamedFrames},
    unwind::{CutStacks, Unwinder},
};

/// A row of a tool's report: the frames it shows, counted for the report's blind spots.
pub trait ShowsFrames {
    fn shown_frames(&self) -> impl Iterator<Item = &Frame>;
}

pub struct StackRun {
    top: usize,
    folded: Option<PathBuf>,
    pprof: Option<PathBuf>,
    svg: Option<PathBuf>,
    pid: Option<u32>,
    stats: PerCpuArray<MapData, u64>,
    pub stacks: Stacks,
    /// Events lost on the ring buffer: known only at the end.
    lost: Option<u64>,
    /// `--events`: each call or fault as it happens.
    pub events: Events,
    out: ReportPrinter,
}

impl StackRun {
    /// After attach: the stack store and the `STATS` counters, walked with `unwinder` (started
    /// before attach, so that the first captures get whole stacks). `kernel`: kernel stacks
    /// too. `header`: the `--events` table's columns.
    pub fn new(
        tracer: &mut Tracer,
        args: &StackReportArgs,
        unwinder: Unwinder,
        kernel: bool,
        header: String,
    ) -> Result<StackRun> {
        let stats = tracer.map(memtrace_common::names::STATS)?;
        let mut stacks = Stacks::new(StackStore::take(&mut tracer.bpf, Some("--max-stacks"))?, kernel)?;
        stacks.unwinder = Some(unwinder);
        if let Some(pid) = args.common.target.pid {
            stacks.watch(pid);
        }
        let json = args.common.run.json;
        Ok(StackRun {
            top: args.top.get(),
            folded: args.folded.clone(),
            pprof: args.pprof.clone(),
            svg: args.svg.clone(),
            pid: args.common.target.pid,
            stats,
            stacks,
            lost: None,
            events: Events::new(json, false, header),
            out: ReportPrinter::new(tracer.spec.name, json),
        })
    }

    /// Events lost on the ring buffer, for the final report.
    pub fn set_lost(&mut self, lost: u64) {
        self.lost = Some(lost);
    }

    pub fn stat(&self, index: u32) -> u64 {
        crate::kernel::maps::sum(&self.stats, index)
    }

    /// Rows per table (`-T`).
    pub fn top(&self) -> usize {
        self.top
    }

    /// How many of the sorted stacks a report symbolizes: all for the final one's `--folded`,
    /// `--pprof` and `--svg`.
    pub fn shown(&self, is_final: bool) -> usize {
        let files = self.folded.is_some() || self.pprof.is_some() || self.svg.is_some();
        if is_final && files { usize::MAX } else { self.top }
    }

    /// Writes the final report's stacks to the `--pprof` file, if any; `sample_types` are
    /// pprof's (type, unit) pairs, the last shown by default.
    pub fn write_pprof(
        &self,
        is_final: bool,
        sample_types: &[(&str, &str)],
        samples: &[output::pprof::Sample<'_>],
    ) -> Result<()> {
        match self.pprof.as_deref().filter(|_| is_final) {
            Some(path) => {
                let mapping = |pid, addr| self.stacks.mapping(pid, addr);
                output::pprof::write(path, sample_types, samples, &output::pprof::Notes::default(), mapping)
            }
            None => Ok(()),
        }
    }

    /// Writes the final report's stacks (root, frames, the value `chart` names) to the
    /// `--folded` and `--svg` files, if any.
    pub fn write_flame_graphs<'a>(
        &self,
        is_final: bool,
        chart: &output::svg::Chart<'_>,
        stacks: impl Iterator<Item = (String, &'a [Frame], u64)> + Clone,
    ) -> Result<()> {
        if !is_final {
            return Ok(());
        }
        if let Some(path) = &self.folded {
            write_folded(path, stacks.clone())?;
        }
        if let Some(path) = &self.svg {
            output::svg::write(path, chart, stacks)?;
        }
        Ok(())
    }

    /// Prints a report of `counts` and the top `stacks`, with the tool's blind-spot counts
    /// `blind_spots`; `table` renders it after its `[TIME] `.
    pub fn report<C: Serialize, S: Serialize + ShowsFrames, B: Serialize>(
        &self,
        is_final: bool,
        counts: C,
        mut stacks: Vec<S>,
        stacks_lost: u64,
        blind_spots: B,
        table: impl FnOnce(&StackReport<C, S, B>) -> String,
    ) -> Result<()> {
        stacks.truncate(self.top);
        let unnamed_frames = UnnamedFrames::of(stacks.iter().flat_map(ShowsFrames::shown_frames));
        let value = |time| StackReport {
            time,
            is_final,
            pid: self.pid,
            counts,
            stacks,
            events_lost: self.lost,
            stacks_lost,
            cut_stacks: self.stacks.cut(),
            unnamed_frames,
            blind_spots,
            stack_store_full: self.stacks.store.full(),
            stack_store_capacity: self.stacks.store.capacity(),
        };
        self.out.titled(value, table).map(drop)
    }
}

#[derive(Serialize)]
pub struct StackReport<C, S, B> {
    time: String,
    #[serde(rename = "final")]
    is_final: bool,
    pid: Option<u32>,
    /// The tool's totals.
    #[serde(flatten)]
    pub counts: C,
    pub stacks: Vec<S>,
    #[serde(skip_serializing_if = "Option::is_none")]
    events_lost: Option<u64>,
    pub stacks_lost: u64,
    /// How the user stacks' walks ended.
    cut_stacks: CutStacks,
    /// The frames of the stacks shown, and those without a function name by cause.
    unnamed_frames: UnnamedFrames,
    /// The tool's own blind spots.
    #[serde(flatten)]
    pub blind_spots: B,
    /// Stacks the stack store had no room for, and its capacity (`--max-stacks`).
    stack_store_full: u64,
    stack_store_capacity: u32,
}

impl<C, S, B> StackReport<C, S, B> {
    /// What the table's title starts with.
    pub fn title(&self) -> &'static str {
        if self.is_final { "final report: " } else { "" }
    }

    /// The stack store's blind-spot entry.
    pub fn store_full(&self) -> (u64, String) {
        (self.stack_store_full, output::stack_store_full(self.stack_store_capacity))
    }

    /// The table's last line: lost events, then the tool's own blind spots, then the walks'
    /// cuts.
    pub fn blind_spots_line(&self, own: &[(u64, &str)]) -> String {
        let lost = (self.events_lost.unwrap_or(0), "events lost (ring buffer full)");
        let all: Vec<(u64, &str)> = std::iter::once(lost).chain(own.iter().copied()).collect();
        format!("  {}", output::stack_blind_spots(&all, &self.cut_stacks, &self.unnamed_frames))
    }
}

/// A tool on `StackRun`: its events and its reports; the rest of its `Stream` is the same.
pub trait StackTool {
    fn run(&mut self) -> &mut StackRun;
    fn on_event(&mut self, data: &[u8]) -> Result<()>;
    fn report(&mut self, is_final: bool) -> Result<()>;
}

impl<T: StackTool> Stream for T {
    type Side = ();

    fn unwinder(&mut self) -> Option<&mut Unwinder> {
        self.run().stacks.unwinder.as_mut()
    }

    fn event(&mut self, data: &[u8]) -> Result<()> {
        self.on_event(data)
    }

    fn tick(&mut self) -> Result<()> {
        self.report(false)?;
        self.run().stacks.forget_exited();
        Ok(())
    }

    fn finish(&mut self, lost: u64) -> Result<()> {
        self.run().set_lost(lost);
        self.report(true)
    }
}
