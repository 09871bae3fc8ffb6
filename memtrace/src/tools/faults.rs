//! faults: page faults counted in the kernel per process and per stack (user stack, plus the
//! kernel stack for faults taken in kernel mode with `--kernel`), or each fault (`--events`).

use std::{collections::HashMap as StdHashMap, fmt::Write as _};

use anyhow::Result;
use aya::maps::{HashMap, MapData};
use memtrace_common::faults::{
    Config, EV_FAULT, EV_NEW_STACK, Event, FaultKey, KIND_KERNEL, Offsets, ProcFaults, STAT_COUNTS_FULL,
    STAT_KSTACK_LOST, STAT_PROCS_FULL, STAT_USTACK_LOST,
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

const OBJECT: crate::kernel::Object = crate::ebpf_object!("faults", walking_user_stacks);

/// Count page faults per process and per stack.
#[derive(clap::Args, Debug)]
#[command(after_help = "Reports are cumulative since start. Error codes are decoded with the x86 \
                        page-fault error-code bits.")]
pub struct Args {
    #[command(flatten)]
    pub report: StackReportArgs,
    /// Print every fault (address, ip, decoded error code).
    #[arg(long)]
    pub events: bool,
    /// Also count faults taken in kernel mode (copy_to_user and the like), with kernel stacks.
    #[arg(long)]
    pub kernel: bool,
}

const USER: AttachPoint = AttachPoint {
    label: "tracepoint exceptions:page_fault_user",
    probes: &[Probe::Tracepoint { prog: "faults_user", category: "exceptions", names: &["page_fault_user"] }],
};
const KERNEL: AttachPoint = AttachPoint {
    label: "tracepoint exceptions:page_fault_kernel",
    probes: &[Probe::Tracepoint { prog: "faults_kernel", category: "exceptions", names: &["page_fault_kernel"] }],
};
/// How faults attaches by default (--kernel adds KERNEL), as `memtrace probe` reports it.
pub const ATTACH: &[AttachPoint] = &[USER];

pub const SPEC: ToolSpec = ToolSpec {
    names: memtrace_common::faults::names::ALL,
    name: "faults",
    object: OBJECT,
    modes: &[("faults", Plan::Points(ATTACH))],
    optional: KERNEL.probes,
};

impl Args {
    /// Everything that can be checked before loading anything (and without root).
    pub fn validate(&self) -> Result<()> {
        self.report.validate()?;
        // A kernel thread takes no user faults; with --kernel its kernel-mode faults count.
        if self.kernel { self.report.common.validate() } else { self.report.common.validate_user_target() }
    }
}

pub async fn run(args: Args) -> Result<()> {
    kernel::require_root()?;
    let tick = args.report.reports.every();
    let filter = args.report.common.filter()?;
    let format = Format::read("exceptions", "page_fault_user")?;
    let offsets = Offsets {
        address: format.offset("address")?,
        ip: format.offset("ip")?,
        error_code: format.offset("error_code")?,
        _pad: 0,
    };
    let config = Config { events: args.events as u32, self_pid: std::process::id() };
    let mut tracer = Tracer::load(&SPEC, |loader| {
        loader
            .override_global(names::FILTER, &filter, true)
            .override_global(memtrace_common::faults::names::CONFIG, &config, true)
            .override_global(memtrace_common::faults::names::OFFSETS, &offsets, true)
            .map_max_entries(memtrace_common::faults::names::STACKS, args.report.max_stacks)
            .map_max_entries(memtrace_common::faults::names::COUNTS, args.report.max_stacks);
        args.report.unwind.configure(loader);
    })?;
    // Tables before the probes: the selected processes' first faults get whole stacks.
    let unwinder = args.report.unwind.start(&mut tracer.bpf, &args.report.common)?;
    let mut how = vec![tracer.attach(&[USER])?];
    if args.kernel {
        how.push(tracer.attach(&[KERNEL])?);
    }
    let counts = tracer.map(memtrace_common::faults::names::COUNTS)?;
    let procs = tracer.map(memtrace_common::faults::names::PROCS)?;
    let header = format!(
        "{:>7} {:>7} {:<16} {:<6} {:>18} {:>18} {:<6} {:<14} FLAGS",
        "PID", "TID", "COMM", "MODE", "ADDRESS", "IP", "ERROR", "CGROUP"
    );
    let run = StackRun::new(&mut tracer, &args.report, unwinder, args.kernel, header)?;
    let whose = match args.report.common.target.pid {
        Some(pid) => format!(" of pid {pid} ({})", crate::target::comm(pid)),
        None => String::new(),
    };
    let ready = format!("tracing page faults{whose} ({})", how.join(", "));
    let mut cgroups = MemcgPaths::new();
    // Read while it runs: its events may be printed after it exits.
    if let Some(pid) = args.report.common.target.pid {
        cgroups.of_pid(pid);
    }
    let mut state = Live { counts, procs, run, cgroups, ids: StdHashMap::new() };
    tracer.stream(&args.report.common, tick, args.report.reports.count(), &ready, &mut state).await?;
    Ok(())
}

/// The x86 page-fault error code, for people: access, mode, cause, then the rarer bits.
pub fn decode_error(code: u64) -> String {
    let bit = |n: u32| code & (1 << n) != 0;
    let mut parts = vec![
        if bit(4) {
            "instr-fetch"
        } else if bit(1) {
            "write"
        } else {
            "read"
        },
        if bit(2) { "user" } else { "kernel" },
        if bit(0) { "protection" } else { "not-present" },
    ];
    for (n, name) in [(3, "rsvd"), (5, "pkey"), (6, "shstk"), (15, "sgx")] {
        if bit(n) {
            parts.push(name);
        }
    }
    parts.join("|")
}

struct Live {
    counts: HashMap<MapData, FaultKey, u64>,
    procs: HashMap<MapData, u32, ProcFaults>,
    run: StackRun,
    cgroups: MemcgPaths,
    /// Memory cgroup ids the kernel side recorded, by process, as of the last report.
    ids: StdHashMap<u32, u64>,
}

#[derive(Serialize)]
struct FaultEvent {
    time: String,
    event: &'static str,
    pid: u32,
    tid: u32,
    comm: String,
    mode: &'static str,
    #[serde(serialize_with = "crate::output::hex::serialize")]
    address: u64,
    #[serde(serialize_with = "crate::output::hex::serialize")]
    ip: u64,
    #[serde(serialize_with = "crate::output::hex::serialize")]
    error_code: u64,
    flags: String,
    #[serde(flatten)]
    cgroup: Attribution,
}

#[derive(Serialize)]
struct Totals {
    faults: u64,
    processes: Vec<ProcRow>,
}

#[derive(Serialize)]
struct BlindSpots {
    kernel_stacks_lost: u64,
    stacks_full: u64,
    processes_full: u64,
}

type Report = StackReport<Totals, StackRow, BlindSpots>;

#[derive(Serialize)]
struct ProcRow {
    pid: u32,
    comm: String,
    faults: u64,
    user_faults: u64,
    kernel_faults: u64,
    /// Faults of this process counted in no stack row with their stack (lost stack or full map).
    no_stack: u64,
    #[serde(flatten)]
    cgroup: Attribution,
}

#[derive(Serialize)]
struct StackRow {
    pid: u32,
    mode: &'static str,
    faults: u64,
    user_stack_id: Option<String>,
    kernel_stack_id: Option<String>,
    #[serde(flatten)]
    cgroup: Attribution,
    /// Kernel frames (kernel-mode faults), innermost first.
    kernel_frames: Vec<Frame>,
    /// User frames, innermost first: the faulting instruction, then its callers.
    frames: Vec<Frame>,
}

impl ShowsFrames for StackRow {
    fn shown_frames(&self) -> impl Iterator<Item = &Frame> {
        self.kernel_frames.iter().chain(&self.frames)
    }
}

fn mode_name(mode: u32) -> &'static str {
    if mode == KIND_KERNEL { "kernel" } else { "user" }
}

