//! Struct member offsets from the running kernel's BTF (/sys/kernel/btf/vmlinux), for kprobe
//! programs that read fields of their arguments: offsets move between kernel versions and
//! configurations, so they are read here and handed to eBPF as globals, never hard-coded.
//!
//! aya's `Btf` keeps member offsets crate-private, so this reads the format itself: a header,
//! a type section (each type a 12-byte record plus kind-specific data) and a string section.

use std::sync::OnceLock;

use anyhow::{Result, anyhow, bail};

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// One member of a struct or union: name (empty when anonymous), type id, offset in bits.
#[derive(Clone, Copy, Debug)]
struct Member<'a> {
    name: &'a [u8],
    type_id: u32,
    bit_offset: u32,
}

/// One type record, kept as found: names and members are read from the data when asked for
/// (the kernel's BTF has ~100k types; building them all took 23 ms of every start).
#[derive(Clone, Copy, Debug)]
struct Type {
    kind: u32,
    name_off: u32,
    /// Referenced type for typedef/const/volatile/restrict/type tags.
    target: u32,
    /// Where its members start in `data` (structs and unions), and how many there are.
    members_at: u32,
    vlen: u16,
    bitfields: bool,
}

/// The parsed type section.
pub struct Btf {
    data: Vec<u8>,
    /// Where the string section starts in `data`, and its length.
    strings: (usize, usize),
    /// Index = type id (id 0 is `void`).
    types: Vec<Type>,
}

impl Btf {
    /// The running kernel's BTF, parsed once per process.
    pub fn vmlinux() -> Result<&'static Btf> {
        static BTF: OnceLock<Result<Btf, String>> = OnceLock::new();
        BTF.get_or_init(|| {
            let data = std::fs::read(VMLINUX)
                .map_err(|e| format!("cannot read {VMLINUX} ({e}): this kernel lacks BTF (CONFIG_DEBUG_INFO_BTF)"))?;
            Btf::parse(&data).map_err(|e| format!("{VMLINUX}: {e:#}"))
        })
        .as_ref()
        .map_err(|e| anyhow!("{e}"))
    }

    pub fn parse(data: &[u8]) -> Result<Btf> {
        let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        let u32_at = |o: usize| data.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        if u16_at(0) != Some(MAGIC) {
            bail!("not little-endian BTF (bad magic)");
        }
        let header = |o| u32_at(o).map(|v| v as usize).ok_or_else(|| anyhow!("truncated header"));
        let (hdr_len, type_off, type_len, str_off, str_len) =
            (header(4)?, header(8)?, header(12)?, header(16)?, header(20)?);
        if data.get(hdr_len + str_off..hdr_len + str_off + str_len).is_none() {
            bail!("string section out of bounds");
        }
        let mut types = vec![Type { kind: 0, name_off: 0, target: 0, members_at: 0, vlen: 0, bitfields: false }];
        let mut at = hdr_len + type_off;
        let end = at + type_len;
        while at < end {
            let word = |i: usize| u32_at(at + 4 * i).ok_or_else(|| anyhow!("type section truncated"));
            let (name_off, info, size_or_type) = (word(0)?, word(1)?, word(2)?);
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            at += 12;
            let members_at = at;
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION => {
                    if data.get(at..at + 12 * vlen).is_none() {
                        bail!("member truncated");
                    }
                    12 * vlen
                }
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                _ => 0,
            };
            at += extra;
            let target = match kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => size_or_type,
                _ => 0,
            };
            types.push(Type {
                kind,
                name_off,
                target,
                members_at: members_at as u32,
                vlen: vlen as u16,
                bitfields: info >> 31 == 1,
            });
        }
        Ok(Btf { data: data.to_vec(), strings: (hdr_len + str_off, str_len), types })
    }

    fn name(&self, off: u32) -> &[u8] {
        let (start, len) = self.strings;
        let tail = self.data.get(start + off as usize..start + len).unwrap_or_default();
        &tail[..tail.iter().position(|&b| b == 0).unwrap_or(tail.len())]
    }

    fn members(&self, ty: &Type) -> impl Iterator<Item = Member<'_>> {
        let at = ty.members_at as usize;
        let n = if matches!(ty.kind, KIND_STRUCT | KIND_UNION) { ty.vlen as usize } else { 0 };
        (0..n).map(move |i| {
            let word = |j: usize| {
                let o = at + 12 * i + 4 * j;
                u32::from_le_bytes(self.data[o..o + 4].try_into().expect("checked at parse"))
            };
            let offset = word(2);
            let bit_offset = if ty.bitfields { offset & 0x00ff_ffff } else { offset };
            Member { name: self.name(word(0)), type_id: word(1), bit_offset }
        })
    }

    /// Follows typedefs and qualifiers to the type they name.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let ty = self.types.get(id as usize)?;
            match ty.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => id = ty.target,
                _ => return Some(ty),
            }
        }
        None
    }

    /// Bit offset of `name` in `ty`, looking inside anonymous struct and union members (the
    /// kernel wraps many fields in them, e.g. all of mm_struct); returns the member's type too.
    fn find(&self, ty: &Type, name: &str) -> Option<(u32, u32)> {
        for m in self.members(ty) {
            if m.name == name.as_bytes() {
                return Some((m.bit_offset, m.type_id));
            }
            if m.name.is_empty() {
                let inner = self.resolve(m.type_id)?;
                if let Some((off, id)) = self.find(inner, name) {
                    return Some((m.bit_offset + off, id));
                }
            }
        }
        None
    }

    /// Byte offset of `path` (a member, or members joined with `.` such as `f_path.dentry`)
    /// inside `struct_name`.
    pub fn member_offset(&self, struct_name: &str, path: &str) -> Result<u32> {
        // Forward declarations and same-named unions aside, the first complete struct wins.
        let mut ty = self
            .types
            .iter()
            .find(|t| {
                matches!(t.kind, KIND_STRUCT | KIND_UNION)
                    && t.vlen > 0
                    && self.name(t.name_off) == struct_name.as_bytes()
            })
            .ok_or_else(|| anyhow!("kernel BTF has no struct {struct_name} with members"))?;
        let mut bits = 0;
        for (i, part) in path.split('.').enumerate() {
            let (off, type_id) =
                self.find(ty, part).ok_or_else(|| anyhow!("kernel struct {struct_name} has no member {path}"))?;
            bits += off;
            if i + 1 < path.split('.').count() {
                ty = self.resolve(type_id).ok_or_else(|| anyhow!("{struct_name}.{path}: unresolvable type"))?;
            }
        }
        if bits % 8 != 0 {
            bail!("{struct_name}.{path} is a bit field");
        }
        Ok(bits / 8)
    }
}

