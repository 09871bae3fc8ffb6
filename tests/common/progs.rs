//! Building the test programs of tests/progs. The tests build what they run as they go;
//! `cargo xtask vm-test` (which includes this file) builds them all on the host first, since
//! the VM has no compiler.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// How a test program is compiled.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Flavour {
    /// Unoptimised, so that each source call stays one call site, with frame pointers.
    Debug,
    /// Optimised without frame pointers, as distributions build: only DWARF call-frame
    /// information leads back through its calls.
    NoFramePointers,
    /// A static executable without symbols, as busybox is in many container images (C only).
    Static,
    /// As `Debug`, and the loader looks for libraries first in `lib/` beside the program:
    /// DT_RPATH `$ORIGIN/lib` (C only; `RPATH_PROGRAMS`).
    Rpath,
    /// The same through DT_RUNPATH, which comes after LD_LIBRARY_PATH.
    Runpath,
    /// As `NoFramePointers`, then its `.eh_frame` overwritten with bytes no unwinder can
    /// read (C only; `CORRUPT_PROGRAMS`).
    CorruptUnwind,
}

/// The programs also built with `Flavour::CorruptUnwind`.
const CORRUPT_PROGRAMS: &[&str] = &["corrupt_unwind"];

/// The programs also built with `Flavour::Rpath` and `Flavour::Runpath`.
const RPATH_PROGRAMS: &[&str] = &["leaky"];

/// The programs never built with `Flavour::Static`: own_malloc defines malloc and free, which
/// libc.a defines again in the same object as the rest of its allocator.
const NOT_STATIC: &[&str] = &["own_malloc"];

/// The extensions of the sources that are compiled.
const SOURCES: [&str; 3] = ["c", "cpp", "rs"];

/// Builds `tests/progs/<name>` into target/test-progs/<name> (target/test-progs/nofp/<name>
/// without frame pointers), unless the program there is newer than its source and was built
/// the same way. Each flavour has its own file, under the same name (a test's comm stays the
/// program's name): a test switching flavour neither rebuilds nor replaces the other's program.
pub fn build(repo: &Path, name: &str, flavour: Flavour) -> PathBuf {
    use Flavour::*;
    let dir = match flavour {
        Debug => repo.join("target/test-progs"),
        NoFramePointers => repo.join("target/test-progs/nofp"),
        Static => repo.join("target/test-progs/static"),
        Rpath => repo.join("target/test-progs/rpath"),
        Runpath => repo.join("target/test-progs/runpath"),
        CorruptUnwind => repo.join("target/test-progs/corrupt"),
    };
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(name);
    let src = |ext: &str| repo.join(format!("tests/progs/{name}.{ext}"));
    let ext = SOURCES
        .into_iter()
        .find(|ext| src(ext).exists())
        .unwrap_or_else(|| panic!("no tests/progs/{name}.c, .cpp or .rs"));
    let (compiler, flags): (&str, &[&str]) = match (ext, flavour) {
        ("c", Debug) => ("cc", &["-g", "-O0", "-fno-omit-frame-pointer"]),
        ("c", NoFramePointers) => ("cc", &["-g", "-O2", "-fomit-frame-pointer"]),
        ("c", Static) => ("cc", &["-O2", "-static", "-s"]),
        (_, Static) => panic!("tests/progs/{name}.{ext}: only C programs are built static"),
        ("c", Rpath) => {
            ("cc", &["-g", "-O0", "-fno-omit-frame-pointer", "-Wl,-rpath,$ORIGIN/lib", "-Wl,--disable-new-dtags"])
        }
        ("c", Runpath) => {
            ("cc", &["-g", "-O0", "-fno-omit-frame-pointer", "-Wl,-rpath,$ORIGIN/lib", "-Wl,--enable-new-dtags"])
        }
        (_, Rpath | Runpath) => panic!("tests/progs/{name}.{ext}: only C programs are built with a search path"),
        ("c", CorruptUnwind) => ("cc", &["-g", "-O2", "-fomit-frame-pointer"]),
        (_, CorruptUnwind) => panic!("tests/progs/{name}.{ext}: only C programs are built with a corrupt table"),
        ("cpp", Debug) => ("g++", &["-g", "-O0", "-fno-omit-frame-pointer"]),
        ("cpp", NoFramePointers) => ("g++", &["-g", "-O2", "-fomit-frame-pointer"]),
        (_, Debug) => ("rustc", &["-g", "-C", "opt-level=0", "-C", "force-frame-pointers=yes"]),
        (_, NoFramePointers) => ("rustc", &["-g", "-C", "opt-level=3", "-C", "force-frame-pointers=no"]),
    };
    let src = src(ext);
    let mut cmd = Command::new(compiler);
    cmd.args(flags).arg("-o").arg(&out).arg(&src);
    // The command beside the program: a program built the other way is rebuilt.
    let stamp = dir.join(format!("{name}.cmd"));
    let how = format!("{cmd:?}");
    let fresh = |p: &Path| p.metadata().and_then(|m| m.modified()).ok();
    let same_build = std::fs::read_to_string(&stamp).is_ok_and(|s| s == how);
    if !same_build || fresh(&out).is_none() || fresh(&out) < fresh(&src) {
        let status = cmd.status().unwrap_or_else(|e| panic!("cannot run {compiler} for {name}: {e}"));
        assert!(status.success(), "building {} failed", src.display());
        if flavour == CorruptUnwind {
            corrupt_eh_frame(&out);
        }
        std::fs::write(&stamp, how).unwrap();
    }
    out
}

