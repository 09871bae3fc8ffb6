//! memleak's memory errors: double and invalid frees and realloc of a freed block, and the
//! writes `--watch` catches past a block's end or into a freed block, each printed when
//! memtrace learns of it (before a process the allocator aborts is let go) and again in the
//! final report.

use std::fmt::Write as _;

use memtrace_common::memleak::{
    ERR_DOUBLE_FREE, ERR_INVALID_FREE, ERR_REALLOC_FREED, ERR_USE_AFTER_FREE_WRITE, ERR_WRITE_PAST_END, FN_FREE,
    FN_NAMES, MemError,
};
use serde::Serialize;

use crate::{output, procfs, symbolize::Frame};

/// One error, symbolized: a table block and a JSON record (`"type": "memory_error"`).
#[derive(Serialize, Clone, Debug)]
pub(super) struct ErrorReport {
    #[serde(rename = "type")]
    record: &'static str,
    /// double_free, invalid_free, realloc_of_freed, write_past_end or use_after_free_write.
    pub kind: &'static str,
    pub pid: u32,
    pub tid: u32,
    /// The call: free, realloc or reallocarray; `write` for a watchpoint's hit.
    pub call: &'static str,
    #[serde(serialize_with = "crate::output::hex::serialize")]
    pub addr: u64,
    /// The block's requested size, when a block is known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// What the address is, for an invalid free: a stack address, a global, an interior
    /// pointer, or an address the allocator never returned; for a write, the bytes watched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address_is: Option<String>,
    /// Milliseconds between the first free and this call, and the thread that made it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub freed_ms_before: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub freed_by_tid: Option<u32>,
    /// The stack of this call (of the writing instruction), then the block's allocation and
    /// first free where known.
    pub stack: Vec<Frame>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alloc_stack: Option<Vec<Frame>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_stack: Option<Vec<Frame>>,
    /// `alloc_stack` is the call site alone (`--errors-only` walks no stack at allocations).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub alloc_call_site_only: bool,
}

/// The stacks an error names, already symbolized (the caller holds the symbolizer).
pub(super) struct Stacks {
    pub now: Vec<Frame>,
    pub alloc: Option<Vec<Frame>>,
    pub free: Option<Vec<Frame>>,
}

/// Functions of glibc that hand blocks already freed back through its public `free` (a thread's
/// cached blocks, at its exit): a probe on `free` sees them, a caller never made them.
const ALLOCATOR_OWN: [&str; 3] = ["tcache_thread_shutdown", "__malloc_arena_thread_freeres", "__libc_thread_freeres"];

/// Whether a free's stack is the allocator's own housekeeping, not an error of the program.
pub(super) fn by_the_allocator(stack: &[Frame]) -> bool {
    stack.iter().take(4).any(|f| f.func.as_deref().is_some_and(|name| ALLOCATOR_OWN.contains(&name)))
}

/// Whether a watched write was the allocator's own (a chunk header, a free-list link): the
/// writing instruction is in the library of an allocator entry point a few frames up (its
/// inner functions are local symbols, often stripped; calloc's memset is libc's too).
pub(super) fn write_by_the_allocator(stack: &[Frame]) -> bool {
    let Some(module) = stack.first().and_then(|f| f.module.as_deref()) else { return false };
    stack.iter().take(6).any(|f| {
        let entry = f.func.as_deref().is_some_and(|name| {
            // glibc's internal aliases: __GI___libc_malloc is malloc.
            let name = name.strip_prefix("__GI_").unwrap_or(name);
            let name = name.strip_prefix("__libc_").unwrap_or(name);
            FN_NAMES[..=FN_FREE as usize].contains(&name)
                || ["_int_", "tcache_", "malloc_"].iter().any(|p| name.starts_with(p))
                || ALLOCATOR_OWN.contains(&name)
        });
        entry && f.module.as_deref() == Some(module)
    })
}

pub(super) fn kind_name(error: u32) -> &'static str {
    match error {
        ERR_DOUBLE_FREE => "double_free",
        ERR_INVALID_FREE => "invalid_free",
        ERR_REALLOC_FREED => "realloc_of_freed",
        ERR_WRITE_PAST_END => "write_past_end",
        ERR_USE_AFTER_FREE_WRITE => "use_after_free_write",
        _ => "unknown",
    }
}

/// The live block (address, size) holding `addr` past its first byte, if any: what an
/// interior pointer points into.
pub(super) fn block_around(mut blocks: impl Iterator<Item = (u64, u64)>, addr: u64) -> Option<(u64, u64)> {
    blocks.find(|&(start, size)| start < addr && addr < start + size.max(1))
}

