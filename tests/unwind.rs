//! User stacks through code without frame pointers, unwound from DWARF call-frame information
//! (`memleak --unwind`): C, C++ and Rust programs built optimised without frame pointers, over
//! Debian's libc and libstdc++ (built the same way), and Debian's python3.11. Each leak keeps
//! its exact bytes and count, names its function and line, and reaches the program's entry;
//! memory freed in between appears in no stack.

#[path = "common/mod.rs"]
mod common;

use std::{collections::BTreeMap, io::Write, process::Command, time::Duration};

use common::*;
use serde_json::Value;

/// A leak: the function that makes it, the marker on the line it calls from, and the exact
/// bytes and allocations memleak must show for that function at that line, summed over its
/// stacks (the compiler may unroll a loop into one call site per iteration, all on one line).
struct Leak {
    func: &'static str,
    marker: &'static str,
    bytes: u64,
    allocs: u64,
}

const fn leak(func: &'static str, marker: &'static str, bytes: u64, allocs: u64) -> Leak {
    Leak { func, marker, bytes, allocs }
}

/// tests/progs/unwind_c.c. Every size is the one asked of the allocator (measured with
/// valgrind and with memleak itself: its counts do not depend on the stacks).
const UNWIND_C: &[Leak] = &[
    leak("leak_malloc", "leak_malloc", 5 * 1111, 5),
    leak("leak_calloc", "leak_calloc", 3 * 7 * 111, 3),
    // realloc's size; the 22-byte blocks it moved from are freed.
    leak("leak_realloc", "leak_realloc", 2 * 2222, 2),
    // strdup asks malloc for the string's 41 characters and its NUL.
    leak("leak_strdup", "leak_strdup", 4 * 42, 4),
    // From a comparator that libc's qsort calls.
    leak("compare_and_leak", "compare_and_leak", 333, 1),
];

/// The C and C++ programs' way from each leak to the process's entry.
const C_ROOT: &[&str] = &["run_leaks", "main", "__libc_start_call_main"];

/// tests/progs/unwind_cpp.cpp, against Debian 12's libstdc++ 12 and glibc 2.36 (sizes measured
/// with valgrind and memleak).
const UNWIND_CPP: &[Leak] = &[
    // new char[3000]: operator new[] -> operator new -> malloc(3000).
    leak("leak_new_array", "leak_new_array", 4 * 3000, 4),
    // new std::string: the 32-byte object (pointer, length, 16-byte inline buffer), then from
    // _M_construct its heap buffer, 101 bytes for 100 characters and the NUL.
    leak("leak_new_string", "leak_new_string", 3 * (32 + 101), 3 * 2),
    // sizeof(std::map<int, std::string>): the comparator slot and the 40-byte tree header.
    leak("leak_map", "leak_map_new", 48, 1),
    // Per insert: a 72-byte node (32-byte _Rb_tree_node_base, the int padded to 8, the
    // 32-byte string) from the tree code, and the 41-byte buffer of the std::string(40, 'm')
    // made on that line (libstdc++'s _M_construct), moved into the node.
    leak("leak_map", "leak_map_insert", 5 * (72 + 41), 5 * 2),
    leak("leak_strdup", "leak_strdup", 2 * 101, 2),
    // glibc's __fopen_internal allocates the FILE with its lock and wide-character state.
    leak("leak_fopen", "leak_fopen", 472, 1),
    // getdelim's first buffer is 120 bytes (libio/iogetdelim.c), and one line of
    // /proc/self/comm fits; the FILE reads into a buffer of the program's (setvbuf).
    leak("leak_getline", "leak_getline", 120, 1),
];

/// libstdc++'s emergency pool for exceptions, allocated when it is loaded, before main
/// (libsupc++/eh_alloc.cc; 72704 bytes in Debian 12's libstdc++.so.6.0.30): with the leaks, all
/// the program leaves outstanding when run from its start.
const CPP_STARTUP: u64 = 72704;

/// tests/progs/unwind_rs.rs.
const UNWIND_RS: &[Leak] = &[
    leak("leak_box", "leak_box", 3 * 2048, 3),
    // vec![7u16; 1500]: one block of 1500 x 2 bytes.
    leak("leak_vec", "leak_vec", 3000, 1),
    // "leak".repeat(250): exactly 1000 bytes, allocated once.
    leak("leak_string", "leak_string", 2 * 1000, 2),
];

/// std's way from the Rust program's main to the process's entry (lang_start's closure runs
/// inside lang_start_internal).
const RS_ROOT: &[&str] =
    &["run_leaks", "unwind_rs::main", "std::rt::lang_start_internal", "main", "__libc_start_call_main"];

