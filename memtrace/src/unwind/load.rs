//! The unwinder, user side: builds each module's table once, copies it into the row map,
//! and tells the eBPF walker which rows and bias cover each executable mapping of each
//! process (see memtrace-ebpf's `unwind`). Processes are loaded when a tool starts tracing
//! them, and again whenever the walker meets one it does not know or a PC outside every
//! loaded mapping (a `dlopen`, an exec), which it asks for through `UNWIND_WANTED`.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    os::fd::AsRawFd as _,
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
};
use memtrace_common::unwind::{
    BINARY_STEPS, CUT_BAD_FRAME, CUT_DEPTH, CUT_NO_TABLE, CUT_NOT_LOADED, CUT_TABLE_FULL, CUT_TRAMPOLINE,
    CUT_UNREADABLE, CUT_UNSUPPORTED, CUT_UNUSABLE, ENDED_COMPLETE, FP_FRAMES, FP_WALKS, MAPPING_NO_TABLE,
    MAPPING_TABLE, MAPPING_TABLE_FULL, MAPPING_UNKNOWN, MODE_AUTO, MODE_DWARF, MODE_FP, Mapping, MappingKey, PID_BITS,
    PackedRow, TRAMPOLINE_FRAMES, TrampolineOffsets, WALKS, mapping_key,
};
use serde::Serialize;

use super::{Limits, mapping_bias};
use crate::procfs;

/// `--unwind`: how tools walk user stacks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UnwindMode {
    /// Unwind tables (.eh_frame) wherever a module has them, frame pointers elsewhere.
    #[default]
    Auto,
    /// Unwind tables only: a stack ends at code without one.
    Dwarf,
    /// Frame pointers only: cheapest, complete for code built with them.
    Fp,
}

/// The mode this kernel can do: without `bpf_loop` (before 5.17) the walker cannot load, so
/// stacks come from frame pointers, as a one-line warning says once the tool is live.
pub fn mode_on_this_kernel(asked: UnwindMode) -> UnwindMode {
    let Some(why) = crate::kernel::no_bpf_loop().filter(|_| asked != UnwindMode::Fp) else {
        return asked;
    };
    crate::output::ready::warn_when_live(why);
    UnwindMode::Fp
}

/// The most rows of unwind tables one object can hold: what its binary search reaches.
pub const MAX_ROWS: u32 = 1 << BINARY_STEPS;

/// Sets the unwinder's globals and map sizes on a loader, before the object is loaded: `rows`
/// rows of tables for `mode` (none for `Fp`, which saves the row map's memory).
pub fn configure(loader: &mut EbpfLoader<'_>, mode: UnwindMode, rows: u32) {
    let mode_value: &'static u32 = match mode {
        UnwindMode::Auto => &MODE_AUTO,
        UnwindMode::Dwarf => &MODE_DWARF,
        UnwindMode::Fp => &MODE_FP,
    };
    loader.override_global(memtrace_common::names::UNWIND_MODE, mode_value, false);
    loader.override_global(memtrace_common::names::UNWIND_TRAMPOLINE, trampoline_offsets(), false);
    loader.map_max_entries(memtrace_common::names::UNWIND_ROWS, if mode == UnwindMode::Fp { 1 } else { rows });
}

/// Where this kernel keeps uretprobes' real return addresses, from its BTF; all zero (the
/// walker then stops at a trampoline and says so) where its BTF lacks any of them.
fn trampoline_offsets() -> &'static TrampolineOffsets {
    static OFFSETS: std::sync::OnceLock<TrampolineOffsets> = std::sync::OnceLock::new();
    OFFSETS.get_or_init(|| {
        let read = || -> Result<TrampolineOffsets> {
            let off = crate::kernel::btf::member_offset;
            Ok(TrampolineOffsets {
                task_utask: off("task_struct", "utask")?,
                utask_return_instances: off("uprobe_task", "return_instances")?,
                ri_stack: off("return_instance", "stack")?,
                ri_orig_ret_vaddr: off("return_instance", "orig_ret_vaddr")?,
                ri_next: off("return_instance", "next")?,
                task_mm: off("task_struct", "mm")?,
                mm_xol_area: off("mm_struct", "uprobes_state.xol_area")?,
                xol_vaddr: off("xol_area", "vaddr")?,
                enabled: 1,
            })
        };
        read().unwrap_or_else(|e| {
            tracing::info!("unwind: stacks stop at uretprobe trampolines: {e:#}");
            TrampolineOffsets::default()
        })
    })
}

