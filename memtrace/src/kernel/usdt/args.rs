//! x86-64 argument specs of `<sys/sdt.h>` probes, as the assembler wrote them into the note:
//! `SIZE@OPERAND`, SIZE negative for signed (`-4@%eax`), OPERAND a register (`8@%r12`), a
//! constant (`-4@$5`) or memory at a register plus a displacement (`8@-16(%rbp)`, `8@(%rax)`).

use memtrace_common::usdt::{ARG_CONST, ARG_DEREF, ARG_REG, Arg};

/// Where the probe's argument is, decoded, with the text it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArgSpec {
    pub text: String,
    pub arg: Arg,
}

impl ArgSpec {
    /// `u64`, `s32`, ...: the type bpftrace and libbpf give the argument.
    pub fn type_name(&self) -> String {
        format!("{}{}", if self.arg.signed != 0 { 's' } else { 'u' }, self.arg.size * 8)
    }
}

/// Decodes a note's whole argument string (specs separated by spaces).
pub fn parse_all(text: &str) -> Result<Vec<ArgSpec>, String> {
    let specs: Vec<&str> = text.split_ascii_whitespace().collect();
    if specs.len() > memtrace_common::usdt::MAX_ARGS {
        return Err(format!("{} arguments, more than sys/sdt.h allows", specs.len()));
    }
    specs.into_iter().map(|s| parse(s).map(|arg| ArgSpec { text: s.to_string(), arg })).collect()
}

/// Decodes one spec, or says why it cannot be read from a uprobe's registers.
pub fn parse(spec: &str) -> Result<Arg, String> {
    let bad = |why: &str| format!("argument {spec:?}: {why}");
    // Old notes (sdt.h v1) had no size: the operand is a full register.
    let (size, operand) = match spec.split_once('@') {
        Some((size, operand)) => (size.parse::<i32>().map_err(|_| bad("size is not a number"))?, operand),
        None => (8, spec),
    };
    let (signed, size) = (size < 0, size.unsigned_abs());
    if ![1, 2, 4, 8].contains(&size) {
        return Err(bad("size is not 1, 2, 4 or 8 bytes"));
    }
    let mut arg = Arg { size, signed: signed as u32, ..Arg::default() };
    if let Some(constant) = operand.strip_prefix('$') {
        arg.kind = ARG_CONST;
        arg.value = number(constant).ok_or_else(|| bad("constant is not a number"))?;
    } else if let Some(reg) = operand.strip_prefix('%') {
        arg.kind = ARG_REG;
        arg.reg_offset = register(reg).ok_or_else(|| bad("unknown register"))?;
    } else if let Some((disp, rest)) = operand.split_once('(') {
        let reg = rest.strip_suffix(')').ok_or_else(|| bad("unclosed parenthesis"))?;
        if reg.contains(',') {
            return Err(bad("indexed addressing (base, index, scale) is not supported"));
        }
        let reg = reg.strip_prefix('%').ok_or_else(|| bad("no register in parentheses"))?;
        if reg == "rip" {
            return Err(bad("addresses relative to %rip (static variables) are not supported"));
        }
        arg.kind = ARG_DEREF;
        arg.reg_offset = register(reg).ok_or_else(|| bad("unknown register"))?;
        arg.value =
            if disp.is_empty() { 0 } else { number(disp).ok_or_else(|| bad("displacement is not a number"))? };
    } else {
        return Err(bad("operand is neither %register, $constant nor displacement(%register)"));
    }
    Ok(arg)
}

/// A decimal or 0x-hexadecimal number, maybe negative.
fn number(text: &str) -> Option<i64> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let magnitude = match digits.strip_prefix("0x").or_else(|| digits.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok()?,
        None => digits.parse::<u64>().ok()?,
    };
    // Two's complement: the assembler may write a u64 constant.
    Some(if negative { (magnitude as i64).wrapping_neg() } else { magnitude as i64 })
}

