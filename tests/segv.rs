//! segv against the real kernel: tests/progs/segv_crash.c dies each way it knows (main and
//! thread stack overflow, NULL write, write to a read-only mapping, glibc's heap checks), and
//! each crash must be classified exactly, with the function at the fault and glibc's message;
//! bad input; nothing left attached.

#[path = "common/mod.rs"]
mod common;

use std::{io::Write as _, process::Command, time::Duration};

use common::*;
use serde_json::Value;

/// Runs `segv -p` on segv_crash dying `way`: the one crash record and the final line.
fn crash(test: &str, way: &str) -> Option<(Value, Value)> {
    if !bpf_available(test) {
        return None;
    }
    let mut victim = Ready::start(Command::new(prog("segv_crash")).arg(way));
    let pid = victim.child.id();
    let mut mt = Running::start(&["segv", "--json", "-p", &pid.to_string()]);
    mt.wait_ready();
    writeln!(victim.stdin).unwrap();
    let status = victim.child.wait().unwrap();
    assert!(!status.success(), "segv_crash {way} did not crash: {status}");
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(30));
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains(&format!("process {pid} exited")), "{stderr}");
    let (events, last) = events_and_final(&stdout);
    assert_eq!(events.len(), 1, "one crash: {stdout}\n{stderr}");
    assert_eq!(last["crashes"], 1, "{last}");
    assert_eq!(last["events_lost"], 0, "{last}");
    assert_eq!(last["stacks_lost"], 0, "{last}");
    assert_eq!(last["unseen_processes"], 0, "memtrace saw the process before it died: {last}");
    let e = events.into_iter().next().unwrap();
    assert_eq!(e["pid"], pid, "{e:#}");
    assert_eq!(e["comm"], "segv_crash", "{e:#}");
    assert_eq!(e["fatal"], true, "{e:#}");
    assert_detached("segv");
    Some((e, last))
}

/// The class `expected`, or where the kernel cannot look mappings up (before 5.17) and the
/// process was gone before its maps could be read, "unclassified" counted as a blind spot.
fn assert_class(e: &Value, last: &Value, expected: &str) {
    if kernel_version() < (5, 17) && e["class"] == "unclassified" {
        assert_eq!(last["unclassified"], 1, "{last}");
        assert!(e["class_text"].as_str().unwrap().contains("Linux 5.17+"), "{e:#}");
        return;
    }
    assert_eq!(e["class"], expected, "{e:#}");
    assert_eq!(last["unclassified"], 0, "{last}");
}

fn first_frame(e: &Value) -> &str {
    e["frames"][0]["func"].as_str().unwrap_or_else(|| panic!("the faulting frame has no name: {e:#}"))
}

#[test]
fn segv_classifies_a_main_stack_overflow() {
    let Some((e, last)) = crash("segv_classifies_a_main_stack_overflow", "stack") else { return };
    assert_eq!((e["signal"].as_str(), e["code"].as_str()), (Some("SIGSEGV"), Some("SEGV_MAPERR")), "{e:#}");
    assert_class(&e, &last, "stack_overflow");
    if e["class"] == "stack_overflow" {
        assert!(e["class_text"].as_str().unwrap().contains("main thread"), "{e:#}");
    }
    assert_eq!(first_frame(&e), "recurse", "{e:#}");
}

#[test]
fn segv_classifies_a_thread_stack_overflow() {
    let Some((e, last)) = crash("segv_classifies_a_thread_stack_overflow", "thread-stack") else { return };
    assert_eq!((e["signal"].as_str(), e["code"].as_str()), (Some("SIGSEGV"), Some("SEGV_ACCERR")), "{e:#}");
    assert_class(&e, &last, "stack_overflow");
    if e["class"] == "stack_overflow" {
        assert!(e["class_text"].as_str().unwrap().contains("guard page"), "{e:#}");
        assert!(e["mapping"].as_str().unwrap().ends_with(" ---"), "the guard is PROT_NONE: {e:#}");
    }
    assert_ne!(e["tid"], e["pid"], "a thread, not the main one: {e:#}");
    assert_eq!(first_frame(&e), "recurse", "{e:#}");
}

