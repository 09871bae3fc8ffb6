//! What the stack-counting tracers (brkstack, faults) share: stack ids to symbolized frames,
//! cached per process so a stack is symbolized once, while its process still lives.

use std::{collections::HashMap, path::Path};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, StackTraceMap};
use memtrace_common::STACK_LOST;

use crate::symbolize::{Frame, KernelSymbolizer, UserSymbolizer};

pub struct Stacks {
    /// The kernel's stack map; None for a tool that records its own stacks (brkstack).
    map: Option<StackTraceMap<MapData>>,
    user: UserSymbolizer,
    kernel: Option<KernelSymbolizer>,
    user_cache: HashMap<(u32, u32), Vec<Frame>>,
    kernel_cache: HashMap<u32, Vec<Frame>>,
}

impl Stacks {
    /// `kernel`: also symbolize kernel stacks (loads /proc/kallsyms).
    pub fn new(map: Option<StackTraceMap<MapData>>, kernel: bool) -> Result<Stacks> {
        let kernel = if kernel { Some(KernelSymbolizer::new().context("cannot read /proc/kallsyms")?) } else { None };
        Ok(Stacks {
            map,
            user: UserSymbolizer::new(),
            kernel,
            user_cache: HashMap::new(),
            kernel_cache: HashMap::new(),
        })
    }

    /// Snapshots a process's mappings now, so its stacks symbolize even after it exits.
    pub fn watch(&mut self, pid: u32) {
        let _ = self.user.refresh(pid);
    }

    fn ips(&self, stack_id: u32) -> Vec<u64> {
        match self.map.as_ref().map(|m| m.get(&stack_id, 0)) {
            Some(Ok(trace)) => trace.frames().iter().map(|f| f.ip).filter(|&ip| ip != 0).collect(),
            _ => Vec::new(),
        }
    }

    /// A user stack, innermost first. Frames after the first are return addresses: they are
    /// looked up one byte earlier so file:line names the call. The first is where the task
    /// was (`first_exact`: the faulting instruction itself; otherwise the instruction after a
    /// syscall, a return address like the rest).
    pub fn user(&mut self, pid: u32, stack_id: u32, first_exact: bool) -> Vec<Frame> {
        if stack_id == STACK_LOST {
            return Vec::new();
        }
        if let Some(frames) = self.user_cache.get(&(pid, stack_id)) {
            return frames.clone();
        }
        let ips = self.ips(stack_id);
        self.user_ips(pid, stack_id, &ips, first_exact)
    }

    /// Like `user`, for addresses the caller read itself; cached under (pid, stack_id).
    pub fn user_ips(&mut self, pid: u32, stack_id: u32, ips: &[u64], first_exact: bool) -> Vec<Frame> {
        if let Some(frames) = self.user_cache.get(&(pid, stack_id)) {
            return frames.clone();
        }
        let mut frames = Vec::with_capacity(ips.len());
        for (i, &ip) in ips.iter().enumerate() {
            let back = u64::from(!(i == 0 && first_exact));
            let mut these = self.user.symbolize_stack(pid, &[ip.saturating_sub(back)]);
            for f in &mut these {
                f.addr += back;
            }
            frames.extend(these);
        }
        if !frames.is_empty() {
            self.user_cache.insert((pid, stack_id), frames.clone());
        }
        frames
    }

    /// A kernel stack, innermost first.
    pub fn kernel(&mut self, stack_id: u32) -> Vec<Frame> {
        if stack_id == STACK_LOST {
            return Vec::new();
        }
        if let Some(frames) = self.kernel_cache.get(&stack_id) {
            return frames.clone();
        }
        let ips = self.ips(stack_id);
        let frames = self.kernel.as_ref().map(|k| k.symbolize_stack(&ips)).unwrap_or_default();
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
