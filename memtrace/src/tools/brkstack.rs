//! brkstack: brk calls with the user stack that moved the heap's break, counted per stack
//! in the kernel (calls and bytes of growth), or each call as it happens (`--events`).

use std::fmt::Write as _;

use anyhow::Result;
use aya::maps::{HashMap, MapData};
use memtrace_common::brkstack::{
    BrkKey, BrkTotal, Config, EV_CALL, EV_NEW_STACK, Event, FLAG_UNKNOWN_PREV, Offsets, STAT_NO_ENTRY,
    STAT_STACK_COLLISION, STAT_STACK_LOST, STAT_TOTALS_FULL, STAT_UNKNOWN_PREV,
};
use memtrace_common::names;
use serde::Serialize;

use crate::{
    kernel::{
        self, AttachPoint, Probe,
        cgroup::{Attribution, MemcgPaths},
        tracefs::Format,
    },
    output,
    symbolize::Frame,
    tools::registry::{Plan, ToolSpec},
    tools::tracer::Tracer,
    tools::{
        args::StackReportArgs,
        c_str, read_event,
        stack_report::{ShowsFrames, StackReport, StackRun, StackTool},
        stacks,
    },
};

const OBJECT: crate::kernel::Object = crate::ebpf_object!("brkstack", walking_user_stacks);

pub const SPEC: ToolSpec = ToolSpec {
    names: memtrace_common::brkstack::names::ALL,
    name: "brkstack",
    object: OBJECT,
    modes: &[("brkstack", Plan::Points(ATTACH))],
    optional: &[],
};

/// Count brk calls (heap growth) per user stack.
#[derive(clap::Args, Debug)]
#[command(after_help = "Reports are cumulative since start. Growth is each call's new break minus the \
                        process's previous one; for processes already running, the previous break is \
                        read from /proc/PID/maps at start.")]
pub struct Args {
    #[command(flatten)]
    pub report: StackReportArgs,
    /// Print every brk call (time, pid, comm, requested break, result, growth).
    #[arg(long)]
    pub events: bool,
}

pub const ATTACH: &[AttachPoint] = &[AttachPoint {
    label: "tracepoints syscalls:sys_enter_brk/sys_exit_brk, sched:sched_process_exec/exit",
    probes: &[
        Probe::Tracepoint { prog: "brkstack_enter", category: "syscalls", names: &["sys_enter_brk"] },
        Probe::Tracepoint { prog: "brkstack_exit", category: "syscalls", names: &["sys_exit_brk"] },
        Probe::Tracepoint { prog: "brkstack_exec", category: "sched", names: &["sched_process_exec"] },
        Probe::Tracepoint { prog: "brkstack_gone", category: "sched", names: &["sched_process_exit"] },
    ],
}];

impl Args {
    /// Everything that can be checked before loading anything (and without root).
    pub fn validate(&self) -> Result<()> {
        self.report.validate()?;
        // Kernel threads never call brk.
        self.report.common.validate_user_target()
    }
}

pub async fn run(args: Args) -> Result<()> {
    kernel::require_root()?;
    let tick = args.report.reports.every();
    let filter = args.report.common.filter()?;
    let offsets = Offsets {
        enter_brk: Format::read("syscalls", "sys_enter_brk")?.offset("brk")?,
        exit_ret: Format::read("syscalls", "sys_exit_brk")?.offset("ret")?,
    };
    let config = Config { events: args.events as u32, self_pid: std::process::id() };
    let mut tracer = Tracer::load(&SPEC, |loader| {
        loader
            .override_global(names::FILTER, &filter, true)
            .override_global(memtrace_common::brkstack::names::CONFIG, &config, true)
            .override_global(memtrace_common::brkstack::names::OFFSETS, &offsets, true)
            .map_max_entries(memtrace_common::brkstack::names::STACKS, args.report.max_stacks)
            .map_max_entries(memtrace_common::brkstack::names::TOTALS, args.report.max_stacks);
        args.report.unwind.configure(loader);
    })?;
    // Tables before the probes: the selected processes' first calls get whole stacks.
    let unwinder = args.report.unwind.start(&mut tracer.bpf, &args.report.common)?;
    tracer.attach(ATTACH)?;
    let totals = tracer.map(memtrace_common::brkstack::names::TOTALS)?;
    let mut last_brk: HashMap<MapData, u32, u64> = tracer.map(memtrace_common::brkstack::names::LAST_BRK)?;
    let header = format!(
        "{:>7} {:>7} {:<16} {:>18} {:>18} {:>10} CGROUP",
        "PID", "TID", "COMM", "REQUESTED", "RESULT", "GROWTH"
    );
    let run = StackRun::new(&mut tracer, &args.report, unwinder, false, header)?;
    // After attach, and only where the kernel has not seen a call yet: it knows better.
    for (pid, brk) in current_breaks(args.report.common.target.pid, args.report.common.comm.as_deref()) {
        let _ = last_brk.insert(pid, brk, crate::kernel::maps::BPF_NOEXIST);
    }
    let ready = match args.report.common.target.pid {
        Some(pid) => format!("tracing brk calls of pid {pid} ({})", crate::target::comm(pid)),
        None => "tracing brk calls".to_string(),
    };
    let mut cgroups = MemcgPaths::new();
    // Read while it runs: the final report may come after it exits.
    if let Some(pid) = args.report.common.target.pid {
        cgroups.of_pid(pid);
    }
    let mut state = Live { totals, run, cgroups };
    tracer.stream(&args.report.common, tick, args.report.reports.count(), &ready, &mut state).await?;
    Ok(())
}

