//! `memtrace serve`'s own cost: its CPU time and resident memory (with its oomkill child)
//! over a window on an idle machine and under a page-fault load (stress-ng --vm), scraped
//! every 5 s as Prometheus would; and what its kernel side costs the load itself (stress-ng's
//! bogo-ops/s with and without serve running).

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::median;

const PORT: u16 = 19464;

pub fn run(window: Duration, runs: usize, memtrace: &std::path::Path) -> Result<Value> {
    let mut serve = Serve::start(memtrace)?;
    let idle = serve.measure(window, None)?;
    let mut loaded = Vec::new();
    let mut ops_with = Vec::new();
    for _ in 0..runs {
        let mut load = stress(window)?;
        let m = serve.measure(window, Some(&mut load))?;
        ops_with.push(ops_per_s(load)?);
        loaded.push(m);
    }
    serve.stop()?;
    let mut ops_without = Vec::new();
    for _ in 0..runs {
        ops_without.push(ops_per_s(stress(window)?)?);
    }
    let (with, without) = (median(&ops_with), median(&ops_without));
    Ok(json!({
        "window_s": window.as_secs(),
        "idle": idle,
        "under_load": loaded.last().cloned().unwrap_or(Value::Null),
        "load": "stress-ng --vm 1 --vm-bytes 256M (page faults on every touch)",
        "load_ops_per_s_without_serve": without,
        "load_ops_per_s_with_serve": with,
        "load_slowdown": if with > 0.0 { without / with } else { f64::NAN },
    }))
}

struct Serve {
    child: Child,
}

impl Serve {
    fn start(memtrace: &std::path::Path) -> Result<Serve> {
        let child = Command::new(memtrace)
            .args(["serve", "--listen", &format!("127.0.0.1:{PORT}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start memtrace serve")?;
        let serve = Serve { child };
        let deadline = Instant::now() + Duration::from_secs(60);
        while scrape().is_err() {
            if Instant::now() > deadline {
                bail!("memtrace serve did not answer on 127.0.0.1:{PORT} within 60 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(serve)
    }

    /// CPU seconds used and the resident memory at the end, of serve and its children, over
    /// `window`, scraped every 5 s.
    fn measure(&mut self, window: Duration, load: Option<&mut Child>) -> Result<Value> {
        let pids = family(self.child.id());
        let cpu0: f64 = pids.iter().map(|&p| cpu_s(p)).sum();
        let t0 = Instant::now();
        let mut scrapes = Vec::new();
        while t0.elapsed() < window {
            let s = Instant::now();
            let bytes = scrape()?;
            scrapes.push((s.elapsed().as_secs_f64() * 1e3, bytes));
            std::thread::sleep(Duration::from_secs(5).min(window.saturating_sub(t0.elapsed())));
        }
        if let Some(load) = load {
            load.wait()?;
        }
        let pids = family(self.child.id());
        let cpu: f64 = pids.iter().map(|&p| cpu_s(p)).sum::<f64>() - cpu0;
        let rss_kib: u64 = pids.iter().map(|&p| rss_kib(p)).sum();
        let ms: Vec<f64> = scrapes.iter().map(|s| s.0).collect();
        Ok(json!({
            "cpu_s": cpu,
            "cpu_percent_of_a_core": 100.0 * cpu / t0.elapsed().as_secs_f64(),
            "rss_mib": rss_kib as f64 / 1024.0,
            "processes": pids.len(),
            "scrape_ms_median": median(&ms),
            "scrape_bytes": scrapes.last().map(|s| s.1).unwrap_or(0),
        }))
    }

    fn stop(mut self) -> Result<()> {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait()?;
        if !status.success() {
            bail!("memtrace serve ended with {status} after SIGTERM");
        }
        Ok(())
    }
}

fn stress(window: Duration) -> Result<Child> {
    Command::new("stress-ng")
        .args(["--vm", "1", "--vm-bytes", "256M", "--metrics-brief", "--timeout"])
        .arg(format!("{}s", window.as_secs()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run stress-ng (cargo xtask setup installs it)")
}

/// stress-ng's `vm` bogo-ops per second of real time, from --metrics-brief.
fn ops_per_s(child: Child) -> Result<f64> {
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter_map(|l| l.split_once("] vm "))
        .find_map(|(_, rest)| rest.split_whitespace().nth(4)?.parse().ok())
        .with_context(|| format!("no vm metrics in stress-ng's output: {text}"))
}

/// A process and its descendants.
fn family(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let p = all[i];
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                let kids = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
                all.extend(kids.split_whitespace().filter_map(|k| k.parse::<u32>().ok()));
            }
        }
        i += 1;
    }
    all
}

fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    // utime and stime: fields 14 and 15, the 12th and 13th after the name.
    let ticks: f64 = [11, 12].iter().filter_map(|&i| fields.get(i)?.parse::<f64>().ok()).sum();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")?.split_whitespace().next()?.parse().ok()).unwrap_or(0)
}

/// GET /metrics; its size in bytes.
fn scrape() -> Result<usize> {
    let mut s = TcpStream::connect(("127.0.0.1", PORT))?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut body = Vec::new();
    s.read_to_end(&mut body)?;
    if !body.starts_with(b"HTTP/1.0 200") && !body.starts_with(b"HTTP/1.1 200") {
        bail!("scrape: {}", String::from_utf8_lossy(&body[..body.len().min(80)]));
    }
    Ok(body.len())
}

pub fn print(s: &Value) {
    println!("\nmemtrace serve's own cost over {} s windows, scraped every 5 s", s["window_s"]);
    println!(
        "{:<12} {:>10} {:>14} {:>10} {:>12} {:>12}",
        "", "CPU s", "% of a core", "RSS MiB", "scrape ms", "scrape KiB"
    );
    for (name, m) in [("idle", &s["idle"]), ("under load", &s["under_load"])] {
        let f = |k: &str| m[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{name:<12} {:>10.2} {:>14.2} {:>10.1} {:>12.1} {:>12.1}",
            f("cpu_s"),
            f("cpu_percent_of_a_core"),
            f("rss_mib"),
            f("scrape_ms_median"),
            f("scrape_bytes") / 1024.0
        );
    }
    println!(
        "load ({}): {:.0} bogo-ops/s without serve, {:.0} with: {:.3}x slower",
        s["load"].as_str().unwrap_or(""),
        s["load_ops_per_s_without_serve"].as_f64().unwrap_or(f64::NAN),
        s["load_ops_per_s_with_serve"].as_f64().unwrap_or(f64::NAN),
        s["load_slowdown"].as_f64().unwrap_or(f64::NAN)
    );
}
