//! The processes a user-mode memleak run follows: the one it was given, and with `-c` or
//! `--children` every process that one forks, each through its execs.
//!
//! Every process gets probes of its own (a uprobe filtered to one process costs the others
//! nothing), on the allocator of its current image. A forked child starts with a copy of its
//! parent's heap: the parent's records of it are copied to the child's pid, so a block the
//! child inherited and never frees is the child's leak, and one it frees is matched.

use std::{collections::BTreeMap, path::PathBuf};

use super::inproc::{Recorder, Shim, Tables};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    maps::{HashMap, MapData},
};
use memtrace_common::memleak::{AllocInfo, AllocKey, Tracked};

use super::attach;
use crate::{
    kernel::{
        self, UProbeLinkId,
        cgroup::{Attribution, MemcgPaths},
    },
    target,
    target::Allocator,
    tools::tracer::Tracer,
};

pub(super) struct Proc {
    pub alloc: Allocator,
    /// The probes on `alloc` for this process, detached when its allocator changes.
    links: Vec<(&'static str, UProbeLinkId)>,
    /// Execs seen since tracing began; records of older images are void.
    pub image: u32,
    pub parent: Option<u32>,
    pub comm: String,
    /// Set once the process is gone: its outstanding blocks are final, no age cut-off applies.
    pub exit_code: Option<i32>,
    pub exited: bool,
    /// The OOM killer chose it.
    pub oom_killed: bool,
    /// How its allocations are recorded: by probes (`alloc`), or in the process.
    pub recording: Recording,
    /// Its memory cgroup as last read from /proc (`Procs::read_cgroups`), kept after it exits.
    pub cgroup: Attribution,
}

/// How a process's allocations are recorded.
pub(super) enum Recording {
    /// By uprobes on `Proc::alloc` (none while it is unprobed).
    Probes,
    /// In the process, by memtrace's preloaded recorder, which has yet to be found there (its
    /// image was exec'd with it named in LD_PRELOAD; the loader has yet to map it).
    Expected,
    InProcess(Box<Recorder>),
}

/// What a process's allocations are now recorded by, when that changed.
pub(super) enum Recorded {
    Probes(PathBuf, usize),
    InProcess,
}

impl Recorded {
    pub(super) fn describe(&self) -> String {
        match self {
            Recorded::Probes(obj, probes) => format!("probed through {} with {probes} probes", obj.display()),
            Recorded::InProcess => "recorded in the process (memtrace's preloaded recorder)".into(),
        }
    }
}

pub(super) struct Procs {
    tracked: HashMap<MapData, u32, Tracked>,
    copying: HashMap<MapData, u32, u32>,
    early: HashMap<MapData, AllocKey, u32>,
    pub list: BTreeMap<u32, Proc>,
    prefix: String,
    obj: Option<PathBuf>,
    skip: &'static [&'static str],
    /// Processes and images whose probes went in after they had started running: their first
    /// moments were not seen.
    pub late: u64,
    /// New images memleak found no allocator in (a static program without malloc, say).
    pub unprobed: u64,
    /// Processes recording in themselves that ended with no exit stop (SIGKILL): their last
    /// moments were not read.
    pub unread_exits: u64,
    /// The in-process recorder, when `-c` preloads it, and the tables it is given.
    shim: Option<Shim>,
    tables: Tables,
    cgroups: MemcgPaths,
}

impl Procs {
    /// Reads the memory cgroup of each process still running: a process may be moved into
    /// its group after memleak found it (a container runtime moves its init before exec), and
    /// once it has exited /proc has nothing, so the last reading stays.
    pub(super) fn read_cgroups(&mut self) {
        for (&pid, p) in self.list.iter_mut().filter(|(_, p)| !p.exited) {
            if let Some(path) = self.cgroups.of_pid(pid) {
                p.cgroup = Attribution::of_path(Some(path));
            }
        }
    }

