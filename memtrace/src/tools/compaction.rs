//! compaction: one line per compaction of a zone (as bcc's compactsnoop): who compacted, on
//! which node and zone, for which order, how long it took, how it ended, and what kind of run
//! it was.

use anyhow::Result;
use memtrace_common::compaction::{self, Event, Offsets, UNKNOWN};
use memtrace_common::names;
use serde::Serialize;

use crate::{
    kernel::{
        self, AttachPoint, Probe,
        cgroup::{Attribution, MemcgPaths},
        tracefs::{Format, Symbols},
    },
    output::{self, events::Events},
    tools::registry::{Plan, ToolSpec},
    tools::tracer::Tracer,
    tools::{self, CommonArgs, args::Timestamp, c_str},
};

const OBJECT: crate::kernel::Object = crate::ebpf_object!("compaction");

const CATEGORY: &str = "compaction";
const BEGIN: &str = "mm_compaction_begin";
const FINISHED: &str = "mm_compaction_finished";
const END: &str = "mm_compaction_end";

/// How compaction attaches, as `memtrace probe` reports it.
pub const ATTACH: &[AttachPoint] = &[AttachPoint {
    label: "tracepoints compaction:mm_compaction_begin/finished/end",
    probes: &[
        Probe::Tracepoint { prog: "compaction_begin", category: CATEGORY, names: &[BEGIN] },
        Probe::Tracepoint { prog: "compaction_finished", category: CATEGORY, names: &[FINISHED] },
        Probe::Tracepoint { prog: "compaction_end", category: CATEGORY, names: &[END] },
    ],
}];

pub const SPEC: ToolSpec = ToolSpec {
    names: memtrace_common::compaction::names::ALL,
    name: "compaction",
    object: OBJECT,
    modes: &[("compaction", Plan::Points(ATTACH))],
    optional: &[],
};

/// Trace memory compaction: each zone compacted, with latency and result.
#[derive(clap::Args, Debug)]
#[command(after_help = "KIND: direct (an allocation compacting for itself), kcompactd (the node's \
                        compaction thread, for an order), proactive (kcompactd keeping fragmentation low), \
                        manual (a write to /proc/sys/vm/compact_memory or a node's compact file, in the \
                        writer's context).")]
pub struct Args {
    #[command(flatten)]
    pub timestamp: Timestamp,
    #[command(flatten)]
    pub common: CommonArgs,
}

impl Args {
    /// Everything that can be checked before loading anything (and without root).
    pub fn validate(&self) -> Result<()> {
        self.common.validate()?;
        self.timestamp.validate()
    }
}

pub async fn run(args: Args) -> Result<()> {
    kernel::require_root()?;
    let filter = args.common.filter()?;
    let (begin, finished, end) =
        (Format::read(CATEGORY, BEGIN)?, Format::read(CATEGORY, FINISHED)?, Format::read(CATEGORY, END)?);
    let offsets = Offsets {
        zone_start: begin.offset("zone_start")?,
        zone_end: begin.offset("zone_end")?,
        sync: begin.offset("sync")?,
        status: end.offset("status")?,
        nid: finished.offset("nid")?,
        zone: finished.offset_of_any(&["idx", "zone"])?,
        order: finished.offset("order")?,
        _pad: 0,
    };
    let mut tracer = Tracer::load(&SPEC, |loader| {
        loader.override_global(names::FILTER, &filter, true).override_global(
            compaction::names::OFFSETS,
            &offsets,
            true,
        );
    })?;
    tracer.attach(ATTACH)?;
    let header = format!(
        "{:<16} {:>7} {:>4} {:<8} {:>5} {:<9} {:>9} {:<18} {}",
        "COMM", "PID", "NODE", "ZONE", "ORDER", "KIND", "LAT(ms)", "STATUS", "CGROUP"
    );
    let mut state = Live {
        out: Events::new(args.common.run.json, args.timestamp.timestamp, header),
        zones: finished.symbols("idx"),
        statuses: end.symbols("status"),
        cgroups: MemcgPaths::new(),
    };
    tracer.stream(&args.common, None, None, "tracing compaction", &mut state).await?;
    Ok(())
}

