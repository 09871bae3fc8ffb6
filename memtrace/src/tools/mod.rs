//! One module per tracer; each has its eBPF half in memtrace-ebpf and its event types in
//! memtrace-common under the same name, and `registry` lists them. What tracers share lives in
//! `shared/`, re-exported here so that a tracer reaches it as `tools::...`.

#[cfg(feature = "bench")]
pub mod benchfloor;
pub mod brkstack;
pub mod compaction;
pub mod drsnoop;
pub mod faults;
pub mod hfaults;
pub mod mallocstat;
pub mod memleak;
pub mod migrate;
pub mod mmapsnoop;
pub mod oomkill;
pub mod probe;
pub mod registry;
pub mod segv;
pub mod serve;
pub mod shared;
pub mod shmsnoop;
pub mod swapin;
pub mod vmscan;

pub use shared::*;

#[cfg(test)]
mod tests {
    /// The layers below `tools/` (output, unwind, symbolize, kernel, target, ...) import
    /// nothing from it: what a tool and a lower layer share lives in the lower layer.
    #[test]
    fn lower_layers_import_nothing_from_tools() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        let mut dirs = vec![src.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().map(Result::unwrap) {
                let path = entry.path();
                let top = path.strip_prefix(&src).unwrap().components().next().unwrap().as_os_str().to_owned();
                if top == "tools" || top == "main.rs" || top == "cli_tests.rs" {
                    continue;
                }
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    files.push(path);
                }
            }
        }
        assert!(files.len() > 20, "{files:?}");
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap();
                let names_tools = code.split(|c: char| !c.is_alphanumeric() && c != '_').any(|w| w == "tools");
                let imports = code.contains("use ") || code.contains("::") || code.trim().ends_with(',');
                assert!(
                    !(names_tools && imports),
                    "{}:{}: a lower layer reaches up into tools/: {line}",
                    file.display(),
                    n + 1
                );
            }
        }
    }
}
