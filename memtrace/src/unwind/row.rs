//! The row of an unwind table: a typed view for user space and the packed form the BPF maps
//! will hold. One row is valid from its `pc` up to the next row's `pc`.

/// How to find the caller's frame from a PC, in the terms an x86-64 unwinder needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// No unwind information covers this PC (a gap between FDEs, or past the last one).
    NoTable,
    /// The return address is at CFA-8; the caller's RSP is the CFA.
    Frame { cfa: CfaRule, rbp: RbpRule },
    /// The return address is undefined: this is the outermost frame (`_start`, thread entry),
    /// so a walk that reaches it is complete rather than cut short.
    Outermost,
    /// Unwind information exists but uses something the walker cannot evaluate.
    Unsupported(Unsupported),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CfaRule {
    RspOffset(i32),
    RbpOffset(i32),
    /// The PLT's expression: CFA = RSP + `rsp_offset`, plus 8 once `(pc & 15) >= threshold`,
    /// i.e. after the stub has pushed its relocation index.
    Plt {
        rsp_offset: i32,
        threshold: u8,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RbpRule {
    /// RBP still holds the caller's value.
    Unchanged,
    /// The caller's RBP was saved at CFA + offset.
    AtCfaOffset(i16),
}

/// Why a row cannot be walked; the eBPF side will count cut stacks by these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Unsupported {
    /// The CFA is based on a register other than RSP or RBP (e.g. R10 during stack realignment).
    CfaRegister = 1,
    /// The CFA is a DWARF expression other than the PLT pattern.
    CfaExpression = 2,
    /// The return address is not at CFA-8, or the CIE names another return-address column.
    ReturnAddress = 3,
    /// RBP was saved some other way than at CFA+N (in a register, by expression).
    RbpRule = 4,
    /// An offset did not fit the packed row.
    OffsetRange = 5,
    /// A signal trampoline (`__restore_rt`): its frame is a ucontext, not a call.
    SignalFrame = 6,
    /// The FDE's instructions could not be evaluated.
    Malformed = 7,
}

impl Unsupported {
    #[cfg_attr(not(test), allow(dead_code, reason = "for the tests and the fuzz target"))]
    const ALL: [Unsupported; 7] = [
        Unsupported::CfaRegister,
        Unsupported::CfaExpression,
        Unsupported::ReturnAddress,
        Unsupported::RbpRule,
        Unsupported::OffsetRange,
        Unsupported::SignalFrame,
        Unsupported::Malformed,
    ];
}

pub use memtrace_common::unwind::PackedRow;
use memtrace_common::unwind::{
    KIND_CFA_RBP, KIND_CFA_RSP, KIND_NO_TABLE, KIND_OUTERMOST, KIND_PLT, KIND_UNSUPPORTED, RBP_AT_CFA, RBP_UNCHANGED,
};

const _: () = assert!(std::mem::size_of::<PackedRow>() == 16);

/// The typed view of a packed row (the row type lives in memtrace-common, shared with eBPF).
pub trait RowRule: Sized {
    fn new(pc: u64, rule: Rule) -> Self;
    #[cfg_attr(not(test), allow(dead_code, reason = "for the tests and the fuzz target"))]
    fn rule(&self) -> Rule;
    /// Same unwinding rule, whatever the PC: consecutive such rows are merged.
    fn same_rule(&self, other: &Self) -> bool;
}

impl RowRule for PackedRow {
    fn new(pc: u64, rule: Rule) -> Self {
        let (kind, cfa_offset, rbp_kind, rbp_offset) = match rule {
            Rule::NoTable => (KIND_NO_TABLE, 0, RBP_UNCHANGED, 0),
            Rule::Outermost => (KIND_OUTERMOST, 0, RBP_UNCHANGED, 0),
            Rule::Unsupported(why) => (KIND_UNSUPPORTED, why as i32, RBP_UNCHANGED, 0),
            Rule::Frame { cfa, rbp } => {
                let (rbp_kind, rbp_offset) = match rbp {
                    RbpRule::Unchanged => (RBP_UNCHANGED, 0),
                    RbpRule::AtCfaOffset(off) => (RBP_AT_CFA, off),
                };
                match cfa {
                    CfaRule::RspOffset(off) => (KIND_CFA_RSP, off, rbp_kind, rbp_offset),
                    CfaRule::RbpOffset(off) => (KIND_CFA_RBP, off, rbp_kind, rbp_offset),
                    CfaRule::Plt { rsp_offset, threshold } => {
                        (KIND_PLT, rsp_offset, RBP_UNCHANGED, i16::from(threshold))
                    }
                }
            }
        };
        PackedRow { pc, cfa_offset, rbp_offset, kind, rbp_kind }
    }

    fn rule(&self) -> Rule {
        let rbp = match self.rbp_kind {
            RBP_AT_CFA => RbpRule::AtCfaOffset(self.rbp_offset),
            _ => RbpRule::Unchanged,
        };
        match self.kind {
            KIND_CFA_RSP => Rule::Frame { cfa: CfaRule::RspOffset(self.cfa_offset), rbp },
            KIND_CFA_RBP => Rule::Frame { cfa: CfaRule::RbpOffset(self.cfa_offset), rbp },
            KIND_PLT => Rule::Frame {
                cfa: CfaRule::Plt { rsp_offset: self.cfa_offset, threshold: self.rbp_offset as u8 },
                rbp: RbpRule::Unchanged,
            },
            KIND_OUTERMOST => Rule::Outermost,
            KIND_UNSUPPORTED => Rule::Unsupported(
                Unsupported::ALL
                    .into_iter()
                    .find(|why| *why as i32 == self.cfa_offset)
                    .unwrap_or(Unsupported::Malformed),
            ),
            _ => Rule::NoTable,
        }
    }

    fn same_rule(&self, other: &PackedRow) -> bool {
        (self.kind, self.cfa_offset, self.rbp_kind, self.rbp_offset)
            == (other.kind, other.cfa_offset, other.rbp_kind, other.rbp_offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwind_packed_row_round_trips_every_rule() {
        let rules = [
            Rule::NoTable,
            Rule::Outermost,
            Rule::Frame { cfa: CfaRule::RspOffset(8), rbp: RbpRule::Unchanged },
            Rule::Frame { cfa: CfaRule::RbpOffset(16), rbp: RbpRule::AtCfaOffset(-16) },
            Rule::Frame { cfa: CfaRule::RspOffset(-0x7fff_ffff), rbp: RbpRule::AtCfaOffset(i16::MIN) },
            Rule::Frame { cfa: CfaRule::Plt { rsp_offset: 8, threshold: 11 }, rbp: RbpRule::Unchanged },
        ]
        .into_iter()
        .chain(Unsupported::ALL.map(Rule::Unsupported));
        for rule in rules {
            assert_eq!(PackedRow::new(0x1234, rule).rule(), rule, "{rule:?}");
        }
    }
}
