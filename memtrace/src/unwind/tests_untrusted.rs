//! The builder on hostile input: hand-made sections with exact expected rows, sections built
//! to cost too much, and random or mutated sections and files (proptest), which must never
//! panic and must stay within `Limits`.

use object::{Object, ObjectSection};
use proptest::prelude::*;

use super::*;

/// A minimal `.eh_frame`: one CIE without augmentation (so FDE addresses are absolute 8-byte
/// values) whose initial instructions are `cie_ops`, then one FDE per (start, len, ops).
fn eh_frame(cie_ops: &[u8], fdes: &[(u64, u64, Vec<u8>)]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, body: &[u8]) {
        let mut body = body.to_vec();
        while !(body.len() + 4).is_multiple_of(8) {
            body.push(0); // DW_CFA_nop
        }
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
    }
    let mut out = Vec::new();
    // id 0, version 1, "", code align 1, data align -8, return address r16.
    let mut cie = vec![0, 0, 0, 0, 1, 0, 1, 0x78, 16];
    cie.extend_from_slice(cie_ops);
    entry(&mut out, &cie);
    for (start, len, ops) in fdes {
        let cie_pointer = (out.len() + 4) as u32;
        let mut fde = cie_pointer.to_le_bytes().to_vec();
        fde.extend_from_slice(&start.to_le_bytes());
        fde.extend_from_slice(&len.to_le_bytes());
        fde.extend_from_slice(ops);
        entry(&mut out, &fde);
    }
    out.extend_from_slice(&[0, 0, 0, 0]); // terminator
    out
}

/// DW_CFA_def_cfa rsp 8; DW_CFA_offset rip at cfa-8.
const CIE_OPS: &[u8] = &[0x0c, 7, 8, 0x90, 1];

fn build_eh(data: &[u8], limits: &Limits) -> Result<UnwindTable, Error> {
    build(&Sections { eh_frame: Some((0x2000, data)), ..Sections::default() }, limits)
}

fn rsp(n: i32, rbp: RbpRule) -> Rule {
    Rule::Frame { cfa: CfaRule::RspOffset(n), rbp }
}

#[test]
fn unwind_handmade_table_has_gaps_merges_and_drops_overlaps() {
    let push_rbp = vec![0x41, 0x0e, 16, 0x86, 2]; // advance 1; cfa rsp+16; rbp at cfa-16
    let data = eh_frame(
        CIE_OPS,
        &[
            (0x1020, 0x10, vec![]),
            (0x1000, 0x10, push_rbp.clone()),
            (0x1008, 0x10, vec![]),          // overlaps the one at 0x1000: dropped
            (0x1030, 0x10, vec![]),          // adjacent, same rule: merged
            (0x1050, 0, push_rbp),           // empty range: ignored
            (0x1060, 0x8, vec![0x07, 16]),   // DW_CFA_undefined rip: outermost
            (0x1070, 0x8, vec![0x0c, 3, 8]), // CFA on rbx
        ],
    );
    let table = build_eh(&data, &Limits::default()).expect("table");
    let rows: Vec<(u64, Rule)> = table.rows().iter().map(|r| (r.pc, r.rule())).collect();
    let saved = RbpRule::AtCfaOffset(-16);
    assert_eq!(
        rows,
        [
            (0x1000, rsp(8, RbpRule::Unchanged)),
            (0x1001, rsp(16, saved)),
            (0x1010, Rule::NoTable),
            (0x1020, rsp(8, RbpRule::Unchanged)),
            (0x1040, Rule::NoTable),
            (0x1060, Rule::Outermost),
            (0x1068, Rule::NoTable),
            (0x1070, Rule::Unsupported(Unsupported::CfaRegister)),
            (0x1078, Rule::NoTable),
        ]
    );
    assert_eq!(table.lookup(0xfff), Rule::NoTable);
    assert_eq!(table.lookup(0x100f), rsp(16, saved));
    assert_eq!(table.lookup(0x1015), Rule::NoTable);
    assert_eq!(table.lookup(0x103f), rsp(8, RbpRule::Unchanged));
    assert_eq!(table.lookup(u64::MAX), Rule::NoTable);
    let stats = table.stats();
    assert_eq!((stats.fdes, stats.fdes_overlapping, stats.rows, stats.bytes), (6, 1, 9, 144));
    assert_eq!((stats.unsupported_rows, stats.malformed), (1, 0));
}

