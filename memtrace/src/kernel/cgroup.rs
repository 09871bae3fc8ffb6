//! cgroup v2 groups by id: the kernfs inode number, which is what bpf_get_current_cgroup_id
//! returns, turned back into a path below the cgroup2 mount.

use std::{collections::HashMap, os::unix::fs::MetadataExt as _, path::PathBuf};

/// Paths of cgroup v2 groups by id (the kernfs inode, what bpf_get_current_cgroup_id returns).
#[derive(Default)]
pub struct Cgroups {
    root: Option<Option<PathBuf>>,
    known: HashMap<u64, String>,
}

impl Cgroups {
    /// The group's path below the cgroup2 mount; None without one, or once the group is gone.
    pub fn path(&mut self, id: u64) -> Option<String> {
        if let Some(path) = self.known.get(&id) {
            return Some(path.clone());
        }
        let root = self.root.get_or_insert_with(cgroup2_mount).clone()?;
        let mut dirs = vec![root.clone()];
        // Bounded: a machine has at most a few thousand groups.
        let mut seen = 0;
        while let Some(dir) = dirs.pop() {
            seen += 1;
            if seen > 100_000 {
                break;
            }
            let Ok(meta) = std::fs::metadata(&dir) else { continue };
            let path = format!("/{}", dir.strip_prefix(&root).ok()?.display());
            self.known.insert(meta.ino(), path);
            if meta.ino() == id {
                break;
            }
            if let Ok(entries) = std::fs::read_dir(&dir) {
                dirs.extend(entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
            }
        }
        self.known.get(&id).cloned()
    }
}

fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        if !right.starts_with("cgroup2 ") {
            return None;
        }
        left.split(' ').nth(4).map(PathBuf::from)
    })
}
