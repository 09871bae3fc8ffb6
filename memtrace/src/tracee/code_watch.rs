//! Stops a command's process right after it maps new code, so a tool can load what that
//! code needs (its unwind tables) before any of it runs. A seccomp filter, inherited across
//! fork and exec, hands `mmap`/`mprotect`/`pkey_mprotect` calls that ask for PROT_EXEC to the
//! ptrace supervisor (SECCOMP_RET_TRACE) and lets every other call through untouched; the
//! supervisor then lets the call run to its exit stop. Only these rare calls stop.

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const PROT_EXEC: u32 = 0x4;
/// Offsets in `struct seccomp_data`: nr, arch, then args[] (the low half of args[2] is prot).
const NR: u32 = 0;
const ARCH: u32 = 4;
const ARG2_LOW: u32 = 16 + 2 * 8;

const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JEQ_K: u16 = 0x15;
const BPF_JSET_K: u16 = 0x45;
const BPF_RET_K: u16 = 0x06;

fn op(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// The filter's instructions; built before fork, as the child may not allocate.
pub fn filter() -> Vec<libc::sock_filter> {
    let trace = libc::SECCOMP_RET_TRACE;
    let allow = libc::SECCOMP_RET_ALLOW;
    vec![
        op(BPF_LD_W_ABS, 0, 0, ARCH),
        op(BPF_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        op(BPF_RET_K, 0, 0, allow),
        op(BPF_LD_W_ABS, 0, 0, NR),
        op(BPF_JEQ_K, 3, 0, libc::SYS_mmap as u32),
        op(BPF_JEQ_K, 2, 0, libc::SYS_mprotect as u32),
        op(BPF_JEQ_K, 1, 0, libc::SYS_pkey_mprotect as u32),
        op(BPF_RET_K, 0, 0, allow),
        op(BPF_LD_W_ABS, 0, 0, ARG2_LOW),
        op(BPF_JSET_K, 0, 1, PROT_EXEC),
        op(BPF_RET_K, 0, 0, trace),
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