/// How often the walker's requests for tables (new processes, libraries) are served.
pub const POLL: std::time::Duration = std::time::Duration::from_millis(25);

/// How often entries of exited processes are looked for.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Rows the row map holds unless told otherwise: 16 MiB of kernel memory, enough for libc,
/// libstdc++ and a large program several times over.
pub const DEFAULT_ROWS: u32 = 1 << 20;

/// One file's table in the row map.
#[derive(Clone, Debug, Serialize)]
pub struct Module {
    pub path: String,
    pub rows: u32,
    pub bytes: u64,
    #[serde(skip)]
    start: u32,
    #[serde(skip)]
    kind: u32,
    #[serde(skip)]
    segments: Vec<super::Segment>,
    /// Why the module has no table, when it has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub missing: Option<String>,
}

/// How stack walks ended, from the walker's counters: the blind spots of the stacks shown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CutStacks {
    pub walks: u64,
    pub complete: u64,
    pub no_table: u64,
    pub not_loaded: u64,
    pub table_full: u64,
    pub depth: u64,
    pub unreadable: u64,
    pub unsupported: u64,
    pub bad_frame: u64,
    /// Cut at a module whose unwind sections are malformed.
    pub unusable_table: u64,
    /// Cut at a uretprobe's trampoline whose real return address could not be read.
    pub trampoline: u64,
    /// Frames found through frame pointers in code without a table.
    pub fp_frames: u64,
    /// Return addresses taken back from uretprobe trampolines (another tool's, or
    /// memtrace's own on an allocator): the walk went on through them.
    pub trampoline_frames: u64,
    /// Walks made by frame pointers alone (`--unwind fp`), whose end the walker cannot tell;
    /// `fp_short` is how many of the stacks shown stop before a program or thread entry.
    pub fp_walks: u64,
    pub fp_short: u64,
}

impl CutStacks {
    /// From counters indexed as the walker's (`memtrace_common::unwind`'s `WALKS`...), as
    /// memleak's in-process recorder keeps them too.
    pub fn from_counters(c: &[u64]) -> CutStacks {
        let at = |i: u32| c.get(i as usize).copied().unwrap_or(0);
        CutStacks {
            walks: at(WALKS),
            complete: at(ENDED_COMPLETE),
            no_table: at(CUT_NO_TABLE),
            not_loaded: at(CUT_NOT_LOADED),
            table_full: at(CUT_TABLE_FULL),
            depth: at(CUT_DEPTH),
            unreadable: at(CUT_UNREADABLE),
            unsupported: at(CUT_UNSUPPORTED),
            bad_frame: at(CUT_BAD_FRAME),
            unusable_table: at(CUT_UNUSABLE),
            trampoline: at(CUT_TRAMPOLINE),
            fp_frames: at(FP_FRAMES),
            trampoline_frames: at(TRAMPOLINE_FRAMES),
            fp_walks: at(FP_WALKS),
            fp_short: 0,
        }
    }

    /// Adds another walker's counts.
    pub fn add(&mut self, o: &CutStacks) {
        self.walks += o.walks;
        self.complete += o.complete;
        self.no_table += o.no_table;
        self.not_loaded += o.not_loaded;
        self.table_full += o.table_full;
        self.depth += o.depth;
        self.unreadable += o.unreadable;
        self.unsupported += o.unsupported;
        self.bad_frame += o.bad_frame;
        self.unusable_table += o.unusable_table;
        self.trampoline += o.trampoline;
        self.fp_frames += o.fp_frames;
        self.trampoline_frames += o.trampoline_frames;
        self.fp_walks += o.fp_walks;
        self.fp_short += o.fp_short;
    }

    /// The blind-spot entries: stacks cut short, by cause.
    pub fn blind_spots(&self) -> Vec<(u64, &'static str)> {
        vec![
            (self.no_table, "stacks cut at code without unwind tables"),
            (self.not_loaded, "stacks cut in code whose unwind tables were not loaded yet (a new process or library)"),
            (self.table_full, "stacks cut at a module whose table did not fit (raise --unwind-rows)"),
            (self.depth, "stacks cut at the depth limit (127 frames)"),
            (self.unreadable, "stacks cut at unreadable stack memory"),
            (self.unsupported, "stacks cut at an unwind rule memtrace cannot follow"),
            (self.bad_frame, "stacks cut at a frame that did not move up the stack"),
            (self.unusable_table, "stacks cut at a module whose unwind tables are malformed (-v names it)"),
            (self.trampoline, "stacks cut at a uretprobe's return trampoline"),
            (
                self.fp_short,
                "stacks shown end before a program or thread entry (frame pointers stop in code built without them: \
                 --unwind auto walks the unwind tables)",
            ),
        ]
    }
}

