//! memtrace whose stdout is read while it runs, so that a test can wait for the events it
//! provoked before it lets the provoking program go (the tool reads /proc of live processes).

use std::{
    io::{BufRead, BufReader, Read},
    process::{Child, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

pub struct Live {
    child: Child,
    out: mpsc::Receiver<String>,
    err: mpsc::Receiver<String>,
    stdout: Vec<String>,
    stderr: Vec<String>,
}

fn lines(pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

impl Live {
    pub fn start(args: &[&str]) -> Live {
        let mut cmd = super::memtrace();
        cmd.args(args);
        Live::spawn(cmd)
    }

    /// Starts `cmd`, a memtrace run some other way (inside a namespace, say).
    pub fn spawn(mut cmd: std::process::Command) -> Live {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let out = lines(child.stdout.take().unwrap());
        let err = lines(child.stderr.take().unwrap());
        Live { child, out, err, stdout: Vec::new(), stderr: Vec::new() }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn drain(&mut self) {
        self.stdout.extend(self.out.try_iter());
        self.stderr.extend(self.err.try_iter());
    }

    /// Waits (30 s at most) until `done` holds for the stdout and stderr lines so far.
    pub fn wait_for(&mut self, what: &str, done: impl Fn(&[String], &[String]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.drain();
            if done(&self.stdout, &self.stderr) {
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

    /// Waits until memtrace says its probes are live.
    pub fn wait_ready(&mut self) {
        self.wait_for("ready line", |_, err| err.iter().any(|l| l.contains("Ctrl-C to stop")));
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

    /// Waits for exit (killing it after `limit`); returns (status, stdout, stderr).
    pub fn finish(mut self, limit: Duration) -> (ExitStatus, String, String) {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("memtrace did not exit within {limit:?}: {:?}", self.stderr);
            }
            thread::sleep(Duration::from_millis(20));
        };
        // The reader threads end at EOF: collect everything.
        self.stdout.extend(self.out.iter());
        self.stderr.extend(self.err.iter());
        (status, self.stdout.join("\n"), self.stderr.join("\n"))
    }
}
