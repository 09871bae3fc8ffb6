//! memleak --watch on a program that writes where glibc never looks (tests/progs/watch_writes.c):
//! past the end of live blocks and into freed ones, from threads started after the watches
//! were armed. Each kind is caught at the writing line with the block's stacks; the same
//! program writing in bounds gives no error and says what was watched; bad input is one line.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// memtrace memleak --json --watch 4 -c "watch_writes MODE": its memory_error records and
/// the final report, after checking the program ran to its end.
fn watch_run(mode: &str) -> (Vec<Value>, Value) {
    let cmd = format!("{} {mode} 3000", prog("watch_writes").display());
    let out = run(&["memleak", "--json", "--watch", "4", "-c", &cmd], Duration::from_secs(120));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{mode}: {stderr}");
    assert!(stdout.starts_with("done\n") || stdout.contains("\ndone\n"), "{mode}: {stdout}");
    let errors = json_lines(&stdout).into_iter().filter(|l| l["type"] == "memory_error").collect();
    (errors, final_report(&stdout))
}

/// `func` at the line of watch_writes.c marked `tag`.
fn at(func: &str, tag: &str) -> (String, u64) {
    tagged_at("watch_writes.c", func, tag)
}

fn in_stack(stack: &Value, func: &str) -> bool {
    stack.as_array().is_some_and(|frames| frames.iter().any(|f| is_named(f, func)))
}

/// What the report says was watched: some blocks of each kind named, for some time. (A kind
/// not named may find no block still as offered in a run: the program's blocks live or stay
/// freed for 10 to 20 ms of each round.)
fn assert_watched(report: &Value, kinds: &[&str]) {
    let w = &report["watch"];
    assert_eq!(w["slots"], 4, "{w:#}");
    for kind in kinds {
        let (blocks, seconds) = (format!("{kind}_blocks"), format!("{kind}_seconds"));
        let (blocks, seconds) = (blocks.as_str(), seconds.as_str());
        assert!(w[blocks].as_u64().unwrap() > 0, "{blocks}: {w:#}");
        assert!(w[seconds].as_f64().unwrap() > 0.0, "{seconds}: {w:#}");
    }
    assert_eq!(w["threads_missed"], 0, "{w:#}");
}

#[test]
fn memleak_watch_catches_a_write_past_the_end_at_its_line() {
    let test = "memleak_watch_catches_a_write_past_the_end_at_its_line";
    if !watchable(test) {
        return;
    }
    let (errors, report) = watch_run("past-end");
    // One report per watched block; every one is this write.
    assert!(!errors.is_empty(), "{report:#}");
    for e in &errors {
        assert_eq!(e["kind"], "write_past_end", "{e:#}");
        assert_eq!(e["call"], "write", "{e:#}");
        assert_eq!(e["size"], 36, "{e:#}");
        assert_eq!(
            e["address_is"],
            format!("watched past the block's end: 4 bytes from {}", hx(unhex(e["addr"].as_str().unwrap()) + 36)),
            "{e:#}"
        );
        assert_eq!(first_line(&e["stack"]), at("write_past_end", "ERROR:write_past_end"), "{e:#}");
        assert!(in_stack(&e["stack"], "writer"), "a thread's write: {e:#}");
        assert_eq!(first_line(&e["alloc_stack"]), at("make_block", "ALLOC:make_block"), "{e:#}");
        assert!(e.get("free_stack").is_none(), "{e:#}");
    }
    assert_eq!(report["errors"].as_array().map(Vec::len), Some(errors.len()), "{report:#}");
    assert_watched(&report, &["past_end"]);
    assert_detached("memleak");
}

#[test]
fn memleak_watch_catches_a_write_to_a_freed_block_with_its_free() {
    let test = "memleak_watch_catches_a_write_to_a_freed_block_with_its_free";
    if !watchable(test) {
        return;
    }
    // The free's stack is walked at its entry, where frame pointers miss the caller.
    if !bpf_loop() {
        not_run(test, "stacks from a free's entry need unwind tables, and so bpf_loop (5.17+)");
        return;
    }
    // Emulated by QEMU (TCG), arming a watch takes longer than the program keeps a freed block
    // unused (10 ms): the report counts them all as reused before armed (seen on 6.1).
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if cpu.lines().any(|l| l.starts_with("model name") && l.contains("QEMU")) {
        not_run(test, "under QEMU's emulation a freed block is reused before its watch is armed");
        return;
    }
    let (errors, report) = watch_run("after-free");
    assert!(!errors.is_empty(), "{report:#}");
    for e in &errors {
        assert_eq!(e["kind"], "use_after_free_write", "{e:#}");
        assert_eq!(e["size"], 120, "{e:#}");
        assert_eq!(first_line(&e["stack"]), at("scribble", "ERROR:scribble"), "{e:#}");
        assert!(in_stack(&e["stack"], "writer"), "a thread's write: {e:#}");
        assert_eq!(first_line(&e["free_stack"]), at("release", "FREE:release"), "{e:#}");
        assert_eq!(first_line(&e["alloc_stack"]), at("make_block", "ALLOC:make_block"), "{e:#}");
        let ms = e["freed_ms_before"].as_f64().unwrap();
        assert!((5.0..1000.0).contains(&ms), "freed about 10 ms before: {e:#}");
    }
    assert_watched(&report, &["freed"]);
    assert_detached("memleak");
}

/// The same blocks and threads, each write in bounds: glibc's own writes to the watched
/// words (its free lists, as it hands a freed block out again) are not errors.
#[test]
fn memleak_watch_in_bounds_gives_no_error() {
    let test = "memleak_watch_in_bounds_gives_no_error";
    if !watchable(test) {
        return;
    }
    let (errors, report) = watch_run("clean");
    assert!(errors.is_empty(), "{errors:#?}");
    assert!(report.get("errors").is_none(), "{report:#}");
    assert_watched(&report, &["past_end", "freed"]);
    assert_detached("memleak");
}

#[test]
fn memleak_watch_bad_input_is_one_line() {
    for n in ["0", "5"] {
        assert_exact_error(&["memleak", "--watch", n, "-c", "true"], &format!("--watch takes 1 to 4, not {n}"));
    }
    assert_exact_error(
        &["memleak", "--watch", "2"],
        "--watch watches a process's blocks (with -p or -c): the kernel's are not watched",
    );
    assert_exact_error(
        &["memleak", "--watch", "2", "--no-errors", "-c", "true"],
        "--watch needs the record of freed blocks that --no-errors turns off",
    );
    if !bpf_available("memleak_watch_bad_input_is_one_line") {
        return;
    }
    if breakpoints().is_err() {
        assert_one_line_error(&["memleak", "--watch", "2", "-c", "true"], "--watch needs hardware breakpoints");
    } else if kernel_version() < (6, 1) {
        assert_one_line_error(&["memleak", "--watch", "2", "-c", "true"], "--watch needs Linux 6.1 or later");
    }
}
