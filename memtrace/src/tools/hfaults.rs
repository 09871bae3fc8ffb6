//! hfaults: hugetlb page faults per process and per mapped file (like bpftrace's hfaults.bt).
//! A kprobe on hugetlb_fault where the kernel has kprobes; otherwise user page faults
//! (exceptions:page_fault_user) inside the hugetlb mappings found in /proc/PID/smaps.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    fs,
    time::Duration,
};

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, MapData};
use memtrace_common::hfaults::{Event, KernelOffsets, MAX_RANGES, Ranges, SRC_KPROBE};
use serde::Serialize;

use crate::{
    kernel::{self, AttachPoint, Probe, btf, tracefs::Format},
    output,
    tools::{self, CommonArgs, c_str, read_event},
};

const OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/hfaults"));

const KPROBE: &str = "kprobe hugetlb_fault";
pub const ATTACH: &[AttachPoint] = &[
    AttachPoint { label: KPROBE, probes: &[Probe::Kprobe { prog: "hfaults_kprobe", funcs: &["hugetlb_fault"] }] },
    AttachPoint {
        label: "tracepoint exceptions:page_fault_user in hugetlb ranges",
        probes: &[
            Probe::Tracepoint { prog: "hfaults_user_fault", category: "exceptions", names: &["page_fault_user"] },
            Probe::Tracepoint { prog: "hfaults_mmap_enter", category: "syscalls", names: &["sys_enter_mmap"] },
            Probe::Tracepoint { prog: "hfaults_mmap_exit", category: "syscalls", names: &["sys_exit_mmap"] },
        ],
    },
];

/// Count hugetlb page faults per process and per mapped file.
#[derive(clap::Args, Debug)]
#[command(after_help = "Without kprobes, faults are kept when they land in a hugetlb mapping: MAP_HUGETLB mmaps are \
                        seen as they return; other hugetlb mappings (hugetlbfs files, SysV SHM_HUGETLB) are found by \
                        rescanning /proc/PID/smaps every second, so their faults in the first second can be missed.")]
pub struct Args {
    /// Seconds between reports (default: one report at the end).
    pub interval: Option<u64>,
    /// Number of reports, then exit.
    pub count: Option<u64>,
    #[command(flatten)]
    pub common: CommonArgs,
}

impl Args {
    /// Everything that can be checked before loading anything (and without root).
    pub fn validate(&self) -> Result<()> {
        if let Some(secs) = self.interval {
            tools::check::interval(secs)?;
        }
        tools::check::count(self.count)?;
        self.common.validate()
    }
}

pub async fn run(args: Args) -> Result<()> {
    kernel::require_root()?;
    let mut signals = tools::Signals::catch()?;
    let filter = args.common.filter()?;
    let offsets = offsets();
    let mut bpf = kernel::load(OBJECT, |loader| {
        loader.override_global("FILTER", &filter, true).override_global("OFFSETS", &offsets, true);
    })?;
    let how = kernel::attach_preferred(&mut bpf, "hfaults", ATTACH)?;
    let ranges = if how == KPROBE {
        None
    } else {
        Some(HashMap::try_from(bpf.take_map("RANGES").context("internal: no map RANGES")?)?)
    };
    let mut state = State {
        args: &args,
        ranges,
        procs: BTreeMap::new(),
        files: BTreeMap::new(),
        known: StdHashMap::new(),
        ticks: 0,
        total: 0,
    };
    state.rescan()?;
    // The tick rescans mappings (fallback) every second; reports come every `interval` ticks.
    let max_ticks = args.count.zip(args.interval).map(|(c, i)| c * i);
    let ready = format!("tracing hugetlb page faults ({how})");
    tools::stream(
        &mut bpf,
        "hfaults",
        &args.common,
        &mut signals,
        Some(Duration::from_secs(1)),
        max_ticks,
        &ready,
        &mut state,
    )
    .await?;
    Ok(())
}

