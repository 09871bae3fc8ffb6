//! Stops a command's process right after it maps new code, so a tool can load what that
//! code needs (its unwind tables) before any of it runs. A seccomp filter, inherited across
//! fork and exec, hands `mmap`/`mprotect`/`pkey_mprotect` calls that ask for PROT_EXEC to the
//! ptrace supervisor (SECCOMP_RET_TRACE) and lets every other call through untouched; the
//! supervisor then lets the call run to its exit stop. Only these rare calls stop.
//!
//! The filter also hands over the `ptrace` calls that ask to trace (TRACEME, ATTACH, SEIZE):
//! memtrace is already the tracer of every process it runs, so these fail, and the supervisor
//! says why. The filter cannot be removed: with no tracer attached, SECCOMP_RET_TRACE makes
//! these calls fail with ENOSYS, which is why memtrace never detaches from a command.

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const PROT_EXEC: u32 = 0x4;
/// Offsets in `struct seccomp_data`: nr, arch, then args[] (the low half of each).
const NR: u32 = 0;
const ARCH: u32 = 4;
const ARG0_LOW: u32 = 16;
const ARG2_LOW: u32 = 16 + 2 * 8;

/// What a trace stop is for, in SECCOMP_RET_DATA (PTRACE_GETEVENTMSG at the stop).
pub const MAPS_CODE: u32 = 0;
pub const ASKS_TO_TRACE: u32 = 1;

const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JEQ_K: u16 = 0x15;
const BPF_JSET_K: u16 = 0x45;
const BPF_RET_K: u16 = 0x06;

fn op(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// The filter's instructions; built before fork, as the child may not allocate.
pub fn filter() -> Vec<libc::sock_filter> {
    let allow = libc::SECCOMP_RET_ALLOW;
    let trace = |why: u32| libc::SECCOMP_RET_TRACE | why;
    // c_uint in glibc's libc crate, c_int in musl's: the filter compares the low 32 bits.
    let asks = [libc::PTRACE_TRACEME, libc::PTRACE_ATTACH, libc::PTRACE_SEIZE].map(|r| i64::from(r) as u32);
    vec![
        op(BPF_LD_W_ABS, 0, 0, ARCH),
        op(BPF_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        op(BPF_RET_K, 0, 0, allow),
        op(BPF_LD_W_ABS, 0, 0, NR),
        // A jump skips that many instructions: to the code check below, or to the ptrace one.
        op(BPF_JEQ_K, 3, 0, libc::SYS_mmap as u32),
        op(BPF_JEQ_K, 2, 0, libc::SYS_mprotect as u32),
        op(BPF_JEQ_K, 1, 0, libc::SYS_pkey_mprotect as u32),
        op(BPF_JEQ_K, 4, 3, libc::SYS_ptrace as u32),
        // mmap, mprotect, pkey_mprotect: stop if PROT_EXEC.
        op(BPF_LD_W_ABS, 0, 0, ARG2_LOW),
        op(BPF_JSET_K, 0, 1, PROT_EXEC),
        op(BPF_RET_K, 0, 0, trace(MAPS_CODE)),
        op(BPF_RET_K, 0, 0, allow),
        // ptrace: stop if it asks to trace.
        op(BPF_LD_W_ABS, 0, 0, ARG0_LOW),
        op(BPF_JEQ_K, 2, 0, asks[0]),
        op(BPF_JEQ_K, 1, 0, asks[1]),
        op(BPF_JEQ_K, 0, 1, asks[2]),
        op(BPF_RET_K, 0, 0, trace(ASKS_TO_TRACE)),
        op(BPF_RET_K, 0, 0, allow),
    ]
}

/// Installs `filter` in the calling (child) process: one syscall, async-signal-safe. Without
/// CAP_SYS_ADMIN the kernel refuses it, and the command runs without these stops (new code
/// then gets its tables a few ms late, which reports count as a blind spot).
///
/// # Safety
/// Call in the forked child before exec, with the filter built before the fork.
pub unsafe fn install(filter: &mut [libc::sock_filter]) {
    let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_mut_ptr() };
    // SAFETY: the program points at a live array of `len` instructions.
    unsafe { libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &prog) };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the filter on one call, as the kernel would (only the instructions it uses).
    fn verdict(arch: u32, nr: i64, args: [u64; 3]) -> u32 {
        let prog = filter();
        let word = |off: u32| match off {
            NR => nr as u32,
            ARCH => arch,
            o => args[((o - 16) / 8) as usize] as u32,
        };
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let i = prog[pc];
            pc += 1;
            match i.code {
                BPF_LD_W_ABS => acc = word(i.k),
                BPF_JEQ_K => pc += usize::from(if acc == i.k { i.jt } else { i.jf }),
                BPF_JSET_K => pc += usize::from(if acc & i.k != 0 { i.jt } else { i.jf }),
                BPF_RET_K => return i.k,
                c => panic!("unexpected instruction {c:#x}"),
            }
        }
    }

    #[test]
    fn stops_code_mappings_and_requests_to_trace_only() {
        let x86 = AUDIT_ARCH_X86_64;
        let (allow, trace) = (libc::SECCOMP_RET_ALLOW, libc::SECCOMP_RET_TRACE);
        let exec = u64::from(PROT_EXEC) | 1;
        for nr in [libc::SYS_mmap, libc::SYS_mprotect, libc::SYS_pkey_mprotect] {
            assert_eq!(verdict(x86, nr, [0, 4096, exec]), trace | MAPS_CODE, "{nr}");
            assert_eq!(verdict(x86, nr, [0, 4096, 3]), allow, "{nr}");
        }
        for request in [libc::PTRACE_TRACEME, libc::PTRACE_ATTACH, libc::PTRACE_SEIZE] {
            assert_eq!(verdict(x86, libc::SYS_ptrace, [request as u64, 1, 0]), trace | ASKS_TO_TRACE);
        }
        assert_eq!(verdict(x86, libc::SYS_ptrace, [libc::PTRACE_PEEKDATA as u64, 1, 0]), allow);
        assert_eq!(verdict(x86, libc::SYS_write, [1, 0, exec]), allow);
        assert_eq!(verdict(0x4000_0003, libc::SYS_mmap, [0, 4096, exec]), allow, "another arch");
    }
}
