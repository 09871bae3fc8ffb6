//! segv: fatal SIGSEGV, SIGBUS and SIGABRT (or every one delivered), each with the faulting
//! address, its mapping and a classification made while the process still has its memory.

use crate::user_pod;

pub const SIGABRT: u32 = 6;
pub const SIGBUS: u32 = 7;
pub const SIGSEGV: u32 = 11;

/// The x86 trap number of a page fault: only then is `thread.cr2` this signal's address.
pub const X86_TRAP_PF: u64 = 14;
/// Page-fault error code bits.
pub const PF_WRITE: u64 = 1 << 1;
pub const PF_INSTR: u64 = 1 << 4;

/// `vm_flags` bits (stable since 2.6).
pub const VM_READ: u64 = 0x1;
pub const VM_WRITE: u64 = 0x2;
pub const VM_EXEC: u64 = 0x4;
pub const VM_GROWSDOWN: u64 = 0x100;

/// How far from the stack pointer an address still counts as the stack's: a frame a
/// function reserves at once (`sub rsp, N`) and writes at its far end.
pub const NEAR_SP: u64 = 64 << 10;

/// Classes, decided by `classify`.
pub const CLASS_UNKNOWN: u32 = 0;
pub const CLASS_STACK_OVERFLOW: u32 = 1;
pub const CLASS_THREAD_STACK_OVERFLOW: u32 = 2;
pub const CLASS_NULL: u32 = 3;
pub const CLASS_UNMAPPED: u32 = 4;
pub const CLASS_WRITE_READONLY: u32 = 5;
pub const CLASS_EXEC_NOEXEC: u32 = 6;
pub const CLASS_NO_ACCESS: u32 = 7;
pub const CLASS_READ_UNREADABLE: u32 = 8;
pub const CLASS_BEYOND_FILE: u32 = 9;
/// A SIGSEGV/SIGBUS without a page fault's address (general protection: a non-canonical
/// address, a privileged instruction) or one sent by a process.
pub const CLASS_NO_ADDRESS: u32 = 10;
/// SIGABRT from glibc's allocator (malloc_printerr): the event carries its message.
pub const CLASS_HEAP: u32 = 11;
/// Any other SIGABRT (abort(), assert, a kill).
pub const CLASS_ABORT: u32 = 12;
/// The kernel has no bpf_find_vma (before 5.17): user space classifies from /proc/PID/maps.
pub const CLASS_NEEDS_MAPS: u32 = 13;
/// bpf_find_vma could not take the process's mmap lock at that moment.
pub const CLASS_VMA_BUSY: u32 = 14;
/// A protection fault in a mapping that allows the access (protection keys and the like).
pub const CLASS_OTHER: u32 = 15;

/// The mapping that holds the address, as the kernel or /proc/PID/maps shows it.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    pub flags: u64,
    /// Non-zero for a file mapping.
    pub file: u64,
}

/// What a fault's class depends on.
#[derive(Copy, Clone, Debug, Default)]
pub struct Fault {
    pub sig: u32,
    pub code: i32,
    pub address: u64,
    pub sp: u64,
    pub error_code: u64,
    /// Where the main thread's stack begins (`mm->start_stack`).
    pub start_stack: u64,
    pub mmap_min_addr: u64,
}

pub const SEGV_MAPERR: i32 = 1;
pub const SEGV_ACCERR: i32 = 2;
pub const BUS_ADRERR: i32 = 2;

/// The class of a page-fault signal, given the mapping at its address (None: unmapped).
#[inline(always)]
pub fn classify(f: &Fault, vma: Option<&Vma>) -> u32 {
    let near_sp = f.address.wrapping_add(NEAR_SP) >= f.sp && f.address <= f.sp.wrapping_add(NEAR_SP);
    if f.address < f.mmap_min_addr {
        return CLASS_NULL;
    }
    let Some(vma) = vma else {
        // The main stack grows down on demand: a fault below it, at the stack pointer, is the
        // kernel refusing to grow it further (the rlimit, or the guard gap to a mapping).
        return if near_sp && f.address < f.start_stack { CLASS_STACK_OVERFLOW } else { CLASS_UNMAPPED };
    };
    let access = vma.flags & (VM_READ | VM_WRITE | VM_EXEC);
    if access == 0 {
        // A thread's stack has a PROT_NONE guard below it (glibc, musl).
        return if near_sp { CLASS_THREAD_STACK_OVERFLOW } else { CLASS_NO_ACCESS };
    }
    if f.sig == SIGBUS {
        return if vma.file != 0 && f.code == BUS_ADRERR { CLASS_BEYOND_FILE } else { CLASS_OTHER };
    }
    if f.error_code & PF_INSTR != 0 && vma.flags & VM_EXEC == 0 {
        CLASS_EXEC_NOEXEC
    } else if f.error_code & PF_WRITE != 0 && vma.flags & VM_WRITE == 0 {
        CLASS_WRITE_READONLY
    } else if f.error_code & (PF_WRITE | PF_INSTR) == 0 && vma.flags & VM_READ == 0 {
        CLASS_READ_UNREADABLE
    } else {
        CLASS_OTHER
    }
}