/// The byte offset in x86-64's `struct pt_regs` of a register by any of its names (`rax`,
/// `eax`, `ax`, `al`; `r8`, `r8d`, `r8w`, `r8b`). The argument's size picks the low bytes, so
/// every width of a register reads the same slot. The high bytes (`ah`) are not a slot.
fn register(name: &str) -> Option<u32> {
    // struct pt_regs: r15 r14 r13 r12 bp bx r11 r10 r9 r8 ax cx dx si di orig_ax ip cs flags sp ss.
    const LEGACY: [(&str, [&str; 4], u32); 8] = [
        ("ax", ["rax", "eax", "ax", "al"], 80),
        ("cx", ["rcx", "ecx", "cx", "cl"], 88),
        ("dx", ["rdx", "edx", "dx", "dl"], 96),
        ("bx", ["rbx", "ebx", "bx", "bl"], 40),
        ("si", ["rsi", "esi", "si", "sil"], 104),
        ("di", ["rdi", "edi", "di", "dil"], 112),
        ("bp", ["rbp", "ebp", "bp", "bpl"], 32),
        ("sp", ["rsp", "esp", "sp", "spl"], 152),
    ];
    if let Some((_, _, offset)) = LEGACY.iter().find(|(_, names, _)| names.contains(&name)) {
        return Some(*offset);
    }
    let number = name.strip_prefix('r')?;
    let digits = number.trim_end_matches(['d', 'w', 'b']);
    if number.len() - digits.len() > 1 {
        return None;
    }
    const NUMBERED: [u32; 8] = [72, 64, 56, 48, 24, 16, 8, 0];
    let n: usize = digits.parse().ok()?;
    NUMBERED.get(n.checked_sub(8)?).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(size: u32, signed: bool, offset: u32) -> Arg {
        Arg { kind: ARG_REG, reg_offset: offset, size, signed: signed as u32, value: 0 }
    }

    #[test]
    fn decodes_registers_of_every_width() {
        assert_eq!(parse("8@%rbp"), Ok(reg(8, false, 32)));
        assert_eq!(parse("-4@%eax"), Ok(reg(4, true, 80)));
        assert_eq!(parse("8@%r12"), Ok(reg(8, false, 24)));
        assert_eq!(parse("-4@%r12d"), Ok(reg(4, true, 24)));
        assert_eq!(parse("2@%r8w"), Ok(reg(2, false, 72)));
        assert_eq!(parse("1@%r15b"), Ok(reg(1, false, 0)));
        assert_eq!(parse("-1@%sil"), Ok(reg(1, true, 104)));
        assert_eq!(parse("8@%rsp"), Ok(reg(8, false, 152)));
        assert_eq!(parse("%rdi"), Ok(reg(8, false, 112)), "sdt.h v1: no size");
    }

    #[test]
    fn decodes_constants_and_memory() {
        assert_eq!(parse("-4@$5"), Ok(Arg { kind: ARG_CONST, value: 5, size: 4, signed: 1, reg_offset: 0 }));
        assert_eq!(parse("4@$-1"), Ok(Arg { kind: ARG_CONST, value: -1, size: 4, signed: 0, reg_offset: 0 }));
        assert_eq!(parse("8@$0x10"), Ok(Arg { kind: ARG_CONST, value: 16, size: 8, signed: 0, reg_offset: 0 }));
        assert_eq!(parse("8@-16(%rbp)"), Ok(Arg { kind: ARG_DEREF, value: -16, size: 8, signed: 0, reg_offset: 32 }));
        assert_eq!(parse("-4@112(%rsp)"), Ok(Arg { kind: ARG_DEREF, value: 112, size: 4, signed: 1, reg_offset: 152 }));
        assert_eq!(parse("8@(%rax)"), Ok(Arg { kind: ARG_DEREF, value: 0, size: 8, signed: 0, reg_offset: 80 }));
    }

    #[test]
    fn names_what_it_cannot_read() {
        let why = |s| parse(s).unwrap_err();
        assert_eq!(why("3@%rax"), "argument \"3@%rax\": size is not 1, 2, 4 or 8 bytes");
        assert_eq!(why("1@%ah"), "argument \"1@%ah\": unknown register");
        assert_eq!(why("8@%r16"), "argument \"8@%r16\": unknown register");
        assert_eq!(why("8@%r7"), "argument \"8@%r7\": unknown register");
        assert!(why("8@8(%rax,%rbx,8)").contains("indexed addressing"));
        assert!(why("-4@mp_+52(%rip)").contains("%rip"));
        assert!(why("x@%rax").contains("size is not a number"));
        assert!(why("8@rax").contains("neither"));
        assert!(parse_all(&["8@%rax"; 13].join(" ")).unwrap_err().contains("13 arguments"));
    }

    #[test]
    fn types_as_bpftrace_names_them() {
        let all = parse_all("8@%rbp 8@%r12 -4@%eax").unwrap();
        let types: Vec<String> = all.iter().map(ArgSpec::type_name).collect();
        assert_eq!(types, ["u64", "u64", "s32"]);
        assert_eq!(all[2].text, "-4@%eax");
    }
}