    pub(super) fn new(
        tracer: &mut Tracer,
        prefix: &str,
        obj: Option<PathBuf>,
        skip: &'static [&'static str],
    ) -> Result<Procs> {
        Ok(Procs {
            tracked: tracer.map(memtrace_common::memleak::names::TRACKED)?,
            copying: tracer.map(memtrace_common::memleak::names::COPYING)?,
            early: tracer.map(memtrace_common::memleak::names::EARLY_FREES)?,
            list: BTreeMap::new(),
            prefix: prefix.to_string(),
            obj,
            skip,
            late: 0,
            unprobed: 0,
            unread_exits: 0,
            cgroups: MemcgPaths::new(),
            shim: None,
            tables: Tables::default(),
        })
    }

    /// Records in the process, wherever `shim` loads, from now on.
    pub(super) fn record_in_process(&mut self, shim: Shim) {
        self.shim = Some(shim);
    }

    /// Starts following `pid` with the allocator `alloc`; returns the number of probes.
    pub(super) fn start(&mut self, bpf: &mut Ebpf, pid: u32, alloc: Allocator) -> Result<usize> {
        self.tracked.insert(pid, Tracked::default(), 0).context("cannot track the process")?;
        let links = attach::user(bpf, &alloc, &self.prefix, pid, self.skip)?;
        let probes = links.len();
        self.list.insert(pid, Proc { links, ..Proc::new(alloc, None, pid) });
        Ok(probes)
    }

    /// Follows the command memtrace started; its probes go in at its first exec.
    pub(super) fn begin_command(&mut self, pid: u32) -> Result<()> {
        self.tracked.insert(pid, Tracked::default(), 0).context("cannot track the command")?;
        self.list.insert(pid, Proc::new(Allocator::unprobed(), None, pid));
        Ok(())
    }

    /// Starts following a child that only ptrace told of (memtrace in its own pid namespace),
    /// as the kernel side would have at the fork; the child waits at its fork meanwhile.
    pub(super) fn track_child(&mut self, child: u32, parent: u32, shared: bool) -> Result<()> {
        self.tracked.insert(child, Tracked { image: 0, parent }, 0).context("cannot track a child")?;
        if !shared {
            self.copying.insert(child, 0, 0).context("cannot track a child")?;
        }
        Ok(())
    }

    /// `parent` forked `child` at `fork_ns`. `held`: the child has not run yet (`-c`).
    pub(super) fn fork(
        &mut self,
        bpf: &mut Ebpf,
        allocs: &mut HashMap<MapData, AllocKey, AllocInfo>,
        parent: u32,
        child: u32,
        fork_ns: u64,
        held: bool,
    ) {
        if self.list.contains_key(&child) {
            return;
        }
        let Some(from) = self.list.get(&parent) else { return };
        let (alloc, parent_image) = (from.alloc.clone(), from.image);
        // A recorder in the parent's memory is copied with it: the child's, with the blocks
        // it inherits.
        let recording = match &from.recording {
            Recording::InProcess(r) => Some(Recording::InProcess(Box::new(r.forked()))),
            Recording::Expected => Some(Recording::Expected),
            Recording::Probes => None,
        };
        if let Some(recording) = recording {
            self.list.insert(child, Proc { recording, ..Proc::new(Allocator::unprobed(), Some(parent), child) });
            return;
        }
        // A parent without a probed allocator (a static shell such as busybox) has nothing to
        // probe in the child either, but the child is followed: its exec may be the program.
        // A child gone before its probes went in has nothing to report.
        let links = if alloc.is_unprobed() {
            Vec::new()
        } else {
            match attach::user(bpf, &alloc, &self.prefix, child, self.skip) {
                Ok(links) => links,
                Err(_) => {
                    let _ = self.tracked.remove(&child);
                    let _ = self.copying.remove(&child);
                    return;
                }
            }
        };
        if !held {
            self.late += 1;
        }
        self.list.insert(child, Proc { links, ..Proc::new(alloc, Some(parent), child) });
        if self.copying.get(&child, 0).is_ok() {
            self.copy_inherited(allocs, parent, parent_image, child, fork_ns);
        }
    }

    /// Gives the child a record of each block its parent held when it forked. The kernel
    /// side noted the unknown addresses the child freed meanwhile; those are not copied.
    fn copy_inherited(
        &mut self,
        allocs: &mut HashMap<MapData, AllocKey, AllocInfo>,
        parent: u32,
        parent_image: u32,
        child: u32,
        fork_ns: u64,
    ) {
        let inherited: Vec<(AllocKey, AllocInfo)> = kernel::maps::dump(allocs)
            .into_iter()
            .filter(|(k, v)| k.pid == parent && k.image == parent_image && v.timestamp_ns < fork_ns)
            .collect();
        for (key, info) in inherited {
            let copy = AllocKey { pid: child, image: 0, addr: key.addr };
            // A block already there is the child's own newer one.
            if allocs.insert(copy, info, crate::kernel::maps::BPF_NOEXIST).is_ok() && self.early.get(&copy, 0).is_ok() {
                let _ = allocs.remove(&copy);
            }
        }
        // From here on a free of an unknown address by the child is an ordinary blind spot.
        let _ = self.copying.remove(&child);
        for (key, _) in kernel::maps::dump(&self.early) {
            if key.pid == child {
                let _ = self.early.remove(&key);
            }
        }
    }

    /// `pid` exec'd into generation `image`. `held`: it has not run yet (`-c`). Probes follow
    /// the process into its new image; an image with another allocator gets probes of its own,
    /// and the allocator and number of probes are returned. So does an exec by a thread other
    /// than the process's first (`from_thread`): the kernel ties a probe filtered by pid to the
    /// task that was the process's first thread, and that task ended with the exec, so its
    /// probes never fire again, even in the same files.
    pub(super) fn exec(
        &mut self,
        bpf: &mut Ebpf,
        pid: u32,
        image: u32,
        held: bool,
        from_thread: bool,
    ) -> Result<Option<Recorded>> {
        let Some(proc) = self.list.get_mut(&pid) else { return Ok(None) };
        proc.image = proc.image.max(image);
        proc.comm = target::comm(pid);
        // What the old image recorded in its own memory went with it.
        proc.recording = Recording::Probes;
        if held && self.shim.as_ref().is_some_and(|shim| shim.will_load(pid)) {
            // No probes: the loader maps the recorder first (`mapped` checks that it did).
            self.unprobe(bpf, pid);
            let proc = self.list.get_mut(&pid).expect("looked up above");
            proc.recording = Recording::Expected;
            return Ok(None);
        }
        // Held, nothing is mapped but the program and its loader: the loader's rules tell
        // what it will map (and `mapped` checks it). Running (-p), it may have mapped them.
        let found = if held { None } else { target::mapped_allocator(pid) };
        let detected = match found.map_or_else(|| target::allocator_after_exec(pid), Ok) {
            Ok(alloc) => alloc,
            // Gone before its new image was read (-p on a slow machine): its blocks are still
            // counted where its allocator stayed the same; only the frames lack names.
            Err(_) if !std::path::Path::new(&format!("/proc/{pid}")).exists() => return Ok(None),
            // Held, the mappings will tell (`mapped`); running, this image goes unprobed.
            Err(e) if held => {
                tracing::info!("pid {pid}: its allocator is known once the loader maps it: {e:#}");
                self.unprobe(bpf, pid);
                return Ok(None);
            }
            Err(e) => {
                tracing::warn!("pid {pid} exec'd into an image memleak cannot probe: {e:#}");
                self.unprobed += 1;
                return Ok(None);
            }
        };
        if !held {
            self.late += 1;
        }
        if from_thread && let Some(proc) = self.list.get_mut(&pid) {
            // The old probes cannot fire again; the same files get new ones below.
            proc.alloc = Allocator::unprobed();
            attach::detach_later(std::mem::take(&mut proc.links));
        }
        self.probe(bpf, pid, detected)
    }

    /// `pid` (held, `-c`) has just mapped code. With the recorder expected in it: once it is
    /// there and set up, it is told where the code and its unwind rows are, each time new code
    /// comes; if the loader mapped libc without it (a preload that failed), probes go in
    /// instead, before any of that code runs. With probes: when a libc or an allocator library
    /// is now mapped that is not what they are on (the loader found another file than
    /// predicted, or the prediction failed), they move to it.
    pub(super) fn mapped(&mut self, bpf: &mut Ebpf, pid: u32) -> Result<Option<Recorded>> {
        let Some(proc) = self.list.get_mut(&pid) else { return Ok(None) };
        match (&mut proc.recording, &self.shim) {
            (Recording::InProcess(recorder), _) => {
                if let Err(e) = recorder.describe_code(pid, &mut self.tables) {
                    tracing::info!("pid {pid}: cannot describe its code to its recorder: {e:#}");
                }
                return Ok(None);
            }
            (Recording::Expected, Some(shim)) => {
                if let Some(mut recorder) = Recorder::find(shim, pid) {
                    recorder.describe_code(pid, &mut self.tables)?;
                    proc.recording = Recording::InProcess(Box::new(recorder));
                    return Ok(Some(Recorded::InProcess));
                }
                if shim.mapped_in(pid).is_some() || target::mapped_allocator(pid).is_none() {
                    // Mapped and not set up yet, or the loader still at work before libc.
                    return Ok(None);
                }
                tracing::info!("pid {pid}: the loader mapped libc without memtrace's recorder: probes instead");
                proc.recording = Recording::Probes;
            }
            _ => {}
        }
        let Some(proc) = self.list.get(&pid) else { return Ok(None) };
        let Some(mapped) = target::mapped_allocator(pid) else { return Ok(None) };
        if !target::contradicts(&mapped, &proc.alloc) {
            return Ok(None);
        }
        let was = proc.alloc.primary.display().to_string();
        tracing::info!(
            "pid {pid} maps {} where its probes were on {}: probed again",
            mapped.primary.display(),
            if was.is_empty() { "nothing yet" } else { &was }
        );
        self.probe(bpf, pid, mapped)
    }

    /// Moves `pid`'s probes to `detected` (with `-O` applied), unless they are on those
    /// files already; returns the allocator and number of probes when they moved.
    fn probe(&mut self, bpf: &mut Ebpf, pid: u32, detected: Allocator) -> Result<Option<Recorded>> {
        let alloc = super::with_obj(detected, self.obj.as_ref())?;
        let Some(proc) = self.list.get(&pid) else { return Ok(None) };
        if same_files(&alloc, &proc.alloc) {
            return Ok(None);
        }
        // Until its probes are in, the image has no allocator of memleak's: its children
        // are followed without probes of their own (see `fork`).
        self.unprobe(bpf, pid);
        match attach::user(bpf, &alloc, &self.prefix, pid, self.skip) {
            Ok(links) => {
                let probes = links.len();
                let proc = self.list.get_mut(&pid).expect("looked up above");
                (proc.alloc, proc.links) = (alloc.clone(), links);
                Ok(Some(Recorded::Probes(alloc.primary, probes)))
            }
            Err(e) if e.downcast_ref::<kernel::ProgramRejected>().is_some() => Err(e),
            Err(e) => {
                tracing::warn!("pid {pid}: cannot probe its allocator {}: {e:#}", alloc.primary.display());
                self.unprobed += 1;
                Ok(None)
            }
        }
    }

    /// Takes `pid`'s probes off its allocator.
    fn unprobe(&mut self, bpf: &mut Ebpf, pid: u32) {
        if let Some(proc) = self.list.get_mut(&pid) {
            proc.alloc = Allocator::unprobed();
            attach::detach(bpf, std::mem::take(&mut proc.links));
        }
    }

    /// `pid` is stopped at its exit with its memory whole: its recorder's last read.
    pub(super) fn exiting(&mut self, pid: u32) {
        if let Some(Proc { recording: Recording::InProcess(recorder), .. }) = self.list.get_mut(&pid) {
            match recorder.snapshot(pid) {
                Ok(_) => recorder.read_at_exit = true,
                Err(e) => tracing::info!("pid {pid}: cannot read its recorder at exit: {e:#}"),
            }
        }
    }

    /// The OOM killer chose `pid`: its recorder, when it records in itself, is read now, as its
    /// memory goes with it. False when that read failed (the kernel was quicker) and the read
    /// before stands. None when memleak does not follow `pid`.
    pub(super) fn read_at_kill(&mut self, pid: u32) -> Option<bool> {
        let proc = self.list.get_mut(&pid)?;
        proc.oom_killed = true;
        let Recording::InProcess(recorder) = &mut proc.recording else { return Some(true) };
        match recorder.snapshot(pid) {
            Ok(_) => Some(true),
            Err(e) => {
                tracing::warn!("pid {pid}: cannot read its recorder at its OOM kill: {e:#}");
                Some(false)
            }
        }
    }

    /// Reads the recorders of the processes still running (the others keep their last read).
    pub(super) fn read_recorders(&mut self) {
        for (&pid, proc) in &mut self.list {
            if let (false, Recording::InProcess(recorder)) = (proc.exited, &mut proc.recording) {
                // Gone between its exit stop and now: its read at that stop stands.
                let _ = recorder.snapshot(pid);
            }
        }
    }

    /// Reads the errors the running processes' recorders found since the last read.
    pub(super) fn poll_errors(&mut self) {
        for (&pid, proc) in &mut self.list {
            if let (false, Recording::InProcess(recorder)) = (proc.exited, &mut proc.recording) {
                let _ = recorder.poll_errors(pid);
            }
        }
    }

    pub(super) fn exited(&mut self, pid: u32, code: Option<i32>) {
        if let Some(proc) = self.list.get_mut(&pid) {
            // SIGKILL ends a process without an exit stop: its recorder was last read at the
            // report before, and what it did after that is not seen.
            if let (false, Recording::InProcess(r)) = (proc.exited, &proc.recording)
                && !r.read_at_exit
            {
                self.unread_exits += 1;
            }
            proc.exited = true;
            proc.exit_code = proc.exit_code.or(code);
            // Its pid may be reused by a process nobody asked to trace.
            let _ = self.tracked.remove(&pid);
        }
    }

    pub(super) fn all_exited(&self) -> bool {
        self.list.values().all(|p| p.exited)
    }

    /// The current image of each process, read from the kernel side (which bumps it at exec
    /// before user space hears of it).
    pub(super) fn images(&self) -> std::collections::HashMap<u32, u32> {
        let mut images: std::collections::HashMap<u32, u32> =
            self.list.iter().map(|(&pid, p)| (pid, p.image)).collect();
        for (pid, t) in kernel::maps::dump(&self.tracked) {
            images.insert(pid, t.image);
        }
        images
    }
}

impl Proc {
    fn new(alloc: Allocator, parent: Option<u32>, pid: u32) -> Proc {
        Proc {
            alloc,
            links: Vec::new(),
            image: 0,
            parent,
            comm: target::comm(pid),
            exit_code: None,
            exited: false,
            oom_killed: false,
            recording: Recording::Probes,
            // Read again at each report while it runs (`read_cgroups`).
            cgroup: Attribution::of_path(MemcgPaths::new().of_pid(pid)),
        }
    }
}

/// Whether two allocators are the same files (a new image of the same program, or with the
/// same libc), whatever path they were found by.
fn same_files(a: &Allocator, b: &Allocator) -> bool {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &PathBuf| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let ids = |x: &Allocator| (id(&x.primary), x.libc.as_ref().and_then(id));
    ids(a) == ids(b) && id(&a.primary).is_some()
}
