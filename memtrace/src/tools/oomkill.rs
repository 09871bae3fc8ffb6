//! oomkill: one line per OOM kill: the trigger, the victim and its memory, the memory
//! cgroup that hit its limit (memcg OOMs), and the load average at that moment.
//!
//! Whether a kill is a memory cgroup's is decided from what the kernel side read at the kill:
//! the OOM killer runs under mem_cgroup_out_of_memory for a memcg OOM (the trigger's kernel
//! stack says so), and the group whose limit was hit is the group of the trigger's chain
//! with the least room below its limit at the kill (see `limited_level`). Counters read
//! afterwards cannot tell the kills of a burst apart.

use std::collections::HashMap;

use anyhow::Result;
use memtrace_common::names;
use memtrace_common::oomkill::{
    EV_TRIGGER, EV_VICTIM, Event, FIELD_ABSENT, KSTACK_DEPTH, MEMCG_LEVELS, MemcgOffsets, VictimOffsets,
};
use serde::Serialize;

use crate::{
    kernel::{
        self, AttachPoint, Probe, btf,
        cgroup::{self, Attribution},
        kallsyms::Kallsyms,
        tracefs::Format,
    },
    output::{self, events::Events},
    symbolize::{Frame, UnnamedFrames, UserSymbolizer},
    tools::registry::{Plan, ToolSpec},
    tools::tracer::Tracer,
    tools::{
        self, CommonArgs, c_str,
        stacks::{self, StackStore},
    },
    unwind::Unwinder,
};

pub(crate) mod memcg;

const OBJECT: crate::kernel::Object = crate::ebpf_object!("oomkill", walking_user_stacks);

pub const SPEC: ToolSpec = ToolSpec {
    names: memtrace_common::oomkill::names::ALL,
    name: "oomkill",
    object: OBJECT,
    modes: &[("oomkill", Plan::Points(ATTACH))],
    optional: &[],
};

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
    #[command(flatten)]
    pub unwind: tools::args::UnwindArgs,
}

impl Args {
    /// Everything that can be checked before loading anything (and without root).
    pub fn validate(&self) -> Result<()> {
        self.unwind.validate()?;
        self.common.validate()
    }
}

