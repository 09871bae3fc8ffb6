//! Evaluates every FDE's CFI program with gimli and classifies each row into a `Rule`.
//! Everything read here comes from a file the traced program controls: every loop is
//! bounded by the section's length, and rows and evaluated bytes are capped by `Limits`.

use gimli::{
    BaseAddresses, CieOrFde, EndianSlice, FrameDescriptionEntry, LittleEndian, Reader, RegisterRule, UnwindContext,
    UnwindSection, UnwindTableRow, X86_64,
    constants::{
        DW_OP_and, DW_OP_breg7, DW_OP_breg16, DW_OP_ge, DW_OP_lit0, DW_OP_lit3, DW_OP_lit15, DW_OP_plus, DW_OP_shl,
    },
};

use memtrace_common::unwind::{KIND_NO_TABLE, KIND_UNSUPPORTED};

use super::{
    Error, Limits, Stats, UnwindTable,
    row::{CfaRule, PackedRow, RbpRule, RowRule as _, Rule, Unsupported},
};

type R<'a> = EndianSlice<'a, LittleEndian>;

/// Where each unwind section sits: gimli needs the addresses to decode pc-relative pointers.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sections<'a> {
    pub eh_frame: Option<(u64, &'a [u8])>,
    pub eh_frame_hdr: Option<u64>,
    pub debug_frame: Option<(u64, &'a [u8])>,
    pub text: Option<u64>,
    pub got: Option<u64>,
}

/// One FDE's rows in `Builder::raw`. `source` orders overlaps: `.eh_frame` (0) wins over
/// `.debug_frame` (1), since that is what the program itself unwinds with.
struct Span {
    start: u64,
    end: u64,
    source: u8,
    first: usize,
    len: usize,
}

enum EvalError {
    Cfi,
    Limit(Error),
}

struct Builder<'l> {
    limits: &'l Limits,
    raw: Vec<PackedRow>,
    spans: Vec<Span>,
    work: u64,
    stats: Stats,
}

pub fn build(sections: &Sections<'_>, limits: &Limits) -> Result<UnwindTable, Error> {
    let mut b = Builder { limits, raw: Vec::new(), spans: Vec::new(), work: 0, stats: Stats::default() };
    let mut bases = BaseAddresses::default();
    if let Some(text) = sections.text {
        bases = bases.set_text(text);
    }
    if let Some(got) = sections.got {
        bases = bases.set_got(got);
    }
    if let Some(hdr) = sections.eh_frame_hdr {
        bases = bases.set_eh_frame_hdr(hdr);
    }
    if let Some((addr, data)) = sections.eh_frame {
        let mut section = gimli::EhFrame::new(data, LittleEndian);
        section.set_address_size(8);
        b.add_section(&section, &bases.clone().set_eh_frame(addr), 0)?;
    }
    if let Some((_, data)) = sections.debug_frame {
        let mut section = gimli::DebugFrame::new(data, LittleEndian);
        section.set_address_size(8);
        b.add_section(&section, &bases, 1)?;
    }
    Ok(b.finish())
}

