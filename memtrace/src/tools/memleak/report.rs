//! memleak's reports: outstanding bytes per stack read from the maps, symbolized, followed
//! over time, and printed as a table or JSON.

use std::{
    collections::{HashMap as StdHashMap, VecDeque},
    time::Instant,
};

use anyhow::Result;
use aya::maps::{HashMap, MapData, PerCpuArray};
use memtrace_common::{
    NO_PID, STACK_LOST,
    memleak::{
        AllocInfo, AllocKey, ERR_INVALID_FREE, EV_ALLOC, EV_FREE, EV_NEW_STACK, Event, FN_MMAP_FILE, FN_NAMES,
        MemError, STAT_EARLY_FULL, STAT_EVENTS_LOST, STAT_FAILED, STAT_FREE_CALLS, STAT_FREE_CALLS_IN_WINDOW,
        STAT_FREED, STAT_FREED_RECORDED, STAT_FREED_REUSED, STAT_INVALID_FREES, STAT_MAP_FULL, STAT_REPLACED,
        STAT_STACK_LOST, STAT_TRACKED, STAT_UNKNOWN_FREE, STAT_UNTRACKED_CHILDREN, STAT_WATCH_IN_ALLOCATOR,
        STAT_WATCH_STALE, StackKey,
    },
};
use serde::Serialize;

use super::blind_spots::BlindSpots;
use super::{
    Args,
    errors::{self, ErrorReport},
    inproc::{self, Snapshot},
    oom::{HeapAtKill, KillStack},
    procs::{Procs, Recording},
    sampling::{Sampling, SamplingJson},
    watch::{self, Watcher},
};
use crate::{
    kernel,
    output::{self, reports::ReportPrinter},
    symbolize::{Frame, KernelSymbolizer, UnnamedFrames, UserSymbolizer},
    sys::monotonic_ns,
    tools::stacks::{self, StackStore},
    tools::tracer::Tracer,
    unwind::Unwinder,
};

pub(super) struct Maps {
    allocs: HashMap<MapData, AllocKey, AllocInfo>,
    stacks: StackStore,
    stats: PerCpuArray<MapData, u64>,
}

impl Maps {
    pub(super) fn take(tracer: &mut Tracer) -> Result<Maps> {
        let (allocs, stats) =
            (tracer.map(memtrace_common::memleak::names::ALLOCS)?, tracer.map(memtrace_common::memleak::names::STATS)?);
        let stacks = StackStore::take(&mut tracer.bpf, Some("--max-stacks"))?;
        Ok(Maps { allocs, stacks, stats })
    }

    fn stat(&self, index: u32) -> u64 {
        crate::kernel::maps::sum(&self.stats, index)
    }

    /// Freed blocks the kernel side's record dropped for room: at least this many (its LRU
    /// map may drop a few before it is full).
    fn freed_evicted(&self, capacity: u64) -> u64 {
        let kept = self.stat(STAT_FREED_RECORDED).saturating_sub(self.stat(STAT_FREED_REUSED));
        kept.saturating_sub(capacity)
    }

    fn blind_spots(&self, procs: &Procs, freed_capacity: u64) -> BlindSpots {
        BlindSpots {
            map_full: self.stat(STAT_MAP_FULL),
            stacks_lost: self.stat(STAT_STACK_LOST),
            // Invalid frees are errors, reported as such.
            unknown_frees: self.stat(STAT_UNKNOWN_FREE).saturating_sub(self.stat(STAT_INVALID_FREES)),
            freed_evicted: self.freed_evicted(freed_capacity),
            replaced: self.stat(STAT_REPLACED),
            events_lost: self.stat(STAT_EVENTS_LOST),
            late_processes: procs.late,
            unprobed_images: procs.unprobed,
            untracked_children: self.stat(STAT_UNTRACKED_CHILDREN),
            early_frees_lost: self.stat(STAT_EARLY_FULL),
            unread_exits: procs.unread_exits,
            stack_store_full: self.stacks.full(),
            stack_store_capacity: self.stacks.capacity(),
            ..Default::default()
        }
    }