/// BTF offsets for the kprobe's file names; without BTF the kprobe still counts, unnamed.
fn offsets() -> KernelOffsets {
    let tp = |cat: &str, name: &str, field: &str| Format::read(cat, name).and_then(|f| f.offset(field)).unwrap_or(0);
    let fallback = KernelOffsets {
        tp_address: tp("exceptions", "page_fault_user", "address"),
        mmap_len: tp("syscalls", "sys_enter_mmap", "len"),
        mmap_flags: tp("syscalls", "sys_enter_mmap", "flags"),
        mmap_ret: tp("syscalls", "sys_exit_mmap", "ret"),
        ..KernelOffsets::default()
    };
    let read = || -> Result<KernelOffsets> {
        Ok(KernelOffsets {
            vm_start: btf::member_offset("vm_area_struct", "vm_start")?,
            vm_file: btf::member_offset("vm_area_struct", "vm_file")?,
            f_path_dentry: btf::member_offset("file", "f_path.dentry")?,
            d_name_name: btf::member_offset("dentry", "d_name.name")?,
            valid: 1,
            ..fallback
        })
    };
    read().unwrap_or_else(|e| {
        tracing::info!("hfaults: no file names: {e:#}");
        fallback
    })
}

/// One hugetlb mapping of a process: where it is and what it maps.
#[derive(Clone, Debug, PartialEq)]
struct Mapping {
    start: u64,
    end: u64,
    file: String,
}

/// Hugetlb mappings in a /proc/PID/smaps text: those whose KernelPageSize is not 4 kB.
fn hugetlb_mappings(smaps: &str) -> Vec<Mapping> {
    let mut out = Vec::new();
    let mut current: Option<Mapping> = None;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16)) else {
                continue;
            };
            let file = words.nth(4).map(|_| line.split_whitespace().skip(5).collect::<Vec<_>>().join(" "));
            current = Some(Mapping { start, end, file: file.unwrap_or_default() });
        } else if first == "KernelPageSize:" && words.next() != Some("4") {
            out.extend(current.take());
        }
    }
    out
}

/// A mapping's display name: the file's base name, as the kprobe's dentry name shows it.
fn short_name(path: &str) -> String {
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    path.rsplit('/').next().unwrap_or(path).to_string()
}

struct State<'a> {
    args: &'a Args,
    /// The fallback's ranges map; None with the kprobe.
    ranges: Option<HashMap<MapData, u32, Ranges>>,
    procs: BTreeMap<u32, (String, u64)>,
    files: BTreeMap<String, u64>,
    /// Hugetlb mappings per pid as of the last rescan: names faults of processes gone since.
    known: StdHashMap<u32, Vec<Mapping>>,
    ticks: u64,
    total: u64,
}

#[derive(Serialize)]
struct ProcRow<'a> {
    pid: u32,
    comm: &'a str,
    faults: u64,
}

#[derive(Serialize)]
struct FileRow<'a> {
    file: &'a str,
    faults: u64,
}

