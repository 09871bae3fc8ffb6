//! Stack symbolization; user addresses go through a maps snapshot to (ELF, file offset) so it works after exit.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use anyhow::Context;
use blazesym::symbolize::source::{Elf, Source};
use blazesym::symbolize::{CodeInfo, Input, Sym, Symbolized, Symbolizer};

use crate::kernel::kallsyms::Kallsyms;
use crate::procfs;

mod parts;
mod unnamed;
pub use parts::debug_file;
pub use unnamed::{Unnamed, UnnamedFrames};

#[derive(Clone, Debug, serde::Serialize, PartialEq, Eq)]
pub struct Frame {
    /// The address as captured (a hex string in JSON).
    #[serde(serialize_with = "crate::output::hex::serialize")]
    pub addr: u64,
    /// Demangled function name; `None` when unknown.
    pub func: Option<String>,
    /// `addr` minus the function's start (0 when unknown, and for inlined frames).
    pub offset: u64,
    /// Basename of the ELF, "[vdso]", "[kernel]" or a kernel module name.
    pub module: Option<String>,
    /// Full source path as recorded in DWARF.
    pub file: Option<String>,
    pub line: Option<u32>,
    /// True for functions inlined at `addr`; each address's one non-inlined frame (the real function) comes last.
    pub inlined: bool,
    /// Why `func` is unknown; absent when it is known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unnamed: Option<Unnamed>,
}

impl Frame {
    /// A frame in no executable mapping of its process (as last seen).
    pub fn unknown(addr: u64) -> Frame {
        Frame::unnamed(addr, None, Unnamed::NoMapping)
    }

    fn unnamed(addr: u64, module: Option<&str>, why: Unnamed) -> Frame {
        Frame {
            addr,
            func: None,
            offset: 0,
            module: module.map(str::to_string),
            file: None,
            line: None,
            inlined: false,
            unnamed: Some(why),
        }
    }
}

impl fmt::Display for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.func {
            // An inlined function has no start address of its own, so no offset.
            Some(func) if self.inlined => write!(f, "{func}")?,
            Some(func) => write!(f, "{func}+{:#x}", self.offset)?,
            None => write!(f, "{:#x}", self.addr)?,
        }
        match self.module.as_deref() {
            Some(m) if m.starts_with('[') => write!(f, " {m}")?,
            Some(m) => write!(f, " [{m}]")?,
            None => f.write_str(" [unknown]")?,
        }
        if let Some(file) = &self.file {
            write!(f, " {}", file.rsplit('/').next().unwrap_or(file))?;
            if let Some(line) = self.line {
                write!(f, ":{line}")?;
            }
        }
        if self.inlined {
            f.write_str(" (inlined)")?;
        }
        Ok(())
    }
}

/// Identity of an opened ELF file: (st_dev, st_ino).
type FileKey = (u64, u64);

/// A file mapping that held code of a symbolized stack, as the process mapped it: what a
/// profile needs for another tool to symbolize its addresses later.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappedFile {
    pub start: u64,
    pub limit: u64,
    /// Offset in the file of `start`.
    pub offset: u64,
    /// The path as /proc/PID/maps shows it.
    pub path: String,
    /// The GNU build-id note, in hex, when the file has one.
    pub build_id: Option<String>,
}

#[derive(Clone)]
enum Kind {
    /// File-backed mapping; `file` is None when it could not be opened or is not executable.
    File {
        path: Rc<str>,
        module: Rc<str>,
        inode: u64,
        file: Option<FileKey>,
    },
    Vdso,
    Other,
}

/// What `lookup` finds: the mapping's kind, the address's offset in the mapped file, and
/// whether the mapping is executable.
struct Hit {
    kind: Kind,
    file_off: u64,
    exec: bool,
}

struct Mapping {
    start: u64,
    end: u64,
    offset: u64,
    /// Mapped executable: only such a mapping can hold a stack's code.
    exec: bool,
    kind: Kind,
}

pub struct UserSymbolizer {
    symbolizer: Symbolizer,
    maps: HashMap<u32, Vec<Mapping>>,
    /// ELF files kept open so they stay readable after the process (and its /proc/PID/root) is gone.
    files: HashMap<FileKey, File>,
    /// Frames per (file, file offset) with `addr` left 0; the same offset has different addrs per pid.
    cache: HashMap<(FileKey, u64), Vec<Frame>>,
    /// Each file's separate debug file (by build id), looked for once, for `parts`.
    debug_files: HashMap<FileKey, Option<PathBuf>>,
    /// Each process's name at its last snapshot, for reports made after it exited.
    comms: HashMap<u32, String>,
    /// Mapped files that could not be opened, per (pid, path): warned about once each.
    unreachable: HashSet<(u32, Rc<str>)>,
    /// Processes that mapped code since their snapshot: re-read before the next lookup.
    outdated: HashSet<u32>,
    /// Per process, the file mappings its symbolized stacks ran through, kept as long as the
    /// callers keep those stacks' frames (past `forget`), for a final report after the exit.
    placed: HashMap<u32, Vec<Rc<MappedFile>>>,
    /// Each opened file's build id, read once.
    build_ids: HashMap<FileKey, Option<String>>,
}

