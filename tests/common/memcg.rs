//! A memory cgroup with a small limit, and a process started inside it: how the oomkill,
//! vmscan and drsnoop tests provoke reclaim and OOM kills without harming the host. The group
//! is removed when the value is dropped, even on panic. cgroup v1 (/sys/fs/cgroup/memory)
//! where the kernel has it, as this host does; else v2 (/sys/fs/cgroup), as Debian's 6.12.
#![allow(dead_code, reason = "each test file uses a different part of this module")]

use std::{
    ffi::CString,
    io::{BufRead, BufReader, Write},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

pub const MEMORY_ROOT: &str = "/sys/fs/cgroup/memory";
const UNIFIED_ROOT: &str = "/sys/fs/cgroup";

/// A uniquely named child of the memory hierarchy's root.
pub struct Memcg {
    pub dir: PathBuf,
    /// The group's path inside the hierarchy, as the kernel prints it: `/memtrace-test-...`.
    pub path: String,
    /// cgroup v2: memory.max and memory.events instead of v1's files.
    v2: bool,
    /// The groups made above `dir` (`nested`), removed after it, deepest first.
    above: Vec<PathBuf>,
}

impl Memcg {
    /// Creates the group with a limit of `limit_mib` MiB. Without a memory controller (v1,
    /// or v2 at /sys/fs/cgroup) the test cannot run: see `not_run`.
    pub fn new(tag: &str, limit_mib: u64) -> Option<Memcg> {
        Memcg::nested(tag, "", limit_mib)
    }

    /// As `new`, with the group at `below` ("a/b/c") inside the uniquely named one, the way a
    /// container runtime nests its groups (`docker/<id>`); every level is removed on drop.
    pub fn nested(tag: &str, below: &str, limit_mib: u64) -> Option<Memcg> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let v1 = Path::new(MEMORY_ROOT).join("cgroup.procs").exists();
        let controllers = std::fs::read_to_string(Path::new(UNIFIED_ROOT).join("cgroup.controllers"));
        let v2 = !v1 && controllers.is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"));
        if !v1 && !v2 {
            super::not_run(tag, "no memory cgroup controller (v1 at /sys/fs/cgroup/memory or v2 at /sys/fs/cgroup)");
            return None;
        }
        let root = if v1 { MEMORY_ROOT } else { UNIFIED_ROOT };
        if v2 {
            // Children get the memory controller only when the parent hands it down.
            let control = Path::new(root).join("cgroup.subtree_control");
            std::fs::write(&control, "+memory").unwrap_or_else(|e| panic!("{}: {e}", control.display()));
        }
        let name = format!("memtrace-test-{tag}-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        let mut dir = Path::new(root).join(&name);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        // From here on Drop removes the group, whatever fails next.
        let mut group = Memcg { dir: dir.clone(), path: format!("/{name}"), v2, above: Vec::new() };
        for part in below.split('/').filter(|p| !p.is_empty()) {
            if v2 {
                group.write("cgroup.subtree_control", "+memory");
            }
            group.above.push(dir.clone());
            dir = dir.join(part);
            std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
            group.dir = dir.clone();
            group.path = format!("{}/{part}", group.path);
        }
        let limit = (limit_mib << 20).to_string();
        if v2 {
            group.write("memory.max", &limit);
            // v1 groups here run without swap limits on a host without swap; v2 groups keep
            // the hog out of any swap so it is killed, not swapped out.
            if group.dir.join("memory.swap.max").exists() {
                group.write("memory.swap.max", "0");
            }
        } else {
            group.write("memory.limit_in_bytes", &limit);
        }
        Some(group)
    }

    /// Keeps a v1 group's pages out of swap too (v2 groups are made so): swappiness 0, and
    /// memory+swap limited to the memory limit where the kernel counts swap.
    pub fn no_swap(&self) {
        if self.v2 {
            return;
        }
        self.write("memory.swappiness", "0");
        if self.dir.join("memory.memsw.limit_in_bytes").exists() {
            let limit = self.read("memory.limit_in_bytes");
            self.write("memory.memsw.limit_in_bytes", limit.trim());
        }
    }

    /// The file a process writes "0" into to join the group.
    pub fn procs_file(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// Lets the group's pages go to swap (v2 groups are made without; v1 ones always may).
    pub fn allow_swap(&self) {
        if self.v2 {
            self.write("memory.swap.max", "max");
        }
    }

    fn write(&self, file: &str, value: &str) {
        let path = self.dir.join(file);
        std::fs::write(&path, value).unwrap_or_else(|e| panic!("cannot write {value} to {}: {e}", path.display()));
    }

    pub fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file)).unwrap_or_default()
    }

    /// The group's `oom_kill` counter (v1 `memory.oom_control`, v2 `memory.events`).
    pub fn oom_kills(&self) -> u64 {
        self.read(if self.v2 { "memory.events" } else { "memory.oom_control" })
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    fn procs(&self) -> Vec<i32> {
        self.read("cgroup.procs").lines().filter_map(|l| l.trim().parse().ok()).collect()
    }

    /// A command whose process joins the group between fork and exec, so that every page it
    /// (and every child it starts) ever touches is charged to the group.
    pub fn command(&self, program: &Path) -> Command {
        let procs = CString::new(self.dir.join("cgroup.procs").to_str().unwrap()).unwrap();
        let mut cmd = Command::new(program);
        // SAFETY: the closure only calls open/write/close, which are async-signal-safe, on a
        // path built before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" means the writing task itself.
                let ok = libc::write(fd, b"0\n".as_ptr().cast(), 2) == 2;
                libc::close(fd);
                if ok { Ok(()) } else { Err(std::io::Error::last_os_error()) }
            });
        }
        cmd
    }

    /// Starts `program args` inside the group (see `command`).
    pub fn spawn(&self, program: &Path, args: &[&str]) -> Hog {
        let mut cmd = self.command(program);
        cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child =
            cmd.spawn().unwrap_or_else(|e| panic!("cannot start {} in {}: {e}", program.display(), self.path));
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let pid: u32 =
            line.trim().parse().unwrap_or_else(|_| panic!("{} printed {line:?}, not its pid", program.display()));
        assert_eq!(pid, child.id());
        assert!(self.procs().contains(&(pid as i32)), "pid {pid} is not in {}", self.path);
        let stdin = child.stdin.take();
        Hog { child, stdin, pid }
    }
}