#[test]
fn segv_classifies_a_null_write() {
    let Some((e, last)) = crash("segv_classifies_a_null_write", "null") else { return };
    assert_eq!((e["signal"].as_str(), e["code"].as_str()), (Some("SIGSEGV"), Some("SEGV_MAPERR")), "{e:#}");
    // Known from the address alone, on every kernel.
    assert_eq!(e["class"], "null_page", "{e:#}");
    assert_eq!(last["unclassified"], 0, "{last}");
    assert_eq!(e["address"], "0x10", "p[4] of an int pointer: {e:#}");
    assert_eq!(e["access"], "write|user|not-present", "{e:#}");
    assert_eq!(first_frame(&e), "null_write", "{e:#}");
    assert!(frame_of(&e, "main").is_some(), "{e:#}");
}

#[test]
fn segv_classifies_a_write_to_a_read_only_mapping() {
    let Some((e, last)) = crash("segv_classifies_a_write_to_a_read_only_mapping", "readonly") else { return };
    assert_eq!((e["signal"].as_str(), e["code"].as_str()), (Some("SIGSEGV"), Some("SEGV_ACCERR")), "{e:#}");
    assert_class(&e, &last, "write_read_only");
    // A fresh page of the mapping: not present yet, and not writable.
    assert!(e["access"].as_str().unwrap().starts_with("write|user|"), "{e:#}");
    assert_eq!(first_frame(&e), "readonly_write", "{e:#}");
    assert!(frame_of(&e, "main").is_some(), "{e:#}");
}

/// A glibc abort: its message, malloc_printerr and the program's function on the stack.
fn assert_heap(test: &str, way: &str, message: &str, function: &str) {
    let Some((e, _)) = crash(test, way) else { return };
    assert_eq!((e["signal"].as_str(), e["code"].as_str()), (Some("SIGABRT"), Some("SI_TKILL")), "{e:#}");
    assert_eq!(e["class"], "heap_corruption", "{e:#}");
    assert_eq!(e["message"], message, "{e:#}");
    assert_eq!(e["address"], Value::Null, "an abort has no fault address: {e:#}");
    // Through libc, built without frame pointers: whole only with the unwind tables.
    if !bpf_loop() {
        return;
    }
    for f in ["malloc_printerr", function, "main"] {
        assert!(frame_of(&e, f).is_some(), "{f} on the stack: {e:#}");
    }
}

#[test]
fn segv_names_glibcs_message_for_a_heap_overrun() {
    assert_heap("segv_names_glibcs_message_for_a_heap_overrun", "overrun", "free(): invalid size", "overrun");
}

#[test]
fn segv_names_glibcs_message_for_a_double_free() {
    let test = "segv_names_glibcs_message_for_a_double_free";
    assert_heap(test, "double-free", "free(): double free detected in tcache 2", "double_free");
}

#[test]
fn segv_table_shows_the_class_and_the_stack() {
    if !bpf_available("segv_table_shows_the_class_and_the_stack") {
        return;
    }
    let mut victim = Ready::start(Command::new(prog("segv_crash")).arg("null"));
    let pid = victim.child.id();
    let mut mt = Running::start(&["segv", "-p", &pid.to_string()]);
    mt.wait_ready();
    writeln!(victim.stdin).unwrap();
    victim.child.wait().unwrap();
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(30));
    assert!(status.success(), "{status}: {stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].contains("PID") && lines[0].contains("CLASS"), "{stdout}");
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(row[1..7], [&pid.to_string(), "segv_crash", "SIGSEGV", "SEGV_MAPERR", "0x10", "NULL"], "{stdout}");
    assert!(lines.iter().any(|l| l.trim_start().starts_with("null_write+")), "{stdout}");
    assert!(stderr.contains("memtrace: segv: blind spots: none"), "{stderr}");
    assert_detached("segv");
}

#[test]
fn segv_rejects_bad_input() {
    assert_one_line_error(&["segv", "-p", "4194304"], "no such process: 4194304");
    assert_one_line_error(&["segv", "-p", "2"], "kernel thread");
    assert_one_line_error(&["segv", "--comm", "a-name-longer-than-15"], "--comm takes 1 to 15 bytes");
    assert_one_line_error(&["segv", "-d", "0"], "-d/--duration");
    assert_one_line_error(&["segv", "--unwind-rows", "10"], "--unwind-rows");
}
