//! memleak -c's start-up: from spawning memtrace to the command's first instruction, read as
//! the time `/bin/date +%s%N` prints less the time taken just before the spawn; and the whole
//! of `memleak -c /bin/true`. The command alone and under heaptrack give the scale.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::{median, stats, which};
use crate::cmd;

/// The bound on start-up.
const BOUND_MS: f64 = 100.0;

/// Each launcher's milliseconds to the first instruction and in all, or why it has none.
type Timings = Result<(Vec<f64>, Vec<f64>), String>;

#[derive(Clone, Copy)]
enum Launcher<'a> {
    Alone,
    /// `memtrace memleak ARGS -c CMD`.
    Memtrace(&'a Path, &'static [&'static str]),
    Heaptrack(&'a Path),
}

impl Launcher<'_> {
    fn key(self) -> &'static str {
        match self {
            Launcher::Alone => "alone",
            Launcher::Memtrace(_, []) => "memtrace_c",
            Launcher::Memtrace(..) => "memtrace_c_uprobes",
            Launcher::Heaptrack(_) => "heaptrack",
        }
    }

    fn label(self) -> String {
        match self {
            Launcher::Alone => "the command alone".into(),
            Launcher::Memtrace(_, args) => ["memtrace memleak"]
                .into_iter()
                .chain(args.iter().copied())
                .chain(["-c CMD"])
                .collect::<Vec<_>>()
                .join(" "),
            Launcher::Heaptrack(_) => "heaptrack -o FILE CMD".into(),
        }
    }

    fn command(self, argv: &[&str]) -> Result<Command> {
        let mut c = match self {
            Launcher::Alone => {
                let mut c = Command::new(argv[0]);
                c.args(&argv[1..]);
                c
            }
            Launcher::Memtrace(memtrace, args) => {
                let mut c = Command::new(memtrace);
                c.arg("memleak").args(args).args(["-c", &argv.join(" ")]);
                c
            }
            Launcher::Heaptrack(out) => {
                let mut c = Command::new(which("heaptrack").context("heaptrack is not installed")?);
                c.arg("-o").arg(out).args(argv);
                c
            }
        };
        c.stdin(Stdio::null()).stderr(Stdio::null());
        Ok(c)
    }
}

fn now_ns() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// Milliseconds from spawning the launcher to `date`'s reading of the clock.
fn to_first_instruction(l: Launcher) -> Result<f64> {
    let mut c = l.command(&["/bin/date", "+%s%N"])?;
    let t0 = now_ns();
    let out = c.output().context("cannot start it")?;
    if !out.status.success() {
        bail!("exited with {}", out.status);
    }
    let printed = date_ns(&String::from_utf8_lossy(&out.stdout)).context("no time printed by date")?;
    Ok(printed.saturating_sub(t0) as f64 / 1e6)
}

/// The line `date +%s%N` printed among the launcher's own output.
fn date_ns(stdout: &str) -> Option<u128> {
    stdout.lines().map(str::trim).find(|l| l.len() >= 18 && l.bytes().all(|b| b.is_ascii_digit()))?.parse().ok()
}

/// Milliseconds of the launcher running `/bin/true`, start to end.
fn true_wall(l: Launcher) -> Result<f64> {
    let mut c = l.command(&["/bin/true"])?;
    c.stdout(Stdio::null());
    let t0 = Instant::now();
    let status = c.status().context("cannot start it")?;
    if !status.success() {
        bail!("exited with {status}");
    }
    Ok(t0.elapsed().as_secs_f64() * 1e3)
}

pub fn run(runs: usize, memtrace: &Path) -> Result<Value> {
    let heaptrack_out: PathBuf = cmd::root().join("target/bench-programs/heaptrack.startup");
    std::fs::create_dir_all(heaptrack_out.parent().context("a folder")?)?;
    let mut launchers = vec![Launcher::Alone, Launcher::Memtrace(memtrace, &[])];
    if super::programs::has_uprobes(memtrace) {
        launchers.push(Launcher::Memtrace(memtrace, &["--uprobes"]));
    }
    launchers.push(Launcher::Heaptrack(&heaptrack_out));
    eprintln!("bench: start-up ({runs} runs of each)");
    // Interleaved runs, as for the programs; a launcher that fails once is not run again.
    let mut results: Vec<Timings> = launchers.iter().map(|_| Ok((vec![], vec![]))).collect();
    for _ in 0..runs {
        for (l, result) in launchers.iter().zip(&mut results) {
            if let Ok((first, total)) = result {
                match to_first_instruction(*l).and_then(|f| Ok((f, true_wall(*l)?))) {
                    Ok((f, t)) => {
                        first.push(f);
                        total.push(t);
                    }
                    Err(e) => *result = Err(format!("{e:#}")),
                }
            }
        }
    }
    let alone = match &results[0] {
        Ok((first, total)) => (median(first), median(total)),
        Err(_) => (f64::NAN, f64::NAN),
    };
    let rows: Vec<Value> = launchers
        .iter()
        .zip(&results)
        .map(|(l, r)| match r {
            Err(why) => json!({ "mode": l.label(), "key": l.key(), "failed": why }),
            Ok((first, total)) => json!({
                "mode": l.label(),
                "key": l.key(),
                "to_first_instruction_ms": stats(first),
                "added_to_first_instruction_ms": median(first) - alone.0,
                "true_wall_ms": stats(total),
                "true_added_ms": median(total) - alone.1,
            }),
        })
        .collect();
    let memtrace_c = match &results[1] {
        Ok((first, _)) => Some(median(first)),
        Err(_) => None,
    };
    Ok(json!({
        "command": "/bin/date +%s%N (to its first instruction), /bin/true (in all)",
        "modes": rows,
        "memtrace_c_to_first_instruction_ms": memtrace_c,
        "bound_ms": BOUND_MS,
        "memtrace_c_within_bound": memtrace_c.map(|ms| ms < BOUND_MS),
    }))
}

pub fn print(s: &Value) {
    println!(
        "\nstart-up: spawn to the command's first instruction (`date +%s%N`), and `-c /bin/true` in all; ms, medians [min-max]"
    );
    println!("{:<48} {:>22} {:>10} {:>22} {:>10}", "mode", "to first instr.", "added", "/bin/true in all", "added");
    let range = |v: &Value| {
        let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        format!("{:.1} [{:.1}-{:.1}]", f("median"), f("min"), f("max"))
    };
    for m in s["modes"].as_array().into_iter().flatten() {
        let mode = m["mode"].as_str().unwrap_or("");
        if let Some(why) = m["failed"].as_str() {
            println!("{mode:<48} failed: {why}");
            continue;
        }
        println!(
            "{mode:<48} {:>22} {:>10.1} {:>22} {:>10.1}",
            range(&m["to_first_instruction_ms"]),
            m["added_to_first_instruction_ms"].as_f64().unwrap_or(f64::NAN),
            range(&m["true_wall_ms"]),
            m["true_added_ms"].as_f64().unwrap_or(f64::NAN),
        );
    }
    if let Some(ms) = s["memtrace_c_to_first_instruction_ms"].as_f64() {
        let verdict = if ms < BOUND_MS { "within" } else { "over" };
        println!("memleak -c start-up {ms:.0} ms: {verdict} the {BOUND_MS:.0} ms bound");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates_line_is_found_among_the_launchers_output() {
        let out = "heaptrack output will be written to \"x.zst\"\n1765000000123456789\n{\"final\":true}\n";
        assert_eq!(super::date_ns(out), Some(1765000000123456789));
        assert_eq!(super::date_ns("12345\n"), None);
    }
}
