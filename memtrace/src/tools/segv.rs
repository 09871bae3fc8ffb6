//! segv: one record per SIGSEGV, SIGBUS or SIGABRT that kills a process (`--all`: every one
//! delivered), with the fault's address, its class, and the user stack at the fault.
//!
//! Everything that needs the process's memory is read in the kernel at the delivery, while
//! the process still has it (the mapping at the address, the stack); what user space adds
//! afterwards (names for the frames, the cgroup's path) must not depend on the process, which
//! is gone by then: its frames are named from the snapshot of its mappings taken when memtrace
//! started (`-p`, `--comm`) or, failing that, at the event if it is still there.

use std::collections::HashSet;

use anyhow::Result;
use memtrace_common::{
    STACK_LOST, names,
    segv::{CLASS_NEEDS_MAPS, Config, Event, Fault, Offsets, STAT_MESSAGES_FULL, STAT_USTACK_LOST},
};
use serde::Serialize;

use crate::{
    kernel::{
        self, AttachPoint, Probe, btf,
        cgroup::{Attribution, MemcgPaths},
        tracefs::Format,
    },
    output::{self, events::Events},
    symbolize::{Frame, UnnamedFrames, UserSymbolizer},
    tools::registry::{Plan, ToolSpec},
    tools::tracer::Tracer,
    tools::{self, CommonArgs, c_str, stacks::StackStore},
    unwind::Unwinder,
};

mod decode;
mod printerr;

const OBJECT: crate::kernel::Object = crate::ebpf_object!("segv", walking_user_stacks);

const DELIVER: AttachPoint = AttachPoint {
    label: "tracepoint signal:signal_deliver",
    probes: &[Probe::Tracepoint { prog: "segv_deliver", category: "signal", names: &["signal_deliver"] }],
};
/// How segv attaches, as `memtrace probe` reports it (plus a uprobe on glibc's malloc_printerr).
pub const ATTACH: &[AttachPoint] = &[DELIVER];

pub const SPEC: ToolSpec = ToolSpec {
    names: memtrace_common::segv::names::ALL,
    name: "segv",
    object: OBJECT,
    modes: &[("segv", Plan::Points(ATTACH))],
    optional: &[],
};

/// Trace crashes: SIGSEGV, SIGBUS and SIGABRT, classified, with the stack at the fault.
#[derive(clap::Args, Debug)]
#[command(after_help = "Classes: stack overflow, NULL page, unmapped address, write to a read-only mapping, \
                        execute of a non-executable mapping, heap corruption caught by glibc's allocator (with its \
                        message), abort. Mappings are looked up in the kernel at the fault (Linux 5.17+).")]
pub struct Args {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub unwind: tools::args::UnwindArgs,
    /// Every such signal delivered, also those a handler catches (not only those that kill).
    #[arg(long)]
    pub all: bool,
}

impl Args {
    /// Everything that can be checked before loading anything (and without root).
    pub fn validate(&self) -> Result<()> {
        self.unwind.validate()?;
        self.common.validate_user_target()
    }
}

fn offsets() -> Result<Offsets> {
    let format = Format::read("signal", "signal_deliver")?;
    let off = btf::member_offset;
    Ok(Offsets {
        sig: format.offset("sig")?,
        code: format.offset("code")?,
        sa_handler: format.offset("sa_handler")?,
        cr2: off("task_struct", "thread.cr2")?,
        trap_nr: off("task_struct", "thread.trap_nr")?,
        error_code: off("task_struct", "thread.error_code")?,
        task_mm: off("task_struct", "mm")?,
        mm_start_stack: off("mm_struct", "start_stack")?,
        vm_start: off("vm_area_struct", "vm_start")?,
        vm_end: off("vm_area_struct", "vm_end")?,
        vm_flags: off("vm_area_struct", "vm_flags")?,
        vm_file: off("vm_area_struct", "vm_file")?,
        task_stack: off("task_struct", "stack")?,
        // x86-64's THREAD_SIZE without KASAN (which doubles it; Debian's kernels have none).
        thread_size: 16 << 10,
    })
}

