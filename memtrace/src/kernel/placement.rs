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
    let mut at = 0;
    // endbr64 has no effect on registers or the stack: what follows it sees the same state.
    if code.starts_with(&[0xf3, 0x0f, 0x1e, 0xfa]) {
        at = 4;
    }
    if skip_null_check && code[at..].starts_with(&[0x48, 0x85, 0xff]) {
        // test %rdi,%rdi then je rel32 (0f 84) or je rel8 (74): the fall-through is the
        // non-NULL path, with %rdi untouched.
        at += match code[at + 3..] {
            [0x0f, 0x84, ..] => 9,
            [0x74, ..] => 5,
            _ => return 0,
        };
    }
    if code.get(at..).is_some_and(is_push) { at as u64 } else { 0 }
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
    fn steps_over_endbr64_and_a_null_check() {
        let free = [0xf3, 0x0f, 0x1e, 0xfa, 0x48, 0x85, 0xff, 0x74, 0x10, 0x55, 0x48, 0x89, 0xe5, 0, 0, 0];
        assert_eq!(choose(&free, true), 9);
        assert_eq!(choose(&free, false), 0);
    }

    /// The placement's promise, checked against objdump's decoding of the real libc rather than
    /// against `choose`'s byte patterns: the offset is that of the first `push`, reached from
    /// the entry only through instructions that leave the argument registers and the stack
    /// alone (endbr64; `test %rdi,%rdi` + `je` when NULL calls may be skipped), else 0.
    fn objdump_expectation(lib: &Path, symbol: &str, skip_null_check: bool) -> (u64, String) {
        let tool = |cmd: &mut std::process::Command| {
            let out = cmd.output().expect("objdump and nm (binutils, a dependency of gcc) are needed");
            assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8(out.stdout).unwrap()
        };
        let syms = tool(std::process::Command::new("nm").args(["-D", "--defined-only"]).arg(lib));
        let start = syms
            .lines()
            .find_map(|line| {
                let mut fields = line.split_whitespace();
                let (addr, _, name) = (fields.next()?, fields.next()?, fields.next()?);
                (name.split('@').next() == Some(symbol)).then(|| u64::from_str_radix(addr, 16).unwrap())
            })
            .unwrap_or_else(|| panic!("{} has no dynamic symbol {symbol}", lib.display()));
        let listing = tool(
            std::process::Command::new("objdump")
                .args(["-d", "--no-show-raw-insn"])
                .arg(format!("--start-address={start:#x}"))
                .arg(format!("--stop-address={:#x}", start + 16))
                .arg(lib),
        );
        // Lines like "   98ef0:\ttest   %rdi,%rdi": (address, mnemonic, operands).
        let insns: Vec<(u64, String, String)> = listing
            .lines()
            .filter_map(|line| {
                let (addr, text) = line.trim_start().split_once(":\t")?;
                let addr = u64::from_str_radix(addr, 16).ok()?;
                let mut parts = text.split_whitespace();
                Some((addr, parts.next()?.to_string(), parts.collect::<Vec<_>>().join(" ")))
            })
            .collect();
        let mut i = 0;
        if insns.get(i).is_some_and(|(_, m, _)| m == "endbr64") {
            i += 1;
        }
        if skip_null_check && insns.get(i).is_some_and(|(_, m, o)| m == "test" && o == "%rdi,%rdi") {
            if insns.get(i + 1).is_none_or(|(_, m, _)| m != "je") {
                return (0, listing);
            }
            i += 2;
        }
        let expected = match insns.get(i) {
            Some((addr, m, _)) if m == "push" => addr - start,
            _ => 0,
        };
        (expected, listing)
    }

    #[test]
    fn places_libc_probes_where_objdump_says() {
        let libc = Path::new("/lib/x86_64-linux-gnu/libc.so.6");
        let placement = Placement::new(libc);
        let cases = [("free", true), ("free", false), ("malloc", false), ("calloc", false), ("realloc", false)];
        for (symbol, skip) in cases {
            let (expected, listing) = objdump_expectation(libc, symbol, skip);
            assert_eq!(placement.entry_offset(symbol, skip), expected, "{symbol} (skip NULL: {skip}):\n{listing}");
        }
        assert_eq!(placement.entry_offset("no_such_symbol_here", true), 0);
    }
}
