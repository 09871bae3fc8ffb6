//! tracefs: where it is mounted, which tracepoints exist, and the layout of their records.
//!
//! Field offsets differ between kernel versions, so every tool reads them from the running
//! kernel's `format` files and hands them to its eBPF programs as globals.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use anyhow::{Context as _, Result, anyhow, bail};

const TRACEFS: &str = "/sys/kernel/tracing";
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

/// The tracefs mount point, mounting it at /sys/kernel/tracing when nothing is mounted.
pub fn root() -> Result<&'static Path> {
    static ROOT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    ROOT.get_or_init(|| find_or_mount().map_err(|e| format!("{e:#}"))).as_deref().map_err(|e| anyhow!("{e}"))
}

fn find_or_mount() -> Result<PathBuf> {
    for dir in [TRACEFS, DEBUGFS_TRACING] {
        if Path::new(dir).join("events").is_dir() {
            return Ok(dir.into());
        }
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "tracefs", "nodev", TRACEFS])
        .status()
        .context("tracefs is not mounted and `mount` could not run")?;
    if status.success() && Path::new(TRACEFS).join("events").is_dir() {
        tracing::info!("mounted tracefs at {TRACEFS}");
        return Ok(TRACEFS.into());
    }
    bail!("tracefs is not mounted and mounting it at {TRACEFS} failed: mount it, or run as root")
}

/// Whether the running kernel has the tracepoint `category:name`.
pub fn exists(category: &str, name: &str) -> bool {
    root().is_ok_and(|root| root.join("events").join(category).join(name).join("format").exists())
}

/// One field of a tracepoint record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub offset: u32,
    pub size: u32,
}

/// The record layout of one tracepoint.
#[derive(Clone, Debug)]
pub struct Format {
    pub tracepoint: String,
    pub fields: Vec<Field>,
    /// The `print fmt:` line's text, where the kernel names the values of enum fields.
    pub print_fmt: String,
}

impl Format {
    /// Reads `events/<category>/<name>/format` of the running kernel.
    pub fn read(category: &str, name: &str) -> Result<Format> {
        let path = root()?.join("events").join(category).join(name).join("format");
        let text = fs::read_to_string(&path)
            .with_context(|| format!("the kernel has no tracepoint {category}:{name} ({})", path.display()))?;
        Ok(Format::parse(&format!("{category}:{name}"), &text))
    }

    /// Parses a `format` file: lines like `field:unsigned long call_site; offset:8; size:8; signed:0;`.
    pub fn parse(tracepoint: &str, text: &str) -> Format {
        let fields = text
            .lines()
            .filter_map(|line| {
                let mut decl = None;
                let (mut offset, mut size) = (None, None);
                for part in line.trim().split(';') {
                    let Some((key, value)) = part.trim().split_once(':') else { continue };
                    match key {
                        "field" => decl = Some(value.trim()),
                        "offset" => offset = value.trim().parse().ok(),
                        "size" => size = value.trim().parse().ok(),
                        _ => {}
                    }
                }
                Some(Field { name: field_name(decl?)?.to_string(), offset: offset?, size: size? })
            })
            .collect();
        let print_fmt = text.lines().find_map(|l| l.strip_prefix("print fmt:")).unwrap_or_default().trim().to_string();
        Format { tracepoint: tracepoint.to_string(), fields, print_fmt }
    }

    /// The names `print fmt` gives the values of `field` through
    /// `__print_symbolic(REC->field, {0, "name"}, ...)`: enum values differ between kernels,
    /// so tools decode them with the running kernel's table. Empty when the format has none.
    pub fn symbols(&self, field: &str) -> Symbols {
        let open = format!("__print_symbolic(REC->{field},");
        let Some(at) = self.print_fmt.find(&open) else { return Symbols::default() };
        let mut rest = &self.print_fmt[at + open.len()..];
        let mut out = Vec::new();
        // Pairs `{value, "name"}` up to the call's closing parenthesis.
        loop {
            rest = rest.trim_start_matches([' ', ',']);
            let Some(body) = rest.strip_prefix('{') else { break };
            let Some(close) = body.find('}') else { break };
            let (pair, after) = (&body[..close], &body[close + 1..]);
            rest = after;
            let Some((value, name)) = pair.split_once(',') else { continue };
            let name = name.trim().trim_matches('"');
            if let Some(value) = parse_int(value.trim()) {
                out.push((value, name.to_string()));
            }
        }
        Symbols(out)
    }

    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// Offset of the first of `names` that the record has (fields get renamed across kernels).
    pub fn offset_of_any(&self, names: &[&str]) -> Result<u32> {
        names
            .iter()
            .find_map(|n| self.field(n))
            .map(|f| f.offset)
            .ok_or_else(|| anyhow!("tracepoint {} has none of the fields {names:?}", self.tracepoint))
    }

