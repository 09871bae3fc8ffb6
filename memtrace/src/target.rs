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

use crate::procfs;

/// Fails with a one-line message unless `pid` is a live process.
pub fn check_pid(pid: u32) -> Result<()> {
    if pid == 0 {
        bail!("PID must be positive");
    }
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) if !is_zombie(&stat) => crate::kernel::pidns::check_traceable(pid),
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

/// Allocator libraries that replace libc's malloc when linked or preloaded.
const ALLOCATORS: &[&str] = &["libjemalloc", "libtcmalloc", "libmimalloc", "libhoard", "libsnmalloc"];

fn is_allocator(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    ALLOCATORS.iter().any(|a| name.starts_with(a))
}

/// Where a process's allocator functions live: `primary` holds malloc and free (a replacement
/// allocator when one is loaded, else libc, else the static executable); `libc` is where
/// functions the primary lacks (mmap, pvalloc, ...) are found, when it differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocator {
    pub primary: PathBuf,
    pub libc: Option<PathBuf>,
}

/// The allocator of a running process, from its memory map. The paths returned open the
/// files the process mapped, also when it lives in another mount namespace (a container).
pub fn allocator_of_pid(pid: u32) -> Result<Allocator> {
    let maps = procfs::mapped_files(pid)?;
    let libc = maps.iter().find(|m| is_libc(&m.path));
    let primary = match (maps.iter().find(|m| is_allocator(&m.path)), libc) {
        (Some(alloc), _) => reach(pid, alloc)?,
        (None, Some(libc)) => reach(pid, libc)?,
        (None, None) => procfs::exe(pid)?,
    };
    let libc = libc.map(|l| reach(pid, l)).transpose()?;
    Ok(Allocator { libc: libc.filter(|l| *l != primary), primary })
}

fn reach(pid: u32, m: &procfs::MappedFile) -> Result<PathBuf> {
    procfs::reach(pid, m).with_context(|| {
        format!(
            "cannot open the {} that process {pid} maps (deleted or replaced, and /proc/{pid}/map_files is unreadable): give the library with -O",
            m.path
        )
    })
}

/// The allocator an executable will use, before it runs: a replacement allocator it is linked
/// with or that LD_PRELOAD names, else its libc when dynamically linked, else itself.
pub fn allocator_of_program(exe: &Path) -> Result<Allocator> {
    check_elf(exe)?;
    let Some(interp) = elf_interpreter(exe)? else {
        return Ok(Allocator { primary: exe.to_path_buf(), libc: None });
    };
    // musl's dynamic loader is its libc.
    let libc = if interp.contains("ld-musl") {
        PathBuf::from(interp)
    } else {
        find_library("libc.so.6")
            .with_context(|| format!("cannot find the libc of {}: give it with -O", exe.display()))?
    };
    let preload = std::env::var("LD_PRELOAD").unwrap_or_default();
    let preloaded = preload
        .split([' ', ':'])
        .find(|p| is_allocator(p))
        .map(|p| if p.contains('/') { Some(PathBuf::from(p)) } else { find_library(p) });
    let linked = || elf_needed(exe).ok()?.into_iter().find(|n| is_allocator(n)).and_then(|n| find_library(&n));
    match preloaded.flatten().or_else(linked) {
        Some(primary) => Ok(Allocator { primary, libc: Some(libc) }),
        None => Ok(Allocator { primary: libc, libc: None }),
    }
}

fn find_library(name: &str) -> Option<PathBuf> {
    LIB_DIRS.iter().map(|d| Path::new(d).join(name)).find(|p| p.exists())
}

fn is_libc(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    name.starts_with("libc.so") || name.starts_with("libc-") || name.starts_with("ld-musl")
}

/// Program headers of a 64-bit little-endian ELF: (type, file offset, vaddr, file size).
fn program_headers(data: &[u8], path: &Path) -> Result<Vec<(u32, usize, usize, usize)>> {
    if data.get(4) != Some(&2) {
        bail!("{}: only 64-bit ELF files are supported", path.display());
    }
    let (phoff, phentsize, phnum) = (u64_at(data, 0x20), u16_at(data, 0x36), u16_at(data, 0x38));
    Ok((0..phnum)
        .map(|i| phoff + i * phentsize)
        .map(|ph| (u16_at(data, ph) as u32, u64_at(data, ph + 8), u64_at(data, ph + 16), u64_at(data, ph + 32)))
        .collect())
}

fn u16_at(data: &[u8], o: usize) -> usize {
    data.get(o..o + 2).map_or(0, |b| u16::from_le_bytes([b[0], b[1]]) as usize)
}

fn u64_at(data: &[u8], o: usize) -> usize {
    data.get(o..o + 8).map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
}

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;

/// PT_INTERP of an ELF, or None for a static executable.
fn elf_interpreter(path: &Path) -> Result<Option<String>> {
    let data = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    for (kind, off, _, size) in program_headers(&data, path)? {
        if kind == PT_INTERP {
            let raw = data.get(off..off + size).context("truncated PT_INTERP")?;
            return Ok(Some(String::from_utf8_lossy(raw).trim_end_matches('\0').to_string()));
        }
    }
    Ok(None)
}

/// The DT_NEEDED libraries of a dynamically linked ELF.
fn elf_needed(path: &Path) -> Result<Vec<String>> {
    let data = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let headers = program_headers(&data, path)?;
    // DT_STRTAB is an address: map it to a file offset through the PT_LOAD that holds it.
    let to_offset = |vaddr: usize| {
        headers
            .iter()
            .find(|&&(k, _, va, size)| k == PT_LOAD && (va..va + size).contains(&vaddr))
            .map(|&(_, off, va, _)| vaddr - va + off)
    };
    let Some(&(_, dyn_off, _, dyn_size)) = headers.iter().find(|h| h.0 == PT_DYNAMIC) else { return Ok(Vec::new()) };
    let entries: Vec<(usize, usize)> =
        (dyn_off..dyn_off + dyn_size).step_by(16).map(|e| (u64_at(&data, e), u64_at(&data, e + 8))).collect();
    let Some(strtab) = entries.iter().find(|e| e.0 == 5).and_then(|e| to_offset(e.1)) else { return Ok(Vec::new()) };
    Ok(entries
        .iter()
        .filter(|e| e.0 == 1)
        .filter_map(|e| {
            let start = strtab + e.1;
            let end = start + data.get(start..)?.iter().position(|&b| b == 0)?;
            Some(String::from_utf8_lossy(&data[start..end]).into_owned())
        })
        .collect())
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
    fn finds_the_interpreter_and_libraries_of_a_dynamic_program() {
        let interp = elf_interpreter(Path::new("/bin/sh")).unwrap().unwrap();
        assert!(interp.contains("ld-linux"), "{interp}");
        assert!(elf_needed(Path::new("/bin/sh")).unwrap().contains(&"libc.so.6".to_string()));
        if std::env::var_os("LD_PRELOAD").is_none() {
            let alloc = allocator_of_program(Path::new("/bin/sh")).unwrap();
            assert!(alloc.primary.ends_with("libc.so.6") && alloc.libc.is_none(), "{alloc:?}");
        }
    }

    #[test]
    fn replacement_allocators_are_recognised() {
        assert!(is_allocator("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"));
        assert!(is_allocator("libtcmalloc_minimal.so.4"));
        assert!(!is_allocator("/usr/lib/x86_64-linux-gnu/libc.so.6"));
    }
}
