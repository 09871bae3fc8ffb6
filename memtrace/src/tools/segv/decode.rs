//! Names for what segv's kernel side records: signals, si_code values and classes; and,
//! where the kernel cannot look up a mapping (before 5.17), the class from /proc/PID/maps.

use memtrace_common::segv::*;

pub fn signal_name(sig: u32) -> String {
    match sig {
        SIGSEGV => "SIGSEGV".into(),
        SIGBUS => "SIGBUS".into(),
        SIGABRT => "SIGABRT".into(),
        n => format!("signal {n}"),
    }
}

/// si_code as <asm-generic/siginfo.h> names it: per signal when positive (the kernel's
/// reason), the sender's kind when zero or negative.
pub fn code_name(sig: u32, code: i32) -> String {
    let named = match (sig, code) {
        (_, 0) => "SI_USER",
        (_, 0x80) => "SI_KERNEL",
        (_, -1) => "SI_QUEUE",
        (_, -2) => "SI_TIMER",
        (_, -3) => "SI_MESGQ",
        (_, -4) => "SI_ASYNCIO",
        (_, -5) => "SI_SIGIO",
        (_, -6) => "SI_TKILL",
        (SIGSEGV, 1) => "SEGV_MAPERR",
        (SIGSEGV, 2) => "SEGV_ACCERR",
        (SIGSEGV, 3) => "SEGV_BNDERR",
        (SIGSEGV, 4) => "SEGV_PKUERR",
        (SIGSEGV, 10) => "SEGV_CPERR",
        (SIGBUS, 1) => "BUS_ADRALN",
        (SIGBUS, 2) => "BUS_ADRERR",
        (SIGBUS, 3) => "BUS_OBJERR",
        (SIGBUS, 4) => "BUS_MCEERR_AR",
        (SIGBUS, 5) => "BUS_MCEERR_AO",
        _ => return format!("{code}"),
    };
    named.into()
}

/// (JSON key, words) of a class.
pub fn class_name(class: u32) -> (&'static str, &'static str) {
    match class {
        CLASS_STACK_OVERFLOW => ("stack_overflow", "stack overflow (below the main thread's stack)"),
        CLASS_THREAD_STACK_OVERFLOW => ("stack_overflow", "stack overflow (a thread's stack guard page)"),
        CLASS_NULL => ("null_page", "NULL page"),
        CLASS_UNMAPPED => ("unmapped", "unmapped address"),
        CLASS_WRITE_READONLY => ("write_read_only", "write to a read-only mapping"),
        CLASS_EXEC_NOEXEC => ("exec_non_executable", "execute of a non-executable mapping"),
        CLASS_NO_ACCESS => ("no_access", "access to a PROT_NONE mapping"),
        CLASS_READ_UNREADABLE => ("read_unreadable", "read of an unreadable mapping"),
        CLASS_BEYOND_FILE => ("beyond_file", "beyond the end of a mapped file"),
        CLASS_NO_ADDRESS => ("no_address", "no fault address (general protection, or sent by a process)"),
        CLASS_HEAP => ("heap_corruption", "heap corruption caught by the allocator"),
        CLASS_ABORT => ("abort", "abort"),
        CLASS_OTHER => ("other", "protection fault in an accessible mapping (protection key?)"),
        CLASS_VMA_BUSY => ("unclassified", "unclassified (the process's mapping lock was busy)"),
        _ => (
            "unclassified",
            "unclassified (process gone before its mappings were read; Linux 5.17+ classifies in the kernel)",
        ),
    }
}

/// The class of a fault the kernel could not look up, from the process's maps if it is still
/// there; None when it is gone. Racy by nature: the process is dying.
pub fn classify_from_maps(pid: u32, fault: &Fault) -> Option<(u32, Option<Vma>)> {
    let maps = crate::procfs::mappings(pid).ok().filter(|m| !m.is_empty())?;
    let flag = |on: bool, flag: u64| if on { flag } else { 0 };
    let found = crate::procfs::holding(&maps, fault.address).map(|m| Vma {
        start: m.start,
        end: m.end,
        flags: flag(m.read, VM_READ) | flag(m.write, VM_WRITE) | flag(m.exec, VM_EXEC),
        file: m.is_file() as u64,
    });
    Some((classify(fault, found.as_ref()), found))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(code_name(SIGSEGV, 1), "SEGV_MAPERR");
        assert_eq!(code_name(SIGSEGV, 2), "SEGV_ACCERR");
        assert_eq!(code_name(SIGBUS, 2), "BUS_ADRERR");
        assert_eq!(code_name(SIGABRT, -6), "SI_TKILL");
        assert_eq!(code_name(SIGSEGV, 0x80), "SI_KERNEL");
        assert_eq!(code_name(SIGBUS, 77), "77");
        assert_eq!(class_name(CLASS_HEAP).0, "heap_corruption");
    }
}
