//! Builds the eBPF objects (one per tracer) and leaves them in OUT_DIR for `include_bytes_aligned!`.
use std::{env, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf = manifest.join("../memtrace-ebpf").canonicalize()?;
    let common = manifest.join("../memtrace-common").canonicalize()?;
    // aya-build watches the eBPF crate; the shared types live in memtrace-common.
    println!("cargo:rerun-if-changed={}", common.display());
    println!("cargo:rerun-if-env-changed=MEMTRACE_EBPF_TOOLCHAIN");
    let toolchain = env::var("MEMTRACE_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".into());
    let root_dir = ebpf.to_str().ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", ebpf.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "memtrace-ebpf", root_dir, ..Default::default() }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}
