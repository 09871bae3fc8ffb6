//! `cargo xtask setup`: make a fresh Debian machine able to build and test memtrace.
//!
//! Every step checks before it acts and prints `setup: <thing> ok` or
//! `setup: installing <thing>`, so running it again installs nothing.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::cmd;

/// Debian packages the build and the tests need (cc and g++ for the test programs, make for their
/// builds; qemu, cpio and xz for the VM suite's image, busybox comes from `apt-get download`).
/// libjemalloc2: memleak's test of a preloaded replacement allocator.
/// stress-ng: workloads the tests trace (faults under `--vm`).
/// libc6-dbg: names libc's local functions (`__libc_start_call_main`), which the unwind tests
/// look for at the root of each stack. python3.11: the unwind tests' interpreter (and its USDT
/// probes, probe's). systemtap-sdt-dev: <sys/sdt.h>, for mallocstat's program with glibc's probes.
/// golang-go: `go tool pprof`, which the pprof tests read memtrace's profiles with.
/// prometheus: the real server that scrapes `memtrace serve` in its test.
const APT_PACKAGES: &[&str] = &[
    "gcc",
    "g++",
    "libc6-dev",
    "libc6-dbg",
    "make",
    "qemu-system-x86",
    "cpio",
    "xz-utils",
    "libjemalloc2",
    "stress-ng",
    "python3.11",
    "systemtap-sdt-dev",
    "golang-go",
    "prometheus",
];

/// Programs and peers only `cargo xtask bench` runs (never the tests): the real workloads
/// (sqlite3, jq, redis with its benchmark client), heaptrack, and bcc's memleak.
const BENCH_PACKAGES: &[&str] = &["sqlite3", "jq", "redis-server", "redis-tools", "heaptrack", "bpfcc-tools"];

/// The static target memtrace is built for inside the VM.
const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

/// The bpf-linker release seen to build against rustc's own libLLVM (its `llvm-<major>`
/// feature matching rustc's LLVM: 22 for rustc 1.95), so that no system LLVM is needed.
const BPF_LINKER: &str = "bpf-linker@0.13.0";

const TRACEFS: &str = "/sys/kernel/tracing";

pub fn run() -> Result<()> {
    require_root()?;
    // Steps in dependency order; a new requirement (e.g. the VM suite's kernel) is one more line.
    apt_packages(APT_PACKAGES)?;
    step("nightly toolchain", nightly_present, install_nightly)?;
    step("rust-src (nightly)", rust_src_present, install_rust_src)?;
    step("bpf-linker", bpf_linker_works, install_bpf_linker)?;
    step("rust target x86_64-unknown-linux-musl", musl_present, install_musl)?;
    step("tracefs", tracefs_mounted, mount_tracefs)?;
    Ok(())
}

/// What the bench needs beyond the build: its workloads and peers. bcc also needs kernel headers
/// for the running kernel; when they cannot be set up, bcc's rows say why and the bench goes on.
pub fn bench() -> Result<()> {
    require_root()?;
    apt_packages(BENCH_PACKAGES)?;
    if let Err(e) = bcc_headers() {
        println!("setup: kernel headers for bcc not set up ({e:#}); bcc's rows will say what failed");
    }
    Ok(())
}

