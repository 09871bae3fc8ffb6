//! What the VM images are made of: Debian packages fetched once into target/vm/pkg (kernels,
//! busybox), a static memtrace, and the zram modules with their dependencies.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cmd;
use crate::vm::vm_dir;

pub const BUSYBOX: &str = "busybox-static";
pub const MUSL: &str = "x86_64-unknown-linux-musl";
/// Kernel modules /init loads for zram, the tests' swap (their dependencies come along): lzo-rle is
/// zram's default compressor on 6.1, which asks for it by name rather than by symbol.
const MODULES: &[&str] = &["lzo-rle", "zram"];
/// Package-name prefixes of releases the host's apt sources need not list, with the suite they
/// come from: bullseye's 5.10 is the oldest kernel the suite boots, and the host is newer.
const OTHER_SUITES: &[(&str, &str)] = &[("linux-image-5.10.", "bullseye")];

/// Unpacks a Debian package under target/vm/pkg/<name>, downloading it only when not cached.
pub fn package(pattern: &str) -> Result<PathBuf> {
    let pkg_dir = vm_dir().join("pkg");
    fs::create_dir_all(&pkg_dir)?;
    let name = match cached(&pkg_dir, pattern)? {
        Some(name) => name,
        None => newest_available(pattern)?,
    };
    let dir = pkg_dir.join(&name);
    if dir.is_dir() {
        return Ok(dir);
    }
    let debs = vm_dir().join("deb");
    fs::create_dir_all(&debs)?;
    println!("vm-test: downloading {name}");
    cmd::run(apt("apt-get", pattern)?.args(["download", "-q"]).arg(&name).current_dir(&debs))?;
    let deb = find_file(&debs, |n| n.starts_with(&format!("{name}_")) && n.ends_with(".deb"))?;
    let tmp = pkg_dir.join(format!("{name}.partial"));
    let _ = fs::remove_dir_all(&tmp);
    cmd::run(cmd::new("dpkg").arg("-x").arg(&deb).arg(&tmp))?;
    fs::rename(&tmp, &dir)?;
    fs::remove_file(&deb)?;
    Ok(dir)
}

/// Whether `name` matches `pattern`, where one `*` stands for a run of digits.
fn matches(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((pre, post)) => name
            .strip_prefix(pre)
            .and_then(|rest| rest.strip_suffix(post))
            .is_some_and(|mid| !mid.is_empty() && mid.bytes().all(|b| b.is_ascii_digit())),
    }
}

/// The ABI number `*` stands for, to pick the newest.
fn abi(pattern: &str, name: &str) -> u64 {
    let pre = pattern.split('*').next().unwrap_or("");
    name[pre.len().min(name.len())..].chars().take_while(char::is_ascii_digit).collect::<String>().parse().unwrap_or(0)
}

fn cached(pkg_dir: &Path, pattern: &str) -> Result<Option<String>> {
    let mut names: Vec<String> = fs::read_dir(pkg_dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| matches(pattern, n))
        .collect();
    names.sort_by_key(|n| abi(pattern, n));
    Ok(names.pop())
}

/// The newest package apt knows that matches `pattern` (runs `apt-get update` if none does).
fn newest_available(pattern: &str) -> Result<String> {
    if !pattern.contains('*') {
        return Ok(pattern.to_string());
    }
    let prefix = pattern.split('*').next().unwrap_or("");
    for attempt in 0..2 {
        let list = cmd::stdout(apt("apt-cache", pattern)?.args(["pkgnames", prefix]))?;
        let mut names: Vec<&str> = list.lines().filter(|n| matches(pattern, n)).collect();
        names.sort_by_key(|n| abi(pattern, n));
        if let Some(name) = names.pop() {
            return Ok(name.to_string());
        }
        if attempt == 0 {
            cmd::run(apt("apt-get", pattern)?.args(["update", "-q"]))?;
        }
    }
    bail!("apt knows no package matching {pattern}: is a Debian mirror with it in sources.list?")
}