impl Drop for Memcg {
    fn drop(&mut self) {
        // Only the processes this test started can be in the group.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let procs = self.procs();
            if procs.is_empty() {
                break;
            }
            for pid in procs {
                // SAFETY: signalling a process of our own group.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            if Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // rmdir fails with EBUSY until the last task's exit is complete.
        while std::fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.dir.exists() {
            eprintln!("warning: could not remove {}", self.dir.display());
        }
        for dir in self.above.iter().rev() {
            if std::fs::remove_dir(dir).is_err() {
                eprintln!("warning: could not remove {}", dir.display());
            }
        }
    }
}

/// tests/progs/oomkill_hog running in a group, waiting for `go`.
pub struct Hog {
    pub child: Child,
    stdin: Option<ChildStdin>,
    pub pid: u32,
}

impl Hog {
    /// Lets it start allocating.
    pub fn go(&mut self) {
        let mut stdin = self.stdin.take().expect("go() called twice");
        writeln!(stdin).unwrap();
    }

    /// Waits for it to end (the OOM killer's SIGKILL, normally), at most `limit`.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "pid {} still running after {limit:?}", self.pid);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Lets it go and waits (at most `limit`) for the OOM killer to end it.
    pub fn go_until_oom_killed(&mut self, limit: Duration) {
        use std::os::unix::process::ExitStatusExt as _;
        self.go();
        let status = self.wait(limit);
        assert_eq!(status.signal(), Some(libc::SIGKILL), "pid {} was not OOM-killed: {status}", self.pid);
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Swap on /dev/zram0 for one test, taken down again on drop.
pub struct ZramSwap;

impl ZramSwap {
    pub fn on(test: &str) -> Option<ZramSwap> {
        if !Path::new("/sys/block/zram0/disksize").exists() {
            super::not_run(test, "no /dev/zram0 to swap to (modprobe zram)");
            return None;
        }
        let swaps = std::fs::read_to_string("/proc/swaps").unwrap();
        assert_eq!(swaps.lines().count(), 1, "swap is already on; this test needs its own: {swaps}");
        std::fs::write("/sys/block/zram0/disksize", "512M").expect("zram0 is free");
        let made = std::process::Command::new("mkswap").arg("/dev/zram0").stdout(Stdio::null()).status();
        assert!(made.is_ok_and(|s| s.success()), "mkswap /dev/zram0");
        let swap = ZramSwap;
        let dev = std::ffi::CString::new("/dev/zram0").unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::swapon(dev.as_ptr(), 0) }, 0, "swapon: {}", std::io::Error::last_os_error());
        Some(swap)
    }
}

impl Drop for ZramSwap {
    fn drop(&mut self) {
        let dev = std::ffi::CString::new("/dev/zram0").unwrap();
        // SAFETY: a NUL-terminated path.
        unsafe { libc::swapoff(dev.as_ptr()) };
        let _ = std::fs::write("/sys/block/zram0/reset", "1");
    }
}

/// The kernel's count of direct reclaims outside memory cgroups (the allocstall_* lines of
/// /proc/vmstat, one per zone type): one per mm_vmscan_direct_reclaim_begin.
pub fn allocstalls() -> u64 {
    let vmstat = std::fs::read_to_string("/proc/vmstat").unwrap();
    vmstat
        .lines()
        .filter(|l| l.starts_with("allocstall_"))
        .map(|l| l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap())
        .sum()
}

/// Runs tests/progs/vm_mem writing more than the machine has available, with swap on zram
/// to take it: global reclaim, kswapd and direct, without an OOM kill. Whether kswapd keeps
/// up alone is the machine's call, so each round writes 64 MiB more until the kernel counts a
/// direct reclaim (4 rounds at most). Returns the direct reclaims the kernel counted.
pub fn global_pressure(vm_mem: &Path) -> u64 {
    let before = allocstalls();
    for round in 1..=4u64 {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
        let available_kib: u64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap();
        let mib = (available_kib >> 10) + 64 * round;
        let status = Command::new(vm_mem).args(["hog", &mib.to_string(), "0"]).stdout(Stdio::null()).status().unwrap();
        assert!(status.success(), "vm_mem hog {mib}: {status}");
        if allocstalls() > before {
            break;
        }
        eprintln!("global_pressure: {mib} MiB with {available_kib} KiB available: no direct reclaim yet");
    }
    // The kernel counts a stall as it begins and a tracer as it ends: a stall of another task
    // still running now would be one and not the other. Wait for a second without a new one.
    let mut now = allocstalls();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_secs(1));
        let later = allocstalls();
        if later == now {
            break;
        }
        now = later;
    }
    let stalls = now - before;
    assert!(stalls > 0, "4 rounds of memory pressure caused no direct reclaim");
    stalls
}

/// Runs memtrace `args` while `global_pressure` runs, in the VM suite only (see
/// `machine_of_its_own`); returns (the direct reclaims the kernel counted, memtrace's stdout).
pub fn trace_global_pressure(test: &str, args: &[&str]) -> Option<(u64, String)> {
    if !super::bpf_available(test) || !super::machine_of_its_own(test) {
        return None;
    }
    let _swap = ZramSwap::on(test)?;
    let mut mt = super::Running::start(args);
    mt.wait_ready();
    let stalls = global_pressure(&super::prog("vm_mem"));
    mt.signal(libc::SIGINT);
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(30));
    assert!(status.success(), "{status}: {stderr}");
    super::assert_detached(args[0]);
    Some((stalls, stdout))
}