impl Default for UserSymbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl UserSymbolizer {
    pub fn new() -> Self {
        let symbolizer = Symbolizer::builder()
            .enable_code_info(true)
            .enable_inlined_fns(true)
            .enable_demangling(true)
            // Files are addressed via fds we hold open, so they cannot change underneath.
            .enable_auto_reload(false)
            .build();
        UserSymbolizer {
            symbolizer,
            maps: HashMap::new(),
            files: HashMap::new(),
            cache: HashMap::new(),
            debug_files: HashMap::new(),
            comms: HashMap::new(),
            unreachable: Default::default(),
            outdated: HashSet::new(),
            placed: HashMap::new(),
            build_ids: HashMap::new(),
        }
    }

    /// The process's name (/proc/PID/comm) at its last snapshot.
    pub fn comm(&self, pid: u32) -> Option<&str> {
        self.comms.get(&pid).map(String::as_str)
    }

    /// Re-read /proc/PID/maps. Keeps the previous snapshot when the process is gone (returns Ok(false) then), Ok(true) when refreshed.
    pub fn refresh(&mut self, pid: u32) -> anyhow::Result<bool> {
        let text = match std::fs::read_to_string(format!("/proc/{pid}/maps")) {
            Ok(text) => text,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) => {
                return Ok(false);
            }
            Err(e) => return Err(e).with_context(|| format!("reading /proc/{pid}/maps")),
        };
        // Zombies (exited, not yet reaped) have empty maps; the old snapshot is better.
        if text.is_empty() {
            return Ok(false);
        }
        self.outdated.remove(&pid);
        if let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) {
            self.comms.insert(pid, comm.trim_end().to_string());
        }
        let exe_label = exe_label(pid);
        // Files already opened for this pid are reused; failed opens are retried.
        let previous = self.maps.remove(&pid).unwrap_or_default();
        let mut opened: HashMap<(Rc<str>, u64), Option<FileKey>> = previous
            .into_iter()
            .filter_map(|m| match m.kind {
                Kind::File { path, inode, file: Some(key), .. } => Some(((path, inode), Some(key))),
                _ => None,
            })
            .collect();
        let mut maps = Vec::new();
        for m in procfs::parse_maps(&text) {
            let procfs::Mapping { start, end, offset, inode, exec, .. } = m;
            let kind = if m.path == "[vdso]" {
                Kind::Vdso
            } else if m.is_file() {
                let path: Rc<str> = m.path.as_str().into();
                let module: Rc<str> = match &exe_label {
                    Some((exe, label)) if **exe == *path => label.clone(),
                    _ => path.rsplit('/').next().unwrap_or_default().into(),
                };
                // Only code can appear in stacks; skip opening data files mapped read-only.
                let file = if exec {
                    match opened.get(&(path.clone(), inode)) {
                        Some(&file) => file,
                        None => {
                            let file = self.open_elf(pid, &path, inode, (start, end));
                            opened.insert((path.clone(), inode), file);
                            file
                        }
                    }
                } else {
                    None
                };
                Kind::File { path, module, inode, file }
            } else {
                Kind::Other
            };
            maps.push(Mapping { start, end, offset, exec, kind });
        }
        maps.sort_by_key(|m| m.start);
        self.maps.insert(pid, maps);
        Ok(true)
    }

    /// Opens the file that `pid` maps at `path`: via the process's root (containers) or plainly
    /// when the inode matches, else via map_files (the mapping's own file, even deleted).
    /// Never another file of the same name: its symbols would name the wrong functions.
    fn open_elf(&mut self, pid: u32, path: &str, inode: u64, range: (u64, u64)) -> Option<FileKey> {
        let candidates = [
            (format!("/proc/{pid}/root{path}"), true),
            (path.to_string(), true),
            // Not compared: overlayfs on older kernels shows another inode in maps than stat.
            (format!("/proc/{pid}/map_files/{:x}-{:x}", range.0, range.1), false),
        ];
        for (candidate, check_inode) in candidates {
            let Ok(file) = File::open(&candidate) else {
                continue;
            };
            let Ok(meta) = file.metadata() else {
                continue;
            };
            if check_inode && meta.ino() != inode {
                continue;
            }
            let key = (meta.dev(), meta.ino());
            self.files.entry(key).or_insert(file);
            return Some(key);
        }
        if self.unreachable.insert((pid, path.into())) {
            eprintln!(
                "memtrace: warning: cannot open the {path} that process {pid} maps (replaced or gone): its frames show no function names"
            );
        }
        None
    }

    /// `pid` has mapped new code: its snapshot is re-read before its next lookup (an older
    /// one may show other code at the same addresses, or none).
    pub fn mapped(&mut self, pid: u32) {
        self.outdated.insert(pid);
    }

    /// Symbolize one stack (innermost first). Each address expands into one or more frames: for
    /// an address inside inlined code, the innermost inlined function first, then its callers
    /// down to the real function. The snapshot is re-read once (if the process is alive) when
    /// it is outdated or does not show an address as code: one taken while the loader maps a
    /// library shows the library's code inside the read-only mapping the loader makes first.
    /// A frame left without a name says why. Never fails.
    pub fn symbolize_stack(&mut self, pid: u32, addrs: &[u64]) -> Vec<Frame> {
        let mut refreshed = self.outdated.remove(&pid) && matches!(self.refresh(pid), Ok(true));
        let mut frames = Vec::with_capacity(addrs.len());
        for &addr in addrs {
            let mut found = self.lookup(pid, addr);
            if !found.as_ref().is_some_and(|hit| hit.exec) && !refreshed {
                refreshed = true;
                if matches!(self.refresh(pid), Ok(true)) {
                    found = self.lookup(pid, addr);
                }
            }
            let Some(Hit { kind, file_off, exec }) = found else {
                frames.push(Frame::unknown(addr));
                continue;
            };
            let module = match &kind {
                Kind::File { module, .. } => Some(&**module),
                Kind::Vdso => Some("[vdso]"),
                Kind::Other => None,
            };
            match kind {
                _ if !exec => frames.push(Frame::unnamed(addr, module, Unnamed::NoMapping)),
                Kind::Other => frames.push(Frame::unnamed(addr, module, Unnamed::Anonymous)),
                Kind::Vdso => frames.push(Frame::unnamed(addr, module, Unnamed::Vdso)),
                Kind::File { file: None, .. } => frames.push(Frame::unnamed(addr, module, Unnamed::Unreadable)),
                Kind::File { ref module, ref path, file: Some(key), .. } => {
                    self.place(pid, addr, key, path);
                    frames.extend(self.symbolize_file(key, file_off, module, addr))
                }
            }
        }
        frames
    }

    /// The file mapping that held `addr` of `pid` when a stack through it was symbolized.
    pub fn mapping(&self, pid: u32, addr: u64) -> Option<&MappedFile> {
        let placed = self.placed.get(&pid)?;
        placed.iter().find(|m| (m.start..m.limit).contains(&addr)).map(|m| &**m)
    }

    /// Remembers the mapping of `addr` (a code address just found in `file`) for `mapping`.
    fn place(&mut self, pid: u32, addr: u64, key: FileKey, path: &str) {
        if self.mapping(pid, addr).is_some() {
            return;
        }
        let Some(m) = self.maps.get(&pid).and_then(|maps| maps.iter().find(|m| (m.start..m.end).contains(&addr)))
        else {
            return;
        };
        let (start, limit, offset) = (m.start, m.end, m.offset);
        let files = &self.files;
        let build_id = self
            .build_ids
            .entry(key)
            .or_insert_with(|| {
                let fd = files.get(&key)?.as_raw_fd();
                let id = blazesym::helper::read_elf_build_id(&format!("/proc/self/fd/{fd}")).ok()??;
                Some(id.iter().map(|b| format!("{b:02x}")).collect())
            })
            .clone();
        let mapped = MappedFile { start, limit, offset, path: path.to_string(), build_id };
        self.placed.entry(pid).or_default().push(Rc::new(mapped));
    }

    /// How many mapped files could not be opened: a blind spot for reports to state.
    #[cfg_attr(
        not(test),
        allow(dead_code, reason = "for the reports' blind spots; memleak's report is being rewritten")
    )]
    pub fn unreachable_files(&self) -> usize {
        self.unreachable.len()
    }

    /// Forget a pid's snapshot (process gone and reported, or exec'd into a new image). Its
    /// name stays, for reports made later. Files stay open: blazesym caches each file by its
    /// /proc/self/fd path, so a closed fd reused by another file would be read as the old one.
    pub fn forget(&mut self, pid: u32) {
        self.maps.remove(&pid);
        self.unreachable.retain(|(p, _)| *p != pid);
    }

    /// Forgets every process that no longer exists (reaped), so a long system-wide run does
    /// not keep each dead process's maps and files, and a reused pid gets a fresh snapshot.
    /// Call after a report: stacks symbolized before stay wherever the caller cached them.
    /// Returns how many were forgotten.
    pub fn forget_exited(&mut self) -> usize {
        let gone: HashSet<u32> =
            self.maps.keys().copied().filter(|pid| !Path::new(&format!("/proc/{pid}")).exists()).collect();
        if gone.is_empty() {
            return 0;
        }
        self.maps.retain(|pid, _| !gone.contains(pid));
        self.unreachable.retain(|(p, _)| !gone.contains(p));
        gone.len()
    }

    /// The mapping covering `addr` in `pid`'s snapshot.
    fn lookup(&self, pid: u32, addr: u64) -> Option<Hit> {
        let maps = self.maps.get(&pid)?;
        let m = &maps[maps.partition_point(|m| m.start <= addr).checked_sub(1)?];
        (addr < m.end).then(|| Hit { kind: m.kind.clone(), file_off: addr - m.start + m.offset, exec: m.exec })
    }

    fn symbolize_file(&mut self, key: FileKey, file_off: u64, module: &str, addr: u64) -> Vec<Frame> {
        let frames = self.cache.entry((key, file_off)).or_insert_with(|| {
            let Some(file) = self.files.get(&key) else {
                return vec![Frame::unnamed(0, Some(module), Unnamed::Unreadable)];
            };
            // blazesym needs a path; the fd path stays valid for as long as we hold the file.
            let path = format!("/proc/self/fd/{}", file.as_raw_fd());
            // Debug files are found by build id or by a debug link whose checksum blazesym
            // verifies; a host debug file that fails it (a container's library of the same
            // name) is an error, and the library's own symbols are still right.
            let with_debug = Source::Elf(Elf::new(&path));
            let result = self.symbolizer.symbolize_single(&with_debug, Input::FileOffset(file_off)).or_else(|_| {
                let mut own = Elf::new(&path);
                own.debug_syms = false;
                self.symbolizer.symbolize_single(&Source::Elf(own), Input::FileOffset(file_off))
            });
            match result {
                Ok(Symbolized::Sym(sym)) => {
                    let mut frames = sym_frames(&sym, module);
                    if parts::needs_part(&sym) {
                        let debug = self.debug_files.entry(key).or_insert_with(|| parts::debug_file(&path));
                        if let Some(part) = parts::part_of(&self.symbolizer, &sym, &path, debug.as_ref()) {
                            let real = frames.last_mut().expect("sym_frames ends with the real function");
                            real.func = Some(part.name);
                            real.offset = part.offset;
                        }
                    }
                    frames
                }
                Ok(Symbolized::Unknown(_)) => vec![Frame::unnamed(0, Some(module), Unnamed::NoSymbol)],
                Err(_) => vec![Frame::unnamed(0, Some(module), Unnamed::Unreadable)],
            }
        });
        frames.iter().map(|f| Frame { addr, ..f.clone() }).collect()
    }
}