/// Overwrites the `.eh_frame` section of the ELF file at `path` with 0xff bytes: its first
/// entry's length then says "64-bit length follows", and that length runs past the section.
fn corrupt_eh_frame(path: &Path) {
    let mut elf = std::fs::read(path).unwrap();
    let u16_at = |d: &[u8], o: usize| u16::from_le_bytes(d[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |d: &[u8], o: usize| u32::from_le_bytes(d[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |d: &[u8], o: usize| u64::from_le_bytes(d[o..o + 8].try_into().unwrap()) as usize;
    let (shoff, shentsize, shnum, shstrndx) =
        (u64_at(&elf, 0x28), u16_at(&elf, 0x3a), u16_at(&elf, 0x3c), u16_at(&elf, 0x3e));
    let section = |i: usize| shoff + i * shentsize;
    let names = u64_at(&elf, section(shstrndx) + 0x18);
    let eh_frame = (0..shnum)
        .map(section)
        .find(|&sh| elf[names + u32_at(&elf, sh)..].starts_with(b".eh_frame\0"))
        .unwrap_or_else(|| panic!("{} has no .eh_frame", path.display()));
    let (offset, size) = (u64_at(&elf, eh_frame + 0x18), u64_at(&elf, eh_frame + 0x20));
    elf[offset..offset + size].fill(0xff);
    std::fs::write(path, elf).unwrap();
}

/// How many libraries `dlopen_libs` builds.
pub const DLOPEN_LIBS: usize = 300;

/// The bytes `leak_K` of libleakK.so leaks (one malloc).
pub fn dlopen_leak_bytes(k: usize) -> u64 {
    1000 + k as u64
}

/// Whether libleakK.so is stripped, its `leak_K` leaking through a local function that has no
/// symbol left (a frame no tool can name).
pub fn dlopen_stripped(k: usize) -> bool {
    k % 50 == 49
}

/// target/test-progs/dlopen-libs/libleakK.so for K below `DLOPEN_LIBS`, each generated from
/// its own source: `leak_K` leaks `dlopen_leak_bytes(K)`, with frame pointers. A library
/// newer than its source is kept; the rest are built a few at a time.
pub fn dlopen_libs(repo: &Path) -> PathBuf {
    let dir = repo.join("target/test-progs/dlopen-libs");
    std::fs::create_dir_all(&dir).unwrap();
    let build = |k: usize| {
        let src = dir.join(format!("leak{k}.c"));
        let lib = dir.join(format!("libleak{k}.so"));
        let bytes = dlopen_leak_bytes(k);
        let body = if dlopen_stripped(k) {
            format!(
                "static __attribute__((noinline)) void *inner(void) {{ return malloc({bytes}); }}\n\
                 __attribute__((noinline)) void leak_{k}(void) {{ leak_{k}_sink = inner(); }}\n"
            )
        } else {
            format!("__attribute__((noinline)) void leak_{k}(void) {{ leak_{k}_sink = malloc({bytes}); }}\n")
        };
        let text = format!("#include <stdlib.h>\nvoid *volatile leak_{k}_sink;\n{body}");
        if std::fs::read_to_string(&src).ok().as_deref() != Some(text.as_str()) {
            std::fs::write(&src, &text).unwrap();
        }
        let modified = |p: &Path| p.metadata().and_then(|m| m.modified()).ok();
        if modified(&lib).is_none() || modified(&lib) < modified(&src) {
            let status = Command::new("cc")
                .args(["-shared", "-fPIC", "-g", "-O0", "-fno-omit-frame-pointer"])
                .args(dlopen_stripped(k).then_some("-s"))
                .arg("-o")
                .arg(&lib)
                .arg(&src)
                .status()
                .unwrap_or_else(|e| panic!("cannot run cc for {}: {e}", src.display()));
            assert!(status.success(), "building {} failed", src.display());
        }
    };
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()) * 2;
    std::thread::scope(|scope| {
        for w in 0..workers {
            scope.spawn(move || (w..DLOPEN_LIBS).step_by(workers).for_each(build));
        }
    });
    dir
}

/// The demo of `cargo xtask demo` (and of the README's first example): tests/progs/demo.c
/// into target/progs/demo, optimised a little and with frame pointers, unless the program
/// there is newer than its source.
pub fn demo(repo: &Path) -> PathBuf {
    let (src, out) = (repo.join("tests/progs/demo.c"), repo.join("target/progs/demo"));
    let fresh = |p: &Path| p.metadata().and_then(|m| m.modified()).ok();
    if fresh(&out).is_none() || fresh(&out) < fresh(&src) {
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        let mut cmd = Command::new("cc");
        cmd.args(["-g", "-O1", "-fno-omit-frame-pointer", "-o"]).arg(&out).arg(&src);
        let status = cmd.status().unwrap_or_else(|e| panic!("cannot run cc for the demo: {e}"));
        assert!(status.success(), "building {} failed", src.display());
    }
    out
}

/// Every program of tests/progs in every flavour, and the demo.
#[allow(dead_code, reason = "for xtask; the tests build one program at a time")]
pub fn build_all(repo: &Path) {
    dlopen_libs(repo);
    let mut names: Vec<String> = std::fs::read_dir(repo.join("tests/progs"))
        .unwrap()
        .filter_map(|e| {
            let path = e.ok()?.path();
            SOURCES.contains(&path.extension()?.to_str()?).then(|| path.file_stem()?.to_str().map(String::from))?
        })
        .collect();
    names.sort();
    demo(repo);
    for name in &names {
        // Their own flavour only: corrupt_unwind clobbers rbp, which a frame-pointer build
        // refuses ("bp cannot be used in 'asm' here").
        if CORRUPT_PROGRAMS.contains(&name.as_str()) {
            build(repo, name, Flavour::CorruptUnwind);
            continue;
        }
        for flavour in [Flavour::Debug, Flavour::NoFramePointers] {
            build(repo, name, flavour);
        }
        if repo.join(format!("tests/progs/{name}.c")).exists() && !NOT_STATIC.contains(&name.as_str()) {
            build(repo, name, Flavour::Static);
        }
        if RPATH_PROGRAMS.contains(&name.as_str()) {
            build(repo, name, Flavour::Rpath);
            build(repo, name, Flavour::Runpath);
        }
    }
}
