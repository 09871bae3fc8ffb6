//! Struct member offsets from the running kernel's BTF (/sys/kernel/btf/vmlinux), for kprobe
//! programs that read fields of their arguments: offsets move between kernel versions and
//! configurations, so they are read here and handed to eBPF as globals, never hard-coded.
//!
//! aya's `Btf` keeps member offsets crate-private, so this reads the format itself: a header,
//! a type section (each type a 12-byte record plus kind-specific data) and a string section.

use std::{collections::HashMap, sync::OnceLock};

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
#[derive(Clone, Debug)]
struct Member {
    name: String,
    type_id: u32,
    bit_offset: u32,
}

#[derive(Clone, Debug)]
struct Type {
    kind: u32,
    name: String,
    /// Referenced type for typedef/const/volatile/restrict/type tags.
    target: u32,
    members: Vec<Member>,
}

/// The parsed type section, with struct and union ids by name.
pub struct Btf {
    /// Index = type id (id 0 is `void`).
    types: Vec<Type>,
    by_name: HashMap<String, Vec<u32>>,
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
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or_else(|| anyhow!("string section out of bounds"))?;
        let string = |off: u32| -> String {
            let tail = strings.get(off as usize..).unwrap_or_default();
            let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
            String::from_utf8_lossy(&tail[..end]).into_owned()
        };
        let mut types = vec![Type { kind: 0, name: String::new(), target: 0, members: Vec::new() }];
        let mut at = hdr_len + type_off;
        let end = at + type_len;
        while at < end {
            let word = |i: usize| u32_at(at + 4 * i).ok_or_else(|| anyhow!("type section truncated"));
            let (name_off, info, size_or_type) = (word(0)?, word(1)?, word(2)?);
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let bitfields = info >> 31 == 1;
            at += 12;
            let mut members = Vec::new();
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = |j: usize| u32_at(at + 12 * i + 4 * j).ok_or_else(|| anyhow!("member truncated"));
                        let offset = m(2)?;
                        let bit_offset = if bitfields { offset & 0x00ff_ffff } else { offset };
                        members.push(Member { name: string(m(0)?), type_id: m(1)?, bit_offset });
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
            types.push(Type { kind, name: string(name_off), target, members });
        }
        let mut by_name: HashMap<String, Vec<u32>> = HashMap::new();
        for (id, ty) in types.iter().enumerate() {
            if matches!(ty.kind, KIND_STRUCT | KIND_UNION) && !ty.name.is_empty() {
                by_name.entry(ty.name.clone()).or_default().push(id as u32);
            }
        }
        Ok(Btf { types, by_name })
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
        for m in &ty.members {
            if m.name == name {
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
        let ids = self.by_name.get(struct_name).ok_or_else(|| anyhow!("kernel BTF has no struct {struct_name}"))?;
        // Forward declarations and same-named unions aside, the first complete struct wins.
        let mut ty = ids
            .iter()
            .filter_map(|&id| self.types.get(id as usize))
            .find(|t| !t.members.is_empty())
            .ok_or_else(|| anyhow!("kernel BTF has struct {struct_name} without members"))?;
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
        self.types.iter().position(|t| t.kind == KIND_FUNC && t.name == name).map(|id| id as u32)
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
        assert_eq!(btf.types[id as usize].name, "do_exit");
        assert_eq!(btf.func_id("task_struct"), None, "a struct is not a function");
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(b"not btf at all").is_err());
    }
}