impl Builder<'_> {
    fn add_section<'a, S: UnwindSection<R<'a>>>(
        &mut self,
        section: &S,
        bases: &BaseAddresses,
        source: u8,
    ) -> Result<(), Error> {
        let mut ctx = UnwindContext::new();
        let mut entries = section.entries(bases);
        loop {
            let partial = match entries.next() {
                Ok(Some(CieOrFde::Fde(partial))) => partial,
                Ok(Some(CieOrFde::Cie(_))) => continue,
                Ok(None) => break,
                // A broken length field hides where the next entry starts: stop here.
                Err(_) => {
                    self.stats.malformed += 1;
                    break;
                }
            };
            let Ok(fde) = partial.parse(|s, b, o| s.cie_from_offset(b, o)) else {
                self.stats.malformed += 1;
                continue;
            };
            // The CIE's initial instructions run again for every FDE that points at it.
            self.work += (fde.entry_len() + fde.cie().entry_len()) as u64;
            if self.work > self.limits.max_cfi_bytes {
                return Err(Error::TooMuchCfi { limit: self.limits.max_cfi_bytes });
            }
            let start = fde.initial_address();
            let Some(end) = start.checked_add(fde.len()) else {
                self.stats.malformed += 1;
                continue;
            };
            if start == end {
                continue;
            }
            self.stats.fdes += 1;
            let first = self.raw.len();
            match self.eval(section, bases, &mut ctx, &fde, end) {
                Ok(()) => {}
                Err(EvalError::Limit(e)) => return Err(e),
                Err(EvalError::Cfi) => {
                    // Rows before the bad instruction may be fine, but the walker must not
                    // trust any of this FDE.
                    self.raw.truncate(first);
                    self.stats.malformed += 1;
                    self.push(PackedRow::new(start, Rule::Unsupported(Unsupported::Malformed)))?;
                }
            }
            self.spans.push(Span { start, end, source, first, len: self.raw.len() - first });
        }
        Ok(())
    }

    fn push(&mut self, row: PackedRow) -> Result<(), Error> {
        // Each span may add a gap marker when merged; count those so the table stays in cap.
        if self.raw.len() + self.spans.len() + 2 > self.limits.max_rows {
            return Err(Error::TooManyRows { limit: self.limits.max_rows });
        }
        self.raw.push(row);
        Ok(())
    }

    fn eval<'a, S: UnwindSection<R<'a>>>(
        &mut self,
        section: &S,
        bases: &BaseAddresses,
        ctx: &mut UnwindContext<usize>,
        fde: &FrameDescriptionEntry<R<'a>>,
        end: u64,
    ) -> Result<(), EvalError> {
        let fixed = if fde.is_signal_trampoline() {
            Some(Unsupported::SignalFrame)
        } else if fde.cie().return_address_register() != X86_64::RA {
            Some(Unsupported::ReturnAddress)
        } else {
            None
        };
        let mut table = fde.rows(section, bases, ctx).map_err(|_| EvalError::Cfi)?;
        let mut last = None;
        while let Some(row) = table.next_row().map_err(|_| EvalError::Cfi)? {
            let start = row.start_address();
            if start >= end {
                break;
            }
            if start >= row.end_address() {
                continue;
            }
            if last.is_some_and(|last| start <= last) {
                return Err(EvalError::Cfi);
            }
            last = Some(start);
            let rule = match fixed {
                Some(why) => Rule::Unsupported(why),
                None => classify(row, section),
            };
            self.push(PackedRow::new(start, rule)).map_err(EvalError::Limit)?;
        }
        Ok(())
    }

    fn finish(mut self) -> UnwindTable {
        // Stable: for equal starts, file order decides after the source.
        self.spans.sort_by_key(|s| (s.start, s.source));
        let mut rows: Vec<PackedRow> = Vec::with_capacity(self.raw.len() + self.spans.len());
        let mut covered: Option<u64> = None;
        for span in &self.spans {
            // gimli's first row always starts at the FDE's start; anything else is not trusted.
            if self.raw.get(span.first).is_none_or(|r| span.len == 0 || r.pc != span.start) {
                self.stats.malformed += 1;
                continue;
            }
            if let Some(covered) = covered {
                if span.start < covered {
                    self.stats.fdes_overlapping += 1;
                    continue;
                }
                if span.start > covered {
                    push_dedup(&mut rows, PackedRow::new(covered, Rule::NoTable));
                }
            }
            for row in &self.raw[span.first..span.first + span.len] {
                push_dedup(&mut rows, *row);
            }
            covered = Some(span.end);
        }
        if let Some(covered) = covered {
            push_dedup(&mut rows, PackedRow::new(covered, Rule::NoTable));
        }
        drop(self.raw);
        self.stats.rows = rows.len();
        self.stats.bytes = std::mem::size_of_val(rows.as_slice());
        self.stats.unsupported_rows = rows.iter().filter(|r| r.kind == KIND_UNSUPPORTED).count();
        debug_assert!(rows.windows(2).all(|w| w[0].pc < w[1].pc));
        debug_assert!(rows.last().is_none_or(|r| r.kind == KIND_NO_TABLE));
        UnwindTable { rows, stats: self.stats }
    }
}

fn push_dedup(rows: &mut Vec<PackedRow>, row: PackedRow) {
    match rows.last() {
        Some(last) if last.same_rule(&row) => {}
        _ => rows.push(row),
    }
}

