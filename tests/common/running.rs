//! The one way tests run memtrace in the background: its stdout and stderr are read while it
//! runs (lines are timed as they arrive), and readiness comes from `--ready-fd 3`, never from
//! the human text on stderr.

use std::{
    io::{BufRead, BufReader, Read},
    os::fd::{FromRawFd as _, OwnedFd},
    process::{Child, ChildStdout, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

/// The descriptor memtrace is told to announce readiness on.
pub const READY_FD: i32 = 3;

pub struct Running {
    pub child: Child,
    out: Option<mpsc::Receiver<(Instant, String)>>,
    err: mpsc::Receiver<String>,
    ready: mpsc::Receiver<String>,
    stdout: Vec<(Instant, String)>,
    pub stderr: Vec<String>,
}

/// A test that fails while memtrace runs must not leave it attached for the next test.
impl Drop for Running {
    fn drop(&mut self) {
        if self.child.try_wait().is_ok_and(|s| s.is_none()) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sends each line of `pipe`, with the time it arrived, until end-of-file.
fn lines(pipe: impl Read + Send + 'static) -> mpsc::Receiver<(Instant, String)> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            let _ = tx.send((Instant::now(), line));
        }
    });
    rx
}

fn untimed(rx: mpsc::Receiver<(Instant, String)>) -> mpsc::Receiver<String> {
    let (tx, out) = mpsc::channel();
    thread::spawn(move || {
        for (_, line) in rx {
            let _ = tx.send(line);
        }
    });
    out
}

/// Arms `cmd` so that the program it runs has the write end of a new pipe as descriptor 3;
/// returns (read end, write end); drop the write end once the child is spawned. Both ends are close-on-exec, so no other child started meanwhile
/// keeps the pipe open, and a read end that happens to be descriptor 3 is simply replaced.
pub fn ready_pipe(cmd: &mut Command) -> (OwnedFd, OwnedFd) {
    use std::os::unix::process::CommandExt as _;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors, owned from here on.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: just created, owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let w = fds[1];
    // SAFETY: dup2 and fcntl are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself would leave close-on-exec set: clear it by hand then.
            let r = if w == READY_FD { libc::fcntl(w, libc::F_SETFD, 0) } else { libc::dup2(w, READY_FD) };
            if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
        });
    }
    (read, write)
}

impl Running {
    /// `memtrace --ready-fd 3 ARGS...`.
    pub fn start(args: &[&str]) -> Running {
        let mut cmd = super::memtrace();
        cmd.args(["--ready-fd", "3"]).args(args);
        Running::spawn(cmd)
    }

    /// Like `start`, but stdout is handed to the caller unread (to close it early, say).
    pub fn start_unread(args: &[&str]) -> (Running, ChildStdout) {
        let mut cmd = super::memtrace();
        cmd.args(["--ready-fd", "3"]).args(args);
        let mut mt = Running::launch(cmd, false);
        let stdout = mt.child.stdout.take().unwrap();
        (mt, stdout)
    }

    /// Starts `cmd`, a memtrace run some other way (inside a namespace, say); it must pass
    /// `--ready-fd 3` to memtrace for `wait_ready`.
    pub fn spawn(cmd: Command) -> Running {
        Running::launch(cmd, true)
    }

    fn launch(mut cmd: Command, read_stdout: bool) -> Running {
        let (read, write) = ready_pipe(&mut cmd);
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        // End-of-file must come when memtrace closes its copy.
        drop(write);
        let out = read_stdout.then(|| lines(child.stdout.take().unwrap()));
        let err = untimed(lines(child.stderr.take().unwrap()));
        let ready = untimed(lines(std::fs::File::from(read)));
        Running { child, out, err, ready, stdout: Vec::new(), stderr: Vec::new() }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn drain(&mut self) {
        if let Some(out) = &self.out {
            self.stdout.extend(out.try_iter());
        }
        self.stderr.extend(self.err.try_iter());
    }

    /// Everything on stderr so far, for a failure's message.
    pub fn stderr_so_far(&mut self) -> String {
        self.drain();
        self.stderr.join("\n")
    }

    /// Waits (30 s at most) until `done` holds for the stdout and stderr lines so far.
    pub fn wait_for(&mut self, what: &str, done: impl Fn(&[String], &[String]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.drain();
            let out: Vec<String> = self.stdout.iter().map(|(_, l)| l.clone()).collect();
            if done(&out, &self.stderr) {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                self.drain();
                panic!("memtrace exited ({status}) before {what}: {:?} {:?}", self.stdout, self.stderr);
            }
            assert!(Instant::now() < deadline, "no {what} within 30 s: {:?} {:?}", self.stdout, self.stderr);
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until memtrace says on descriptor 3 that its probes are in; returns what it said.
    pub fn wait_ready(&mut self) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.ready.recv_timeout(Duration::from_millis(20)) {
                Ok(line) => {
                    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
                    assert_eq!(v["ready"], true, "{line}");
                    return v;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().unwrap();
                    self.drain();
                    panic!("memtrace closed its ready descriptor unready ({status}): {:?}", self.stderr);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                self.drain();
                panic!("memtrace exited before it was ready ({status}): {:?}", self.stderr);
            }
            self.drain();
            assert!(Instant::now() < deadline, "memtrace was not ready within 30 s: {:?}", self.stderr);
        }
    }

    /// Waits until stdout holds `n` lines starting with `prefix`.
    pub fn wait_lines(&mut self, prefix: &str, n: usize) {
        self.wait_for(&format!("{n} lines starting with {prefix:?}"), |out, _| {
            out.iter().filter(|l| l.starts_with(prefix)).count() >= n
        });
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Waits for exit (killing it after `limit`); returns (status, when it was seen to exit,
    /// stdout lines with the times they arrived, all of stderr).
    pub fn finish_timed(mut self, limit: Duration) -> (ExitStatus, Instant, Vec<(Instant, String)>, String) {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("memtrace did not exit within {limit:?}: {:?}", self.stderr);
            }
            thread::sleep(Duration::from_millis(1));
        };
        let exited = Instant::now();
        // The reader threads end at end-of-file: collect everything.
        if let Some(out) = self.out.take() {
            self.stdout.extend(out.iter());
        }
        self.stderr.extend(self.err.iter());
        (status, exited, std::mem::take(&mut self.stdout), self.stderr.join("\n"))
    }

    /// Waits for exit (killing it after `limit`); returns (status, stdout, stderr).
    pub fn finish(self, limit: Duration) -> (ExitStatus, String, String) {
        let (status, _, stdout, stderr) = self.finish_timed(limit);
        let stdout = stdout.into_iter().map(|(_, l)| l + "\n").collect();
        (status, stdout, stderr)
    }
}