impl Btf {
    /// The type id of kernel function `name`, what a fentry program's `attach_btf_id` names.
    pub fn func_id(&self, name: &str) -> Option<u32> {
        self.types
            .iter()
            .position(|t| t.kind == KIND_FUNC && self.name(t.name_off) == name.as_bytes())
            .map(|id| id as u32)
    }
}

/// Byte offset of `member` (dotted paths allowed) in kernel `struct struct_name`, from the
/// running kernel's BTF.
pub fn member_offset(struct_name: &str, member: &str) -> Result<u32> {
    Btf::vmlinux()?.member_offset(struct_name, member)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn have_btf() -> bool {
        std::path::Path::new(VMLINUX).exists()
    }

    #[test]
    fn task_struct_pid_and_tgid_are_adjacent_ints() {
        if !have_btf() {
            eprintln!("no {VMLINUX}: skipped");
            return;
        }
        let pid = member_offset("task_struct", "pid").unwrap();
        let tgid = member_offset("task_struct", "tgid").unwrap();
        assert!(pid > 0);
        // Declared `pid_t pid; pid_t tgid;` in every kernel since 2.6.
        assert_eq!(tgid, pid + 4);
    }

    #[test]
    fn mm_struct_members_inside_its_anonymous_struct() {
        if !have_btf() {
            return;
        }
        // mm_struct's fields live in an anonymous struct; mmap_base follows `get_unmapped_area`
        // (or the maple tree in new kernels): it cannot be at 0, and must be 8-aligned.
        let base = member_offset("mm_struct", "mmap_base").unwrap();
        assert!(base > 0 && base.is_multiple_of(8), "{base}");
        let pgd = member_offset("mm_struct", "pgd").unwrap();
        assert!(pgd > base, "pgd {pgd} mmap_base {base}");
    }

    #[test]
    fn dotted_paths_and_errors() {
        if !have_btf() {
            return;
        }
        let path = member_offset("file", "f_path").unwrap();
        let dentry = member_offset("path", "dentry").unwrap();
        assert_eq!(member_offset("file", "f_path.dentry").unwrap(), path + dentry);
        assert!(member_offset("task_struct", "no_such_member").is_err());
        assert!(member_offset("no_such_struct_xyz", "pid").is_err());
    }

    #[test]
    fn finds_kernel_functions() {
        if !have_btf() {
            return;
        }
        let btf = Btf::vmlinux().unwrap();
        let id = btf.func_id("do_exit").expect("every kernel has do_exit");
        assert_eq!(btf.name(btf.types[id as usize].name_off), b"do_exit");
        assert_eq!(btf.func_id("task_struct"), None, "a struct is not a function");
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(b"not btf at all").is_err());
    }
}