/// What an address handed to free is, told from the process's mappings while it is held or
/// alive: `interior`, the live block it points into; `horizon`, whether the freed-block
/// record has dropped entries (a block freed before then is not remembered).
pub(super) fn address_is(e: &MemError, interior: Option<(u64, u64)>, horizon: bool) -> String {
    if let Some((start, size)) = interior {
        return format!(
            "{} bytes into a live block of {size} bytes at {start:#x} (an interior pointer)",
            e.addr - start
        );
    }
    let Ok(mapping) = procfs::mapping_at(e.pid, e.addr) else {
        return "of an unknown kind (the process was gone before memtrace looked)".into();
    };
    let own_stack = |m: &procfs::Mapping| m.start <= e.sp && e.sp < m.end && e.addr >= e.sp;
    match mapping {
        None => "in no mapping".into(),
        Some(m) if own_stack(&m) => "on the calling thread's stack".into(),
        Some(m) if m.path == "[stack]" => "on the main thread's stack".into(),
        Some(m) if m.is_file() => format!("in {} (a global or constant)", m.path),
        Some(_) if horizon => {
            "not a block the allocator returned since memtrace's freed-block record began dropping entries \
             (possibly one freed before; see the blind spots)"
                .into()
        }
        Some(_) => "not a block the allocator returned".into(),
    }
}

/// What a watchpoint's hit watched (`MemError::sp`: its first address).
pub(super) fn watched(e: &MemError) -> String {
    if e.error == ERR_WRITE_PAST_END {
        let (_, len) = super::watch::past_end(e.addr, e.size);
        format!("watched past the block's end: {len} bytes from {:#x}", e.sp)
    } else {
        format!("watched in the freed block: 8 bytes at offset {}", e.sp.saturating_sub(e.addr))
    }
}

pub(super) fn is_write(e: &MemError) -> bool {
    matches!(e.error, ERR_WRITE_PAST_END | ERR_USE_AFTER_FREE_WRITE)
}

pub(super) fn report(e: &MemError, stacks: Stacks, address_is: Option<String>) -> ErrorReport {
    let known = e.error != ERR_INVALID_FREE;
    let freed = known && e.error != ERR_WRITE_PAST_END;
    ErrorReport {
        record: "memory_error",
        kind: kind_name(e.error),
        pid: e.pid,
        tid: e.tid,
        call: if is_write(e) { "write" } else { FN_NAMES.get(e.func as usize).copied().unwrap_or("free") },
        addr: e.addr,
        size: known.then_some(e.size),
        address_is,
        freed_ms_before: freed.then(|| e.timestamp_ns.saturating_sub(e.freed_ns) as f64 / 1e6),
        freed_by_tid: freed.then_some(e.free_tid),
        stack: stacks.now,
        alloc_stack: stacks.alloc,
        free_stack: stacks.free,
        alloc_call_site_only: false,
    }
}

/// The table's block for one error.
pub(super) fn render(r: &ErrorReport) -> String {
    let mut out = String::new();
    let title = match r.kind {
        "double_free" => "DOUBLE FREE",
        "invalid_free" => "INVALID FREE",
        "realloc_of_freed" => "USE AFTER FREE (realloc of a freed block)",
        "write_past_end" => "WRITE PAST THE END",
        "use_after_free_write" => "USE AFTER FREE (write to a freed block)",
        other => other,
    };
    let size = r.size.map(|s| format!(" ({s} bytes)")).unwrap_or_default();
    let _ = writeln!(out, "memory error: {title} of {:#x}{size} by pid {} tid {}, in {}", r.addr, r.pid, r.tid, r.call);
    match &r.address_is {
        Some(what) if r.call == "write" => {
            let _ = writeln!(out, "  {what}");
        }
        Some(what) => {
            let _ = writeln!(out, "  {:#x} is {what}", r.addr);
        }
        None => {}
    }
    let again = match r.kind {
        "double_free" => "freed again",
        "write_past_end" | "use_after_free_write" => "written",
        _ => "called",
    };
    let _ = writeln!(out, "  {again} at:");
    output::write_stack(&mut out, &r.stack, "      ");
    if let Some(frames) = &r.free_stack {
        let when = r.freed_ms_before.map(|ms| format!(" {ms:.3} ms before")).unwrap_or_default();
        let by = r.freed_by_tid.map(|t| format!(" by tid {t}")).unwrap_or_default();
        let _ = writeln!(out, "  first freed{when}{by} at:");
        output::write_stack(&mut out, frames, "      ");
    }
    if let Some(frames) = &r.alloc_stack {
        let only = if r.alloc_call_site_only { " (the call site only: --errors-only)" } else { "" };
        let _ = writeln!(out, "  allocated at{only}:");
        output::write_stack(&mut out, frames, "      ");
    }
    out.truncate(out.trim_end().len());
    out
}
