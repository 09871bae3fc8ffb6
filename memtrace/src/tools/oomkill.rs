//! oomkill: one line per OOM kill: the trigger, the victim and its memory, the memory
//! cgroup that hit its limit (memcg OOMs), and the load average at that moment.

use std::collections::HashMap;

use anyhow::Result;
use memtrace_common::oomkill::{EV_TRIGGER, EV_VICTIM, Event, FIELD_ABSENT, VictimOffsets};
use serde::Serialize;

use crate::{
    kernel::{self, AttachPoint, Probe, tracefs::Format},
    output,
    symbolize::{Frame, UserSymbolizer},
    tools::{
        self, CommonArgs, c_str,
        stacks::{self, StackStore},
    },
};

mod memcg;

const OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/oomkill"));

const VICTIM_TP: Probe = Probe::Tracepoint { prog: "oomkill_victim", category: "oom", names: &["mark_victim"] };

/// The kprobe adds the trigger's user stack; the victim still comes from mark_victim, since
/// reading `oc->chosen` needs BTF struct offsets.
const ATTACH_POINTS: &[AttachPoint] = &[
    AttachPoint {
        label: "kprobe oom_kill_process",
        probes: &[Probe::Kprobe { prog: "oomkill_kprobe", funcs: &["oom_kill_process"] }, VICTIM_TP],
    },
    AttachPoint { label: "tracepoint oom:mark_victim", probes: &[VICTIM_TP] },
];
/// The attach points in order of preference, as `memtrace probe` reports them.
pub const ATTACH: &[AttachPoint] = ATTACH_POINTS;

/// Trace OOM kills: victim, trigger, memory, memory cgroup, load average.
#[derive(clap::Args, Debug)]
#[command(after_help = "-p and --comm select the triggering task (the one whose allocation failed).")]
pub struct Args {
    #[command(flatten)]
    pub common: CommonArgs,
}

pub async fn run(args: Args) -> Result<()> {
    kernel::require_root()?;
    let mut signals = tools::Signals::catch()?;
    let filter = args.common.filter()?;
    // A kernel without the tracepoint fails below, in attach_preferred, with its name.
    let (offsets, present) = victim_offsets().unwrap_or_default();
    // Before attaching: every kill the probes see must rise above this reading.
    let memcgs = memcg::Counters::snapshot();
    let mut bpf = kernel::load(OBJECT, |loader| {
        loader.override_global("FILTER", &filter, true).override_global("VICTIM", &offsets, true);
    })?;
    let how = kernel::attach_preferred(&mut bpf, "oomkill", ATTACH_POINTS)?;
    let stacks = StackStore::take(&mut bpf, None)?;
    let mut state = State {
        json: args.common.json,
        present,
        memcgs,
        stacks,
        symbolizer: UserSymbolizer::new(),
        triggers: HashMap::new(),
        kills: 0,
        header: false,
    };
    let ready = format!("tracing OOM kills ({how})");
    tools::stream(&mut bpf, "oomkill", &args.common, &mut signals, None, None, &ready, &mut state).await?;
    Ok(())
}

/// Which of the optional mark_victim fields this kernel records.
#[derive(Default, Clone, Copy)]
struct Present {
    comm: bool,
    memory: bool,
    uid: bool,
    oom_score_adj: bool,
}

fn victim_offsets() -> Result<(VictimOffsets, Present)> {
    let format = Format::read("oom", "mark_victim")?;
    let off = |name: &str| format.field(name).map_or(FIELD_ABSENT, |f| f.offset);
    let offsets = VictimOffsets {
        pid: format.offset("pid")?,
        comm: off("comm"),
        total_vm: off("total_vm"),
        anon_rss: off("anon_rss"),
        file_rss: off("file_rss"),
        shmem_rss: off("shmem_rss"),
        uid: off("uid"),
        pgtables: off("pgtables"),
        oom_score_adj: off("oom_score_adj"),
        _pad: 0,
    };
    let present = Present {
        comm: offsets.comm != FIELD_ABSENT,
        memory: offsets.total_vm != FIELD_ABSENT && offsets.anon_rss != FIELD_ABSENT,
        uid: offsets.uid != FIELD_ABSENT,
        oom_score_adj: offsets.oom_score_adj != FIELD_ABSENT,
    };
    Ok((offsets, present))
}

struct State {
    json: bool,
    present: Present,
    memcgs: memcg::Counters,
    stacks: StackStore,
    symbolizer: UserSymbolizer,
    /// Trigger stacks from the kprobe, by thread, waiting for their mark_victim.
    triggers: HashMap<u32, Vec<Frame>>,
    kills: u64,
    header: bool,
}

