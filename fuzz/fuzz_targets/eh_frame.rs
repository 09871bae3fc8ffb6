//! Untrusted unwind information must never crash memtrace nor escape `Limits` (issue 9).
#![no_main]

#[allow(dead_code, unused_imports, reason = "only the builder is fuzzed")]
#[path = "../../memtrace/src/unwind/mod.rs"]
mod unwind;

use unwind::{Limits, RowRule as _, Rule, Sections, UnwindTable, build};

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    let Some((&mode, data)) = input.split_first() else {
        return;
    };
    let limits = Limits { max_rows: 1 << 16, max_section_bytes: 1 << 20, max_cfi_bytes: 1 << 22 };
    let result = match mode % 3 {
        0 => build(&Sections { eh_frame: Some((0x1000, data)), ..Sections::default() }, &limits),
        1 => build(&Sections { debug_frame: Some((0, data)), ..Sections::default() }, &limits),
        _ => UnwindTable::from_elf(data, &limits),
    };
    if let Ok(table) = result {
        let rows = table.rows();
        assert!(rows.len() <= limits.max_rows);
        assert!(rows.windows(2).all(|w| w[0].pc < w[1].pc));
        assert!(rows.last().is_none_or(|r| r.rule() == Rule::NoTable));
    }
});
