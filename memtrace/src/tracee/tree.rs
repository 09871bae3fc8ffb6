//! The ptrace side of the command's process tree: the supervisor thread, which starts the
//! command and is the tracer of each of its tasks.

use std::{
    collections::{HashMap, HashSet},
    ffi::CString,
    sync::{Arc, Mutex, MutexGuard, mpsc as std_mpsc},
    time::Duration,
};

use anyhow::{Result, anyhow, bail};
use tokio::sync::{mpsc, oneshot};

use super::{CommandEvent, RunAs, Tasks, code_watch};

const OPTIONS: libc::c_int = libc::PTRACE_O_TRACEFORK
    | libc::PTRACE_O_TRACEVFORK
    | libc::PTRACE_O_TRACECLONE
    | libc::PTRACE_O_TRACEEXEC
    | libc::PTRACE_O_TRACEEXIT
    | libc::PTRACE_O_TRACESECCOMP
    | libc::PTRACE_O_TRACESYSGOOD
    // The command must not outlive a memtrace that dies: its probes would be gone, and its
    // seccomp filter would fail every call that maps code (ENOSYS without a tracer).
    | libc::PTRACE_O_EXITKILL;

/// Forks the command, seizes it, lets it exec (as `user` if given), then follows its tree until
/// every process has exited. `started` gets the command's pid once it is held at its exec stop,
/// or why it could not run.
pub(super) fn supervise(
    path: CString,
    args: Vec<CString>,
    env: Vec<CString>,
    user: Option<RunAs>,
    started: std_mpsc::Sender<Result<u32>>,
    events: mpsc::UnboundedSender<CommandEvent>,
    tasks: Arc<Mutex<Tasks>>,
) {
    match start(&path, &args, &env, user.as_ref()) {
        Ok((pid, exec_stop)) => {
            let _ = started.send(Ok(pid));
            let mut tree = Tree::new(pid, events, tasks);
            tree.stopped(pid, exec_stop);
            tree.run();
        }
        Err(e) => {
            let _ = started.send(Err(e));
        }
    }
}

fn pipe() -> Result<[libc::c_int; 2]> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(fds)
}

/// What the child writes to the `failed` pipe before it gives up: the step that failed and
/// its errno.
const FAILED_EXEC: libc::c_int = 0;
const FAILED_USER: libc::c_int = 1;

/// Starts the command with environment `env` ("NAME=value" each), as `user` if given, and
/// returns its pid and wait status once it stops right after its exec.
fn start(path: &CString, args: &[CString], env: &[CString], user: Option<&RunAs>) -> Result<(u32, i32)> {
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|a| a.as_ptr()).collect();
    envp.push(std::ptr::null());
    let mut filter = code_watch::filter();
    let groups: Vec<libc::gid_t> = user.map(|u| u.groups.clone()).unwrap_or_default();
    // `go`: the child waits until it is seized. `failed`: the step and errno that stopped it,
    // if exec or the change of user fails (close-on-exec: a successful exec closes it empty).
    let (go, failed) = (pipe()?, pipe()?);
    // SAFETY: the child only makes async-signal-safe calls (read, signal, seccomp, raw
    // set*id syscalls, execve, write, _exit) on memory prepared before the fork.
    let pid = unsafe { libc::fork() };
    let fork_error = std::io::Error::last_os_error();
    if pid == 0 {
        unsafe {
            let give_up = |step: libc::c_int| -> ! {
                let why = [step, *libc::__errno_location()];
                libc::write(failed[1], why.as_ptr().cast(), size_of_val(&why));
                libc::_exit(127)
            };
            let mut byte = 0u8;
            if libc::read(go[0], (&raw mut byte).cast(), 1) != 1 {
                libc::_exit(127);
            }
            // Rust ignores SIGPIPE in memtrace; the command gets the default, as from a shell.
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            // Still root: a filter without no_new_privs needs CAP_SYS_ADMIN, and no_new_privs
            // would keep setuid programs of the command from working as they do alone.
            code_watch::install(&mut filter);
            if let Some(user) = user {
                // Raw syscalls: they change this thread only, the only one the child has, and
                // take no lock glibc's wrappers might hold from another thread at the fork.
                // Groups first, then gid, then uid: each needs the privilege the next drops.
                if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0
                    || libc::syscall(libc::SYS_setresgid, user.gid, user.gid, user.gid) != 0
                    || libc::syscall(libc::SYS_setresuid, user.uid, user.uid, user.uid) != 0
                {
                    give_up(FAILED_USER);
                }
            }
            libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
            give_up(FAILED_EXEC);
        }
    }
    // SAFETY: closing the child's ends in the parent.
    unsafe {
        libc::close(go[0]);
        libc::close(failed[1]);
    }
    let result = if pid < 0 { Err(fork_error.into()) } else { seize_and_exec(pid, go[1], failed[0]) };
    // SAFETY: closing our own ends, once.
    unsafe {
        libc::close(go[1]);
        libc::close(failed[0]);
    }
    result.map(|status| (pid as u32, status))
}