/// The executable's path as /proc/PID/maps shows it and the name it was started by, when that
/// name differs: maps and /proc/PID/exe show a symlink's target (`redis-server` runs
/// /usr/bin/redis-check-rdb), while the name people know is the one given to execve, which
/// the kernel leaves in the process's memory at AT_EXECFN. Only a name that still leads to
/// the same file is taken (a script's name leads to its script, not to the interpreter).
fn exe_label(pid: u32) -> Option<(Rc<str>, Rc<str>)> {
    use std::os::unix::fs::FileExt as _;
    const AT_EXECFN: u64 = 31;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let auxv = std::fs::read(format!("/proc/{pid}/auxv")).ok()?;
    let word = |c: &[u8]| u64::from_ne_bytes(c.try_into().unwrap_or_default());
    let at = auxv.chunks_exact(16).find(|e| word(&e[..8]) == AT_EXECFN).map(|e| word(&e[8..]))?;
    let mut buf = [0u8; 4096];
    let n = File::open(format!("/proc/{pid}/mem")).ok()?.read_at(&mut buf, at).ok()?;
    let execfn = std::str::from_utf8(&buf[..buf[..n].iter().position(|&b| b == 0)?]).ok()?;
    let name = execfn.rsplit('/').next().filter(|n| !n.is_empty())?;
    let exe = exe.to_str()?.strip_suffix(" (deleted)").unwrap_or(exe.to_str()?);
    if exe.rsplit('/').next() == Some(name) {
        return None;
    }
    let through =
        if execfn.starts_with('/') { format!("/proc/{pid}/root{execfn}") } else { format!("/proc/{pid}/cwd/{execfn}") };
    let same = |a: &std::fs::Metadata, b: &std::fs::Metadata| a.dev() == b.dev() && a.ino() == b.ino();
    let (named, running) = (std::fs::metadata(through).ok()?, std::fs::metadata(format!("/proc/{pid}/exe")).ok()?);
    same(&named, &running).then(|| (exe.into(), name.into()))
}

