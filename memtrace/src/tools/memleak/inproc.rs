//! memleak's in-process recorder for `-c` (memtrace/preload/memtrace_preload.c).
//!
//! A uprobe costs each call a trap into the kernel, three per malloc/free pair: more than a
//! whole in-process recorder spends. So a command memtrace starts gets a shared object
//! preloaded that interposes the allocator, walks each stack in the process with the unwind
//! rows memtrace compiles, and keeps the live blocks in a table in the process's own memory.
//! memtrace writes the rows and module table in (process_vm_writev) whenever the process
//! stops after mapping code, and reads the blocks out (process_vm_readv) for each report and
//! at the process's exit stop, where its memory is still whole. A process the object does not
//! load into (a static program, one whose allocator is in its executable, a secure exec, an
//! environment cleared on the way) is probed with uprobes instead.

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    rc::Rc,
};

use anyhow::{Context as _, Result, bail};
use memtrace_common::{
    memleak::{ERR_INVALID_FREE, MemError},
    unwind::{MAPPING_NO_TABLE, MAPPING_TABLE, MAPPING_TABLE_FULL, PackedRow},
};

use super::blind_spots::BlindSpots;
use crate::{
    procfs,
    unwind::{CutStacks, Limits, Segment, mapping_bias, module::Compiled},
};

/// The object, carried inside memtrace and written out at run time.
const OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/memtrace_preload.so"));

const MAGIC: u64 = 0x6d65_6d74_7261_6365;
const VERSION: u32 = 2;
const ERRORS_CAP: u64 = 256;
const MODSLOTS: u64 = 16;
const MODULES_PER_SLOT: usize = 2048;
const COUNTERS: usize = 32;

/// Counter indices of a partition (the first 14 are memtrace-common's unwind ones).
const C_TRACKED: usize = 16;
const C_FREED: usize = 17;
const C_REPLACED: usize = 18;
const C_UNKNOWN_FREE: usize = 19;
const C_MAP_FULL: usize = 20;
const C_FAILED: usize = 21;
const C_STACKS_LOST: usize = 22;
pub(super) const C_FREED_EVICTED: usize = 23;
const C_INVALID_FREES: usize = 24;

/// `struct mt_state`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct RecorderState {
    magic: u64,
    version: u32,
    ready: u32,
    max_part_cap: u64,
    parts: u64,
    stack_index: u64,
    stack_index_cap: u64,
    stack_arena: u64,
    stack_arena_cap: u64,
    stack_arena_used: u64,
    stacks_stored: u64,
    stack_store_full: u64,
    rows: u64,
    rows_cap: u64,
    modslots: u64,
    mod_gen: u64,
    min_size: u64,
    max_size: u64,
    part_count: u64,
    unwind: u64,
    stacks_max: u64,
    errors: u64,
    errors_written: u64,
    freed_per_part: u64,
    unseen: u64,
}

/// `struct mt_part`.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Part {
    lock: u32,
    seq: u32,
    slots: u64,
    cap: u64,
    count: u64,
    counters: [u64; COUNTERS],
    freed: u64,
}

impl Default for Part {
    fn default() -> Self {
        Part { lock: 0, seq: 0, slots: 0, cap: 0, count: 0, counters: [0; COUNTERS], freed: 0 }
    }
}

/// `struct mt_block`: one live block.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub(super) struct Block {
    pub addr: u64,
    pub size: u64,
    pub stack: u64,
    pub time_ns: u64,
    pub func: u32,
    pad: u32,
}

/// `struct mt_stack_slot`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct StackSlot {
    id: u64,
    off: u32,
    len: u32,
}

/// `struct mt_module`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
struct Module {
    start: u64,
    end: u64,
    bias: u64,
    rows_start: u32,
    rows_len: u32,
    kind: u32,
    pad: u32,
}