struct Loaded {
    keys: HashSet<(u32, MappingKey)>,
    /// The executable mappings loaded: a request with the same ones needs no reload.
    exec_maps: Vec<procfs::Mapping>,
}

pub struct Unwinder {
    mode: UnwindMode,
    rows_map: Option<RowMap>,
    /// The row map, unwritten, with `--unwind fp` (kept open: see `take`).
    _rows_unused: Option<aya::maps::Map>,
    mappings: LpmTrie<MapData, MappingKey, Mapping>,
    wanted: HashMap<MapData, u32, u32>,
    stats: PerCpuArray<MapData, u64>,
    modules: StdHashMap<(u32, u32, u64), Module>,
    pids: StdHashMap<u32, Loaded>,
    limits: Limits,
    swept: std::time::Instant,
}

impl Unwinder {
    /// Takes the unwinder's maps from an object configured with `configure`.
    pub fn take(bpf: &mut Ebpf, mode: UnwindMode) -> Result<Unwinder> {
        let mut take = |name: &str| bpf.take_map(name).with_context(|| format!("internal: no map {name}"));
        let rows = take(memtrace_common::names::UNWIND_ROWS)?;
        // Programs loaded later (a new process's probes) name this map by its descriptor even
        // when no walk reads it: it must stay open, or the descriptor is gone (the kernel
        // refuses the program) or, worse, reused by another object.
        let mappings = LpmTrie::try_from(take(memtrace_common::names::UNWIND_MAPPINGS)?)?;
        let wanted = HashMap::try_from(take(memtrace_common::names::UNWIND_WANTED)?)?;
        let stats = PerCpuArray::try_from(take(memtrace_common::names::UNWIND_STATS)?)?;
        let (rows_map, rows_unused) =
            if mode == UnwindMode::Fp { (None, Some(rows)) } else { (Some(RowMap::new(rows)?), None) };
        Ok(Unwinder {
            mode,
            rows_map,
            _rows_unused: rows_unused,
            mappings,
            wanted,
            stats,
            modules: StdHashMap::new(),
            pids: StdHashMap::new(),
            limits: Limits::default(),
            swept: std::time::Instant::now(),
        })
    }

    /// Takes the maps and loads the tables of the processes a `-p` or `--comm` filter selects
    /// now, so their stacks are whole from the start. Without a filter, processes are loaded
    /// as the walker meets them.
    pub fn start(bpf: &mut Ebpf, mode: UnwindMode, pid: Option<u32>, comm: Option<&str>) -> Result<Unwinder> {
        let mut unwinder = Unwinder::take(bpf, mode)?;
        if pid.is_some() || comm.is_some() {
            for pid in crate::target::matching(pid, comm) {
                unwinder.load(pid);
            }
        }
        Ok(unwinder)
    }

    pub fn mode(&self) -> UnwindMode {
        self.mode
    }

    /// Loads (or reloads) the tables of every executable mapping of `pid`. A process that has
    /// gone is not an error: there is nothing left to walk.
    pub fn load(&mut self, pid: u32) {
        if self.rows_map.is_none() {
            return;
        }
        let Ok(maps) = procfs::exec_mappings(pid) else {
            self.forget(pid);
            return;
        };
        let mut keys = HashSet::new();
        for m in &maps {
            let mapping = self.mapping_of(pid, m).over(m.start, m.end);
            for (addr, bits) in prefixes(m.start, m.end) {
                let key = Key::new(PID_BITS + bits, mapping_key(pid, addr));
                match self.mappings.insert(&key, mapping, 0) {
                    Ok(()) => {
                        keys.insert((key.prefix_len(), key.data()));
                    }
                    Err(e) => tracing::debug!("unwind: pid {pid}: cannot add {:#x}/{}: {e}", addr, bits),
                }
            }
        }
        // The bare pid: the process is loaded, and a PC in none of its mappings is new code.
        let marker = Key::new(PID_BITS, mapping_key(pid, 0));
        if self.mappings.insert(&marker, Mapping::new(MAPPING_UNKNOWN, 0, 0, 0), 0).is_ok() {
            keys.insert((marker.prefix_len(), marker.data()));
        }
        tracing::debug!("unwind: pid {pid}: {} mappings, {} entries", maps.len(), keys.len());
        if let Some(old) = self.pids.insert(pid, Loaded { keys: keys.clone(), exec_maps: maps }) {
            for stale in old.keys.difference(&keys) {
                let _ = self.mappings.remove(&Key::new(stale.0, stale.1));
            }
        }
    }