/// blazesym lists inlined functions outermost first; frames go innermost first.
fn sym_frames(sym: &Sym<'_>, module: &str) -> Vec<Frame> {
    let non_empty = |name: &str| (!name.is_empty()).then(|| name.to_string());
    let mut frames: Vec<Frame> = sym
        .inlined
        .iter()
        .rev()
        .map(|inl| {
            let (file, line) = location(inl.code_info.as_ref());
            Frame {
                addr: 0,
                func: non_empty(&inl.name),
                offset: 0,
                module: Some(module.to_string()),
                file,
                line,
                inlined: true,
                unnamed: inl.name.is_empty().then_some(Unnamed::NoSymbol),
            }
        })
        .collect();
    let (file, line) = location(sym.code_info.as_deref());
    frames.push(Frame {
        addr: 0,
        func: non_empty(&sym.name),
        offset: sym.offset as u64,
        module: Some(module.to_string()),
        file,
        line,
        inlined: false,
        unnamed: sym.name.is_empty().then_some(Unnamed::NoSymbol),
    });
    frames
}

fn location(info: Option<&CodeInfo<'_>>) -> (Option<String>, Option<u32>) {
    match info {
        Some(info) => (Some(info.to_path().to_string_lossy().into_owned()), info.line),
        None => (None, None),
    }
}