/// Types whose every bit pattern is a value and that have no padding the kernel could leak
/// into: what may be copied from or into another process's memory.
///
/// # Safety
/// Implement only for `#[repr(C)]` types of integers laid out without implicit padding.
unsafe trait Plain: Copy {}
// SAFETY: repr(C) structs of u32/u64 fields, padding made explicit.
unsafe impl Plain for RecorderState {}
unsafe impl Plain for Part {}
unsafe impl Plain for Block {}
unsafe impl Plain for StackSlot {}
unsafe impl Plain for Module {}
unsafe impl Plain for u64 {}
unsafe impl Plain for PackedRow {}
unsafe impl Plain for MemError {}

/// Copies `buf.len()` bytes of process `pid` at `addr` into `buf`.
fn read_bytes(pid: u32, addr: u64, buf: &mut [u8]) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let local = libc::iovec { iov_base: buf[done..].as_mut_ptr().cast(), iov_len: buf.len() - done };
        let remote = libc::iovec { iov_base: (addr + done as u64) as *mut libc::c_void, iov_len: buf.len() - done };
        // SAFETY: one local iovec over our own buffer; the kernel checks the remote one.
        let n = unsafe { libc::process_vm_readv(pid as i32, &local, 1, &remote, 1, 0) };
        if n <= 0 {
            bail!("cannot read process {pid}'s memory at {addr:#x}: {}", std::io::Error::last_os_error());
        }
        done += n as usize;
    }
    Ok(())
}

fn read_vec<T: Plain>(pid: u32, addr: u64, n: usize) -> Result<Vec<T>> {
    // SAFETY: T is Plain: all zero bytes are a valid T.
    let mut out = vec![unsafe { std::mem::zeroed::<T>() }; n];
    // SAFETY: T is Plain: any bytes the read leaves are a valid T.
    let bytes = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u8>(), n * size_of::<T>()) };
    read_bytes(pid, addr, bytes)?;
    Ok(out)
}

fn read<T: Plain>(pid: u32, addr: u64) -> Result<T> {
    Ok(read_vec::<T>(pid, addr, 1)?[0])
}

fn write<T: Plain>(pid: u32, addr: u64, values: &[T]) -> Result<()> {
    // SAFETY: T is Plain: its bytes are all initialized.
    let bytes = unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values)) };
    let mut done = 0;
    while done < bytes.len() {
        let local = libc::iovec { iov_base: bytes[done..].as_ptr() as *mut libc::c_void, iov_len: bytes.len() - done };
        let remote = libc::iovec { iov_base: (addr + done as u64) as *mut libc::c_void, iov_len: bytes.len() - done };
        // SAFETY: as in read_bytes; the local buffer is only read.
        let n = unsafe { libc::process_vm_writev(pid as i32, &local, 1, &remote, 1, 0) };
        if n <= 0 {
            bail!("cannot write process {pid}'s memory at {addr:#x}: {}", std::io::Error::last_os_error());
        }
        done += n as usize;
    }
    Ok(())
}

/// The object written to disk, and what memtrace needs to find it in a process.
pub(super) struct Shim {
    path: PathBuf,
    /// (dev, inode) of the file, as /proc/PID/maps shows a mapping of it.
    id: (u64, u64),
    /// The state's virtual address in the object, and the object's loadable segments.
    state_vaddr: u64,
    segments: Vec<Segment>,
}

