//! memleak's sampled runs (`--sample-bytes N`, `-s N`) against the real kernel: each leak of
//! sample_leak estimated within 10%, the churn (allocated and freed) nowhere, the estimates
//! marked as such, and bad sampling options refused in one line.
//!
//! Why 10% cannot flake. Under `--sample-bytes N` the countdown is (close to) exponential, so
//! the sampled points form a Poisson process over the bytes allocated: a block of s bytes is
//! sampled with p = 1 - exp(-s/N), independently of every other block. With n blocks the
//! estimate k * s / p (k blocks sampled) has relative standard deviation sqrt((1 - p) / (n p)):
//! - leak_small, n = 40,000 blocks of s = 4 KiB, N = 64 KiB: p = 0.0606,
//!   sd = sqrt(0.9394 / 2424) = 1.97%, so 10% is 5.1 standard deviations;
//! - leak_large, n = 768 blocks of s = 96 KiB: p = 0.777, sd = sqrt(0.223 / 597) = 1.93%,
//!   10% is 5.2 sd.
//!   Each check fails by chance with probability under 4e-7 (normal tails; the binomial's are
//!   thinner still at these n p), under 2e-6 for the six of a run of this file (-c, -c --uprobes, -p).
//!   Under `-s 10`: leak_small's k is binomial(40,000, 0.1), sd = sqrt(0.9 / 4000) = 1.5%,
//!   10% is 6.7 sd. leak_large's 768 blocks give only 77 samples there (sd 10.8%): not checked.

#[path = "common/mod.rs"]
mod common;

use std::{process::Command, time::Duration};

use common::*;
use serde_json::{Value, json};

const SMALL: (&str, u64, u64) = ("leak_small", 40_000 * 4096, 40_000);
const LARGE: (&str, u64, u64) = ("leak_large", 768 * 96 * 1024, 768);
const CHURN: [&str; 2] = ["churn_small", "churn_large"];

/// The estimated bytes and blocks of the stacks through `func`.
fn estimate(report: &Value, func: &str) -> (u64, u64) {
    stacks_with(report, func)
        .iter()
        .fold((0, 0), |(b, a), s| (b + s["bytes"].as_u64().unwrap(), a + s["allocs"].as_u64().unwrap()))
}

/// Within 10% of `exact` in bytes and in blocks.
fn assert_estimates(how: &str, report: &Value, (func, bytes, blocks): (&str, u64, u64)) {
    let (got_bytes, got_blocks) = estimate(report, func);
    let off = |got: u64, exact: u64| (got as f64 - exact as f64).abs() / exact as f64;
    assert!(off(got_bytes, bytes) < 0.10, "{how}: {func}: {got_bytes} bytes estimated, {bytes} leaked");
    assert!(off(got_blocks, blocks) < 0.10, "{how}: {func}: {got_blocks} blocks estimated, {blocks} leaked");
    eprintln!(
        "{how}: {func}: {got_bytes} bytes ({:+.2}%) in {got_blocks} blocks ({:+.2}%)",
        (got_bytes as f64 / bytes as f64 - 1.0) * 100.0,
        (got_blocks as f64 / blocks as f64 - 1.0) * 100.0
    );
}

/// The churn, freed before the final report, shows as nothing (under 1% of the total, to
/// allow for a stack the unwinder cut above the churn's frame... of which there should be none).
fn assert_no_churn(how: &str, report: &Value) {
    let total = report["total_bytes"].as_u64().unwrap();
    for func in CHURN {
        let (bytes, _) = estimate(report, func);
        assert!(bytes * 100 < total, "{how}: {func} shows {bytes} of {total} bytes: {report:#}");
    }
}

