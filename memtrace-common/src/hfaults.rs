//! hfaults: one event per hugetlb page fault, from a kprobe on hugetlb_fault or, without
//! kprobes, from exceptions:page_fault_user filtered to the hugetlb ranges of the faulting
//! process, which the kernel side keeps up to date through mmap, munmap, mremap, shmdt, exec
//! and exit, and user space adds to from /proc/PID/smaps.

use crate::user_pod;

/// Hugetlb mappings of one process (the key of `RANGES` is its pid), `[start, end)`.
pub const MAX_RANGES: usize = 16;

#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Ranges {
    /// Unused slots have end == 0.
    pub start: [u64; MAX_RANGES],
    pub end: [u64; MAX_RANGES],
    /// Bumped by the kernel side at each change, so that user space can tell that the ranges
    /// changed while it read /proc/PID/smaps (it then leaves them alone until its next scan).
    pub generation: u64,
}

/// A tracepoint field this kernel lacks.
pub const FIELD_ABSENT: u32 = u32::MAX;

/// Offsets the kprobe reads, from the kernel's BTF: `vma->vm_start`, `vma->vm_file`,
/// `file->f_path.dentry`, `dentry->d_name.name`. `valid` 0: do not read them.
/// Then the tracepoint fields of the fallback, from their format files.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct KernelOffsets {
    pub vm_start: u32,
    pub vm_file: u32,
    pub f_path_dentry: u32,
    pub d_name_name: u32,
    pub valid: u32,
    /// `address` in exceptions:page_fault_user.
    pub tp_address: u32,
    /// syscalls:sys_enter_mmap `len`, `flags`; sys_exit_mmap `ret`.
    pub mmap_len: u32,
    pub mmap_flags: u32,
    pub mmap_ret: u32,
    /// syscalls:sys_enter_munmap `addr`, `len`; sys_exit_munmap `ret`.
    pub munmap_addr: u32,
    pub munmap_len: u32,
    pub munmap_ret: u32,
    /// syscalls:sys_enter_mremap `addr`, `old_len`, `new_len`, `flags`; sys_exit_mremap `ret`.
    pub mremap_addr: u32,
    pub mremap_old_len: u32,
    pub mremap_new_len: u32,
    pub mremap_flags: u32,
    pub mremap_ret: u32,
    /// syscalls:sys_enter_shmdt `shmaddr`; sys_exit_shmdt `ret`.
    pub shmdt_addr: u32,
    pub shmdt_ret: u32,
    /// sched:sched_process_exit `group_dead` (6.16+), or FIELD_ABSENT.
    pub exit_group_dead: u32,
    /// task:task_newtask `pid` (the child), `clone_flags`.
    pub newtask_pid: u32,
    pub newtask_flags: u32,
    /// The default huge page size (MAP_HUGETLB without a size in its flags).
    pub default_huge: u64,
}

/// mmap's flag for hugetlb pages, and where it encodes a page size other than the default.
pub const MAP_HUGETLB: u64 = 0x40000;
pub const MAP_HUGE_SHIFT: u64 = 26;
pub const MAP_HUGE_MASK: u64 = 0x3f;
/// mremap's flag that leaves the old range mapped.
pub const MREMAP_DONTUNMAP: u64 = 4;

/// A syscall in flight, by thread: what its exit needs from its entry.
pub const CALL_MMAP: u32 = 1;
pub const CALL_MUNMAP: u32 = 2;
pub const CALL_MREMAP: u32 = 3;
pub const CALL_SHMDT: u32 = 4;

#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Call {
    pub kind: u32,
    pub _pad: u32,
    pub addr: u64,
    pub len: u64,
    pub new_len: u64,
    pub flags: u64,
}

/// Indexes of the fallback's per-CPU counters (`DROPPED`).
/// A hugetlb range not kept: the process had more than MAX_RANGES at once.
pub const DROPPED_RANGES: u32 = 0;

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

user_pod!(Ranges, KernelOffsets, Call, Event);

/// The maps and globals user space finds by name in the object.
pub mod names {
    crate::names!(OFFSETS, RANGES, DROPPED);
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn no_implicit_padding() {
        assert_eq!(size_of::<Ranges>(), 2 * 8 * MAX_RANGES + 8);
        assert_eq!(size_of::<KernelOffsets>(), 22 * 4 + 8);
        assert_eq!(size_of::<Call>(), 4 + 4 + 4 * 8);
        assert_eq!(size_of::<Event>(), 4 + 4 + 8 + 8 + 4 + 4 + 16 + 32);
    }
}