fn seize_and_exec(pid: libc::pid_t, go: libc::c_int, failed: libc::c_int) -> Result<i32> {
    // SAFETY: seizing our own child, which waits on `go` meanwhile.
    if unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, 0, OPTIONS) } != 0 {
        let e = std::io::Error::last_os_error();
        // SAFETY: ending and reaping our own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        bail!("cannot trace it: PTRACE_SEIZE failed: {e}");
    }
    let byte = 1u8;
    // SAFETY: one byte from a live local.
    unsafe { libc::write(go, (&raw const byte).cast(), 1) };
    loop {
        let mut status = 0;
        // SAFETY: waiting for our own child.
        if unsafe { libc::waitpid(pid, &mut status, libc::__WALL) } != pid {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            bail!("waiting for the command: {e}");
        }
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            let mut why: [libc::c_int; 2] = [0; 2];
            // SAFETY: reading at most two c_ints into a live local.
            let n = unsafe { libc::read(failed, why.as_mut_ptr().cast(), size_of_val(&why)) };
            if n != size_of_val(&why) as isize {
                return Err(anyhow!("it ended before its exec"));
            }
            let error = std::io::Error::from_raw_os_error(why[1]);
            return Err(match why[0] {
                FAILED_USER => anyhow!("cannot switch to that user: {error}"),
                _ => error.into(),
            });
        }
        let (sig, event) = (libc::WSTOPSIG(status), status >> 16);
        match event {
            libc::PTRACE_EVENT_EXEC => return Ok(status),
            // A signal before the exec is the program's: it gets it once it runs.
            0 if sig != libc::SIGTRAP | 0x80 => resume(pid as u32, sig),
            _ => resume(pid as u32, 0),
        }
    }
}

/// The tracer of the command's tasks.
struct Tree {
    events: mpsc::UnboundedSender<CommandEvent>,
    tasks: Arc<Mutex<Tasks>>,
    /// Tasks announced by a fork/clone event: their first stop is the attach stop.
    released: HashSet<u32>,
    /// New tasks whose attach stop came before their parent's event, with that stop's signal.
    waiting: HashMap<u32, i32>,
    /// Tasks seen stopping at least once.
    seen: HashSet<u32>,
    /// Tasks let on from a seccomp stop to that call's exit stop, and why.
    in_call: HashMap<u32, u32>,
}

impl Tree {
    fn new(root: u32, events: mpsc::UnboundedSender<CommandEvent>, tasks: Arc<Mutex<Tasks>>) -> Tree {
        {
            let mut t = lock(&tasks);
            t.processes.insert(root);
            t.live.insert(root);
        }
        Tree {
            events,
            tasks,
            released: HashSet::new(),
            waiting: HashMap::new(),
            seen: HashSet::from([root]),
            in_call: HashMap::new(),
        }
    }

    fn tasks(&self) -> MutexGuard<'_, Tasks> {
        lock(&self.tasks)
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
                if self.tasks().gone(tid) {
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
        match status >> 16 {
            libc::PTRACE_EVENT_STOP => {
                if self.seen.insert(tid) {
                    // A new task's attach stop: it runs once the tool has acted on its fork.
                    self.tasks().live.insert(tid);
                    if !self.released.contains(&tid) {
                        self.waiting.insert(tid, sig);
                        return;
                    }
                }
                self.event_stop(tid, sig);
            }
            0 if sig == libc::SIGTRAP | 0x80 => {
                // A syscall stop (TRACESYSGOOD): only the exits asked for at a seccomp stop.
                match self.in_call.remove(&tid) {
                    Some(code_watch::MAPS_CODE) => {
                        let pid = tgid(tid);
                        self.ask(|ack| CommandEvent::Mapped { pid, ack });
                    }
                    Some(code_watch::ASKS_TO_TRACE) if self.refused_ptrace(tid) => {
                        let _ = self.events.send(CommandEvent::PtraceRefused { pid: tgid(tid) });
                    }
                    _ => {}
                }
                resume(tid, 0);
            }
            // A signal on its way to the command: deliver it (a stop signal then starts a
            // group-stop, reported as PTRACE_EVENT_STOP).
            0 => {
                if sig == libc::SIGTRAP {
                    say_trap(tid);
                }
                resume(tid, sig)
            }
            event => self.event(tid, event),
        }
    }

    /// A PTRACE_EVENT_STOP: a group-stop (a stop signal), kept until SIGCONT as without a
    /// tracer; or the end of one, or a new task's first stop: both go on.
    fn event_stop(&mut self, tid: u32, sig: i32) {
        if matches!(sig, libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU) {
            self.tasks().stopped.insert(tid);
            // SAFETY: holding a stopped tracee of this thread in its group-stop.
            unsafe { libc::ptrace(libc::PTRACE_LISTEN, tid as libc::pid_t, 0, 0) };
        } else {
            self.tasks().stopped.remove(&tid);
            resume(tid, 0);
        }
    }

