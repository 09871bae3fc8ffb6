//! Memory cgroups for oomkill: the hierarchy's root (v1 or v2), the path of a group from the
//! kernfs id the kernel side read at the kill (its directory's inode number), the memory
//! controller's subsystem id, and the groups' own counters.
//!
//! The counters (`oom_kill`, and `failcnt` on v1 or `max` in v2's memory.events.local) are
//! read after the fact, so a burst of kills read at once cannot be told apart by them: they
//! name the victim's group, and the kill's group only when the kernel side could not read
//! it at the kill.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use crate::kernel::cgroup::{self, MemcgPaths};

#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
struct Reading {
    kills: u64,
    limit_hits: u64,
}

/// What the counters say about the last kill.
#[derive(Default, Debug)]
pub struct Found {
    /// The deepest group whose kill counter rose: the victim's.
    pub victim: Option<String>,
    /// The group on the victim's path whose limit was hit since the last reading: a memcg OOM.
    pub limited: Option<String>,
}

pub struct Counters {
    /// Mount point of the memory controller and whether it is cgroup v2.
    root: Option<(PathBuf, bool)>,
    /// Last reading, by path inside the hierarchy ("/a/b").
    last: HashMap<String, Reading>,
    /// Group paths by kernfs id (inode number), as of the last walk.
    paths: HashMap<u64, String>,
}

impl Counters {
    pub fn snapshot() -> Counters {
        let root = MemcgPaths::new().root().map(|(p, v2)| (p.to_path_buf(), v2));
        let mut counters = Counters { root, last: HashMap::new(), paths: HashMap::new() };
        counters.last = counters.read_all();
        counters
    }

    /// Whether the memory controller is mounted as cgroup v1.
    pub fn is_v1(&self) -> bool {
        self.root.as_ref().is_some_and(|(_, v2)| !v2)
    }

    /// The path of the group whose directory has inode `id`; walks the hierarchy again when
    /// the group is newer than the last walk. None for a group removed since the kill.
    pub fn path_of(&mut self, id: u64) -> Option<String> {
        if !self.paths.contains_key(&id) {
            self.paths.clear();
            if let Some((root, _)) = &self.root {
                cgroup::inodes(root, root, &mut self.paths, &mut 0);
            }
        }
        self.paths.get(&id).cloned()
    }

    fn read_all(&self) -> HashMap<String, Reading> {
        let mut all = HashMap::new();
        if let Some((root, v2)) = &self.root {
            walk(root, root, *v2, &mut all);
        }
        all
    }

    /// The memory cgroup of a process from /proc/PID/cgroup, while it is there.
    pub fn group_of(&self, pid: u32) -> Option<String> {
        group_of(pid, self.root.as_ref()?.1)
    }

    /// Re-reads every group and attributes what rose since the last reading to the kill of
    /// `victim_pid`.
    pub fn after_kill(&mut self, victim_pid: u32) -> Found {
        let now = self.read_all();
        let before = |path: &str| self.last.get(path).copied().unwrap_or_default();
        let rose = |pick: fn(&Reading) -> u64| {
            now.iter().filter(|(p, r)| pick(r) > pick(&before(p))).map(|(p, _)| p.clone()).collect::<Vec<_>>()
        };
        let deepest = |paths: Vec<String>| paths.into_iter().max_by_key(|p| (p.matches('/').count(), p.clone()));
        let killed_in = rose(|r| r.kills);
        // Kills not reported (filtered out) also raise counters: the victim's own group, while
        // /proc still shows it, settles which group is this kill's.
        let own = self.root.as_ref().and_then(|(_, v2)| group_of(victim_pid, *v2)).filter(|g| killed_in.contains(g));
        let victim = own.or_else(|| deepest(killed_in));
        let limited = victim.as_ref().and_then(|v| {
            let on_path = rose(|r| r.limit_hits).into_iter().filter(|p| is_ancestor_or_self(p, v)).collect();
            deepest(on_path)
        });
        self.last = now;
        Found { victim, limited }
    }
}

/// The memory cgroup of a process from /proc/PID/cgroup.
fn group_of(pid: u32, v2: bool) -> Option<String> {
    cgroup::group_in(&fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?, v2)
}

fn is_ancestor_or_self(group: &str, of: &str) -> bool {
    of == group || of.starts_with(&format!("{}/", group.trim_end_matches('/')))
}

/// Reads every group below `dir` (the root group itself has no limit and is skipped).
fn walk(root: &Path, dir: &Path, v2: bool, out: &mut HashMap<String, Reading>) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.filter_map(Result::ok) {
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = entry.path();
        let rel = format!("/{}", path.strip_prefix(root).unwrap_or(&path).display());
        if let Some(reading) = read(&path, v2) {
            out.insert(rel, reading);
        }
        walk(root, &path, v2, out);
    }
}

fn read(dir: &Path, v2: bool) -> Option<Reading> {
    let (kills_file, hits_file) =
        if v2 { ("memory.events", "memory.events.local") } else { ("memory.oom_control", "memory.failcnt") };
    let kills = key_value(&fs::read_to_string(dir.join(kills_file)).ok()?, "oom_kill")?;
    let hits_text = fs::read_to_string(dir.join(hits_file)).ok()?;
    let limit_hits = if v2 { key_value(&hits_text, "max")? } else { hits_text.trim().parse().ok()? };
    Some(Reading { kills, limit_hits })
}

/// The number after `key` in a flat-keyed cgroup file ("oom_kill 3").
fn key_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flat_keyed_files() {
        let oom_control = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(key_value(oom_control, "oom_kill"), Some(3));
        assert_eq!(key_value(oom_control, "oom_kill_disable"), Some(0));
        assert_eq!(key_value("low 0\nhigh 0\nmax 12\noom 1\n", "max"), Some(12));
        assert_eq!(key_value("low 0\n", "max"), None);
    }

    #[test]
    fn ancestry_is_by_whole_components() {
        assert!(is_ancestor_or_self("/a", "/a/b"));
        assert!(is_ancestor_or_self("/a/b", "/a/b"));
        assert!(!is_ancestor_or_self("/a", "/ab"));
        assert!(!is_ancestor_or_self("/a/b", "/a"));
    }
}