/// Runs `memleak --unwind <unwind> --json -T 100000 <extra> -c <command>` (every stack) and
/// returns its final report, checked for a clean exit and no lost events, allocations or
/// stacks. `unwind` None: without the option, to get its default.
fn memleak_command(unwind: Option<&str>, command: &str, extra: &[&str]) -> Value {
    let mut args = vec!["memleak"];
    if let Some(how) = unwind {
        args.extend(["--unwind", how]);
    }
    args.extend(["--json", "-T", "100000"]);
    args.extend(extra);
    args.extend(["-c", command]);
    let out = run(&args, Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?}: exit {}: {stderr}", out.status);
    assert!(stderr.contains("command exited with status 0"), "{stderr}");
    let report = final_report(&String::from_utf8_lossy(&out.stdout));
    for field in ["map_full", "stacks_lost", "events_lost"] {
        assert_eq!(report["blind_spots"][field], 0, "blind spot {field}: {}", report["blind_spots"]);
    }
    assert_detached("memleak");
    report
}

/// One line per stack for failure messages: `func file:line <- func ...`, innermost first.
fn brief(stack: &Value) -> String {
    let frames = stack["frames"].as_array().map(Vec::as_slice).unwrap_or_default();
    let names: Vec<String> = frames
        .iter()
        .map(|f| {
            let func = f["func"].as_str().unwrap_or("?");
            match (f["file"].as_str(), f["line"].as_u64()) {
                (Some(file), Some(line)) => format!("{func} {}:{line}", file.rsplit('/').next().unwrap_or(file)),
                _ => format!("{func} [{}]", f["module"].as_str().unwrap_or("?")),
            }
        })
        .collect();
    // A run of the same frame (unknown addresses past a lost frame pointer, say) shown once.
    let mut runs: Vec<(String, usize)> = Vec::new();
    for name in names {
        match runs.last_mut() {
            Some((last, n)) if *last == name => *n += 1,
            _ => runs.push((name, 1)),
        }
    }
    let shown: Vec<String> =
        runs.into_iter().map(|(name, n)| if n > 1 { format!("{name} x{n}") } else { name }).collect();
    format!("{} bytes in {} allocations: {}", stack["bytes"], stack["allocs"], shown.join(" <- "))
}

fn brief_all(report: &Value) -> String {
    report["stacks"].as_array().unwrap().iter().map(|s| format!("\n  {}", brief(s))).collect()
}

/// The stack has frames named `path[0]`, `path[1]`, ... in that order, from innermost outwards
/// (other frames may come between).
fn assert_path(stack: &Value, path: &[&str]) {
    let mut frames = stack["frames"].as_array().unwrap().iter();
    for func in path {
        assert!(frames.any(|f| is_named(f, func)), "no {func} in order {path:?}: {}", brief(stack));
    }
}

/// Every leak of `leaks` exactly, at its marked line of `file`, in stacks that go on through
/// `root` (the callers every leak shares) to the process's entry; `churn`'s memory, all freed,
/// in no stack.
fn assert_leaks(report: &Value, file: &str, leaks: &[Leak], root: &[&str]) {
    let mut funcs: Vec<&str> = leaks.iter().map(|l| l.func).collect();
    funcs.dedup();
    for func in funcs {
        let want: BTreeMap<u64, (u64, u64)> = leaks
            .iter()
            .filter(|l| l.func == func)
            .map(|l| (marker_line(file, l.marker).into(), (l.bytes, l.allocs)))
            .collect();
        let mut got: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
        for stack in stacks_with(report, func) {
            let frame = frame_of(stack, func).unwrap();
            assert!(frame["file"].as_str().is_some_and(|f| f.ends_with(file)), "{func}: file: {}", brief(stack));
            let at = got.entry(frame["line"].as_u64().unwrap_or(0)).or_default();
            at.0 += stack["bytes"].as_u64().unwrap();
            at.1 += stack["allocs"].as_u64().unwrap();
            let path: Vec<&str> = std::iter::once(func).chain(root.iter().copied()).collect();
            assert_path(stack, &path);
        }
        assert_eq!(got, want, "{func}: (bytes, allocations) per line of {file}; stacks:{}", brief_all(report));
    }
    assert!(stacks_with(report, "churn").is_empty(), "freed memory reported:{}", brief_all(report));
}