    fn event(&mut self, tid: u32, event: i32) {
        match event {
            libc::PTRACE_EVENT_FORK | libc::PTRACE_EVENT_VFORK | libc::PTRACE_EVENT_CLONE => {
                let child = event_msg(tid);
                if child != 0 {
                    self.tasks().live.insert(child);
                    if event != libc::PTRACE_EVENT_CLONE || is_process(child) {
                        self.tasks().processes.insert(child);
                        let parent = tgid(tid);
                        let shared = event == libc::PTRACE_EVENT_VFORK;
                        self.ask(|ack| CommandEvent::Fork { parent, child, shared, ack });
                    }
                    self.released.insert(child);
                    if let Some(sig) = self.waiting.remove(&child) {
                        self.event_stop(child, sig);
                    }
                }
            }
            libc::PTRACE_EVENT_EXEC => {
                // The exec'ing thread now has the process's pid; the message is its old tid.
                let pid = tgid(tid);
                let former = event_msg(tid);
                let from_thread = former != 0 && former != pid;
                {
                    let mut t = self.tasks();
                    if from_thread {
                        // Gone without a death report: its tid ended with the exec.
                        t.gone(former);
                    }
                    t.processes.insert(pid);
                    t.live.insert(pid);
                }
                self.ask(|ack| CommandEvent::Exec { pid, from_thread, ack });
            }
            libc::PTRACE_EVENT_EXIT if self.tasks().processes.contains(&tid) => {
                self.ask(|ack| CommandEvent::Exiting { pid: tid, ack });
            }
            libc::PTRACE_EVENT_SECCOMP => {
                // Let the call run to its exit stop: code mapped, or ptrace answered.
                self.in_call.insert(tid, event_msg(tid));
                // SAFETY: resuming a stopped tracee of this thread up to its syscall exit.
                unsafe { libc::ptrace(libc::PTRACE_SYSCALL, tid as libc::pid_t, 0, 0) };
                return;
            }
            _ => {}
        }
        resume(tid, 0);
    }

    /// At the exit of a ptrace call asking to trace: whether it failed because memtrace is the
    /// tracer (PTRACE_TRACEME of a traced task, or ATTACH/SEIZE of one of the command's).
    fn refused_ptrace(&self, tid: u32) -> bool {
        // SAFETY: user_regs_struct is plain data; PTRACE_GETREGS fills it.
        let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
        // SAFETY: reading the registers of a stopped tracee of this thread.
        if unsafe { libc::ptrace(libc::PTRACE_GETREGS, tid as libc::pid_t, 0, &mut regs) } != 0 {
            return false;
        }
        if regs.rax as i64 != -i64::from(libc::EPERM) {
            return false;
        }
        // rdi and rsi still hold the request and the pid at the call's exit.
        i64::from(regs.rdi as u32) == i64::from(libc::PTRACE_TRACEME) || self.tasks().live.contains(&(regs.rsi as u32))
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

fn lock(tasks: &Mutex<Tasks>) -> MutexGuard<'_, Tasks> {
    tasks.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn resume(tid: u32, sig: i32) {
    // SAFETY: resuming a stopped tracee of this thread.
    unsafe { libc::ptrace(libc::PTRACE_CONT, tid as libc::pid_t, 0, sig) };
}

/// A SIGTRAP the kernel sends a traced command can come from memtrace's own probes and
/// watchpoints: say where and why, before it is delivered (it ends most programs).
fn say_trap(tid: u32) {
    // SAFETY: siginfo_t is plain data; PTRACE_GETSIGINFO fills it for a stopped tracee.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: reading the pending signal of a stopped tracee of this thread.
    if unsafe { libc::ptrace(libc::PTRACE_GETSIGINFO, tid as libc::pid_t, 0, &mut info) } != 0 {
        return;
    }
    let cause = match info.si_code {
        1 => "a breakpoint instruction (TRAP_BRKPT)",
        2 => "single-stepping (TRAP_TRACE)",
        4 => "a hardware breakpoint (TRAP_HWBKPT)",
        0x80 => "the kernel (SI_KERNEL: an int3 where no probe is registered)",
        0 => "a process (SI_USER)",
        _ => "another cause",
    };
    // SAFETY: si_addr is meaningful for the kernel's traps and 0 otherwise.
    let addr = unsafe { info.si_addr() } as u64;
    eprintln!(
        "memtrace: thread {tid} of the command gets SIGTRAP from {cause} (si_code {}, address {addr:#x})",
        info.si_code
    );
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

/// Waits for `rx` up to `timeout` of memtrace's own running time: time spent stopped
/// (Ctrl-Z) does not count, or an ack due when memtrace stopped would be given up on at `fg`.
fn wait_ack(mut rx: oneshot::Receiver<()>, timeout: Duration) {
    const STEP: Duration = Duration::from_micros(200);
    for _ in 0..timeout.as_micros() / STEP.as_micros() {
        match rx.try_recv() {
            Ok(()) | Err(oneshot::error::TryRecvError::Closed) => return,
            Err(oneshot::error::TryRecvError::Empty) => std::thread::sleep(STEP),
        }
    }
}
