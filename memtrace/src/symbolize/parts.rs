//! Functions the compiler split into parts (GCC moves unlikely paths into `.text.unlikely` as
//! `func.cold`). DWARF describes such a function as one subprogram with several address
//! ranges; blazesym then gives the function no start and no size, so the offset it reports is
//! the address itself, and an address in the cold part carries the whole function's name. The
//! ELF symbol table has each part as a symbol of its own, with its start and size.

use std::path::PathBuf;

use blazesym::symbolize::source::{Elf, Source};
use blazesym::symbolize::{Input, Sym, Symbolized, Symbolizer};

/// The part of a function holding an address, from the ELF symbols.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Part {
    pub name: String,
    pub offset: u64,
}

/// Whether `sym`, as blazesym found it, may lie about the part it names: a function known
/// only by its name, with no extent (DWARF with several ranges gives none).
pub(super) fn needs_part(sym: &Sym<'_>) -> bool {
    sym.size.is_none() && !sym.name.is_empty()
}

/// The part of `sym` that holds the address `sym` was found for, from the symbol table of the
/// debug file (by build id) or else of `path` itself. None when no sized symbol holds it.
pub(super) fn part_of(symbolizer: &Symbolizer, sym: &Sym<'_>, path: &str, debug: Option<&PathBuf>) -> Option<Part> {
    let addr = sym.addr + sym.offset as u64;
    let own = PathBuf::from(path);
    debug.into_iter().chain([&own]).find_map(|file| {
        let mut elf = Elf::new(file);
        elf.debug_syms = false;
        match symbolizer.symbolize_single(&Source::Elf(elf), Input::VirtOffset(addr)) {
            Ok(Symbolized::Sym(part)) if part.size.is_some() && !part.name.is_empty() => {
                Some(Part { name: part_name(&sym.name, &part.name).to_string(), offset: addr - part.addr })
            }
            _ => None,
        }
    })
}

/// The name to show: the symbol table's when it names a split-off part (`func.cold`, or
/// `func.cold.1` from clang), else the function's own (the table may hold an alias there).
fn part_name<'a>(function: &'a str, symbol: &'a str) -> &'a str {
    if symbol.contains(".cold") { symbol } else { function }
}

/// The separate debug file of the ELF at `path` by its build id, when it exists.
pub fn debug_file(path: &str) -> Option<PathBuf> {
    let id = blazesym::helper::read_elf_build_id(path).ok()??;
    let (first, rest) = id.split_first()?;
    let hex: String = rest.iter().map(|b| format!("{b:02x}")).collect();
    let file = PathBuf::from(format!("/usr/lib/debug/.build-id/{first:02x}/{hex}.debug"));
    file.exists().then_some(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cold_part_keeps_its_own_name_and_an_alias_does_not() {
        assert_eq!(part_name("leak", "leak.cold"), "leak.cold");
        assert_eq!(part_name("_IO_puts", "__GI__IO_puts.cold"), "__GI__IO_puts.cold");
        assert_eq!(part_name("f", "f.cold.1"), "f.cold.1");
        assert_eq!(part_name("__pthread_create_2_1", "pthread_create@@GLIBC_2.34"), "__pthread_create_2_1");
    }
}