/// `apt-get` or `apt-cache` set up to find `pattern`: the host's own configuration, or, for a
/// suite in OTHER_SUITES, a private sources file and state under target/vm/apt/<suite>, so the
/// host's sources and lists stay as they are.
fn apt(program: &str, pattern: &str) -> Result<Command> {
    let mut command = cmd::new(program);
    let Some(&(_, suite)) = OTHER_SUITES.iter().find(|(prefix, _)| pattern.starts_with(prefix)) else {
        return Ok(command);
    };
    let dir = vm_dir().join("apt").join(suite);
    fs::create_dir_all(dir.join("lists/partial"))?;
    fs::create_dir_all(dir.join("cache/archives/partial"))?;
    let sources = dir.join("sources.list");
    let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
    fs::write(&sources, format!("deb [signed-by={keyring}] {}/debian {suite} main\n", debian_mirror()?))?;
    let opt = |key: &str, value: &Path| ["-o".to_string(), format!("{key}={}", value.display())];
    command
        .args(opt("Dir::Etc::sourcelist", &sources))
        .args(opt("Dir::Etc::sourceparts", Path::new("/dev/null")))
        .args(opt("Dir::State::Lists", &dir.join("lists")))
        .args(opt("Dir::Cache", &dir.join("cache")));
    Ok(command)
}

/// Scheme and host of the Debian mirror the host's apt uses, read at run time so that the
/// repository names no mirror: the first `URIs:` of debian.sources, else the first `deb` line.
fn debian_mirror() -> Result<String> {
    let read = |path| fs::read_to_string(path).unwrap_or_default();
    let deb822 = read("/etc/apt/sources.list.d/debian.sources");
    let one_line = read("/etc/apt/sources.list");
    mirror_of(&deb822, &one_line)
        .context("no Debian mirror in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list")
}

fn mirror_of(deb822: &str, one_line: &str) -> Option<String> {
    let from_deb822 = deb822.lines().filter_map(|l| l.trim().strip_prefix("URIs:")).flat_map(str::split_whitespace);
    let from_list = one_line
        .lines()
        .filter(|l| l.trim_start().starts_with("deb "))
        .filter_map(|l| l.split_whitespace().find(|w| w.contains("://")));
    let uri = from_deb822.chain(from_list).next()?;
    let (scheme, rest) = uri.split_once("://")?;
    let host = rest.split('/').next().filter(|h| !h.is_empty())?;
    Some(format!("{scheme}://{host}"))
}

pub fn find_file(dir: &Path, want: impl Fn(&str) -> bool) -> Result<PathBuf> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        if entry.file_name().to_str().is_some_and(&want) {
            return Ok(entry.path());
        }
    }
    bail!("no such file in {}", dir.display())
}

/// Finds `<module>.ko` (or `.ko.xz`) anywhere under the package's lib/modules.
fn find_module(dir: &Path, module: &str) -> Option<PathBuf> {
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() {
            if let Some(found) = find_module(&path, module) {
                return Some(found);
            }
        } else if [".ko", ".ko.xz"].iter().any(|ext| same_module(&name, &format!("{module}{ext}"))) {
            return Some(path);
        }
    }
    None
}

/// Copies `module` (plain, for busybox insmod) and, first, the modules it depends on into
/// `dir`, appending each to `order` once. A module built into the kernel is skipped.
fn add_module(kernel_pkg: &Path, module: &str, dir: &Path, order: &mut Vec<String>) -> Result<()> {
    if order.iter().any(|m| m == module) {
        return Ok(());
    }
    let Some(from) = find_module(&kernel_pkg.join("lib/modules"), module) else {
        if builtin(kernel_pkg, module) {
            return Ok(());
        }
        bail!("kernel package has no module {module}, and it is not built in");
    };
    let bytes = if from.extension().is_some_and(|e| e == "xz") {
        let out = cmd::new("xz").arg("-dc").arg(&from).output().context("xz is needed for .ko.xz modules")?;
        if !out.status.success() {
            bail!("xz could not unpack {}", from.display());
        }
        out.stdout
    } else {
        fs::read(&from)?
    };
    for dep in depends(&bytes) {
        add_module(kernel_pkg, &dep, dir, order)?;
    }
    fs::write(dir.join(format!("{module}.ko")), bytes)?;
    order.push(module.to_string());
    Ok(())
}