fn classify<'a, S: UnwindSection<R<'a>>>(row: &UnwindTableRow<usize>, section: &S) -> Rule {
    match row.register(X86_64::RA) {
        RegisterRule::Offset(-8) => {}
        RegisterRule::Undefined => return Rule::Outermost,
        _ => return Rule::Unsupported(Unsupported::ReturnAddress),
    }
    let cfa = match row.cfa() {
        gimli::CfaRule::RegisterAndOffset { register, offset } => {
            let Ok(offset) = i32::try_from(*offset) else {
                return Rule::Unsupported(Unsupported::OffsetRange);
            };
            match *register {
                X86_64::RSP => CfaRule::RspOffset(offset),
                X86_64::RBP => CfaRule::RbpOffset(offset),
                _ => return Rule::Unsupported(Unsupported::CfaRegister),
            }
        }
        gimli::CfaRule::Expression(expr) => match expr.get(section).ok().and_then(|e| plt(e.0)) {
            Some(cfa) => cfa,
            None => return Rule::Unsupported(Unsupported::CfaExpression),
        },
    };
    let rbp = match row.register(X86_64::RBP) {
        RegisterRule::Undefined | RegisterRule::SameValue => RbpRule::Unchanged,
        RegisterRule::Offset(offset) => match i16::try_from(offset) {
            Ok(offset) => RbpRule::AtCfaOffset(offset),
            Err(_) => return Rule::Unsupported(Unsupported::OffsetRange),
        },
        _ => return Rule::Unsupported(Unsupported::RbpRule),
    };
    if matches!(cfa, CfaRule::Plt { .. }) && rbp != RbpRule::Unchanged {
        return Rule::Unsupported(Unsupported::RbpRule);
    }
    Rule::Frame { cfa, rbp }
}

/// Recognises the expression binutils' ld writes for `.plt` (and `.plt.sec` variants):
/// `breg7(rsp) N; breg16(rip) 0; lit15; and; litT; ge; lit3; shl; plus`,
/// that is CFA = RSP + N + ((RIP & 15) >= T ? 8 : 0).
fn plt(mut ops: R<'_>) -> Option<CfaRule> {
    if ops.read_u8().ok()? != DW_OP_breg7.0 {
        return None;
    }
    let rsp_offset = i32::try_from(ops.read_sleb128().ok()?).ok()?;
    if ops.read_u8().ok()? != DW_OP_breg16.0 || ops.read_sleb128().ok()? != 0 {
        return None;
    }
    let rest = ops.slice();
    let threshold = rest.get(2)?.checked_sub(DW_OP_lit0.0)?;
    let expected =
        [DW_OP_lit15.0, DW_OP_and.0, DW_OP_lit0.0 + threshold, DW_OP_ge.0, DW_OP_lit3.0, DW_OP_shl.0, DW_OP_plus.0];
    (threshold <= 15 && rest == expected).then_some(CfaRule::Plt { rsp_offset, threshold })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwind_plt_expression_is_recognised_exactly() {
        // As in libc.so.6's .plt FDE (readelf: DW_OP_breg7 (rsp): 8; DW_OP_breg16 (rip): 0;
        // DW_OP_lit15; DW_OP_and; DW_OP_lit11; DW_OP_ge; DW_OP_lit3; DW_OP_shl; DW_OP_plus).
        let bytes = [0x77, 8, 0x80, 0, 0x3f, 0x1a, 0x3b, 0x2a, 0x33, 0x24, 0x22];
        assert_eq!(plt(R::new(&bytes, LittleEndian)), Some(CfaRule::Plt { rsp_offset: 8, threshold: 11 }));
        // Any other operation, a trailing byte, or a non-zero RIP offset is not the pattern.
        for bad in [
            &bytes[..10],
            &[0x77, 8, 0x80, 0, 0x3f, 0x1a, 0x3b, 0x2a, 0x33, 0x24, 0x22, 0x96][..],
            &[0x77, 8, 0x80, 1, 0x3f, 0x1a, 0x3b, 0x2a, 0x33, 0x24, 0x22][..],
            &[0x77, 8, 0x80, 0, 0x3f, 0x1a, 0x3b, 0x2a, 0x33, 0x24, 0x1c][..],
            &[0x77, 0x80, 0x01, 0x06][..],
            &[][..],
        ] {
            assert_eq!(plt(R::new(bad, LittleEndian)), None, "{bad:x?}");
        }
    }
}