/// Each process's current break, from /proc: the end of its [heap] mapping, or its heap's
/// start when the heap has not grown yet. Page-rounded: exact for page-sized growth.
fn current_breaks(only: Option<u32>, comm: Option<&str>) -> Vec<(u32, u64)> {
    crate::target::matching(only, comm).into_iter().filter_map(|pid| Some((pid, current_break(pid)?))).collect()
}

fn current_break(pid: u32) -> Option<u64> {
    if let Some(heap) = crate::procfs::mappings(pid).ok()?.into_iter().find(|m| m.path == "[heap]") {
        return Some(heap.end);
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // start_brk is field 47; fields after the comm start at field 3.
    let start_brk: u64 = stat.rsplit_once(") ")?.1.split_whitespace().nth(44)?.parse().ok()?;
    (start_brk != 0).then_some(start_brk)
}

struct Live {
    totals: HashMap<MapData, BrkKey, BrkTotal>,
    run: StackRun,
    /// Processes' memory cgroups, from /proc (calls are counted per process in the kernel; a
    /// process gone by the report shows none).
    cgroups: MemcgPaths,
}

#[derive(Serialize)]
struct CallEvent {
    time: String,
    event: &'static str,
    pid: u32,
    tid: u32,
    comm: String,
    #[serde(serialize_with = "crate::output::hex::serialize")]
    requested: u64,
    #[serde(serialize_with = "crate::output::hex::serialize")]
    result: u64,
    /// Signed bytes; null when the previous break of the process was unknown.
    growth: Option<i64>,
    stack_id: Option<String>,
    #[serde(flatten)]
    cgroup: Attribution,
}

#[derive(Serialize)]
struct Totals {
    calls: u64,
    bytes: i64,
}

#[derive(Serialize)]
struct BlindSpots {
    stacks_full: u64,
    growth_unknown: u64,
    exits_without_entry: u64,
}

type Report = StackReport<Totals, StackRow, BlindSpots>;

#[derive(Serialize)]
struct StackRow {
    pid: u32,
    comm: String,
    stack_id: Option<String>,
    calls: u64,
    bytes: i64,
    #[serde(flatten)]
    cgroup: Attribution,
    frames: Vec<Frame>,
}

impl ShowsFrames for StackRow {
    fn shown_frames(&self) -> impl Iterator<Item = &Frame> {
        self.frames.iter()
    }
}

impl Live {
    /// A walked stack, symbolized: the syscall's return address first, then its callers.
    fn frames(&mut self, pid: u32, stack_id: u64) -> Vec<Frame> {
        self.run.stacks.user(pid, stack_id, false)
    }

    fn print_call(&mut self, e: &Event) -> Result<()> {
        let growth = (e.flags & FLAG_UNKNOWN_PREV == 0).then_some(e.growth as i64);
        let call = CallEvent {
            time: output::now_ms(),
            event: "brk",
            pid: e.pid,
            tid: e.tid,
            comm: c_str(&e.comm),
            requested: e.requested,
            result: e.result,
            growth,
            stack_id: stacks::id_json(e.stack_id),
            cgroup: self.cgroups.attribution_of_pid(e.pid),
        };
        self.run.events.record(
            0,
            || &call,
            || {
                let growth = growth.map_or("?".to_string(), |g| format!("{g:+}"));
                format!(
                    "{:>7} {:>7} {:<16} {:>#18x} {:>#18x} {growth:>10} {}",
                    e.pid,
                    e.tid,
                    call.comm,
                    e.requested,
                    e.result,
                    call.cgroup.short()
                )
            },
        )
    }
}

impl StackTool for Live {
    fn run(&mut self) -> &mut StackRun {
        &mut self.run
    }

    fn on_event(&mut self, data: &[u8]) -> Result<()> {
        let Some(e) = read_event::<Event>(data) else { return Ok(()) };
        match e.kind {
            // Symbolize while the process lives; reports use the cached frames.
            EV_NEW_STACK => {
                self.frames(e.pid, e.stack_id);
                // Read while it runs: the report may come after it exits.
                self.cgroups.of_pid(e.pid);
            }
            EV_CALL => self.print_call(&e)?,
            _ => {}
        }
        Ok(())
    }

    fn report(&mut self, is_final: bool) -> Result<()> {
        let mut rows: Vec<(BrkKey, BrkTotal)> = crate::kernel::maps::dump(&self.totals);
        rows.sort_by(|a, b| b.1.calls.cmp(&a.1.calls).then((b.1.bytes as i64).cmp(&(a.1.bytes as i64))));
        let stacks: Vec<StackRow> = rows
            .iter()
            .take(self.run.shown(is_final))
            .map(|(k, t)| StackRow {
                cgroup: self.cgroups.attribution_of_pid(k.pid),
                pid: k.pid,
                comm: c_str(&t.comm),
                stack_id: stacks::id_json(k.stack_id),
                calls: t.calls,
                bytes: t.bytes as i64,
                frames: self.frames(k.pid, k.stack_id),
            })
            .collect();
        let folded = stacks.iter().map(|s| (output::process_root(s.pid, &s.comm), s.frames.as_slice(), s.calls));
        self.run.write_flame_graphs(
            is_final,
            &output::svg::Chart { title: "brkstack: brk calls", unit: "calls" },
            folded,
        )?;
        let samples: Vec<output::pprof::Sample> = stacks
            .iter()
            .map(|s| output::pprof::Sample {
                pid: s.pid,
                process: output::process_root(s.pid, &s.comm),
                frames: &s.frames,
                values: vec![s.bytes, s.calls as i64],
            })
            .collect();
        // Calls last, shown by default: the table sorts by them too.
        self.run.write_pprof(is_final, &[("growth", "bytes"), ("calls", "count")], &samples)?;
        let totals =
            Totals { calls: rows.iter().map(|r| r.1.calls).sum(), bytes: rows.iter().map(|r| r.1.bytes as i64).sum() };
        let run = &self.run;
        let stacks_lost = run.stat(STAT_STACK_LOST) + run.stat(STAT_STACK_COLLISION);
        let blind_spots = BlindSpots {
            stacks_full: run.stat(STAT_TOTALS_FULL),
            growth_unknown: run.stat(STAT_UNKNOWN_PREV),
            exits_without_entry: run.stat(STAT_NO_ENTRY),
        };
        run.report(is_final, totals, stacks, stacks_lost, blind_spots, |r| render(r, rows.len()))
    }
}

fn render(r: &Report, rows: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}{} brk calls, break moved {:+} bytes, in {rows} stacks{}",
        r.title(),
        r.counts.calls,
        r.counts.bytes,
        if rows > r.stacks.len() { format!(" (top {} shown)", r.stacks.len()) } else { String::new() }
    );
    for s in &r.stacks {
        let (calls, bytes, pid, comm, cgroup) = (s.calls, s.bytes, s.pid, &s.comm, s.cgroup.short());
        let _ = writeln!(out, "  {calls} calls, {bytes:+} bytes: pid {pid} ({comm}) cgroup {cgroup}");
        output::write_stack(&mut out, &s.frames, "      ");
    }
    let (store_full, store) = r.store_full();
    out += &r.blind_spots_line(&[
        (r.stacks_lost, "calls without a stack"),
        (store_full, &store),
        (r.blind_spots.stacks_full, "calls uncounted (per-stack map full)"),
        (r.blind_spots.growth_unknown, "calls with unknown growth (previous break not seen)"),
        (r.blind_spots.exits_without_entry, "calls seen leaving but not entering"),
    ]);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_own_break() {
        let brk = super::current_break(std::process::id()).expect("this process has a break");
        // SAFETY: sbrk(0) only reads the break.
        let now = unsafe { libc::sbrk(0) } as u64;
        assert_eq!(brk, now.next_multiple_of(4096));
    }
}
