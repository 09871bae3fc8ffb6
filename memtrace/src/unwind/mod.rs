//! Unwind tables for user stacks without frame pointers, compiled in user space for the eBPF
//! walker and for the preloaded recorder.
//!
//! Compiles a module's `.eh_frame` (and `.debug_frame` when present) into a sorted array of
//! 16-byte rows: from each row's PC up to the next, how to find the CFA (RSP+N, RBP+N or the
//! PLT rule), where the caller's RBP was saved, and that the return address is at CFA-8.
//! A gap between FDEs and the end of the last one hold a `NoTable` row, so a lookup can tell
//! "no unwind information here" from a rule. The eBPF walker binary-searches these rows.
//!
//! The file is untrusted (the traced program, maybe a hostile container, controls it): only
//! the ELF headers and the unwind sections are read, each capped, and the rows and the CFI
//! bytes evaluated are capped too. Any excess is an `Error`, never a panic or unbounded work.
//! `.eh_frame_hdr` is not needed: every FDE in `.eh_frame` is walked in order anyway.
//!
//! This module uses only std, gimli and object so the fuzz target can compile it alone.

mod build;
#[cfg(not(fuzzing))]
mod load;
#[cfg(not(fuzzing))]
pub mod module;
mod row;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_untrusted;

use std::{fmt, fs::File, path::Path};

use object::{
    Endianness, ReadCache, ReadRef,
    elf::{EM_X86_64, FileHeader64, PT_LOAD, SHF_COMPRESSED, SHT_NOBITS},
    read::elf::{FileHeader, ProgramHeader as _, SectionHeader},
};

pub use build::{Sections, build};
#[cfg(not(fuzzing))]
pub use load::{CutStacks, DEFAULT_ROWS, MAX_ROWS, POLL, UnwindMode, Unwinder, configure, mode_on_this_kernel};
#[cfg(test)]
pub use row::{CfaRule, RbpRule, Unsupported};
pub use row::{PackedRow, RowRule, Rule};

/// Bounds on what one module may cost.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Rows, counted before deduplication (gap markers included); 16 bytes each.
    pub max_rows: usize,
    /// Bytes of `.eh_frame` plus `.debug_frame` read from the file.
    pub max_section_bytes: u64,
    /// CFI bytes evaluated: each FDE's plus its CIE's, which is re-run for every FDE.
    pub max_cfi_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        // Debian's libc.so.6 needs 28k rows from 150 KiB of .eh_frame; these leave room for
        // binaries 100x larger while holding a hostile file to 64 MiB of rows.
        Limits { max_rows: 4 << 20, max_section_bytes: 64 << 20, max_cfi_bytes: 256 << 20 }
    }
}

#[derive(Debug)]
pub enum Error {
    #[cfg_attr(not(test), allow(dead_code, reason = "for the tests and the fuzz target"))]
    Io(std::io::Error),
    NotElf(String),
    NotX86_64,
    SectionTooLarge {
        name: &'static str,
        size: u64,
        limit: u64,
    },
    TooManyRows {
        limit: usize,
    },
    TooMuchCfi {
        limit: u64,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "cannot read the file: {e}"),
            Error::NotElf(why) => write!(f, "not a valid ELF file: {why}"),
            Error::NotX86_64 => write!(f, "not a 64-bit little-endian x86-64 ELF file"),
            Error::SectionTooLarge { name, size, limit } => {
                write!(f, "{name} is {size} bytes, more than the {limit} bytes allowed per module")
            }
            Error::TooManyRows { limit } => {
                write!(f, "unwind information needs more than {limit} rows")
            }
            Error::TooMuchCfi { limit } => {
                write!(f, "unwind information needs more than {limit} bytes of CFI to be evaluated")
            }
        }
    }
}

impl std::error::Error for Error {}

/// What building a module's table cost and what it could not use; `-v` will print these.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// FDEs evaluated (non-empty PC range).
    pub fdes: usize,
    /// FDEs dropped because an earlier one (or `.eh_frame` over `.debug_frame`) covers them.
    pub fdes_overlapping: usize,
    /// Entries that could not be parsed or evaluated.
    pub malformed: usize,
    pub rows: usize,
    pub bytes: usize,
    pub unsupported_rows: usize,
    /// `.debug_frame` was present but compressed, so not used.
    pub debug_frame_compressed: bool,
}

/// A loadable segment: where file offsets land in the file's virtual addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub vaddr: u64,
    pub filesz: u64,
}

