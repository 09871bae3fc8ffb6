//! hfaults: hugetlb page faults per process and per mapped file (like bpftrace's hfaults.bt).
//! A kprobe on hugetlb_fault where the kernel has kprobes; otherwise user page faults
//! (exceptions:page_fault_user) inside the hugetlb ranges of the faulting process, which the
//! kernel side follows through mmap, munmap, mremap, shmdt, fork, exec and exit, and which
//! the one-second rescan of /proc/PID/smaps completes with what no syscall shows.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    fs,
    time::Duration,
};

use anyhow::Result;
use aya::maps::{HashMap, MapData, PerCpuArray};
use memtrace_common::hfaults::{DROPPED_RANGES, Event, FIELD_ABSENT, KernelOffsets, MAX_RANGES, Ranges, SRC_KPROBE};
use memtrace_common::names;
use serde::Serialize;

use crate::{
    kernel::{
        self, AttachPoint, Probe, btf,
        cgroup::{Attribution, MemcgPaths},
        tracefs::Format,
    },
    output::{self, reports::ReportPrinter},
    tools::registry::{Plan, ToolSpec},
    tools::tracer::Tracer,
    tools::{self, CommonArgs, args::Reports, c_str, read_event},
};

const OBJECT: crate::kernel::Object = crate::ebpf_object!("hfaults");

pub const SPEC: ToolSpec = ToolSpec {
    names: memtrace_common::hfaults::names::ALL,
    name: "hfaults",
    object: OBJECT,
    modes: &[("hfaults", Plan::Points(ATTACH))],
    optional: &[],
};

const KPROBE: &str = "kprobe hugetlb_fault";
pub const ATTACH: &[AttachPoint] = &[
    AttachPoint { label: KPROBE, probes: &[Probe::Kprobe { prog: "hfaults_kprobe", funcs: &["hugetlb_fault"] }] },
    AttachPoint {
        label: "tracepoint exceptions:page_fault_user in hugetlb ranges",
        probes: &[
            Probe::Tracepoint { prog: "hfaults_user_fault", category: "exceptions", names: &["page_fault_user"] },
            Probe::Tracepoint { prog: "hfaults_mmap_enter", category: "syscalls", names: &["sys_enter_mmap"] },
            Probe::Tracepoint { prog: "hfaults_mmap_exit", category: "syscalls", names: &["sys_exit_mmap"] },
            Probe::Tracepoint { prog: "hfaults_munmap_enter", category: "syscalls", names: &["sys_enter_munmap"] },
            Probe::Tracepoint { prog: "hfaults_munmap_exit", category: "syscalls", names: &["sys_exit_munmap"] },
            Probe::Tracepoint { prog: "hfaults_mremap_enter", category: "syscalls", names: &["sys_enter_mremap"] },
            Probe::Tracepoint { prog: "hfaults_mremap_exit", category: "syscalls", names: &["sys_exit_mremap"] },
            Probe::Tracepoint { prog: "hfaults_shmdt_enter", category: "syscalls", names: &["sys_enter_shmdt"] },
            Probe::Tracepoint { prog: "hfaults_shmdt_exit", category: "syscalls", names: &["sys_exit_shmdt"] },
            Probe::Tracepoint { prog: "hfaults_exec", category: "sched", names: &["sched_process_exec"] },
            Probe::Tracepoint { prog: "hfaults_exit", category: "sched", names: &["sched_process_exit"] },
            Probe::Tracepoint { prog: "hfaults_newtask", category: "task", names: &["task_newtask"] },
        ],
    },
];

/// Count hugetlb page faults per process and per mapped file.
#[derive(clap::Args, Debug)]
#[command(after_help = "Without kprobes, faults are kept when they land in a hugetlb mapping of their process: \
                        MAP_HUGETLB mmaps are seen as they return, and munmap, mremap, shmdt, fork, exec and exit \
                        are followed as they happen; other hugetlb mappings (hugetlbfs files, SysV SHM_HUGETLB) are \
                        found by rescanning /proc/PID/smaps every second, so their faults in the first second can \
                        be missed.")]
pub struct Args {
    #[command(flatten)]
    pub reports: Reports,
    #[command(flatten)]
    pub common: CommonArgs,
}

