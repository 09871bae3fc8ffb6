//! Tables built from Debian's own binaries and from freshly compiled C, checked address by
//! address against `readelf --debug-dump=frames-interp` run at test time, so the tests hold on
//! other builds of glibc, libstdc++ and Python.

use std::{path::Path, path::PathBuf, process::Command};

use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};

use super::*;

const LIBC: &str = "/usr/lib/x86_64-linux-gnu/libc.so.6";
const LIBSTDCXX: &str = "/usr/lib/x86_64-linux-gnu/libstdc++.so.6";
const PYTHON: &str = "/usr/bin/python3.11";

const RSP8: Rule = Rule::Frame { cfa: CfaRule::RspOffset(8), rbp: RbpRule::Unchanged };

fn table(path: &Path) -> UnwindTable {
    UnwindTable::from_elf_path(path, &Limits::default()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A function's address from `.dynsym` or `.symtab`.
fn symbol(path: &Path, name: &str) -> u64 {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let file = object::File::parse(&*data).expect("ELF");
    file.dynamic_symbols()
        .chain(file.symbols())
        .find(|s| s.kind() == SymbolKind::Text && s.address() != 0 && s.name() == Ok(name))
        .unwrap_or_else(|| panic!("{name} not found in {}", path.display()))
        .address()
}

/// One FDE as readelf evaluates it: its range and, per row, the rule we must produce
/// (`None` for a DWARF expression, which is checked apart).
struct ReadelfFde {
    start: u64,
    end: u64,
    rows: Vec<(u64, Option<Rule>)>,
}

impl ReadelfFde {
    fn rule_at(&self, pc: u64) -> Option<Rule> {
        self.rows.iter().rev().find(|(loc, _)| *loc <= pc).expect("row").1
    }
}

fn readelf(path: &Path) -> Vec<ReadelfFde> {
    let out = Command::new("readelf")
        .args(["--wide", "--debug-dump=frames-interp"])
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("readelf (binutils) is needed by this test: {e}"));
    // readelf exits 1 on libc.so.6 with nothing on stderr yet prints every FDE: judge by
    // the output.
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(" FDE "),
        "readelf printed no FDE for {} (exit {}): {}",
        path.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut fdes = Vec::new();
    let mut columns: Vec<&str> = Vec::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(range) = words.iter().find_map(|w| w.strip_prefix("pc="))
            && words.get(3) == Some(&"FDE")
        {
            let (start, end) = range.split_once("..").expect("pc=a..b");
            fdes.push(ReadelfFde {
                start: u64::from_str_radix(start, 16).expect("hex"),
                end: u64::from_str_radix(end, 16).expect("hex"),
                rows: Vec::new(),
            });
        } else if words.first() == Some(&"LOC") {
            columns = words;
        } else if let (Some(fde), Some(loc)) = (fdes.last_mut(), words.first())
            && words.len() == columns.len()
            && let Ok(loc) = u64::from_str_radix(loc, 16)
        {
            let value = |name: &str| columns.iter().position(|c| *c == name).map(|i| words[i]);
            fde.rows.push((loc, expected(value("CFA"), value("rbp"), value("ra"))));
        }
    }
    fdes
}

fn offset(s: &str, prefix: &str) -> Option<i64> {
    let rest = s.strip_prefix(prefix)?;
    match rest.strip_prefix('+') {
        Some(n) => n.parse().ok(),
        None => rest.parse().ok(),
    }
}

fn expected(cfa: Option<&str>, rbp: Option<&str>, ra: Option<&str>) -> Option<Rule> {
    match ra {
        Some("c-8") => {}
        Some("u") | None => return Some(Rule::Outermost),
        _ => return Some(Rule::Unsupported(Unsupported::ReturnAddress)),
    }
    let cfa = cfa.expect("CFA column");
    let cfa = if let Some(n) = offset(cfa, "rsp") {
        CfaRule::RspOffset(n.try_into().ok()?)
    } else if let Some(n) = offset(cfa, "rbp") {
        CfaRule::RbpOffset(n.try_into().ok()?)
    } else if cfa == "exp" {
        return None;
    } else {
        return Some(Rule::Unsupported(Unsupported::CfaRegister));
    };
    let rbp = match rbp {
        None | Some("u") | Some("s") => RbpRule::Unchanged,
        Some(r) => match offset(r, "c") {
            Some(n) => RbpRule::AtCfaOffset(n.try_into().ok()?),
            None => return Some(Rule::Unsupported(Unsupported::RbpRule)),
        },
    };
    Some(Rule::Frame { cfa, rbp })
}