#[test]
fn unwind_dwarf_c_reaches_main_through_libc() {
    if !unwind_tables("unwind_dwarf_c_reaches_main_through_libc") {
        return;
    }
    let target = prog_nofp("unwind_c");
    let report = memleak_command(Some("dwarf"), target.to_str().unwrap(), &[]);
    assert_leaks(&report, "unwind_c.c", UNWIND_C, C_ROOT);
    // Nothing else is outstanding: the C program allocates nothing before main.
    assert_eq!(report["total_bytes"], UNWIND_C.iter().map(|l| l.bytes).sum::<u64>(), "{}", brief_all(&report));
    // From the comparator (one allocation, one stack) back to the qsort call, the walk crosses
    // libc's sort code.
    let stack = stacks_with(&report, "compare_and_leak")[0];
    let frames = stack["frames"].as_array().unwrap();
    let at = |func: &str| {
        frames.iter().position(|f| is_named(f, func)).unwrap_or_else(|| panic!("no {func}: {}", brief(stack)))
    };
    let caller = &frames[at("leak_through_qsort")];
    assert_eq!(caller["line"], marker_line("unwind_c.c", "leak_through_qsort"), "{}", brief(stack));
    let between = &frames[at("compare_and_leak") + 1..at("leak_through_qsort")];
    assert!(between.iter().any(|f| f["module"] == "libc.so.6"), "no libc frame under qsort: {}", brief(stack));
}

#[test]
fn unwind_dwarf_cpp_reaches_main_through_libstdcxx() {
    if !unwind_tables("unwind_dwarf_cpp_reaches_main_through_libstdcxx") {
        return;
    }
    let target = prog_nofp("unwind_cpp");
    let report = memleak_command(Some("dwarf"), target.to_str().unwrap(), &[]);
    assert_leaks(&report, "unwind_cpp.cpp", UNWIND_CPP, C_ROOT);
    let leaked: u64 = UNWIND_CPP.iter().map(|l| l.bytes).sum();
    assert_eq!(report["total_bytes"], leaked + CPP_STARTUP, "{}", brief_all(&report));
}

/// Attached to a running process: the unwind tables of what it had mapped before memleak came
/// are found too.
#[test]
fn unwind_dwarf_cpp_attached_by_pid() {
    if !unwind_tables("unwind_dwarf_cpp_attached_by_pid") {
        return;
    }
    let Ready { child: mut target, mut stdin, mut lines } =
        Ready::start(Command::new(prog_nofp("unwind_cpp")).arg("wait"));
    let pid = target.id().to_string();
    let mut mt =
        Running::start(&["memleak", "--unwind", "dwarf", "--json", "-T", "100000", "-o", "0", "-p", &pid, "1"]);
    mt.wait_ready();
    writeln!(stdin).unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "leaked");
    drop(stdin);
    assert!(target.wait().unwrap().success());
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(30));
    assert!(status.success(), "{status}: {stderr}");
    let report = final_report(&stdout);
    assert_eq!(report["pid"], target.id());
    assert_leaks(&report, "unwind_cpp.cpp", UNWIND_CPP, C_ROOT);
    // libstdc++'s pool and stdio's buffers were allocated before the attach.
    assert_eq!(report["total_bytes"], UNWIND_CPP.iter().map(|l| l.bytes).sum::<u64>(), "{}", brief_all(&report));
    assert_detached("memleak");
}

/// Frame pointers alone stop at the first function without one (operator new, in libstdc++):
/// no stack gets back to the program's functions, though every byte is still counted. Fails if
/// `--unwind fp` ever quietly used DWARF.
#[test]
fn unwind_fp_cpp_stops_short_of_main() {
    if !bpf_available("unwind_fp_cpp_stops_short_of_main") {
        return;
    }
    let target = prog_nofp("unwind_cpp");
    let report = memleak_command(Some("fp"), target.to_str().unwrap(), &[]);
    let leaked: u64 = UNWIND_CPP.iter().map(|l| l.bytes).sum();
    assert_eq!(report["total_bytes"], leaked + CPP_STARTUP, "{}", brief_all(&report));
    let stacks = report["stacks"].as_array().unwrap();
    for stack in stacks {
        for func in ["run_leaks", "main", "__libc_start_call_main"] {
            assert!(frame_of(stack, func).is_none(), "--unwind fp reached {func}: {}", brief(stack));
        }
    }
    // What that loses is counted: every walk was a frame-pointer walk, and every stack shown
    // ends short of the program's entry.
    let cut = &report["blind_spots"]["cut_stacks"];
    assert!(cut["walks"].as_u64().unwrap() > 0, "{cut}");
    assert_eq!(cut["fp_walks"], cut["walks"], "{cut}");
    assert_eq!(cut["fp_short"], stacks.len(), "{cut}");
}

