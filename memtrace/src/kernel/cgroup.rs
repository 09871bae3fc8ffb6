//! Memory cgroups: where the memory controller's hierarchy is mounted (cgroup v1's `memory`
//! hierarchy, or the cgroup2 mount with the memory controller), the BTF offsets with which
//! the kernel side names the current task's memory cgroup (`memtrace_ebpf::current_memcg_id`),
//! and the group's path from that id or from /proc/PID/cgroup. A record's container comes
//! from that path (`container`).
//!
//! Which source a tool uses: an event about the current task at the moment it happens takes
//! the id the kernel side read (`MemcgPaths::path_of_id`), which holds after the task is gone;
//! a report about a process read later (per-pid rows, another task than the current one)
//! takes /proc/PID/cgroup (`MemcgPaths::of_pid`), which a process that has exited no longer has.

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::EbpfLoader;
use memtrace_common::{MEMCG_BY_BTF, MEMCG_BY_NONE, MEMCG_BY_V2_ID, MemcgId};
use serde::Serialize;

use super::btf;
#[allow(unused_imports, reason = "the container's type is part of this module's API, for per-cgroup users")]
pub use super::container::Container;
pub use super::container::{container_id, systemd_unit};

/// How long a process's group read from /proc is trusted: processes move between groups
/// (a container runtime moves its init before exec), and pids are reused.
const PID_TTL: Duration = Duration::from_secs(2);

/// A record's memory cgroup, as every tool prints it: the path inside the memory hierarchy
/// and what it names. Flattened into each JSON record as `cgroup`, `container` (and `pod`,
/// `unit` where there is one).
#[derive(Serialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Attribution {
    /// The path inside the memory hierarchy ("/docker/<id>"); null when unknown.
    pub cgroup: Option<String>,
    /// The container id parsed from the path (docker, containerd, CRI-O, podman, kubepods).
    pub container: Option<String>,
    /// The Kubernetes pod uid, for a container under kubepods.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The systemd service the group belongs to, when it is no container.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
}

impl Attribution {
    pub fn of_path(path: Option<String>) -> Attribution {
        let Some(path) = path else { return Attribution::default() };
        let container = container_id(&path);
        let unit = if container.is_none() { systemd_unit(&path) } else { None };
        Attribution {
            container: container.as_ref().map(|c| c.id.clone()),
            pod: container.and_then(|c| c.pod),
            unit,
            cgroup: Some(path),
        }
    }

    /// A compact table cell: the container id's first 12 characters (as `docker ps` shows
    /// them), else the path, else "-".
    pub fn short(&self) -> &str {
        match (&self.container, &self.cgroup) {
            (Some(id), _) => &id[..id.len().min(12)],
            (None, Some(path)) => path,
            (None, None) => "-",
        }
    }
}

/// Paths of memory cgroups by kernfs id and by process, cached.
pub struct MemcgPaths {
    /// Mount point of the memory controller's hierarchy and whether it is cgroup v2.
    root: Option<(PathBuf, bool)>,
    /// Group paths by kernfs id (the inode number of the group's directory), None for an id
    /// a walk did not find (a group removed since), so it costs one walk only.
    by_id: HashMap<u64, Option<String>>,
    by_pid: HashMap<u32, (Instant, Option<String>)>,
    /// Each process's group as last read: what a process that has exited since is shown
    /// with (a pid reused since reads its own group from /proc first).
    last_read: HashMap<u32, String>,
}

impl Default for MemcgPaths {
    fn default() -> Self {
        MemcgPaths::new()
    }
}

impl MemcgPaths {
    pub fn new() -> MemcgPaths {
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let root = memory_root(&mounts, |dir| fs::read_to_string(dir.join("cgroup.controllers")).ok());
        if root.is_none() {
            tracing::info!("no memory cgroup hierarchy mounted: records will show no cgroup");
        }
        MemcgPaths { root, by_id: HashMap::new(), by_pid: HashMap::new(), last_read: HashMap::new() }
    }

    /// The memory hierarchy's mount point and whether it is cgroup v2.
    pub fn root(&self) -> Option<(&Path, bool)> {
        self.root.as_ref().map(|(p, v2)| (p.as_path(), *v2))
    }

    /// The path of the group whose directory has inode `id` ("/" for the root); walks the
    /// hierarchy again when the group is newer than the last walk. None for 0 (not read) and
    /// for a group removed before the walk.
    pub fn path_of_id(&mut self, id: u64) -> Option<String> {
        if id == 0 {
            return None;
        }
        if let Some(known) = self.by_id.get(&id) {
            return known.clone();
        }
        if let Some((root, _)) = &self.root {
            let mut found = HashMap::new();
            inodes(root, root, &mut found, &mut 0);
            self.by_id.extend(found.into_iter().map(|(id, path)| (id, Some(path))));
        }
        self.by_id.entry(id).or_insert(None).clone()
    }