/// Every byte of the FDE that covers `pc` gets readelf's rule; returns that FDE's rules.
fn check_against_readelf(path: &Path, table: &UnwindTable, pc: u64) -> Vec<Rule> {
    let fdes = readelf(path);
    let fde = fdes
        .iter()
        .find(|f| f.start <= pc && pc < f.end)
        .unwrap_or_else(|| panic!("readelf shows no FDE for {pc:#x} in {}", path.display()));
    assert!(!fde.rows.is_empty(), "readelf printed no rows for {pc:#x}");
    let mut rules = Vec::new();
    for addr in fde.start..fde.end {
        let ours = table.lookup(addr);
        match fde.rule_at(addr) {
            Some(want) => assert_eq!(ours, want, "{}: at {addr:#x}", path.display()),
            None => assert!(
                matches!(
                    ours,
                    Rule::Unsupported(Unsupported::CfaExpression) | Rule::Frame { cfa: CfaRule::Plt { .. }, .. }
                ),
                "{}: at {addr:#x} readelf shows an expression, we have {ours:?}",
                path.display()
            ),
        }
        if rules.last() != Some(&ours) {
            rules.push(ours);
        }
    }
    // Past the FDE: either the next FDE's rule or no table, never this FDE's last rule
    // leaking into a gap.
    let after = table.lookup(fde.end);
    match fdes.iter().find(|f| f.start <= fde.end && fde.end < f.end) {
        None => assert_eq!(after, Rule::NoTable, "gap after the FDE at {:#x}", fde.start),
        Some(next) => assert_ne!(after, Rule::NoTable, "FDE at {:#x} is lost", next.start),
    }
    rules
}

/// Every FDE readelf lists starts a covered range, and every `NoTable` row lies outside
/// all of them; rows are sorted, deduplicated and end with `NoTable`.
fn check_coverage(path: &Path, table: &UnwindTable) {
    let fdes = readelf(path);
    for f in fdes.iter().filter(|f| f.start < f.end) {
        assert_ne!(table.lookup(f.start), Rule::NoTable, "FDE {:#x} lost", f.start);
    }
    let rows = table.rows();
    assert!(rows.windows(2).all(|w| w[0].pc < w[1].pc && !w[0].same_rule(&w[1])));
    assert_eq!(rows.last().map(PackedRow::rule), Some(Rule::NoTable));
    for row in rows.iter().filter(|r| r.rule() == Rule::NoTable) {
        assert!(
            !fdes.iter().any(|f| f.start <= row.pc && row.pc < f.end),
            "{}: no-table row at {:#x} inside an FDE",
            path.display(),
            row.pc
        );
    }
    let stats = table.stats();
    assert_eq!(stats.rows, rows.len());
    assert_eq!(stats.bytes, rows.len() * 16);
    assert_eq!(stats.malformed, 0, "{}: {stats:?}", path.display());
    let nonempty = fdes.iter().filter(|f| f.start < f.end).count();
    assert_eq!(stats.fdes, nonempty, "{}: FDEs", path.display());
    eprintln!("{}: {stats:?}", path.display());
}

fn check_function(path: &str, name: &str) -> Vec<Rule> {
    let path = Path::new(path);
    let table = table(path);
    let pc = symbol(path, name);
    assert_eq!(table.lookup(pc), RSP8, "{name} entry in {}", path.display());
    let rules = check_against_readelf(path, &table, pc);
    check_coverage(path, &table);
    rules
}

#[test]
fn unwind_libc_malloc_matches_readelf() {
    let rules = check_function(LIBC, "malloc");
    // Debian's malloc pushes callee-saved registers, RBP among them, without a frame pointer.
    assert!(rules.iter().any(|r| matches!(
        r,
        Rule::Frame {
            cfa: CfaRule::RspOffset(n),
            rbp: RbpRule::AtCfaOffset(_)
        } if *n > 16
    )));
}

#[test]
fn unwind_libstdcxx_operator_new_matches_readelf() {
    let rules = check_function(LIBSTDCXX, "_Znwm");
    assert!(rules.len() > 1, "operator new pushes something: {rules:?}");
}

#[test]
fn unwind_python_eval_frame_matches_readelf() {
    let rules = check_function(PYTHON, "_PyEval_EvalFrameDefault");
    assert!(rules.len() > 1, "{rules:?}");
}

#[test]
fn unwind_libc_plt_and_outermost_rows() {
    let table = table(Path::new(LIBC));
    // libc's .plt FDE uses the PLT expression; it must not come out unsupported.
    assert!(
        table
            .rows()
            .iter()
            .any(|r| matches!(r.rule(), Rule::Frame { cfa: CfaRule::Plt { rsp_offset: 8, threshold: 11 }, .. }))
    );
    // __restore_rt is a signal trampoline.
    assert!(table.rows().iter().any(|r| r.rule() == Rule::Unsupported(Unsupported::SignalFrame)));
}

const C_SOURCE: &str = r#"
#include <stdio.h>
#include <stdlib.h>
__attribute__((noinline)) long work(long n) {
    char *p = malloc(n);
    long s = 0;
    for (long i = 0; i < n; i++) { p[i] = (char)i; s += p[i] * i; }
    printf("%ld\n", s);
    free(p);
    return s;
}
int main(int argc, char **argv) { (void)argv; return (int)work(argc * 100); }
"#;

