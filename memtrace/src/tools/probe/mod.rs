//! probe: what this kernel offers memtrace (BPF, BTF, kprobes, uprobes, ring buffer, each
//! tracepoint the tools use), and for each subcommand the attach method it would use here or
//! why it cannot run. Nothing is attached: attach points are resolved with `kernel::resolve`.
//! `--usdt FILE` lists a file's USDT probes instead, and `--trace` tries them (`usdt`).

pub mod usdt;

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Serialize;

use crate::{
    kernel::{self, AttachPoint, Probe},
    output,
    tools::registry::{Plan, SPECS},
};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// One JSON object on stdout (with --trace, one per hit and a final one).
    #[arg(long)]
    pub json: bool,
    /// List the USDT probes (<sys/sdt.h>) of this executable or library: provider, name,
    /// address, semaphore and arguments.
    #[arg(long, value_name = "FILE")]
    pub usdt: Option<PathBuf>,
    /// With --usdt: trace this probe (provider:name or name; repeatable) in the -p process,
    /// printing each hit with its arguments.
    #[arg(long, value_name = "PROBE", requires = "usdt", requires = "pid")]
    pub trace: Vec<String>,
    /// With --trace: the process to trace (the run ends when it exits).
    #[arg(short, long, requires = "trace")]
    pub pid: Option<u32>,
    /// With --trace: stop after this many seconds.
    #[arg(short, long, value_name = "SECONDS", requires = "trace")]
    pub duration: Option<u64>,
}

#[derive(Serialize)]
struct Feature {
    name: &'static str,
    /// "yes", "no" or "unknown".
    state: &'static str,
    detail: String,
}

#[derive(Serialize)]
pub struct ToolPlan {
    tool: &'static str,
    /// The attach method chosen here, or None when the tool cannot run.
    method: Option<String>,
    /// The concrete functions and tracepoints of that method.
    targets: Vec<String>,
    /// Why each more-preferred method (or every method) is unusable.
    unusable: Vec<String>,
    /// What the tool loses on this kernel though it runs, in one line.
    #[serde(skip_serializing_if = "Option::is_none")]
    degraded: Option<&'static str>,
}

#[derive(Serialize)]
struct Report {
    kernel: String,
    features: Vec<Feature>,
    tracepoints: Vec<(String, bool)>,
    tools: Vec<ToolPlan>,
}

impl Args {
    /// The duration's range, and that the -p process lives.
    pub fn validate(&self) -> Result<()> {
        if let Some(secs) = self.duration {
            crate::tools::args::in_range("-d/--duration", secs, 1..=crate::tools::args::MAX_SECONDS)?;
        }
        if let Some(pid) = self.pid {
            crate::target::check_pid(pid)?;
        }
        Ok(())
    }
}

pub async fn run(args: Args) -> Result<()> {
    if let Some(file) = &args.usdt {
        return match args.pid {
            Some(pid) if !args.trace.is_empty() => usdt::trace(file, &args.trace, pid, args.duration, args.json).await,
            _ => usdt::list(file, args.json),
        };
    }
    // Without root, tracefs and BPF look absent: a report would blame the kernel.
    kernel::require_root()?;
    let report = Report { kernel: kernel_release(), features: features(), tracepoints: tracepoints(), tools: plans() };
    if args.json {
        let value = serde_json::json!({
            "kernel": report.kernel,
            "features": report.features.iter()
                .map(|f| (f.name.to_string(), serde_json::json!({"state": f.state, "detail": f.detail})))
                .collect::<serde_json::Map<_, _>>(),
            "tracepoints": report.tracepoints.iter()
                .map(|(n, ok)| (n.clone(), serde_json::Value::Bool(*ok)))
                .collect::<serde_json::Map<_, _>>(),
            "tools": report.tools,
        });
        return output::json_line(&value);
    }
    output::line(&format!("kernel {}", report.kernel))?;
    output::line("features:")?;
    for f in &report.features {
        output::line(&format!("  {:<18} {:<8} {}", f.name, f.state, f.detail))?;
    }
    output::line("tracepoints:")?;
    for (name, ok) in &report.tracepoints {
        output::line(&format!("  {:<40} {}", name, if *ok { "yes" } else { "no" }))?;
    }
    output::line("tools:")?;
    for t in &report.tools {
        let how = match (&t.method, t.degraded) {
            (Some(m), Some(lost)) => format!("{m}; {lost}"),
            (Some(m), None) => m.clone(),
            (None, _) => format!("cannot run: {}", t.unusable.join("; ")),
        };
        output::line(&format!("  {:<16} {how}", t.tool))?;
    }
    Ok(())
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map_or_else(|_| "unknown".into(), |s| s.trim().into())
}