    /// Outstanding bytes per stack, from one consistent read of the per-address map (see
    /// `kernel::maps::dump`): blocks that do not change while it is read count exactly once.
    /// Blocks younger than `older_ns` are left out, except in processes that have exited.
    /// Records of an image a process has exec'd away from are void, and deleted.
    /// `recorded`: each process recording in itself, its image, and its recorder's last read.
    /// Sampled: each stack's bytes and count are estimates, each block weighed by `sampling`.
    fn rows(
        &mut self,
        sampling: Sampling,
        older_ns: u64,
        with_allocs: bool,
        images: &StdHashMap<u32, u32>,
        exited: &dyn Fn(u32) -> bool,
        recorded: &[(u32, u32, &Snapshot)],
    ) -> (Vec<Row>, FileMappings) {
        let mut rows: StdHashMap<StackKey, Row> = StdHashMap::new();
        let mut files = FileMappings::default();
        let now = monotonic_ns();
        let from_kernel = kernel::maps::dump(&self.allocs).into_iter().filter(|(key, _)| {
            let void = key.pid != NO_PID && images.get(&key.pid).is_some_and(|&image| key.image < image);
            if void {
                let _ = self.allocs.remove(key);
            }
            !void
        });
        let from_kernel: Vec<(AllocKey, AllocInfo)> = from_kernel.collect();
        let from_processes = recorded.iter().flat_map(|&(pid, image, snap)| {
            snap.blocks.iter().map(move |b| {
                let key = AllocKey { pid, image, addr: b.addr };
                (key, AllocInfo { size: b.size, timestamp_ns: b.time_ns, stack_id: b.stack, func: b.func, _pad: 0 })
            })
        });
        for (key, info) in from_kernel.into_iter().chain(from_processes) {
            let age = now.saturating_sub(info.timestamp_ns);
            if age < older_ns && !(key.pid != NO_PID && exited(key.pid)) {
                continue;
            }
            if info.func == FN_MMAP_FILE {
                files.bytes += info.size;
                files.mappings += 1;
                continue;
            }
            let skey = StackKey { pid: key.pid, image: key.image, stack_id: info.stack_id };
            let row = rows.entry(skey).or_insert_with(|| Row {
                key: skey,
                bytes: 0,
                allocs: 0,
                estimate: (0.0, 0.0),
                allocations: Vec::new(),
            });
            row.bytes += info.size;
            row.allocs += 1;
            let weight = sampling.weight(info.size);
            row.estimate.0 += info.size as f64 * weight;
            row.estimate.1 += weight;
            if with_allocs {
                row.allocations.push(Allocation { addr: key.addr, size: info.size, age_ms: age / 1_000_000 });
            }
        }
        let mut rows: Vec<Row> = rows.into_values().collect();
        if sampling.is_sampled() {
            for row in &mut rows {
                (row.bytes, row.allocs) = (row.estimate.0.round() as u64, row.estimate.1.round() as u64);
            }
        }
        rows.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(b.allocs.cmp(&a.allocs)).then(a.key.pid.cmp(&b.key.pid)));
        (rows, files)
    }
}

/// Files the process mapped with `mmap` and has not unmapped: their pages belong to the file
/// (a git packfile, locale-archive), so they are not allocations and stay out of the total.
#[derive(Serialize, Default, Clone, Copy, PartialEq, Eq, Debug)]
struct FileMappings {
    bytes: u64,
    mappings: u64,
}

struct Row {
    key: StackKey,
    bytes: u64,
    allocs: u64,
    /// The bytes and count the sampled blocks stand for.
    estimate: (f64, f64),
    allocations: Vec<Allocation>,
}

#[derive(Serialize, Clone)]
struct Allocation {
    #[serde(serialize_with = "crate::output::hex::serialize")]
    addr: u64,
    size: u64,
    age_ms: u64,
}

/// One report, as JSON.
#[derive(Serialize)]
struct Report {
    time: String,
    /// The traced process; null in kernel mode.
    pid: Option<u32>,
    mode: &'static str,
    /// True for the last report (target exited, Ctrl-C, count or duration reached).
    #[serde(rename = "final")]
    is_final: bool,
    /// Sampling rate: with N > 1 one allocation in N is recorded (and the numbers estimated).
    sample_rate: u32,
    /// True when allocations are sampled (-s, --sample-bytes: see `sampling`) or under
    /// --duty-cycle (the recorded ones times `scale`): bytes and counts are estimates.
    estimated: bool,
    /// How allocations were sampled; absent when every one is recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    sampling: Option<SamplingJson>,
    /// All free() calls over those made while recording (1 when everything is recorded).
    scale: f64,
    total_bytes: u64,
    /// Stacks whose outstanding bytes grew over the last reports, of all (not only those shown).
    growing_stacks: u64,
    /// Allocations recorded and frees matched since the start.
    tracked: u64,
    freed: u64,
    /// Allocation calls that returned NULL (MAP_FAILED for mmap): nothing to track, not a
    /// blind spot, but a sign of memory pressure or of absurd sizes.
    failed: u64,
    /// File mappings still in place, not counted in `total_bytes`.
    file_mappings: FileMappings,
    stacks: Vec<OutstandingStack>,
    /// `--errors-only`: `stacks` is empty, as leaks are not reported.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    errors_only: bool,
    /// Each process followed (user mode): with `-c` or `--children`, the whole tree.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    processes: Vec<ProcessReport>,
    /// The memory errors found so far (each also printed when found).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    errors: Vec<ErrorReport>,
    /// With --watch: what was watched, for how long, and what it could not see.
    #[serde(skip_serializing_if = "Option::is_none")]
    watch: Option<watch::Summary>,
    blind_spots: BlindSpots,
}