impl Shim {
    /// Writes the object where every process of the command can open it (once per build:
    /// its name holds a hash of its bytes).
    pub(super) fn install() -> Result<Shim> {
        let hash = memtrace_common::stack::hash(
            &OBJECT.chunks(8).map(|c| c.iter().rev().fold(0u64, |h, &b| h << 8 | b as u64)).collect::<Vec<_>>(),
        );
        use std::os::unix::fs::PermissionsExt as _;
        let dir = Path::new("/run/memtrace");
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        // Readable by all whatever root's umask: a command run as another user (--user, sudo)
        // loads the object with that user's rights.
        let everyone = fs::Permissions::from_mode(0o755);
        fs::set_permissions(dir, everyone.clone()).with_context(|| format!("cannot open up {}", dir.display()))?;
        let path = dir.join(format!("libmemtrace_preload-{hash:016x}.so"));
        let meta = fs::metadata(&path).ok();
        if meta.as_ref().map(|m| m.len()) != Some(OBJECT.len() as u64) {
            let temp = dir.join(format!(".preload-{}", std::process::id()));
            fs::write(&temp, OBJECT).with_context(|| format!("cannot write {}", temp.display()))?;
            fs::set_permissions(&temp, everyone)?;
            fs::rename(&temp, &path).with_context(|| format!("cannot write {}", path.display()))?;
        } else if meta.is_some_and(|m| m.permissions().mode() & 0o555 != 0o555) {
            fs::set_permissions(&path, everyone)?;
        }
        let meta = fs::metadata(&path)?;
        let (state_vaddr, segments) = layout().context("internal: memtrace's preload object is malformed")?;
        Ok(Shim { id: (meta.dev(), meta.ino()), path, state_vaddr, segments })
    }

    /// The variables that make a command load the object: LD_PRELOAD (before what the user
    /// preloads, whose allocator it then calls) and the recorder's sizes.
    pub(super) fn env(&self, config: &Config) -> Vec<(String, String)> {
        let theirs = std::env::var("LD_PRELOAD").unwrap_or_default();
        let preload = if theirs.trim().is_empty() {
            self.path.display().to_string()
        } else {
            format!("{} {theirs}", self.path.display())
        };
        let config = format!(
            "allocs={} stacks={} rows={} min={} max={} unwind={} freed={} call_sites={} sample={}",
            config.max_allocs,
            config.max_stacks,
            config.rows,
            config.min_size,
            config.max_size,
            config.unwind,
            config.freed,
            u8::from(config.call_sites),
            config.sample_bytes
        );
        vec![("LD_PRELOAD".into(), preload), ("MEMTRACE_PRELOAD".into(), config)]
    }

    /// Whether the process maps the object.
    pub(super) fn mapped_in(&self, pid: u32) -> Option<procfs::Mapping> {
        let maps = procfs::mapped_files(pid).ok()?;
        maps.into_iter().find(|m| (libc::makedev(m.dev.0, m.dev.1), m.inode) == self.id && m.offset == 0)
    }

    /// Whether `pid`, stopped right after an exec, will load the object: its environment names
    /// it (and the loader will read it: no secure exec), it is dynamically linked, and its
    /// executable does not define malloc itself (which no preloaded object can then interpose).
    pub(super) fn will_load(&self, pid: u32) -> bool {
        let Ok((_, preload)) = crate::loader::loader_env(pid) else { return false };
        let named = preload.split([' ', ':']).any(|p| Path::new(p) == self.path);
        let exe = PathBuf::from(format!("/proc/{pid}/exe"));
        let dynamic = crate::loader::Dynamic::read(&exe).is_ok_and(|d| d.interp.is_some());
        named && dynamic && !crate::loader::defines(&exe, "malloc")
    }
}

/// The state symbol's address and the loadable segments of the object memtrace carries.
fn layout() -> Option<(u64, Vec<Segment>)> {
    use object::{Object as _, ObjectSymbol as _};
    let file = object::File::parse(OBJECT).ok()?;
    let state = file.dynamic_symbols().find(|s| s.name() == Ok("memtrace_preload_state"))?;
    let segments = crate::unwind::load_segments(OBJECT).ok()?;
    Some((state.address(), segments))
}

/// The recorder's sizes, from memleak's options.
pub(super) struct Config {
    pub max_allocs: u32,
    pub max_stacks: u32,
    pub rows: u32,
    pub min_size: u64,
    pub max_size: u64,
    /// memtrace-common's MODE_FP, MODE_AUTO or MODE_DWARF: `--unwind`.
    pub unwind: u32,
    /// Slots of the record of freed blocks; 0: memory errors are not checked (`--no-errors`).
    pub freed: u64,
    /// `--sample-bytes`: the mean interval of each thread's countdown; 0 records every block.
    pub sample_bytes: u64,
    /// An allocation keeps its call site only, unwalked (`--errors-only`).
    pub call_sites: bool,
}