pub async fn run(args: Args) -> Result<()> {
    kernel::require_root()?;
    let filter = args.common.filter()?;
    // A kernel without the tracepoint fails below, in attach_preferred, with its name.
    let (offsets, present) = victim_offsets().unwrap_or_default();
    // Before attaching: every kill the probes see must rise above this reading.
    let memcgs = memcg::Counters::snapshot();
    let chain = memcg_offsets(memcgs.is_v1()).unwrap_or_else(|e| {
        tracing::info!("oomkill: memory cgroups read from their counters only: {e:#}");
        MemcgOffsets::default()
    });
    let mut tracer = Tracer::load(&SPEC, |loader| {
        loader
            .override_global(names::FILTER, &filter, true)
            .override_global(memtrace_common::oomkill::names::VICTIM, &offsets, true)
            .override_global(memtrace_common::oomkill::names::MEMCG, &chain, true);
        args.unwind.configure(loader);
    })?;
    let unwinder = args.unwind.start(&mut tracer.bpf, &args.common)?;
    let how = tracer.attach(ATTACH_POINTS)?;
    let stacks = StackStore::take(&mut tracer.bpf, None)?;
    let mut state = Live {
        json: args.common.run.json,
        present,
        memcgs,
        stacks,
        unwinder,
        symbolizer: UserSymbolizer::new(),
        kallsyms: None,
        triggers: HashMap::new(),
        unnamed: UnnamedFrames::default(),
        out: Events::new(args.common.run.json, false, "TRIGGER                    VICTIM, MEMORY, MEMCG, LOADAVG"),
    };
    let ready = format!("tracing OOM kills ({how})");
    tracer.stream(&args.common, None, None, &ready, &mut state).await?;
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
        // Only wanted where mark_victim lacks the name; without BTF the name comes from /proc.
        oc_chosen: if off("comm") == FIELD_ABSENT {
            btf::member_offset("oom_control", "chosen").unwrap_or(FIELD_ABSENT)
        } else {
            FIELD_ABSENT
        },
        task_comm: btf::member_offset("task_struct", "comm").unwrap_or(FIELD_ABSENT),
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

/// BTF offsets for the kernel side's walk up the trigger's memory cgroup chain.
fn memcg_offsets(v1: bool) -> Result<MemcgOffsets> {
    // The walk to the group's id is every tool's (kernel::cgroup); the counters are oomkill's.
    let id = cgroup::memcg_id_offsets()?;
    let off = btf::member_offset;
    anyhow::ensure!(off("mem_cgroup", "css")? == 0, "struct mem_cgroup does not start with its css");
    // v1's memory+swap limit also ends in an OOM; v2 keeps a swap counter in the same place,
    // whose limit does not.
    let memsw = |field: &str| if v1 { off("mem_cgroup", &format!("memsw.{field}")).ok() } else { None };
    Ok(MemcgOffsets {
        valid: 1,
        task_cgroups: id.task_cgroups,
        css_set_memory: id.css_set_memory,
        css_cgroup: id.css_cgroup,
        css_parent: off("cgroup_subsys_state", "parent")?,
        cgroup_kn: id.cgroup_kn,
        kn_id: id.kn_id,
        memory_usage: off("mem_cgroup", "memory.usage")?,
        memory_max: off("mem_cgroup", "memory.max")?,
        memsw_usage: memsw("usage").unwrap_or(FIELD_ABSENT),
        memsw_max: memsw("max").unwrap_or(FIELD_ABSENT),
        task_active_memcg: off("task_struct", "active_memcg").unwrap_or(FIELD_ABSENT),
    })
}

/// Whether the OOM killer ran for a memory cgroup, from the trigger's kernel stack: the
/// caller of out_of_memory is mem_cgroup_out_of_memory for a memcg OOM, the page allocator
/// (or sysrq) for a global one. None when the stack does not reach that far.
fn memcg_oom_by_stack(names: &[&str]) -> Option<bool> {
    let at = names.iter().position(|n| *n == "out_of_memory")?;
    names.get(at + 1).map(|caller| caller.starts_with("mem_cgroup_out_of_memory"))
}

/// Half the page counters' "no limit" (LONG_MAX / 4 KiB pages): more room means no limit.
const NO_LIMIT_PAGES: u64 = 1 << 50;

/// The level of the trigger's memory cgroup chain (deepest first) whose limit was hit: the
/// one with the least room below its limit, the deepest of equals. When the kernel's charge
/// failed at a group, every group below it had at least the charge's room, and pages charged
/// or freed since below that group moved all their margins alike; the victim's own memory,
/// freed while the kill is prepared, is charged there too. The root (last, when the chain
/// reaches it) has no limit.
fn limited_level(margins: &[u64], levels: usize, chain_reaches_root: bool) -> Option<usize> {
    let last = if chain_reaches_root { levels.saturating_sub(1) } else { levels };
    (0..last).filter(|&i| margins[i] < NO_LIMIT_PAGES).min_by_key(|&i| (margins[i], i))
}

struct Live {
    json: bool,
    present: Present,
    memcgs: memcg::Counters,
    stacks: StackStore,
    unwinder: Unwinder,
    symbolizer: UserSymbolizer,
    /// Kernel symbols, loaded at the first kill; None inside until then.
    kallsyms: Option<Option<Kallsyms>>,
    /// What the kprobe saw, by trigger thread, waiting for its mark_victim.
    triggers: HashMap<u32, Trigger>,
    /// The frames of the trigger stacks printed, and those without a name.
    unnamed: UnnamedFrames,
    out: Events,
}

struct Trigger {
    frames: Vec<Frame>,
    /// The chosen victim's name, where mark_victim does not record it ("" otherwise).
    victim_comm: String,
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
    /// The victim's memory cgroup (the root too) and its container.
    #[serde(flatten)]
    cgroup: Attribution,
    loadavg: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    trigger_stack: Vec<Frame>,
}

impl Live {
    fn memcg_oom(&mut self, e: &Event) -> Option<bool> {
        let syms = self.kallsyms.get_or_insert_with(|| Kallsyms::load().ok()).as_ref()?;
        let len = (e.kstack_len as usize).min(KSTACK_DEPTH);
        let names: Vec<&str> = e.kstack[..len].iter().filter_map(|&ip| syms.resolve(ip).map(|(n, _, _)| n)).collect();
        memcg_oom_by_stack(&names)
    }

    /// The path of the group whose limit was hit, from the chain read at the kill.
    fn oom_group(&mut self, e: &Event) -> Option<String> {
        let levels = (e.memcg_levels as usize).min(MEMCG_LEVELS);
        tracing::debug!(
            "oomkill: trigger's memcg chain: ids {:?}, pages below the limit {:?}",
            &e.memcg_ids[..levels],
            &e.memcg_margin[..levels]
        );
        let root = levels.checked_sub(1).and_then(|i| self.memcgs.path_of(e.memcg_ids[i]));
        let level = limited_level(&e.memcg_margin, levels, root.as_deref() == Some("/"))?;
        self.memcgs.path_of(e.memcg_ids[level])
    }

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
            // Older kernels record only the pid: the kprobe read the chosen task's name, else
            // the victim may not be reaped yet.
            victim_comm = self.triggers.get(&e.trigger_tid).map(|t| t.victim_comm.clone()).unwrap_or_default();
            if victim_comm.is_empty() {
                victim_comm = crate::target::comm(e.victim_pid);
            }
        }
        // The kernel counts the kill in the victim's cgroups before it marks the victim.
        let found = self.memcgs.after_kill(e.victim_pid);
        let (constraint, memcg) = match self.memcg_oom(e) {
            Some(true) => ("memcg", self.oom_group(e).or(found.limited)),
            Some(false) => ("global", None),
            // The stack was not recorded: the counters are all there is.
            None => (if found.limited.is_some() { "memcg" } else { "global" }, found.limited),
        };
        // The victim is another task than the current one: its group is the one whose kill
        // counter rose, else (a kill not counted in any group below the root) /proc's.
        let cgroup = Attribution::of_path(found.victim.clone().or_else(|| self.memcgs.group_of(e.victim_pid)));
        Kill {
            time: output::now_ms(),
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
            constraint,
            memcg,
            victim_memcg: found.victim,
            cgroup,
            loadavg: std::fs::read_to_string("/proc/loadavg").map(|s| s.trim().to_string()).unwrap_or_default(),
            trigger_stack: self.triggers.remove(&e.trigger_tid).map(|t| t.frames).unwrap_or_default(),
        }
    }
}