    /// Removes a process's entries (it exited, or is no longer traced).
    pub fn forget(&mut self, pid: u32) {
        if let Some(old) = self.pids.remove(&pid) {
            for key in &old.keys {
                let _ = self.mappings.remove(&Key::new(key.0, key.1));
            }
        }
    }

    /// Loads what the walker asked for since the last call; `accept` says whether a pid is
    /// one this tool traces (others are ignored, and asked about again later).
    pub fn poll(&mut self, accept: impl Fn(u32) -> bool) {
        if self.rows_map.is_none() {
            return;
        }
        let asked: Vec<u32> = self.wanted.keys().filter_map(Result::ok).collect();
        for pid in asked {
            let _ = self.wanted.remove(&pid);
            if !accept(pid) {
                continue;
            }
            // A PC outside every loaded mapping is new code, or junk: reload only for the first.
            let unchanged =
                self.pids.get(&pid).is_some_and(|l| procfs::exec_mappings(pid).is_ok_and(|m| m == l.exec_maps));
            if !unchanged {
                self.load(pid);
            }
        }
        // Processes that have gone: their entries would only take room. Once a second is enough.
        if self.swept.elapsed() < SWEEP_EVERY {
            return;
        }
        self.swept = std::time::Instant::now();
        let gone: Vec<u32> =
            self.pids.keys().copied().filter(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists()).collect();
        for pid in gone {
            self.forget(pid);
        }
    }

    /// The walker's counters, summed over CPUs.
    pub fn cut(&self) -> CutStacks {
        let counters: Vec<u64> =
            (0..memtrace_common::unwind::STAT_COUNT).map(|i| crate::kernel::maps::sum(&self.stats, i)).collect();
        CutStacks::from_counters(&counters)
    }

    /// `-v` lines: the row map's use, then each module's rows and bytes.
    pub fn describe(&self) -> Vec<String> {
        let Some(rows) = &self.rows_map else { return vec!["unwind: frame pointers only (--unwind fp)".into()] };
        let mut lines = vec![format!(
            "unwind: tables of {} modules, {} of {} rows ({} of {} reserved)",
            self.modules.len(),
            rows.used,
            rows.capacity,
            crate::output::bytes(rows.used as u64 * 16),
            crate::output::bytes(rows.capacity as u64 * 16),
        )];
        let mut modules: Vec<&Module> = self.modules.values().collect();
        modules.sort_by(|a, b| a.path.cmp(&b.path));
        for m in modules {
            let what = match &m.missing {
                Some(why) => format!("no table: {why}"),
                None => format!("{} rows, {}", m.rows, crate::output::bytes(m.bytes)),
            };
            lines.push(format!("unwind:   {}: {what}", m.path));
        }
        lines
    }

    /// The entry for mapping `m` of `pid`, building its file's table the first time. Code no
    /// file backs (a JIT's, the vdso) has no table memtrace reads: frame pointers there.
    fn mapping_of(&mut self, pid: u32, m: &procfs::Mapping) -> Mapping {
        if !m.is_file() {
            return Mapping::new(MAPPING_NO_TABLE, 0, 0, 0);
        }
        let id = (m.dev.0, m.dev.1, m.inode);
        if !self.modules.contains_key(&id) {
            let module = self.build(pid, m);
            self.modules.insert(id, module);
        }
        let module = &self.modules[&id];
        if module.kind != MAPPING_TABLE {
            return Mapping::new(module.kind, 0, 0, 0);
        }
        let Some(bias) = mapping_bias(&module.segments, m.start, m.offset) else {
            return Mapping::new(MAPPING_NO_TABLE, 0, 0, 0);
        };
        Mapping::new(module.kind, bias, module.start, module.rows)
    }

