//! Containers made with `unshare` for the tests: a gated test program (see `Gated`) in its
//! own mount or pid namespace, under a shell that keeps the namespace alive after it exits.

use std::{
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

pub struct Contained {
    unshare: Child,
    stdin: Option<ChildStdin>,
    stdout: std::io::Lines<BufReader<ChildStdout>>,
    /// The program's pid as the host sees it.
    pub global: u32,
    /// Its pid in its own pid namespace (the same as `global` without --pid).
    pub inside: u32,
    /// The shell: memtrace enters its namespaces.
    keeper: u32,
}

fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// A process's pid in each pid namespace from the host's down to its own (the NSpid line).
pub fn nspids(global: u32) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{global}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("NSpid:")).expect("NSpid in status");
    line.split_whitespace().skip(1).map(|p| p.parse().unwrap()).collect()
}

impl Contained {
    /// Runs `setup` (shell commands) then `program args` in a shell under `unshare flags`,
    /// and waits for the program's "ready".
    pub fn start(flags: &[&str], setup: &str, program: &Path, args: &[&str]) -> Contained {
        let mut argv = vec![program.to_str().unwrap()];
        argv.extend(args);
        Contained::start_as(flags, setup, &argv, program)
    }

    /// As `start`, for a command `argv` that runs `program` (a wrapper such as another unshare).
    pub fn start_as(flags: &[&str], setup: &str, argv: &[&str], program: &Path) -> Contained {
        // The shell outlives the program so that a pid namespace (whose init it is) stays up
        // while a tracer inside it reports the program's exit.
        let script = format!("{setup}\n\"$0\" \"$@\"\nsleep 120");
        let mut unshare = Command::new("unshare")
            .args(flags)
            .args(["sh", "-c", &script])
            .args(argv)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("unshare (util-linux) must be installed");
        let mut stdout = BufReader::new(unshare.stdout.take().unwrap()).lines();
        let first = stdout.next().map(|l| l.unwrap());
        assert_eq!(first.as_deref(), Some("ready"), "{program:?} under unshare {flags:?} did not start");
        // unshare execs the shell, or forks it with --fork; memtrace enters the shell's
        // namespaces (a wrapper between it and the program may have made others).
        let comm = |p: u32| std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
        let keeper = if comm(unshare.id()).trim_end() == "sh" { unshare.id() } else { children(unshare.id())[0] };
        let name = program.file_name().unwrap().to_str().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let global = loop {
            let mut found = None;
            let mut todo = vec![keeper];
            while let Some(p) = todo.pop() {
                for c in children(p) {
                    if comm(c).trim_end() == &name[..name.len().min(15)] {
                        found = Some(c);
                    }
                    todo.push(c);
                }
            }
            if let Some(found) = found {
                break found;
            }
            assert!(Instant::now() < deadline, "{name} not found under unshare");
            std::thread::sleep(Duration::from_millis(20));
        };
        Contained {
            stdin: unshare.stdin.take(),
            unshare,
            stdout,
            global,
            inside: *nspids(global).last().unwrap(),
            keeper,
        }
    }

    /// A command that runs memtrace with `args` inside the program's pid and mount namespaces.
    /// `memtrace --ready-fd 3 ARGS...` inside the namespaces, for `Running::spawn`.
    pub fn memtrace_inside(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.keeper.to_string(), "--pid", "--mount", "--"]);
        cmd.arg(env!("CARGO_BIN_EXE_memtrace")).args(["--ready-fd", "3"]).args(args);
        cmd
    }

    /// Makes the program act; returns the line it printed.
    pub fn act(&mut self) -> String {
        writeln!(self.stdin.as_mut().unwrap()).unwrap();
        self.stdout.next().unwrap().unwrap()
    }

    /// Lets the program exit and waits until it is gone (the shell stays).
    pub fn end(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{}/task", self.global)).exists()
            && !std::fs::read_to_string(format!("/proc/{}/stat", self.global))
                .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z')))
        {
            assert!(Instant::now() < deadline, "the program did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Contained {
    fn drop(&mut self) {
        // SAFETY: signalling processes this test started.
        unsafe {
            libc::kill(self.global as i32, libc::SIGKILL);
            libc::kill(self.keeper as i32, libc::SIGKILL);
        }
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}
