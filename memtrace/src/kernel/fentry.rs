//! Whether this kernel lets memtrace load and attach a fentry program (BPF trampolines). No
//! tool needs one yet; `probe` reports it because the answer varies: BTF, the architecture's
//! trampoline support and kernel lockdown or a security module all decide it (on the project's
//! 6.18 host, loading one fails with EPERM although root).

use std::io;

use super::btf::Btf;

/// Attached to for the check: the kernel's own fentry test target, called only by
/// BPF_PROG_TEST_RUN, so the program never runs.
const TARGET: &str = "bpf_fentry_test1";

const BPF_PROG_LOAD: i64 = 5;
const BPF_RAW_TRACEPOINT_OPEN: i64 = 17;
const BPF_PROG_TYPE_TRACING: u32 = 26;
const BPF_TRACE_FENTRY: u32 = 24;

/// Ok when a fentry program loaded and attached; else "no" or "unknown" and why.
pub fn check() -> Result<(), (&'static str, String)> {
    let btf = Btf::vmlinux().map_err(|e| ("no", format!("fentry needs kernel BTF: {e:#}")))?;
    let id =
        btf.func_id(TARGET).ok_or(("unknown", format!("kernel BTF has no {TARGET} to try a fentry program on")))?;
    let prog = load(id).map_err(|e| ("no", format!("loading a fentry program on {TARGET}: {}", explain(&e))))?;
    let link = attach(&prog).map_err(|e| ("no", format!("attaching a fentry program to {TARGET}: {}", explain(&e))))?;
    drop((link, prog));
    Ok(())
}

/// The errno by name, and what it means for fentry.
fn explain(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) => {
            format!("EPERM although root: kernel lockdown{} or a security module forbids it", lockdown())
        }
        // ENOTSUPP, kernel-internal: no BPF trampoline on this architecture or configuration.
        Some(524) => "ENOTSUPP: this kernel has no BPF trampolines".to_string(),
        Some(libc::EINVAL) => "EINVAL: this kernel rejects fentry programs (they need 5.5+)".to_string(),
        _ => e.to_string(),
    }
}

/// " (mode integrity)" when securityfs shows the lockdown mode, else nothing (it is often
/// unmounted).
fn lockdown() -> String {
    let state = std::fs::read_to_string("/sys/kernel/security/lockdown").unwrap_or_default();
    lockdown_mode(&state).map(|mode| format!(" (mode {mode})")).unwrap_or_default()
}

/// The bracketed entry of securityfs' "none [integrity] confidentiality".
fn lockdown_mode(state: &str) -> Option<&str> {
    Some(state.split_once('[')?.1.split_once(']')?.0)
}

/// `r0 = 0; exit`, the smallest program the verifier accepts.
static INSNS: [u64; 2] = [0xb7, 0x95];

fn load(btf_id: u32) -> io::Result<std::os::fd::OwnedFd> {
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        rest: [u32; 28],
    }
    const EXPECTED_ATTACH_TYPE: usize = (68 - 24) / 4;
    const ATTACH_BTF_ID: usize = (108 - 24) / 4;
    let mut rest = [0u32; 28];
    rest[EXPECTED_ATTACH_TYPE] = BPF_TRACE_FENTRY;
    rest[ATTACH_BTF_ID] = btf_id;
    let attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_TRACING,
        insn_cnt: INSNS.len() as u32,
        insns: INSNS.as_ptr() as u64,
        license: c"GPL".as_ptr() as u64,
        rest,
    };
    bpf(BPF_PROG_LOAD, &attr)
}

fn attach(prog: &std::os::fd::OwnedFd) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::AsRawFd as _;
    // name 0: a tracing program attaches where its attach_btf_id says.
    #[repr(C)]
    struct RawTracepointOpen {
        name: u64,
        prog_fd: u32,
        pad: u32,
    }
    bpf(BPF_RAW_TRACEPOINT_OPEN, &RawTracepointOpen { name: 0, prog_fd: prog.as_raw_fd() as u32, pad: 0 })
}

fn bpf<T>(cmd: i64, attr: &T) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: attr is a plain #[repr(C)] bpf_attr prefix, zeroed past the fields set; the
    // pointers in it outlive the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, size_of::<T>()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_lockdown_mode() {
        assert_eq!(lockdown_mode("none [integrity] confidentiality\n"), Some("integrity"));
        assert_eq!(lockdown_mode("[none] integrity confidentiality\n"), Some("none"));
        assert_eq!(lockdown_mode(""), None);
    }

    #[test]
    fn names_the_errno_and_its_meaning() {
        let eperm = explain(&io::Error::from_raw_os_error(libc::EPERM));
        assert!(eperm.starts_with("EPERM although root: kernel lockdown"), "{eperm}");
        assert!(eperm.ends_with(" or a security module forbids it"), "{eperm}");
        assert_eq!(explain(&io::Error::from_raw_os_error(524)), "ENOTSUPP: this kernel has no BPF trampolines");
    }
}
