//! Whether this machine has the perf events a watchpoint or a cache-miss tool would need:
//! hardware breakpoints (the CPU's debug registers, through PERF_TYPE_BREAKPOINT) with an eBPF
//! program attached to one, and hardware cache counters (PERF_TYPE_HARDWARE, a PMU). `probe`
//! reports them because the answer varies by machine: a virtual machine may have debug
//! registers and no PMU (the project's host), or neither. `memleak --watch` arms breakpoints
//! with `watch_writes`.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
};

use aya_obj::generated::{
    HW_BREAKPOINT_LEN_8, HW_BREAKPOINT_W, PERF_EVENT_IOC_ENABLE, PERF_EVENT_IOC_SET_BPF,
    bpf_prog_type::BPF_PROG_TYPE_PERF_EVENT, perf_event_attr, perf_hw_id::PERF_COUNT_HW_CACHE_MISSES, perf_type_id,
};

/// Writes made to the watched variable: each should count once.
const WRITES: u64 = 5;

/// What the breakpoint check found: whether a write watch counted every write, and whether an
/// eBPF program attached to it. Each Err says why not.
pub struct Breakpoints {
    pub watch: Result<String, String>,
    pub bpf: Result<String, String>,
}

/// Watches 8 bytes of memtrace's own stack for writes, on this thread, writes them
/// `WRITES` times and reads the count back; then attaches a do-nothing perf_event program.
pub fn breakpoints() -> Breakpoints {
    let mut watched = 0u64;
    let mut attr = attr(perf_type_id::PERF_TYPE_BREAKPOINT, 0);
    attr.bp_type = HW_BREAKPOINT_W;
    attr.__bindgen_anon_3.bp_addr = (&raw mut watched) as u64;
    attr.__bindgen_anon_4.bp_len = u64::from(HW_BREAKPOINT_LEN_8);
    let what = "perf_event_open(PERF_TYPE_BREAKPOINT, HW_BREAKPOINT_W, 8 bytes)";
    let event = match open(&attr, 0) {
        Ok(fd) => fd,
        Err(e) => {
            let why = format!("{what}: {}", explain(&e, "this kernel or machine has no hardware breakpoints"));
            return Breakpoints { watch: Err(why), bpf: Err("no hardware breakpoint to attach to".into()) };
        }
    };
    for i in 1..=WRITES {
        // SAFETY: a live local, written through a pointer so that each write happens.
        unsafe { std::ptr::write_volatile(&raw mut watched, i) };
    }
    let counted = count(&event);
    let watch = match counted {
        Ok(n) if n == WRITES => Ok(format!("{what} on a variable of memtrace counted {n} of {WRITES} writes")),
        Ok(n) => Err(format!("{what} opened, but counted {n} of {WRITES} writes to the variable")),
        Err(e) => Err(format!("{what} opened, but its count cannot be read: {e}")),
    };
    let bpf = match attach_bpf(&event) {
        Ok(()) => Ok("a perf_event eBPF program attached to that breakpoint (PERF_EVENT_IOC_SET_BPF)".into()),
        Err((step, e)) => Err(format!("{step}: {}", explain(&e, "this kernel cannot run eBPF on breakpoints"))),
    };
    Breakpoints { watch, bpf }
}

/// Ok when a hardware cache-miss counter opens for this thread; else why not.
pub fn cache_events() -> Result<String, String> {
    let attr = attr(perf_type_id::PERF_TYPE_HARDWARE, PERF_COUNT_HW_CACHE_MISSES as u64);
    let what = "perf_event_open(PERF_TYPE_HARDWARE, PERF_COUNT_HW_CACHE_MISSES)";
    match open(&attr, 0) {
        Ok(_) => Ok(format!("{what} works")),
        Err(e) => Err(format!("{what}: {}", explain(&e, "no hardware counters (no PMU, as in many virtual machines)"))),
    }
}

/// Loads a breakpoint's eBPF program. Before Linux 6.1 the verifier lets a perf_event program
/// use only preallocated hash maps, which memleak's map of live blocks is not (it grows with
/// use): that refusal is named in one line.
pub fn load_breakpoint_program(prog: &mut aya::programs::PerfEvent, what: &str) -> anyhow::Result<()> {
    use anyhow::Context as _;
    match prog.load() {
        Err(e) if e.to_string().contains("can only use preallocated hash map") => anyhow::bail!(
            "{what} needs Linux 6.1 or later: before it, the kernel lets a breakpoint's eBPF program use only \
             preallocated maps, and memleak's map of live blocks is not one"
        ),
        other => other.with_context(|| format!("loading {what}'s watchpoint program")),
    }
}

