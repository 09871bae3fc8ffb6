//! A command memtrace runs itself (`-c`), followed through every exec and fork.
//!
//! A dedicated thread forks the command and stays its ptrace parent, so that each process of
//! the command's tree stops at the moments a tracer must act before the process goes on: right
//! after an exec (the new image is mapped, nothing of it has run), at a fork (parent and child
//! both stopped, the child not yet started), and at exit (its memory map still readable).

use std::{
    collections::HashSet,
    ffi::CString,
    os::unix::ffi::OsStrExt,
    sync::mpsc as std_mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tokio::sync::{mpsc, oneshot};

use crate::target;

mod code_watch;

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
    /// Every process of the command has exited.
    Done,
}

/// The command's first process and the stream of what its tree does.
pub struct Command {
    pub pid: u32,
    pub events: mpsc::UnboundedReceiver<CommandEvent>,
}

impl Command {
    /// Starts `argv` (a program, a script or anything the kernel can exec) stopped before its
    /// exec; the first `Exec` event comes once the exec has happened.
    pub fn spawn(argv: &[String]) -> Result<Command> {
        let program = target::find_program(&argv[0])?;
        let path = CString::new(program.as_os_str().as_bytes())?;
        let args = argv.iter().map(|a| CString::new(a.as_bytes())).collect::<Result<Vec<_>, _>>()?;
        let (pid_tx, pid_rx) = std_mpsc::channel();
        let (events_tx, events) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("memtrace-command".into())
            .spawn(move || supervise(path, args, pid_tx, events_tx))?;
        let pid = pid_rx.recv().context("the command's supervisor thread died")??;
        Ok(Command { pid, events })
    }
}

const OPTIONS: libc::c_int = libc::PTRACE_O_TRACEFORK
    | libc::PTRACE_O_TRACEVFORK
    | libc::PTRACE_O_TRACECLONE
    | libc::PTRACE_O_TRACEEXEC
    | libc::PTRACE_O_TRACEEXIT
    | libc::PTRACE_O_TRACESECCOMP
    | libc::PTRACE_O_TRACESYSGOOD
    // The command must not outlive a memtrace that dies: its probes would be gone.
    | libc::PTRACE_O_EXITKILL;

fn supervise(
    path: CString,
    args: Vec<CString>,
    pid_tx: std_mpsc::Sender<Result<u32>>,
    events: mpsc::UnboundedSender<CommandEvent>,
) {
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut filter = code_watch::filter();
    // SAFETY: the child only makes async-signal-safe calls (ptrace, raise, seccomp, execv, _exit).
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        unsafe {
            libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
            // Stop so the tracer can ask for exec, fork and exit stops before anything runs.
            libc::raise(libc::SIGSTOP);
            code_watch::install(&mut filter);
            libc::execv(path.as_ptr(), argv.as_ptr());
            libc::_exit(127);
        }
    }
    if pid < 0 {
        let _ = pid_tx.send(Err(std::io::Error::last_os_error().into()));
        return;
    }
    let mut status = 0;
    // SAFETY: waiting for our own child, then setting options on it while it is stopped.
    let ok = unsafe {
        libc::waitpid(pid, &mut status, libc::__WALL) == pid
            && libc::WIFSTOPPED(status)
            && libc::ptrace(libc::PTRACE_SETOPTIONS, pid, 0, OPTIONS) == 0
            && libc::ptrace(libc::PTRACE_CONT, pid, 0, 0) == 0
    };
    if !ok {
        let _ = pid_tx.send(Err(anyhow::anyhow!("could not start the command under ptrace")));
        return;
    }
    let _ = pid_tx.send(Ok(pid as u32));
    Tree::new(pid as u32, events).run();
}

/// The ptrace side of the command's process tree.
struct Tree {
    events: mpsc::UnboundedSender<CommandEvent>,
    /// Thread-group leaders of the command's live processes.
    processes: HashSet<u32>,
    /// Tasks announced by a fork/clone event: their first stop is the attach stop.
    released: HashSet<u32>,
    /// New tasks whose attach stop came before their parent's event.
    waiting: HashSet<u32>,
    /// Tasks seen stopping at least once.
    seen: HashSet<u32>,
    /// Tasks let on from a code-mapping seccomp stop to that call's exit stop.
    mapping: HashSet<u32>,
}

impl Tree {
    fn new(root: u32, events: mpsc::UnboundedSender<CommandEvent>) -> Tree {
        Tree {
            events,
            processes: HashSet::from([root]),
            released: HashSet::new(),
            waiting: HashSet::new(),
            seen: HashSet::from([root]),
            mapping: HashSet::new(),
        }
    }