/// Compiled tables by file, shared by every process memtrace writes them into.
#[derive(Default)]
pub(super) struct Tables {
    files: HashMap<(u32, u32, u64), Rc<Compiled>>,
    limits: Limits,
}

impl Tables {
    fn get(&mut self, pid: u32, m: &procfs::Mapping) -> Rc<Compiled> {
        let id = (m.dev.0, m.dev.1, m.inode);
        self.files.entry(id).or_insert_with(|| Rc::new(crate::unwind::module::compile(pid, m, &self.limits))).clone()
    }
}

/// What one read of a process's recorder found.
#[derive(Clone, Default)]
pub(super) struct Snapshot {
    pub blocks: Vec<Block>,
    pub counters: [u64; COUNTERS],
    pub stack_store_full: u64,
    pub stacks_stored: u64,
    /// Partitions read while they kept changing: their blocks may be off by one or two.
    pub unsteady: u64,
}

/// What the recorders of some processes counted, summed: the report's totals and blind spots.
#[derive(Default)]
pub(super) struct Counts {
    pub tracked: u64,
    pub freed: u64,
    pub failed: u64,
    replaced: u64,
    unknown_frees: u64,
    map_full: u64,
    stacks_lost: u64,
    stack_store_full: u64,
    freed_evicted: u64,
    invalid_frees: u64,
    pub cut: CutStacks,
}

impl Counts {
    pub(super) fn sum<'a>(snapshots: impl Iterator<Item = &'a Snapshot>) -> Counts {
        let mut sum = Counts::default();
        for snap in snapshots {
            let c = &snap.counters;
            sum.tracked += c[C_TRACKED];
            sum.freed += c[C_FREED];
            sum.failed += c[C_FAILED];
            sum.replaced += c[C_REPLACED];
            sum.unknown_frees += c[C_UNKNOWN_FREE];
            sum.map_full += c[C_MAP_FULL];
            sum.stacks_lost += c[C_STACKS_LOST];
            sum.stack_store_full += snap.stack_store_full;
            sum.freed_evicted += c[C_FREED_EVICTED];
            sum.invalid_frees += c[C_INVALID_FREES];
            sum.cut.add(&CutStacks::from_counters(c));
        }
        sum
    }

    /// `spots` with these processes' blind spots added.
    pub(super) fn add_to(&self, mut spots: BlindSpots) -> BlindSpots {
        spots.replaced += self.replaced;
        // Invalid frees are errors, reported as such, not blind spots.
        spots.unknown_frees += self.unknown_frees - self.invalid_frees;
        spots.freed_evicted += self.freed_evicted;
        spots.map_full += self.map_full;
        spots.stacks_lost += self.stacks_lost;
        spots.stack_store_full += self.stack_store_full;
        spots
    }
}

/// One process's recorder, as memtrace knows it.
#[derive(Clone)]
pub(super) struct Recorder {
    state_addr: u64,
    state: RecorderState,
    /// Rows already in the process's row region, by file: (first row, rows).
    files: HashMap<(u32, u32, u64), (u32, u32)>,
    rows_used: u64,
    generation: u64,
    /// Stacks read so far, by id.
    stacks: HashMap<u64, Vec<u64>>,
    stacks_read: u64,
    /// The last read, kept once the process is gone.
    pub last: Option<Snapshot>,
    /// The last read was made at the process's exit stop: nothing after it is missing.
    pub read_at_exit: bool,
    /// Errors read from the ring: how many, and those not yet reported.
    errors_read: u64,
    pub errors: Vec<MemError>,
    /// Errors overwritten in the ring before memtrace read them.
    pub errors_lost: u64,
}

