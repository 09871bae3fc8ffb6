//! A memory cgroup (v1, /sys/fs/cgroup/memory) with a small limit, and a process started
//! inside it: how the oomkill, vmscan and drsnoop tests provoke reclaim and OOM kills
//! without harming the host. The group is removed when the value is dropped, even on panic.
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

/// A uniquely named child of the v1 memory hierarchy's root.
pub struct Memcg {
    pub dir: PathBuf,
    /// The group's path inside the hierarchy, as the kernel prints it: `/memtrace-test-...`.
    pub path: String,
}

impl Memcg {
    /// Creates the group with `memory.limit_in_bytes` = `limit_mib` MiB. Without the v1 memory
    /// controller the test fails, except in the VM suite (`MEMTRACE_NOT_RUN` names its file),
    /// where a kernel built without it (Debian's 6.12) is a reason to list, and None comes back.
    pub fn new(tag: &str, limit_mib: u64) -> Option<Memcg> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        if !Path::new(MEMORY_ROOT).join("cgroup.procs").exists() {
            let why = "no cgroup v1 memory controller (a kernel without CONFIG_MEMCG_V1)";
            let Some(file) = std::env::var_os("MEMTRACE_NOT_RUN") else {
                panic!("these tests need the cgroup v1 memory controller at {MEMORY_ROOT}");
            };
            let mut list = std::fs::read_to_string(&file).unwrap_or_default();
            list.push_str(&format!("{tag}: {why}\n"));
            std::fs::write(&file, list).unwrap();
            return None;
        }
        let name = format!("memtrace-test-{tag}-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        let dir = Path::new(MEMORY_ROOT).join(&name);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        // From here on Drop removes the group, whatever fails next.
        let group = Memcg { dir, path: format!("/{name}") };
        group.write("memory.limit_in_bytes", &(limit_mib << 20).to_string());
        Some(group)
    }

    fn write(&self, file: &str, value: &str) {
        let path = self.dir.join(file);
        std::fs::write(&path, value).unwrap_or_else(|e| panic!("cannot write {value} to {}: {e}", path.display()));
    }

    pub fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file)).unwrap_or_default()
    }

    /// The `oom_kill` counter of `memory.oom_control`.
    pub fn oom_kills(&self) -> u64 {
        self.read("memory.oom_control")
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
}

impl Drop for Hog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