pub async fn run(args: Args) -> Result<()> {
    kernel::require_root()?;
    let filter = args.common.filter()?;
    let offsets = offsets()?;
    let mmap_min_addr =
        std::fs::read_to_string("/proc/sys/vm/mmap_min_addr").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(4096);
    let config = Config { all: args.all as u32, self_pid: std::process::id(), mmap_min_addr };
    let mut tracer = Tracer::load(&SPEC, |loader| {
        loader
            .override_global(names::FILTER, &filter, true)
            .override_global(memtrace_common::segv::names::CONFIG, &config, true)
            .override_global(memtrace_common::segv::names::OFFSETS, &offsets, true);
        args.unwind.configure(loader);
    })?;
    let unwinder = args.unwind.start(&mut tracer.bpf, &args.common)?;
    // The selected processes' mappings now: at the crash they are gone with the process.
    let mut symbolizer = UserSymbolizer::new();
    let mut seen = HashSet::new();
    for pid in crate::target::matching(args.common.target.pid, args.common.comm.as_deref()) {
        if matches!(symbolizer.refresh(pid), Ok(true)) {
            seen.insert(pid);
        }
    }
    let mut how = vec![tracer.attach(ATTACH)?.to_string()];
    match printerr::attach(&mut tracer.bpf, args.common.target.pid) {
        Ok(probe) => how.push(probe),
        Err(e) => eprintln!("memtrace: segv: heap aborts shown without glibc's message: {e:#}"),
    }
    let stacks = StackStore::take(&mut tracer.bpf, None)?;
    let stats = tracer.map(memtrace_common::segv::names::STATS)?;
    let whose = match args.common.target.pid {
        Some(pid) => format!(" of pid {pid} ({})", crate::target::comm(pid)),
        None => String::new(),
    };
    let what = if args.all { "SIGSEGV, SIGBUS and SIGABRT delivered" } else { "crashes (SIGSEGV, SIGBUS, SIGABRT)" };
    let ready = format!("tracing {what}{whose} ({})", how.join(", "));
    let mut state = Live {
        stacks,
        stats,
        unwinder,
        symbolizer,
        seen,
        json: args.common.run.json,
        mmap_min_addr,
        cgroups: MemcgPaths::new(),
        unnamed: UnnamedFrames::default(),
        unseen: 0,
        unclassified: 0,
        out: Events::new(
            args.common.run.json,
            false,
            "PID     COMM             SIGNAL  CODE        ADDRESS            CLASS",
        ),
    };
    tracer.stream(&args.common, None, None, &ready, &mut state).await?;
    Ok(())
}

struct Live {
    stacks: StackStore,
    stats: aya::maps::PerCpuArray<aya::maps::MapData, u64>,
    unwinder: Unwinder,
    symbolizer: UserSymbolizer,
    /// Processes whose mappings the symbolizer holds.
    seen: HashSet<u32>,
    json: bool,
    mmap_min_addr: u64,
    cgroups: MemcgPaths,
    unnamed: UnnamedFrames,
    /// Crashes of processes whose mappings memtrace never saw (gone before it looked).
    unseen: u64,
    /// Faults the kernel could not classify and the maps were gone for (before 5.17).
    unclassified: u64,
    out: Events,
}

/// One crash, as printed.
#[derive(Serialize)]
struct Crash {
    time: String,
    pid: u32,
    tid: u32,
    comm: String,
    /// The crashing task's memory cgroup, read by the kernel side at the crash.
    #[serde(flatten)]
    cgroup: Attribution,
    signal: String,
    code: String,
    fatal: bool,
    /// The fault's address (SIGSEGV and SIGBUS from a page fault), a hex string.
    address: Option<String>,
    ip: String,
    sp: String,
    /// The x86 page-fault error code, decoded.
    access: Option<String>,
    class: &'static str,
    class_text: &'static str,
    /// glibc's message, for a heap check that failed.
    message: Option<String>,
    /// The mapping at the address: start-end and permissions.
    mapping: Option<String>,
    frames: Vec<Frame>,
}

impl Live {
    fn crash(&mut self, e: &Event) -> Crash {
        let mut class = e.class;
        let mut vma = (e.has_vma != 0).then_some(e.vma);
        if class == CLASS_NEEDS_MAPS {
            let fault = Fault {
                sig: e.sig,
                code: e.code,
                address: e.address,
                sp: e.sp,
                error_code: e.error_code,
                start_stack: e.start_stack,
                mmap_min_addr: self.mmap_min_addr,
            };
            match decode::classify_from_maps(e.pid, &fault) {
                Some((c, v)) => (class, vma) = (c, v),
                None => self.unclassified += 1,
            }
        }
        let (class, class_text) = decode::class_name(class);
        let frames = self.frames(e);
        self.unnamed += UnnamedFrames::of(&frames);
        let hex = |v: u64| format!("{v:#x}");
        let has_address = e.has_address != 0;
        Crash {
            time: output::now_ms(),
            pid: e.pid,
            tid: e.tid,
            comm: c_str(&e.comm),
            cgroup: self.cgroups.attribution_of_id(e.cgroup),
            signal: decode::signal_name(e.sig),
            code: decode::code_name(e.sig, e.code),
            fatal: e.fatal != 0,
            address: has_address.then(|| hex(e.address)),
            ip: hex(e.ip),
            sp: hex(e.sp),
            access: has_address.then(|| tools::faults::decode_error(e.error_code)),
            class,
            class_text,
            message: (e.has_message != 0).then(|| c_str(&e.message.text)),
            mapping: vma.map(|v| {
                let bit = |f: u64, c: char| if v.flags & f != 0 { c } else { '-' };
                use memtrace_common::segv::{VM_EXEC, VM_READ, VM_WRITE};
                let perms: String = [bit(VM_READ, 'r'), bit(VM_WRITE, 'w'), bit(VM_EXEC, 'x')].into_iter().collect();
                format!("{:#x}-{:#x} {perms}{}", v.start, v.end, if v.file != 0 { " file" } else { "" })
            }),
            frames,
        }
    }

