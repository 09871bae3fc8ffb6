//! What uprobes leave in a traced process, and how fast memtrace lets go of it on Ctrl-C.

use std::{
    ffi::CString,
    fs::File,
    os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::fs::FileExt as _,
    },
    process::Command,
    time::{Duration, Instant},
};

use super::{Running, memtrace};

/// `pid`'s libc code mapping: (start, end, file offset, path). A process just spawned may not
/// have it yet (the loader maps libc's code after its first page): waits up to 10 s.
fn libc_code(pid: u32) -> (u64, u64, u64, String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        if let Some(line) = maps.lines().find(|l| l.contains(" r-xp ") && l.contains("/libc.so.6")) {
            break line.to_string();
        }
        assert!(Instant::now() < deadline, "no libc code in /proc/{pid}/maps:\n{maps}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let f: Vec<&str> = line.split_whitespace().collect();
    let (start, end) = f[0].split_once('-').unwrap();
    let hex = |s: &str| u64::from_str_radix(s, 16).unwrap();
    (hex(start), hex(end), hex(f[2]), f[5..].join(" "))
}

/// The path of `pid`'s libc.
pub fn libc_path(pid: u32) -> String {
    libc_code(pid).3
}

/// Bytes of `pid`'s libc code that differ from the file: a registered uprobe is a breakpoint
/// (int3) written into the process's copy of the code, and unregistering removes it.
pub fn breakpoints_in_libc(pid: u32) -> usize {
    let (start, end, offset, path) = libc_code(pid);
    let mut in_process = vec![0u8; (end - start) as usize];
    File::open(format!("/proc/{pid}/mem")).unwrap().read_exact_at(&mut in_process, start).unwrap();
    let mut on_disk = vec![0u8; in_process.len()];
    let n = File::open(&path).unwrap().read_at(&mut on_disk, offset).unwrap();
    in_process[..n].iter().zip(&on_disk[..n]).filter(|(a, b)| a != b).count()
}

/// (file offset, size) of `name` among `lib`'s dynamic symbols.
pub fn dynamic_symbol(lib: &str, name: &str) -> (u64, u64) {
    let out = Command::new("nm").args(["-D", "-S", "--defined-only", lib]).output().expect("nm (binutils)");
    let text = String::from_utf8_lossy(&out.stdout);
    let f: Vec<&str> = text
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() == 4 && f[3].split('@').next() == Some(name))
        .unwrap_or_else(|| panic!("{name} not in {lib}'s dynamic symbols"));
    (u64::from_str_radix(f[0], 16).unwrap(), u64::from_str_radix(f[1], 16).unwrap())
}

/// Registers a uprobe at `offset` in `lib` for `pid` as bcc's memleak -p does: with
/// reference-counter offset 6. Err: the kernel refused it (EINVAL on a ref_ctr_offset clash).
pub fn bcc_style_uprobe(pid: u32, lib: &str, offset: u64) -> std::io::Result<OwnedFd> {
    let pmu: u32 =
        std::fs::read_to_string("/sys/bus/event_source/devices/uprobe/type").unwrap().trim().parse().unwrap();
    let path = CString::new(lib).unwrap();
    // struct perf_event_attr: type, size, config (ref_ctr_offset in its upper half), ...,
    // config1 (path) at byte 56, config2 (offset) at byte 64.
    let mut attr = [0u64; 16];
    attr[0] = pmu as u64 | (size_of_val(&attr) as u64) << 32;
    attr[1] = 6 << 32;
    attr[7] = path.as_ptr() as u64;
    attr[8] = offset;
    // SAFETY: attr is a zero-padded perf_event_attr whose pointers outlive the call.
    let fd = unsafe { libc::syscall(libc::SYS_perf_event_open, attr.as_ptr(), pid as i32, -1, -1, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Stops `pid` (SIGSTOP) at a moment its program counter is inside (lo, hi) of its libc file
/// (past `lo`, where a probe's breakpoint has been hit);
/// false if that did not happen in 500 tries (it is then left running).
pub fn stop_inside_libc(pid: u32, lo: u64, hi: u64) -> bool {
    let (start, end, offset, _) = libc_code(pid);
    for _ in 0..500 {
        // SAFETY: signalling a child of the test.
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        std::thread::sleep(Duration::from_millis(20));
        // "-1 SP PC" (or a syscall's arguments, then SP PC): the user PC is the last field.
        let syscall = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
        let pc =
            syscall.split_whitespace().last().and_then(|pc| u64::from_str_radix(pc.trim_start_matches("0x"), 16).ok());
        if let Some(pc) = pc.filter(|pc| (start..end).contains(pc)) {
            let at = pc - start + offset;
            if lo < at && at < hi {
                eprintln!("stopped at libc+{at:#x}, {:#x} into [{lo:#x}, {hi:#x})", at - lo);
                return true;
            }
        }
        // SAFETY: as above.
        unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// How a Ctrl-C went: milliseconds from SIGINT to the final report and to exit.
pub struct CtrlC {
    pub report_ms: f64,
    pub exit_ms: f64,
    pub stdout: String,
    pub stderr: String,
    pub success: bool,
}

/// Starts `memtrace memleak --json -p PID` with `env`, waits until it is attached and its
/// breakpoints are in the target's libc, then sends SIGINT and times what follows.
pub fn ctrl_c_memleak(pid: u32, env: &[(&str, &str)]) -> CtrlC {
    let mut cmd = memtrace();
    cmd.args(["--ready-fd", "3", "memleak", "--json", "-p", &pid.to_string()]).envs(env.iter().copied());
    let mut mt = Running::spawn(cmd);
    mt.wait_ready();
    assert!(breakpoints_in_libc(pid) > 0, "attached, yet no breakpoint in the target's libc");
    let t0 = Instant::now();
    mt.signal(libc::SIGINT);
    let (status, exited, out, stderr) = mt.finish_timed(Duration::from_secs(30));
    let report_ms = out.first().map_or(f64::INFINITY, |(t, _)| t.duration_since(t0).as_secs_f64() * 1e3);
    CtrlC {
        report_ms,
        exit_ms: exited.duration_since(t0).as_secs_f64() * 1e3,
        stdout: out.into_iter().map(|(_, l)| l + "\n").collect(),
        stderr,
        success: status.success(),
    }
}

/// Lines of tracefs' uprobe_events that memtrace or aya could have left.
pub fn our_uprobe_events() -> Vec<String> {
    let events = std::fs::read_to_string("/sys/kernel/tracing/uprobe_events").unwrap_or_default();
    events.lines().filter(|l| l.contains("aya_") || l.contains("memleak")).map(String::from).collect()
}

/// An idle process to trace: `sleep`, linked against libc, returned once libc is mapped.
pub fn idle_target() -> std::process::Child {
    let child = Command::new("sleep").arg("120").spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let maps = || std::fs::read_to_string(format!("/proc/{}/maps", child.id())).unwrap_or_default();
    while !maps().contains("/libc.so.6") {
        assert!(Instant::now() < deadline, "sleep did not map libc within 5 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}