/// bcc compiles its programs against `/lib/modules/$(uname -r)/build`. Kernels without a
/// Debian headers package (this host's) get the newest Debian 6.1 headers linked there, which
/// is enough for bcc's user-space tools (its kprobe tools still cannot run without kprobes).
fn bcc_headers() -> Result<()> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")?.trim().to_string();
    let modules = Path::new("/lib/modules").join(&release);
    if modules.join("build").exists() {
        println!("setup: kernel headers for bcc ok");
        return Ok(());
    }
    println!("setup: installing kernel headers for bcc (none for {release}: linking Debian's)");
    let installed = newest_headers(fs::read_dir("/usr/src")?.filter_map(|e| e.ok()?.file_name().into_string().ok()));
    let name = match installed {
        Some(name) => name,
        None => {
            let found = cmd::stdout(cmd::new("apt-cache").args([
                "search",
                "--names-only",
                r"^linux-headers-[0-9.]+-[0-9]+-amd64$",
            ]))?;
            let name = newest_headers(found.lines().filter_map(|l| l.split_whitespace().next()).map(String::from))
                .context("apt-cache lists no linux-headers-*-amd64 package")?;
            apt_packages(&[name.as_str()])?;
            name
        }
    };
    let arch = Path::new("/usr/src").join(&name);
    let common = Path::new("/usr/src").join(format!("{}-common", name.trim_end_matches("-amd64")));
    if !common.is_dir() {
        bail!("{} has no {}", arch.display(), common.display());
    }
    fs::create_dir_all(&modules)?;
    symlink(&arch, modules.join("build"))?;
    if fs::symlink_metadata(modules.join("source")).is_err() {
        symlink(&common, modules.join("source"))?;
    }
    Ok(())
}

/// The newest `linux-headers-X.Y.Z-N-amd64` among `names` (not -rt, -cloud or -common).
fn newest_headers(names: impl Iterator<Item = String>) -> Option<String> {
    let numbers =
        |n: &str| -> Vec<u64> { n.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse().ok()).collect() };
    names
        .filter(|n| {
            n.strip_prefix("linux-headers-")
                .and_then(|v| v.strip_suffix("-amd64"))
                .is_some_and(|v| v.chars().all(|c| c.is_ascii_digit() || c == '.' || c == '-'))
        })
        .max_by_key(|n| numbers(n))
}

/// Runs one check-then-install step and re-checks, so a silent install failure still stops us.
fn step(thing: &str, present: fn() -> Result<bool>, install: fn() -> Result<()>) -> Result<()> {
    if present()? {
        println!("setup: {thing} ok");
        return Ok(());
    }
    println!("setup: installing {thing}");
    install().with_context(|| format!("installing {thing}"))?;
    if !present()? {
        bail!("{thing} is still missing after installing it");
    }
    Ok(())
}

fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("setup must run as root (it installs packages and mounts tracefs)");
    }
    Ok(())
}

/// Checks each package, then installs all missing ones with a single `apt-get update`.
fn apt_packages(packages: &[&str]) -> Result<()> {
    let mut missing = Vec::new();
    for &pkg in packages {
        if dpkg_installed(pkg) {
            println!("setup: {pkg} ok");
        } else {
            println!("setup: installing {pkg}");
            missing.push(pkg);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let apt_get = || {
        let mut c = cmd::new("apt-get");
        c.env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    cmd::run(apt_get().args(["update", "-q"]))?;
    cmd::run(apt_get().args(["install", "-y", "-q", "--no-install-recommends"]).args(&missing))?;
    if let Some(pkg) = missing.iter().find(|p| !dpkg_installed(p)) {
        bail!("{pkg} is still missing after apt-get install");
    }
    Ok(())
}

/// dpkg's status is "<want> <error> <state>"; only state `installed` means usable.
fn dpkg_installed(pkg: &str) -> bool {
    cmd::stdout(cmd::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_ok_and(|status| status.split_whitespace().last() == Some("installed"))
}

/// aya-build runs `rustup run nightly`, so the plain `nightly` channel must exist (not a dated one).
fn nightly_present() -> Result<bool> {
    let list = cmd::stdout(cmd::new("rustup").args(["toolchain", "list"]))
        .context("rustup is required (https://rustup.rs)")?;
    Ok(list
        .lines()
        .any(|line| line.strip_prefix("nightly-").is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))))
}

fn install_nightly() -> Result<()> {
    cmd::run(cmd::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))
}

/// `-Z build-std=core` for the BPF target compiles core from rust-src.
fn rust_src_present() -> Result<bool> {
    let list = cmd::stdout(cmd::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]))?;
    Ok(list.lines().any(|line| line == "rust-src" || line.starts_with("rust-src-")))
}