#[derive(Serialize)]
struct ProcessReport {
    pid: u32,
    /// The process it was forked from, when memleak followed that fork.
    parent: Option<u32>,
    comm: String,
    exited: bool,
    exit_code: Option<i32>,
    /// The OOM killer chose it (its heap at that moment was reported then).
    oom_killed: bool,
    /// Its outstanding bytes and allocations, over all its stacks.
    bytes: u64,
    allocs: u64,
    #[serde(flatten)]
    cgroup: kernel::cgroup::Attribution,
}

#[derive(Serialize)]
struct OutstandingStack {
    pid: u32,
    stack_id: Option<String>,
    bytes: u64,
    allocs: u64,
    /// growing / steady / shrinking / new: the stack's outstanding bytes over the last reports.
    trend: &'static str,
    /// Change of outstanding bytes per second over the reports seen so far.
    growth_bytes_per_sec: f64,
    frames: Vec<Frame>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    allocations: Vec<Allocation>,
}

/// Outstanding bytes of each stack over time: tells a leak (keeps growing) from a cache or
/// pool (grows, then holds steady), which an age cut-off alone cannot.
#[derive(Default)]
struct Trends {
    history: StdHashMap<StackKey, VecDeque<(Instant, u64)>>,
}

impl Trends {
    const KEEP: usize = 12;

    fn observe(&mut self, key: StackKey, bytes: u64, now: Instant) -> (&'static str, f64) {
        let h = self.history.entry(key).or_default();
        h.push_back((now, bytes));
        if h.len() > Self::KEEP {
            h.pop_front();
        }
        classify(h.iter().map(|&(t, b)| (t.duration_since(h[0].0).as_secs_f64(), b)).collect::<Vec<_>>().as_slice())
    }
}

/// Classifies a series of (seconds since first sample, bytes).
fn classify(samples: &[(f64, u64)]) -> (&'static str, f64) {
    let (Some(&(t0, b0)), Some(&(t1, b1))) = (samples.first(), samples.last()) else { return ("new", 0.0) };
    if samples.len() < 2 {
        return ("new", 0.0);
    }
    let rate = if t1 > t0 { (b1 as f64 - b0 as f64) / (t1 - t0) } else { 0.0 };
    let recent = &samples[samples.len().saturating_sub(4)..];
    let steps: Vec<i128> = recent.windows(2).map(|w| w[1].1 as i128 - w[0].1 as i128).collect();
    let trend = if steps.iter().all(|&d| d > 0) {
        "growing"
    } else if steps.iter().all(|&d| d == 0) {
        "steady"
    } else if steps.iter().all(|&d| d <= 0) {
        "shrinking"
    } else if b1 > b0 {
        "growing"
    } else {
        "steady"
    };
    (trend, rate)
}

/// Reporting state: maps, symbolizers and caches.
pub(super) struct Session<'a> {
    args: &'a Args,
    pid: Option<u32>,
    maps: Maps,
    pub(super) user_sym: UserSymbolizer,
    kernel_sym: Option<KernelSymbolizer>,
    stack_cache: StdHashMap<StackKey, Vec<Frame>>,
    trends: Trends,
    pub(super) unwinder: Unwinder,
    out: ReportPrinter,
    errors: Vec<ErrorReport>,
    errors_lost: u64,
    /// With --watch.
    pub(super) watch: Option<Watcher>,
}

impl<'a> Session<'a> {
    /// The per-address map, for copying a forked child's inheritance.
    pub(super) fn allocs_mut(&mut self) -> &mut HashMap<MapData, AllocKey, AllocInfo> {
        &mut self.maps.allocs
    }

    pub(super) fn new(
        args: &'a Args,
        pid: Option<u32>,
        maps: Maps,
        unwinder: Unwinder,
        user_sym: UserSymbolizer,
    ) -> Result<Self> {
        let kernel_sym = if pid.is_none() { Some(KernelSymbolizer::new()?) } else { None };
        Ok(Session {
            args,
            pid,
            maps,
            user_sym,
            kernel_sym,
            stack_cache: StdHashMap::new(),
            trends: Trends::default(),
            unwinder,
            out: ReportPrinter::new("memleak", args.run.json),
            errors: Vec::new(),
            errors_lost: 0,
            watch: None,
        })
    }