/// BTF offsets the kernel side reads, set by user space before load.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Offsets {
    /// signal:signal_deliver's fields.
    pub sig: u32,
    pub code: u32,
    pub sa_handler: u32,
    /// task_struct.thread.{cr2,trap_nr,error_code}.
    pub cr2: u32,
    pub trap_nr: u32,
    pub error_code: u32,
    /// task_struct.mm, mm_struct.start_stack.
    pub task_mm: u32,
    pub mm_start_stack: u32,
    /// vm_area_struct.{vm_start,vm_end,vm_flags,vm_file}.
    pub vm_start: u32,
    pub vm_end: u32,
    pub vm_flags: u32,
    pub vm_file: u32,
    /// task_struct.stack: the kernel stack, whose top holds the user registers (before 5.15,
    /// which has no bpf_task_pt_regs), and the stack's size.
    pub task_stack: u32,
    pub thread_size: u32,
}

#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Config {
    /// Non-zero: every delivery, handled ones too (`--all`).
    pub all: u32,
    pub self_pid: u32,
    /// /proc/sys/vm/mmap_min_addr: nothing is ever mapped below it.
    pub mmap_min_addr: u64,
}

/// Bytes kept of the allocator's message.
pub const MESSAGE_LEN: usize = 96;

/// glibc's message, whose address a uprobe caught at malloc_printerr for the thread about to abort.
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct Message {
    pub text: [u8; MESSAGE_LEN],
}

#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct Event {
    pub pid: u32,
    pub tid: u32,
    pub sig: u32,
    pub code: i32,
    /// Non-zero when the default action runs: the process dies.
    pub fatal: u32,
    pub class: u32,
    /// Non-zero when `address` is the page fault's (`thread.cr2` with a page-fault trap).
    pub has_address: u32,
    /// Non-zero when `vma` holds the mapping found at the address.
    pub has_vma: u32,
    pub address: u64,
    pub ip: u64,
    pub sp: u64,
    pub error_code: u64,
    pub start_stack: u64,
    pub cgroup: u64,
    pub vma: Vma,
    /// The stack walked with the unwind tables, and by frame pointers when that walk stopped
    /// at its first frame (a process whose tables were not loaded).
    pub user_stack: u64,
    pub fp_stack: u64,
    pub comm: [u8; 16],
    pub has_message: u32,
    pub _pad: u32,
    pub message: Message,
}

/// Indices of the per-CPU counters in `STATS`.
/// Events whose user stack could not be recorded.
pub const STAT_USTACK_LOST: u32 = 0;
/// Allocator messages not kept (map full).
pub const STAT_MESSAGES_FULL: u32 = 1;
pub const STAT_COUNT: u32 = 2;

user_pod!(Vma, Offsets, Config, Message, Event);

/// The maps and globals user space finds by name in the object.
pub mod names {
    crate::names!(CONFIG, OFFSETS, STATS);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(address: u64, sp: u64, error_code: u64) -> Fault {
        Fault {
            sig: SIGSEGV,
            code: SEGV_MAPERR,
            address,
            sp,
            error_code,
            start_stack: 0x7ffd_0000_0000,
            mmap_min_addr: 65536,
        }
    }

    #[test]
    fn classes() {
        assert_eq!(size_of::<Event>(), 8 * 4 + 8 * 6 + 32 + 16 + 16 + 8 + MESSAGE_LEN);
        let rw = Vma { start: 0x1000_0000, end: 0x1000_2000, flags: VM_READ | VM_WRITE, file: 0 };
        let ro = Vma { flags: VM_READ, ..rw };
        let none = Vma { flags: 0, ..rw };
        assert_eq!(classify(&fault(0x10, 0x7ffd_0000_1000, PF_WRITE), None), CLASS_NULL);
        assert_eq!(classify(&fault(0x7ffc_ffff_fff8, 0x7ffc_ffff_fff8, PF_WRITE), None), CLASS_STACK_OVERFLOW);
        assert_eq!(classify(&fault(0x5000_0000, 0x7ffd_0000_1000, 0), None), CLASS_UNMAPPED);
        assert_eq!(classify(&fault(0x1000_0100, 0x1000_0108, PF_WRITE), Some(&none)), CLASS_THREAD_STACK_OVERFLOW);
        assert_eq!(classify(&fault(0x1000_0100, 0x7ffd_0000_1000, 0), Some(&none)), CLASS_NO_ACCESS);
        assert_eq!(classify(&fault(0x1000_0100, 0x7ffd_0000_1000, PF_WRITE), Some(&ro)), CLASS_WRITE_READONLY);
        assert_eq!(classify(&fault(0x1000_0100, 0x7ffd_0000_1000, PF_INSTR), Some(&rw)), CLASS_EXEC_NOEXEC);
        let bus = Fault { sig: SIGBUS, code: BUS_ADRERR, ..fault(0x1000_0100, 0, 0) };
        assert_eq!(classify(&bus, Some(&Vma { file: 1, ..ro })), CLASS_BEYOND_FILE);
    }
}
