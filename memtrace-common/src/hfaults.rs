//! hfaults: one event per hugetlb page fault, from a kprobe on hugetlb_fault or, without
//! kprobes, from exceptions:page_fault_user filtered to the hugetlb ranges user space found.

use crate::user_pod;

/// Hugetlb mappings of one process (the key of `RANGES` is its pid), `[start, end)`; unused
/// slots have start == end == 0.
pub const MAX_RANGES: usize = 8;

#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Ranges {
    pub start: [u64; MAX_RANGES],
    pub end: [u64; MAX_RANGES],
}

/// Offsets the kprobe reads, from the kernel's BTF: `vma->vm_start`, `vma->vm_file`,
/// `file->f_path.dentry`, `dentry->d_name.name`. `valid` 0: do not read them.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct KernelOffsets {
    pub vm_start: u32,
    pub vm_file: u32,
    pub f_path_dentry: u32,
    pub d_name_name: u32,
    pub valid: u32,
    /// Offset of `address` in exceptions:page_fault_user (the fallback).
    pub tp_address: u32,
    /// Offsets of `len` and `flags` in syscalls:sys_enter_mmap, `ret` in sys_exit_mmap.
    pub mmap_len: u32,
    pub mmap_flags: u32,
    pub mmap_ret: u32,
    pub _pad: u32,
}

/// mmap's flag for hugetlb pages.
pub const MAP_HUGETLB: u64 = 0x40000;

/// Where an event came from.
pub const SRC_KPROBE: u32 = 0;
pub const SRC_TRACEPOINT: u32 = 1;

#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct Event {
    pub pid: u32,
    pub tid: u32,
    pub address: u64,
    /// Start of the faulting mapping (kprobe: from the vma; tracepoint: the matching range).
    pub vm_start: u64,
    pub source: u32,
    pub _pad: u32,
    pub comm: [u8; 16],
    /// Name of the mapped file (kprobe only; empty otherwise).
    pub file: [u8; 32],
}

user_pod!(Ranges, KernelOffsets, Event);