impl Recorder {
    /// The recorder of `pid`, once the object is mapped and has set itself up; None before.
    pub(super) fn find(shim: &Shim, pid: u32) -> Option<Recorder> {
        let m = shim.mapped_in(pid)?;
        let bias = mapping_bias(&shim.segments, m.start, m.offset)?;
        let state_addr = shim.state_vaddr.wrapping_add(bias);
        let state: RecorderState = read(pid, state_addr).ok()?;
        if state.magic != MAGIC || state.version != VERSION || state.parts == 0 {
            return None;
        }
        Some(Recorder {
            state_addr,
            state,
            files: HashMap::new(),
            rows_used: 0,
            generation: 0,
            stacks: HashMap::new(),
            stacks_read: 0,
            last: None,
            read_at_exit: false,
            errors_read: 0,
            errors: Vec::new(),
            errors_lost: 0,
        })
    }

    /// The recorder a forked child starts with: its parent's, copied with its memory.
    pub(super) fn forked(&self) -> Recorder {
        Recorder { last: None, errors: Vec::new(), errors_lost: 0, ..self.clone() }
    }

    /// Describes the process's code to its recorder: each executable mapping with its rows
    /// (written into the process the first time a file is seen) and load bias. Call while the
    /// process is stopped after mapping code, before that code runs.
    pub(super) fn describe_code(&mut self, pid: u32, tables: &mut Tables) -> Result<()> {
        let mut modules = Vec::new();
        for m in procfs::exec_mappings(pid)? {
            let mut module = Module { start: m.start, end: m.end, kind: MAPPING_NO_TABLE, ..Default::default() };
            if m.is_file() {
                let compiled = tables.get(pid, &m);
                module.kind = compiled.kind;
                if compiled.kind == MAPPING_TABLE {
                    match (self.rows_of(pid, &m, &compiled)?, mapping_bias(&compiled.segments, m.start, m.offset)) {
                        (Some((start, len)), Some(bias)) => {
                            (module.rows_start, module.rows_len, module.bias) = (start, len, bias)
                        }
                        (None, _) => module.kind = MAPPING_TABLE_FULL,
                        (_, None) => module.kind = MAPPING_NO_TABLE,
                    }
                }
            }
            modules.push(module);
        }
        modules.sort_by_key(|m| m.start);
        modules.truncate(MODULES_PER_SLOT);
        self.generation += 1;
        let slot =
            self.state.modslots + (self.generation % MODSLOTS) * (8 + (MODULES_PER_SLOT * size_of::<Module>()) as u64);
        write(pid, slot + 8, &modules)?;
        write(pid, slot, &[modules.len() as u64])?;
        write(pid, self.state_addr + std::mem::offset_of!(RecorderState, mod_gen) as u64, &[self.generation])
    }

    /// Where `m`'s file's rows sit in the process, writing them there the first time; None
    /// when its row region is full.
    fn rows_of(&mut self, pid: u32, m: &procfs::Mapping, compiled: &Compiled) -> Result<Option<(u32, u32)>> {
        let id = (m.dev.0, m.dev.1, m.inode);
        if let Some(&at) = self.files.get(&id) {
            return Ok(Some(at));
        }
        let len = compiled.rows.len() as u64;
        if self.rows_used + len > self.state.rows_cap {
            return Ok(None);
        }
        write(pid, self.state.rows + self.rows_used * size_of::<PackedRow>() as u64, &compiled.rows)?;
        let at = (self.rows_used as u32, len as u32);
        self.rows_used += len;
        self.files.insert(id, at);
        Ok(Some(at))
    }

