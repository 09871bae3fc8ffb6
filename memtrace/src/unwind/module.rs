//! One mapped file's unwind table, compiled for a walker: the BPF one (`load`) or memleak's
//! in-process recorder. Both need the same answer to "what rows, which segments, and if
//! none, why".

use std::fs::File;

use memtrace_common::unwind::{KIND_NO_TABLE, MAPPING_NO_TABLE, MAPPING_TABLE, MAPPING_UNUSABLE, PackedRow};
use object::ReadCache;

use super::{Limits, Segment, UnwindTable, load_segments};
use crate::procfs;

/// A file's table: `kind` is `MAPPING_TABLE` with its rows, else `MAPPING_NO_TABLE` or
/// `MAPPING_UNUSABLE` with the reason in `missing`.
pub struct Compiled {
    pub kind: u32,
    pub rows: Vec<PackedRow>,
    pub segments: Vec<Segment>,
    pub missing: Option<String>,
}

/// Compiles the table of the file that mapping `m` of `pid` maps.
pub fn compile(pid: u32, m: &procfs::Mapping, limits: &Limits) -> Compiled {
    let mut out = Compiled { kind: MAPPING_NO_TABLE, rows: Vec::new(), segments: Vec::new(), missing: None };
    let began = std::time::Instant::now();
    let Some(path) = procfs::reach(pid, m) else {
        out.missing = Some("the file cannot be reached from memtrace".into());
        return out;
    };
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) => {
            out.missing = Some(format!("cannot open {}: {e}", path.display()));
            return out;
        }
    };
    let cache = ReadCache::new(file);
    let built = load_segments(&cache).and_then(|s| Ok((UnwindTable::from_elf(&cache, limits)?, s)));
    let (table, segments) = match built {
        Ok(v) => v,
        // The file is there, but its headers or tables cannot be used (malformed, or past the
        // limits a hostile file is held to).
        Err(e) => {
            out.kind = MAPPING_UNUSABLE;
            out.missing = Some(format!("unusable table: {e}"));
            tracing::warn!("unwind: {}: unusable table: {e}", m.path);
            return out;
        }
    };
    out.segments = segments;
    let stats = *table.stats();
    if table.rows().iter().all(|r| r.kind == KIND_NO_TABLE) {
        if stats.malformed > 0 {
            // Sections there, but nothing in them could be read: not the same as none.
            out.kind = MAPPING_UNUSABLE;
            out.missing = Some(format!("unusable table: {} malformed entries", stats.malformed));
            tracing::warn!("unwind: {}: unusable table ({} malformed entries)", m.path, stats.malformed);
        } else {
            out.missing = Some("no .eh_frame or .debug_frame".into());
        }
        return out;
    }
    tracing::info!(
        "unwind: {}: {} rows ({}) from {} FDEs in {:.1} ms, {} rows memtrace cannot follow",
        m.path,
        table.rows().len(),
        crate::output::bytes(table.rows().len() as u64 * 16),
        stats.fdes,
        began.elapsed().as_secs_f64() * 1e3,
        stats.unsupported_rows
    );
    out.kind = MAPPING_TABLE;
    out.rows = table.rows().to_vec();
    out
}
