//! A command memtrace runs itself (`-c`), followed through every exec and fork.
//!
//! A dedicated thread forks the command and seizes it (PTRACE_SEIZE), so that each process of
//! the command's tree stops at the moments a tracer must act before the process goes on: right
//! after an exec (the new image is mapped, nothing of it has run), at a fork (parent and child
//! both stopped, the child not yet started), and at exit (its memory map still readable).
//!
//! Job control works as without memtrace: a seized process that gets a stop signal enters a
//! group-stop the supervisor keeps (PTRACE_LISTEN) until SIGCONT. When memtrace itself gets
//! SIGTSTP (Ctrl-Z), the tool passes it on, waits for the command to stop, then stops itself
//! (`Command::stop_with`), so that the shell gets the terminal back.

mod code_watch;
mod ending;
mod tree;
mod user;

use std::{
    collections::HashSet,
    ffi::CString,
    os::unix::ffi::OsStrExt,
    sync::{Arc, Mutex, mpsc as std_mpsc},
};

use anyhow::{Context as _, Result};
use tokio::sync::{mpsc, oneshot};

use crate::target;
pub use ending::{Ending, GRACE};
pub use user::RunAs;

/// What the command's processes tell the tool. Each event with an `ack` holds its process
/// (and, for a fork, the child) stopped until the ack is sent or dropped.
pub enum CommandEvent {
    /// `pid` has just exec'd: its new executable and loader are mapped, nothing has run.
    /// `from_thread`: a thread other than the process's first made the exec and took over its
    /// pid; the first thread, which probes filtered by pid were tied to, is gone.
    Exec { pid: u32, from_thread: bool, ack: oneshot::Sender<()> },
    /// `parent` forked the process `child` (not a thread): neither runs until the ack.
    /// `shared`: the child shares its parent's memory until it execs (vfork, posix_spawn).
    Fork { parent: u32, child: u32, shared: bool, ack: oneshot::Sender<()> },
    /// `pid` has just mapped new code (a library, by the loader or `dlopen`); none of it
    /// has run.
    Mapped { pid: u32, ack: oneshot::Sender<()> },
    /// `pid` is about to exit; its memory map is intact until the ack.
    Exiting { pid: u32, ack: oneshot::Sender<()> },
    /// `pid` is gone; `code` is what a shell would show as `$?`.
    Exited { pid: u32, code: i32 },
    /// `pid` asked to trace a process of the command, or to be traced (a debugger, strace),
    /// and was refused: a process has one tracer, and memtrace is it.
    PtraceRefused { pid: u32 },
    /// Every process of the command has exited.
    Done,
}

/// The command's first process and the stream of what its tree does.
pub struct Command {
    pub pid: u32,
    pub events: mpsc::UnboundedReceiver<CommandEvent>,
    tasks: Arc<Mutex<Tasks>>,
}

/// The command's live tasks, kept by the supervisor and read by the tool for job control and
/// for ending the command.
#[derive(Default)]
struct Tasks {
    /// Thread-group leaders of the live processes.
    processes: HashSet<u32>,
    /// Every live task (thread).
    live: HashSet<u32>,
    /// Tasks held in a group-stop (a stop signal, until SIGCONT).
    stopped: HashSet<u32>,
}

impl Tasks {
    fn gone(&mut self, tid: u32) -> bool {
        self.live.remove(&tid);
        self.stopped.remove(&tid);
        self.processes.remove(&tid)
    }
}

