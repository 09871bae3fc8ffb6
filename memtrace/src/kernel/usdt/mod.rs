//! USDT probes (`<sys/sdt.h>`, SystemTap's statically defined tracing): listing a file's
//! probes, decoding their arguments, and attaching a uprobe program to one with its
//! semaphore counted by the kernel.
//!
//! A probe with a semaphore fires only while the semaphore is non-zero: the program skips
//! the work of preparing its arguments otherwise. The kernel keeps it counted for every
//! process that maps the file when the uprobe carries the semaphore's file offset
//! (`ref_ctr_offset`, Linux 4.20+). aya 0.14 cannot pass one, so the uprobe is opened here,
//! through the `uprobe` PMU, and the program attached with PERF_EVENT_IOC_SET_BPF.
//!
//! The program finds a probe's argument specs in a map under the probe's address in the
//! traced process (its instruction pointer): attach cookies would do without the map but
//! need 5.15+.

mod args;
mod notes;

use std::{
    ffi::CString,
    os::{
        fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::Path,
};

use anyhow::{Context as _, Result, anyhow, bail};
pub use args::ArgSpec;
use aya::{Ebpf, programs::UProbe};
use aya_obj::generated::{PERF_EVENT_IOC_ENABLE, PERF_EVENT_IOC_SET_BPF, perf_event_attr};
use memtrace_common::usdt::{MAX_ARGS, Spec};

use super::{UProbeLinkId, ensure_loaded, program, uprobes};
use crate::procfs;

/// One probe of a file.
#[derive(Clone, Debug)]
pub struct UsdtProbe {
    pub provider: String,
    pub name: String,
    /// Virtual address of the probe in the file.
    pub address: u64,
    /// Where the uprobe goes: the probe's offset in the file.
    pub file_offset: u64,
    /// Virtual address of the semaphore; 0 when the probe has none.
    pub semaphore: u64,
    /// The semaphore's offset in the file (the uprobe's reference counter); 0 when none.
    pub semaphore_offset: u64,
    /// The argument specs as the note writes them.
    pub args_text: String,
    /// The decoded arguments, or why one of them cannot be read.
    pub args: Result<Vec<ArgSpec>, String>,
}

impl UsdtProbe {
    /// `provider:name`, as bpftrace and memtrace name a probe.
    pub fn full_name(&self) -> String {
        format!("{}:{}", self.provider, self.name)
    }

    /// What the eBPF side needs to read the arguments, numbered `id`.
    pub fn spec(&self, id: u32) -> Result<Spec> {
        let args = self.args.as_ref().map_err(|why| anyhow!("{}: {why}", self.full_name()))?;
        let mut spec = Spec { id, count: args.len() as u32, ..Spec::default() };
        for (slot, a) in spec.args.iter_mut().zip(args.iter().take(MAX_ARGS)) {
            *slot = a.arg;
        }
        Ok(spec)
    }
}

/// Every USDT probe of `path`, sorted by provider, name and address. Empty when the file has
/// no `.note.stapsdt` (it was built without `<sys/sdt.h>` probes).
pub fn probes(path: &Path) -> Result<Vec<UsdtProbe>> {
    let found = notes::read(path)?;
    let mut probes = Vec::new();
    for n in &found.notes {
        let offset = |vaddr: u64| {
            found.file_offset(vaddr).with_context(|| {
                format!("{}: probe {}:{} at {vaddr:#x} is in no loadable segment", path.display(), n.provider, n.name)
            })
        };
        probes.push(UsdtProbe {
            file_offset: offset(n.address)?,
            semaphore_offset: if n.semaphore == 0 { 0 } else { offset(n.semaphore)? },
            provider: n.provider.clone(),
            name: n.name.clone(),
            address: n.address,
            semaphore: n.semaphore,
            args: args::parse_all(&n.args),
            args_text: n.args.clone(),
        });
    }
    probes.sort_by(|a, b| (&a.provider, &a.name, a.address).cmp(&(&b.provider, &b.name, b.address)));
    Ok(probes)
}

/// The probes of `file` whose provider is `provider` and whose name starts with `prefix`.
pub fn probes_named(file: &Path, provider: &str, prefix: &str) -> Result<Vec<UsdtProbe>> {
    Ok(probes(file)?.into_iter().filter(|p| p.provider == provider && p.name.starts_with(prefix)).collect())
}

/// Why `file` offers no `provider:prefix*` probes, in one line.
pub fn missing(file: &Path, provider: &str, prefix: &str) -> String {
    format!(
        "{} has no {provider}:{prefix}* USDT probes (it was built without them: Debian's glibc is, Ubuntu's and \
         Fedora's are not)",
        file.display()
    )
}

/// The probe's address in process `pid`, where its uprobe program sees its instruction
/// pointer: the file offset moved to where `pid` mapped that part of `target`.
pub fn address_in(pid: u32, target: &Path, probe: &UsdtProbe) -> Result<u64> {
    let meta = std::fs::metadata(target).with_context(|| format!("cannot read {}", target.display()))?;
    let dev = (libc::major(meta.dev()), libc::minor(meta.dev()));
    procfs::mapped_files(pid)?
        .iter()
        .find(|m| {
            m.inode == meta.ino()
                && m.dev == dev
                && m.offset <= probe.file_offset
                && probe.file_offset - m.offset < m.end - m.start
        })
        .map(|m| m.start + probe.file_offset - m.offset)
        .with_context(|| {
            format!("process {pid} does not map {} (where probe {} is)", target.display(), probe.full_name())
        })
}

/// Attaches uprobe program `prog` to `probe` of `target`, for process `pid` or all (None),
/// with the probe's semaphore counted while attached. Detached with the other uprobes.
pub fn attach(bpf: &mut Ebpf, prog: &str, target: &Path, probe: &UsdtProbe, pid: Option<u32>) -> Result<UProbeLinkId> {
    let up: &mut UProbe = program(bpf, prog)?.try_into()?;
    ensure_loaded(up, prog, |p| p.fd().is_ok(), UProbe::load)?;
    let prog_fd = up.fd()?.as_fd().as_raw_fd();
    let event = open_uprobe(target, probe.file_offset, probe.semaphore_offset, pid).map_err(|e| {
        let what = format!("attaching a uprobe to USDT probe {} in {}", probe.full_name(), target.display());
        match e.raw_os_error() {
            Some(libc::EINVAL) => anyhow!(
                "{what} failed (EINVAL): most likely another tracer (bcc, bpftrace, or a probe left by an earlier \
                 run) holds a uprobe at offset {:#x} {} (dmesg: ref_ctr_offset mismatch); stop it and retry",
                probe.file_offset,
                if probe.semaphore_offset == 0 {
                    "with a semaphore counter"
                } else {
                    "without this probe's semaphore counter"
                }
            ),
            _ => anyhow!(e).context(format!("{what} failed")),
        }
    })?;
    // SAFETY: the ioctls take the program's fd, or nothing, by value.
    unsafe {
        if libc::ioctl(event.as_raw_fd(), PERF_EVENT_IOC_SET_BPF as _, prog_fd) != 0
            || libc::ioctl(event.as_raw_fd(), PERF_EVENT_IOC_ENABLE as _, 0) != 0
        {
            let e = std::io::Error::last_os_error();
            bail!("attaching {prog} to USDT probe {} failed: {e}", probe.full_name());
        }
    }
    tracing::debug!(
        "{prog}: attached to USDT {} in {} at {:#x}",
        probe.full_name(),
        target.display(),
        probe.file_offset
    );
    Ok(uprobes::register_usdt(event))
}

/// Where the kernel takes a uprobe's reference-counter offset in `config`
/// (PERF_UPROBE_REF_CTR_OFFSET_SHIFT).
const REF_CTR_OFFSET_SHIFT: u32 = 32;

/// perf_event_open of the `uprobe` PMU at `offset` of `target`, counting the semaphore at
/// `ref_ctr_offset` (0: none).
fn open_uprobe(target: &Path, offset: u64, ref_ctr_offset: u64, pid: Option<u32>) -> std::io::Result<OwnedFd> {
    let pmu = std::fs::read_to_string("/sys/bus/event_source/devices/uprobe/type")?;
    let pmu: u32 = pmu.trim().parse().map_err(|_| std::io::Error::from_raw_os_error(libc::ENOENT))?;
    let path = CString::new(target.as_os_str().as_encoded_bytes())?;
    // SAFETY: perf_event_attr is plain data; all zero is "no options".
    let mut attr: perf_event_attr = unsafe { std::mem::zeroed() };
    attr.type_ = pmu;
    attr.size = size_of::<perf_event_attr>() as u32;
    attr.config = ref_ctr_offset << REF_CTR_OFFSET_SHIFT;
    attr.__bindgen_anon_3.config1 = path.as_ptr() as u64;
    attr.__bindgen_anon_4.config2 = offset;
    // As aya opens its uprobes: one process on any CPU, or every process (the probe then
    // fires whichever CPU runs it).
    let (pid, cpu) = match pid {
        Some(pid) => (pid as libc::pid_t, -1),
        None => (-1, 0),
    };
    const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
    // SAFETY: attr is a complete perf_event_attr of the size it states; path outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_perf_event_open, &attr as *const _, pid, cpu, -1, PERF_FLAG_FD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests;
