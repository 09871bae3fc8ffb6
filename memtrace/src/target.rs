//! The process a tool traces: checking a PID, starting a command, finding its allocator
//! library, and noticing when it exits.

use std::{
    fs,
    os::fd::{FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use crate::{loader, procfs};

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

/// Fails unless `pid` is a user process: a kernel thread has no user stacks and no allocator.
pub fn check_user_pid(pid: u32) -> Result<()> {
    if is_kernel_thread(pid) {
        bail!("process {pid} ({}) is a kernel thread: it has no user memory to trace", comm(pid));
    }
    Ok(())
}

/// PF_KTHREAD in the flags of /proc/PID/stat (a kernel thread also has an empty cmdline).
fn is_kernel_thread(pid: u32) -> bool {
    const PF_KTHREAD: u64 = 0x0020_0000;
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // Fields after the comm start at field 3; flags is field 9.
    let flags = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(6)?.parse::<u64>().ok());
    flags.is_some_and(|f| f & PF_KTHREAD != 0) && fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.is_empty())
}

fn is_zombie(stat: &str) -> bool {
    // The state follows the parenthesised comm, which may itself hold spaces and parentheses.
    stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
}

/// The process name, as `ps` shows it.
/// The processes a `-p`/`--comm` filter selects right now: the one pid, or every process
/// (whose name is `comm`, when given).
pub fn matching(pid: Option<u32>, comm: Option<&str>) -> Vec<u32> {
    let pids: Vec<u32> = match pid {
        Some(pid) => vec![pid],
        None => std::fs::read_dir("/proc")
            .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
            .unwrap_or_default(),
    };
    pids.into_iter().filter(|&pid| comm.is_none_or(|c| self::comm(pid) == c)).collect()
}

pub fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm")).map(|c| c.trim_end().to_string()).unwrap_or_default()
}

/// Resolves a command name like a shell does: with a slash as a path, otherwise through $PATH.
pub fn find_program(name: &str) -> Result<PathBuf> {
    if name.contains('/') {
        let path = PathBuf::from(name);
        if path.is_file() {
            if access_x(&path).is_err() {
                bail!(
                    "{name} is not executable (no x permission, or on a noexec mount): chmod +x it, or run it through its interpreter (-c \"sh {name}\")"
                );
            }
            return Ok(path);
        }
        if path.is_dir() {
            bail!("{name} is a directory, not a program");
        }
        bail!("no such program: {name}");
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
        .with_context(|| format!("command not found in PATH: {name}"))
}

/// Whether the kernel would exec `p` for memtrace's effective ids: an x bit (root needs one
/// too) on a file system not mounted noexec.
fn access_x(p: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes())?;
    // SAFETY: a NUL-terminated path, only read.
    if unsafe { libc::faccessat(libc::AT_FDCWD, c.as_ptr(), libc::X_OK, libc::AT_EACCESS) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Checks that `path` is an x86-64 ELF file, so a wrong `-O` fails before anything is attached.
pub fn check_elf(path: &Path) -> Result<()> {
    const EM_X86_64: u16 = 62;
    let mut header = [0u8; 20];
    if path.is_dir() {
        bail!("{} is a directory: give -O the file that holds the allocator", path.display());
    }
    let file = fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    use std::io::Read as _;
    if (&file).read_exact(&mut header).is_err() || &header[..4] != b"\x7fELF" {
        bail!("{} is not an ELF binary or library: give -O the file that holds the allocator", path.display());
    }
    // EI_CLASS 2 is 64-bit, EI_DATA 1 little-endian; e_machine follows e_type.
    let machine = u16::from_le_bytes([header[18], header[19]]);
    if header[4] != 2 || header[5] != 1 || machine != EM_X86_64 {
        bail!(
            "{} is not a 64-bit x86-64 ELF file (class {}, machine {machine}): memtrace traces x86-64 code",
            path.display(),
            header[4]
        );
    }
    Ok(())
}

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

impl Allocator {
    /// No allocator probed (yet): a command before its first exec, or an image memleak could
    /// not probe (a static executable without symbols).
    pub fn unprobed() -> Allocator {
        Allocator { primary: PathBuf::new(), libc: None }
    }

    pub fn is_unprobed(&self) -> bool {
        self.primary.as_os_str().is_empty()
    }
}

/// The system's glibc where distributions put it, for reports about the machine rather than a
/// process (`memtrace probe`); a process's own libc comes from `allocator_of_pid`.
pub fn system_libc() -> Option<PathBuf> {
    const PLACES: [&str; 4] = [
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/usr/lib64/libc.so.6",
        "/lib64/libc.so.6",
    ];
    PLACES.iter().map(PathBuf::from).find(|p| p.exists())
}

/// The allocator of a running process, from its memory map. The paths returned open the
/// files the process mapped, also when it lives in another mount namespace (a container).
pub fn allocator_of_pid(pid: u32) -> Result<Allocator> {
    // A dynamic program started a moment ago may still be in its loader, with no library
    // mapped yet: its allocator is not the executable, so wait for the loader (a bounded
    // while; a program that never maps a libc is then taken as static).
    if let Some(alloc) = from_maps(pid)? {
        return Ok(alloc);
    }
    let exe = procfs::exe(pid)?;
    if crate::loader::Dynamic::read(&exe).is_ok_and(|d| d.interp.is_some()) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
            if let Some(alloc) = from_maps(pid)? {
                return Ok(alloc);
            }
        }
    }
    Ok(Allocator { primary: exe, libc: None })
}

