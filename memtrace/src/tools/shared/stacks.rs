//! The one place that reads a recorded stack: the shared stack store's maps (see
//! memtrace-common's `stack`) by id, turned into symbolized frames; `Stacks` adds a per-process
//! cache so a stack is symbolized once, while its process still lives.

use std::{cell::Cell, collections::HashMap as StdHashMap, path::Path};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    maps::{HashMap, IterableMap as _, MapData, PerCpuArray},
};
use memtrace_common::{
    STACK_LOST,
    stack::{STORE_FULL, STORE_STORED, Stack},
};

use crate::{
    symbolize::{Frame, KernelSymbolizer, MappedFile, UserSymbolizer},
    unwind::{CutStacks, Unwinder},
};

/// Share of the store's capacity past which the user is told, once, what to raise.
const WARN_FILL: f64 = 0.8;

/// A tool's stack store as the kernel fills it: ids to addresses, and its own blind spots.
pub struct StackStore {
    map: HashMap<MapData, u64, Stack>,
    stats: PerCpuArray<MapData, u64>,
    capacity: u32,
    /// The option that sizes the store, named in warnings; None when it has none.
    option: Option<&'static str>,
    warned: Cell<bool>,
}

impl StackStore {
    /// Takes the store's maps from a loaded object; `option` is the command-line option that
    /// sizes it (`--max-stacks`), if the tool has one.
    pub fn take(bpf: &mut Ebpf, option: Option<&'static str>) -> Result<StackStore> {
        let mut take = |name: &str| bpf.take_map(name).with_context(|| format!("internal: no map {name}"));
        let map: HashMap<MapData, u64, Stack> = HashMap::try_from(take(memtrace_common::names::STACKS)?)?;
        let capacity = map.map().info()?.max_entries();
        Ok(StackStore {
            map,
            stats: PerCpuArray::try_from(take(memtrace_common::names::STACK_STATS)?)?,
            capacity,
            option,
            warned: Cell::new(false),
        })
    }

    /// The addresses of stack `id`, innermost first; empty for `STACK_LOST` or an unknown id.
    pub fn ips(&self, id: u64) -> Vec<u64> {
        self.warn_if_filling();
        if id == STACK_LOST {
            return Vec::new();
        }
        match self.map.get(&id, 0) {
            Ok(stack) => {
                let len = (stack.len as usize).min(stack.ips.len());
                stack.ips[..len].iter().copied().filter(|&ip| ip != 0).collect()
            }
            Err(_) => Vec::new(),
        }
    }

    fn stat(&self, index: u32) -> u64 {
        crate::kernel::maps::sum(&self.stats, index)
    }

    /// Stacks stored so far (entries are never removed while tracing).
    pub fn stored(&self) -> u64 {
        self.stat(STORE_STORED)
    }

