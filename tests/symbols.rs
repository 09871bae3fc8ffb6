//! Naming the frames of reported stacks against the real kernel: code a process maps while it
//! runs, the cold parts of functions, and frames that cannot be named, counted as blind spots.

#[path = "common/mod.rs"]
mod common;

use std::{process::Command, time::Duration};

use common::*;
use serde_json::Value;

/// 300 libraries opened one after another under `-c`: each library's leak is in one stack,
/// with its exact bytes, its function named; the frames of the stripped ones that no symbol
/// names are counted as blind spots, by cause, and so is any other unnamed frame. Before,
/// 7-11% of these frames were bare addresses (maps read while the loader was mapping a
/// library), with "blind spots: none".
#[test]
fn symbols_every_frame_of_300_dlopened_libraries_is_named_or_counted() {
    let test = "symbols_every_frame_of_300_dlopened_libraries_is_named_or_counted";
    if !bpf_available(test) {
        return;
    }
    let (program, libs) = (prog("dlopen_many"), dlopen_libs());
    let cmd = format!("{} {} {DLOPEN_LIBS}", program.display(), libs.display());
    let out = run(&["memleak", "--json", "-T", "1000", "-c", &cmd], Duration::from_secs(120));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stderr.contains("command exited with status 0"), "{}: {stderr}", out.status);
    let report = final_report(&stdout);
    let mut stripped = 0;
    for k in 0..DLOPEN_LIBS {
        let func = format!("leak_{k}");
        let stacks = stacks_with(&report, &func);
        assert_eq!(stacks.len(), 1, "{func}: expected one stack, got {}: {stacks:#?}", stacks.len());
        let stack = stacks[0];
        assert_eq!((&stack["bytes"], &stack["allocs"]), (&dlopen_leak_bytes(k).into(), &1.into()), "{stack:#}");
        let frame = frame_of(stack, &func).unwrap();
        assert_eq!(frame["module"], format!("libleak{k}.so"), "{stack:#}");
        if dlopen_stripped(k) {
            // The local function between leak_K and malloc has no symbol left.
            let inner = &stack["frames"][0];
            assert_eq!((&inner["func"], &inner["unnamed"]), (&Value::Null, &"no_symbol".into()), "{stack:#}");
            assert_eq!(inner["module"], format!("libleak{k}.so"), "{stack:#}");
            stripped += 1;
        }
    }
    let counts = &report["blind_spots"]["unnamed_frames"];
    assert_unnamed_counted(&report, counts);
    assert_eq!(counts["no_symbol"], stripped, "{counts}");
    assert_detached("memleak");
}

/// The table says it too: "blind spots: none" only when every frame shown has a name.
#[test]
fn symbols_the_table_counts_frames_without_a_name() {
    if !bpf_available("symbols_the_table_counts_frames_without_a_name") {
        return;
    }
    let (program, libs) = (prog("dlopen_many"), dlopen_libs());
    // The first stripped library is the 50th.
    let cmd = format!("{} {} 50", program.display(), libs.display());
    let out = run(&["memleak", "-T", "1000", "-c", &cmd], Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let last = stdout.lines().last().unwrap();
    assert_eq!(last, "  blind spots: 1 frames without a name (no symbol in their file)", "{stdout}");
    let out = run(&["memleak", "-T", "1000", "-c", &cmd.replace(" 50", " 49")], Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().last().unwrap(), "  blind spots: none", "{stdout}");
}

/// The start and size of `symbol` in `elf`, from its symbol table.
fn symbol(elf: &std::path::Path, name: &str) -> (u64, u64) {
    let out = Command::new("nm").arg("-S").arg(elf).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            [addr, size, _, n] if n == name => Some((unhex(addr), unhex(size))),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no {name} in {}", elf.display()))
}

/// The start of a frame's part of a function in memory: its address less the offset shown,
/// less one for a return address (memtrace names the call, one byte earlier).
fn start_in_memory(frame: &Value) -> u64 {
    unhex(frame["addr"].as_str().unwrap()) - 1 - frame["offset"].as_u64().unwrap()
}

/// GCC puts the unlikely path of `leak_when_failing` in .text.unlikely, as the symbol
/// `leak_when_failing.cold`: the leak from there is named as that part, with its offset from
/// the part's start (before: `leak_when_failing` plus the address's offset in the file).
#[test]
fn symbols_cold_parts_are_named_as_the_part_they_are() {
    if !unwind_tables("symbols_cold_parts_are_named_as_the_part_they_are") {
        return;
    }
    let program = prog_nofp("cold_part");
    let (cold, cold_size) = symbol(&program, "leak_when_failing.cold");
    let (main, _) = symbol(&program, "main");
    let out = run(&["memleak", "--json", "-c", program.to_str().unwrap()], Duration::from_secs(60));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report = final_report(&String::from_utf8_lossy(&out.stdout));
    let stacks = stacks_with(&report, "leak_when_failing.cold");
    assert_eq!(stacks.len(), 1, "{report:#}");
    assert_eq!((&stacks[0]["bytes"], &stacks[0]["allocs"]), (&321.into(), &1.into()), "{report:#}");
    let frames = stacks[0]["frames"].as_array().unwrap();
    let (part, caller) = (&frames[0], &frames[1]);
    assert_eq!(part["func"], "leak_when_failing.cold", "{frames:#?}");
    assert_eq!(part["line"], marker_line("cold_part.c", "leak_when_failing"), "{part:#}");
    assert!(part["offset"].as_u64().unwrap() < cold_size, "{part:#}");
    assert_eq!(caller["func"], "main", "{frames:#?}");
    // Both offsets exact: the parts lie as far apart in memory as in the file.
    assert_eq!(start_in_memory(part) - start_in_memory(caller), cold - main, "{frames:#?}");
    assert!(stacks_with(&report, "leak_when_failing").is_empty(), "the hot part named: {report:#}");
}