/// Arms a write watchpoint on `len` bytes (1, 2, 4 or 8, aligned to `len`) at `addr` in
/// thread `tid`, running `prog` (a perf_event program) at each write. Inherited: the threads
/// `tid` creates from now on carry it too (and are rid of it when the fd closes). Closing the
/// fd disarms it.
pub fn watch_writes(tid: u32, addr: u64, len: u64, prog: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let mut attr = attr(perf_type_id::PERF_TYPE_BREAKPOINT, 0);
    attr.bp_type = HW_BREAKPOINT_W;
    attr.__bindgen_anon_3.bp_addr = addr;
    attr.__bindgen_anon_4.bp_len = len;
    attr.set_inherit(1);
    attr.set_disabled(1);
    let event = open(&attr, tid)?;
    // SAFETY: the ioctls take the program's fd, and nothing, by value.
    unsafe {
        if libc::ioctl(event.as_raw_fd(), PERF_EVENT_IOC_SET_BPF as _, prog.as_raw_fd()) != 0
            || libc::ioctl(event.as_raw_fd(), PERF_EVENT_IOC_ENABLE as _, 0) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(event)
}

/// A counting event of `type_`/`config` for user space: sample period 1, so an attached
/// program would run on each event.
fn attr(type_: perf_type_id, config: u64) -> perf_event_attr {
    // SAFETY: perf_event_attr is plain data; all zero is "no options".
    let mut attr: perf_event_attr = unsafe { std::mem::zeroed() };
    attr.type_ = type_ as u32;
    attr.size = size_of::<perf_event_attr>() as u32;
    attr.config = config;
    attr.__bindgen_anon_1.sample_period = 1;
    attr.set_exclude_kernel(1);
    attr.set_exclude_hv(1);
    attr
}

/// perf_event_open for thread `tid` (0: the calling one), on any CPU.
fn open(attr: &perf_event_attr, tid: u32) -> io::Result<OwnedFd> {
    const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
    // SAFETY: attr is a complete perf_event_attr of the size it states.
    let fd = unsafe {
        libc::syscall(libc::SYS_perf_event_open, attr as *const _, tid as libc::pid_t, -1, -1, PERF_FLAG_FD_CLOEXEC)
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The event's count (read_format 0: one u64).
fn count(event: &OwnedFd) -> io::Result<u64> {
    let mut n = 0u64;
    // SAFETY: reads at most 8 bytes into a live u64.
    if unsafe { libc::read(event.as_raw_fd(), (&raw mut n).cast(), 8) } != 8 {
        return Err(io::Error::last_os_error());
    }
    Ok(n)
}

/// `r0 = 0; exit`, the smallest program the verifier accepts.
static INSNS: [u64; 2] = [0xb7, 0x95];

/// Loads a do-nothing perf_event program and attaches it to `event`; Err names the step.
fn attach_bpf(event: &OwnedFd) -> Result<(), (&'static str, io::Error)> {
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        rest: [u32; 28],
    }
    let attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_PERF_EVENT as u32,
        insn_cnt: INSNS.len() as u32,
        insns: INSNS.as_ptr() as u64,
        license: c"GPL".as_ptr() as u64,
        rest: [0; 28],
    };
    const BPF_PROG_LOAD: i64 = 5;
    // SAFETY: attr is a bpf_attr prefix, zeroed past the fields set; its pointers outlive the call.
    let prog = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_LOAD, &attr as *const ProgLoad, size_of::<ProgLoad>()) };
    if prog < 0 {
        return Err(("loading a perf_event eBPF program", io::Error::last_os_error()));
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    let prog = unsafe { OwnedFd::from_raw_fd(prog as i32) };
    // SAFETY: the ioctl takes the program's fd by value.
    if unsafe { libc::ioctl(event.as_raw_fd(), PERF_EVENT_IOC_SET_BPF as _, prog.as_raw_fd()) } != 0 {
        return Err(("attaching an eBPF program to the breakpoint", io::Error::last_os_error()));
    }
    // Closing the event detaches the program; closing the program then frees it.
    Ok(())
}

/// The errno by name, and what it means here; `absent`: what ENOENT, ENODEV and EOPNOTSUPP
/// mean for this event.
fn explain(e: &io::Error, absent: &str) -> String {
    let name = match e.raw_os_error() {
        Some(libc::ENOENT) => "ENOENT",
        Some(libc::ENODEV) => "ENODEV",
        Some(libc::EOPNOTSUPP) => "EOPNOTSUPP",
        Some(libc::ENOSPC) => return "ENOSPC: every debug register is taken (a debugger, another watch)".into(),
        Some(libc::EACCES) | Some(libc::EPERM) => {
            return format!("{e}: perf_event_paranoid, lockdown or a security module forbids it");
        }
        Some(libc::EINVAL) => return format!("EINVAL: {absent}, or this kernel refuses the request"),
        _ => return e.to_string(),
    };
    format!("{name}: {absent}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_errno_and_its_meaning() {
        let absent = "no hardware counters";
        assert_eq!(explain(&io::Error::from_raw_os_error(libc::ENOENT), absent), "ENOENT: no hardware counters");
        assert_eq!(
            explain(&io::Error::from_raw_os_error(libc::EOPNOTSUPP), absent),
            "EOPNOTSUPP: no hardware counters"
        );
        assert!(
            explain(&io::Error::from_raw_os_error(libc::ENOSPC), absent).starts_with("ENOSPC: every debug register")
        );
    }
}
