//! drsnoop: one line per direct reclaim (with --memcg, memory-cgroup reclaim too): who
//! stalled, for how long, and how many pages it got back.

use anyhow::{Result, bail};
use memtrace_common::drsnoop::{Config, Event, KIND_NAMES};
use memtrace_common::names;
use serde::Serialize;

use crate::{
    kernel::{
        self, AttachPoint, Probe,
        cgroup::{Attribution, MemcgPaths},
        tracefs::Format,
    },
    output::{self, events::Events},
    tools::registry::{Plan, ToolSpec},
    tools::tracer::Tracer,
    tools::{self, CommonArgs, args::Timestamp, c_str},
};

const OBJECT: crate::kernel::Object = crate::ebpf_object!("drsnoop");

const DIRECT: &[AttachPoint] = &[AttachPoint {
    label: "tracepoints vmscan:mm_vmscan_direct_reclaim_begin/end",
    probes: &[
        Probe::Tracepoint {
            prog: "drsnoop_direct_begin",
            category: "vmscan",
            names: &["mm_vmscan_direct_reclaim_begin"],
        },
        Probe::Tracepoint { prog: "drsnoop_direct_end", category: "vmscan", names: &["mm_vmscan_direct_reclaim_end"] },
    ],
}];
/// How drsnoop attaches (memcg reclaim is an optional extra), as `memtrace probe` reports it.
pub const ATTACH: &[AttachPoint] = DIRECT;

const MEMCG: &[AttachPoint] = &[AttachPoint {
    label: "tracepoints vmscan:mm_vmscan_memcg_reclaim_begin/end",
    probes: &[
        Probe::Tracepoint {
            prog: "drsnoop_memcg_begin",
            category: "vmscan",
            names: &["mm_vmscan_memcg_reclaim_begin"],
        },
        Probe::Tracepoint { prog: "drsnoop_memcg_end", category: "vmscan", names: &["mm_vmscan_memcg_reclaim_end"] },
    ],
}];

pub const SPEC: ToolSpec = ToolSpec {
    names: memtrace_common::drsnoop::names::ALL,
    name: "drsnoop",
    object: OBJECT,
    modes: &[("drsnoop", Plan::Points(ATTACH))],
    optional: MEMCG[0].probes,
};

/// Trace direct reclaim: latency and pages reclaimed, one line each.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Only this thread.
    #[arg(short = 't', long = "tid", value_name = "TID")]
    pub tid: Option<u32>,
    /// Only tasks whose command name contains NAME (a substring, as bcc's -n; --comm matches
    /// the whole name).
    #[arg(short = 'n', long = "name", value_name = "NAME", conflicts_with = "comm")]
    pub name: Option<String>,
    #[command(flatten)]
    pub timestamp: Timestamp,
    /// Also trace memory-cgroup reclaim (a group at its limit), in the KIND column as "memcg".
    #[arg(long)]
    pub memcg: bool,
    #[command(flatten)]
    pub common: CommonArgs,
}

impl Args {
    /// Everything that can be checked before loading anything (and without root).
    pub fn validate(&self) -> Result<()> {
        self.common.validate()?;
        self.timestamp.validate()?;
        if let Some(name) = &self.name {
            set_name(&mut Config::default(), name)?;
        }
        if let Some(tid) = self.tid {
            check_tid(tid)?;
        }
        Ok(())
    }
}

pub async fn run(args: Args) -> Result<()> {
    kernel::require_root()?;
    let filter = args.common.filter()?;
    let mut config = Config::default();
    if let Some(name) = &args.name {
        set_name(&mut config, name)?;
    }
    if let Some(tid) = args.tid {
        check_tid(tid)?;
        config.tid = tid;
    }
    config.direct_end_reclaimed = Format::read("vmscan", "mm_vmscan_direct_reclaim_end")?.offset("nr_reclaimed")?;
    if args.memcg {
        config.memcg_end_reclaimed = Format::read("vmscan", "mm_vmscan_memcg_reclaim_end")?.offset("nr_reclaimed")?;
    }
    let mut tracer = Tracer::load(&SPEC, |loader| {
        loader.override_global(names::FILTER, &filter, true).override_global(
            memtrace_common::drsnoop::names::CONFIG,
            &config,
            true,
        );
    })?;
    tracer.attach(DIRECT)?;
    if args.memcg {
        tracer.attach(MEMCG)?;
    }
    let header =
        format!("{:<16} {:>7} {:>7} {:<6} {:>10} {:>7} {}", "COMM", "PID", "TID", "KIND", "LAT(ms)", "PAGES", "CGROUP");
    let mut state =
        Live { out: Events::new(args.common.run.json, args.timestamp.timestamp, header), cgroups: MemcgPaths::new() };
    let ready = if args.memcg { "tracing direct and memcg reclaim" } else { "tracing direct reclaim" };
    tracer.stream(&args.common, None, None, ready, &mut state).await?;
    Ok(())
}

/// `-n`: a part of a command name, which the kernel keeps to 15 bytes.
fn set_name(config: &mut Config, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 15 {
        bail!("-n takes 1 to 15 bytes (a part of the command name, which the kernel keeps to 15): {name:?}");
    }
    config.name_len = name.len() as u32;
    config.name[..name.len()].copy_from_slice(name.as_bytes());
    Ok(())
}

/// A thread id must name a live thread; it need not be a process id.
fn check_tid(tid: u32) -> Result<()> {
    if tid == 0 {
        bail!("TID must be positive");
    }
    if !std::path::Path::new(&format!("/proc/{tid}")).exists() {
        bail!("no such thread: {tid} (list threads with `ps -eLf`)");
    }
    Ok(())
}

struct Live {
    out: Events,
    cgroups: MemcgPaths,
}

#[derive(Serialize)]
struct Reclaim {
    time: String,
    /// Seconds since tracing started, when the reclaim began.
    ts_s: f64,
    pid: u32,
    tid: u32,
    comm: String,
    kind: &'static str,
    latency_ms: f64,
    latency_ns: u64,
    pages: u64,
    /// The reclaiming task's memory cgroup, read by the kernel side at the reclaim.
    #[serde(flatten)]
    cgroup: Attribution,
}

impl tools::Stream for Live {
    type Side = ();

    fn event(&mut self, data: &[u8]) -> Result<()> {
        let Some(e) = tools::read_event::<Event>(data) else { return Ok(()) };
        let r = Reclaim {
            time: output::now_ms(),
            ts_s: self.out.secs(e.start_ns),
            pid: e.pid,
            tid: e.tid,
            comm: c_str(&e.comm),
            kind: KIND_NAMES.get(e.kind as usize).copied().unwrap_or("?"),
            latency_ms: e.latency_ns as f64 / 1e6,
            latency_ns: e.latency_ns,
            pages: e.nr_reclaimed,
            cgroup: self.cgroups.attribution_of_id(e.memcg_id),
        };
        self.out.record(
            e.start_ns,
            || &r,
            || {
                format!(
                    "{:<16} {:>7} {:>7} {:<6} {:>10.3} {:>7} {}",
                    r.comm,
                    r.pid,
                    r.tid,
                    r.kind,
                    r.latency_ms,
                    r.pages,
                    r.cgroup.short()
                )
            },
        )
    }

    fn finish(&mut self, lost: u64) -> Result<()> {
        let reclaims = self.out.count;
        self.out.finish(lost, serde_json::json!({ "reclaims": reclaims }))
    }
}
