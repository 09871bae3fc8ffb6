//! Uprobe links, and detaching them all at once at exit.
//!
//! Closing a uprobe's perf event unregisters it and waits for grace periods while holding the
//! kernel's global `event_mutex`: about 80 ms per probe on this host (6.18), so memleak's 22
//! probes took 2.2 s to go, and closing 22 from 22 threads took as long (1.78 s, in C).
//! A uprobe_multi link (6.6+) waits outside that mutex: 22 such links closed from 22 threads
//! took 52 ms. So where the kernel has fixed uprobe_multi links, each program is loaded a second
//! time by hand (aya 0.14 cannot give a uprobe program that expected attach type) and attached
//! through them; elsewhere aya's perf links stay, and exit takes a grace period per probe.
//!
//! A process runs one tool, so the links live here, not in the tool: exit detaches them all
//! in parallel (`detach_all_fast`) without every tool carrying handles around.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    ffi::CString,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    sync::Mutex,
    time::Instant,
};

use aya::{Ebpf, maps::Map, programs::uprobe::UProbeLink};
use aya_obj::{
    Object, ProgramSection,
    generated::{BPF_F_SLEEPABLE, BPF_F_UPROBE_MULTI_RETURN, bpf_attach_type, bpf_cmd, bpf_insn, bpf_prog_type},
};

/// A uprobe attached by `kernel::attach_uprobe`; give it to `kernel::detach_uprobe`.
#[derive(Debug, PartialEq, Eq)]
pub struct UProbeLinkId(u64);

