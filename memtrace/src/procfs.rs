//! Files as a process sees them. A process in a container maps files of its own mount
//! namespace: the path in /proc/PID/maps names a file of that namespace, and the same path
//! opened by memtrace may be another file (the host's libc) or none. Everything memtrace
//! probes or reads for a process goes through here to reach the very file it mapped.

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

/// One line of /proc/PID/maps (and each mapping's first line in smaps): the one parser of
/// that format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// (major, minor) of the device, as maps prints it.
    pub dev: (u32, u32),
    pub inode: u64,
    /// Offset in the file of the mapping's first byte.
    pub offset: u64,
    pub read: bool,
    pub write: bool,
    /// Mapped with execute permission: code, which the unwinder needs tables for.
    pub exec: bool,
    /// The path in the process's own mount namespace, without " (deleted)"; a kernel name
    /// such as `[heap]` or `[stack]`; empty for anonymous memory.
    pub path: String,
    pub deleted: bool,
}

/// The file-backed mappings of `pid`.
pub fn mapped_files(pid: u32) -> Result<Vec<Mapping>> {
    Ok(mappings(pid)?.into_iter().filter(Mapping::is_file).collect())
}

/// Every executable mapping of `pid`: files, and code no file backs (a JIT's, `[vdso]`),
/// whose `path` is empty or the kernel's bracketed name.
pub fn exec_mappings(pid: u32) -> Result<Vec<Mapping>> {
    Ok(mappings(pid)?.into_iter().filter(|m| m.exec).collect())
}

/// The mapping of `pid` that holds `addr`, file-backed or not (`[stack]`, anonymous).
pub fn mapping_at(pid: u32, addr: u64) -> Result<Option<Mapping>> {
    Ok(holding(&mappings(pid)?, addr).cloned())
}

/// The mapping among `maps` that holds `addr`.
pub fn holding(maps: &[Mapping], addr: u64) -> Option<&Mapping> {
    maps.iter().find(|m| m.start <= addr && addr < m.end)
}

/// Every mapping of `pid`; empty for a zombie, whose maps are empty.
pub fn mappings(pid: u32) -> Result<Vec<Mapping>> {
    let maps =
        fs::read_to_string(format!("/proc/{pid}/maps")).with_context(|| format!("cannot read /proc/{pid}/maps"))?;
    Ok(parse_maps(&maps))
}

/// The mappings of a /proc/PID/maps text; lines that do not parse are left out.
pub fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines().filter_map(Mapping::parse).collect()
}

impl Mapping {
    /// Backed by a file (its path is absolute), not anonymous memory or a kernel page.
    pub fn is_file(&self) -> bool {
        self.path.starts_with('/')
    }

    /// The path as maps shows it: " (deleted)" after a file that is gone.
    pub fn shown_path(&self) -> String {
        if self.deleted { format!("{} (deleted)", self.path) } else { self.path.clone() }
    }

    /// One line of maps: `start-end perms offset major:minor inode   path`.
    pub fn parse(line: &str) -> Option<Mapping> {
        let mut fields = line.splitn(6, ' ');
        let (start, end) = fields.next()?.split_once('-')?;
        let perms = fields.next()?;
        let offset = fields.next()?;
        let (major, minor) = fields.next()?.split_once(':')?;
        let inode = fields.next()?.parse().ok()?;
        let path = fields.next().unwrap_or("").trim_start();
        let (path, deleted) = match path.strip_suffix(" (deleted)") {
            Some(p) => (p, true),
            None => (path, false),
        };
        let hex64 = |s: &str| u64::from_str_radix(s, 16).ok();
        let hex32 = |s: &str| u32::from_str_radix(s, 16).ok();
        Some(Mapping {
            start: hex64(start)?,
            end: hex64(end)?,
            dev: (hex32(major)?, hex32(minor)?),
            inode,
            offset: hex64(offset)?,
            read: perms.as_bytes().first() == Some(&b'r'),
            write: perms.as_bytes().get(1) == Some(&b'w'),
            exec: perms.as_bytes().get(2) == Some(&b'x'),
            path: path.to_string(),
            deleted,
        })
    }
}