/// One OOM kill, as printed. Memory in kB; fields the kernel does not record are null.
#[derive(Serialize)]
struct Kill {
    time: String,
    trigger_pid: u32,
    trigger_tid: u32,
    trigger_comm: String,
    victim_pid: u32,
    victim_comm: String,
    total_vm_kb: Option<u64>,
    anon_rss_kb: Option<u64>,
    file_rss_kb: Option<u64>,
    shmem_rss_kb: Option<u64>,
    pgtables_kb: Option<u64>,
    oom_score_adj: Option<i32>,
    uid: Option<u32>,
    /// "memcg" when a memory cgroup's limit caused the kill, else "global".
    constraint: &'static str,
    /// The memory cgroup whose limit was hit (memcg OOMs only).
    memcg: Option<String>,
    /// The victim's memory cgroup, when it is not the root.
    victim_memcg: Option<String>,
    loadavg: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    trigger_stack: Vec<Frame>,
}

impl State {
    fn trigger_stack(&mut self, event: &Event) -> Vec<Frame> {
        let ips = self.stacks.ips(event.stack_id);
        stacks::user_frames(&mut self.symbolizer, event.trigger_pid, &ips, false)
    }

    fn kill(&mut self, e: &Event) -> Kill {
        let p = self.present;
        let mem = |v: u64| p.memory.then_some(v);
        let mut victim_comm = c_str(&e.victim_comm);
        if !p.comm {
            // Older kernels record only the pid; the victim may not be reaped yet.
            victim_comm = crate::target::comm(e.victim_pid);
        }
        // The kernel counts the kill in the victim's cgroups before it marks the victim.
        let found = self.memcgs.after_kill(e.victim_pid);
        Kill {
            time: if self.json { output::now_ms() } else { output::hms() },
            trigger_pid: e.trigger_pid,
            trigger_tid: e.trigger_tid,
            trigger_comm: c_str(&e.trigger_comm),
            victim_pid: e.victim_pid,
            victim_comm,
            total_vm_kb: mem(e.total_vm_kb),
            anon_rss_kb: mem(e.anon_rss_kb),
            file_rss_kb: mem(e.file_rss_kb),
            shmem_rss_kb: mem(e.shmem_rss_kb),
            pgtables_kb: mem(e.pgtables_kb),
            oom_score_adj: p.oom_score_adj.then_some(e.oom_score_adj),
            uid: p.uid.then_some(e.uid),
            constraint: if found.limited.is_some() { "memcg" } else { "global" },
            memcg: found.limited,
            victim_memcg: found.victim,
            loadavg: std::fs::read_to_string("/proc/loadavg").map(|s| s.trim().to_string()).unwrap_or_default(),
            trigger_stack: self.triggers.remove(&e.trigger_tid).unwrap_or_default(),
        }
    }
}

impl tools::Stream for State {
    fn event(&mut self, data: &[u8]) -> Result<()> {
        let Some(event) = tools::read_event::<Event>(data) else { return Ok(()) };
        match event.kind {
            EV_TRIGGER => {
                let frames = self.trigger_stack(&event);
                self.triggers.insert(event.trigger_tid, frames);
            }
            EV_VICTIM => {
                let kill = self.kill(&event);
                self.kills += 1;
                if self.json {
                    output::json_line(&kill)?;
                } else {
                    if !self.header {
                        self.header = true;
                        output::line("TIME     TRIGGER                    VICTIM, MEMORY, MEMCG, LOADAVG")?;
                    }
                    output::line(&render(&kill))?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn finish(&mut self, lost: u64) -> Result<()> {
        if self.json {
            output::json_line(&serde_json::json!({"final": true, "events_lost": lost, "kills": self.kills}))?;
        }
        Ok(())
    }
}

fn render(k: &Kill) -> String {
    use std::fmt::Write as _;
    let trigger = format!("{} ({})", k.trigger_pid, k.trigger_comm);
    let mut s = format!("{} {trigger:<26} killed {} ({})", k.time, k.victim_pid, k.victim_comm);
    let kb = [
        ("total-vm", k.total_vm_kb),
        ("anon-rss", k.anon_rss_kb),
        ("file-rss", k.file_rss_kb),
        ("shmem-rss", k.shmem_rss_kb),
        ("pgtables", k.pgtables_kb),
    ];
    for (name, value) in kb {
        if let Some(v) = value {
            let _ = write!(s, " {name}={v}kB");
        }
    }
    if let Some(adj) = k.oom_score_adj {
        let _ = write!(s, " oom_score_adj={adj}");
    }
    if let Some(uid) = k.uid {
        let _ = write!(s, " uid={uid}");
    }
    match &k.memcg {
        Some(path) => {
            let _ = write!(s, " memcg={path}");
        }
        None => s.push_str(" global"),
    }
    let _ = write!(s, " loadavg: {}", k.loadavg);
    for frame in &k.trigger_stack {
        let _ = write!(s, "\n        {frame}");
    }
    s
}
