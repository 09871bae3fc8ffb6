//! memleak's byte sampling on real programs (sqlite3, jq) and on sample_leak: the time
//! `-c --sample-bytes` adds at 512 KiB and 64 KiB (the in-process recorder, sampling per
//! thread), beside `-c` recording every block and the unsampled probes (`-c --uprobes
//! --no-errors`, whose exact outstanding bytes at exit the estimates are held against).

use std::path::Path;

use anyhow::Result;
use serde_json::{Value, json};

use super::programs::{self, Env, Mode, Run};
use super::{median, stats};
use crate::cmd;

const EXACT: Mode = Mode::MemtraceC(&["--uprobes", "--no-errors"]);
const SAMPLED: [Mode; 2] =
    [Mode::MemtraceC(&["--sample-bytes", "524288"]), Mode::MemtraceC(&["--sample-bytes", "65536"])];

pub fn run(runs: usize, memtrace: &Path) -> Result<Value> {
    let dir = cmd::root().join("target/bench-programs");
    std::fs::create_dir_all(&dir)?;
    let env = Env { memtrace: memtrace.to_path_buf(), uprobes: true, dir };
    // -c as it runs by default (the in-process recorder), for comparison: it records every block.
    let modes = [Mode::Untraced, Mode::MemtraceC(&[]), EXACT, SAMPLED[0], SAMPLED[1]];
    let mut out = Vec::new();
    // sqlite3 and jq free nearly everything by their exit (4,841 and 0 bytes outstanding): the
    // time is theirs, the error sample_leak's, whose 228 MiB leak is the same each run.
    let leak = crate::progs::build(cmd::root(), "sample_leak", crate::progs::Flavour::NoFramePointers);
    let leaker = programs::Batch {
        name: "sample_leak",
        what: "tests/progs/sample_leak.c: 228 MiB leaked in 4 KiB and 96 KiB blocks, 4 GiB churned".into(),
        argv: vec![leak.display().to_string()],
        memtrace_args: &[],
    };
    for batch in [programs::sqlite(&env.dir)?, programs::jq(&env.dir)?, leaker] {
        eprintln!("bench: sampling on {} ({runs} runs of each mode)", batch.name);
        let results = programs::each_run(&modes, runs, |mode| programs::run_batch(&env, &batch, mode));
        let wall = |m: Mode| -> Option<Vec<f64>> {
            let (_, r) = results.iter().find(|(mode, _)| *mode == m)?;
            Some(r.as_ref().ok()?.iter().map(|r: &Run| r.wall_s).collect())
        };
        let base = wall(Mode::Untraced).map_or(f64::NAN, |w| median(&w));
        let exact_runs: Vec<u64> = results
            .iter()
            .find(|(m, _)| *m == EXACT)
            .and_then(|(_, r)| r.as_ref().ok())
            .map(|runs| runs.iter().filter_map(|r| r.outstanding).collect())
            .unwrap_or_default();
        let exact = exact_runs.first().copied();
        let rows: Vec<Value> = results
            .iter()
            .map(|(mode, result)| {
                let mut row = json!({ "mode": mode.label(false), "key": mode.key() });
                match result {
                    Err(why) => row["failed"] = json!(why),
                    Ok(runs) => {
                        let w: Vec<f64> = runs.iter().map(|r| r.wall_s).collect();
                        row["wall_s"] = stats(&w);
                        row["added_s"] = json!(median(&w) - base);
                        let outstanding: Vec<u64> = runs.iter().filter_map(|r| r.outstanding).collect();
                        row["outstanding_bytes"] = json!(outstanding);
                        if let Some(exact) = exact.filter(|_| SAMPLED.contains(mode)) {
                            let err: Vec<f64> =
                                outstanding.iter().map(|&o| (o as f64 - exact as f64) / exact as f64 * 100.0).collect();
                            row["error_pct"] = json!(err);
                        }
                    }
                }
                row
            })
            .collect();
        out.push(json!({
            "program": batch.name,
            "what": batch.what,
            // The workload is the same each run: the exact runs should agree with each other.
            "exact_outstanding_bytes": exact_runs,
            "rows": rows,
        }));
    }
    Ok(json!(out))
}

pub fn print(sampled: &Value) {
    println!("\nbyte sampling (memleak -c --sample-bytes N): medians; added = traced - untraced; error = estimated");
    println!("outstanding bytes at exit against the unsampled run's exact ones, per run");
    for p in sampled.as_array().into_iter().flatten() {
        println!(
            "\n{}: {} (exact outstanding at exit: {})",
            p["program"].as_str().unwrap_or(""),
            p["what"].as_str().unwrap_or(""),
            p["exact_outstanding_bytes"]
        );
        println!("{:<48} {:>10} {:>10} {:>28}", "mode", "wall s", "added s", "error % per run");
        for r in p["rows"].as_array().into_iter().flatten() {
            if let Some(why) = r["failed"].as_str() {
                println!("{:<48} failed: {why}", r["mode"].as_str().unwrap_or(""));
                continue;
            }
            let errors: Vec<String> = r["error_pct"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_f64)
                .map(|e| format!("{e:+.1}"))
                .collect();
            println!(
                "{:<48} {:>10.3} {:>10.3} {:>28}",
                r["mode"].as_str().unwrap_or(""),
                r["wall_s"]["median"].as_f64().unwrap_or(f64::NAN),
                r["added_s"].as_f64().unwrap_or(f64::NAN),
                if errors.is_empty() { "-".to_string() } else { errors.join(" ") }
            );
        }
    }
}