fn install_rust_src() -> Result<()> {
    cmd::run(cmd::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// Running it is the test: a toolchain update can move the libLLVM its rpath points at.
fn bpf_linker_works() -> Result<bool> {
    Ok(cmd::succeeds(cmd::new("bpf-linker").arg("--version")))
}

/// Builds bpf-linker against rustc's own libLLVM, so no system LLVM is needed.
fn install_bpf_linker() -> Result<()> {
    let sysroot = cmd::stdout(cmd::new("rustc").args(["--print", "sysroot"]))?;
    let llvm_dir = Path::new(sysroot.trim()).join("lib");
    let (llvm_lib, major) = find_libllvm(&llvm_dir)?;

    // llvm-sys looks for $LLVM_PREFIX/lib/libLLVM.so; a link to rustc's copy is all it needs.
    let prefix = cmd::root().join("target/xtask/llvm-prefix");
    let link = prefix.join("lib/libLLVM.so");
    fs::create_dir_all(prefix.join("lib"))?;
    if fs::symlink_metadata(&link).is_ok() {
        fs::remove_file(&link)?;
    }
    symlink(&llvm_lib, &link).with_context(|| format!("linking {} to {}", link.display(), llvm_lib.display()))?;

    cmd::run(
        cmd::cargo()
            .args(["install", BPF_LINKER, "--locked", "--force"])
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix)
            // The rpath lets bpf-linker find rustc's libLLVM without LD_LIBRARY_PATH.
            .env("RUSTFLAGS", format!("-C link-arg=-Wl,-rpath,{}", llvm_dir.display()))
            // Cargo prefers this over RUSTFLAGS, which would drop the rpath.
            .env_remove("CARGO_ENCODED_RUSTFLAGS"),
    )
}

/// Finds rustc's `libLLVM.so.<major>.<minor>-rust-...` and returns it with its major version.
fn find_libllvm(dir: &Path) -> Result<(PathBuf, u32)> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let name = entry?.file_name();
        let Some(version) = name.to_str().and_then(|n| n.strip_prefix("libLLVM.so.")) else {
            continue;
        };
        let major: String = version.chars().take_while(char::is_ascii_digit).collect();
        if let Ok(major) = major.parse() {
            return Ok((dir.join(&name), major));
        }
    }
    bail!("no libLLVM.so.<version> in {}: this rustc does not ship its LLVM as a shared library", dir.display())
}

/// The VM suite's memtrace is static (musl), so the initramfs needs no libraries.
fn musl_present() -> Result<bool> {
    let list = cmd::stdout(cmd::new("rustup").args(["target", "list", "--installed"]))?;
    Ok(list.lines().any(|line| line == MUSL_TARGET))
}

fn install_musl() -> Result<()> {
    cmd::run(cmd::new("rustup").args(["target", "add", MUSL_TARGET]))
}

fn tracefs_mounted() -> Result<bool> {
    Ok(Path::new(TRACEFS).join("events").is_dir())
}

fn mount_tracefs() -> Result<()> {
    cmd::run(cmd::new("mount").args(["-t", "tracefs", "nodev", TRACEFS]))
}

#[cfg(test)]
mod tests {
    #[test]
    fn bcc_gets_the_newest_plain_amd64_headers() {
        let names = [
            "linux-headers-6.1.0-9-amd64",
            "linux-headers-6.1.0-57-amd64",
            "linux-headers-6.1.0-57-common",
            "linux-headers-6.1.0-58-cloud-amd64",
            "linux-headers-6.1.0-58-rt-amd64",
            "linux-headers-6.1.0-10-amd64",
            "python3.11",
        ];
        let newest = super::newest_headers(names.iter().map(|n| n.to_string()));
        assert_eq!(newest.as_deref(), Some("linux-headers-6.1.0-57-amd64"));
    }
}
