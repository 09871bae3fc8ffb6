//! What mallocstat's hits mean (by probe name, after glibc's manual/probes.texi) and how they
//! are reported: per-probe counts and sizes, the stacks of heap growth, and each event.

use std::{collections::BTreeMap, fmt::Write as _};

use anyhow::Result;
use memtrace_common::mallocstat::{STAT_NO_SPEC, STAT_STACK_COLLISION, STAT_STACK_LOST};
use serde::Serialize;

use super::Live;
use crate::{
    kernel::cgroup::Attribution,
    output,
    symbolize::Frame,
    tools::{
        c_str,
        stack_report::{ShowsFrames, StackReport},
        stacks,
    },
};

/// What a probe's hits mean, by its name (glibc's manual/probes.texi).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Meaning {
    /// Argument `.0` is an amount of bytes: summed (sbrk growth, a new heap's size).
    Bytes(usize),
    /// Argument `.0` is a heap's size after the change: the last one is kept.
    Size(usize),
    /// Printed as it happens, with its arguments (tunables, retries, double frees).
    Event,
    /// Counted only.
    Count,
}

/// (name, meaning, whether a hit takes the user stack) of the probes glibc 2.26-2.40 declares.
const KNOWN: &[(&str, Meaning, bool)] = &[
    ("memory_sbrk_more", Meaning::Bytes(1), true),
    ("memory_sbrk_less", Meaning::Bytes(1), false),
    ("memory_heap_new", Meaning::Bytes(1), true),
    ("memory_heap_free", Meaning::Bytes(1), false),
    ("memory_heap_more", Meaning::Size(1), true),
    ("memory_heap_less", Meaning::Size(1), false),
    ("memory_arena_new", Meaning::Bytes(1), true),
    ("memory_arena_reuse", Meaning::Count, false),
    ("memory_arena_reuse_free_list", Meaning::Count, false),
    ("memory_arena_reuse_wait", Meaning::Count, false),
];

pub(super) fn meaning(name: &str) -> (Meaning, bool) {
    if let Some((_, m, stack)) = KNOWN.iter().find(|(n, ..)| *n == name) {
        return (*m, *stack);
    }
    // Tunables, retries and tcache double frees: rare, and each worth seeing.
    let events = ["memory_mallopt", "memory_tunable_", "_retry", "memory_tcache_double_free"];
    if events.iter().any(|e| name.starts_with(e) || name.ends_with(e)) {
        (Meaning::Event, false)
    } else {
        (Meaning::Count, false)
    }
}

/// Hits of one probe.
#[derive(Serialize, Clone, Default)]
pub(super) struct Hits {
    hits: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes: Option<u64>,
    /// The heap's size after its last change.
    #[serde(skip_serializing_if = "Option::is_none")]
    last_size: Option<u64>,
}

impl Hits {
    pub(super) fn add(&mut self, meaning: Meaning, args: &[i64]) {
        self.hits += 1;
        match meaning {
            Meaning::Bytes(i) => *self.bytes.get_or_insert(0) += args[i] as u64,
            Meaning::Size(i) => self.last_size = Some(args[i] as u64),
            Meaning::Event | Meaning::Count => {}
        }
    }
}

#[derive(Serialize)]
struct Counts<'a> {
    hits: u64,
    probes: &'a BTreeMap<String, Hits>,
}

#[derive(Serialize)]
struct StackRow {
    pid: u32,
    comm: String,
    probe: String,
    #[serde(flatten)]
    hits: Hits,
    stack_id: Option<String>,
    #[serde(flatten)]
    cgroup: Attribution,
    frames: Vec<Frame>,
}

impl ShowsFrames for StackRow {
    fn shown_frames(&self) -> impl Iterator<Item = &Frame> {
        self.frames.iter()
    }
}

#[derive(Serialize)]
struct BlindSpots {
    /// Hits at an address without a spec: a probe the process mapped elsewhere.
    unknown_sites: u64,
}