    /// Captures dropped because the store was full.
    pub fn full(&self) -> u64 {
        self.stat(STORE_FULL)
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// One stderr line, the first time the store passes 80% of its capacity, so the user can
    /// restart with more room before stacks are lost. Checked on every read: tools read a stack
    /// when it is new, so the check follows the store's growth (one more map read each).
    pub fn warn_if_filling(&self) {
        self.warn_if_over(self.stored());
    }

    /// `warn_if_filling` for a store of the same capacity kept elsewhere (memleak's
    /// in-process recorders keep one each) holding `stored` stacks.
    pub fn warn_if_over(&self, stored: u64) {
        if self.warned.get() {
            return;
        }
        if stored as f64 >= WARN_FILL * self.capacity as f64 {
            self.warned.set(true);
            let raise = self.option.map(|o| format!(": raise {o} to keep every stack")).unwrap_or_default();
            eprintln!("memtrace: warning: stack store {stored} of {} stacks full{raise}", self.capacity);
        }
    }
}

/// User frames of `ips` (innermost first) in process `pid`. Return addresses are looked up one
/// byte earlier so file:line names the call; the first frame is where the task was, exact when
/// `first_exact` (a faulting instruction), else a return address like the rest (a uretprobe's
/// caller, the instruction after a syscall).
pub fn user_frames(sym: &mut UserSymbolizer, pid: u32, ips: &[u64], first_exact: bool) -> Vec<Frame> {
    let (exact, calls) = if first_exact && !ips.is_empty() { ips.split_at(1) } else { (&[][..], ips) };
    let mut frames = sym.symbolize_stack(pid, exact);
    let back: Vec<u64> = calls.iter().map(|ip| ip.saturating_sub(1)).collect();
    let mut callers = sym.symbolize_stack(pid, &back);
    for f in &mut callers {
        f.addr += 1;
    }
    frames.extend(callers);
    frames
}

/// Whether a user stack (innermost first) reaches a program's or a thread's entry, as a
/// whole stack does. For frame-pointer walks (`--unwind fp`), whose end the walker cannot
/// tell from a cut: by the outermost function's name.
pub fn reaches_entry(frames: &[Frame]) -> bool {
    const ENTRIES: &[&str] = &["_start", "start_thread", "clone", "clone3", "__clone", "__clone3", "thread_start"];
    let outermost = frames.iter().rev().find(|f| !f.inlined).and_then(|f| f.func.as_deref());
    // glibc's __libc_start_main and __libc_start_call_main, under their versions' names.
    outermost.is_some_and(|name| ENTRIES.contains(&name) || name.starts_with("__libc_start_"))
}

/// Kernel frames of `ips`, innermost first.
pub fn kernel_frames(sym: &KernelSymbolizer, ips: &[u64]) -> Vec<Frame> {
    sym.symbolize_stack(ips)
}

/// A stack id for JSON: hex text, since ids are 64-bit hashes that JSON numbers would round.
pub fn id_json(id: u64) -> Option<String> {
    (id != STACK_LOST).then(|| format!("{id:#018x}"))
}

pub struct Stacks {
    pub store: StackStore,
    /// Loads the unwind tables the kernel side walks user stacks with.
    pub unwinder: Option<Unwinder>,
    user: UserSymbolizer,
    kernel: Option<KernelSymbolizer>,
    user_cache: StdHashMap<(u32, u64), Vec<Frame>>,
    kernel_cache: StdHashMap<u64, Vec<Frame>>,
}

impl Stacks {
    /// `kernel`: also symbolize kernel stacks (loads /proc/kallsyms).
    pub fn new(store: StackStore, kernel: bool) -> Result<Stacks> {
        let kernel = if kernel { Some(KernelSymbolizer::new().context("cannot read /proc/kallsyms")?) } else { None };
        Ok(Stacks {
            store,
            unwinder: None,
            user: UserSymbolizer::new(),
            kernel,
            user_cache: StdHashMap::new(),
            kernel_cache: StdHashMap::new(),
        })
    }

    /// The walker's counters: how user stacks ended (zero without an unwinder).
    pub fn cut(&self) -> CutStacks {
        self.unwinder.as_ref().map(Unwinder::cut).unwrap_or_default()
    }

    /// Snapshots a process's mappings now, so its stacks symbolize even after it exits.
    pub fn watch(&mut self, pid: u32) {
        let _ = self.user.refresh(pid);
    }

    /// Drops the maps of processes that have exited; call after a report. Stacks already
    /// symbolized (at their first sighting, or in a report) keep their frames here.
    pub fn forget_exited(&mut self) {
        let gone = self.user.forget_exited();
        if gone > 0 {
            tracing::debug!("forgot the maps of {gone} exited processes");
        }
    }

    /// The file mapping that held a user address of a symbolized stack of `pid`.
    pub fn mapping(&self, pid: u32, addr: u64) -> Option<MappedFile> {
        self.user.mapping(pid, addr).cloned()
    }

    /// A user stack of process `pid`, innermost first (see `user_frames`).
    pub fn user(&mut self, pid: u32, stack_id: u64, first_exact: bool) -> Vec<Frame> {
        if stack_id == STACK_LOST {
            return Vec::new();
        }
        if let Some(frames) = self.user_cache.get(&(pid, stack_id)) {
            return frames.clone();
        }
        let ips = self.store.ips(stack_id);
        let frames = user_frames(&mut self.user, pid, &ips, first_exact);
        if !frames.is_empty() {
            self.user_cache.insert((pid, stack_id), frames.clone());
        }
        frames
    }

    /// A kernel stack, innermost first.
    pub fn kernel(&mut self, stack_id: u64) -> Vec<Frame> {
        if stack_id == STACK_LOST {
            return Vec::new();
        }
        if let Some(frames) = self.kernel_cache.get(&stack_id) {
            return frames.clone();
        }
        let ips = self.store.ips(stack_id);
        let frames = self.kernel.as_ref().map(|k| kernel_frames(k, &ips)).unwrap_or_default();
        if !frames.is_empty() {
            self.kernel_cache.insert(stack_id, frames.clone());
        }
        frames
    }
}

/// Writes folded stacks (one `process;root;...;leaf weight` line each) for flame graphs; each
/// item is (process root frame, frames innermost first, weight).
pub fn write_folded<'a>(path: &Path, stacks: impl Iterator<Item = (String, &'a [Frame], u64)>) -> Result<()> {
    let text: String =
        stacks.map(|(root, frames, weight)| crate::output::folded(&root, frames, weight) + "\n").collect();
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}
