//! Where glibc's dynamic loader will take a program's libraries from, worked out before the
//! program runs (a command stopped right after its exec, nothing of it mapped but itself and
//! the loader). The order is the loader's: DT_RPATH (when there is no DT_RUNPATH),
//! LD_LIBRARY_PATH, DT_RUNPATH, /etc/ld.so.cache, then the default folders; each folder first
//! through the glibc-hwcaps subfolders this CPU can run. Every path is looked up under the
//! process's own root. What this predicts is checked against the mappings once the loader has
//! mapped them (memleak's `-c`), so a rule missed here costs a re-probe, not a wrong answer.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

/// What the dynamic section of an ELF file says about loading it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Dynamic {
    /// PT_INTERP: None for a static executable.
    pub interp: Option<String>,
    pub needed: Vec<String>,
    pub rpath: Vec<String>,
    pub runpath: Vec<String>,
    /// DF_1_NODEFLIB: neither ld.so.cache nor the default folders.
    pub nodeflib: bool,
}

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NEEDED: usize = 1;
const DT_STRTAB: usize = 5;
const DT_RPATH: usize = 15;
const DT_RUNPATH: usize = 29;
const DT_FLAGS_1: usize = 0x6fff_fffb;
const DF_1_NODEFLIB: usize = 0x800;

impl Dynamic {
    pub fn read(path: &Path) -> Result<Dynamic> {
        let data = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        Dynamic::parse(&data).with_context(|| format!("{}: not a 64-bit ELF file", path.display()))
    }

    fn parse(data: &[u8]) -> Option<Dynamic> {
        if data.get(..4) != Some(b"\x7fELF") || data.get(4) != Some(&2) {
            return None;
        }
        let headers = program_headers(data);
        let mut dynamic = Dynamic::default();
        if let Some(&(_, off, _, size)) = headers.iter().find(|h| h.0 == PT_INTERP) {
            let raw = data.get(off..off.checked_add(size)?)?;
            dynamic.interp = Some(String::from_utf8_lossy(raw).trim_end_matches('\0').to_string());
        }
        let Some(&(_, dyn_off, _, dyn_size)) = headers.iter().find(|h| h.0 == PT_DYNAMIC) else {
            return Some(dynamic);
        };
        let entries: Vec<(usize, usize)> = (dyn_off..dyn_off.saturating_add(dyn_size))
            .step_by(16)
            .map(|e| (u64_at(data, e), u64_at(data, e + 8)))
            .take_while(|e| e.0 != 0)
            .collect();
        // DT_STRTAB is an address: map it to a file offset through the PT_LOAD that holds it.
        let to_offset = |vaddr: usize| {
            headers
                .iter()
                .find(|&&(k, _, va, size)| k == PT_LOAD && (va..va.saturating_add(size)).contains(&vaddr))
                .map(|&(_, off, va, _)| vaddr - va + off)
        };
        let strtab = entries.iter().find(|e| e.0 == DT_STRTAB).and_then(|e| to_offset(e.1));
        let string = |at: usize| -> Option<String> {
            let start = strtab?.checked_add(at)?;
            let end = start + data.get(start..)?.iter().position(|&b| b == 0)?;
            Some(String::from_utf8_lossy(&data[start..end]).into_owned())
        };
        let list = |s: String| s.split(':').filter(|d| !d.is_empty()).map(String::from).collect::<Vec<_>>();
        for &(tag, value) in &entries {
            match tag {
                DT_NEEDED => dynamic.needed.extend(string(value)),
                DT_RPATH => dynamic.rpath.extend(string(value).map(list).unwrap_or_default()),
                DT_RUNPATH => dynamic.runpath.extend(string(value).map(list).unwrap_or_default()),
                DT_FLAGS_1 => dynamic.nodeflib = value & DF_1_NODEFLIB != 0,
                _ => {}
            }
        }
        Some(dynamic)
    }
}