impl Live {
    /// Symbolizes a stack key; user frames start at the faulting instruction for user faults,
    /// at a syscall's return address for kernel ones.
    fn frames(&mut self, pid: u32, user: u64, kernel: u64, mode: u32) -> (Vec<Frame>, Vec<Frame>) {
        (self.run.stacks.user(pid, user, mode != KIND_KERNEL), self.run.stacks.kernel(kernel))
    }

    fn print_fault(&mut self, e: &Event) -> Result<()> {
        let ev = FaultEvent {
            time: output::now_ms(),
            event: "fault",
            pid: e.pid,
            tid: e.tid,
            comm: c_str(&e.comm),
            mode: mode_name(e.mode),
            address: e.address,
            ip: e.ip,
            error_code: e.error_code,
            flags: decode_error(e.error_code),
            cgroup: self.cgroups.attribution_of(e.pid, self.ids.get(&e.pid).copied().unwrap_or(0)),
        };
        self.run.events.record(
            0,
            || &ev,
            || {
                format!(
                    "{:>7} {:>7} {:<16} {:<6} {:>#18x} {:>#18x} {:<#6x} {:<14} {}",
                    ev.pid,
                    ev.tid,
                    ev.comm,
                    ev.mode,
                    ev.address,
                    ev.ip,
                    ev.error_code,
                    ev.cgroup.short(),
                    ev.flags
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
                self.frames(e.pid, e.user_stack, e.kernel_stack, e.mode);
                self.cgroups.of_pid(e.pid);
            }
            EV_FAULT => self.print_fault(&e)?,
            _ => {}
        }
        Ok(())
    }

    fn report(&mut self, is_final: bool) -> Result<()> {
        let dumped = crate::kernel::maps::dump(&self.procs);
        self.ids = dumped.iter().map(|(pid, p)| (*pid, p.memcg_id)).collect();
        let mut procs: Vec<ProcRow> = dumped
            .into_iter()
            .map(|(pid, p)| ProcRow {
                cgroup: self.cgroups.attribution_of(pid, p.memcg_id),
                pid,
                comm: c_str(&p.comm),
                faults: p.user + p.kernel,
                user_faults: p.user,
                kernel_faults: p.kernel,
                no_stack: p.no_stack,
            })
            .collect();
        procs.sort_by(|a, b| b.faults.cmp(&a.faults).then(a.pid.cmp(&b.pid)));
        let comms: std::collections::HashMap<u32, String> = procs.iter().map(|p| (p.pid, p.comm.clone())).collect();
        let faults = procs.iter().map(|p| p.faults).sum();
        let no_stack = procs.iter().map(|p| p.no_stack).sum();
        let proc_count = procs.len();
        procs.truncate(self.run.top());
        let mut rows: Vec<(FaultKey, u64)> = crate::kernel::maps::dump(&self.counts);
        rows.sort_by_key(|r| std::cmp::Reverse(r.1));
        let mut stacks = Vec::new();
        for &(k, n) in rows.iter().take(self.run.shown(is_final)) {
            let (frames, kernel_frames) = self.frames(k.pid, k.user_stack, k.kernel_stack, k.kind);
            let id = self.ids.get(&k.pid).copied().unwrap_or(0);
            stacks.push(StackRow {
                cgroup: self.cgroups.attribution_of(k.pid, id),
                pid: k.pid,
                mode: mode_name(k.kind),
                faults: n,
                user_stack_id: stacks::id_json(k.user_stack),
                kernel_stack_id: stacks::id_json(k.kernel_stack),
                kernel_frames,
                frames,
            });
        }
        let root = |pid: u32| output::process_root(pid, comms.get(&pid).map_or("", String::as_str));
        let whole: Vec<(String, Vec<Frame>, u64)> = stacks
            .iter()
            .map(|s| (root(s.pid), [s.kernel_frames.clone(), s.frames.clone()].concat(), s.faults))
            .collect();
        let folded = whole.iter().map(|(r, f, n)| (r.clone(), f.as_slice(), *n));
        self.run.write_flame_graphs(
            is_final,
            &output::svg::Chart { title: "faults: page faults", unit: "faults" },
            folded,
        )?;
        let samples: Vec<output::pprof::Sample> = stacks
            .iter()
            .zip(&whole)
            .map(|(s, (process, frames, n))| output::pprof::Sample {
                pid: s.pid,
                process: process.clone(),
                frames,
                values: vec![*n as i64],
            })
            .collect();
        self.run.write_pprof(is_final, &[("faults", "count")], &samples)?;
        let run = &self.run;
        let blind_spots = BlindSpots {
            kernel_stacks_lost: run.stat(STAT_KSTACK_LOST),
            stacks_full: run.stat(STAT_COUNTS_FULL),
            processes_full: run.stat(STAT_PROCS_FULL),
        };
        let totals = Totals { faults, processes: procs };
        let table = |r: &Report| render(r, proc_count, rows.len(), no_stack);
        run.report(is_final, totals, stacks, run.stat(STAT_USTACK_LOST), blind_spots, table)
    }
}

/// `no_stack`: faults of all processes (not only those shown) counted without their stack.
fn render(r: &Report, procs: usize, rows: usize, no_stack: u64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}{} page faults in {procs} processes, {rows} stacks{}",
        r.title(),
        r.counts.faults,
        if procs > r.counts.processes.len() || rows > r.stacks.len() {
            format!(" (top {} shown)", r.counts.processes.len().max(r.stacks.len()))
        } else {
            String::new()
        }
    );
    // The NO STACK column appears only when some fault lost its stack.
    let missing = |p: &ProcRow| if no_stack > 0 { format!(" {:>10}", p.no_stack) } else { String::new() };
    let head = if no_stack > 0 { format!(" {:>10}", "NO STACK") } else { String::new() };
    let _ = writeln!(
        out,
        "  {:>7} {:<16} {:>10} {:>10} {:>10} {:<14}{head}",
        "PID", "COMM", "FAULTS", "USER", "KERNEL", "CGROUP"
    );
    for p in &r.counts.processes {
        let _ = writeln!(
            out,
            "  {:>7} {:<16} {:>10} {:>10} {:>10} {:<14}{}",
            p.pid,
            p.comm,
            p.faults,
            p.user_faults,
            p.kernel_faults,
            p.cgroup.short(),
            missing(p)
        );
    }
    for s in &r.stacks {
        let _ = writeln!(out, "  {} faults ({} mode): pid {}", s.faults, s.mode, s.pid);
        if s.mode == "kernel" {
            output::write_stack(&mut out, &s.kernel_frames, "      ");
            let _ = writeln!(out, "      --");
        }
        output::write_stack(&mut out, &s.frames, "      ");
    }
    let (store_full, store) = r.store_full();
    out += &r.blind_spots_line(&[
        (r.stacks_lost, "faults without a user stack"),
        (r.blind_spots.kernel_stacks_lost, "kernel faults without a kernel stack"),
        (r.blind_spots.stacks_full, "faults not counted per stack (counts map full: raise --max-stacks)"),
        (r.blind_spots.processes_full, "faults not counted per process (map full)"),
        (store_full, &store),
        (no_stack, "faults without their stack in all (per process: NO STACK column)"),
    ]);
    out
}

#[cfg(test)]
mod tests {
    use super::decode_error;

    #[test]
    fn decodes_x86_error_codes() {
        assert_eq!(decode_error(0x6), "write|user|not-present");
        assert_eq!(decode_error(0x4), "read|user|not-present");
        assert_eq!(decode_error(0x7), "write|user|protection");
        assert_eq!(decode_error(0x0), "read|kernel|not-present");
        assert_eq!(decode_error(0x15), "instr-fetch|user|protection");
        assert_eq!(decode_error(0x8025), "read|user|protection|pkey|sgx");
        assert_eq!(decode_error(0x48), "read|kernel|not-present|rsvd|shstk");
    }
}
