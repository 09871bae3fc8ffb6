//! The process a tool traces: checking a PID, starting a command, finding its allocator
//! library, and noticing when it exits.

use std::{
    ffi::CString,
    fs,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
    sync::mpsc as std_mpsc,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use tokio::sync::{mpsc, oneshot};

/// Fails with a one-line message unless `pid` is a live process.
pub fn check_pid(pid: u32) -> Result<()> {
    if pid == 0 {
        bail!("PID must be positive");
    }
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) if !is_zombie(&stat) => Ok(()),
        Ok(_) => bail!("process {pid} has exited (zombie): nothing to trace"),
        Err(_) => bail!("no such process: {pid} (check the PID with `ps -p {pid}`)"),
    }
}

fn is_zombie(stat: &str) -> bool {
    // The state follows the parenthesised comm, which may itself hold spaces and parentheses.
    stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
}

/// The process name, as `ps` shows it.
pub fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm")).map(|c| c.trim_end().to_string()).unwrap_or_default()
}

/// Resolves a command name like a shell does: with a slash as a path, otherwise through $PATH.
pub fn find_program(name: &str) -> Result<PathBuf> {
    if name.contains('/') {
        let path = PathBuf::from(name);
        if path.is_file() {
            return Ok(path);
        }
        bail!("no such program: {name}");
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
        .with_context(|| format!("command not found in PATH: {name}"))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Checks that `path` is an ELF file, so a wrong `-O` fails before anything is attached.
pub fn check_elf(path: &Path) -> Result<()> {
    let mut magic = [0u8; 4];
    let file = fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    use std::io::Read as _;
    match (&file).read_exact(&mut magic) {
        Ok(()) if &magic == b"\x7fELF" => Ok(()),
        _ => bail!("{} is not an ELF binary or library: give -O the file that holds the allocator", path.display()),
    }
}

const LIB_DIRS: &[&str] =
    &["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib"];

/// The allocator library of a running process: its libc, or the executable itself when it
/// is statically linked.
pub fn allocator_of_pid(pid: u32) -> Result<PathBuf> {
    let maps =
        fs::read_to_string(format!("/proc/{pid}/maps")).with_context(|| format!("cannot read /proc/{pid}/maps"))?;
    let libc = maps.lines().filter_map(|l| l.split_whitespace().nth(5)).find(|p| is_libc(p));
    match libc {
        Some(path) => Ok(PathBuf::from(path)),
        None => fs::read_link(format!("/proc/{pid}/exe")).with_context(|| format!("cannot read /proc/{pid}/exe")),
    }
}

/// The allocator library an executable will use, before it runs: its libc when it is
/// dynamically linked, itself when static.
pub fn allocator_of_program(exe: &Path) -> Result<PathBuf> {
    check_elf(exe)?;
    let Some(interp) = elf_interpreter(exe)? else {
        return Ok(exe.to_path_buf());
    };
    if interp.contains("ld-musl") {
        // musl's dynamic loader is its libc.
        return Ok(PathBuf::from(interp));
    }
    LIB_DIRS
        .iter()
        .map(|d| Path::new(d).join("libc.so.6"))
        .find(|p| p.exists())
        .with_context(|| format!("cannot find the libc of {}: give it with -O", exe.display()))
}

fn is_libc(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    name.starts_with("libc.so") || name.starts_with("libc-") || name.starts_with("ld-musl")
}

/// PT_INTERP of a 64-bit little-endian ELF, or None for a static executable.
fn elf_interpreter(path: &Path) -> Result<Option<String>> {
    let data = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u64_at = |o: usize| data.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize);
    if data.get(4) != Some(&2) {
        bail!("{}: only 64-bit ELF files are supported", path.display());
    }
    let (phoff, phentsize, phnum) = (u64_at(0x20).unwrap_or(0), u16_at(0x36).unwrap_or(0), u16_at(0x38).unwrap_or(0));
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if data.get(ph..ph + 4) == Some(&3u32.to_le_bytes()) {
            let (off, size) = (u64_at(ph + 8).unwrap_or(0), u64_at(ph + 32).unwrap_or(0));
            let raw = data.get(off..off + size).context("truncated PT_INTERP")?;
            return Ok(Some(String::from_utf8_lossy(raw).trim_end_matches('\0').to_string()));
        }
    }
    Ok(None)
}

/// Resolves when process `pid` exits (pidfd: no polling, no races with PID reuse).
pub async fn exited(pid: u32) -> Result<()> {
    // SAFETY: plain syscall; the returned fd is owned below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    if fd < 0 {
        // Callers checked the PID at start: gone by the first poll means it already exited.
        if std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
            return Ok(());
        }
        bail!("no such process: {pid}");
    }
    // SAFETY: pidfd_open returned a new fd that nothing else owns.
    let fd = crate::tools::async_readable(unsafe { OwnedFd::from_raw_fd(fd as i32) })?;
    let _ready = fd.readable().await?;
    Ok(())
}