/// Program headers of a 64-bit little-endian ELF: (type, file offset, vaddr, file size).
fn program_headers(data: &[u8]) -> Vec<(u32, usize, usize, usize)> {
    let (phoff, phentsize, phnum) = (u64_at(data, 0x20), u16_at(data, 0x36), u16_at(data, 0x38));
    (0..phnum)
        .map(|i| phoff.saturating_add(i * phentsize))
        .map(|ph| (u32_at(data, ph), u64_at(data, ph + 8), u64_at(data, ph + 16), u64_at(data, ph + 32)))
        .collect()
}

fn u16_at(data: &[u8], o: usize) -> usize {
    data.get(o..o + 2).map_or(0, |b| u16::from_le_bytes([b[0], b[1]]) as usize)
}

fn u32_at(data: &[u8], o: usize) -> u32 {
    data.get(o..o + 4).map_or(0, |b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
}

fn u64_at(data: &[u8], o: usize) -> usize {
    data.get(o..o + 8).map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
}

/// Whether the ELF file at `path` defines `symbol` among its dynamic symbols (a program that
/// carries its own malloc, which then no preloaded library can take the place of).
pub fn defines(path: &Path, symbol: &str) -> bool {
    use object::{Object as _, ObjectSymbol as _};
    let Ok(file) = fs::File::open(path) else { return false };
    let cache = object::ReadCache::new(file);
    let Ok(elf) = object::File::parse(&cache) else { return false };
    elf.dynamic_symbols().any(|s| s.is_definition() && s.name() == Ok(symbol))
}

/// The folders glibc searches last on x86-64 (Debian's multiarch ones first).
const DEFAULT_DIRS: &[&str] =
    &["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib"];

/// How one process's loader will look libraries up.
pub struct Search {
    /// The process's root, under which every absolute path is looked up.
    root: PathBuf,
    /// Its working folder, for relative paths (an LD_LIBRARY_PATH of `.` or `lib`).
    cwd: PathBuf,
    /// The executable's folder as the process sees it ($ORIGIN).
    origin: String,
    exe: Dynamic,
    library_path: Vec<String>,
    cache: Vec<(String, String)>,
    hwcaps: Vec<&'static str>,
}

impl Search {
    /// `exe_path`: the executable as the process names it (for $ORIGIN); `exe`: its dynamic
    /// section; `library_path`: LD_LIBRARY_PATH (empty for a secure exec, which ignores it).
    pub fn new(root: &Path, cwd: &Path, exe_path: &str, exe: Dynamic, library_path: &str) -> Search {
        let origin = Path::new(exe_path).parent().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
        // glibc splits LD_LIBRARY_PATH on ':' and ';'; an empty entry means the current folder.
        let library_path = if library_path.is_empty() {
            Vec::new()
        } else {
            library_path.split([':', ';']).map(|d| if d.is_empty() { "." } else { d }.to_string()).collect()
        };
        let cache = fs::read(root.join("etc/ld.so.cache")).ok().map(|d| ld_so_cache(&d)).unwrap_or_default();
        Search {
            root: root.to_path_buf(),
            cwd: cwd.to_path_buf(),
            origin,
            exe,
            library_path,
            cache,
            hwcaps: hwcaps_levels(),
        }
    }

    /// The file the loader maps for `name`, needed by the executable; None when it finds none.
    pub fn find(&self, name: &str) -> Option<PathBuf> {
        if name.contains('/') {
            return self.candidate(name);
        }
        let dirs = |list: &[String]| list.iter().map(|d| self.expand(d)).collect::<Vec<_>>();
        let mut search: Vec<String> = Vec::new();
        if self.exe.runpath.is_empty() {
            search.extend(dirs(&self.exe.rpath));
        }
        search.extend(self.library_path.clone());
        search.extend(dirs(&self.exe.runpath));
        for dir in &search {
            if let Some(found) = self.in_dir(dir, name) {
                return Some(found);
            }
        }
        if self.exe.nodeflib {
            return None;
        }
        if let Some(found) = self.cache.iter().filter(|(k, _)| k == name).find_map(|(_, v)| self.candidate(v)) {
            return Some(found);
        }
        DEFAULT_DIRS.iter().find_map(|dir| self.in_dir(dir, name))
    }

    /// `name` in `dir`, through the glibc-hwcaps subfolders first.
    fn in_dir(&self, dir: &str, name: &str) -> Option<PathBuf> {
        self.hwcaps
            .iter()
            .map(|level| format!("{dir}/glibc-hwcaps/{level}/{name}"))
            .chain(std::iter::once(format!("{dir}/{name}")))
            .find_map(|p| self.candidate(&p))
    }

    /// A path the process names, as memtrace opens it; only an x86-64 ELF file is taken, as
    /// the loader skips files of another class and goes on searching.
    fn candidate(&self, path: &str) -> Option<PathBuf> {
        let path = if let Some(abs) = path.strip_prefix('/') { self.root.join(abs) } else { self.cwd.join(path) };
        (path.is_file() && crate::target::check_elf(&path).is_ok()).then_some(path)
    }

    /// $ORIGIN, $LIB and $PLATFORM, as glibc expands them on x86-64 Debian.
    fn expand(&self, dir: &str) -> String {
        let mut out = dir.to_string();
        for (token, value) in
            [("ORIGIN", self.origin.as_str()), ("LIB", "lib/x86_64-linux-gnu"), ("PLATFORM", "x86_64")]
        {
            out = out.replace(&format!("${{{token}}}"), value).replace(&format!("${token}"), value);
        }
        out
    }
}

/// The (name, path) pairs of an /etc/ld.so.cache in glibc's format ("glibc-ld.so.cache1.1"),
/// x86-64 libraries only. Another format gives none: the default folders follow anyway.
fn ld_so_cache(data: &[u8]) -> Vec<(String, String)> {
    const MAGIC: &[u8] = b"glibc-ld.so.cache1.1";
    /// The header's size; each entry is 24 bytes: flags, key, value, osversion, hwcap.
    const HEADER: usize = 48;
    const X86_64_LIBC6: u32 = 0x0303;
    if !data.starts_with(MAGIC) {
        return Vec::new();
    }
    let count = u32_at(data, 20) as usize;
    let string = |at: u32| {
        let start = at as usize;
        let end = start + data.get(start..)?.iter().position(|&b| b == 0)?;
        Some(String::from_utf8_lossy(&data[start..end]).into_owned())
    };
    (0..count.min(1 << 20))
        .map(|i| HEADER + i * 24)
        .take_while(|&e| e + 24 <= data.len())
        .filter(|&e| u32_at(data, e) & 0xffff == X86_64_LIBC6)
        .filter_map(|e| Some((string(u32_at(data, e + 4))?, string(u32_at(data, e + 8))?)))
        .collect()
}

/// The glibc-hwcaps levels this CPU runs, best first (glibc 2.33+ looks there first).
fn hwcaps_levels() -> Vec<&'static str> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags").and_then(|r| r.split_once(':')).map(|(_, f)| f))
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let has = |need: &[&str]| need.iter().all(|f| flags.contains(f));
    let v2 = has(&["cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"]);
    let v3 = v2 && has(&["avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"]);
    let v4 = v3 && has(&["avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"]);
    [(v4, "x86-64-v4"), (v3, "x86-64-v3"), (v2, "x86-64-v2")].into_iter().filter(|l| l.0).map(|l| l.1).collect()
}

