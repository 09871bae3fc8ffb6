//! memleak --watch N: sampled hardware watchpoints on a few blocks at a time, to catch the
//! writes no allocator sees. Every `ROTATION`, memtrace disarms every watch and arms N new
//! ones, half on the bytes just past the end of a live block, half on a word of a block freed
//! and not allocated again; the blocks are picked at random among those the probes offered
//! lately (`Candidate`). A breakpoint is per thread: each watch is opened on every thread of
//! the block's process, inherited by the threads they create until the next rotation.

use std::{
    collections::HashSet,
    fmt::Write as _,
    io,
    os::fd::{AsFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::{
    maps::{Array, HashMap, MapData},
    programs::{PerfEvent, ProgramFd},
};
use memtrace_common::memleak::{
    AllocInfo, AllocKey, Candidate, Freed, PICKS, WATCH_FREED, WATCH_PAST_END, Watch, WatchKey,
};
use serde::Serialize;

use crate::{kernel, tools::tracer::Tracer};

/// The breakpoint program in memleak's object.
pub(super) const PROGRAM: &str = "memleak_watch";
/// How long one set of watches stays armed, on average: each time is drawn from 150 to 350 ms,
/// so that a program's own period cannot keep the watches out of step with its blocks.
pub(super) const ROTATION: Duration = Duration::from_millis(250);

/// What was watched, and what a clean result does not cover (JSON: `watch` in a report).
#[derive(Serialize, Clone, Debug, Default)]
pub(super) struct Summary {
    /// Watches armed at a time (`--watch`), and how often they move.
    pub slots: u32,
    pub rotation_ms: u64,
    /// Live blocks watched past their end, and the sum of their watches' lengths.
    pub past_end_blocks: u64,
    pub past_end_seconds: f64,
    /// Of those, blocks whose request does not end on an 8-byte boundary: only the bytes up
    /// to the next 1-, 2- or 4-byte boundary were watched, so a write past the end that skips
    /// the first of them goes unseen.
    pub past_end_partial: u64,
    /// Freed blocks watched (one aligned 8-byte word of each, at random), and for how long.
    pub freed_blocks: u64,
    pub freed_seconds: f64,
    /// Breakpoints opened (one per watch per thread), and threads where one could not be.
    pub thread_watches: u64,
    pub threads_missed: u64,
    /// Blind spots: a freed block allocated again, or a live one freed, before its watch was
    /// armed (picked too late); hits on a block that had changed since (freed, or allocated
    /// again: not errors); writes by the allocator itself (its headers and free lists).
    pub freed_reused_before_armed: u64,
    pub live_freed_before_armed: u64,
    pub stale_hits: u64,
    pub allocator_writes: u64,
}

struct Armed {
    key: WatchKey,
    kind: u32,
    since: Instant,
    /// Closing them disarms the breakpoints.
    _events: Vec<OwnedFd>,
}

pub(super) struct Watcher {
    prog: ProgramFd,
    watches: HashMap<MapData, WatchKey, Watch>,
    live_picks: Array<MapData, Candidate>,
    freed_picks: Array<MapData, Candidate>,
    freed: HashMap<MapData, AllocKey, Freed>,
    armed: Vec<Armed>,
    rounds: u64,
    rng: u64,
    pub summary: Summary,
    /// Why a thread was missed last (said once, with -v).
    missed_why: Option<String>,
}

impl Watcher {
    /// Loads the breakpoint program and takes the maps it shares with the probes.
    pub(super) fn new(tracer: &mut Tracer, slots: u32) -> Result<Watcher> {
        let prog: &mut PerfEvent = tracer
            .bpf
            .program_mut(PROGRAM)
            .with_context(|| format!("internal: no program {PROGRAM} in memleak"))?
            .try_into()?;
        kernel::perf::load_breakpoint_program(prog, "--watch")?;
        let prog = prog.fd()?.try_clone()?;
        let seed = crate::sys::monotonic_ns() ^ u64::from(std::process::id()) << 32;
        Ok(Watcher {
            prog,
            watches: tracer.map(memtrace_common::memleak::names::WATCHES)?,
            live_picks: tracer.map(memtrace_common::memleak::names::LIVE_PICKS)?,
            freed_picks: tracer.map(memtrace_common::memleak::names::FREED_PICKS)?,
            freed: tracer.map(memtrace_common::memleak::names::FREED)?,
            armed: Vec::new(),
            rounds: 0,
            rng: seed | 1,
            summary: Summary { slots, rotation_ms: ROTATION.as_millis() as u64, ..Default::default() },
            missed_why: None,
        })
    }

    fn random(&mut self, below: u64) -> u64 {
        // xorshift64: enough to spread picks, and no dependency.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % below.max(1)
    }

    /// How long until the next rotation (see `ROTATION`).
    pub(super) fn next_rotation(&mut self) -> Duration {
        let ms = ROTATION.as_millis() as u64;
        Duration::from_millis(ms / 2 + self.random(ms + 1) * 4 / 5)
    }

    /// Disarms every watch, counting how long each was armed.
    pub(super) fn disarm(&mut self) {
        for a in self.armed.drain(..) {
            let secs = a.since.elapsed().as_secs_f64();
            if a.kind == WATCH_PAST_END {
                self.summary.past_end_seconds += secs;
            } else {
                self.summary.freed_seconds += secs;
            }
            let _ = self.watches.remove(&a.key);
        }
    }

    /// Moves the watches to new blocks of the processes `followed` says are traced.
    pub(super) fn rotate(&mut self, allocs: &HashMap<MapData, AllocKey, AllocInfo>, followed: &dyn Fn(u32) -> bool) {
        self.disarm();
        self.rounds += 1;
        let mut taken = HashSet::new();
        for slot in 0..u64::from(self.summary.slots) {
            let kind = if (slot + self.rounds).is_multiple_of(2) { WATCH_PAST_END } else { WATCH_FREED };
            let Some((key, watch, len)) = self.pick(kind, allocs, followed, &taken) else { continue };
            taken.insert((key.pid, watch.block));
            self.arm(key, watch, len);
        }
    }

    /// A block of `kind` still as it was offered: the watch's key, what it guards, its length.
    fn pick(
        &mut self,
        kind: u32,
        allocs: &HashMap<MapData, AllocKey, AllocInfo>,
        followed: &dyn Fn(u32) -> bool,
        taken: &HashSet<(u32, u64)>,
    ) -> Option<(WatchKey, Watch, u64)> {
        let start = self.random(u64::from(PICKS)) as u32;
        for i in 0..PICKS {
            let slot = (start + i) % PICKS;
            let picks = if kind == WATCH_PAST_END { &self.live_picks } else { &self.freed_picks };
            let Ok(c) = picks.get(&slot, 0) else { continue };
            if c.addr == 0 || !followed(c.pid) || taken.contains(&(c.pid, c.addr)) {
                continue;
            }
            let key = AllocKey { pid: c.pid, image: c.image, addr: c.addr };
            let still = if kind == WATCH_PAST_END {
                allocs.get(&key, 0).is_ok_and(|info| info.size == c.size)
            } else {
                self.freed.get(&key, 0).is_ok_and(|f| f.free_ns == c.free_ns)
            };
            // Each offer is looked at once: cleared whether it is armed or gone.
            let picks = if kind == WATCH_PAST_END { &mut self.live_picks } else { &mut self.freed_picks };
            let _ = picks.set(slot, Candidate::default(), 0);
            if !still {
                if kind == WATCH_PAST_END {
                    self.summary.live_freed_before_armed += 1;
                } else {
                    self.summary.freed_reused_before_armed += 1;
                }
                continue;
            }
            let (addr, len) = if kind == WATCH_PAST_END {
                past_end(c.addr, c.size)
            } else {
                (c.addr + 8 * self.random(c.size.div_ceil(8)), 8)
            };
            let watch = Watch { block: c.addr, size: c.size, free_ns: c.free_ns, image: c.image, kind };
            return Some((WatchKey { pid: c.pid, _pad: 0, addr }, watch, len));
        }
        None
    }

    fn arm(&mut self, key: WatchKey, watch: Watch, len: u64) {
        if self.watches.insert(key, watch, 0).is_err() {
            return;
        }
        let mut events = Vec::new();
        for tid in threads(key.pid) {
            match kernel::perf::watch_writes(tid, key.addr, len, self.prog.as_fd()) {
                Ok(fd) => events.push(fd),
                // Exited since the listing.
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(e) => {
                    self.summary.threads_missed += 1;
                    if self.missed_why.is_none() {
                        tracing::info!("memleak --watch: a thread of pid {} not watched: {e}", key.pid);
                    }
                    self.missed_why = Some(e.to_string());
                }
            }
        }
        if events.is_empty() {
            let _ = self.watches.remove(&key);
            return;
        }
        self.summary.thread_watches += events.len() as u64;
        if watch.kind == WATCH_PAST_END {
            self.summary.past_end_blocks += 1;
            self.summary.past_end_partial += u64::from(len < 8);
        } else {
            self.summary.freed_blocks += 1;
        }
        self.armed.push(Armed { key, kind: watch.kind, since: Instant::now(), _events: events });
    }
}

/// The breakpoint for the bytes past a block's end: as many as a breakpoint (1, 2, 4 or 8
/// bytes, aligned to its length) covers from the first byte past the end.
pub(super) fn past_end(addr: u64, size: u64) -> (u64, u64) {
    let end = addr + size;
    let len = [8, 4, 2, 1].into_iter().find(|l| end.is_multiple_of(*l)).unwrap_or(1);
    (end, len)
}

/// The threads of a process now.
fn threads(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect()
}

/// Whether breakpoints work here, with an eBPF program on them: else why not, for `--watch`.
pub(super) fn available() -> Result<()> {
    let found = kernel::perf::breakpoints();
    match (found.watch, found.bpf) {
        (Ok(_), Ok(_)) => Ok(()),
        (Err(why), _) | (_, Err(why)) => {
            Err(io::Error::other(why)).context("--watch needs hardware breakpoints (see `memtrace probe`)")
        }
    }
}

/// The summary's lines in the table.
pub(super) fn render(out: &mut String, s: &Summary) {
    let _ = writeln!(
        out,
        "  watched ({} watchpoints, moved every {} ms on average): {} live blocks past their end for {:.1} s in all, {} freed blocks for {:.1} s; no other block was watched",
        s.slots, s.rotation_ms, s.past_end_blocks, s.past_end_seconds, s.freed_blocks, s.freed_seconds
    );
    let _ = writeln!(
        out,
        "    not seen: writes past the end skipping the first bytes past it ({} blocks ended off an 8-byte boundary, watched to the next 1-, 2- or 4-byte one), writes to a freed block's other words",
        s.past_end_partial
    );
    let _ = writeln!(
        out,
        "    blocks gone before their watch was armed: {} freed ones allocated again, {} live ones freed; {} hits on blocks changed since armed; {} writes by the allocator; {} threads missed",
        s.freed_reused_before_armed, s.live_freed_before_armed, s.stale_hits, s.allocator_writes, s.threads_missed
    );
}

#[cfg(test)]
mod tests {
    use super::past_end;

    #[test]
    fn watches_the_widest_aligned_span_from_the_first_byte_past_the_end() {
        assert_eq!(past_end(0x1000, 40), (0x1028, 8));
        assert_eq!(past_end(0x1000, 36), (0x1024, 4));
        assert_eq!(past_end(0x1000, 34), (0x1022, 2));
        assert_eq!(past_end(0x1000, 33), (0x1021, 1));
    }
}