impl Args {
    /// Everything that can be checked before loading anything (and without root).
    pub fn validate(&self) -> Result<()> {
        self.reports.validate()?;
        self.common.validate()
    }
}

pub async fn run(args: Args) -> Result<()> {
    kernel::require_root()?;
    let filter = args.common.filter()?;
    let offsets = offsets();
    let mut tracer = Tracer::load(&SPEC, |loader| {
        loader.override_global(names::FILTER, &filter, true).override_global(
            memtrace_common::hfaults::names::OFFSETS,
            &offsets,
            true,
        );
    })?;
    let how = tracer.attach(ATTACH)?;
    let (ranges, dropped) = if how == KPROBE {
        (None, None)
    } else {
        (
            Some(tracer.map(memtrace_common::hfaults::names::RANGES)?),
            Some(tracer.map(memtrace_common::hfaults::names::DROPPED)?),
        )
    };
    let mut state = Live {
        args: &args,
        ranges,
        dropped,
        untracked: std::collections::HashSet::new(),
        procs: BTreeMap::new(),
        cgroups: MemcgPaths::new(),
        files: BTreeMap::new(),
        known: StdHashMap::new(),
        ticks: 0,
        total: 0,
        out: ReportPrinter::new("hfaults", args.common.run.json),
    };
    state.rescan()?;
    // The tick rescans mappings (fallback) every second; reports come every `interval` ticks.
    let max_ticks = args.reports.count().zip(args.reports.every()).map(|(c, i)| c * i.as_secs());
    let ready = format!("tracing hugetlb page faults ({how})");
    tracer.stream(&args.common, Some(Duration::from_secs(1)), max_ticks, &ready, &mut state).await?;
    Ok(())
}

/// BTF offsets for the kprobe's file names; without BTF the kprobe still counts, unnamed.
fn offsets() -> KernelOffsets {
    // A missing tracepoint fails the attach below, with its name; a missing field reads 0.
    let tp = |cat: &str, name: &str, field: &str| Format::read(cat, name).and_then(|f| f.offset(field)).unwrap_or(0);
    let fallback = KernelOffsets {
        tp_address: tp("exceptions", "page_fault_user", "address"),
        mmap_len: tp("syscalls", "sys_enter_mmap", "len"),
        mmap_flags: tp("syscalls", "sys_enter_mmap", "flags"),
        mmap_ret: tp("syscalls", "sys_exit_mmap", "ret"),
        munmap_addr: tp("syscalls", "sys_enter_munmap", "addr"),
        munmap_len: tp("syscalls", "sys_enter_munmap", "len"),
        munmap_ret: tp("syscalls", "sys_exit_munmap", "ret"),
        mremap_addr: tp("syscalls", "sys_enter_mremap", "addr"),
        mremap_old_len: tp("syscalls", "sys_enter_mremap", "old_len"),
        mremap_new_len: tp("syscalls", "sys_enter_mremap", "new_len"),
        mremap_flags: tp("syscalls", "sys_enter_mremap", "flags"),
        mremap_ret: tp("syscalls", "sys_exit_mremap", "ret"),
        shmdt_addr: tp("syscalls", "sys_enter_shmdt", "shmaddr"),
        shmdt_ret: tp("syscalls", "sys_exit_shmdt", "ret"),
        // Before 6.16 the exit record has no group_dead: the rescan drops a process's ranges.
        exit_group_dead: Format::read("sched", "sched_process_exit")
            .and_then(|f| f.offset("group_dead"))
            .unwrap_or(FIELD_ABSENT),
        newtask_pid: tp("task", "task_newtask", "pid"),
        newtask_flags: tp("task", "task_newtask", "clone_flags"),
        default_huge: default_huge_page_size(),
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

/// Hugepagesize in /proc/meminfo (2 MiB on x86-64 when unreadable).
fn default_huge_page_size() -> u64 {
    let kb = fs::read_to_string("/proc/meminfo").ok().and_then(|text| {
        text.lines()
            .find_map(|l| l.strip_prefix("Hugepagesize:")?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
    });
    kb.map_or(2 << 20, |kb| kb << 10)
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
        if let Some(m) = crate::procfs::Mapping::parse(line) {
            current = Some(Mapping { start: m.start, end: m.end, file: m.shown_path() });
            continue;
        }
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if first == "KernelPageSize:" && words.next() != Some("4") {
            out.extend(current.take());
        }
    }
    out
}

/// The used slots of a ranges value.
fn slots(r: &Ranges) -> impl Iterator<Item = (u64, u64)> + '_ {
    (0..MAX_RANGES).filter(|&i| r.end[i] != 0).map(|i| (r.start[i], r.end[i]))
}

/// Ranges sorted, with touching or overlapping ones joined: the kernel side may keep two
/// pieces where smaps shows one mapping, or the other way round.
fn merged(ranges: impl Iterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut all: Vec<(u64, u64)> = ranges.filter(|(s, e)| s < e).collect();
    all.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(all.len());
    for (start, end) in all {
        match out.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    out
}

/// A mapping's display name: the file's base name, as the kprobe's dentry name shows it.
fn short_name(path: &str) -> String {
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    path.rsplit('/').next().unwrap_or(path).to_string()
}

struct Live<'a> {
    args: &'a Args,
    /// The fallback's ranges map and its counter of ranges not kept; None with the kprobe.
    ranges: Option<HashMap<MapData, u32, Ranges>>,
    dropped: Option<PerCpuArray<MapData, u64>>,
    /// Hugetlb mappings found in smaps beyond MAX_RANGES for their process: (pid, start).
    untracked: std::collections::HashSet<(u32, u64)>,
    /// Faults by process this interval, with its name and memory cgroup (read from /proc at
    /// its first fault of the interval, while it runs).
    procs: BTreeMap<u32, (String, u64, Attribution)>,
    cgroups: MemcgPaths,
    files: BTreeMap<String, u64>,
    /// Hugetlb mappings per pid as of the last rescan: names faults of processes gone since.
    known: StdHashMap<u32, Vec<Mapping>>,
    ticks: u64,
    total: u64,
    out: ReportPrinter,
}

#[derive(Serialize)]
struct ProcRow<'a> {
    pid: u32,
    comm: &'a str,
    faults: u64,
    #[serde(flatten)]
    cgroup: &'a Attribution,
}