/// What kind of run a compaction is. The kernel compacts a whole zone (order -1) when asked
/// through compact_memory or a node's compact file, in the writer's context, and when
/// kcompactd compacts proactively; any other compaction is for an allocation's order.
pub fn kind(comm: &str, order: i32) -> &'static str {
    let kcompactd = comm.starts_with("kcompactd");
    match (kcompactd, order == -1) {
        (true, true) => "proactive",
        (true, false) => "kcompactd",
        (false, true) => "manual",
        (false, false) => "direct",
    }
}

struct Live {
    out: Events,
    /// The running kernel's names of zones and of compaction results.
    zones: Symbols,
    statuses: Symbols,
    cgroups: MemcgPaths,
}

#[derive(Serialize)]
struct Compaction {
    time: String,
    /// Seconds since tracing started, when the compaction began.
    ts_s: f64,
    pid: u32,
    tid: u32,
    comm: String,
    kind: &'static str,
    node: Option<i32>,
    zone: Option<String>,
    /// -1: the whole zone (not for an allocation).
    order: Option<i32>,
    sync: bool,
    latency_ms: f64,
    latency_ns: u64,
    status: String,
    status_code: i32,
    /// The memory cgroup of the task that ran the compaction, read at its end.
    #[serde(flatten)]
    cgroup: Attribution,
    /// Its kernfs id (inode number in the memory hierarchy).
    cgroup_id: u64,
    zone_start_pfn: u64,
    zone_end_pfn: u64,
}

impl Live {
    fn decode(&mut self, e: &Event) -> Compaction {
        let known = |v: i32| (v != UNKNOWN).then_some(v);
        let comm = c_str(&e.comm);
        Compaction {
            time: output::now_ms(),
            ts_s: self.out.secs(e.start_ns),
            pid: e.pid,
            tid: e.tid,
            kind: kind(&comm, e.order),
            comm,
            node: known(e.nid),
            zone: known(e.zone).map(|z| self.zones.get(z.into()).map_or_else(|| format!("zone{z}"), str::to_string)),
            order: known(e.order),
            sync: e.sync != 0,
            latency_ms: e.latency_ns as f64 / 1e6,
            latency_ns: e.latency_ns,
            status: self.statuses.get(e.status.into()).map_or_else(|| format!("status{}", e.status), str::to_string),
            status_code: e.status,
            cgroup: self.cgroups.attribution_of_id(e.cgroup_id),
            cgroup_id: e.cgroup_id,
            zone_start_pfn: e.zone_start,
            zone_end_pfn: e.zone_end,
        }
    }
}

impl tools::Stream for Live {
    type Side = ();

    fn event(&mut self, data: &[u8]) -> Result<()> {
        let Some(e) = tools::read_event::<Event>(data) else { return Ok(()) };
        let c = self.decode(&e);
        let shown = |v: Option<String>| v.unwrap_or_else(|| "?".into());
        self.out.record(
            e.start_ns,
            || &c,
            || {
                format!(
                    "{:<16} {:>7} {:>4} {:<8} {:>5} {:<9} {:>9.3} {:<18} {}",
                    c.comm,
                    c.pid,
                    shown(c.node.map(|n| n.to_string())),
                    shown(c.zone.clone()),
                    shown(c.order.map(|o| o.to_string())),
                    c.kind,
                    c.latency_ms,
                    c.status,
                    c.cgroup.short()
                )
            },
        )
    }

    fn finish(&mut self, lost: u64) -> Result<()> {
        let compactions = self.out.count;
        self.out.finish(lost, serde_json::json!({ "compactions": compactions }))
    }
}

#[cfg(test)]
mod tests {
    use super::kind;

    #[test]
    fn kinds_follow_the_thread_and_the_order() {
        assert_eq!(kind("kcompactd0", 9), "kcompactd");
        assert_eq!(kind("kcompactd1", -1), "proactive");
        assert_eq!(kind("sh", -1), "manual");
        assert_eq!(kind("python3", 4), "direct");
    }
}
