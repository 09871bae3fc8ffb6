//! The unwinder's shared types: the rows user space compiles from `.eh_frame`, the per-process
//! mapping entries that point the eBPF walker at them, and the counters of cut stacks.

use crate::user_pod;

/// `UNWIND_MODE` global: walk with `bpf_get_stack` (frame pointers only).
pub const MODE_FP: u32 = 0;
/// `UNWIND_MODE` global: walk with the tables, frame pointers only for code without one.
pub const MODE_AUTO: u32 = 1;
/// `UNWIND_MODE` global: walk with the tables only.
pub const MODE_DWARF: u32 = 2;

/// `PackedRow::kind` values. The meaning of the offset fields depends on the kind.
pub const KIND_NO_TABLE: u8 = 0;
/// CFA = RSP + cfa_offset.
pub const KIND_CFA_RSP: u8 = 1;
/// CFA = RBP + cfa_offset.
pub const KIND_CFA_RBP: u8 = 2;
/// CFA = RSP + cfa_offset (+8 when `pc & 15 >= rbp_offset`); RBP unchanged.
pub const KIND_PLT: u8 = 3;
pub const KIND_OUTERMOST: u8 = 4;
/// cfa_offset holds the reason the row cannot be walked.
pub const KIND_UNSUPPORTED: u8 = 5;

/// `PackedRow::rbp_kind` values for the CFA kinds.
pub const RBP_UNCHANGED: u8 = 0;
/// The caller's RBP is at CFA + rbp_offset.
pub const RBP_AT_CFA: u8 = 1;

/// One row of a module's table: 16 bytes, so an array of them can be binary-searched by `pc`
/// from eBPF. A row holds from its `pc` (the file's virtual address) up to the next row's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedRow {
    pub pc: u64,
    pub cfa_offset: i32,
    pub rbp_offset: i16,
    pub kind: u8,
    pub rbp_kind: u8,
}

/// Data of a `UNWIND_MAPPINGS` LPM-trie key: the pid, then an address, both big-endian so
/// that a prefix of the key is a pid plus an aligned block of its address space. A key of
/// `PID_BITS` alone marks a process whose mappings are loaded.
pub type MappingKey = [u8; 12];
pub const PID_BITS: u32 = 32;
pub const KEY_BITS: u32 = 96;

#[inline(always)]
pub fn mapping_key(pid: u32, addr: u64) -> MappingKey {
    let mut key = [0u8; 12];
    let p = pid.to_be_bytes();
    let a = addr.to_be_bytes();
    let mut i = 0;
    while i < 4 {
        key[i] = p[i];
        i += 1;
    }
    while i < 12 {
        key[i] = a[i - 4];
        i += 1;
    }
    key
}

/// `Mapping::kind`: rows `[rows_start, rows_start + rows_len)` of `UNWIND_ROWS` cover it.
pub const MAPPING_TABLE: u32 = 0;
/// Its file has no unwind information (or it is not a file): frame pointers only.
pub const MAPPING_NO_TABLE: u32 = 1;
/// Its file's table did not fit the row map: frame pointers only.
pub const MAPPING_TABLE_FULL: u32 = 2;
/// The process is loaded, but no loaded mapping holds this address (a new `dlopen`, JIT code).
pub const MAPPING_UNKNOWN: u32 = 3;
/// Its file has unwind sections memtrace could not use (malformed): frame pointers only.
pub const MAPPING_UNUSABLE: u32 = 4;

/// Value of a `UNWIND_MAPPINGS` entry. The bias turns a PC into the file's virtual address.
/// Only 4-byte fields: the trie stores values right after the 12 key bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mapping {
    pub bias_lo: u32,
    pub bias_hi: u32,
    pub rows_start: u32,
    pub rows_len: u32,
    pub kind: u32,
    pub _pad: u32,
    /// The whole mapping's range (the trie holds it under several prefixes): a walk whose next
    /// frame is in the same mapping needs no lookup. 0..0 for the bare-pid marker.
    pub start_lo: u32,
    pub start_hi: u32,
    pub end_lo: u32,
    pub end_hi: u32,
}