fn compile(flags: &[&str], tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("memtrace-unwind-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let src = dir.join("work.c");
    std::fs::write(&src, C_SOURCE).expect("write C");
    let bin = dir.join("work");
    let status = Command::new("cc")
        .args(flags)
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .status()
        .unwrap_or_else(|e| panic!("cc is needed by this test: {e}"));
    assert!(status.success(), "cc {flags:?} failed");
    bin
}

#[test]
fn unwind_frame_pointer_build_gets_rbp_rows() {
    let bin = compile(&["-O2", "-fno-omit-frame-pointer"], "fp");
    let table = table(&bin);
    let work = symbol(&bin, "work");
    let rules = check_against_readelf(&bin, &table, work);
    // push %rbp; mov %rsp,%rbp: then the CFA follows RBP.
    let saved = RbpRule::AtCfaOffset(-16);
    assert_eq!(
        rules[..3],
        [
            RSP8,
            Rule::Frame { cfa: CfaRule::RspOffset(16), rbp: saved },
            Rule::Frame { cfa: CfaRule::RbpOffset(16), rbp: saved }
        ]
    );
    check_coverage(&bin, &table);
    std::fs::remove_dir_all(bin.parent().expect("dir")).ok();
}

#[test]
fn unwind_omitted_frame_pointer_build_is_rsp_only() {
    let bin = compile(&["-O2", "-fomit-frame-pointer"], "nofp");
    let table = table(&bin);
    let work = symbol(&bin, "work");
    let rules = check_against_readelf(&bin, &table, work);
    assert_eq!(rules[0], RSP8);
    assert!(rules.len() > 1, "work pushes registers: {rules:?}");
    assert!(rules.iter().all(|r| matches!(r, Rule::Frame { cfa: CfaRule::RspOffset(_), .. })), "{rules:?}");
    check_coverage(&bin, &table);
    std::fs::remove_dir_all(bin.parent().expect("dir")).ok();
}

#[test]
fn unwind_debug_frame_only_build_is_read() {
    // No .eh_frame for our code, only .debug_frame from -g.
    let bin = compile(&["-O2", "-g", "-fno-asynchronous-unwind-tables", "-fno-unwind-tables"], "debugframe");
    let table = table(&bin);
    let work = symbol(&bin, "work");
    let rules = check_against_readelf(&bin, &table, work);
    assert_eq!(rules[0], RSP8);
    // And the rows did come from .debug_frame: .eh_frame alone has none for `work`.
    let data = std::fs::read(&bin).expect("read");
    let file = object::File::parse(&*data).expect("ELF");
    let eh = file.section_by_name(".eh_frame").expect(".eh_frame");
    let eh_data = eh.data().expect("data");
    let sections = Sections { eh_frame: Some((eh.address(), eh_data)), ..Sections::default() };
    let eh_only = build(&sections, &Limits::default()).expect("table");
    assert_eq!(eh_only.lookup(work), Rule::NoTable);
    std::fs::remove_dir_all(bin.parent().expect("dir")).ok();
}

#[test]
fn unwind_not_x86_64_elf_is_an_error() {
    let limits = Limits::default();
    assert!(matches!(UnwindTable::from_elf(&b"#!/bin/sh\n"[..], &limits), Err(Error::NotElf(_))));
    assert!(matches!(UnwindTable::from_elf_path(Path::new("/nonexistent/lib.so"), &limits), Err(Error::Io(_))));
    let tight = Limits { max_section_bytes: 1024, ..limits };
    let err = UnwindTable::from_elf_path(Path::new(LIBC), &tight).expect_err("too large");
    assert!(err.to_string().starts_with(".eh_frame is ") && err.to_string().contains("1024"), "{err}");
    let tight = Limits { max_rows: 100, ..limits };
    assert_eq!(
        UnwindTable::from_elf_path(Path::new(LIBC), &tight).expect_err("too many rows").to_string(),
        "unwind information needs more than 100 rows"
    );
}

#[test]
fn unwind_mapping_bias_picks_the_segment_mapped_at_that_offset() {
    // A Rust release binary's layout: read-only data up to 0x12a44, text from file offset
    // 0x12a50 at vaddr 0x13a50; the text mapping starts at offset 0x12000, which both hold.
    let segments = [
        Segment { offset: 0, vaddr: 0, filesz: 0x12a44 },
        Segment { offset: 0x12a50, vaddr: 0x13a50, filesz: 0x3d080 },
    ];
    let base = 0x5555_0000_0000;
    assert_eq!(mapping_bias(&segments, base + 0x13000, 0x12000), Some(base));
    assert_eq!(mapping_bias(&segments, base, 0), Some(base));
    assert_eq!(mapping_bias(&segments, base, 0x90000), None);
}
