//! How a run with a command ends, and how it stops and goes on with the terminal's job control.
//!
//! memtrace cannot leave a command running without it: the seccomp filter's stops would fail
//! the command's code mappings (ENOSYS), and its probes would go. So a run stopped early (`-d`,
//! a report count, SIGINT or SIGTERM to memtrace) ends the command: SIGTERM to each of its
//! processes, then SIGKILL to those left after `GRACE`, traced meanwhile (their cleanup
//! allocates); memtrace then exits with the command's status as it ended.
//!
//! At SIGTSTP (Ctrl-Z) memtrace passes the signal on, waits for the command to stop, then
//! stops itself, so that the shell gets the terminal back; SIGCONT (`fg`) continues both.

use std::time::{Duration, Instant};

use super::Command;

/// How long a command ended early has to exit after SIGTERM before SIGKILL.
pub const GRACE: Duration = Duration::from_secs(2);

/// How long memtrace waits, after SIGTSTP, for the command to stop before it stops itself.
const SUSPEND_WAIT: Duration = Duration::from_secs(1);

/// The state of a run's command as the run ends or is suspended; `tool` names the lines said.
pub struct Ending {
    tool: &'static str,
    /// The command's exit status (`$?`), once its first process has ended.
    pub status: Option<i32>,
    /// Set once the command is being ended.
    started: bool,
    killed: bool,
    told_ptrace: bool,
    /// When memtrace got SIGTSTP, while it waits for the command to stop.
    suspending: Option<Instant>,
}

impl Ending {
    pub fn new(tool: &'static str) -> Ending {
        Ending { tool, status: None, started: false, killed: false, told_ptrace: false, suspending: None }
    }

    pub fn started(&self) -> bool {
        self.started
    }

    /// SIGTERM to the command's processes (and SIGCONT to stopped ones, which a pending SIGTERM
    /// would not reach), said in one line. False when none was left to end.
    pub fn start(&mut self, cmd: &Command) -> bool {
        self.started = true;
        let n = cmd.signal(libc::SIGTERM);
        if cmd.any_stopped() {
            cmd.signal(libc::SIGCONT);
        }
        if n > 0 {
            eprintln!("memtrace: {}: stopped early: sent SIGTERM to the command's {}", self.tool, processes(n));
        }
        n > 0
    }

    /// SIGKILL to what is left of the command, once; `why` ends the line that says so.
    pub fn kill(&mut self, cmd: Option<&Command>, why: &str) {
        let Some(cmd) = cmd.filter(|_| !self.killed) else { return };
        self.killed = true;
        let n = cmd.signal(libc::SIGKILL);
        if n > 0 {
            eprintln!("memtrace: {}: {} of the command {why}: sent SIGKILL", self.tool, processes(n));
        }
    }

    /// Says once why a process of the command could not use ptrace, and what to do instead.
    pub fn ptrace_refused(&mut self, pid: u32) {
        if !std::mem::replace(&mut self.told_ptrace, true) {
            eprintln!(
                "memtrace: {}: pid {pid} ({}) was refused ptrace (Operation not permitted): memtrace already traces every process of -c, and a process has one tracer; run the program without memtrace and attach with -p PID instead",
                self.tool,
                crate::target::comm(pid)
            );
        }
    }

    pub fn suspending(&self) -> bool {
        self.suspending.is_some()
    }

    /// memtrace got SIGTSTP: the command gets it too (from a terminal it already has it: a
    /// second one is merged or dropped by the kernel), and memtrace waits for it to stop.
    pub fn suspend(&mut self, cmd: Option<&Command>) {
        if let Some(cmd) = cmd {
            cmd.signal(libc::SIGTSTP);
            self.suspending = Some(Instant::now());
        }
    }

    /// Call while `suspending`: once the command stopped (or `SUSPEND_WAIT` passed), memtrace
    /// stops too, until SIGCONT. A command that ignores SIGTSTP keeps running, and memtrace too.
    pub fn suspend_check(&mut self, cmd: Option<&Command>) {
        let (Some(since), Some(cmd)) = (self.suspending, cmd) else { return };
        if !cmd.all_stopped() && since.elapsed() < SUSPEND_WAIT {
            return;
        }
        self.suspending = None;
        if cmd.any_stopped() {
            cmd.stop_with();
        }
    }
}

fn processes(n: usize) -> String {
    if n == 1 { "1 process".into() } else { format!("{n} processes") }
}