pub struct KernelSymbolizer {
    kallsyms: Kallsyms,
}

impl KernelSymbolizer {
    pub fn new() -> anyhow::Result<Self> {
        Ok(KernelSymbolizer { kallsyms: Kallsyms::load()? })
    }

    pub fn symbolize_stack(&self, addrs: &[u64]) -> Vec<Frame> {
        addrs
            .iter()
            .map(|&addr| match self.kallsyms.resolve(addr) {
                Some((name, offset, module)) => Frame {
                    func: Some(name.to_string()),
                    offset,
                    module: Some(module.unwrap_or("[kernel]").to_string()),
                    unnamed: None,
                    ..Frame::unknown(addr)
                },
                None => Frame::unnamed(addr, None, Unnamed::NoSymbol),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Started through a symlink of another name: the executable is labelled with that name.
    #[test]
    fn an_executable_started_through_a_symlink_keeps_its_name() {
        let dir = std::env::temp_dir().join(format!("memtrace-alias-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let alias = dir.join("sleep-alias");
        let _ = std::fs::remove_file(&alias);
        std::os::unix::fs::symlink("/bin/sleep", &alias).unwrap();
        let mut plain = std::process::Command::new("/bin/sleep").arg("5").spawn().unwrap();
        let mut child = std::process::Command::new(&alias).arg("5").spawn().unwrap();
        // Wait for both to have exec'd: /proc/PID/exe changes before the kernel writes the new
        // auxiliary vector, so wait for AT_EXECFN (31) itself.
        let started = |pid: u32| {
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
            let auxv = std::fs::read(format!("/proc/{pid}/auxv")).unwrap_or_default();
            exe.ends_with("sleep") && auxv.chunks_exact(16).any(|e| e[..8] == 31u64.to_ne_bytes())
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !(started(child.id()) && started(plain.id())) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let label = exe_label(child.id());
        let plain_label = exe_label(plain.id());
        for c in [&mut child, &mut plain] {
            let _ = c.kill();
            let _ = c.wait();
        }
        std::fs::remove_dir_all(&dir).unwrap();
        let (exe, name) = label.expect("a label for the symlinked executable");
        assert_eq!((exe.rsplit('/').next(), &*name), (Some("sleep"), "sleep-alias"));
        assert!(plain_label.is_none(), "no relabelling when the names agree");
    }
    use std::hint::black_box;

    #[test]
    fn a_mapped_file_is_never_replaced_by_another_of_its_name() {
        let mut sym = UserSymbolizer::new();
        let me = std::process::id();
        let libc = crate::procfs::mapped_files(me).unwrap().into_iter().find(|m| m.path.contains("libc.so")).unwrap();
        assert!(sym.open_elf(me, &libc.path, libc.inode, (libc.start, libc.end)).is_some());
        // Same path, another inode, and a range that maps nothing: no file is the mapped one.
        assert_eq!(sym.open_elf(me, &libc.path, libc.inode + 1, (0, 0x1000)), None);
        assert_eq!(sym.open_elf(me, &libc.path, libc.inode + 1, (0, 0x1000)), None);
        assert_eq!(sym.unreachable_files(), 1);
    }

    #[inline(never)]
    fn probe_target(x: u64) -> u64 {
        black_box(x) + 1
    }

    #[inline(always)]
    fn inlined_leaf(x: u64) -> (u64, u32) {
        (black_box(x) * 3, line!())
    }

    #[inline(never)]
    fn inline_host(x: u64) -> (u64, u32, u32) {
        let ((v, leaf_line), call_line) = (inlined_leaf(x), line!());
        (v + 1, leaf_line, call_line)
    }

    fn name(f: &Frame) -> &str {
        f.func.as_deref().unwrap_or_default()
    }

    fn exe_name() -> String {
        let exe = std::env::current_exe().unwrap();
        exe.file_name().unwrap().to_string_lossy().into_owned()
    }

    #[test]
    fn own_function_has_name_module_and_line() {
        black_box(probe_target(1));
        let addr = probe_target as *const () as u64;
        let mut sym = UserSymbolizer::new();
        // Release builds may inline helpers (black_box) into it: keep the real frame.
        let real = |frames: Vec<Frame>| frames.into_iter().filter(|f| !f.inlined).collect::<Vec<_>>();
        let frames = real(sym.symbolize_stack(std::process::id(), &[addr]));
        assert_eq!(frames.len(), 1, "{frames:?}");
        let f = &frames[0];
        assert_eq!(f.addr, addr);
        assert!(name(f).ends_with("tests::probe_target"), "{f:?}");
        assert_eq!(f.offset, 0);
        assert_eq!(f.module.as_deref(), Some(exe_name().as_str()));
        assert!(f.file.as_deref().unwrap().ends_with("symbolize/mod.rs"), "{f:?}");
        assert!(f.line.unwrap() > 0);
        assert!(!f.inlined);
        let shown = f.to_string();
        assert!(shown.contains("probe_target+0x0 [") && shown.contains(" mod.rs:"), "{shown}");
        // A second lookup, at a different offset, comes from the same cached file.
        let frames = real(sym.symbolize_stack(std::process::id(), &[addr + 1, addr]));
        assert_eq!(frames[0].offset, 1);
        assert_eq!(frames[1], *f);
    }

    #[test]
    fn inlined_frames_come_innermost_first() {
        let (_, leaf_line, call_line) = inline_host(black_box(2));
        let start = inline_host as *const () as u64;
        let mut sym = UserSymbolizer::new();
        let pid = std::process::id();
        // Find an address inside the inlined call; release builds may inline more (black_box)
        // above it, so look at the leaf and the frame after it.
        let hit = (start..start + 512).find_map(|addr| {
            let frames = sym.symbolize_stack(pid, &[addr]);
            let i =
                frames.iter().position(|f| name(f).ends_with("tests::inlined_leaf") && f.line == Some(leaf_line))?;
            (frames.len() == i + 2).then(|| frames[i..].to_vec())
        });
        let frames = hit.expect("an address inside the inlined call");
        assert!(name(&frames[0]).ends_with("tests::inlined_leaf"));
        assert!(frames[0].inlined);
        assert!(name(&frames[1]).ends_with("tests::inline_host"));
        assert!(!frames[1].inlined);
        assert_eq!(frames[1].line, Some(call_line));
        assert!(frames[1].offset > 0);
        assert!(frames[0].to_string().ends_with("(inlined)"), "{}", frames[0]);
    }

    /// glibc's malloc is `malloc`/`__libc_malloc` in .dynsym, `__GI___libc_malloc` with libc6-dbg.
    fn is_malloc(f: &Frame) -> bool {
        name(f).ends_with("malloc") && f.offset == 0
    }

    /// The address of `file_off` of the mapped file `module` in `pid`'s snapshot.
    fn addr_in(sym: &UserSymbolizer, pid: u32, module: &str, file_off: u64) -> Option<u64> {
        sym.maps.get(&pid)?.iter().find_map(|m| match &m.kind {
            Kind::File { module: name, .. }
                if &**name == module && (m.offset..m.offset + m.end - m.start).contains(&file_off) =>
            {
                Some(m.start + file_off - m.offset)
            }
            _ => None,
        })
    }

    /// Refreshes `pid` until `module` is mapped (the child may not have exec'd yet).
    fn wait_mapped(sym: &mut UserSymbolizer, pid: u32, module: &str) {
        for _ in 0..500 {
            if sym.refresh(pid).unwrap() && addr_in(sym, pid, module, 0).is_some() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("{module} never mapped in {pid}");
    }

    /// Our own `addr` translated to where the same file offset of `module` sits in `pid`.
    fn translate(sym: &mut UserSymbolizer, addr: u64, pid: u32, module: &str) -> u64 {
        let me = std::process::id();
        assert!(sym.refresh(me).unwrap());
        let file_off = sym.lookup(me, addr).unwrap().file_off;
        sym.forget(me);
        addr_in(sym, pid, module, file_off).expect("offset mapped in the child")
    }

    /// Where `addr` (in this process's own code) is in the file mapped there: (path, offset).
    fn file_of(addr: u64) -> (String, u64) {
        let mut sym = UserSymbolizer::new();
        assert!(sym.refresh(std::process::id()).unwrap());
        match sym.lookup(std::process::id(), addr).unwrap() {
            Hit { kind: Kind::File { path, .. }, file_off, .. } => (path.to_string(), file_off),
            _ => panic!("{addr:#x} is not in a mapped file"),
        }
    }

    /// An address range of `len` bytes reserved (mapped inaccessible) for a test to map files
    /// over: never unmapped in between, so no other thread's mapping can land in it.
    fn reserve(len: usize) -> u64 {
        // SAFETY: a fresh anonymous mapping.
        let addr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        assert_ne!(addr, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        addr as u64
    }

    /// Maps the whole of `path` with `prot` at `at`, inside a range from `reserve`. Nothing
    /// mapped this way runs.
    fn map_file(path: &str, prot: i32, at: u64) {
        let file = File::open(path).unwrap();
        let len = file.metadata().unwrap().len() as usize;
        // SAFETY: a private file mapping over a range this test reserved.
        let addr = unsafe {
            libc::mmap(at as *mut libc::c_void, len, prot, libc::MAP_PRIVATE | libc::MAP_FIXED, file.as_raw_fd(), 0)
        };
        assert_ne!(addr, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
    }

    /// The loader maps a library read-only first, then its code over that: a snapshot taken in
    /// between shows the code inside a read-only mapping, and must be read again.
    #[test]
    fn code_a_snapshot_shows_read_only_is_looked_up_in_fresh_maps() {
        let (libc_path, off) = file_of(libc::malloc as *const () as u64);
        let len = std::fs::metadata(&libc_path).unwrap().len() as usize;
        let me = std::process::id();
        let base = reserve(len);
        map_file(&libc_path, libc::PROT_READ, base);
        let mut sym = UserSymbolizer::new();
        assert!(sym.refresh(me).unwrap());
        let page = (base + off) & !0xfff;
        // SAFETY: a page of the mapping made above.
        assert_eq!(unsafe { libc::mprotect(page as *mut libc::c_void, 0x1000, libc::PROT_READ | libc::PROT_EXEC) }, 0);
        let frames = sym.symbolize_stack(me, &[base + off]);
        // SAFETY: unmapping what this test mapped.
        unsafe { libc::munmap(base as *mut libc::c_void, len) };
        let f = frames.last().unwrap();
        assert!(is_malloc(f) && f.unnamed.is_none(), "{frames:?}");
        assert_eq!(UnnamedFrames::of(&frames).no_mapping, 0);
    }

    /// After `mapped`, the next lookup reads the maps again: code mapped where other code was
    /// is named from the new file, not from the old snapshot.
    #[test]
    fn code_mapped_over_other_code_is_named_from_the_new_file() {
        let (libc_path, _) = file_of(libc::malloc as *const () as u64);
        let (exe_path, off) = file_of(probe_target as *const () as u64);
        let size = |p: &str| std::fs::metadata(p).unwrap().len() as usize;
        let len = size(&libc_path).max(size(&exe_path));
        let me = std::process::id();
        let rx = libc::PROT_READ | libc::PROT_EXEC;
        let base = reserve(len);
        map_file(&libc_path, rx, base);
        let mut sym = UserSymbolizer::new();
        assert!(sym.refresh(me).unwrap());
        map_file(&exe_path, rx, base);
        sym.mapped(me);
        let frames = sym.symbolize_stack(me, &[base + off]);
        // SAFETY: unmapping what this test mapped.
        unsafe { libc::munmap(base as *mut libc::c_void, len) };
        let f = frames.iter().find(|f| !f.inlined).unwrap();
        assert!(name(f).ends_with("tests::probe_target"), "{frames:?}");
        assert_eq!(f.module.as_deref(), Some(exe_name().as_str()));
    }

    /// glibc's pthread_create is split: `__pthread_create_2_1` and, in .text.unlikely,
    /// `__pthread_create_2_1.cold` (symbols of libc6-dbg's debug file, which `cargo xtask
    /// setup` installs). Each address is named as the part it is in, offset from that part.
    #[test]
    fn each_part_of_a_split_libc_function_is_named_as_itself() {
        use object::{Object as _, ObjectSymbol as _};
        let (libc_path, _) = file_of(libc::malloc as *const () as u64);
        let debug = parts::debug_file(&libc_path).expect("libc's debug file: install libc6-dbg");
        let data = std::fs::read(&debug).unwrap();
        let elf = object::File::parse(&*data).unwrap();
        let vaddr = |name: &str| {
            elf.symbols().find(|s| s.name() == Ok(name)).map(|s| s.address()).unwrap_or_else(|| panic!("no {name}"))
        };
        // Where libc is loaded: malloc's address less its address in the file.
        let bias = libc::malloc as *const () as u64 - vaddr("__libc_malloc");
        let (hot, cold) = (vaddr("__pthread_create_2_1"), vaddr("__pthread_create_2_1.cold"));
        let mut sym = UserSymbolizer::new();
        let frames = sym.symbolize_stack(std::process::id(), &[bias + cold + 5, bias + hot + 0x980]);
        let shown: Vec<String> = frames.iter().filter(|f| !f.inlined).map(|f| format!("{f}")).collect();
        assert!(shown[0].starts_with("__pthread_create_2_1.cold+0x5 [libc.so.6]"), "{shown:?}");
        assert!(shown[1].starts_with("__pthread_create_2_1+0x980 [libc.so.6]"), "{shown:?}");
    }

    #[test]
    fn libc_function() {
        let addr = libc::malloc as *const () as u64;
        let mut sym = UserSymbolizer::new();
        // A second refresh must keep the opened files of the first.
        assert!(sym.refresh(std::process::id()).unwrap());
        assert!(sym.refresh(std::process::id()).unwrap());
        let frames = sym.symbolize_stack(std::process::id(), &[addr]);
        let f = frames.last().unwrap();
        assert_eq!(f.module.as_deref(), Some("libc.so.6"), "{f:?}");
        assert!(is_malloc(f), "{f:?}");
        assert_eq!(f.offset, 0);
    }

    #[test]
    fn dead_process_keeps_snapshot() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let mut sym = UserSymbolizer::new();
        wait_mapped(&mut sym, pid, "libc.so.6");
        let child_addr = translate(&mut sym, libc::malloc as *const () as u64, pid, "libc.so.6");

        child.kill().unwrap();
        let zombie = || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            stat.rsplit_once(") ").unwrap().1.starts_with('Z')
        };
        for _ in 0..500 {
            if zombie() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!sym.refresh(pid).unwrap(), "zombie keeps the snapshot");
        child.wait().unwrap();
        assert!(!sym.refresh(pid).unwrap(), "reaped keeps the snapshot");

        let frames = sym.symbolize_stack(pid, &[child_addr, 0x10]);
        let f = &frames[0];
        assert_eq!(f.addr, child_addr);
        assert_eq!(f.module.as_deref(), Some("libc.so.6"), "{f:?}");
        assert!(is_malloc(f), "{f:?}");
        assert_eq!(frames[1], Frame::unknown(0x10));
        assert_eq!(frames[1].to_string(), "0x10 [unknown]");

        sym.forget(pid);
        assert_eq!(sym.symbolize_stack(pid, &[child_addr]), vec![Frame::unknown(child_addr)]);
    }

    #[test]
    fn forgets_reaped_processes_and_their_files() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let me = std::process::id();
        let mut sym = UserSymbolizer::new();
        wait_mapped(&mut sym, pid, "libc.so.6");
        assert!(sym.refresh(me).unwrap());
        assert_eq!(sym.forget_exited(), 0, "both alive");
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(sym.forget_exited(), 1);
        assert!(!sym.maps.contains_key(&pid) && sym.maps.contains_key(&me));
        assert_eq!(sym.forget_exited(), 0);
        let malloc = libc::malloc as *const () as u64;
        assert!(is_malloc(sym.symbolize_stack(me, &[malloc]).last().unwrap()));
    }

    /// Only sleeps when run as the child of `deleted_binary_is_still_symbolized`.
    #[test]
    #[ignore]
    fn sleeper() {
        if std::env::var_os("MEMTRACE_SYMBOLIZE_SLEEPER").is_some() {
            std::thread::sleep(std::time::Duration::from_secs(30));
        }
    }

    #[test]
    fn deleted_binary_is_still_symbolized() {
        // Run a copy of this test binary, then delete it and put a different file at its path.
        let copy = std::env::temp_dir().join(format!("symbolize-copy-{}", std::process::id()));
        std::fs::copy(std::env::current_exe().unwrap(), &copy).unwrap();
        let test_name = module_path!().split_once("::").unwrap().1.to_string() + "::sleeper";
        // Another test's fork may briefly hold the copy's write descriptor: ETXTBSY, try again.
        let spawn = || {
            std::process::Command::new(&copy)
                .args(["--ignored", "--exact", &test_name])
                .env("MEMTRACE_SYMBOLIZE_SLEEPER", "1")
                .stdout(std::process::Stdio::null())
                .spawn()
        };
        let mut child = (0..100)
            .find_map(|_| match spawn() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    None
                }
                other => Some(other.unwrap()),
            })
            .expect("the copy stayed busy for a second");
        let pid = child.id();
        let module = copy.file_name().unwrap().to_str().unwrap().to_string();
        let mut sym = UserSymbolizer::new();
        wait_mapped(&mut sym, pid, &module);
        let child_addr = translate(&mut sym, probe_target as *const () as u64, pid, &module);
        std::fs::remove_file(&copy).unwrap();
        std::fs::write(&copy, b"not the mapped binary").unwrap();
        // A fresh symbolizer has to find the deleted file on its own.
        let mut sym = UserSymbolizer::new();
        assert!(sym.refresh(pid).unwrap());
        child.kill().unwrap();
        child.wait().unwrap();
        std::fs::remove_file(&copy).unwrap();

        let frames = sym.symbolize_stack(pid, &[child_addr]);
        let real = frames.last().unwrap();
        assert!(name(real).ends_with("tests::probe_target") && !real.inlined, "{frames:?}");
        assert_eq!(real.module.as_deref(), Some(module.as_str()));
    }

    #[test]
    fn kernel_stack() {
        let k = Kallsyms::load().unwrap();
        let addr = k.address_of("vfs_read").unwrap();
        let frames = KernelSymbolizer::new().unwrap().symbolize_stack(&[addr + 0x10, 1]);
        assert_eq!(frames[0].func.as_deref(), Some("vfs_read"));
        assert_eq!(frames[0].offset, 0x10);
        assert_eq!(frames[0].to_string(), "vfs_read+0x10 [kernel]");
        assert_eq!(frames[1], Frame::unnamed(1, None, Unnamed::NoSymbol));
    }
}
