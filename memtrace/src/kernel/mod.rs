//! Everything that depends on the running kernel, in one place: tracefs and record layouts,
//! kallsyms, feature checks, loading objects and attaching programs with fallbacks.
//! Tools ask this module; none of them probes the kernel by itself.

pub mod btf;
pub mod cgroup;
mod container;
pub mod fentry;
pub mod kallsyms;
pub mod maps;
pub mod perf;
pub mod pidns;
pub mod placement;
pub mod tracefs;
mod uprobes;
pub mod usdt;
pub mod vmstat;

use std::path::Path;

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{Program, ProgramError, TracePoint, UProbe, uprobe::UProbeScope},
};
pub use uprobes::{UProbeLinkId, detach_all_fast, detach_later as detach_uprobes_later};

/// The running kernel's (major, minor) version.
pub fn release() -> Option<(u32, u32)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Whether the verifier knows `bpf_loop` (Linux 5.17, "bpf: Add bpf_loop helper"), which the
/// user-stack unwinder walks frames with.
pub fn has_bpf_loop() -> bool {
    release().is_some_and(|v| v >= (5, 17))
}

/// What tools that show user stacks lose on a kernel without `bpf_loop`, in one line; None
/// where it has it.
pub fn no_bpf_loop() -> Option<&'static str> {
    (!has_bpf_loop())
        .then_some("unwind tables need the bpf_loop helper (Linux 5.17+); user stacks use frame pointers only")
}

/// A tracer's eBPF object as build.rs left it. A tracer that walks user stacks has a second
/// build without the bpf_loop walker: kernels before 5.13 reject a program that so much as
/// names its callback, used or not.
pub struct Object {
    full: &'static [u8],
    without_bpf_loop: Option<&'static [u8]>,
}

impl Object {
    pub const fn new(full: &'static [u8]) -> Object {
        Object { full, without_bpf_loop: None }
    }

    pub const fn walking_user_stacks(full: &'static [u8], without_bpf_loop: &'static [u8]) -> Object {
        Object { full, without_bpf_loop: Some(without_bpf_loop) }
    }

    /// The build this kernel can load.
    pub fn for_this_kernel(&self) -> &'static [u8] {
        match self.without_bpf_loop {
            Some(reduced) if !has_bpf_loop() => reduced,
            _ => self.full,
        }
    }

    /// Whether the tool shows user stacks walked by the unwinder (and so loses the unwind
    /// tables without bpf_loop).
    pub fn walks_user_stacks(&self) -> bool {
        self.without_bpf_loop.is_some()
    }

    /// Every build, full first.
    #[cfg(test)]
    pub fn builds(&self) -> impl Iterator<Item = &'static [u8]> {
        std::iter::once(self.full).chain(self.without_bpf_loop)
    }
}

/// A tracer's `kernel::Object`, by its name in OUT_DIR; `walking_user_stacks` adds the build
/// without bpf_loop.
#[macro_export]
macro_rules! ebpf_object {
    ($name:literal) => {
        $crate::kernel::Object::new(aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/", $name)))
    };
    ($name:literal, walking_user_stacks) => {
        $crate::kernel::Object::walking_user_stacks(
            aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/", $name)),
            aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/no-bpf-loop/", $name)),
        )
    };
}

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
    lift_memlock();
    let mut loader = EbpfLoader::new();
    pidns::configure(&mut loader);
    cgroup::configure(&mut loader);
    configure(&mut loader);
    let bpf = loader.load(object).map_err(|e| {
        let hint = match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EPERM) => " (permission denied: run as root; kernel lockdown can also forbid BPF)",
            Some(libc::ENOSYS) => " (this kernel has no BPF syscall)",
            _ => "",
        };
        anyhow!(e).context(format!("loading eBPF maps failed{hint}"))
    })?;
    uprobes::prepare(&bpf, object);
    pidns::watch(&bpf);
    Ok(bpf)
}

/// Before 5.11 the kernel charges BPF maps to RLIMIT_MEMLOCK, summed over every process of
/// the user: 64 KiB by default, so maps still being freed from an earlier run fail the next
/// one with EPERM. Root may lift its own limit; later kernels charge the memory cgroup instead.
fn lift_memlock() {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: a valid rlimit read by the call; failure leaves the limit as it was.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}

fn program<'a>(bpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Program> {
    bpf.program_mut(name).ok_or_else(|| anyhow!("internal: no eBPF program {name} in the object"))
}

/// The kernel refused one of memtrace's own programs. Never a blind spot to count and go past:
/// whatever it was to see would be missing from every report, so callers fail on it.
#[derive(Debug)]
pub struct ProgramRejected(pub String);

impl std::fmt::Display for ProgramRejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the kernel rejected eBPF program {}", self.0)
    }
}