impl tools::Stream for Live {
    type Side = ();

    fn unwinder(&mut self) -> Option<&mut Unwinder> {
        Some(&mut self.unwinder)
    }

    fn event(&mut self, data: &[u8]) -> Result<()> {
        let Some(event) = tools::read_event::<Event>(data) else { return Ok(()) };
        match event.kind {
            EV_TRIGGER => {
                let frames = self.trigger_stack(&event);
                self.triggers.insert(event.trigger_tid, Trigger { frames, victim_comm: c_str(&event.victim_comm) });
            }
            EV_VICTIM => {
                let kill = self.kill(&event);
                self.unnamed += UnnamedFrames::of(&kill.trigger_stack);
                // No --timestamp here: the kernel-clock time is never shown.
                self.out.record(0, || &kill, || render(&kill))?;
            }
            _ => {}
        }
        Ok(())
    }

    fn finish(&mut self, lost: u64) -> Result<()> {
        let (cut, unnamed) = (self.unwinder.cut(), self.unnamed);
        let kills = self.out.count;
        self.out.finish(lost, serde_json::json!({"kills": kills, "cut_stacks": cut, "unnamed_frames": unnamed}))?;
        if !self.json && (cut.walks > cut.complete + cut.fp_walks || unnamed.unnamed() > 0) {
            // Trigger stacks are walked once each, so a cut one or a frame without a name is
            // worth a line.
            eprintln!("memtrace: oomkill: {}", output::stack_blind_spots(&[], &cut, &unnamed));
        }
        Ok(())
    }
}