/// The `depends=` entry of a module's .modinfo section: names, with `_` as modules.dep spells them.
fn depends(module: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    let Some(at) = module.windows(key.len()).position(|w| w == key) else { return Vec::new() };
    let rest = &module[at + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end]).split(',').filter(|d| !d.is_empty()).map(str::to_string).collect()
}

/// Whether `modules.builtin` of the package lists `module` (built into the kernel image).
fn builtin(kernel_pkg: &Path, module: &str) -> bool {
    let Ok(versions) = fs::read_dir(kernel_pkg.join("lib/modules")) else { return false };
    versions.flatten().any(|v| {
        fs::read_to_string(v.path().join("modules.builtin")).is_ok_and(|list| {
            list.lines().any(|l| l.rsplit('/').next().is_some_and(|n| same_module(n, &format!("{module}.ko"))))
        })
    })
}

/// Module names treat `-` and `_` as the same character (lzo-rle is lzo_rle in depends=).
fn same_module(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes().zip(b.bytes()).all(|(x, y)| x == y || (x == b'-' || x == b'_') && (y == b'-' || y == b'_'))
}

/// memtrace for musl: static, so the initramfs needs no loader or libraries.
pub fn build_memtrace() -> Result<PathBuf> {
    cmd::run(cmd::cargo().args(["build", "--release", "-p", "memtrace", "--target", MUSL]))?;
    let bin = cmd::root().join(format!("target/{MUSL}/release/memtrace"));
    if has_interpreter(&bin)? {
        bail!("{} is dynamically linked; the VM has no libraries", bin.display());
    }
    // Running it here catches a binary that links but cannot start (wrong target, broken libc).
    cmd::stdout(cmd::new(&bin).arg("--version")).context("the static memtrace does not run")?;
    Ok(bin)
}

/// Whether an ELF64 file asks for a program interpreter (PT_INTERP), i.e. is dynamically linked.
fn has_interpreter(path: &Path) -> Result<bool> {
    let elf = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |o: usize| elf.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
    if elf.get(..5) != Some(b"\x7fELF\x02") {
        bail!("{} is not a 64-bit ELF file", path.display());
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        bail!("{}: truncated ELF header", path.display());
    };
    const PT_INTERP: u32 = 3;
    Ok((0..phnum as usize).any(|i| {
        let at = phoff as usize + i * phentsize as usize;
        elf.get(at..at + 4).is_some_and(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) == PT_INTERP)
    }))
}

/// Copies MODULES and their dependencies into `dir`, with `order`, the order /init loads them
/// in (dependencies first).
pub fn add_modules(kernel_pkg: &Path, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir)?;
    let mut order = Vec::new();
    for module in MODULES {
        add_module(kernel_pkg, module, dir, &mut order)?;
    }
    fs::write(dir.join("order"), order.join("\n") + "\n")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_patterns() {
        let p = "linux-image-6.1.0-*-cloud-amd64";
        assert!(matches(p, "linux-image-6.1.0-56-cloud-amd64"));
        assert!(!matches(p, "linux-image-6.1.0-56-cloud-amd64-dbg"));
        assert!(!matches(p, "linux-image-6.1.0--cloud-amd64"));
        assert_eq!(abi(p, "linux-image-6.1.0-56-cloud-amd64"), 56);
    }

    #[test]
    fn mirror_from_apt_sources() {
        let deb822 = "Types: deb\n# http://snapshot.example/archive\nURIs: http://mirror.example/debian\nSuites: x\n";
        assert_eq!(mirror_of(deb822, "").as_deref(), Some("http://mirror.example"));
        let list = "# deb http://old.example/debian x main\ndeb [arch=amd64] https://m.example/debian/ x main\n";
        assert_eq!(mirror_of("", list).as_deref(), Some("https://m.example"));
        assert_eq!(mirror_of("", ""), None);
    }

    #[test]
    fn module_dependencies() {
        let modinfo = b"\x7fELF...\0license=GPL\0depends=zsmalloc,lz4hc_compress\0vermagic=6.12\0";
        assert_eq!(depends(modinfo), ["zsmalloc", "lz4hc_compress"]);
        assert!(depends(b"\0depends=\0").is_empty());
        assert!(same_module("lzo-rle.ko", "lzo_rle.ko"));
        assert!(!same_module("lzo.ko", "lz4.ko"));
    }
}