#[test]
fn unwind_bad_instruction_marks_the_fde_malformed() {
    // 0x2f is not a CFA opcode: the whole FDE is unsupported, its neighbour is untouched.
    let data = eh_frame(CIE_OPS, &[(0x1000, 0x10, vec![0x41, 0x0e, 16, 0x2f]), (0x1010, 0x10, vec![])]);
    let table = build_eh(&data, &Limits::default()).expect("table");
    assert_eq!(table.lookup(0x1005), Rule::Unsupported(Unsupported::Malformed));
    assert_eq!(table.lookup(0x1010), rsp(8, RbpRule::Unchanged));
    assert_eq!(table.stats().malformed, 1);
}

#[test]
fn unwind_shared_cie_work_is_capped() {
    // A CIE of 60k no-ops re-run by 5,000 FDEs would be 300 MB of evaluation.
    let fdes: Vec<_> = (0..5000).map(|i| (0x1000 + i * 16, 16, vec![])).collect();
    let mut cie_ops = CIE_OPS.to_vec();
    cie_ops.resize(60_000, 0);
    let data = eh_frame(&cie_ops, &fdes);
    let limits = Limits { max_cfi_bytes: 8 << 20, ..Limits::default() };
    let start = std::time::Instant::now();
    let err = build_eh(&data, &limits).expect_err("capped");
    assert!(matches!(err, Error::TooMuchCfi { limit } if limit == 8 << 20), "{err}");
    assert!(start.elapsed().as_secs() < 5, "{:?}", start.elapsed());
}

#[test]
fn unwind_row_count_is_capped() {
    // 20k rows alternating between two rules, so deduplication cannot hide them.
    let ops: Vec<u8> = (0..20_000).flat_map(|i| [0x41, 0x0e, if i % 2 == 0 { 16 } else { 8 }]).collect();
    let data = eh_frame(CIE_OPS, &[(0x1000, 1 << 20, ops)]);
    let limits = Limits { max_rows: 10_000, ..Limits::default() };
    assert!(matches!(build_eh(&data, &limits), Err(Error::TooManyRows { limit: 10_000 })));
    let table = build_eh(&data, &Limits::default()).expect("within the default cap");
    assert_eq!(table.rows().len(), 20_002);
}

fn check_caps(result: Result<UnwindTable, Error>, limits: &Limits) {
    let Ok(table) = result else { return };
    let rows = table.rows();
    assert!(rows.len() <= limits.max_rows, "{} rows", rows.len());
    assert!(rows.windows(2).all(|w| w[0].pc < w[1].pc));
    assert!(rows.last().is_none_or(|r| r.rule() == Rule::NoTable));
    assert_eq!(table.stats().bytes, rows.len() * 16);
    for row in rows {
        // Decoding never panics and round-trips.
        assert_eq!(PackedRow::new(row.pc, row.rule()).rule(), row.rule());
    }
}

fn small_limits() -> Limits {
    Limits { max_rows: 20_000, max_section_bytes: 1 << 20, max_cfi_bytes: 4 << 20 }
}

/// libc's `.eh_frame` and its address, read once.
fn libc_eh_frame() -> &'static (u64, Vec<u8>) {
    static SECTION: std::sync::OnceLock<(u64, Vec<u8>)> = std::sync::OnceLock::new();
    SECTION.get_or_init(|| {
        let data = std::fs::read("/usr/lib/x86_64-linux-gnu/libc.so.6").expect("libc");
        let file = object::File::parse(&*data).expect("ELF");
        let s = file.section_by_name(".eh_frame").expect(".eh_frame");
        (s.address(), s.data().expect("data").to_vec())
    })
}

fn small_elf() -> &'static Vec<u8> {
    static FILE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    FILE.get_or_init(|| std::fs::read("/usr/bin/true").expect("/usr/bin/true"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn unwind_random_sections_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..4096),
        addr in any::<u64>(),
    ) {
        let limits = small_limits();
        check_caps(build_eh(&bytes, &limits), &limits);
        let debug = Sections { debug_frame: Some((addr, &bytes)), ..Sections::default() };
        check_caps(build(&debug, &limits), &limits);
        check_caps(UnwindTable::from_elf(&*bytes, &limits), &limits);
    }

    #[test]
    fn unwind_mutated_libc_eh_frame_never_panics(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..24),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let (addr, original) = libc_eh_frame();
        let mut bytes = original.clone();
        for (at, value) in edits {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        let limits = small_limits();
        let sections = Sections { eh_frame: Some((*addr, &bytes)), ..Sections::default() };
        check_caps(build(&sections, &limits), &limits);
    }

    #[test]
    fn unwind_mutated_elf_file_never_panics(
        header_edits in proptest::collection::vec((0usize..64, any::<u8>()), 0..4),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..16),
    ) {
        let mut bytes = small_elf().clone();
        for (i, value) in header_edits {
            bytes[i] = value;
        }
        for (at, value) in edits {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        let limits = small_limits();
        check_caps(UnwindTable::from_elf(&*bytes, &limits), &limits);
    }
}