/// Code a program writes at run time (a JIT's), in an anonymous executable mapping with no
/// unwind table: the walk goes on through it by its frame pointer, to the program's entry.
/// It used to stop there and blame tables "not loaded yet".
#[test]
fn unwind_goes_through_jit_code_by_frame_pointer() {
    if !unwind_tables("unwind_goes_through_jit_code_by_frame_pointer") {
        return;
    }
    let target = prog_nofp("jit_stub");
    let report = memleak_command(None, target.to_str().unwrap(), &[]);
    let stacks = stacks_with(&report, "leak_from_jit");
    assert_eq!(stacks.len(), 1, "{}", brief_all(&report));
    assert_eq!(stacks[0]["bytes"], 5 * 777, "{}", brief(stacks[0]));
    assert_eq!(stacks[0]["allocs"], 5, "{}", brief(stacks[0]));
    assert_path(stacks[0], &["leak_from_jit", "run_jit", "main", "__libc_start_call_main", "_start"]);
    let cut = &report["blind_spots"]["cut_stacks"];
    assert_eq!(cut["not_loaded"], 0, "{cut}");
    assert!(cut["fp_frames"].as_u64().unwrap() >= 5, "the stub's frames come from its frame pointer: {cut}");
}

/// A program whose `.eh_frame` is malformed: the walk stops at it (no frame pointer leads
/// on), and the cut is named for what it is, an unusable table; -v names the file.
#[test]
fn unwind_names_a_malformed_table_as_unusable() {
    if !unwind_tables("unwind_names_a_malformed_table_as_unusable") {
        return;
    }
    let target = build_prog("corrupt_unwind", Flavour::CorruptUnwind);
    let out = run(&["-v", "memleak", "--json", "-c", target.to_str().unwrap()], Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("corrupt_unwind: unusable table"), "{stderr}");
    let report = final_report(&String::from_utf8_lossy(&out.stdout));
    let stacks = stacks_with(&report, "leak_here");
    assert_eq!(stacks.len(), 1, "{}", brief_all(&report));
    assert_eq!(stacks[0]["bytes"], 3 * 555, "{}", brief(stacks[0]));
    assert_eq!(stacks[0]["allocs"], 3, "{}", brief(stacks[0]));
    let cut = &report["blind_spots"]["cut_stacks"];
    assert_eq!(cut["unusable_table"], 3, "{cut}");
    assert_eq!(cut["not_loaded"], 0, "{cut}");
    assert_eq!(cut["no_table"], 0, "{cut}");
}

/// Without `--unwind`, memleak uses the DWARF tables where a module has them.
#[test]
fn unwind_default_uses_dwarf_where_tables_exist() {
    if !unwind_tables("unwind_default_uses_dwarf_where_tables_exist") {
        return;
    }
    let target = prog_nofp("unwind_c");
    let report = memleak_command(None, target.to_str().unwrap(), &[]);
    assert_leaks(&report, "unwind_c.c", UNWIND_C, C_ROOT);
}

#[test]
fn unwind_dwarf_rust_reaches_main_through_lang_start() {
    if !unwind_tables("unwind_dwarf_rust_reaches_main_through_lang_start") {
        return;
    }
    let target = prog_nofp("unwind_rs");
    let report = memleak_command(Some("dwarf"), target.to_str().unwrap(), &[]);
    assert_leaks(&report, "unwind_rs.rs", UNWIND_RS, RS_ROOT);
}

/// Debian's python3.11 (no frame pointers): the 1500 bytearrays of 100,000 bytes the script
/// keeps, found by their size (each buffer is malloc'd with one byte more, for a NUL), each
/// with a stack from the interpreter's loop to Py_BytesMain. memleak -c probes the interpreter
/// at its exec, before it runs: the script needs no handshake.
#[test]
fn unwind_dwarf_python_reaches_py_bytes_main() {
    if !unwind_tables("unwind_dwarf_python_reaches_py_bytes_main") {
        return;
    }
    const PYTHON: &str = "/usr/bin/python3.11";
    // Functions python3.11 exports, on the way gdb shows from malloc (main tail-calls
    // Py_BytesMain, so libc's caller comes next); unexported ones between are unnamed.
    const PY_PATH: &[&str] = &[
        "PyByteArray_Resize",
        "_PyEval_EvalFrameDefault",
        "PyEval_EvalCode",
        "Py_RunMain",
        "Py_BytesMain",
        "__libc_start_call_main",
    ];
    assert!(std::path::Path::new(PYTHON).exists(), "{PYTHON} is missing (cargo xtask setup installs python3.11)");
    let script = repo().join("tests/progs/unwind_py.py");
    // -I -S: no environment, user site or site module to change what the interpreter does.
    let command = format!("{PYTHON} -I -S {}", script.display());
    let report = memleak_command(Some("dwarf"), &command, &["-a"]);
    let mut kept = 0;
    for stack in report["stacks"].as_array().unwrap() {
        let ours = stack["allocations"].as_array().unwrap().iter().filter(|a| a["size"] == 100_001).count();
        if ours > 0 {
            kept += ours;
            assert_path(stack, PY_PATH);
        }
    }
    assert_eq!(kept, 1500, "allocations of 100,001 bytes:{}", brief_all(&report));
}