fn render(k: &Kill) -> String {
    use std::fmt::Write as _;
    let trigger = format!("{} ({})", k.trigger_pid, k.trigger_comm);
    let mut s = format!("{trigger:<26} killed {} ({})", k.victim_pid, k.victim_comm);
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
    match (&k.memcg, k.constraint) {
        (Some(path), _) => {
            let _ = write!(s, " memcg={path}");
        }
        (None, "memcg") => s.push_str(" memcg=[removed]"),
        (None, _) => s.push_str(" global"),
    }
    // The victim's group, or its container's short id.
    let _ = write!(s, " cgroup={} loadavg: {}", k.cgroup.short(), k.loadavg);
    for frame in &k.trigger_stack {
        let _ = write!(s, "\n        {frame}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_caller_of_out_of_memory_decides() {
        let memcg = ["perf_trace_mark_victim", "mark_oom_victim", "__oom_kill_process", "oom_kill_process"];
        let memcg: Vec<&str> =
            memcg.iter().copied().chain(["out_of_memory", "mem_cgroup_out_of_memory", "try_charge_memcg"]).collect();
        assert_eq!(memcg_oom_by_stack(&memcg), Some(true));
        let global = ["mark_oom_victim", "out_of_memory", "__alloc_pages_slowpath.constprop.0", "__alloc_pages"];
        assert_eq!(memcg_oom_by_stack(&global), Some(false));
        assert_eq!(memcg_oom_by_stack(&["mark_oom_victim", "out_of_memory", "moom_callback"]), Some(false));
        // A memcg function further down does not make a global OOM a memcg one.
        let nested = ["out_of_memory", "__alloc_pages_slowpath", "mem_cgroup_css_alloc"];
        assert_eq!(memcg_oom_by_stack(&nested), Some(false));
        assert_eq!(memcg_oom_by_stack(&["mark_oom_victim", "out_of_memory"]), None);
        assert_eq!(memcg_oom_by_stack(&[]), None);
    }

    #[test]
    fn the_group_with_least_room_hit_its_limit() {
        const UNLIMITED: u64 = (i64::MAX as u64) / 4096 - 9000;
        const UNKNOWN: u64 = memtrace_common::oomkill::MARGIN_UNKNOWN;
        // /a/b/c (deepest first), then the root: /a has the least room (pages freed since the
        // kill began count too).
        let margins = [UNLIMITED, 9000, 300, UNLIMITED, UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN];
        assert_eq!(limited_level(&margins, 4, true), Some(2));
        // Equal room: the charge failed at the deeper group first.
        assert_eq!(limited_level(&[UNLIMITED, 0, 0, UNLIMITED, 0, 0, 0, 0], 4, true), Some(1));
        // The root is never the answer, whatever its counter says.
        assert_eq!(limited_level(&[UNLIMITED, 0, 0, 0, 0, 0, 0, 0], 2, true), None);
        // A chain cut at MEMCG_LEVELS has no root at its end.
        assert_eq!(limited_level(&[UNLIMITED, UNLIMITED, 5, 0, 0, 0, 0, 0], 3, false), Some(2));
        assert_eq!(limited_level(&[UNKNOWN; 8], 3, true), None);
    }
}