    fn build(&mut self, pid: u32, m: &procfs::Mapping) -> Module {
        let compiled = super::module::compile(pid, m, &self.limits);
        let mut module = Module {
            path: m.path.clone(),
            rows: 0,
            bytes: 0,
            start: 0,
            kind: compiled.kind,
            segments: compiled.segments,
            missing: compiled.missing,
        };
        if compiled.kind != MAPPING_TABLE {
            return module;
        }
        let Some(map) = self.rows_map.as_mut() else { return module };
        let rows = &compiled.rows;
        match map.append(rows) {
            Some(start) => {
                module.start = start;
                module.rows = rows.len() as u32;
                module.bytes = rows.len() as u64 * 16;
            }
            None => {
                module.kind = MAPPING_TABLE_FULL;
                module.missing = Some(format!("{} rows did not fit the row map (raise --unwind-rows)", rows.len()));
            }
        }
        module
    }
}

impl Drop for Unwinder {
    /// `-v`: what the tables took, once the run is over.
    fn drop(&mut self) {
        for line in self.describe() {
            tracing::info!("{line}");
        }
    }
}

/// The row map, written through a shared mapping of its memory (BPF_F_MMAPABLE): a table of
/// 100k rows is one copy, not 100k syscalls. Rows are only appended while tracing. Only the
/// pages being written are mapped, and only while written: the kernel maps every page of a
/// mapping at once, which would count the whole reservation in memtrace's RSS.
struct RowMap {
    map: MapData,
    capacity: u32,
    used: u32,
}

impl RowMap {
    fn new(map: aya::maps::Map) -> Result<RowMap> {
        let aya::maps::Map::Array(map) = map else { bail!("internal: UNWIND_ROWS is not an array") };
        let capacity = map.info()?.max_entries();
        Ok(RowMap { map, capacity, used: 0 })
    }

    /// Copies `rows` after the rows already there; None when they do not fit or the map's
    /// memory cannot be mapped.
    fn append(&mut self, rows: &[PackedRow]) -> Option<u32> {
        const ROW: usize = size_of::<PackedRow>();
        let start = self.used;
        let end = start.checked_add(u32::try_from(rows.len()).ok()?)?;
        if end > self.capacity {
            return None;
        }
        let page = 4096;
        let first = start as usize * ROW / page * page;
        let len = (end as usize * ROW).div_ceil(page) * page - first;
        use std::os::fd::AsFd as _;
        let fd = self.map.fd().as_fd().as_raw_fd();
        // SAFETY: maps pages of the array's own memory; the kernel checks the range.
        let window = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                first as i64,
            )
        };
        if window == libc::MAP_FAILED {
            tracing::info!("unwind: cannot map the row map: {}", std::io::Error::last_os_error());
            return None;
        }
        // SAFETY: rows `start..end` lie inside the window (its bounds computed above), which
        // nothing else in this process writes; the walker only reads rows that entries point
        // at, and entries for these rows are inserted after the copy. Then the window goes.
        unsafe {
            let at = window.cast::<u8>().add(start as usize * ROW - first).cast::<PackedRow>();
            std::ptr::copy_nonoverlapping(rows.as_ptr(), at, rows.len());
            libc::munmap(window, len);
        }
        self.used = end;
        Some(start)
    }
}

/// The aligned blocks `(address, prefix bits)` that exactly cover `[start, end)`.
fn prefixes(start: u64, end: u64) -> Vec<(u64, u32)> {
    let mut out = Vec::new();
    let mut at = start;
    while at < end && out.len() < 128 {
        // The largest block aligned at `at` that does not pass `end`.
        let mut size_bits = if at == 0 { 63 } else { at.trailing_zeros().min(63) };
        while size_bits > 0 && at.checked_add(1 << size_bits).is_none_or(|e| e > end) {
            size_bits -= 1;
        }
        out.push((at, 64 - size_bits));
        at += 1 << size_bits;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwind_prefixes_cover_the_range_exactly() {
        for (start, end) in [(0x1000, 0x2000), (0x7f00_1234_5000, 0x7f00_1239_a000), (0x55_0000_1000, 0x55_0020_0000)] {
            let blocks = prefixes(start, end);
            let mut at = start;
            for (addr, bits) in blocks {
                assert_eq!(addr, at);
                assert!((1..=64).contains(&bits));
                let size = 1u64 << (64 - bits);
                assert_eq!(addr % size, 0, "aligned");
                at += size;
            }
            assert_eq!(at, end);
        }
        assert_eq!(memtrace_common::unwind::KEY_BITS, PID_BITS + 64);
    }
}