#[derive(Serialize)]
pub(super) struct HitEvent<'a> {
    pub(super) event: &'a str,
    pub(super) pid: u32,
    pub(super) tid: u32,
    pub(super) comm: String,
    pub(super) probe: &'a str,
    pub(super) args: &'a [i64],
    #[serde(flatten)]
    pub(super) cgroup: &'a Attribution,
}

impl Live {
    pub(super) fn report(&mut self, is_final: bool) -> Result<()> {
        let cgroup = self.cgroup(self.pid);
        let counts = if is_final { &self.total } else { &self.interval };
        let counts = Counts { hits: counts.values().map(|h| h.hits).sum(), probes: counts };
        let mut rows: Vec<_> = self.stacks.iter().collect();
        rows.sort_by(|a, b| b.1.0.hits.cmp(&a.1.0.hits).then_with(|| a.0.cmp(b.0)));
        let shown = self.run.shown(is_final);
        let stack_rows: Vec<StackRow> = rows
            .iter()
            .take(shown)
            .map(|((pid, probe, id), (hits, comm))| StackRow {
                cgroup: cgroup.clone(),
                pid: *pid,
                comm: c_str(comm),
                probe: probe.clone(),
                hits: hits.clone(),
                stack_id: stacks::id_json(*id),
                frames: self.run.stacks.user(*pid, *id, false),
            })
            .collect();
        let folded =
            stack_rows.iter().map(|s| (output::process_root(s.pid, &s.comm), s.frames.as_slice(), s.hits.hits));
        let chart = output::svg::Chart { title: "mallocstat: allocator probe hits", unit: "hits" };
        self.run.write_flame_graphs(is_final, &chart, folded)?;
        let samples: Vec<output::pprof::Sample> = stack_rows
            .iter()
            .map(|s| output::pprof::Sample {
                pid: s.pid,
                process: output::process_root(s.pid, &s.comm),
                frames: &s.frames,
                values: vec![s.hits.hits as i64],
            })
            .collect();
        self.run.write_pprof(is_final, &[("hits", "count")], &samples)?;
        let run = &self.run;
        let stacks_lost = run.stat(STAT_STACK_LOST) + run.stat(STAT_STACK_COLLISION);
        let blind_spots = BlindSpots { unknown_sites: run.stat(STAT_NO_SPEC) };
        run.report(is_final, counts, stack_rows, stacks_lost, blind_spots, render)?;
        self.interval.clear();
        Ok(())
    }
}

fn render(r: &StackReport<Counts<'_>, StackRow, BlindSpots>) -> String {
    let mut out = format!("{}{} libc:memory_* probe hits\n", r.title(), r.counts.hits);
    if !r.counts.probes.is_empty() {
        let _ = writeln!(out, "  {:<36} {:>8} {:>12} {:>12}", "PROBE", "HITS", "BYTES", "LAST SIZE");
    }
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    for (name, h) in r.counts.probes {
        let _ = writeln!(out, "  {name:<36} {:>8} {:>12} {:>12}", h.hits, opt(h.bytes), opt(h.last_size));
    }
    for s in &r.stacks {
        let bytes = s.hits.bytes.map(|b| format!(", {b} bytes")).unwrap_or_default();
        let (hits, probe, pid, comm, cgroup) = (s.hits.hits, &s.probe, s.pid, &s.comm, s.cgroup.short());
        let _ = writeln!(out, "  {hits} x {probe}{bytes}: pid {pid} ({comm}) cgroup {cgroup}");
        output::write_stack(&mut out, &s.frames, "      ");
    }
    let (store_full, store) = r.store_full();
    out += &r.blind_spots_line(&[
        (r.stacks_lost, "heap growths without a stack"),
        (store_full, &store),
        (r.blind_spots.unknown_sites, "hits at probe sites not set up"),
    ]);
    out
}
