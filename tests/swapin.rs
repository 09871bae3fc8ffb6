//! swapin against the real kernel. It needs kprobes: where the kernel has none (this host),
//! it must refuse with one line naming the missing feature; where it has them (the VM suite's
//! kernels), it must count every page read back from swap, exactly as the kernel does.

#[path = "common/mod.rs"]
mod common;
#[path = "common/memcg.rs"]
mod memcg;

use std::{process::Stdio, time::Duration};

use common::*;
use memcg::{Memcg, ZramSwap};
use serde_json::Value;

/// The kernel's own count of pages read from swap devices.
fn pswpin() -> u64 {
    let vmstat = std::fs::read_to_string("/proc/vmstat").unwrap();
    vmstat.lines().find_map(|l| l.strip_prefix("pswpin ")).unwrap().trim().parse().unwrap()
}

/// On a kernel without kprobes swapin refuses with one line naming the missing feature.
/// With kprobes, a hog in a 24 MiB group writes 64 MiB, so most of it goes to zram swap, then
/// reads it all twice: swapin's count is the kernel's pswpin over the same time, exactly,
/// all of it the hog's, with the hog's stack.
#[test]
fn swapin_counts_every_page_read_back_from_swap() {
    let test = "swapin_counts_every_page_read_back_from_swap";
    if !bpf_available(test) {
        return;
    }
    if !kprobes() {
        assert_one_line_error(&["swapin", "-d", "1"], "swapin needs a kprobe");
        assert_one_line_error(&["swapin", "-d", "1"], "CONFIG_KPROBES");
        return;
    }
    let Some(_swap) = ZramSwap::on(test) else { return };
    let Some(group) = Memcg::new("swapin", 24) else { return };
    group.allow_swap();
    let mut mt = Running::start(&["swapin", "--json", "--stack", "60"]);
    mt.wait_ready();
    let before = pswpin();
    let hog = group.command(&prog("vm_mem")).args(["hog", "64", "2"]).stdout(Stdio::null()).status().unwrap();
    assert!(hog.success(), "vm_mem hog: {hog}");
    let swapped_in = pswpin() - before;
    mt.signal(libc::SIGINT);
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(60));
    assert!(status.success(), "{status}: {stderr}");
    // 40 MiB over the limit, read back twice: thousands of pages.
    assert!(swapped_in > 5000, "the hog hardly swapped: {swapped_in} pages");
    let lines = json_lines(&stdout);
    let last = lines.last().unwrap();
    assert_eq!(last["final"], true, "{last}");
    assert_eq!(last["total"], swapped_in, "swapin's total against /proc/vmstat pswpin: {last}");
    for field in ["counts_full", "stacks_lost", "events_lost"] {
        assert_eq!(last[field], 0, "{field}: {last}");
    }
    let rows: Vec<&Value> = lines.iter().filter_map(|l| l["swapins"].as_array()).flatten().collect();
    let hogs: u64 = rows.iter().filter(|r| r["comm"] == "vm_mem").map(|r| r["count"].as_u64().unwrap()).sum();
    assert_eq!(hogs, swapped_in, "every swap-in was the hog's: {rows:?}");
    // The buffer's pages are read back in hog(); a few of the hog's other pages (its stack,
    // libc's data) come back in the loader, printf or exit, each with its own stack.
    let through_hog: u64 = rows
        .iter()
        .filter(|r| {
            r["comm"] == "vm_mem" && r["stack"].as_array().is_some_and(|s| s.iter().any(|f| f["func"] == "hog"))
        })
        .map(|r| r["count"].as_u64().unwrap())
        .sum();
    assert!(through_hog * 100 >= swapped_in * 99, "{through_hog} of {swapped_in} through hog(): {rows:?}");
    let whole = rows.iter().any(|r| {
        let names: Vec<&str> = r["stack"].as_array().unwrap().iter().filter_map(|f| f["func"].as_str()).collect();
        // Without unwind tables (before 5.17) frame pointers end in libc, which has none.
        names.starts_with(&["hog", "main"]) && (names.contains(&"_start") || !bpf_loop())
    });
    assert!(whole, "a stack from hog() through main (to _start where the kernel has bpf_loop): {rows:?}");
    assert_detached("swapin");
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