/// The environment of a process as the loader reads it: (LD_LIBRARY_PATH, LD_PRELOAD), both
/// empty for a secure exec (AT_SECURE), where the loader ignores them.
pub fn loader_env(pid: u32) -> Result<(String, String)> {
    let environ =
        fs::read(format!("/proc/{pid}/environ")).with_context(|| format!("cannot read /proc/{pid}/environ"))?;
    let var = |name: &[u8]| {
        environ
            .split(|&b| b == 0)
            .find_map(|v| v.strip_prefix(name))
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    };
    const AT_SECURE: u64 = 23;
    let auxv = fs::read(format!("/proc/{pid}/auxv")).unwrap_or_default();
    let word = |c: &[u8]| u64::from_ne_bytes(c.try_into().unwrap_or_default());
    if auxv.chunks_exact(16).any(|e| word(&e[..8]) == AT_SECURE && word(&e[8..]) != 0) {
        return Ok((String::new(), String::new()));
    }
    Ok((var(b"LD_LIBRARY_PATH="), var(b"LD_PRELOAD=")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_dynamic_section_of_a_system_program() {
        let sh = Dynamic::read(Path::new("/bin/sh")).unwrap();
        assert!(sh.interp.as_deref().is_some_and(|i| i.contains("ld-linux")), "{sh:?}");
        assert!(sh.needed.contains(&"libc.so.6".to_string()), "{sh:?}");
        assert!(sh.rpath.is_empty() && sh.runpath.is_empty(), "{sh:?}");
    }

    #[test]
    fn the_systems_cache_names_libc() {
        let cache = ld_so_cache(&fs::read("/etc/ld.so.cache").unwrap());
        assert!(cache.iter().any(|(k, v)| k == "libc.so.6" && v.ends_with("/libc.so.6")), "{cache:?}");
        assert!(ld_so_cache(b"ld.so-1.7.0").is_empty());
        assert!(ld_so_cache(b"glibc-ld.so.cache1.1\xff\xff\xff\xff").is_empty());
    }

    /// The loader's order: RPATH, then LD_LIBRARY_PATH, then RUNPATH, then the cache; RPATH
    /// is ignored when RUNPATH is present.
    #[test]
    fn searches_in_the_loaders_order() {
        let dir = std::env::temp_dir().join(format!("memtrace-loader-{}", std::process::id()));
        let libc = fs::read("/lib/x86_64-linux-gnu/libc.so.6").unwrap();
        for sub in ["rpath", "env", "runpath", "origin/lib"] {
            fs::create_dir_all(dir.join(sub)).unwrap();
            fs::write(dir.join(sub).join("libc.so.6"), &libc).unwrap();
        }
        // Not an ELF file: skipped, as the loader skips it.
        fs::create_dir_all(dir.join("junk")).unwrap();
        fs::write(dir.join("junk/libc.so.6"), b"not elf").unwrap();
        let at = |sub: &str| dir.join(sub).to_string_lossy().into_owned();
        let exe = |rpath: &[&str], runpath: &[&str]| Dynamic {
            rpath: rpath.iter().map(|s| s.to_string()).collect(),
            runpath: runpath.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let root = Path::new("/");
        let exe_path = format!("{}/origin/prog", dir.display());
        let found = |e: Dynamic, env: &str| Search::new(root, &dir, &exe_path, e, env).find("libc.so.6").unwrap();
        assert_eq!(found(exe(&[&at("junk"), &at("rpath")], &[]), &at("env")), dir.join("rpath/libc.so.6"));
        assert_eq!(found(exe(&[&at("rpath")], &[&at("runpath")]), &at("env")), dir.join("env/libc.so.6"));
        assert_eq!(found(exe(&[&at("rpath")], &[&at("runpath")]), ""), dir.join("runpath/libc.so.6"));
        assert_eq!(found(exe(&["$ORIGIN/lib"], &[]), ""), dir.join("origin/lib/libc.so.6"));
        assert_eq!(found(exe(&["${ORIGIN}/lib"], &[]), ""), dir.join("origin/lib/libc.so.6"));
        // A relative folder is the process's working folder's.
        assert_eq!(found(exe(&[], &[]), "junk:env"), dir.join("env/libc.so.6"));
        let system = found(exe(&[], &[]), "");
        assert!(system.starts_with("/lib/x86_64-linux-gnu") || system.starts_with("/usr/lib"), "{system:?}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