    fn run(mut self) {
        loop {
            let mut status = 0;
            // SAFETY: waiting for any of our tracees.
            let tid = unsafe { libc::waitpid(-1, &mut status, libc::__WALL) };
            if tid < 0 {
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                let _ = self.events.send(CommandEvent::Done);
                return;
            }
            let tid = tid as u32;
            if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
                if self.processes.remove(&tid) {
                    let code =
                        if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 128 + libc::WTERMSIG(status) };
                    let _ = self.events.send(CommandEvent::Exited { pid: tid, code });
                }
                continue;
            }
            if libc::WIFSTOPPED(status) {
                self.stopped(tid, status);
            }
        }
    }

    fn stopped(&mut self, tid: u32, status: i32) {
        let sig = libc::WSTOPSIG(status);
        let event = status >> 16;
        if sig == libc::SIGTRAP && event != 0 {
            match event {
                libc::PTRACE_EVENT_FORK | libc::PTRACE_EVENT_VFORK | libc::PTRACE_EVENT_CLONE => {
                    let child = event_msg(tid);
                    if child != 0 {
                        if event != libc::PTRACE_EVENT_CLONE || is_process(child) {
                            self.processes.insert(child);
                            let parent = tgid(tid);
                            let shared = event == libc::PTRACE_EVENT_VFORK;
                            self.ask(|ack| CommandEvent::Fork { parent, child, shared, ack });
                        }
                        self.released.insert(child);
                        if self.waiting.remove(&child) {
                            resume(child, 0);
                        }
                    }
                }
                libc::PTRACE_EVENT_EXEC => {
                    // After an exec by any thread, the process continues as its leader; the
                    // message is the exec'ing thread's tid before the exec.
                    let pid = tgid(tid);
                    let former = event_msg(tid);
                    let from_thread = former != 0 && former != pid;
                    self.processes.insert(pid);
                    self.ask(|ack| CommandEvent::Exec { pid, from_thread, ack });
                }
                libc::PTRACE_EVENT_EXIT if self.processes.contains(&tid) => {
                    self.ask(|ack| CommandEvent::Exiting { pid: tid, ack });
                }
                libc::PTRACE_EVENT_SECCOMP => {
                    // Entering a call that maps code: stop again once it has done so.
                    self.mapping.insert(tid);
                    // SAFETY: resuming a stopped tracee of this thread up to its syscall exit.
                    unsafe { libc::ptrace(libc::PTRACE_SYSCALL, tid as libc::pid_t, 0, 0) };
                    return;
                }
                _ => {}
            }
            resume(tid, 0);
            return;
        }
        if sig == libc::SIGTRAP | 0x80 {
            // A syscall stop (TRACESYSGOOD): only the exits asked for above come here.
            if self.mapping.remove(&tid) {
                let pid = tgid(tid);
                self.ask(|ack| CommandEvent::Mapped { pid, ack });
            }
            resume(tid, 0);
            return;
        }
        if sig == libc::SIGSTOP && self.seen.insert(tid) {
            // A new task's attach stop: it runs once the tool has acted on its fork.
            if self.released.contains(&tid) {
                resume(tid, 0);
            } else {
                self.waiting.insert(tid);
            }
            return;
        }
        // A signal on its way to the command: pass it on.
        resume(tid, sig);
    }

    /// Sends an event and waits for the tool to act (bounded: a stuck tool must not hold the
    /// command forever; a tool that dies takes the command with it).
    fn ask(&self, event: impl FnOnce(oneshot::Sender<()>) -> CommandEvent) {
        let (ack, done) = oneshot::channel();
        if self.events.send(event(ack)).is_ok() {
            wait_ack(done, Duration::from_secs(60));
        }
    }
}

fn resume(tid: u32, sig: i32) {
    // SAFETY: resuming a stopped tracee of this thread.
    unsafe { libc::ptrace(libc::PTRACE_CONT, tid as libc::pid_t, 0, sig) };
}

fn event_msg(tid: u32) -> u32 {
    let mut msg: libc::c_ulong = 0;
    // SAFETY: PTRACE_GETEVENTMSG writes one c_ulong.
    unsafe { libc::ptrace(libc::PTRACE_GETEVENTMSG, tid as libc::pid_t, 0, &mut msg) };
    msg as u32
}

/// The process (thread group) a task belongs to.
fn tgid(tid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Tgid:").and_then(|v| v.trim().parse().ok())))
        .unwrap_or(tid)
}

fn is_process(tid: u32) -> bool {
    tgid(tid) == tid
}

fn wait_ack(mut rx: oneshot::Receiver<()>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match rx.try_recv() {
            Ok(()) | Err(oneshot::error::TryRecvError::Closed) => return,
            Err(oneshot::error::TryRecvError::Empty) => std::thread::sleep(Duration::from_micros(200)),
        }
    }
}