impl Mapping {
    pub fn new(kind: u32, bias: u64, rows_start: u32, rows_len: u32) -> Mapping {
        Mapping {
            bias_lo: bias as u32,
            bias_hi: (bias >> 32) as u32,
            rows_start,
            rows_len,
            kind,
            _pad: 0,
            start_lo: 0,
            start_hi: 0,
            end_lo: 0,
            end_hi: 0,
        }
    }

    /// The same entry, for the mapping `[start, end)`.
    pub fn over(self, start: u64, end: u64) -> Mapping {
        Mapping {
            start_lo: start as u32,
            start_hi: (start >> 32) as u32,
            end_lo: end as u32,
            end_hi: (end >> 32) as u32,
            ..self
        }
    }

    #[inline(always)]
    pub fn bias(&self) -> u64 {
        (self.bias_hi as u64) << 32 | self.bias_lo as u64
    }

    #[inline(always)]
    pub fn start(&self) -> u64 {
        (self.start_hi as u64) << 32 | self.start_lo as u64
    }

    #[inline(always)]
    pub fn end(&self) -> u64 {
        (self.end_hi as u64) << 32 | self.end_lo as u64
    }
}

/// Indices of `UNWIND_STATS`, per-CPU counters of walks by how they ended.
pub const WALKS: u32 = 0;
/// Reached the outermost frame (`_start`, a thread's entry) or a zero return address.
pub const ENDED_COMPLETE: u32 = 1;
/// Cut at code without unwind information, where frame pointers did not lead on either.
pub const CUT_NO_TABLE: u32 = 2;
/// Cut because the process's tables were not loaded yet (asked for; later stacks have them).
pub const CUT_NOT_LOADED: u32 = 3;
/// Cut because a module's table did not fit the row map (raise `--unwind-rows`).
pub const CUT_TABLE_FULL: u32 = 4;
/// Cut at the depth limit (`stack::MAX_FRAMES`).
pub const CUT_DEPTH: u32 = 5;
/// Cut because stack memory could not be read (paged out, or a corrupt frame).
pub const CUT_UNREADABLE: u32 = 6;
/// Cut at a rule the walker cannot evaluate (realigned stacks, signal frames, expressions).
pub const CUT_UNSUPPORTED: u32 = 7;
/// Cut because a frame did not move up the stack, which only a wrong rule or corrupt
/// memory gives.
pub const CUT_BAD_FRAME: u32 = 8;
/// Frames found through frame pointers, in code without a table.
pub const FP_FRAMES: u32 = 9;
/// Cut at a module whose unwind sections are malformed, where frame pointers did not lead on.
pub const CUT_UNUSABLE: u32 = 10;
/// Cut at a uretprobe's return trampoline whose real return address the kernel did not give.
pub const CUT_TRAMPOLINE: u32 = 11;
/// Return addresses a uretprobe (memtrace's or another tool's) had replaced with its
/// trampoline, taken back from the kernel's record of the call.
pub const TRAMPOLINE_FRAMES: u32 = 12;
/// Walks made by frame pointers alone (`--unwind fp`): how they ended is not known here.
pub const FP_WALKS: u32 = 13;
pub const STAT_COUNT: u32 = 14;

/// Byte offsets, from the kernel's BTF, of what the walker reads to see through uretprobe
/// trampolines: the task's pending return instances (`task_struct.utask`,
/// `uprobe_task.return_instances`, each `return_instance`'s `stack`, `orig_ret_vaddr` and
/// `next`), and the trampoline's address (`task_struct.mm`, `mm_struct.uprobes_state.xol_area`,
/// `xol_area.vaddr`). `enabled` is 0 when the kernel's BTF lacks any of them.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct TrampolineOffsets {
    pub task_utask: u32,
    pub utask_return_instances: u32,
    pub ri_stack: u32,
    pub ri_orig_ret_vaddr: u32,
    pub ri_next: u32,
    pub task_mm: u32,
    pub mm_xol_area: u32,
    pub xol_vaddr: u32,
    pub enabled: u32,
}

/// Rows the walker can search: 2^BINARY_STEPS; also the row map's largest size.
pub const BINARY_STEPS: u32 = 24;

user_pod!(PackedRow, Mapping, TrampolineOffsets);