impl State<'_> {
    /// Fallback: (re)lists the hugetlb ranges of the traced process, or of every process.
    fn rescan(&mut self) -> Result<()> {
        let Some(map) = self.ranges.as_mut() else { return Ok(()) };
        let pids: Vec<u32> = match self.args.common.pid {
            Some(pid) => vec![pid],
            None => fs::read_dir("/proc")?.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect(),
        };
        let mut seen = StdHashMap::new();
        for pid in pids {
            let Ok(smaps) = fs::read_to_string(format!("/proc/{pid}/smaps")) else { continue };
            let maps = hugetlb_mappings(&smaps);
            if maps.is_empty() {
                continue;
            }
            let mut ranges = Ranges::default();
            for (i, m) in maps.iter().take(MAX_RANGES).enumerate() {
                ranges.start[i] = m.start;
                ranges.end[i] = m.end;
            }
            map.insert(pid, ranges, 0)?;
            seen.insert(pid, maps);
        }
        let stale: Vec<u32> = map.keys().filter_map(Result::ok).filter(|p| !seen.contains_key(p)).collect();
        for pid in stale {
            let _ = map.remove(&pid);
        }
        self.known = seen;
        Ok(())
    }

    fn file_of(&self, ev: &Event) -> String {
        let name = c_str(&ev.file);
        if ev.source == SRC_KPROBE && !name.is_empty() {
            return name;
        }
        // The tracepoint path (or a kprobe without BTF): the process's mappings now, else as
        // last scanned (it may have exited since the fault).
        let find = |maps: &[Mapping]| {
            maps.iter().find(|m| m.start <= ev.address && ev.address < m.end).map(|m| short_name(&m.file))
        };
        let live = fs::read_to_string(format!("/proc/{}/smaps", ev.pid)).ok().map(|s| hugetlb_mappings(&s));
        live.as_deref()
            .and_then(find)
            .or_else(|| self.known.get(&ev.pid).and_then(|maps| find(maps)))
            // Otherwise the range came from a MAP_HUGETLB mmap, seen in the kernel as it returned.
            .unwrap_or_else(|| if ev.source == SRC_KPROBE { "[unknown]".into() } else { "anon_hugepage".into() })
    }

    fn report(&mut self) -> Result<()> {
        let mut procs: Vec<(u32, &(String, u64))> = self.procs.iter().map(|(p, v)| (*p, v)).collect();
        procs.sort_by(|a, b| b.1.1.cmp(&a.1.1).then(a.0.cmp(&b.0)));
        let mut files: Vec<(&String, &u64)> = self.files.iter().collect();
        files.sort_by(|a, b| b.1.cmp(a.1));
        if self.args.common.json {
            let procs: Vec<ProcRow> =
                procs.iter().map(|(pid, (comm, n))| ProcRow { pid: *pid, comm, faults: *n }).collect();
            let files: Vec<FileRow> = files.iter().map(|(f, n)| FileRow { file: f, faults: **n }).collect();
            output::json_line(&serde_json::json!({ "time": output::now_ms(), "processes": procs, "files": files }))?;
        } else {
            output::line(&format!("{:>7} {:<16} {:>8}", "PID", "COMM", "HFAULTS"))?;
            for (pid, (comm, n)) in &procs {
                output::line(&format!("{pid:>7} {comm:<16} {n:>8}"))?;
            }
            output::line(&format!("\n{:<40} {:>8}", "FILE", "HFAULTS"))?;
            for (file, n) in &files {
                output::line(&format!("{file:<40} {n:>8}"))?;
            }
        }
        self.procs.clear();
        self.files.clear();
        Ok(())
    }
}

impl tools::Stream for State<'_> {
    fn event(&mut self, data: &[u8]) -> Result<()> {
        let Some(ev) = read_event::<Event>(data) else { return Ok(()) };
        let file = self.file_of(&ev);
        let row = self.procs.entry(ev.pid).or_insert_with(|| (c_str(&ev.comm), 0));
        row.1 += 1;
        *self.files.entry(file).or_default() += 1;
        self.total += 1;
        Ok(())
    }

    fn tick(&mut self) -> Result<()> {
        self.ticks += 1;
        self.rescan()?;
        if self.args.interval.is_some_and(|i| self.ticks.is_multiple_of(i)) {
            self.report()?;
        }
        Ok(())
    }

    fn finish(&mut self, lost: u64) -> Result<()> {
        if self.args.interval.is_none() || !self.procs.is_empty() {
            self.report()?;
        }
        if self.args.common.json {
            output::json_line(&serde_json::json!({ "final": true, "events_lost": lost, "total": self.total }))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
7f0000000000-7f0000400000 rw-s 00000000 00:10 1234                       /anon_hugepage (deleted)
Size:               4096 kB
KernelPageSize:     2048 kB
MMUPageSize:        2048 kB
7f0000400000-7f0000401000 rw-p 00000000 00:00 0
Size:                  4 kB
KernelPageSize:        4 kB
7f0000600000-7f0000a00000 rw-s 00000000 00:2f 99                         /dev/hugepages/my file
KernelPageSize:     2048 kB
VmFlags: rd wr sh mr mw me ms de ht
";

    #[test]
    fn finds_hugetlb_mappings_in_smaps() {
        let maps = hugetlb_mappings(SMAPS);
        assert_eq!(
            maps,
            vec![
                Mapping { start: 0x7f00_0000_0000, end: 0x7f00_0040_0000, file: "/anon_hugepage (deleted)".into() },
                Mapping { start: 0x7f00_0060_0000, end: 0x7f00_00a0_0000, file: "/dev/hugepages/my file".into() },
            ]
        );
        assert_eq!(short_name(&maps[0].file), "anon_hugepage");
        assert_eq!(short_name(&maps[1].file), "my file");
    }
}
