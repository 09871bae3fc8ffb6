//! A traced process's heap when the OOM killer chose it (`oom:mark_victim`): its outstanding
//! blocks per stack at that moment, read before the SIGKILL ends it, reported at once and kept
//! as a plain value (`HeapAtKill`) for whoever serves profiles after the process is gone.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::Result;
use serde::Serialize;

use crate::{
    output,
    symbolize::{Frame, MappedFile},
};

/// One process's heap at its OOM kill.
#[derive(Serialize, Clone, Debug)]
pub struct HeapAtKill {
    /// When memtrace read it (RFC 3339, to the second), just after the kernel chose the victim.
    pub time: String,
    pub pid: u32,
    pub comm: String,
    /// Always true: tells this record from a report in a stream of JSON lines.
    pub oom_killed: bool,
    /// False when the process's own recorder could no longer be read at the kill (its memory
    /// already reclaimed): the blocks are those of the read before, and later ones are missing.
    pub read_at_kill: bool,
    pub total_bytes: u64,
    pub allocs: u64,
    /// How the numbers were estimated, in a sampled run (--sample-bytes, -s): then bytes and
    /// counts are estimates, as the run's reports are.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_from: Option<String>,
    /// Every outstanding stack, largest first.
    pub stacks: Vec<KillStack>,
    /// The file mappings of the stacks' addresses, as they were at the kill (for pprof).
    #[serde(skip)]
    pub mappings: Vec<MappedFile>,
}

#[derive(Serialize, Clone, Debug)]
pub struct KillStack {
    pub bytes: u64,
    pub allocs: u64,
    pub frames: Vec<Frame>,
}

impl HeapAtKill {
    /// The table: the first `top` stacks.
    pub fn render(&self, top: usize) -> String {
        let mut out = String::new();
        let read = if self.read_at_kill { "" } else { " (read before the kill: its last moments are missing)" };
        let _ = writeln!(
            out,
            "pid {} ({}) killed by the OOM killer: {} outstanding in {} stacks at the kill{read}",
            self.pid,
            self.comm,
            output::bytes(self.total_bytes),
            self.stacks.len()
        );
        if let Some(how) = &self.estimated_from {
            let _ = writeln!(out, "  {how}");
        }
        for s in self.stacks.iter().take(top) {
            let _ = writeln!(out, "  {} bytes in {} allocations from stack", s.bytes, s.allocs);
            output::write_stack(&mut out, &s.frames, "      ");
        }
        if self.stacks.len() > top {
            let _ = writeln!(out, "  ... and {} more stacks", self.stacks.len() - top);
        }
        out.trim_end().to_string()
    }

    /// Writes the gzipped pprof profile of the whole heap (inuse_objects, inuse_space) to
    /// `path`, readable without the process: its mappings were kept. A sampled run's says it
    /// holds estimates.
    fn write_pprof(&self, path: &Path) -> Result<()> {
        let root = output::process_root(self.pid, &self.comm);
        let samples: Vec<output::pprof::Sample> = self
            .stacks
            .iter()
            .map(|s| output::pprof::Sample {
                pid: self.pid,
                process: root.clone(),
                frames: &s.frames,
                values: vec![s.allocs as i64, s.bytes as i64],
            })
            .collect();
        let types = [("inuse_objects", "count"), ("inuse_space", "bytes")];
        let notes = output::pprof::Notes { comments: self.estimated_from.iter().cloned().collect(), period: None };
        output::pprof::write(path, &types, &samples, &notes, |_, addr| {
            self.mappings.iter().find(|m| (m.start..m.limit).contains(&addr)).cloned()
        })
    }

    /// Writes the pprof profile (`--pprof`) and folded stacks (`--folded`) next to the run's
    /// own files, named for the process (`oom_path`); returns the files written.
    pub(super) fn write_files(&self, pprof: Option<&Path>, folded: Option<&Path>) -> Result<Vec<PathBuf>> {
        let mut written = Vec::new();
        if let Some(path) = pprof.map(|p| oom_path(p, self.pid)) {
            self.write_pprof(&path)?;
            written.push(path);
        }
        if let Some(path) = folded.map(|p| oom_path(p, self.pid)) {
            let root = output::process_root(self.pid, &self.comm);
            crate::tools::stacks::write_folded(
                &path,
                self.stacks.iter().map(|s| (root.clone(), s.frames.as_slice(), s.bytes)),
            )?;
            written.push(path);
        }
        Ok(written)
    }
}

/// Where a killed process's heap goes beside the run's file `path` (which the final report
/// still writes): `heap.pb.gz` becomes `heap.oom-PID.pb.gz`, one file per kill.
pub fn oom_path(path: &Path, pid: u32) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let renamed = match name.find('.').filter(|&i| i > 0) {
        Some(dot) => format!("{}.oom-{pid}{}", &name[..dot], &name[dot..]),
        None => format!("{name}.oom-{pid}"),
    };
    path.with_file_name(renamed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_a_file_per_kill() {
        assert_eq!(oom_path(Path::new("/tmp/heap.pb.gz"), 7), Path::new("/tmp/heap.oom-7.pb.gz"));
        assert_eq!(oom_path(Path::new("out/heap"), 7), Path::new("out/heap.oom-7"));
        assert_eq!(oom_path(Path::new(".heap"), 7), Path::new(".heap.oom-7"));
    }
}
