//! Where to put an entry uprobe so that the kernel can emulate the probed instruction.
//!
//! x86 uprobes emulate a few instructions (push, jmp, call, nop) in place; any other one is
//! single-stepped out of line, an extra trap and a slot setup on every call. Measured here
//! (6.18): glibc's `free` starts with `test %rdi,%rdi`, and a probe at +0 cost 37x one placed on
//! the `push` after its NULL check, and more than the malloc, calloc and realloc probes together.

use std::{fs::File, os::unix::fs::FileExt as _, path::Path};

use blazesym::inspect::{
    Inspector,
    source::{Elf, Source},
};

/// Entry-probe placement for the functions of one ELF file (its symbol table is read once).
pub struct Placement<'a> {
    target: &'a Path,
    inspector: Inspector,
}

impl<'a> Placement<'a> {
    pub fn new(target: &'a Path) -> Self {
        Placement { target, inspector: Inspector::new() }
    }

    /// The offset into `symbol` at which an entry probe sees the same arguments as at +0 on an
    /// emulated instruction, or 0 when none is known. `skip_null_check`: the caller does not
    /// need calls whose first argument is NULL (free(NULL) is a no-op), so a leading
    /// `test %rdi,%rdi; je` may be stepped over.
    pub fn entry_offset(&self, symbol: &str, skip_null_check: bool) -> u64 {
        let offset = code_at(&self.inspector, self.target, symbol).map_or(0, |code| choose(&code, skip_null_check));
        if offset != 0 {
            tracing::debug!("{symbol}: entry probe at +{offset} (an instruction the kernel emulates)");
        }
        offset
    }
}

/// The first bytes of `symbol`'s code.
fn code_at(inspector: &Inspector, target: &Path, symbol: &str) -> Option<[u8; 16]> {
    // The library's own symbol table: symbols from separate debug files carry no file offset.
    let mut elf = Elf::new(target);
    elf.debug_syms = false;
    let found = inspector.lookup(&Source::Elf(elf), &[symbol]).ok()?;
    let offset = found.first()?.first()?.file_offset?;
    let mut code = [0u8; 16];
    File::open(target).ok()?.read_exact_at(&mut code, offset).ok()?;
    Some(code)
}

/// push %reg or push %r8-15: emulated, and leaves the argument registers alone.
fn is_push(code: &[u8]) -> bool {
    matches!(code, [0x50..=0x57, ..] | [0x41, 0x50..=0x57, ..])
}

fn choose(code: &[u8], skip_null_check: bool) -> u64 {
    if is_push(code) {
        return 0;
    }
    // endbr64 has no effect on registers or the stack: the push after it sees the same state.
    if code.starts_with(&[0xf3, 0x0f, 0x1e, 0xfa]) && is_push(&code[4..]) {
        return 4;
    }
    if skip_null_check && code.starts_with(&[0x48, 0x85, 0xff]) {
        // test %rdi,%rdi then je rel32 (0f 84) or je rel8 (74): the fall-through is the
        // non-NULL path, with %rdi untouched.
        let after = match code[3..] {
            [0x0f, 0x84, ..] => 9,
            [0x74, ..] => 5,
            _ => return 0,
        };
        if is_push(&code[after..]) {
            return after as u64;
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_emulated_entries() {
        assert_eq!(choose(&[0x41, 0x54, 0x55, 0x53], false), 0); // malloc: push %r12
        assert_eq!(choose(&[0x55, 0x48, 0x89, 0xe5], true), 0);
    }

    #[test]
    fn steps_over_endbr64() {
        assert_eq!(choose(&[0xf3, 0x0f, 0x1e, 0xfa, 0x55, 0x48], false), 4);
        assert_eq!(choose(&[0xf3, 0x0f, 0x1e, 0xfa, 0x48, 0x85], false), 0);
    }

    #[test]
    fn steps_over_a_null_check_only_when_allowed() {
        // glibc 2.36 free: test %rdi,%rdi; je rel32; push %rbp
        let free = [0x48, 0x85, 0xff, 0x0f, 0x84, 0xbf, 0x00, 0x00, 0x00, 0x55, 0x48];
        assert_eq!(choose(&free, true), 9);
        assert_eq!(choose(&free, false), 0);
        let short = [0x48, 0x85, 0xff, 0x74, 0x10, 0x41, 0x54];
        assert_eq!(choose(&short, true), 5);
        // Not followed by a push: stay at the entry.
        assert_eq!(choose(&[0x48, 0x85, 0xff, 0x74, 0x10, 0x48, 0x8b], true), 0);
    }

    #[test]
    fn finds_glibc_free_in_the_real_library() {
        let libc = Path::new("/lib/x86_64-linux-gnu/libc.so.6");
        let code = code_at(&Inspector::new(), libc, "free").expect("libc has free");
        // Whatever this libc's free starts with, the choice is one of the known safe ones.
        assert!([0, 4, 5, 9].contains(&choose(&code, true)), "{code:02x?}");
        assert_eq!(Placement::new(libc).entry_offset("no_such_symbol_here", true), 0);
    }
}
