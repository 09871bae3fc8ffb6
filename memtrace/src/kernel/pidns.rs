//! memtrace's own pid namespace. The eBPF side reports pids as this namespace numbers them
//! (`current_pid_tgid` in memtrace-ebpf), so that they match memtrace's /proc and `-p`; a
//! memtrace in a container would otherwise get the host's pids and read the wrong /proc
//! entries. Tasks outside the namespace have no pid in it: programs skip them and count them.

use std::{
    os::unix::fs::MetadataExt as _,
    sync::{Mutex, OnceLock},
};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapData, PerCpuArray},
};
use memtrace_common::PidNs;

/// The inode of the initial pid namespace (PROC_PID_INIT_INO in include/linux/proc_ns.h).
const INIT_PID_NS_INO: u64 = 0xEFFF_FFFC;

/// memtrace's pid namespace for the eBPF side: `dev` 0 in the initial one, where the kernel's
/// global ids are already right and programs behave as they always did.
pub fn own() -> Result<PidNs> {
    let meta = std::fs::metadata("/proc/self/ns/pid").context("cannot read /proc/self/ns/pid")?;
    if meta.ino() == INIT_PID_NS_INO {
        return Ok(PidNs::default());
    }
    // bpf_get_ns_current_pid_tgid compares with the kernel's dev_t, not the one stat encodes.
    let (major, minor) = (libc::major(meta.dev()) as u64, libc::minor(meta.dev()) as u64);
    Ok(PidNs { dev: major << 20 | minor, ino: meta.ino() })
}

/// Whether pids in /proc are the ones of memtrace's namespace (a /proc mounted for another
/// namespace, as after `unshare --pid` without `--mount-proc`, shows other numbers).
fn proc_matches() -> bool {
    let seen = std::fs::read_link("/proc/self").ok().and_then(|p| p.to_str()?.parse::<u32>().ok());
    seen == Some(std::process::id())
}

/// Fails unless the eBPF side can name `pid`'s tasks: when memtrace runs in a pid namespace,
/// it sees only tasks whose own namespace is that one, not those of namespaces nested in it.
pub fn check_traceable(pid: u32) -> Result<()> {
    if current().dev == 0 {
        return Ok(());
    }
    let theirs = std::fs::metadata(format!("/proc/{pid}/ns/pid")).map(|m| m.ino()).ok();
    if theirs.is_some_and(|ino| ino != current().ino) {
        anyhow::bail!(
            "process {pid} runs in a pid namespace nested in memtrace's, where memtrace cannot follow its pids: run memtrace inside that namespace or in the host's"
        );
    }
    Ok(())
}

/// Whether memtrace runs in a pid namespace of its own (not the initial one). There the
/// kernel's fork tracepoint names children by pids memtrace cannot see.
pub fn in_own_namespace() -> bool {
    current().dev != 0
}

/// memtrace's namespace, looked up once (the loader borrows it until load).
fn current() -> &'static PidNs {
    static NS: OnceLock<PidNs> = OnceLock::new();
    NS.get_or_init(|| {
        own().unwrap_or_else(|e| {
            tracing::warn!("{e:#}: pids are reported as the initial pid namespace numbers them");
            PidNs::default()
        })
    })
}

/// Sets the namespace global of an object before load; every tool loads through `kernel::load`.
pub fn configure(loader: &mut EbpfLoader<'_>) {
    let ns = current();
    if ns.dev != 0 {
        tracing::info!("memtrace runs in a pid namespace: tasks outside it are not traced");
        if !proc_matches() {
            eprintln!(
                "memtrace: warning: /proc belongs to another pid namespace than memtrace: pids will not match; mount a /proc for this namespace (e.g. unshare --mount-proc)"
            );
        }
    }
    // Objects whose programs never read the current pid have no such global.
    loader.override_global(memtrace_common::names::PID_NS, ns, false);
}

/// The skip counters of the objects loaded, read once at exit by `report_outside`.
static OUTSIDE: Mutex<Vec<PerCpuArray<MapData, u64>>> = Mutex::new(Vec::new());

/// Keeps a handle on the object's skip counter (a second fd, so the tool keeps its own maps).
pub fn watch(bpf: &Ebpf) {
    if current().dev == 0 {
        return;
    }
    let Some(map) = bpf.map(memtrace_common::names::OUTSIDE_PID_NS) else { return };
    let data = match map {
        Map::PerCpuArray(data) => data.info().and_then(|info| MapData::from_id(info.id())),
        _ => return,
    };
    if let Ok(counter) = data.and_then(|d| PerCpuArray::try_from(Map::PerCpuArray(d))) {
        OUTSIDE.lock().unwrap_or_else(|e| e.into_inner()).push(counter);
    }
}

/// One line at exit when tasks outside memtrace's pid namespace were skipped.
pub fn report_outside() {
    let counters = OUTSIDE.lock().unwrap_or_else(|e| e.into_inner());
    let skipped: u64 =
        counters.iter().filter_map(|c| c.get(&0, 0).ok()).map(|per_cpu| per_cpu.iter().sum::<u64>()).sum();
    if skipped > 0 {
        eprintln!(
            "memtrace: note: {skipped} probe hits from processes outside memtrace's pid namespace were skipped (they have no pid here; run memtrace in the host's namespace to see them)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_initial_namespace_keeps_global_ids() {
        // Unit tests run on the host: its namespace is the initial one, as most users' is.
        let ns = own().unwrap();
        let ino = std::fs::metadata("/proc/self/ns/pid").unwrap().ino();
        assert_eq!(ns.dev == 0, ino == INIT_PID_NS_INO, "{ns:?}");
        assert!(proc_matches());
    }
}
