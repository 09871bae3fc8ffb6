//! Builds the eBPF objects (one per tracer) and leaves them in OUT_DIR for `include_bytes_aligned!`:
//! each twice, with the bpf_loop stack walker and, under OUT_DIR/no-bpf-loop, without it for
//! kernels before 5.17 (`kernel::Object` picks one at run time).
use std::{env, fs, path::PathBuf};

/// Where the objects built without the `bpf-loop` feature go.
const NO_BPF_LOOP: &str = "no-bpf-loop";

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf = manifest.join("../memtrace-ebpf").canonicalize()?;
    let common = manifest.join("../memtrace-common").canonicalize()?;
    // aya-build watches the eBPF crate; the shared types live in memtrace-common.
    println!("cargo:rerun-if-changed={}", common.display());
    println!("cargo:rerun-if-env-changed=MEMTRACE_EBPF_TOOLCHAIN");
    let toolchain = env::var("MEMTRACE_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".into());
    let root_dir = ebpf.to_str().ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", ebpf.display()))?;
    let build = |no_default_features| {
        aya_build::build_ebpf(
            [aya_build::Package { name: "memtrace-ebpf", root_dir, no_default_features, ..Default::default() }],
            aya_build::Toolchain::Custom(&toolchain),
        )
    };
    // aya-build copies every object to OUT_DIR/<tool>: build the reduced set first and move it
    // aside, so the full one lands where it always did. Both share one cargo target directory.
    build(true)?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let aside = out.join(NO_BPF_LOOP);
    fs::create_dir_all(&aside)?;
    for entry in fs::read_dir(&out)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            fs::rename(entry.path(), aside.join(entry.file_name()))?;
        }
    }
    build(false)?;
    // Last: the step above moves every file already in OUT_DIR aside.
    build_preload(&manifest)
}

/// memleak's in-process recorder: a shared object preloaded into the commands `-c` runs,
/// carried inside memtrace (written out at run time). Built without the C library, so it
/// loads under glibc and musl alike, whatever target memtrace itself is built for.
fn build_preload(manifest: &std::path::Path) -> anyhow::Result<()> {
    let src = manifest.join("preload/memtrace_preload.c");
    println!("cargo:rerun-if-changed={}", manifest.join("preload").display());
    println!("cargo:rerun-if-env-changed=MEMTRACE_PRELOAD_CC");
    let out = PathBuf::from(env::var("OUT_DIR")?).join("memtrace_preload.so");
    let cc = env::var("MEMTRACE_PRELOAD_CC").unwrap_or_else(|_| "cc".into());
    let status = std::process::Command::new(&cc)
        .args(["-O2", "-g0", "-fPIC", "-shared", "-nostdlib", "-fno-builtin", "-fno-stack-protector"])
        // Its frame pointer is how a call finds its caller's frame.
        .args(["-fno-omit-frame-pointer", "-fvisibility=hidden", "-ftls-model=initial-exec"])
        .args(["-Wall", "-Wextra", "-Werror", "-Wl,-soname,libmemtrace_preload.so", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .map_err(|e| anyhow::anyhow!("cannot run {cc} to build {}: {e} (install gcc)", src.display()))?;
    anyhow::ensure!(status.success(), "{cc} failed to build {}", src.display());
    Ok(())
}
