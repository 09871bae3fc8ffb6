//! A file's USDT probes from its `.note.stapsdt` notes: each note holds the probe's address,
//! the address `.stapsdt.base` had at link time, the semaphore's address (0: none), and the
//! provider, name and argument specs as text. Prelink moves sections after linking, so each
//! address shifts by where `.stapsdt.base` is now against where the note says it was.

use std::path::Path;

use anyhow::{Context as _, Result, bail};
use object::{
    Endianness,
    elf::{FileHeader64, PT_LOAD},
    read::elf::{FileHeader as _, ProgramHeader as _, SectionHeader as _},
};

/// The note type of a probe descriptor.
const NT_STAPSDT: u32 = 3;

/// One probe as its note describes it, addresses already adjusted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub provider: String,
    pub name: String,
    /// Virtual address of the probe's instruction, as in the file.
    pub address: u64,
    /// Virtual address of the semaphore, 0 when the probe has none.
    pub semaphore: u64,
    /// The argument specs, as written (`8@%rbp 8@%r12 -4@%eax`).
    pub args: String,
}

/// What `read` found: the notes, and how to turn their addresses into file offsets.
pub struct Notes {
    pub notes: Vec<Note>,
    /// `(p_vaddr, p_offset, p_filesz)` of each loadable segment.
    segments: Vec<(u64, u64, u64)>,
}

impl Notes {
    /// The file offset of virtual address `vaddr`, as uprobes and reference counters take it.
    pub fn file_offset(&self, vaddr: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|(start, _, size)| vaddr >= *start && vaddr - start < *size)
            .map(|(start, offset, _)| vaddr - start + offset)
    }
}

/// The USDT notes of the 64-bit ELF file at `path` (none if it has no `.note.stapsdt`).
pub fn read(path: &Path) -> Result<Notes> {
    let data = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse(&data).with_context(|| format!("{} is not a 64-bit ELF file memtrace can read", path.display()))
}

fn parse(data: &[u8]) -> Result<Notes> {
    let header = FileHeader64::<Endianness>::parse(data)?;
    let endian = header.endian()?;
    let sections = header.sections(endian, data)?;
    let segments = header
        .program_headers(endian, data)?
        .iter()
        .filter(|ph| ph.p_type(endian) == PT_LOAD)
        .map(|ph| (ph.p_vaddr(endian), ph.p_offset(endian), ph.p_filesz(endian)))
        .collect();
    let base_now = sections.section_by_name(endian, b".stapsdt.base").map(|(_, s)| s.sh_addr(endian));
    let mut notes = Vec::new();
    if let Some((_, section)) = sections.section_by_name(endian, b".note.stapsdt")
        && let Some(mut iter) = section.notes(endian, data)?
    {
        while let Some(note) = iter.next()? {
            if note.name() != b"stapsdt" || note.n_type(endian) != NT_STAPSDT {
                continue;
            }
            notes.push(descriptor(note.desc(), base_now)?);
        }
    }
    Ok(Notes { notes, segments })
}

/// Decodes a note's descriptor: pc, base, semaphore (u64 each), then provider, name and
/// arguments, each NUL-terminated.
fn descriptor(desc: &[u8], base_now: Option<u64>) -> Result<Note> {
    if desc.len() < 24 {
        bail!("a .note.stapsdt note of {} bytes is too short", desc.len());
    }
    let word = |i: usize| u64::from_le_bytes(desc[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let (pc, base, semaphore) = (word(0), word(1), word(2));
    let mut strings = desc[24..].split(|b| *b == 0).map(|s| String::from_utf8_lossy(s).into_owned());
    let (Some(provider), Some(name)) = (strings.next(), strings.next()) else {
        bail!("a .note.stapsdt note without provider or name");
    };
    let args = strings.next().unwrap_or_default();
    // The note's base is 0 when the file had no .stapsdt.base section at link time.
    let shift = match base_now {
        Some(now) if base != 0 => now.wrapping_sub(base),
        _ => 0,
    };
    let semaphore = if semaphore == 0 { 0 } else { semaphore.wrapping_add(shift) };
    Ok(Note { provider, name, address: pc.wrapping_add(shift), semaphore, args })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(pc: u64, base: u64, sem: u64, text: &[u8]) -> Vec<u8> {
        let mut d = [pc, base, sem].iter().flat_map(|w| w.to_le_bytes()).collect::<Vec<u8>>();
        d.extend_from_slice(text);
        d
    }

    #[test]
    fn shifts_addresses_by_where_the_base_moved() {
        let d = desc(0x1000, 0x2000, 0x3000, b"libc\0memory_heap_new\08@%rax 8@%rbx\0");
        let note = descriptor(&d, Some(0x2100)).unwrap();
        assert_eq!(
            note,
            Note {
                provider: "libc".into(),
                name: "memory_heap_new".into(),
                address: 0x1100,
                semaphore: 0x3100,
                args: "8@%rax 8@%rbx".into()
            }
        );
        let unmoved = descriptor(&d, Some(0x2000)).unwrap();
        assert_eq!((unmoved.address, unmoved.semaphore), (0x1000, 0x3000));
    }

    #[test]
    fn takes_probes_without_arguments_or_semaphore() {
        let note = descriptor(&desc(0x10, 0, 0, b"p\0n\0\0"), None).unwrap();
        assert_eq!((note.address, note.semaphore, note.args.as_str()), (0x10, 0, ""));
        assert!(descriptor(&desc(0x10, 0, 0, b"p"), None).is_err());
        assert!(descriptor(&[0; 16], None).is_err());
    }
}