fn yes_no(ok: bool) -> &'static str {
    if ok { "yes" } else { "no" }
}

fn features() -> Vec<Feature> {
    let (bpf, bpf_detail) = match map_create(BPF_MAP_TYPE_ARRAY, 4, 8, 1) {
        Ok(()) => (true, "bpf(BPF_MAP_CREATE) works".to_string()),
        Err(e) => (false, format!("bpf(BPF_MAP_CREATE): {e}")),
    };
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    let kprobes = kernel::kprobes_available();
    let uprobes = Path::new("/sys/bus/event_source/devices/uprobe").exists();
    // The ring buffer map (5.8+): creating a one-page one is the cheapest proof.
    let ring = map_create(BPF_MAP_TYPE_RINGBUF, 0, 0, 4096);
    let (ring_state, ring_detail) = match (&ring, bpf) {
        (Ok(()), _) => ("yes", "BPF_MAP_TYPE_RINGBUF created".to_string()),
        (Err(e), true) => ("no", format!("BPF_MAP_TYPE_RINGBUF: {e} (needs kernel 5.8+)")),
        (Err(_), false) => ("unknown", "no BPF syscall to try it with".to_string()),
    };
    let tracefs = kernel::tracefs::root().map(|p| p.display().to_string());
    let mut features = vec![
        Feature { name: "bpf syscall", state: yes_no(bpf), detail: bpf_detail },
        Feature { name: "btf", state: yes_no(btf), detail: "/sys/kernel/btf/vmlinux".into() },
        Feature {
            name: "tracefs",
            state: yes_no(tracefs.is_ok()),
            detail: tracefs.unwrap_or_else(|e| format!("{e:#}")),
        },
        Feature {
            name: "kprobes",
            state: yes_no(kprobes),
            detail: "/sys/bus/event_source/devices/kprobe (CONFIG_KPROBES)".into(),
        },
        Feature {
            name: "uprobes",
            state: yes_no(uprobes),
            detail: "/sys/bus/event_source/devices/uprobe (CONFIG_UPROBES)".into(),
        },
        Feature { name: "ring buffer", state: ring_state, detail: ring_detail },
        Feature {
            name: "unwind tables",
            state: yes_no(kernel::has_bpf_loop()),
            detail: kernel::no_bpf_loop()
                .unwrap_or("user stacks walked with .eh_frame tables (--unwind auto, bpf_loop)")
                .into(),
        },
        fentry(),
    ];
    features.extend(perf_events());
    features
}

/// Tried for real on memtrace's own thread: debug registers and a PMU vary by machine (a
/// virtual machine may have the one and not the other).
fn perf_events() -> [Feature; 3] {
    let row = |name, found: Result<String, String>| match found {
        Ok(detail) => Feature { name, state: "yes", detail },
        Err(detail) => Feature { name, state: "no", detail },
    };
    let breakpoints = kernel::perf::breakpoints();
    let bpf = match (&breakpoints.watch, breakpoints.bpf) {
        (Err(_), Err(why)) => Feature { name: "breakpoint bpf", state: "unknown", detail: why },
        (_, found) => row("breakpoint bpf", found),
    };
    [row("hw breakpoints", breakpoints.watch), bpf, row("hw cache events", kernel::perf::cache_events())]
}

/// Tried for real (load and attach), since lockdown or a security module can forbid it.
fn fentry() -> Feature {
    let (state, detail) = match kernel::fentry::check() {
        Ok(()) => ("yes", "a fentry program loaded and attached (no tool uses it yet)".to_string()),
        Err(why) => why,
    };
    Feature { name: "fentry", state, detail }
}

const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_RINGBUF: u32 = 27;

