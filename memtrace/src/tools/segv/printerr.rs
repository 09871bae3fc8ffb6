//! glibc's `malloc_printerr(const char *str)`: every heap check that fails calls it with the
//! message it prints before it aborts. A uprobe there hands the message to the SIGABRT that
//! follows. It is a local symbol, in libc's symbol table when libc is not stripped, else in
//! its debug file (Debian's libc6-dbg, found by build id).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use aya::Ebpf;
use object::{Object as _, ObjectSymbol as _};

use crate::{kernel, procfs};

const SYMBOL: &str = "malloc_printerr";

/// Where distributions keep the C library, for a system-wide trace.
const SYSTEM_LIBCS: &[&str] = &[
    "/lib/x86_64-linux-gnu/libc.so.6",
    "/usr/lib/x86_64-linux-gnu/libc.so.6",
    "/lib64/libc.so.6",
    "/usr/lib64/libc.so.6",
];

/// The glibc of `pid` (reached through its root, for a container), or the system's.
fn libc_of(pid: Option<u32>) -> Option<PathBuf> {
    if let Some(pid) = pid {
        let maps = procfs::mapped_files(pid).ok()?;
        let m = maps.iter().find(|m| m.path.rsplit('/').next().is_some_and(|n| n.starts_with("libc.so")))?;
        return procfs::reach(pid, m);
    }
    SYSTEM_LIBCS.iter().map(PathBuf::from).find(|p| p.exists())
}

/// malloc_printerr's offset in `libc`'s file, from its own symbols or its debug file.
fn file_offset(libc: &Path) -> Result<u64> {
    let data = std::fs::read(libc).with_context(|| format!("cannot read {}", libc.display()))?;
    let elf = object::File::parse(&*data).with_context(|| format!("{} is not ELF", libc.display()))?;
    let find = |file: &object::File| file.symbols().find(|s| s.name() == Ok(SYMBOL)).map(|s| s.address());
    let vaddr = match find(&elf) {
        Some(a) => a,
        None => {
            let Some(debug) = crate::symbolize::debug_file(&libc.to_string_lossy()) else {
                bail!("neither {} nor a debug file of it names {SYMBOL} (install libc6-dbg)", libc.display());
            };
            let bytes = std::fs::read(&debug)?;
            let dbg = object::File::parse(&*bytes)?;
            find(&dbg).with_context(|| format!("{} does not name {SYMBOL}", debug.display()))?
        }
    };
    let segments = crate::unwind::load_segments(&*data)?;
    let seg = segments
        .iter()
        .find(|s| s.vaddr <= vaddr && vaddr < s.vaddr + s.filesz)
        .with_context(|| format!("{SYMBOL} at {vaddr:#x} is in no segment of {}", libc.display()))?;
    Ok(vaddr - seg.vaddr + seg.offset)
}

/// Probes malloc_printerr in the libc of `pid` (or the system's): Ok(description) when in
/// place, Err(why) when the messages cannot be had (not glibc, no symbol): the caller says so.
pub fn attach(bpf: &mut Ebpf, pid: Option<u32>) -> Result<String> {
    let libc = libc_of(pid).context("no glibc found (the process maps none, or it is not glibc)")?;
    let offset = file_offset(&libc)?;
    kernel::attach_uprobe_at(bpf, "segv_printerr", &libc, offset, pid)?;
    Ok(format!("uprobe {SYMBOL} in {}", libc.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Debian's libc names it only in libc6-dbg's file, which `cargo xtask setup` installs.
    #[test]
    fn the_system_libc_has_malloc_printerr() {
        let Some(libc) = libc_of(None) else { return };
        let offset = file_offset(&libc).unwrap_or_else(|e| panic!("{e:#}"));
        assert!(offset > 0);
    }
}