/// Dropping a link detaches its probe.
enum Link {
    Perf(#[expect(dead_code, reason = "held only to be dropped")] UProbeLink),
    Multi(#[expect(dead_code, reason = "held only to be dropped")] OwnedFd),
    /// A USDT probe's uprobe perf event, opened by `usdt` with its semaphore's counter.
    Usdt(#[expect(dead_code, reason = "held only to be dropped")] OwnedFd),
    /// A tracepoint's perf link: its detach waits for a grace period too (about 90 ms here),
    /// so it goes with the others, at once.
    Tracepoint(#[expect(dead_code, reason = "held only to be dropped")] aya::programs::trace_point::TracePointLink),
}

struct Registry {
    next: u64,
    links: BTreeMap<u64, Link>,
    multi: Option<Multi>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry { next: 0, links: BTreeMap::new(), multi: None });

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(super) fn register_perf(link: UProbeLink) -> UProbeLinkId {
    register(Link::Perf(link))
}

/// Keeps a USDT probe's perf event (its program attached) until detached.
pub(super) fn register_usdt(event: OwnedFd) -> UProbeLinkId {
    register(Link::Usdt(event))
}

/// Keeps a tracepoint's link until `detach_all_fast`.
pub(super) fn register_tracepoint(link: aya::programs::trace_point::TracePointLink) {
    register(Link::Tracepoint(link));
}

fn register(link: Link) -> UProbeLinkId {
    let mut r = registry();
    r.next += 1;
    let id = r.next;
    r.links.insert(id, link);
    UProbeLinkId(id)
}

/// Detaches one probe now (a grace period: tens of ms).
pub(super) fn detach(id: UProbeLinkId) -> bool {
    let link = registry().links.remove(&id.0);
    link.is_some()
}

/// Detaches `ids` on a thread of their own, all at once, and returns at once: for probes that
/// can no longer fire (their process's first thread is gone), whose grace periods nobody
/// should wait for.
pub fn detach_later(ids: Vec<UProbeLinkId>) {
    let links: Vec<Link> = {
        let mut r = registry();
        ids.iter().filter_map(|id| r.links.remove(&id.0)).collect()
    };
    if links.is_empty() {
        return;
    }
    let dropped = std::thread::Builder::new().name("detach".into()).spawn(move || drop_all(links));
    // Without a thread the links went with the closure: detached here, the slow way.
    drop(dropped);
}

/// Detaches every uprobe and tracepoint this process attached, all at once: the grace periods the kernel
/// waits for on each overlap instead of adding up. Call it after the final report.
pub fn detach_all_fast() {
    let links: Vec<Link> = std::mem::take(&mut registry().links).into_values().collect();
    if links.is_empty() {
        return;
    }
    let tracepoints = links.iter().filter(|l| matches!(l, Link::Tracepoint(_))).count();
    let (uprobes, started) = (links.len() - tracepoints, Instant::now());
    drop_all(links);
    let ms = started.elapsed().as_secs_f64() * 1e3;
    let counted = |n: usize, kind: &str| (n > 0).then(|| format!("{n} {kind}{}", if n == 1 { "" } else { "s" }));
    let what: Vec<String> =
        [counted(uprobes, "uprobe"), counted(tracepoints, "tracepoint")].into_iter().flatten().collect();
    tracing::info!("detached {} in {ms:.1} ms", what.join(" and "));
}

/// Drops each link on a thread of its own, and returns when all are gone.
fn drop_all(links: Vec<Link>) {
    std::thread::scope(|s| {
        for link in links {
            let kind = match link {
                Link::Multi(_) => "uprobe_multi",
                Link::Perf(_) => "perf uprobe",
                Link::Usdt(_) => "USDT uprobe",
                Link::Tracepoint(_) => "tracepoint",
            };
            let timed = move || {
                let t = Instant::now();
                drop(link);
                tracing::debug!("detached a {kind} link in {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
            };
            // Without a thread (none left?) the closure is dropped here: the link still goes.
            let _ = std::thread::Builder::new().name("detach".into()).spawn_scoped(s, timed);
        }
    });
}

/// What loading programs by hand needs: the object relocated against the maps aya created.
struct Multi {
    obj: Object,
    /// Duplicates of aya's map fds, which the relocated instructions name: they stay valid
    /// even after a tool takes a map out of `Ebpf` and drops it.
    _maps: Vec<OwnedFd>,
    /// The object's BTF, loaded: programs that pass callbacks (bpf_loop) need its func_info.
    btf: Option<OwnedFd>,
    loaded: HashMap<String, OwnedFd>,
    /// Cleared by the first failure to load or link: the kernel lacks or refuses the feature.
    usable: bool,
}

/// Whether to attach through uprobe_multi links. Kernels 6.6 to 6.9 filtered their pid by
/// thread instead of process (fixed in 6.10, "bpf: fix multi-uprobe PID filtering logic"),
/// which would miss every allocation made off the main thread, and a backport cannot be seen
/// from here: those kernels keep perf links. (On 6.18 four threads' 4,000 leaks counted
/// exactly either way.) `MEMTRACE_UPROBE_MULTI=0` forces the perf links (bench and tests).
fn multi_wanted() -> bool {
    if std::env::var_os("MEMTRACE_UPROBE_MULTI").is_some_and(|v| v == "0") {
        return false;
    }
    super::release().is_some_and(|v| v >= (6, 10))
}

/// Prepares `object`'s uprobe programs for uprobe_multi links, right after aya loaded it (all
/// its maps are still in `bpf`). Without the feature, or on any surprise, aya's path stays.
pub(super) fn prepare(bpf: &Ebpf, object: &[u8]) {
    if !multi_wanted() {
        return;
    }
    match relocate(bpf, object) {
        Ok(Some(multi)) => registry().multi = Some(multi),
        Ok(None) => {}
        Err(e) => tracing::info!("uprobe_multi links unavailable, using perf links: {e:#}"),
    }
}

fn relocate(bpf: &Ebpf, object: &[u8]) -> anyhow::Result<Option<Multi>> {
    let mut obj = Object::parse(object)?;
    let has_uprobes = obj
        .programs
        .values()
        .any(|p| matches!(p.section, ProgramSection::UProbe { .. } | ProgramSection::URetProbe { .. }));
    if !has_uprobes {
        return Ok(None);
    }
    // (name, a duplicate of aya's fd, the map's definition) for every map aya created.
    let mut maps = Vec::new();
    for (name, def) in &obj.maps {
        if let Some(map) = bpf.map(name) {
            maps.push((name.clone(), map_data(map).fd().as_fd().try_clone_to_owned()?, def.clone()));
        }
    }
    let text_sections: HashSet<usize> = obj.functions.keys().map(|(section, _)| *section).collect();
    obj.relocate_maps(maps.iter().map(|(n, fd, def)| (n.as_str(), fd.as_raw_fd(), def)), &text_sections)?;
    obj.relocate_calls(&text_sections)?;
    obj.sanitize_functions(aya::features());
    let btf = match aya::features().btf() {
        Some(features) => match obj.fixup_and_sanitize_btf(features)? {
            Some(btf) => Some(load_btf(&btf.to_bytes())?),
            None => None,
        },
        None => None,
    };
    let fds = maps.into_iter().map(|(_, fd, _)| fd).collect();
    Ok(Some(Multi { obj, _maps: fds, btf, loaded: HashMap::new(), usable: true }))
}

fn map_data(map: &Map) -> &aya::maps::MapData {
    use Map::*;
    match map {
        Array(d)
        | ArrayOfMaps(d)
        | BloomFilter(d)
        | CgroupArray(d)
        | CgroupStorage(d)
        | CgrpStorage(d)
        | CpuMap(d)
        | DevMap(d)
        | DevMapHash(d)
        | HashMap(d)
        | HashOfMaps(d)
        | InodeStorage(d)
        | LpmTrie(d)
        | LruHashMap(d)
        | PerCpuArray(d)
        | PerCpuCgroupStorage(d)
        | PerCpuHashMap(d)
        | PerCpuLruHashMap(d)
        | PerfEventArray(d)
        | ProgramArray(d)
        | Queue(d)
        | ReusePortSockArray(d)
        | RingBuf(d)
        | SockHash(d)
        | SockMap(d)
        | SkStorage(d)
        | Stack(d)
        | StackTraceMap(d)
        | Unsupported(d)
        | XskMap(d) => d,
    }
}

/// Attaches `prog` at `symbol`+`offset` of `target` through a uprobe_multi link. None: this
/// kernel or program cannot, use the perf path (which also reports a missing symbol).
pub(super) fn attach_multi(
    prog: &str,
    target: &Path,
    symbol: &str,
    offset: u64,
    pid: Option<u32>,
) -> Option<UProbeLinkId> {
    if !registry().multi.as_ref().is_some_and(|m| m.usable) {
        return None;
    }
    let file_offset = symbol_file_offset(target, symbol)? + offset;
    let mut r = registry();
    let multi = r.multi.as_mut().filter(|m| m.usable)?;
    match link_multi(multi, prog, target, file_offset, pid) {
        Ok(fd) => {
            drop(r);
            tracing::debug!("{prog}: attached to {symbol} in {} (uprobe_multi)", target.display());
            Some(register(Link::Multi(fd)))
        }
        Err(e) => {
            tracing::info!("{prog}: no uprobe_multi link ({e}); using perf links");
            multi.usable = false;
            None
        }
    }
}

fn link_multi(multi: &mut Multi, prog: &str, target: &Path, offset: u64, pid: Option<u32>) -> std::io::Result<OwnedFd> {
    let (ret, prog_fd) = match multi.loaded.get(prog) {
        Some(fd) => (is_return(&multi.obj, prog), fd.as_raw_fd()),
        None => {
            let fd = load(&multi.obj, multi.btf.as_ref(), prog)?;
            let raw = fd.as_raw_fd();
            multi.loaded.insert(prog.to_string(), fd);
            (is_return(&multi.obj, prog), raw)
        }
    };
    let path = CString::new(target.as_os_str().as_encoded_bytes())?;
    let offsets = [offset];
    let mut attr = [0u64; 16];
    // union bpf_attr, link_create: prog_fd, target_fd, attach_type, flags, then uprobe_multi's
    // path, offsets, ref_ctr_offsets, cookies, cnt, flags, pid.
    attr[0] = prog_fd as u32 as u64;
    attr[1] = bpf_attach_type::BPF_TRACE_UPROBE_MULTI as u64;
    attr[2] = path.as_ptr() as u64;
    attr[3] = offsets.as_ptr() as u64;
    attr[6] = 1 | if ret { (BPF_F_UPROBE_MULTI_RETURN as u64) << 32 } else { 0 };
    attr[7] = pid.unwrap_or(0) as u64;
    bpf(bpf_cmd::BPF_LINK_CREATE, &attr)
}

fn is_return(obj: &Object, prog: &str) -> bool {
    obj.programs.get(prog).is_some_and(|p| matches!(p.section, ProgramSection::URetProbe { .. }))
}

/// Loads `prog` with the expected attach type uprobe_multi links need.
fn load(obj: &Object, btf: Option<&OwnedFd>, prog: &str) -> std::io::Result<OwnedFd> {
    let not_found = || std::io::Error::new(std::io::ErrorKind::NotFound, format!("no program {prog}"));
    let p = obj.programs.get(prog).ok_or_else(not_found)?;
    let sleepable =
        matches!(p.section, ProgramSection::UProbe { sleepable: true } | ProgramSection::URetProbe { sleepable: true });
    let function = obj.functions.get(&p.function_key()).ok_or_else(not_found)?;
    let insns: &[bpf_insn] = &function.instructions;
    let mut attr = [0u64; 16];
    // union bpf_attr, prog load: prog_type, insn_cnt, insns, license, log fields,
    // kern_version, prog_flags, prog_name[16], prog_ifindex, expected_attach_type.
    attr[0] = bpf_prog_type::BPF_PROG_TYPE_KPROBE as u64 | (insns.len() as u64) << 32;
    attr[1] = insns.as_ptr() as u64;
    attr[2] = p.license.as_ptr() as u64;
    attr[5] = p.kernel_version.unwrap_or(0) as u64 | if sleepable { (BPF_F_SLEEPABLE as u64) << 32 } else { 0 };
    let mut name = [0u8; 16];
    for (d, s) in name.iter_mut().zip(prog.bytes().take(15)) {
        *d = s;
    }
    attr[6] = u64::from_ne_bytes(name[..8].try_into().expect("8 bytes"));
    attr[7] = u64::from_ne_bytes(name[8..].try_into().expect("8 bytes"));
    attr[8] = (bpf_attach_type::BPF_TRACE_UPROBE_MULTI as u64) << 32;
    // prog_btf_fd, func_info_rec_size; func_info; func_info_cnt: what the relocation linked in.
    let func_info = &function.func_info.func_info;
    if let Some(btf) = btf.filter(|_| !func_info.is_empty()) {
        attr[9] = btf.as_raw_fd() as u64 | (size_of::<aya_obj::generated::bpf_func_info>() as u64) << 32;
        attr[10] = func_info.as_ptr() as u64;
        attr[11] = func_info.len() as u64;
    }
    bpf(bpf_cmd::BPF_PROG_LOAD, &attr)
}

/// BPF_BTF_LOAD of a raw BTF blob.
fn load_btf(raw: &[u8]) -> std::io::Result<OwnedFd> {
    let mut attr = [0u64; 16];
    // union bpf_attr, btf load: btf (pointer), btf_log_buf, btf_size, btf_log_size, level.
    attr[0] = raw.as_ptr() as u64;
    attr[2] = raw.len() as u64;
    bpf(bpf_cmd::BPF_BTF_LOAD, &attr)
}

fn bpf(cmd: bpf_cmd, attr: &[u64; 16]) -> std::io::Result<OwnedFd> {
    // SAFETY: attr is a zero-padded bpf_attr for `cmd`; the pointers in it outlive the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd as libc::c_int, attr.as_ptr(), size_of_val(attr)) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Where `symbol` starts in `target`'s file, as uprobe_multi links take it.
fn symbol_file_offset(target: &Path, symbol: &str) -> Option<u64> {
    use blazesym::inspect::{
        Inspector,
        source::{Elf, Source},
    };
    thread_local! {
        static INSPECTOR: Inspector = Inspector::new();
    }
    let mut elf = Elf::new(target);
    elf.debug_syms = false;
    INSPECTOR.with(|i| i.lookup(&Source::Elf(elf), &[symbol]).ok()?.first()?.first()?.file_offset)
}
