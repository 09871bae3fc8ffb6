//! Kernel symbol table from /proc/kallsyms, for kernel stacks and "does this function exist" checks.

use anyhow::{Context, bail};

/// Addresses further than this past their nearest symbol are not attributed to it.
const MAX_SYMBOL_DISTANCE: u64 = 1 << 20;

struct Sym {
    addr: u64,
    name: Box<str>,
    /// Index into `Kallsyms::modules`; `None` for the core kernel image.
    module: Option<u32>,
}

/// Text symbols of the running kernel and its modules, sorted by address.
pub struct Kallsyms {
    syms: Vec<Sym>,
    modules: Vec<Box<str>>,
    /// Indices into `syms` sorted by name, for name lookups without a second copy of the names.
    by_name: Vec<u32>,
}

impl Kallsyms {
    /// Reads `/proc/kallsyms`; fails when the addresses are hidden (kptr_restrict / not root).
    pub fn load() -> anyhow::Result<Kallsyms> {
        let text = std::fs::read_to_string("/proc/kallsyms").context("reading /proc/kallsyms")?;
        let syms = Self::from_text(&text);
        if syms.syms.is_empty() {
            bail!(
                "/proc/kallsyms shows no symbol addresses (all zero); run as root \
                 (or lower /proc/sys/kernel/kptr_restrict) to symbolize kernel stacks"
            );
        }
        Ok(syms)
    }

    /// Parses kallsyms text (`addr type name [module]` per line), keeping function symbols.
    pub fn from_text(text: &str) -> Kallsyms {
        let mut syms = Vec::new();
        let mut modules: Vec<Box<str>> = Vec::new();
        for line in text.lines() {
            let mut fields = line.split_ascii_whitespace();
            let (Some(addr), Some(kind), Some(name)) = (fields.next(), fields.next(), fields.next()) else {
                continue;
            };
            // Data symbols would shadow functions only with CONFIG_KALLSYMS_ALL; stacks need text.
            if !matches!(kind, "t" | "T" | "w" | "W") {
                continue;
            }
            let addr = match u64::from_str_radix(addr, 16) {
                Ok(0) | Err(_) => continue,
                Ok(addr) => addr,
            };
            let module = fields.next().and_then(|m| m.strip_prefix('[')?.strip_suffix(']')).map(|m| {
                match modules.iter().rposition(|known| **known == *m) {
                    Some(idx) => idx as u32,
                    None => {
                        modules.push(m.into());
                        (modules.len() - 1) as u32
                    }
                }
            });
            syms.push(Sym { addr, name: name.into(), module });
        }
        // Stable sort keeps file order among aliases at one address (e.g. `_stext`/`_text`).
        syms.sort_by_key(|s| s.addr);
        let mut by_name: Vec<u32> = (0..syms.len() as u32).collect();
        by_name.sort_by(|&a, &b| syms[a as usize].name.cmp(&syms[b as usize].name));
        Kallsyms { syms, modules, by_name }
    }

    /// Returns (symbol name, offset into it, module name) for the greatest symbol <= `addr`.
    pub fn resolve(&self, addr: u64) -> Option<(&str, u64, Option<&str>)> {
        let idx = self.syms.partition_point(|s| s.addr <= addr).checked_sub(1)?;
        // Several names can share an address; prefer the first one listed there.
        let first = self.syms[..idx].partition_point(|s| s.addr < self.syms[idx].addr);
        let sym = &self.syms[first];
        let offset = addr - sym.addr;
        if offset >= MAX_SYMBOL_DISTANCE {
            return None;
        }
        let module = sym.module.map(|m| &*self.modules[m as usize]);
        Some((&sym.name, offset, module))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.address_of(name).is_some()
    }

    /// Lowest address of a function called `name` (static functions can repeat names).
    pub fn address_of(&self, name: &str) -> Option<u64> {
        let start = self.by_name.partition_point(|&i| *self.syms[i as usize].name < *name);
        self.by_name[start..]
            .iter()
            .map(|&i| &self.syms[i as usize])
            .take_while(|s| *s.name == *name)
            .map(|s| s.addr)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
0000000000000000 A fixed_percpu_data
ffffffff81000000 T _stext
ffffffff81000000 T _text
ffffffff81000100 t helper
ffffffff81000200 T vfs_read
ffffffff81000300 D some_data
ffffffff81000400 T vfs_write
ffffffffc0a00000 t nft_do_chain\t[nf_tables]
ffffffffc0a00080 t helper\t[nf_tables]
";

    #[test]
    fn from_text_resolves_offsets_and_modules() {
        let k = Kallsyms::from_text(TEXT);
        assert_eq!(k.resolve(0xffffffff81000000), Some(("_stext", 0, None)));
        assert_eq!(k.resolve(0xffffffff81000123), Some(("helper", 0x23, None)));
        assert_eq!(k.resolve(0xffffffff81000200), Some(("vfs_read", 0, None)));
        // The data symbol is skipped, so this still lands in vfs_read.
        assert_eq!(k.resolve(0xffffffff81000310), Some(("vfs_read", 0x110, None)));
        assert_eq!(k.resolve(0xffffffffc0a00010), Some(("nft_do_chain", 0x10, Some("nf_tables"))));
        assert_eq!(k.resolve(0xffffffffc0a00090), Some(("helper", 0x10, Some("nf_tables"))));
    }

    #[test]
    fn from_text_rejects_out_of_range() {
        let k = Kallsyms::from_text(TEXT);
        assert_eq!(k.resolve(0x1000), None);
        assert_eq!(k.resolve(0xffffffff80ffffff), None);
        // More than 1 MiB past vfs_write, and past the last symbol.
        assert_eq!(k.resolve(0xffffffff81000400 + (1 << 20)), None);
        assert_eq!(k.resolve(0xffffffffc0a00080 + (1 << 20)), None);
        assert!(k.resolve(0xffffffffc0a00080 + (1 << 20) - 1).is_some());
    }

    #[test]
    fn from_text_name_lookups() {
        let k = Kallsyms::from_text(TEXT);
        assert!(k.contains("vfs_read"));
        assert!(!k.contains("some_data"));
        assert!(!k.contains("fixed_percpu_data"));
        assert!(!k.contains("vfs_rea"));
        assert_eq!(k.address_of("vfs_write"), Some(0xffffffff81000400));
        assert_eq!(k.address_of("helper"), Some(0xffffffff81000100));
        assert_eq!(k.address_of("nope"), None);
    }

    #[test]
    fn from_text_all_zero_is_empty() {
        let k = Kallsyms::from_text("0000000000000000 T vfs_read\n0000000000000000 t x [m]\n");
        assert_eq!(k.resolve(0), None);
        assert!(!k.contains("vfs_read"));
    }

    #[test]
    fn load_resolves_vfs_read() {
        let k = Kallsyms::load().expect("load /proc/kallsyms (needs root)");
        let addr = k.address_of("vfs_read").expect("vfs_read in kallsyms");
        assert_eq!(k.resolve(addr), Some(("vfs_read", 0, None)));
        assert_eq!(k.resolve(addr + 4).map(|(n, o, _)| (n, o)), Some(("vfs_read", 4)));
    }
}
