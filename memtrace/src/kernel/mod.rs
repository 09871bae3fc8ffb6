//! Everything that depends on the running kernel, in one place: tracefs and record layouts,
//! kallsyms, feature checks, loading objects and attaching programs with fallbacks.
//! Tools ask this module; none of them probes the kernel by itself.

pub mod kallsyms;
pub mod tracefs;

use std::path::Path;

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{Program, ProgramError, TracePoint, UProbe, uprobe::UProbeScope},
};

/// eBPF needs CAP_BPF and CAP_PERFMON; say so before anything else fails less clearly.
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("must run as root: loading eBPF programs needs CAP_BPF and CAP_PERFMON (try sudo)");
    }
    Ok(())
}

/// Loads an embedded object after `configure` has set its globals and map sizes.
pub fn load<'a>(object: &'static [u8], configure: impl FnOnce(&mut EbpfLoader<'a>)) -> Result<Ebpf> {
    if object.is_empty() {
        bail!("this memtrace was built without its eBPF objects (AYA_BUILD_SKIP): rebuild it");
    }
    let mut loader = EbpfLoader::new();
    configure(&mut loader);
    loader.load(object).map_err(|e| {
        let hint = match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EPERM) => " (permission denied: run as root; kernel lockdown can also forbid BPF)",
            Some(libc::ENOSYS) => " (this kernel has no BPF syscall)",
            _ => "",
        };
        anyhow!(e).context(format!("loading eBPF maps failed{hint}"))
    })
}

fn program<'a>(bpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Program> {
    bpf.program_mut(name).ok_or_else(|| anyhow!("internal: no eBPF program {name} in the object"))
}

/// Loads a program into the kernel once, however many times it is attached.
fn ensure_loaded<P>(
    prog: &mut P,
    name: &str,
    fd: impl Fn(&P) -> bool,
    load: impl Fn(&mut P) -> Result<(), ProgramError>,
) -> Result<()> {
    if !fd(prog) {
        load(prog).with_context(|| format!("the kernel rejected eBPF program {name}"))?;
    }
    Ok(())
}

/// Attaches `prog` to tracepoint `category:name`, failing with the missing tracepoint's name.
pub fn attach_tracepoint(bpf: &mut Ebpf, prog: &str, category: &str, name: &str) -> Result<()> {
    if !tracefs::exists(category, name) {
        bail!("this kernel has no tracepoint {category}:{name}");
    }
    let tp: &mut TracePoint = program(bpf, prog)?.try_into()?;
    ensure_loaded(tp, prog, |p| p.fd().is_ok(), TracePoint::load)?;
    tp.attach(category, name).with_context(|| format!("attaching to tracepoint {category}:{name} failed"))?;
    tracing::info!("{prog}: attached to tracepoint {category}:{name}");
    Ok(())
}

/// Attaches `prog` to the first of `candidates` that this kernel has (tracepoints get
/// renamed across versions) and returns the one it chose.
pub fn attach_first_tracepoint<'c>(
    bpf: &mut Ebpf,
    prog: &str,
    candidates: &[(&'c str, &'c str)],
) -> Result<(&'c str, &'c str)> {
    for &(category, name) in candidates {
        if tracefs::exists(category, name) {
            attach_tracepoint(bpf, prog, category, name)?;
            return Ok((category, name));
        }
    }
    let names: Vec<String> = candidates.iter().map(|(c, n)| format!("{c}:{n}")).collect();
    bail!("this kernel has none of the tracepoints {}", names.join(", "))
}

/// Why a uprobe could not be attached: the library lacks the symbol, or something worse.
pub enum UprobeError {
    NoSymbol,
    Other(anyhow::Error),
}

/// Attaches `prog` at `symbol` in `target`, for one process or all (`pid` None).
pub fn attach_uprobe(
    bpf: &mut Ebpf,
    prog: &str,
    target: &Path,
    symbol: &str,
    pid: Option<u32>,
) -> Result<(), UprobeError> {
    let up: &mut UProbe = program(bpf, prog).and_then(|p| Ok(p.try_into()?)).map_err(UprobeError::Other)?;
    ensure_loaded(up, prog, |p| p.fd().is_ok(), UProbe::load).map_err(UprobeError::Other)?;
    let scope = match pid.and_then(std::num::NonZeroU32::new) {
        Some(pid) => UProbeScope::OneProcess(pid),
        None => UProbeScope::AllProcesses,
    };
    match up.attach(symbol, target, scope) {
        Ok(_) => {
            tracing::debug!("{prog}: attached to {symbol} in {}", target.display());
            Ok(())
        }
        Err(ProgramError::UProbeError(aya::programs::uprobe::UProbeError::SymbolError { .. })) => {
            Err(UprobeError::NoSymbol)
        }
        Err(e) => Err(UprobeError::Other(
            anyhow!(e).context(format!("attaching a uprobe to {symbol} in {} failed", target.display())),
        )),
    }
}