impl Command {
    /// Starts `argv` (a program, a script or anything the kernel can exec) and returns once it
    /// has exec'd, held before its first instruction; the first `Exec` event lets it go. A
    /// program the kernel refuses to run is an error here, before anything is attached.
    /// `env`: variables set (or replaced) in the environment memtrace passes on. `user`: the
    /// command runs as that user (its groups, and its HOME, USER and LOGNAME), not as root.
    pub fn spawn(argv: &[String], env: &[(String, String)], user: Option<&RunAs>) -> Result<Command> {
        let program = target::find_program(&argv[0])?;
        let path = CString::new(program.as_os_str().as_bytes())?;
        let args = argv.iter().map(|a| CString::new(a.as_bytes())).collect::<Result<Vec<_>, _>>()?;
        let mut env = env.to_vec();
        env.extend(user.map(RunAs::env).unwrap_or_default());
        let env = environment(&env)?;
        let who = user.cloned();
        let (pid_tx, pid_rx) = std_mpsc::channel();
        let (events_tx, events) = mpsc::unbounded_channel();
        let tasks = Arc::new(Mutex::new(Tasks::default()));
        let shared = tasks.clone();
        std::thread::Builder::new()
            .name("memtrace-command".into())
            .spawn(move || tree::supervise(path, args, env, who, pid_tx, events_tx, shared))?;
        let as_user = user.map(|u| format!(" as {}", u.describe())).unwrap_or_default();
        let pid = pid_rx
            .recv()
            .context("the command's supervisor thread died")?
            .with_context(|| format!("cannot run {}{as_user}", program.display()))?;
        Ok(Command { pid, events, tasks })
    }

    fn tasks(&self) -> std::sync::MutexGuard<'_, Tasks> {
        self.tasks.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sends `sig` to each live process of the command; returns how many were sent it.
    pub fn signal(&self, sig: i32) -> usize {
        let pids: Vec<u32> = self.tasks().processes.iter().copied().collect();
        // SAFETY: kill has no memory preconditions; each pid is a live tracee of ours.
        pids.iter().filter(|&&pid| unsafe { libc::kill(pid as i32, sig) } == 0).count()
    }

    /// Whether some task of the command is held in a group-stop.
    pub fn any_stopped(&self) -> bool {
        !self.tasks().stopped.is_empty()
    }

    /// Whether every live task of the command is held in a group-stop.
    pub fn all_stopped(&self) -> bool {
        let t = self.tasks();
        !t.live.is_empty() && t.live.iter().all(|tid| t.stopped.contains(tid))
    }

    /// Stops memtrace (with its command stopped), as a shell's job stops at Ctrl-Z; returns
    /// once memtrace is continued, having continued the command too. The command may get
    /// SIGCONT twice (from the shell's `fg` and from here): only once matters to the kernel.
    pub fn stop_with(&self) {
        stop_self();
        self.signal(libc::SIGCONT);
    }
}

/// memtrace's environment with `set` put in (replacing variables of the same names).
fn environment(set: &[(String, String)]) -> Result<Vec<CString>> {
    let mut env: Vec<Vec<u8>> = std::env::vars_os()
        .filter(|(name, _)| !set.iter().any(|(n, _)| n.as_bytes() == name.as_bytes()))
        .map(|(name, value)| [name.as_bytes(), b"=", value.as_bytes()].concat())
        .collect();
    env.extend(set.iter().map(|(n, v)| format!("{n}={v}").into_bytes()));
    Ok(env.into_iter().map(CString::new).collect::<Result<Vec<_>, _>>()?)
}

/// Stops memtrace until SIGCONT: by SIGTSTP with its default action, as a terminal's Ctrl-Z
/// does (shells then say "Stopped"), unless the kernel would discard that signal (a process
/// group with no parent outside it in the session, "orphaned"): SIGSTOP then.
fn stop_self() {
    // SAFETY: plain queries and signals on memtrace's own process; the sigaction structs are
    // zeroed plain data, and the old action is put back once memtrace is continued.
    unsafe {
        let parent = libc::getppid();
        let orphaned = libc::getpgid(parent) == libc::getpgrp() || libc::getsid(parent) != libc::getsid(0);
        if orphaned {
            libc::kill(libc::getpid(), libc::SIGSTOP);
            return;
        }
        let mut default: libc::sigaction = std::mem::zeroed();
        default.sa_sigaction = libc::SIG_DFL;
        let mut caught: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGTSTP, &default, &mut caught);
        // To this thread: it acts on it before the call returns, before the handler is back.
        libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::gettid(), libc::SIGTSTP);
        libc::sigaction(libc::SIGTSTP, &caught, std::ptr::null_mut());
    }
}