/// Creates and closes a map: a cheap feature test that needs no program.
fn map_create(map_type: u32, key_size: u32, value_size: u32, max_entries: u32) -> std::io::Result<()> {
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        rest: [u8; 112],
    }
    let attr = MapCreate { map_type, key_size, value_size, max_entries, rest: [0; 112] };
    // SAFETY: attr is larger than what the kernel reads for BPF_MAP_CREATE, and zeroed past it.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 0, &attr as *const MapCreate, size_of::<MapCreate>()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: closing the fd just created.
    unsafe { libc::close(fd as i32) };
    Ok(())
}

/// Every tracepoint any tool may use (every name of each alternative list), sorted.
fn tracepoints() -> Vec<(String, bool)> {
    let mut all: Vec<(&str, &str)> = Vec::new();
    let mut add = |p: &Probe| {
        if let Probe::Tracepoint { category, names, .. } = *p {
            all.extend(names.iter().map(|n| (category, *n)));
        }
    };
    for spec in SPECS {
        spec.optional.iter().for_each(&mut add);
        for (_, plan) in spec.modes {
            if let Plan::Points(points) = plan {
                points.iter().flat_map(|p| p.probes).for_each(&mut add);
            }
        }
    }
    for spec in SPECS {
        for (_, plan) in spec.modes {
            match plan {
                Plan::AnyOf(_, category, list) => {
                    all.extend(list.iter().flat_map(|(_, names)| names.iter().map(|n| (*category, *n))));
                }
                Plan::Points(_) | Plan::Uprobes(_) | Plan::Usdt { .. } => {}
            }
        }
    }
    all.sort();
    all.dedup();
    all.into_iter().map(|(cat, name)| (format!("{cat}:{name}"), kernel::tracefs::exists(cat, name))).collect()
}

fn plans() -> Vec<ToolPlan> {
    SPECS
        .iter()
        .flat_map(|spec| spec.modes.iter().map(move |mode| (spec, mode)))
        .map(|(spec, (tool, p))| {
            let mut plan = match p {
                Plan::Uprobes(label) => uprobes(tool, label),
                Plan::Usdt { label, provider, prefix, .. } => usdt::plan(tool, label, provider, prefix),
                Plan::Points(points) => plan(tool, points),
                Plan::AnyOf(label, category, list) => any_of(tool, label, category, list),
            };
            // The warning a run prints, so probe and the tool say the same (memleak's kernel
            // mode shows kernel stacks only).
            if spec.object.walks_user_stacks() && *tool != "memleak-kernel" {
                plan.degraded = kernel::no_bpf_loop();
            }
            plan
        })
        .collect()
}

fn uprobes(tool: &'static str, label: &str) -> ToolPlan {
    let uprobes = Path::new("/sys/bus/event_source/devices/uprobe").exists();
    ToolPlan {
        tool,
        method: uprobes.then(|| label.to_string()),
        targets: Vec::new(),
        unusable: if uprobes {
            Vec::new()
        } else {
            vec!["uprobes: this kernel has no uprobes (CONFIG_UPROBES)".into()]
        },
        degraded: None,
    }
}

fn any_of(tool: &'static str, label: &str, category: &str, list: &[(&str, &'static [&'static str])]) -> ToolPlan {
    let (found, missing): (Vec<_>, Vec<_>) =
        list.iter().map(|(_, names)| kernel::tracepoint_name(category, names)).partition(Result::is_ok);
    let targets: Vec<String> = found.into_iter().flatten().map(|n| format!("tracepoint:{category}:{n}")).collect();
    let unusable: Vec<String> = missing.into_iter().filter_map(Result::err).collect();
    let method = (!targets.is_empty()).then(|| label.to_string());
    ToolPlan { tool, method, targets, unusable, degraded: None }
}

fn plan(tool: &'static str, points: &[AttachPoint]) -> ToolPlan {
    let mut unusable = Vec::new();
    for p in points {
        match kernel::resolve(p) {
            Ok(resolved) => {
                let targets = resolved
                    .iter()
                    .map(|(probe, target)| match probe {
                        Probe::Kprobe { .. } => format!("kprobe:{target}"),
                        Probe::Tracepoint { category, .. } => format!("tracepoint:{category}:{target}"),
                    })
                    .collect();
                return ToolPlan { tool, method: Some(p.label.to_string()), targets, unusable, degraded: None };
            }
            Err(why) => unusable.push(format!("{}: {why}", p.label)),
        }
    }
    ToolPlan { tool, method: None, targets: Vec::new(), unusable, degraded: None }
}