/// The allocator a process has mapped so far: None while it maps neither a libc nor an
/// allocator library (a static program, or the loader still at work), or when unreadable.
pub fn mapped_allocator(pid: u32) -> Option<Allocator> {
    from_maps(pid).ok().flatten()
}

fn from_maps(pid: u32) -> Result<Option<Allocator>> {
    let maps = procfs::mapped_files(pid)?;
    let libc = maps.iter().find(|m| is_libc(&m.path));
    let exe = procfs::exe(pid).ok().filter(|exe| libc.is_some() && loader::defines(exe, "malloc"));
    let primary = match (maps.iter().find(|m| is_allocator(&m.path)), libc) {
        // An executable that defines malloc itself: the loader binds every call to it.
        _ if exe.is_some() => exe.expect("checked"),
        (Some(alloc), _) => reach(pid, alloc)?,
        (None, Some(libc)) => reach(pid, libc)?,
        (None, None) => return Ok(None),
    };
    let libc = libc.map(|l| reach(pid, l)).transpose()?;
    Ok(Some(Allocator { libc: libc.filter(|l| *l != primary), primary }))
}

/// Whether what a process has mapped so far (`mapped`) shows that its probes (`probed`) are
/// on the wrong files: a libc or allocator library mapped that is not the one probed. A
/// replacement allocator probed but not mapped yet is no contradiction: the loader may map
/// it after libc.
pub fn contradicts(mapped: &Allocator, probed: &Allocator) -> bool {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &Path| fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let probed_libc = probed.libc.as_deref().unwrap_or(&probed.primary);
    let mapped_libc = mapped.libc.as_deref().unwrap_or(&mapped.primary);
    fn replacement(a: &Allocator) -> Option<&Path> {
        a.libc.is_some().then_some(a.primary.as_path())
    }
    if probed.is_unprobed() {
        return true;
    }
    match (replacement(mapped), replacement(probed)) {
        (Some(m), Some(p)) if id(m) != id(p) => return true,
        (Some(_), None) => return true,
        _ => {}
    }
    id(mapped_libc) != id(probed_libc)
}

fn reach(pid: u32, m: &procfs::Mapping) -> Result<PathBuf> {
    procfs::reach(pid, m).with_context(|| {
        format!(
            "cannot open the {} that process {pid} maps (deleted or replaced, and /proc/{pid}/map_files is unreadable): give the library with -O",
            m.path
        )
    })
}

/// The allocator of a process stopped right after an exec, before its libraries are mapped:
/// from its new executable and the libraries the loader will map for it, found as the loader
/// finds them (`loader::Search`: RPATH, LD_LIBRARY_PATH, RUNPATH, ld.so.cache, under the
/// process's own root), with its own LD_PRELOAD and /etc/ld.so.preload.
pub fn allocator_after_exec(pid: u32) -> Result<Allocator> {
    let exe = PathBuf::from(format!("/proc/{pid}/exe"));
    let (library_path, preload) = loader::loader_env(pid)?;
    let root = process_root(pid);
    // $ORIGIN is the executable's folder as the process sees it (looked up under its root).
    let named = fs::read_link(&exe).with_context(|| format!("cannot read {}", exe.display()))?;
    let cwd = PathBuf::from(format!("/proc/{pid}/cwd"));
    allocator_in(&exe, &named.to_string_lossy(), &library_path, &preload, &root, &cwd)
}

/// The root a process sees its files under: `/` when it shares our root and our mount
/// namespace, else /proc/PID/root. The same root directory in another mount namespace (as
/// `unshare --mount` leaves it) can still show other files at the same paths (a bind mount
/// over libc), and only a lookup through /proc/PID/root follows that namespace's mounts.
fn process_root(pid: u32) -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let theirs = PathBuf::from(format!("/proc/{pid}/root"));
    let same = |a: &Path, b: &Path| match (fs::metadata(a), fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    };
    let ours = same(&theirs, Path::new("/"))
        && same(Path::new(&format!("/proc/{pid}/ns/mnt")), Path::new("/proc/self/ns/mnt"));
    if ours { PathBuf::from("/") } else { theirs }
}