    /// The stack at the fault: its first frame is the faulting instruction (or, for an abort,
    /// where the kill syscall returns to).
    fn frames(&mut self, e: &Event) -> Vec<Frame> {
        let id = if e.user_stack != STACK_LOST && self.stacks.ips(e.user_stack).len() > 1 || e.fp_stack == STACK_LOST {
            e.user_stack
        } else {
            e.fp_stack
        };
        let ips = self.stacks.ips(id);
        // A handled signal's process lives on; a dying one keeps the snapshot it had, if any.
        if matches!(self.symbolizer.refresh(e.pid), Ok(true)) {
            self.seen.insert(e.pid);
        } else if !self.seen.contains(&e.pid) {
            self.unseen += 1;
        }
        let frames = tools::stacks::user_frames(&mut self.symbolizer, e.pid, &ips, true);
        if e.fatal != 0 && self.seen.remove(&e.pid) {
            self.symbolizer.forget(e.pid);
        }
        frames
    }
}

impl tools::Stream for Live {
    type Side = ();

    fn unwinder(&mut self) -> Option<&mut Unwinder> {
        Some(&mut self.unwinder)
    }

    fn event(&mut self, data: &[u8]) -> Result<()> {
        let Some(event) = tools::read_event::<Event>(data) else { return Ok(()) };
        let crash = self.crash(&event);
        self.out.record(0, || &crash, || render(&crash))
    }

    fn finish(&mut self, lost: u64) -> Result<()> {
        let stat = |i| crate::kernel::maps::sum(&self.stats, i);
        let spots = [
            (stat(STAT_USTACK_LOST), "crashes without a user stack"),
            (self.unseen, "crashes of processes gone before memtrace read their mappings (frames unnamed)"),
            (
                self.unclassified,
                "faults unclassified (the process was gone before its mappings were read: Linux 5.17+ classifies in the kernel)",
            ),
            (stat(STAT_MESSAGES_FULL), "allocator messages not kept (map full)"),
        ];
        let (cut, unnamed) = (self.unwinder.cut(), self.unnamed);
        let json = serde_json::json!({
            "crashes": self.out.count,
            "stacks_lost": spots[0].0,
            "unseen_processes": spots[1].0,
            "unclassified": spots[2].0,
            "messages_lost": spots[3].0,
            "cut_stacks": cut,
            "unnamed_frames": unnamed,
        });
        self.out.finish(lost, json)?;
        if !self.json {
            eprintln!("memtrace: segv: {}", output::stack_blind_spots(&spots, &cut, &unnamed));
        }
        Ok(())
    }
}

fn render(c: &Crash) -> String {
    use std::fmt::Write as _;
    let mut s = format!(
        "{:<7} {:<16} {:<7} {:<11} {:<18} {}",
        c.pid,
        c.comm,
        c.signal,
        c.code,
        c.address.as_deref().unwrap_or("-"),
        c.class_text
    );
    if let Some(m) = &c.message {
        let _ = write!(s, ": \"{m}\"");
    }
    if !c.fatal {
        s.push_str(" (handled)");
    }
    let _ = write!(s, "\n        tid {} ip {} sp {}", c.tid, c.ip, c.sp);
    if let Some(a) = &c.access {
        let _ = write!(s, " {a}");
    }
    if let Some(m) = &c.mapping {
        let _ = write!(s, " mapping {m}");
    }
    let _ = write!(s, " cgroup {}", c.cgroup.short());
    // A recursion fills the stack with one frame: shown once, with its count.
    let mut i = 0;
    while i < c.frames.len() {
        let frame = &c.frames[i];
        let same = c.frames[i..].iter().take_while(|f| f.func == frame.func && f.addr == frame.addr).count();
        let _ = write!(s, "\n        {frame}");
        if same > 1 {
            let _ = write!(s, "\n        ... the same frame {} more times", same - 1);
        }
        i += same;
    }
    s
}