#[derive(Serialize)]
struct FileRow<'a> {
    file: &'a str,
    faults: u64,
}

impl Live<'_> {
    /// Fallback: compares the kernel side's ranges of the traced process, or of every
    /// process, with /proc/PID/smaps, and fixes them where they differ (hugetlbfs files and
    /// SysV segments mapped since, processes that existed before the start). The kernel side
    /// follows every change it can see; a change while smaps is read (the generation moved)
    /// leaves the entry to the kernel side until the next scan, so a scan never undoes one.
    fn rescan(&mut self) -> Result<()> {
        let Some(map) = self.ranges.as_mut() else { return Ok(()) };
        let pids: Vec<u32> = match self.args.common.target.pid {
            Some(pid) => vec![pid],
            None => fs::read_dir("/proc")?.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect(),
        };
        let mut seen = StdHashMap::new();
        for pid in pids {
            let before = map.get(&pid, 0).ok();
            let Ok(smaps) = fs::read_to_string(format!("/proc/{pid}/smaps")) else { continue };
            let maps = hugetlb_mappings(&smaps);
            let after = map.get(&pid, 0).ok();
            if before.map(|r| r.generation) != after.map(|r| r.generation) {
                continue;
            }
            let want = merged(maps.iter().map(|m| (m.start, m.end)));
            let have = before.map(|r| merged(slots(&r))).unwrap_or_default();
            if !maps.is_empty() {
                seen.insert(pid, maps);
            }
            if want == have {
                continue;
            }
            if want.is_empty() {
                let _ = map.remove(&pid);
                continue;
            }
            let mut ranges = Ranges { generation: before.map_or(0, |r| r.generation), ..Ranges::default() };
            for (i, (start, end)) in want.iter().enumerate() {
                if i < MAX_RANGES {
                    ranges.start[i] = *start;
                    ranges.end[i] = *end;
                } else {
                    self.untracked.insert((pid, *start));
                }
            }
            // A process first seen here: the kernel side may have added it meanwhile.
            let flags = if before.is_none() { 1 } else { 0 };
            let _ = map.insert(pid, ranges, flags);
        }
        // Processes gone without an exit the kernel side could see (kernels before 6.16).
        let gone: Vec<u32> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
            .collect();
        for pid in gone {
            let _ = map.remove(&pid);
        }
        self.known = seen;
        Ok(())
    }

    /// Hugetlb ranges that were not followed: more than MAX_RANGES in one process at once.
    fn untracked(&self) -> u64 {
        let kernel = self.dropped.as_ref().and_then(|d| d.get(&DROPPED_RANGES, 0).ok()).map_or(0, |v| v.iter().sum());
        kernel + self.untracked.len() as u64
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
        let mut procs: Vec<(u32, &(String, u64, Attribution))> = self.procs.iter().map(|(p, v)| (*p, v)).collect();
        procs.sort_by(|a, b| b.1.1.cmp(&a.1.1).then(a.0.cmp(&b.0)));
        let mut files: Vec<(&String, &u64)> = self.files.iter().collect();
        files.sort_by(|a, b| b.1.cmp(a.1));
        self.out.interval(
            |time| {
                let procs: Vec<ProcRow> = procs
                    .iter()
                    .map(|(pid, (comm, n, cgroup))| ProcRow { pid: *pid, comm, faults: *n, cgroup })
                    .collect();
                let files: Vec<FileRow> = files.iter().map(|(f, n)| FileRow { file: f, faults: **n }).collect();
                serde_json::json!({ "time": time, "processes": procs, "files": files })
            },
            || {
                let mut text = format!("{:>7} {:<16} {:>8} CGROUP\n", "PID", "COMM", "HFAULTS");
                for (pid, (comm, n, cgroup)) in &procs {
                    text += &format!("{pid:>7} {comm:<16} {n:>8} {}\n", cgroup.short());
                }
                text += &format!("\n{:<40} {:>8}", "FILE", "HFAULTS");
                for (file, n) in &files {
                    text += &format!("\n{file:<40} {n:>8}");
                }
                text
            },
        )?;
        self.procs.clear();
        self.files.clear();
        Ok(())
    }
}