    /// Moves --watch's watchpoints to other blocks of the processes followed; how long until
    /// the next move.
    pub(super) fn rotate_watch(&mut self, procs: &Procs) -> std::time::Duration {
        let Some(w) = &mut self.watch else { return watch::ROTATION };
        let followed = |pid: u32| procs.list.get(&pid).is_some_and(|p| !p.exited);
        w.rotate(&self.maps.allocs, &followed);
        w.next_rotation()
    }

    /// A watchpoint's hit: walked at the trap, so its first address is the instruction after
    /// the write, symbolized (as a return address is) one byte back.
    fn on_write(&mut self, e: &MemError) -> Result<()> {
        let key = |id: u64| StackKey { pid: e.pid, image: e.image, stack_id: id };
        let known = |id: u64| (id != STACK_LOST).then_some(id);
        let now = self.frames(key(e.stack_id), None);
        if errors::write_by_the_allocator(&now) {
            if let Some(w) = &mut self.watch {
                w.summary.allocator_writes += 1;
            }
            return Ok(());
        }
        let stacks = errors::Stacks {
            now,
            alloc: known(e.alloc_stack).map(|id| self.frames(key(id), None)),
            free: known(e.free_stack).map(|id| self.entry_frames(key(id))),
        };
        self.print_error(errors::report(e, stacks, Some(errors::watched(e))))
    }

    pub(super) fn args_no_errors(&self) -> bool {
        self.args.no_errors
    }

    /// Prints the errors the processes' recorders found since the last call, while the
    /// processes are alive or held at their exit stop (their maps still name the frames).
    pub(super) fn report_errors(&mut self, procs: &mut Procs) -> Result<()> {
        let mut found = Vec::new();
        for (&pid, p) in procs.list.iter_mut() {
            if let Recording::InProcess(r) = &mut p.recording {
                self.errors_lost += std::mem::take(&mut r.errors_lost);
                found.extend(std::mem::take(&mut r.errors).into_iter().map(|e| (pid, p.image, e)));
            }
        }
        for (pid, image, e) in found {
            let recorder = match procs.list.get(&pid).map(|p| &p.recording) {
                Some(Recording::InProcess(r)) => Some(&**r),
                _ => None,
            };
            let stack = |id: u64| StackKey { pid, image, stack_id: id };
            let known = |id: u64| (id != 0 && id != STACK_LOST).then_some(id);
            let stacks = errors::Stacks {
                now: self.frames(stack(e.stack_id), recorder),
                alloc: known(e.alloc_stack).map(|id| self.frames(stack(id), recorder)),
                free: known(e.free_stack).map(|id| self.frames(stack(id), recorder)),
            };
            let address_is = (e.error == ERR_INVALID_FREE).then(|| {
                let snap = recorder.and_then(|r| r.last.as_ref());
                let blocks = snap.into_iter().flat_map(|s| s.blocks.iter().map(|b| (b.addr, b.size)));
                let horizon = snap.is_some_and(|s| s.counters[inproc::C_FREED_EVICTED] > 0);
                errors::address_is(&e, errors::block_around(blocks, e.addr), horizon)
            });
            self.print_error(errors::report(&e, stacks, address_is))?;
        }
        Ok(())
    }

    /// An error the kernel side found: its stacks of free calls were walked at the call's
    /// entry, so their first address is in the allocator, left out as the recorder leaves it.
    pub(super) fn on_error(&mut self, e: &MemError) -> Result<()> {
        if errors::is_write(e) {
            return self.on_write(e);
        }
        let key = |id: u64| StackKey { pid: e.pid, image: e.image, stack_id: id };
        let known = |id: u64| (id != STACK_LOST).then_some(id);
        let now = self.entry_frames(key(e.stack_id));
        if errors::by_the_allocator(&now) {
            return Ok(());
        }
        let stacks = errors::Stacks {
            now,
            alloc: known(e.alloc_stack).map(|id| self.frames(key(id), None)),
            free: known(e.free_stack).map(|id| self.entry_frames(key(id))),
        };
        let address_is = (e.error == ERR_INVALID_FREE).then(|| {
            let mine = kernel::maps::dump(&self.maps.allocs).into_iter().filter(|(k, _)| k.pid == e.pid);
            let blocks: Vec<(u64, u64)> = mine.map(|(k, info)| (k.addr, info.size)).collect();
            let capacity = u64::from(self.args.freed_record);
            let horizon = self.maps.freed_evicted(capacity) > 0;
            errors::address_is(e, errors::block_around(blocks.into_iter(), e.addr), horizon)
        });
        self.print_error(errors::report(e, stacks, address_is))
    }