/// The final JSON report of memleak with `args` on sample_leak, run by `-c` or attached with `-p`.
fn sampled_run(how: &str, args: &[&str]) -> Value {
    let prog = prog_nofp("sample_leak");
    let mut common = vec!["memleak", "--json", "-T", "100", "-o", "0"];
    common.extend_from_slice(args);
    let stdout = if how == "-c" {
        common.extend(["-c", prog.to_str().unwrap()]);
        let out = run(&common, Duration::from_secs(300));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{how} {args:?}: exit {}: {stderr}", out.status);
        // -s is the probes' alone; --sample-bytes is the in-process recorder's too.
        let probed = args.contains(&"--uprobes") || args.contains(&"-s");
        let said = if probed { "probed through" } else { "recorded in the process" };
        assert!(stderr.contains(said), "{how} {args:?}: {stderr}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    } else {
        let mut cmd = Command::new(&prog);
        cmd.arg("wait");
        let mut target = Gated::spawn(cmd);
        let pid = target.pid().to_string();
        common.extend(["-p", &pid]);
        let mut mt = Running::start(&common);
        mt.wait_ready();
        assert_eq!(target.act_line(), "leaked");
        target.end();
        let (status, stdout, stderr) = mt.finish(Duration::from_secs(120));
        assert!(status.success(), "{how} {args:?}: {status}: {stderr}");
        stdout
    };
    let report = final_report(&stdout);
    assert_detached("memleak");
    // Frees of blocks left out are not blind spots.
    assert_eq!(report["blind_spots"]["unknown_frees"], 0, "{how} {args:?}: {:#}", report["blind_spots"]);
    report
}

#[test]
fn memleak_sample_bytes_estimates_each_leak_within_10_percent() {
    if !bpf_available("memleak_sample_bytes_estimates_each_leak_within_10_percent") {
        return;
    }
    for (how, extra) in [("-c", None), ("-c", Some("--uprobes")), ("-p", None)] {
        let args: Vec<&str> = ["--sample-bytes", "65536"].into_iter().chain(extra).collect();
        let report = sampled_run(how, &args);
        let how = &format!("{how} {}", extra.unwrap_or_default());
        assert_eq!(report["estimated"], true, "{how}: {report:#}");
        assert_eq!(report["sampling"], json!({"by": "bytes", "mean_bytes": 65536}), "{how}");
        assert_estimates(how, &report, SMALL);
        assert_estimates(how, &report, LARGE);
        assert_no_churn(how, &report);
    }
}

#[test]
fn memleak_sample_rate_scales_its_counts() {
    if !bpf_available("memleak_sample_rate_scales_its_counts") {
        return;
    }
    let report = sampled_run("-c", &["-s", "10"]);
    assert_eq!(report["estimated"], true, "{report:#}");
    assert_eq!(report["sampling"], json!({"by": "allocations", "every": 10}));
    assert_estimates("-s 10", &report, SMALL);
    assert_no_churn("-s 10", &report);
}

/// The table says its numbers are estimates: a line saying how they were sampled, and `~`.
#[test]
fn memleak_sampled_table_marks_its_estimates() {
    if !bpf_available("memleak_sampled_table_marks_its_estimates") {
        return;
    }
    let prog = prog_nofp("sample_leak");
    let out =
        run(&["memleak", "-T", "3", "--sample-bytes", "65536", "-c", prog.to_str().unwrap()], Duration::from_secs(300));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    let title = lines.iter().position(|l| l.contains("final report, pid")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(lines[title].contains(": ~"), "{stdout}");
    assert_eq!(
        lines[title + 1],
        "  estimated from allocations sampled every 64.0 KiB on average (--sample-bytes 65536)",
        "{stdout}"
    );
    assert_eq!(lines[title + 2], "  memory errors not checked: a sampled run leaves most blocks out", "{stdout}");
    let stacks: Vec<&&str> = lines.iter().filter(|l| l.contains(" allocations from stack ")).collect();
    assert!(!stacks.is_empty(), "{stdout}");
    for l in stacks {
        assert!(l.starts_with("  ~") && l.contains(" bytes in ~"), "{l}");
    }
    assert_detached("memleak");
}

#[test]
fn memleak_bad_sampling_options_are_one_line_errors() {
    let prog = prog("sample_leak");
    let p = prog.to_str().unwrap();
    assert_exact_error(&["memleak", "--sample-bytes", "0", "-c", p], "--sample-bytes takes 1 to 1099511627776, not 0");
    assert_exact_error(
        &["memleak", "--sample-bytes", "4096", "-s", "10", "-c", p],
        "--sample-bytes and -s/--sample-rate are two ways to sample: give one of them",
    );
    assert_exact_error(&["memleak", "-s", "0", "-c", p], "--sample-rate must be at least 1");
    assert_one_line_error(&["memleak", "--sample-bytes", "4096", "--errors-only", "-c", p], "--sample-bytes");
}