impl tools::Stream for Live<'_> {
    type Side = ();

    fn event(&mut self, data: &[u8]) -> Result<()> {
        let Some(ev) = read_event::<Event>(data) else { return Ok(()) };
        let file = self.file_of(&ev);
        let cgroups = &mut self.cgroups;
        let row = self.procs.entry(ev.pid).or_insert_with(|| (c_str(&ev.comm), 0, cgroups.attribution_of_pid(ev.pid)));
        row.1 += 1;
        *self.files.entry(file).or_default() += 1;
        self.total += 1;
        Ok(())
    }

    fn tick(&mut self) -> Result<()> {
        self.ticks += 1;
        self.rescan()?;
        if self.args.reports.every().is_some_and(|i| self.ticks.is_multiple_of(i.as_secs())) {
            self.report()?;
        }
        Ok(())
    }

    fn finish(&mut self, lost: u64) -> Result<()> {
        if self.args.reports.every().is_none() || !self.procs.is_empty() {
            self.report()?;
        }
        let untracked = self.untracked();
        self.out.finish(
            lost,
            || serde_json::json!({ "ranges_untracked": untracked, "total": self.total }),
            || None,
            || {
                let what = format!(
                    "hugetlb ranges untracked (more than {MAX_RANGES} in one process): their faults are not counted"
                );
                Some(output::blind_spots(&[(untracked, &what)]))
            },
        )
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

    #[test]
    fn ranges_compare_as_joined_intervals() {
        let mut r = Ranges::default();
        (r.start[0], r.end[0]) = (0x60_0000, 0x80_0000);
        (r.start[3], r.end[3]) = (0x40_0000, 0x60_0000);
        (r.start[5], r.end[5]) = (0x100_0000, 0x120_0000);
        assert_eq!(merged(slots(&r)), vec![(0x40_0000, 0x80_0000), (0x100_0000, 0x120_0000)]);
        assert_eq!(merged([(5, 9), (1, 3), (2, 4), (9, 9)].into_iter()), vec![(1, 4), (5, 9)]);
    }
}
