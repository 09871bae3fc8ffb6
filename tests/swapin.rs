//! swapin against the real kernel. It needs kprobes: where the kernel has none (this host),
//! it must refuse with one line naming the missing feature; where it has them, it counts
//! (the swap-in itself is provoked in the VM suite, `cargo xtask vm-test`).

#[path = "common/mod.rs"]
mod common;

use std::{path::Path, time::Duration};

use common::*;

fn kprobes() -> bool {
    Path::new("/sys/bus/event_source/devices/kprobe/type").exists()
}

/// On a kernel without kprobes swapin refuses with one line naming the missing feature; with
/// kprobes it runs and ends cleanly. Either way the outcome for this kernel is asserted.
#[test]
fn swapin_runs_or_names_the_missing_feature() {
    if !bpf_available("swapin_runs_or_names_the_missing_feature") {
        return;
    }
    if kprobes() {
        let out = run(&["swapin", "--json", "-d", "1"], Duration::from_secs(30));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let lines = json_lines(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(lines.last().map(|l| l["final"].clone()), Some(true.into()), "{lines:?}");
        assert_detached("swapin");
    } else {
        assert_one_line_error(&["swapin", "-d", "1"], "swapin needs a kprobe");
        assert_one_line_error(&["swapin", "-d", "1"], "CONFIG_KPROBES");
    }
}

#[test]
fn swapin_bad_input_is_one_line_error() {
    assert_one_line_error(&["swapin", "0"], "at least 1");
    assert_one_line_error(&["swapin", "-p", "999999999"], "no such process: 999999999");
    assert_exact_error(
        &["swapin", "--stack", "-p", "2"],
        "process 2 (kthreadd) is a kernel thread: it has no user memory to trace",
    );
}