    /// The memory cgroup of a process from /proc/PID/cgroup; once it has exited, the group
    /// it was in when this last read it (None if never).
    pub fn of_pid(&mut self, pid: u32) -> Option<String> {
        let v2 = self.root.as_ref()?.1;
        if let Some((at, path)) = self.by_pid.get(&pid)
            && at.elapsed() < PID_TTL
        {
            return path.clone();
        }
        let read = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok().and_then(|t| group_in(&t, v2));
        if self.by_pid.len() > 65_536 {
            self.by_pid.clear();
            self.last_read.clear();
        }
        let path = match read {
            Some(path) => {
                self.last_read.insert(pid, path.clone());
                Some(path)
            }
            None => self.last_read.get(&pid).cloned(),
        };
        self.by_pid.insert(pid, (Instant::now(), path.clone()));
        path
    }

    pub fn attribution_of_id(&mut self, id: u64) -> Attribution {
        Attribution::of_path(self.path_of_id(id))
    }

    pub fn attribution_of_pid(&mut self, pid: u32) -> Attribution {
        Attribution::of_path(self.of_pid(pid))
    }

    /// A process's group now, from /proc (it may have moved since); once it has exited, the
    /// group the kernel side recorded for it (`id`, 0 when none).
    pub fn attribution_of(&mut self, pid: u32, id: u64) -> Attribution {
        let path = self.of_pid(pid).or_else(|| self.path_of_id(id));
        Attribution::of_path(path)
    }
}

/// Sets the kernel side's `MemcgId` global (see `memtrace_ebpf::current_memcg_id`) in every
/// object that has it; without BTF a v2 system still gets the task's own group.
pub fn configure(loader: &mut EbpfLoader<'_>) {
    static HOW: std::sync::OnceLock<MemcgId> = std::sync::OnceLock::new();
    let how = HOW.get_or_init(|| {
        let paths = MemcgPaths::new();
        match memcg_id_offsets() {
            Ok(off) => off,
            Err(e) => {
                let v2 = paths.root().is_some_and(|(_, v2)| v2);
                tracing::info!(
                    "memory cgroups read without BTF offsets ({e:#}): {}",
                    if v2 { "the task's own v2 group" } else { "none" }
                );
                MemcgId { how: if v2 { MEMCG_BY_V2_ID } else { MEMCG_BY_NONE }, ..MemcgId::default() }
            }
        }
    });
    // Objects whose programs never read the memory cgroup have no such global.
    loader.override_global(memtrace_common::names::MEMCG_ID, how, false);
}

/// BTF offsets from a task to its memory cgroup's kernfs id.
pub fn memcg_id_offsets() -> Result<MemcgId> {
    let id =
        memory_subsys_id(&fs::read_to_string("/proc/cgroups")?).context("no memory controller in /proc/cgroups")?;
    let off = btf::member_offset;
    Ok(MemcgId {
        how: MEMCG_BY_BTF,
        task_cgroups: off("task_struct", "cgroups")?,
        css_set_memory: off("css_set", "subsys")? + 8 * id,
        css_cgroup: off("cgroup_subsys_state", "cgroup")?,
        cgroup_kn: off("cgroup", "kn")?,
        kn_id: off("kernfs_node", "id")?,
    })
}

/// The memory controller's subsystem id: its row in /proc/cgroups, which lists the
/// subsystems in id order (the index of `css_set.subsys`).
pub fn memory_subsys_id(proc_cgroups: &str) -> Option<u32> {
    proc_cgroups
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .position(|l| l.split_whitespace().next() == Some("memory"))
        .map(|i| i as u32)
}

/// The memory cgroup in a /proc/PID/cgroup text ("4:memory:/a/b" on v1, "0::/a/b" on v2).
pub fn group_in(text: &str, v2: bool) -> Option<String> {
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let ours = if v2 { controllers.is_empty() } else { controllers.split(',').any(|c| c == "memory") };
        ours.then(|| path.to_string())
    })
}