/// The allocator `exe` will use, before it runs: a replacement allocator that `preload`
/// (LD_PRELOAD), /etc/ld.so.preload or its own DT_NEEDED names, else its libc when
/// dynamically linked, else itself. `origin`: the executable's path, for $ORIGIN.
fn allocator_in(
    exe: &Path,
    origin: &str,
    library_path: &str,
    preload: &str,
    root: &Path,
    cwd: &Path,
) -> Result<Allocator> {
    check_elf(exe)?;
    let dynamic = loader::Dynamic::read(exe)?;
    let Some(interp) = dynamic.interp.clone() else {
        return Ok(Allocator { primary: exe.to_path_buf(), libc: None });
    };
    let search = loader::Search::new(root, cwd, origin, dynamic.clone(), library_path);
    // musl's dynamic loader is its libc.
    let libc = if interp.contains("ld-musl") {
        root.join(interp.trim_start_matches('/'))
    } else {
        search
            .find("libc.so.6")
            .with_context(|| format!("cannot find the libc of {}: give it with -O", exe.display()))?
    };
    let system_preload = fs::read_to_string(root.join("etc/ld.so.preload")).unwrap_or_default();
    let preloaded = preload
        .split([' ', ':'])
        .chain(system_preload.split([' ', ':', '\t', '\n']))
        .filter(|p| is_allocator(p))
        .find_map(|p| search.find(p));
    let linked = || dynamic.needed.iter().filter(|n| is_allocator(n)).find_map(|n| search.find(n));
    // An executable that defines malloc itself: the loader binds every call to it.
    let own = || loader::defines(exe, "malloc").then(|| exe.to_path_buf());
    match preloaded.or_else(own).or_else(linked) {
        Some(primary) => Ok(Allocator { primary, libc: Some(libc) }),
        None => Ok(Allocator { primary: libc, libc: None }),
    }
}

fn is_libc(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    name.starts_with("libc.so") || name.starts_with("libc-") || name.starts_with("ld-musl")
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
    let fd = crate::sys::async_readable(unsafe { OwnedFd::from_raw_fd(fd as i32) })?;
    let _ready = fd.readable().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_threads_are_told_apart() {
        assert!(is_kernel_thread(2), "kthreadd");
        assert!(!is_kernel_thread(std::process::id()));
        let err = check_user_pid(2).unwrap_err().to_string();
        assert!(err.ends_with("is a kernel thread: it has no user memory to trace"), "{err}");
    }

    #[test]
    fn only_x86_64_elf_files_pass() {
        assert!(check_elf(Path::new("/bin/sh")).is_ok());
        let dir = std::env::temp_dir().join(format!("memtrace-elf-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let mut elf = fs::read("/bin/sh").unwrap();
        elf[18..20].copy_from_slice(&183u16.to_le_bytes());
        let arm = dir.join("arm");
        fs::write(&arm, &elf).unwrap();
        let err = check_elf(&arm).unwrap_err().to_string();
        assert!(err.ends_with("is not a 64-bit x86-64 ELF file (class 2, machine 183): memtrace traces x86-64 code"));
        elf[4] = 1;
        elf[18..20].copy_from_slice(&62u16.to_le_bytes());
        fs::write(&arm, &elf).unwrap();
        assert!(check_elf(&arm).unwrap_err().to_string().contains("(class 1, machine 62)"));
        assert!(
            check_elf(&dir)
                .unwrap_err()
                .to_string()
                .ends_with("is a directory: give -O the file that holds the allocator")
        );
        assert_eq!(
            find_program(dir.to_str().unwrap()).unwrap_err().to_string(),
            format!("{} is a directory, not a program", dir.display())
        );
        fs::remove_dir_all(&dir).unwrap();
    }

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
    fn a_dynamic_program_allocates_through_its_libc() {
        let alloc = allocator_in(Path::new("/bin/sh"), "/bin/sh", "", "", Path::new("/"), Path::new("/")).unwrap();
        assert!(alloc.primary.ends_with("libc.so.6") && alloc.libc.is_none(), "{alloc:?}");
    }

    /// What is mapped so far contradicts the probes only when it shows another libc or
    /// allocator than the probed one; a replacement allocator not mapped yet does not.
    #[test]
    fn only_another_mapped_file_contradicts_the_probes() {
        let dir = std::env::temp_dir().join(format!("memtrace-contra-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = |name: &str| {
            let p = dir.join(name);
            fs::write(&p, name).unwrap();
            p
        };
        let (libc, other_libc, jemalloc) = (file("libc.so.6"), file("libc-copy.so.6"), file("libjemalloc.so.2"));
        let plain = |l: &Path| Allocator { primary: l.to_path_buf(), libc: None };
        let replaced = Allocator { primary: jemalloc.clone(), libc: Some(libc.clone()) };
        assert!(!contradicts(&plain(&libc), &plain(&libc)));
        assert!(contradicts(&plain(&other_libc), &plain(&libc)));
        // jemalloc probed, only libc mapped yet: wait and see.
        assert!(!contradicts(&plain(&libc), &replaced));
        assert!(contradicts(&replaced, &plain(&libc)));
        assert!(contradicts(&plain(&libc), &Allocator::unprobed()));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn replacement_allocators_are_recognised() {
        assert!(is_allocator("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"));
        assert!(is_allocator("libtcmalloc_minimal.so.4"));
        assert!(!is_allocator("/usr/lib/x86_64-linux-gnu/libc.so.6"));
    }
}