    pub fn offset(&self, name: &str) -> Result<u32> {
        self.offset_of_any(&[name])
    }
}

/// The names of an enum field's values, as the running kernel prints them.
#[derive(Clone, Debug, Default)]
pub struct Symbols(pub Vec<(i64, String)>);

impl Symbols {
    /// The kernel's name for `value`; None for a value its table lacks.
    pub fn get(&self, value: i64) -> Option<&str> {
        self.0.iter().find(|(v, _)| *v == value).map(|(_, name)| name.as_str())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A decimal or `0x` integer, as `print fmt` tables write them.
fn parse_int(text: &str) -> Option<i64> {
    match text.strip_prefix("0x") {
        Some(hex) => i64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// The identifier in a C declaration such as `const char * name`, `__data_loc char[] name`, `u8 buf[16]`.
fn field_name(decl: &str) -> Option<&str> {
    // An array suffix belongs to the name only when it ends the declaration (`u8 buf[16]`).
    let decl = if decl.ends_with(']') { &decl[..decl.rfind('[')?] } else { decl }.trim_end();
    let start = decl.rfind(|c: char| !(c.is_alphanumeric() || c == '_')).map_or(0, |i| i + 1);
    let name = &decl[start..];
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The kmem:kmalloc format of a 6.18 kernel, abridged.
    const KMALLOC: &str = "name: kmalloc
ID: 530
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:unsigned long call_site;\toffset:8;\tsize:8;\tsigned:0;
\tfield:const void * ptr;\toffset:16;\tsize:8;\tsigned:0;
\tfield:size_t bytes_req;\toffset:24;\tsize:8;\tsigned:0;
\tfield:size_t bytes_alloc;\toffset:32;\tsize:8;\tsigned:0;
\tfield:unsigned long gfp_flags;\toffset:40;\tsize:8;\tsigned:0;
\tfield:int node;\toffset:48;\tsize:4;\tsigned:1;
\tfield:char comm[16];\toffset:52;\tsize:16;\tsigned:0;
\tfield:__data_loc char[] name;\toffset:68;\tsize:4;\tsigned:0;

print fmt: \"call_site=%pS ptr=%p\", (void *)REC->call_site, REC->ptr
";

    #[test]
    fn parses_offsets_and_names() {
        let f = Format::parse("kmem:kmalloc", KMALLOC);
        assert_eq!(f.offset("ptr").unwrap(), 16);
        assert_eq!(f.offset("bytes_alloc").unwrap(), 32);
        assert_eq!(f.field("node").unwrap().size, 4);
        assert_eq!(f.field("comm").unwrap(), &Field { name: "comm".into(), offset: 52, size: 16 });
        assert_eq!(f.field("name").unwrap().offset, 68);
        assert_eq!(f.field("common_pid").unwrap().offset, 4);
        assert_eq!(f.fields.len(), 11);
    }

    #[test]
    fn reads_enum_names_from_print_fmt() {
        let text = "format:
\tfield:int nid;\toffset:8;\tsize:4;\tsigned:1;
\tfield:enum zone_type idx;\toffset:12;\tsize:4;\tsigned:0;
\tfield:int ret;\toffset:20;\tsize:4;\tsigned:1;

print fmt: \"node=%d zone=%-8s ret=%s\", REC->nid, __print_symbolic(REC->idx, {0, \"DMA\"}, {1, \"DMA32\"}, {2, \"Normal\"}), __print_symbolic(REC->ret, {1, \"skipped\"}, {8, \"success\"}, {0, \"not_suitable_zone\"})
";
        let f = Format::parse("compaction:mm_compaction_finished", text);
        let names = |v: &Symbols| v.0.iter().map(|(n, s)| format!("{n}={s}")).collect::<Vec<_>>().join(" ");
        assert_eq!(names(&f.symbols("idx")), "0=DMA 1=DMA32 2=Normal");
        assert_eq!(names(&f.symbols("ret")), "1=skipped 8=success 0=not_suitable_zone");
        assert!(f.symbols("nid").is_empty());
        assert_eq!(f.symbols("ret").get(8), Some("success"));
        assert_eq!(f.symbols("ret").get(3), None);
    }

    #[test]
    fn falls_back_across_renamed_fields() {
        let f = Format::parse("kmem:kmalloc", KMALLOC);
        assert_eq!(f.offset_of_any(&["bytes", "bytes_alloc"]).unwrap(), 32);
        let err = f.offset_of_any(&["pfn"]).unwrap_err().to_string();
        assert!(err.contains("kmem:kmalloc") && err.contains("pfn"), "{err}");
    }
}