/// The PT_LOAD segments of an x86-64 ELF file, from its headers only (at most 256).
pub fn load_segments<'a, D: ReadRef<'a>>(data: D) -> Result<Vec<Segment>, Error> {
    let header = FileHeader64::<Endianness>::parse(data).map_err(|e| Error::NotElf(e.to_string()))?;
    let endian = header.endian().map_err(|e| Error::NotElf(e.to_string()))?;
    let headers = header.program_headers(endian, data).map_err(|e| Error::NotElf(e.to_string()))?;
    Ok(headers
        .iter()
        .filter(|p| p.p_type(endian) == PT_LOAD)
        .take(256)
        .map(|p| Segment { offset: p.p_offset(endian), vaddr: p.p_vaddr(endian), filesz: p.p_filesz(endian) })
        .collect())
}

/// What to subtract from an address in a mapping of `segments`' file (mapped at `start` from
/// file offset `offset`) to get the file's virtual address; None if no segment holds it.
pub fn mapping_bias(segments: &[Segment], start: u64, offset: u64) -> Option<u64> {
    let page = |v: u64| v & !0xfff;
    // The loader maps each segment from its page-rounded offset; two segments may share a
    // page (a read-only one ending where text begins), so an exact start wins.
    let s = segments.iter().find(|s| page(s.offset) == offset).or_else(|| {
        segments.iter().find(|s| page(s.offset) <= offset && offset < s.offset.saturating_add(s.filesz.max(1)))
    })?;
    // vaddr = addr - start + offset + (s.vaddr - s.offset)
    Some(start.wrapping_sub(offset).wrapping_add(s.offset).wrapping_sub(s.vaddr))
}

#[derive(Debug)]
pub struct UnwindTable {
    rows: Vec<PackedRow>,
    stats: Stats,
}

impl UnwindTable {
    /// Reads only the ELF headers and unwind sections of `path`, never the whole file.
    #[cfg_attr(not(test), allow(dead_code, reason = "for the tests and the fuzz target"))]
    pub fn from_elf_path(path: &Path, limits: &Limits) -> Result<UnwindTable, Error> {
        let file = File::open(path).map_err(Error::Io)?;
        let cache = ReadCache::new(file);
        Self::from_elf(&cache, limits)
    }

    pub fn from_elf<'a, D: ReadRef<'a>>(data: D, limits: &Limits) -> Result<UnwindTable, Error> {
        let header = FileHeader64::<Endianness>::parse(data).map_err(|e| Error::NotElf(e.to_string()))?;
        let endian = header.endian().map_err(|e| Error::NotElf(e.to_string()))?;
        if endian != Endianness::Little || header.e_machine(endian) != EM_X86_64 {
            return Err(Error::NotX86_64);
        }
        let table = header.sections(endian, data).map_err(|e| Error::NotElf(e.to_string()))?;
        let addr = |name: &[u8]| {
            let (_, s) = table.section_by_name(endian, name)?;
            Some(s.sh_addr(endian))
        };
        let mut budget = limits.max_section_bytes;
        let mut compressed = false;
        let mut read = |name: &'static str| -> Result<Option<(u64, &'a [u8])>, Error> {
            let Some((_, s)) = table.section_by_name(endian, name.as_bytes()) else {
                return Ok(None);
            };
            if s.sh_type(endian) == SHT_NOBITS {
                return Ok(None);
            }
            if s.sh_flags(endian) & u64::from(SHF_COMPRESSED) != 0 {
                compressed = true;
                return Ok(None);
            }
            let size = s.sh_size(endian);
            if size > budget {
                return Err(Error::SectionTooLarge { name, size, limit: limits.max_section_bytes });
            }
            budget -= size;
            let bytes = s.data(endian, data).map_err(|_| Error::NotElf("a section lies outside the file".into()))?;
            Ok(Some((s.sh_addr(endian), bytes)))
        };
        let eh_frame = read(".eh_frame")?;
        let debug_frame = read(".debug_frame")?;
        let sections = Sections {
            eh_frame,
            eh_frame_hdr: addr(b".eh_frame_hdr"),
            debug_frame,
            text: addr(b".text"),
            got: addr(b".got"),
        };
        let mut table = build(&sections, limits)?;
        table.stats.debug_frame_compressed = compressed;
        Ok(table)
    }

    /// The rule for a file-relative virtual address.
    #[cfg_attr(not(test), allow(dead_code, reason = "for the tests and the fuzz target"))]
    pub fn lookup(&self, pc: u64) -> Rule {
        match self.rows.partition_point(|r| r.pc <= pc) {
            0 => Rule::NoTable,
            i => self.rows[i - 1].rule(),
        }
    }

    pub fn rows(&self) -> &[PackedRow] {
        &self.rows
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }
}