/// What a started command tells the tool.
pub enum ChildEvent {
    /// The command is about to exit; its memory map is still intact until `ack` is sent.
    Exiting { ack: oneshot::Sender<()> },
    /// The command is gone; the value is what a shell would show as `$?`.
    Exited(i32),
}

/// A command started by the tool, held before exec until probes are attached.
pub struct Child {
    pub pid: u32,
    gate: Option<OwnedFd>,
    pub events: mpsc::UnboundedReceiver<ChildEvent>,
}

impl Child {
    /// Starts `argv` stopped before exec. A dedicated thread forks it and stays its ptrace
    /// parent, so that the command stops once at exit while its maps can still be read.
    pub fn spawn(argv: &[String]) -> Result<Child> {
        let program = find_program(&argv[0])?;
        let path = CString::new(program.as_os_str().as_bytes())?;
        let args = argv.iter().map(|a| CString::new(a.as_bytes())).collect::<Result<Vec<_>, _>>()?;
        let (pid_tx, pid_rx) = std_mpsc::channel();
        let (events_tx, events) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("memtrace-child".into())
            .spawn(move || supervise(path, args, pid_tx, events_tx))?;
        let (pid, gate) = pid_rx.recv().context("the command's supervisor thread died")??;
        Ok(Child { pid, gate: Some(gate), events })
    }

    /// Lets the command exec: call once the probes are attached.
    pub fn release(&mut self) -> Result<()> {
        if let Some(gate) = self.gate.take() {
            // SAFETY: writing one byte to a pipe we own.
            if unsafe { libc::write(gate.as_raw_fd(), b"g".as_ptr().cast(), 1) } != 1 {
                bail!("could not start the command: {}", std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

fn supervise(
    path: CString,
    args: Vec<CString>,
    pid_tx: std_mpsc::Sender<Result<(u32, OwnedFd)>>,
    events: mpsc::UnboundedSender<ChildEvent>,
) {
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        let _ = pid_tx.send(Err(std::io::Error::last_os_error().into()));
        return;
    }
    // SAFETY: the child only makes async-signal-safe calls (ptrace, read, execv, _exit).
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        unsafe {
            libc::close(fds[1]);
            libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
            let mut byte = 0u8;
            // Wait until the probes are attached; EOF means memtrace gave up.
            if libc::read(fds[0], (&raw mut byte).cast(), 1) == 1 {
                libc::execv(path.as_ptr(), argv.as_ptr());
            }
            libc::_exit(127);
        }
    }
    // SAFETY: both fds come from pipe2 above and are owned here.
    let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read_end);
    if pid < 0 {
        let _ = pid_tx.send(Err(std::io::Error::last_os_error().into()));
        return;
    }
    let _ = pid_tx.send(Ok((pid as u32, write_end)));
    let mut started = false;
    loop {
        let mut status = 0;
        // SAFETY: waiting for our own child.
        if unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
            let _ = events.send(ChildEvent::Exited(127));
            return;
        }
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 128 + libc::WTERMSIG(status) };
            let _ = events.send(ChildEvent::Exited(code));
            return;
        }
        let sig = libc::WSTOPSIG(status);
        let mut inject = 0;
        if !started && sig == libc::SIGTRAP {
            // The stop after a successful exec: ask for a stop at exit from now on.
            started = true;
            let opts = libc::PTRACE_O_TRACEEXIT | libc::PTRACE_O_EXITKILL;
            unsafe { libc::ptrace(libc::PTRACE_SETOPTIONS, pid, 0, opts) };
        } else if status >> 8 == (libc::SIGTRAP | (libc::PTRACE_EVENT_EXIT << 8)) {
            let (ack, done) = oneshot::channel();
            if events.send(ChildEvent::Exiting { ack }).is_ok() {
                // Bounded: a stuck tool must not hold the command forever.
                let _ = recv_timeout(done, Duration::from_secs(5));
            }
        } else {
            inject = sig;
        }
        // SAFETY: resuming our stopped tracee, passing on the signal it stopped for.
        unsafe { libc::ptrace(libc::PTRACE_CONT, pid, 0, inject) };
    }
}

fn recv_timeout(mut rx: oneshot::Receiver<()>, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        match rx.try_recv() {
            Ok(()) | Err(oneshot::error::TryRecvError::Closed) => return true,
            Err(oneshot::error::TryRecvError::Empty) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zombie_state_is_read_after_the_comm() {
        assert!(is_zombie("42 (a) b) Z 1 2"));
        assert!(!is_zombie("42 (sleep) S 1 2"));
    }

    #[test]
    fn libc_names() {
        assert!(is_libc("/usr/lib/x86_64-linux-gnu/libc.so.6"));
        assert!(is_libc("/lib/ld-musl-x86_64.so.1"));
        assert!(!is_libc("/usr/lib/libcrypto.so.3"));
    }

    #[test]
    fn finds_the_interpreter_of_a_dynamic_program() {
        let interp = elf_interpreter(Path::new("/bin/sh")).unwrap().unwrap();
        assert!(interp.contains("ld-linux"), "{interp}");
        assert!(allocator_of_program(Path::new("/bin/sh")).unwrap().ends_with("libc.so.6"));
    }
}
