//! Which memory cgroup an OOM kill happened in, from the cgroups' own counters.
//!
//! `bpf_get_current_cgroup_id` names cgroup v2 groups only, and the trigger may be gone by the
//! time its event is read, so user space asks the cgroup files instead: the kernel counts a
//! kill in the victim's group and its ancestors (`oom_kill`) before it marks the victim, and
//! counts a failed charge in the one group whose limit was hit (`failcnt` on v1, `max` in
//! v2's memory.events.local). Both are compared with the previous reading.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

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
}

impl Counters {
    pub fn snapshot() -> Counters {
        let root = memory_root();
        if root.is_none() {
            tracing::info!("oomkill: no memory cgroup hierarchy mounted: kills will show no memcg");
        }
        let mut counters = Counters { root, last: HashMap::new() };
        counters.last = counters.read_all();
        counters
    }

    fn read_all(&self) -> HashMap<String, Reading> {
        let mut all = HashMap::new();
        if let Some((root, v2)) = &self.root {
            walk(root, root, *v2, &mut all);
        }
        all
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

/// The memory cgroup of a process from /proc/PID/cgroup ("4:memory:/a/b" on v1, "0::/a/b" on v2).
fn group_of(pid: u32, v2: bool) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let ours = if v2 { controllers.is_empty() } else { controllers.split(',').any(|c| c == "memory") };
        ours.then(|| path.to_string())
    })
}

fn is_ancestor_or_self(group: &str, of: &str) -> bool {
    of == group || of.starts_with(&format!("{}/", group.trim_end_matches('/')))
}

/// The v1 memory hierarchy's mount point, or the v2 one when it has the memory controller.
fn memory_root() -> Option<(PathBuf, bool)> {
    let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
    let mut v2 = None;
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, dir, kind, opts, ..] = fields[..] else { continue };
        if kind == "cgroup" && opts.split(',').any(|o| o == "memory") {
            return Some((PathBuf::from(dir), false));
        }
        if kind == "cgroup2"
            && v2.is_none()
            && fs::read_to_string(Path::new(dir).join("cgroup.controllers"))
                .is_ok_and(|c| c.split_whitespace().any(|x| x == "memory"))
        {
            v2 = Some((PathBuf::from(dir), true));
        }
    }
    v2
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