    fn print_error(&mut self, mut found: ErrorReport) -> Result<()> {
        found.alloc_call_site_only = self.args.errors_only;
        if self.args.run.json {
            output::json_line(&found)?;
        } else {
            output::line(&errors::render(&found))?;
        }
        self.errors.push(found);
        Ok(())
    }

    /// The frames of a stack walked at a function's entry, without that first frame.
    fn entry_frames(&mut self, key: StackKey) -> Vec<Frame> {
        if key.stack_id == STACK_LOST {
            return Vec::new();
        }
        if let Some(frames) = self.stack_cache.get(&key) {
            return frames.clone();
        }
        let ips = self.maps.stacks.ips(key.stack_id);
        let frames = stacks::user_frames(&mut self.user_sym, key.pid, ips.get(1..).unwrap_or_default(), false);
        self.stack_cache.insert(key, frames.clone());
        frames
    }

    pub(super) fn on_event(&mut self, event: &Event) -> Result<()> {
        match event.kind {
            // Symbolize while the process is alive; the result is cached for every report.
            EV_NEW_STACK => {
                let _ = self.frames(StackKey { pid: event.pid, image: event.image, stack_id: event.stack_id }, None);
            }
            EV_ALLOC | EV_FREE if self.args.trace => {
                let func = FN_NAMES.get(event.func as usize).copied().unwrap_or("?");
                let text = if event.kind == EV_ALLOC {
                    format!("pid {} tid {}: {func}({}) = {:#x}", event.pid, event.tid, event.size, event.addr)
                } else {
                    format!("pid {} tid {}: {func}({:#x}) frees {} bytes", event.pid, event.tid, event.addr, event.size)
                };
                if self.args.run.json {
                    output::json_line(&serde_json::json!({
                        "event": if event.kind == EV_ALLOC { "alloc" } else { "free" },
                        "pid": event.pid, "tid": event.tid, "func": func, "addr": output::hex::hex(event.addr), "size": event.size,
                    }))?;
                } else {
                    output::line(&text)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The frames of a stack: its addresses from the process's recorder when it records in
    /// itself, else from the kernel side's stack store.
    fn frames(&mut self, key: StackKey, recorder: Option<&inproc::Recorder>) -> Vec<Frame> {
        if key.stack_id == STACK_LOST {
            return Vec::new();
        }
        if let Some(frames) = self.stack_cache.get(&key) {
            return frames.clone();
        }
        let ips = match recorder {
            Some(r) => r.stack(key.stack_id),
            None => self.maps.stacks.ips(key.stack_id),
        };
        let frames = if key.pid == NO_PID {
            self.kernel_sym.as_ref().map(|k| stacks::kernel_frames(k, &ips)).unwrap_or_default()
        } else {
            // Taken at the allocator's return: every frame is a return address.
            stacks::user_frames(&mut self.user_sym, key.pid, &ips, false)
        };
        self.stack_cache.insert(key, frames.clone());
        frames
    }

    /// `pid`'s outstanding blocks now, every one whatever its age, per stack: its heap at its OOM
    /// kill, printed as a report of its own and written to `--pprof`/`--folded`'s files for
    /// it. `read_at_kill`: false when its recorder could not be read at the kill. None under
    /// --errors-only, which keeps call sites, not stacks.
    pub(super) fn heap_at_kill(&mut self, procs: &Procs, pid: u32, read_at_kill: bool) -> Result<Option<HeapAtKill>> {
        if self.args.errors_only {
            return Ok(None);
        }
        let _ = self.user_sym.refresh(pid);
        let proc = procs.list.get(&pid);
        let recorder = proc.and_then(|p| match &p.recording {
            Recording::InProcess(r) => Some(&**r),
            _ => None,
        });
        let recorded: Vec<(u32, u32, &Snapshot)> = recorder
            .and_then(|r| r.last.as_ref())
            .map(|snap| (pid, proc.map_or(0, |p| p.image), snap))
            .into_iter()
            .collect();
        let sampling = self.args.sampling();
        let (rows, _) = self.maps.rows(sampling, 0, false, &procs.images(), &|_| true, &recorded);
        let mut stacks = Vec::new();
        let mut mappings: Vec<crate::symbolize::MappedFile> = Vec::new();
        for row in rows.iter().filter(|r| r.key.pid == pid) {
            let frames = self.frames(row.key, recorder);
            for f in &frames {
                if let Some(m) = self.user_sym.mapping(pid, f.addr)
                    && !mappings.contains(m)
                {
                    mappings.push(m.clone());
                }
            }
            stacks.push(KillStack { bytes: row.bytes, allocs: row.allocs, frames });
        }
        let comm = proc.map(|p| p.comm.clone()).unwrap_or_default();
        let top = self.args.top.get();
        let heap = self.out.titled(
            |time| HeapAtKill {
                time,
                pid,
                comm,
                oom_killed: true,
                read_at_kill,
                total_bytes: stacks.iter().map(|s| s.bytes).sum(),
                allocs: stacks.iter().map(|s| s.allocs).sum(),
                estimated_from: sampling.describe(),
                stacks,
                mappings,
            },
            |h| h.render(top),
        )?;
        for path in heap.write_files(self.args.pprof.as_deref(), self.args.folded.as_deref())? {
            eprintln!("memtrace: memleak: pid {pid}'s heap at its OOM kill written to {}", path.display());
        }
        Ok(Some(heap))
    }

    /// Builds and prints one report. After the targets exited, no age cut-off applies.
    pub(super) fn report(&mut self, procs: &mut Procs, is_final: bool, target_gone: bool) -> Result<()> {
        if is_final && let Some(w) = &mut self.watch {
            // The watches' time ends with the run.
            w.disarm();
        }
        procs.read_recorders();
        self.report_errors(procs)?;
        // --errors-only: the errors were printed as found; the final report sums them up.
        if self.args.errors_only && !is_final {
            return Ok(());
        }
        procs.read_cgroups();
        let procs: &Procs = procs;
        let older_ns = if target_gone { 0 } else { self.args.older * 1_000_000 };
        let images = procs.images();
        let exited = |pid: u32| procs.list.get(&pid).is_some_and(|p| p.exited);
        let recorder = |pid: u32| match procs.list.get(&pid).map(|p| &p.recording) {
            Some(Recording::InProcess(r)) => Some(r),
            _ => None,
        };
        let recorded: Vec<(u32, u32, &Snapshot)> = procs
            .list
            .iter()
            .filter_map(|(&pid, p)| match &p.recording {
                Recording::InProcess(r) => r.last.as_ref().map(|snap| (pid, p.image, snap)),
                _ => None,
            })
            .collect();
        let in_process = inproc::Counts::sum(recorded.iter().map(|r| r.2));
        for (_, _, snap) in &recorded {
            self.maps.stacks.warn_if_over(snap.stacks_stored);
        }
        let sampling = self.args.sampling();
        let (mut rows, file_mappings) =
            self.maps.rows(sampling, older_ns, self.args.show_allocs, &images, &exited, &recorded);
        // Under --duty-cycle only part of the activity is recorded; free() is always probed, so
        // the share of frees seen while recording estimates the share of allocations recorded.
        let duty = self.args.duty_cycle.is_some();
        let estimated = duty || sampling.is_sampled();
        let in_window = self.maps.stat(STAT_FREE_CALLS_IN_WINDOW);
        let scale = if duty && in_window > 0 { self.maps.stat(STAT_FREE_CALLS) as f64 / in_window as f64 } else { 1.0 };
        if scale != 1.0 {
            for row in &mut rows {
                row.bytes = (row.bytes as f64 * scale).round() as u64;
                row.allocs = (row.allocs as f64 * scale).round() as u64;
            }
        }
        let now = Instant::now();
        let total_bytes = rows.iter().map(|r| r.bytes).sum();
        let mut processes: Vec<ProcessReport> = procs
            .list
            .iter()
            .map(|(&pid, p)| {
                let mine = rows.iter().filter(|r| r.key.pid == pid);
                let (bytes, allocs) = mine.fold((0, 0), |(b, a), r| (b + r.bytes, a + r.allocs));
                ProcessReport {
                    pid,
                    parent: p.parent,
                    comm: p.comm.clone(),
                    exited: p.exited,
                    exit_code: p.exit_code,
                    oom_killed: p.oom_killed,
                    bytes,
                    allocs,
                    cgroup: p.cgroup.clone(),
                }
            })
            .collect();
        processes.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.pid.cmp(&b.pid)));
        let mut stacks = Vec::new();
        // --errors-only keeps call sites, not stacks: no leak is reported from them.
        let top = if self.args.errors_only { 0 } else { self.args.top.get() };
        let mut cut_stacks = self.unwinder.cut();
        cut_stacks.add(&in_process.cut);
        // A heap profile or flame graph is the whole heap: the stacks past the table's top go
        // into it too. Each report replaces the profile, so a long run's file is always the
        // latest heap; the flame graphs are the final report's.
        let graphs = self.args.folded.is_some() || self.args.svg.is_some();
        let whole_profile = (self.args.pprof.is_some() || is_final && graphs) && !self.args.errors_only;
        let mut beyond_top = Vec::new();
        let mut growing_stacks = 0;
        for row in rows.iter() {
            let (trend, rate) = self.trends.observe(row.key, row.bytes, now);
            growing_stacks += u64::from(trend == "growing");
            if stacks.len() >= top && whole_profile {
                let frames = self.frames(row.key, recorder(row.key.pid).map(|r| &**r));
                beyond_top.push((row.key.pid, frames, row.allocs, row.bytes));
            } else if stacks.len() < top {
                let recorder = recorder(row.key.pid);
                let frames = self.frames(row.key, recorder.map(|r| &**r));
                let fp_walked = row.key.pid != NO_PID && self.unwinder.mode() == crate::unwind::UnwindMode::Fp;
                if fp_walked && !stacks::reaches_entry(&frames) {
                    cut_stacks.fp_short += 1;
                }
                stacks.push(OutstandingStack {
                    pid: row.key.pid,
                    stack_id: stacks::id_json(row.key.stack_id),
                    bytes: row.bytes,
                    allocs: row.allocs,
                    trend,
                    growth_bytes_per_sec: rate,
                    frames,
                    allocations: row.allocations.clone(),
                });
            }
        }
        let unnamed_frames = UnnamedFrames::of(stacks.iter().flat_map(|s| &s.frames));
        let report = |time| Report {
            time,
            pid: self.pid,
            mode: if self.pid.is_some() { "user" } else { "kernel" },
            is_final,
            sample_rate: self.args.sample_rate,
            estimated,
            sampling: sampling.json(),
            scale,
            total_bytes,
            growing_stacks,
            tracked: self.maps.stat(STAT_TRACKED) + in_process.tracked,
            freed: self.maps.stat(STAT_FREED) + in_process.freed,
            failed: self.maps.stat(STAT_FAILED) + in_process.failed,
            file_mappings,
            stacks,
            errors_only: self.args.errors_only,
            processes,
            errors: if is_final { self.errors.clone() } else { Vec::new() },
            watch: self.watch.as_ref().map(|w| watch::Summary {
                stale_hits: self.maps.stat(STAT_WATCH_STALE),
                allocator_writes: w.summary.allocator_writes + self.maps.stat(STAT_WATCH_IN_ALLOCATOR),
                ..w.summary.clone()
            }),
            blind_spots: in_process.add_to(BlindSpots {
                cut_stacks,
                unnamed_frames,
                errors_lost: self.errors_lost,
                ..self.maps.blind_spots(procs, u64::from(self.args.freed_record))
            }),
        };
        let report = self.out.titled(report, |r| render(r, sampling))?;
        let root = |pid: u32| match pid {
            NO_PID => "[kernel]".to_string(),
            pid => output::process_root(pid, self.user_sym.comm(pid).unwrap_or_default()),
        };
        let shown = report.stacks.iter().map(|s| (s.pid, &s.frames, s.allocs, s.bytes));
        let whole = shown.chain(beyond_top.iter().map(|(pid, frames, allocs, bytes)| (*pid, frames, *allocs, *bytes)));
        // Folded stacks and flame graphs have no header: the root frame says when its
        // weights are estimates.
        let folded_root = |pid: u32| match sampling.describe() {
            Some(how) => format!("{} [{how}]", root(pid)),
            None => root(pid),
        };
        if let Some(path) = &self.args.pprof {
            let samples: Vec<output::pprof::Sample> = whole
                .clone()
                .map(|(pid, frames, allocs, bytes)| output::pprof::Sample {
                    pid,
                    process: root(pid),
                    frames,
                    values: vec![allocs as i64, bytes as i64],
                })
                .collect();
            let types = [("inuse_objects", "count"), ("inuse_space", "bytes")];
            let notes = output::pprof::Notes {
                comments: sampling.describe().into_iter().collect(),
                period: match sampling {
                    Sampling::Bytes(n) => Some(("space", "bytes", n as i64)),
                    Sampling::EveryNth(n) => Some(("objects", "count", n.into())),
                    Sampling::All => None,
                },
            };
            let mapping = |pid, addr| self.user_sym.mapping(pid, addr).cloned();
            output::pprof::write(path, &types, &samples, &notes, mapping)?;
        }
        let folded = whole.map(|(pid, frames, _, bytes)| (folded_root(pid), frames.as_slice(), bytes));
        if is_final && let Some(path) = &self.args.folded {
            crate::tools::stacks::write_folded(path, folded.clone())?;
        }
        if is_final && let Some(path) = &self.args.svg {
            output::svg::write(
                path,
                &output::svg::Chart { title: "memleak: outstanding bytes", unit: "bytes" },
                folded,
            )?;
        }
        Ok(())
    }
}

fn render(report: &Report, sampling: Sampling) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let whose = match report.pid {
        Some(pid) => format!("pid {pid}"),
        None => "kernel".into(),
    };
    let mut sampled = String::new();
    if report.estimated && (report.scale != 1.0 || !sampling.is_sampled()) {
        sampled += &format!(", estimated: recorded share x{:.1}", report.scale);
    }
    // An estimate's numbers carry a `~`.
    let about = if report.estimated { "~" } else { "" };
    let title = if report.is_final { "final report, " } else { "" };
    if report.errors_only {
        let n = report.errors.len();
        let s = if n == 1 { "" } else { "s" };
        let _ = writeln!(out, "{title}{whose}: {n} memory error{s} (--errors-only: leaks not reported)");
        for e in &report.errors {
            for line in errors::render(e).lines() {
                let _ = writeln!(out, "    {line}");
            }
        }
        let _ = write!(out, "  {}", report.blind_spots);
        return out;
    }
    let _ = writeln!(
        out,
        "{title}{whose}: {about}{} outstanding in {} stacks{sampled}",
        output::bytes(report.total_bytes),
        report.stacks.len()
    );
    if let Some(how) = sampling.describe() {
        let _ = writeln!(out, "  {how}");
        // A quiet report must not read as "no double frees": the checks need every block.
        if report.pid.is_some() {
            let _ = writeln!(out, "  memory errors not checked: a sampled run leaves most blocks out");
        }
    }
    // One process: its stacks as they come. Several (a command's tree): grouped by process.
    let several = report.processes.len() > 1;
    for p in report.processes.iter().filter(|p| p.oom_killed && !several) {
        let _ = writeln!(out, "  pid {} ({}) was killed by the OOM killer", p.pid, p.comm);
    }
    let groups: Vec<Option<&ProcessReport>> =
        if several { report.processes.iter().map(Some).collect() } else { vec![None] };
    for group in groups {
        let stacks: Vec<&OutstandingStack> =
            report.stacks.iter().filter(|s| group.is_none_or(|p| p.pid == s.pid)).collect();
        if let Some(p) = group {
            let state = match (p.exited, p.exit_code) {
                _ if p.oom_killed => ", killed by the OOM killer".into(),
                (true, Some(code)) => format!(", exited with status {code}"),
                (true, None) => ", exited".into(),
                _ => String::new(),
            };
            let parent = p.parent.map(|pp| format!(", child of {pp}")).unwrap_or_default();
            let _ = writeln!(
                out,
                "  pid {} ({}{parent}{state}, cgroup {}): {about}{} outstanding in {about}{} allocations",
                p.pid,
                p.comm,
                p.cgroup.short(),
                output::bytes(p.bytes),
                p.allocs
            );
        }
        for s in stacks {
            let rate = if s.trend == "new" { String::new() } else { format!(", {:+.0} B/s", s.growth_bytes_per_sec) };
            let _ = writeln!(
                out,
                "  {about}{} bytes in {about}{} allocations from stack [{}{rate}]",
                s.bytes, s.allocs, s.trend
            );
            output::write_stack(&mut out, &s.frames, "      ");
            for a in s.allocations.iter().take(16) {
                let _ = writeln!(out, "      addr {:#x} size {} age {} ms", a.addr, a.size, a.age_ms);
            }
        }
    }
    if report.failed > 0 {
        let _ = writeln!(out, "  {} allocation calls failed (returned NULL)", report.failed);
    }
    if !report.errors.is_empty() {
        let _ = writeln!(out, "  memory errors: {} (each as it was found:)", report.errors.len());
        for e in &report.errors {
            for line in errors::render(e).lines() {
                let _ = writeln!(out, "    {line}");
            }
        }
    }
    if let Some(w) = &report.watch {
        watch::render(&mut out, w);
    }
    let files = report.file_mappings;
    if files.mappings > 0 {
        let _ = writeln!(
            out,
            "  not counted above: {} of files still mapped with mmap in {} mappings (the file's pages, not allocations)",
            output::bytes(files.bytes),
            files.mappings
        );
    }
    let _ = write!(out, "  {}", report.blind_spots);
    out
}

#[cfg(test)]
mod tests {
    use super::classify;

    #[test]
    fn tells_growth_from_a_plateau() {
        assert_eq!(classify(&[(0.0, 100)]).0, "new");
        let growing = classify(&[(0.0, 100), (1.0, 200), (2.0, 300), (3.0, 400)]);
        assert_eq!(growing.0, "growing");
        assert!((growing.1 - 100.0).abs() < 1e-9);
        assert_eq!(classify(&[(0.0, 100), (1.0, 400), (2.0, 400), (3.0, 400), (4.0, 400)]).0, "steady");
        assert_eq!(classify(&[(0.0, 400), (1.0, 300), (2.0, 300)]).0, "shrinking");
    }
}