/// Loads a program into the kernel once, however many times it is attached.
fn ensure_loaded<P>(
    prog: &mut P,
    name: &str,
    fd: impl Fn(&P) -> bool,
    load: impl Fn(&mut P) -> Result<(), ProgramError>,
) -> Result<()> {
    if !fd(prog) {
        load(prog).map_err(|e| anyhow::Error::new(e).context(ProgramRejected(name.to_string())))?;
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
    let id = tp.attach(category, name).with_context(|| format!("attaching to tracepoint {category}:{name} failed"))?;
    // Held with the uprobes, to be detached with them at once at exit.
    if let Ok(link) = tp.take_link(id) {
        uprobes::register_tracepoint(link);
    }
    tracing::info!("{prog}: attached to tracepoint {category}:{name}");
    Ok(())
}

/// Why a uprobe could not be attached: the library lacks the symbol, or something worse.
pub enum UprobeError {
    NoSymbol,
    Other(anyhow::Error),
}

/// Attaches `prog` at `symbol`+`offset` in `target`, for one process or all (`pid` None):
/// through a uprobe_multi link where the kernel has them (they detach in a few ms at exit),
/// else a perf link. Entry probes should take their offset from `placement::Placement`;
/// return probes use 0.
pub fn attach_uprobe(
    bpf: &mut Ebpf,
    prog: &str,
    target: &Path,
    symbol: &str,
    offset: u64,
    pid: Option<u32>,
) -> Result<UProbeLinkId, UprobeError> {
    if let Some(id) = uprobes::attach_multi(prog, target, symbol, offset, pid) {
        return Ok(id);
    }
    let up: &mut UProbe = program(bpf, prog).and_then(|p| Ok(p.try_into()?)).map_err(UprobeError::Other)?;
    ensure_loaded(up, prog, |p| p.fd().is_ok(), UProbe::load).map_err(UprobeError::Other)?;
    let scope = match pid.and_then(std::num::NonZeroU32::new) {
        Some(pid) => UProbeScope::OneProcess(pid),
        None => UProbeScope::AllProcesses,
    };
    let location = aya::programs::uprobe::UProbeAttachLocation::SymbolOffset(symbol, offset);
    match up.attach(location, target, scope) {
        Ok(id) => {
            tracing::debug!("{prog}: attached to {symbol} in {}", target.display());
            let link = up.take_link(id).map_err(|e| UprobeError::Other(anyhow!(e)))?;
            Ok(uprobes::register_perf(link))
        }
        Err(ProgramError::UProbeError(aya::programs::uprobe::UProbeError::SymbolError { .. })) => {
            Err(UprobeError::NoSymbol)
        }
        Err(e) => {
            let e = anyhow!(e);
            // The kernel refuses a second uprobe at the same place whose reference-counter
            // offset differs (dmesg: "ref_ctr_offset mismatch"); bcc registers with a non-zero
            // one. It also keeps a detached uprobe while a thread has a return pending through
            // it, e.g. a process stopped inside malloc (seen on 6.18): that one outlives its tracer.
            let clash = e
                .chain()
                .any(|c| c.downcast_ref::<std::io::Error>().and_then(|io| io.raw_os_error()) == Some(libc::EINVAL));
            let hint = if clash {
                " (another tracer, such as bcc's memleak, probes this function in an incompatible way: stop it and retry; \
                 if none runs, a process stopped or blocked inside this function since an earlier trace keeps the kernel's \
                 old probe until it resumes)"
            } else {
                ""
            };
            Err(UprobeError::Other(
                e.context(format!("attaching a uprobe to {symbol} in {} failed{hint}", target.display())),
            ))
        }
    }
}

/// Attaches `prog` at byte `file_offset` of `target`, for one process or all (`pid` None): for
/// a function only a debug file names (a local symbol), which the caller found itself.
pub fn attach_uprobe_at(
    bpf: &mut Ebpf,
    prog: &str,
    target: &Path,
    file_offset: u64,
    pid: Option<u32>,
) -> Result<UProbeLinkId> {
    let up: &mut UProbe = program(bpf, prog)?.try_into()?;
    ensure_loaded(up, prog, |p| p.fd().is_ok(), UProbe::load)?;
    let scope = match pid.and_then(std::num::NonZeroU32::new) {
        Some(pid) => UProbeScope::OneProcess(pid),
        None => UProbeScope::AllProcesses,
    };
    let location = aya::programs::uprobe::UProbeAttachLocation::AbsoluteOffset(file_offset);
    let id = up
        .attach(location, target, scope)
        .with_context(|| format!("attaching a uprobe at {file_offset:#x} in {} failed", target.display()))?;
    tracing::debug!("{prog}: attached at {file_offset:#x} in {}", target.display());
    Ok(uprobes::register_perf(up.take_link(id)?))
}

/// Detaches one uprobe link. Each detach waits for grace periods (80 ms for a perf link here,
/// 25-70 ms for a uprobe_multi one), so callers detach only what they must; at exit,
/// `detach_all_fast` detaches everything at once. (`bpf` is unused: links live in `uprobes`.)
pub fn detach_uprobe(_bpf: &mut Ebpf, prog: &str, link: UProbeLinkId) -> Result<()> {
    if !uprobes::detach(link) {
        bail!("internal: detaching {prog}: no such uprobe link");
    }
    Ok(())
}

/// One probe of an attach point. Name lists hold alternatives, first present wins: kernels
/// rename functions and tracepoints (`swap_readpage` became `swap_read_folio`).
#[derive(Clone, Copy, Debug)]
pub enum Probe {
    Kprobe { prog: &'static str, funcs: &'static [&'static str] },
    Tracepoint { prog: &'static str, category: &'static str, names: &'static [&'static str] },
}

/// A way for a tool to see its event: probes that must all attach. Tools list theirs in
/// order of preference and `attach_preferred` takes the first this kernel supports.
#[derive(Clone, Copy, Debug)]
pub struct AttachPoint {
    /// What users see under -v and in `memtrace probe`, e.g. "kprobe oom_kill_process".
    pub label: &'static str,
    pub probes: &'static [Probe],
}

/// Whether the kernel can place kprobes (CONFIG_KPROBES and its perf PMU).
pub fn kprobes_available() -> bool {
    Path::new("/sys/bus/event_source/devices/kprobe/type").exists()
}

fn kallsyms() -> Option<&'static kallsyms::Kallsyms> {
    static KALLSYMS: std::sync::OnceLock<Option<kallsyms::Kallsyms>> = std::sync::OnceLock::new();
    KALLSYMS.get_or_init(|| kallsyms::Kallsyms::load().ok()).as_ref()
}

/// The first of `funcs` the running kernel has, or why none can be probed.
pub fn kernel_function(funcs: &[&'static str]) -> Result<&'static str, String> {
    if !kprobes_available() {
        return Err("this kernel has no kprobes (CONFIG_KPROBES is off)".into());
    }
    let syms = kallsyms().ok_or("cannot read /proc/kallsyms")?;
    funcs
        .iter()
        .copied()
        .find(|f| syms.contains(f))
        .ok_or_else(|| format!("this kernel has no function {}", funcs.join(" or ")))
}

/// The first of `names` under tracefs `category`, or why none exists.
pub fn tracepoint_name(category: &str, names: &[&'static str]) -> Result<&'static str, String> {
    names.iter().copied().find(|n| tracefs::exists(category, n)).ok_or_else(|| {
        let all: Vec<String> = names.iter().map(|n| format!("{category}:{n}")).collect();
        format!("this kernel has no tracepoint {}", all.join(" or "))
    })
}

/// Resolves every probe of `point` without attaching anything: the concrete targets, or why
/// this point cannot work here.
pub fn resolve(point: &AttachPoint) -> Result<Vec<(Probe, &'static str)>, String> {
    point
        .probes
        .iter()
        .map(|p| match *p {
            Probe::Kprobe { funcs, .. } => kernel_function(funcs).map(|f| (*p, f)),
            Probe::Tracepoint { category, names, .. } => tracepoint_name(category, names).map(|n| (*p, n)),
        })
        .collect()
}

/// Attaches the first of `points` that this kernel supports and returns its label; the
/// error names why each was unusable.
pub fn attach_preferred(bpf: &mut Ebpf, tool: &str, points: &[AttachPoint]) -> Result<&'static str> {
    let mut why = Vec::new();
    for point in points {
        let resolved = match resolve(point) {
            Ok(r) => r,
            Err(reason) => {
                tracing::info!("{tool}: not using {}: {reason}", point.label);
                why.push(format!("{}: {reason}", point.label));
                continue;
            }
        };
        for (probe, target) in resolved {
            match probe {
                Probe::Kprobe { prog, .. } => {
                    let kp: &mut aya::programs::KProbe = program(bpf, prog)?.try_into()?;
                    ensure_loaded(kp, prog, |p| p.fd().is_ok(), aya::programs::KProbe::load)?;
                    kp.attach(target, 0).with_context(|| format!("attaching a kprobe to {target} failed"))?;
                }
                Probe::Tracepoint { prog, category, .. } => attach_tracepoint(bpf, prog, category, target)?,
            }
        }
        tracing::info!("{tool}: using {}", point.label);
        return Ok(point.label);
    }
    bail!("{tool} cannot run on this kernel: {}", why.join("; "))
}