/// Whether `path` opens the file that `m` maps.
fn is_same_file(path: &Path, m: &Mapping) -> bool {
    fs::metadata(path).is_ok_and(|meta| {
        meta.ino() == m.inode && (libc::major(meta.dev()), libc::minor(meta.dev())) == (m.dev.0, m.dev.1)
    })
}

/// A path from which memtrace opens exactly the file `m` of process `pid`: the plain path
/// when memtrace sees that file there (no container), else the path through the process's
/// root, else its map_files link (which reaches even a deleted or replaced file). None when
/// none does, as when map_files is unreadable and the file was replaced.
pub fn reach(pid: u32, m: &Mapping) -> Option<PathBuf> {
    let plain = PathBuf::from(&m.path);
    if !m.deleted && is_same_file(&plain, m) {
        return Some(plain);
    }
    let rooted = PathBuf::from(format!("/proc/{pid}/root{}", m.path));
    if !m.deleted && is_same_file(&rooted, m) {
        return Some(rooted);
    }
    // The mapping's own file by construction; not compared, since overlayfs on older kernels
    // shows another dev/inode in maps than stat does.
    let link = PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end));
    fs::File::open(&link).is_ok().then_some(link)
}

/// The executable of `pid`, reachable from memtrace's mount namespace.
pub fn exe(pid: u32) -> Result<PathBuf> {
    let link = PathBuf::from(format!("/proc/{pid}/exe"));
    let target = fs::read_link(&link).with_context(|| format!("cannot read {}", link.display()))?;
    let same = |p: &Path| {
        let (a, b) = (fs::metadata(p), fs::metadata(&link));
        a.is_ok_and(|a| b.is_ok_and(|b| (a.dev(), a.ino()) == (b.dev(), b.ino())))
    };
    let rooted = PathBuf::from(format!("/proc/{pid}/root{}", target.display()));
    Ok(if same(&target) {
        target
    } else if same(&rooted) {
        rooted
    } else {
        // The link itself opens the running image, deleted or not.
        link
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_maps_lines() {
        let m = Mapping::parse(
            "7f1c2a400000-7f1c2a428000 r--p 00000000 fd:01 1835057                    /usr/lib/x86_64-linux-gnu/libc.so.6",
        )
        .unwrap();
        assert_eq!((m.start, m.end, m.dev, m.inode), (0x7f1c2a400000, 0x7f1c2a428000, (0xfd, 1), 1835057));
        assert_eq!((m.path.as_str(), m.deleted), ("/usr/lib/x86_64-linux-gnu/libc.so.6", false));
        let gone = Mapping::parse("7f00-7f10 r-xp 00001000 08:02 42 /tmp/lib x.so (deleted)").unwrap();
        assert_eq!((gone.path.as_str(), gone.deleted), ("/tmp/lib x.so", true));
        let stack = Mapping::parse("7ffd-7ffe rw-p 00000000 00:00 0                          [stack]").unwrap();
        assert!(!stack.is_file() && (stack.read, stack.write, stack.exec) == (true, true, false));
        assert_eq!(stack.path, "[stack]");
        let jit = Mapping::parse("7ffd-7ffe r-xp 00000000 00:00 0").unwrap();
        assert!(!jit.is_file() && jit.exec && jit.path.is_empty());
        let vdso = Mapping::parse("7ffd6a1e5000-7ffd6a1e7000 r-xp 00000000 00:00 0                          [vdso]");
        assert_eq!(vdso.unwrap().path, "[vdso]");
        assert_eq!(Mapping::parse("55d0c0a00000-55d0c0a21000 rw-p 00000000 00:00 0 ").unwrap().path, "");
        assert_eq!(Mapping::parse("55d0 rw-p"), None);
    }

    #[test]
    fn our_own_libc_is_reached_by_its_plain_path() {
        let me = std::process::id();
        let libc = mapped_files(me).unwrap().into_iter().find(|m| m.path.contains("libc.so")).unwrap();
        assert_eq!(reach(me, &libc), Some(PathBuf::from(&libc.path)));
        // A mapping whose file is not at its path is reached through map_files.
        let moved = Mapping { inode: libc.inode + 1, ..libc.clone() };
        let link = reach(me, &moved).unwrap();
        assert!(link.starts_with(format!("/proc/{me}/map_files/")), "{}", link.display());
        assert!(exe(me).unwrap().is_file());
    }
}