/// The v1 memory hierarchy's mount point in a /proc/self/mounts text, or else the v2 one
/// whose `cgroup.controllers` (read by `controllers`) has the memory controller.
pub fn memory_root(mounts: &str, controllers: impl Fn(&Path) -> Option<String>) -> Option<(PathBuf, bool)> {
    let mut v2 = None;
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, dir, kind, opts, ..] = fields[..] else { continue };
        if kind == "cgroup" && opts.split(',').any(|o| o == "memory") {
            return Some((PathBuf::from(dir), false));
        }
        if kind == "cgroup2"
            && v2.is_none()
            && controllers(Path::new(dir)).is_some_and(|c| c.split_whitespace().any(|x| x == "memory"))
        {
            v2 = Some((PathBuf::from(dir), true));
        }
    }
    v2
}

/// Every group's path under `root` ("/" for the root) by its directory's inode number, which
/// is the kernfs id of the group on both cgroup versions. Bounded: a machine has at most a
/// few thousand groups.
pub fn inodes(root: &Path, dir: &Path, out: &mut HashMap<u64, String>, seen: &mut usize) {
    *seen += 1;
    if *seen > 100_000 {
        return;
    }
    let Ok(meta) = fs::metadata(dir) else { return };
    let rel = dir.strip_prefix(root).unwrap_or(dir).display().to_string();
    out.insert(meta.ino(), format!("/{rel}"));
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.filter_map(Result::ok) {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            inodes(root, &entry.path(), out, seen);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_memory_hierarchy_on_either_version() {
        let v1 = "cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n\
                  cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n\
                  cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        let no_memory = |_: &Path| Some("cpu io pids".to_string());
        assert_eq!(memory_root(v1, no_memory), Some((PathBuf::from("/sys/fs/cgroup/memory"), false)));
        let v2 = "sysfs /sys sysfs rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        let with_memory = |d: &Path| (d == Path::new("/sys/fs/cgroup")).then(|| "cpuset cpu io memory pids".into());
        assert_eq!(memory_root(v2, with_memory), Some((PathBuf::from("/sys/fs/cgroup"), true)));
        assert_eq!(memory_root(v2, no_memory), None);
    }

    #[test]
    fn reads_a_process_group_on_either_version() {
        let v1 = "12:pids:/x\n4:memory:/memtrace-test-a/b\n1:name=systemd:/\n0::/\n";
        assert_eq!(group_in(v1, false).as_deref(), Some("/memtrace-test-a/b"));
        assert_eq!(group_in("0::/system.slice/app.service\n", true).as_deref(), Some("/system.slice/app.service"));
        assert_eq!(group_in("4:cpu,memory:/c\n", false).as_deref(), Some("/c"));
        assert_eq!(group_in("4:cpu:/c\n", false), None);
    }

    #[test]
    fn memory_subsystem_id_is_its_row() {
        let text = "#subsys_name\thierarchy\tnum_cgroups\tenabled\ncpuset\t3\t1\t1\ncpu\t1\t1\t1\n\
                    cpuacct\t2\t1\t1\nblkio\t7\t1\t1\nmemory\t4\t52\t1\ndevices\t5\t1\t1\n";
        assert_eq!(memory_subsys_id(text), Some(4));
        assert_eq!(memory_subsys_id("#subsys_name\nmemory\t0\t1\t1\n"), Some(0));
        assert_eq!(memory_subsys_id("#subsys_name\ncpu\t0\t1\t1\n"), None);
    }

    #[test]
    fn names_groups_by_inode() {
        let root = std::env::temp_dir().join(format!("memtrace-inodes-{}", std::process::id()));
        fs::create_dir_all(root.join("a/b")).unwrap();
        let mut paths = HashMap::new();
        inodes(&root, &root, &mut paths, &mut 0);
        let ino = |p: &Path| fs::metadata(p).unwrap().ino();
        assert_eq!(paths.get(&ino(&root)).map(String::as_str), Some("/"));
        assert_eq!(paths.get(&ino(&root.join("a/b"))).map(String::as_str), Some("/a/b"));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn attribution_shows_the_short_id_else_the_path() {
        let id = "4f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
        let a = Attribution::of_path(Some(format!("/docker/{id}")));
        assert_eq!(a.container.as_deref(), Some(id));
        assert_eq!(a.short(), "4f1e2d3c4b5a");
        let unit = Attribution::of_path(Some("/system.slice/cron.service".into()));
        assert_eq!((unit.container, unit.unit.as_deref()), (None, Some("cron.service")));
        assert_eq!(Attribution::of_path(Some("/a/b".into())).short(), "/a/b");
        assert_eq!(Attribution::default().short(), "-");
        let json = serde_json::to_value(Attribution::of_path(Some("/a".into()))).unwrap();
        assert_eq!(json, serde_json::json!({"cgroup": "/a", "container": null}));
    }
}