    /// Reads the live blocks and counters, each partition consistently (its sequence number
    /// the same and even before and after), and the stacks stored since the last read.
    pub(super) fn snapshot(&mut self, pid: u32) -> Result<&Snapshot> {
        let state: RecorderState = read(pid, self.state_addr)?;
        // A dying process's memory may be reclaimed under memtrace (the OOM reaper): zeros.
        if state.magic != MAGIC {
            bail!("its recorder's memory is gone");
        }
        let part_size = size_of::<Part>() as u64;
        let mut snap = Snapshot {
            stack_store_full: state.stack_store_full,
            stacks_stored: state.stacks_stored,
            ..Default::default()
        };
        for i in 0..state.part_count {
            let header = state.parts + i * part_size;
            let mut taken = None;
            for attempt in 0..64 {
                let before: Part = read(pid, header)?;
                let cap = (before.cap as usize).min(state.max_part_cap as usize);
                // Slots replaced by bigger ones between the reads are unmapped: read again.
                let blocks: Vec<Block> = read_vec(pid, before.slots, cap).unwrap_or_default();
                let after: Part = read(pid, header)?;
                let steady = before.seq == after.seq && before.seq.is_multiple_of(2) && blocks.len() == cap;
                if steady || attempt == 63 {
                    snap.unsteady += u64::from(!steady);
                    taken = Some((after, blocks));
                    break;
                }
                std::thread::yield_now();
            }
            let (part, blocks) = taken.expect("the last attempt is taken");
            for (sum, c) in snap.counters.iter_mut().zip(part.counters) {
                *sum += c;
            }
            snap.blocks.extend(blocks.into_iter().filter(|b| b.addr != 0));
        }
        if snap.unsteady > 0 {
            // A block moved while it was read can be there twice.
            snap.blocks.sort_by_key(|b| b.addr);
            snap.blocks.dedup_by_key(|b| b.addr);
        }
        if state.stacks_stored != self.stacks_read {
            self.read_stacks(pid, &state)?;
        }
        self.read_errors(pid, &state)?;
        self.state = state;
        Ok(self.last.insert(snap))
    }

    /// Reads the errors written since the last read (and the stacks they name) into `errors`.
    pub(super) fn poll_errors(&mut self, pid: u32) -> Result<()> {
        let state: RecorderState = read(pid, self.state_addr)?;
        if state.errors_written != self.errors_read {
            if state.stacks_stored != self.stacks_read {
                self.read_stacks(pid, &state)?;
            }
            self.read_errors(pid, &state)?;
            // An invalid free is told from the live blocks (an interior pointer): read them now,
            // as the last periodic read may predate the block it points into.
            if self.errors.iter().any(|e| e.error == ERR_INVALID_FREE) {
                self.snapshot(pid)?;
            }
        }
        Ok(())
    }

    fn read_errors(&mut self, pid: u32, state: &RecorderState) -> Result<()> {
        if state.errors == 0 || state.errors_written == self.errors_read {
            return Ok(());
        }
        let ring: Vec<MemError> = read_vec(pid, state.errors, ERRORS_CAP as usize)?;
        let first = self.errors_read.max(state.errors_written.saturating_sub(ERRORS_CAP));
        self.errors_lost += first - self.errors_read;
        for i in first..state.errors_written {
            let e = ring[(i % ERRORS_CAP) as usize];
            // A slot being written, or written over again, is not this error.
            if e.seq == i + 1 {
                self.errors.push(e);
            } else {
                self.errors_lost += 1;
            }
        }
        self.errors_read = state.errors_written;
        Ok(())
    }

    fn read_stacks(&mut self, pid: u32, state: &RecorderState) -> Result<()> {
        let index: Vec<StackSlot> = read_vec(pid, state.stack_index, state.stack_index_cap as usize)?;
        let arena: Vec<u64> = read_vec(pid, state.stack_arena, state.stack_arena_used as usize)?;
        for slot in index.iter().filter(|s| s.id != 0) {
            let range = slot.off as usize..slot.off as usize + slot.len as usize;
            if let Some(ips) = arena.get(range) {
                self.stacks.entry(slot.id).or_insert_with(|| ips.to_vec());
            }
        }
        self.stacks_read = state.stacks_stored;
        Ok(())
    }

    /// The addresses of stack `id`, innermost first.
    pub(super) fn stack(&self, id: u64) -> Vec<u64> {
        self.stacks.get(&id).cloned().unwrap_or_default()
    }
}
