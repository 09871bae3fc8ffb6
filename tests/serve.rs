//! `memtrace serve` with the real tools: a real Prometheus server scrapes it while a memory
//! cgroup's hog is OOM-killed, and its API then reads exactly one kill for that group and
//! memcg reclaim in the group's latency histogram; `go tool pprof` fetches a traced process's
//! heap over HTTP and finds each leak with its exact bytes; bad input; clean detach.

#[path = "common/mod.rs"]
mod common;
#[path = "common/gopprof.rs"]
mod gopprof;
#[path = "common/http.rs"]
mod http;
#[path = "common/memcg.rs"]
mod memcg;

use std::{
    io::Write as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use memcg::Memcg;
use serde_json::Value;

/// Every tool serve loads, or runs as a child: none may be left attached.
fn assert_all_detached() {
    for tool in ["serve", "memleak", "oomkill"] {
        assert_detached(tool);
    }
}

/// `memtrace serve ARGS` on a free loopback port, live; its address.
fn start_serve(args: &[&str]) -> (Running, String) {
    let addr = format!("127.0.0.1:{}", http::free_port());
    let mut all = vec!["serve", "--listen", &addr];
    all.extend_from_slice(args);
    let mut mt = Running::start(&all);
    mt.wait_ready();
    (mt, addr)
}

/// Ends serve with SIGTERM: it exits 0 and leaves nothing attached.
fn stop_serve(mt: Running) -> String {
    mt.signal(libc::SIGTERM);
    let (status, _, stderr) = mt.finish(Duration::from_secs(30));
    assert!(status.success(), "{status}: {stderr}");
    assert_all_detached();
    stderr
}

/// Polls until `check` gives a value, at most `limit`.
fn poll<T>(limit: Duration, what: &str, check: impl FnMut() -> Option<T>) -> T {
    poll_within(limit, check).unwrap_or_else(|| panic!("{what}: not within {limit:?}"))
}

/// `poll` for something serve must do: a failure shows what serve (and its children) said.
fn poll_serve<T>(mt: &mut Running, limit: Duration, what: &str, check: impl FnMut() -> Option<T>) -> T {
    poll_within(limit, check)
        .unwrap_or_else(|| panic!("{what}: not within {limit:?}; serve said:\n{}", mt.stderr_so_far()))
}

fn poll_within<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The value of the series `name{labels}` in a Prometheus text scrape.
fn series(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn serve_heap_profile_over_http_reads_back_in_go_pprof_exactly() {
    const TEST: &str = "serve_heap_profile_over_http_reads_back_in_go_pprof_exactly";
    if !bpf_available(TEST) || !gopprof::pprof_tool(TEST) {
        return;
    }
    let Ready { mut child, mut stdin, mut lines } = Ready::start(Command::new(prog("leaky")).arg("wait"));
    let pid = child.id();
    let (mut mt, addr) = start_serve(&["--memleak-pid", &pid.to_string(), "--interval", "1"]);
    writeln!(stdin).unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "leaked");
    let leaked: u64 = LEAKY_C.iter().map(|l| l.1).sum();
    // The metrics say when a report has seen every leak.
    let heap = format!("memtrace_heap_outstanding_bytes{{pid=\"{pid}\",comm=\"leaky\"}}");
    poll_serve(&mut mt, Duration::from_secs(30), "the heap's report", || {
        series(&http::get_text(&addr, "/metrics")?, &heap).filter(|&b| b >= leaked as f64)
    });

    // go tool pprof fetches the profile itself, as it does from a Go program's endpoint.
    let url = format!("http://{addr}/debug/pprof/heap?pid={pid}");
    let space = gopprof::go_pprof(&["-top", "-lines", "-nodecount=1000", "-sample_index=inuse_space", "-unit=B"], &url);
    let rows = gopprof::top_rows(&space);
    for &(func, bytes, _) in LEAKY_C {
        assert_eq!(gopprof::row_of(&rows, func, "leaky.c").flat, format!("{bytes}B"), "{func}: {space}");
    }
    assert!(!rows.iter().any(|r| r.func == "no_leak"), "freed memory in the profile: {space}");

    // Only the chosen processes: any other pid is refused, whoever asks.
    let (status, body) = http::get(&addr, "/debug/pprof/heap?pid=1").unwrap();
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("pid 1 is not traced by this agent"));
    assert_eq!(http::get(&addr, "/debug/pprof/heap").unwrap().0, 400);
    assert_eq!(http::get(&addr, "/nothing").unwrap().0, 404);

    // After the process is gone its last heap is still served, and the metrics say it is gone.
    drop(stdin);
    assert!(child.wait().unwrap().success());
    let traced = format!("memtrace_heap_traced{{pid=\"{pid}\",comm=\"leaky\"}}");
    poll_serve(&mut mt, Duration::from_secs(30), "the heap marked gone", || {
        (series(&http::get_text(&addr, "/metrics")?, &traced)? == 0.0).then_some(())
    });
    let again =
        gopprof::top_rows(&gopprof::go_pprof(&["-top", "-lines", "-sample_index=inuse_space", "-unit=B"], &url));
    assert!(again.iter().any(|r| r.func == "leak_pvalloc" && r.flat == "6000B"), "{again:#?}");
    stop_serve(mt);
}

/// Debian's prometheus, scraping `target` every second, with its API on a free port.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    api: String,
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        let dir = tempdir("prometheus");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: memtrace\n    static_configs:\n      - targets: ['{target}']\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let api = format!("127.0.0.1:{}", http::free_port());
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={api}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus runs (Debian's prometheus; cargo xtask setup installs it)");
        let prom = Prometheus { child, dir, api };
        poll(Duration::from_secs(60), "prometheus ready", || {
            (http::get(&prom.api, "/-/ready")?.0 == 200).then_some(())
        });
        prom
    }

    /// The instant query's single value; None while it has none.
    fn value(&self, query: &str) -> Option<f64> {
        let body = http::get_text(&self.api, &format!("/api/v1/query?query={}", http::encode(query)))?;
        let v: Value = serde_json::from_str(&body).ok()?;
        let result = v["data"]["result"].as_array()?;
        assert!(result.len() <= 1, "{query}: {body}");
        result.first()?["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn prometheus_scrapes_the_oom_kill_and_reclaim_of_a_memcg() {
    const TEST: &str = "prometheus_scrapes_the_oom_kill_and_reclaim_of_a_memcg";
    if !bpf_available(TEST) {
        return;
    }
    if Command::new("prometheus").arg("--version").output().is_err() {
        // The VM suite's image has no Prometheus; the host has it from setup (and fails here without it).
        assert!(
            std::env::var_os("MEMTRACE_VM").is_some(),
            "{TEST}: prometheus is not installed (cargo xtask setup installs it)"
        );
        not_run(TEST, "prometheus is not in the VM's image (the host runs this test)");
        return;
    }
    let Some(group) = Memcg::new("serve", 32) else { return };
    let (mt, addr) = start_serve(&[]);
    let prom = Prometheus::start(&addr);
    poll(Duration::from_secs(30), "the first scrape", || (prom.value("up{job=\"memtrace\"}")? == 1.0).then_some(()));

    let mut hog = group.spawn(&prog("oomkill_hog"), &["512"]);
    hog.go_until_oom_killed(Duration::from_secs(60));
    assert_eq!(group.oom_kills(), 1);

    let kills = format!("memtrace_oom_kills_total{{memcg=\"{}\",comm=\"oomkill_hog\"}}", group.path);
    let n = poll(Duration::from_secs(60), "prometheus reading the kill", || prom.value(&kills).filter(|&n| n >= 1.0));
    assert_eq!(n, 1.0, "{kills}");
    // The hog stalled in reclaim at its group's limit before it was killed.
    let reclaims =
        format!("sum(memtrace_reclaim_latency_seconds_bucket{{memcg=\"{}\",kind=\"memcg\",le=\"+Inf\"}})", group.path);
    let n = poll(Duration::from_secs(30), "reclaim in prometheus", || prom.value(&reclaims).filter(|&n| n > 0.0));
    let below_inf = format!(
        "sum(memtrace_reclaim_latency_seconds_bucket{{memcg=\"{}\",kind=\"memcg\",le=\"16.777216\"}})",
        group.path
    );
    assert_eq!(prom.value(&below_inf), Some(n), "every memcg reclaim took under 16 s");
    let faults = format!("memtrace_page_faults_total{{memcg=\"{}\",mode=\"user\"}}", group.path);
    assert!(prom.value(&faults).unwrap_or_default() > 0.0, "{faults}");
    drop(prom);
    stop_serve(mt);
}

#[test]
fn serve_bad_input_gets_one_line_errors_and_leaves_nothing_attached() {
    if !bpf_available("serve_bad_input_gets_one_line_errors_and_leaves_nothing_attached") {
        return;
    }
    assert_exact_error(
        &["serve", "--listen", "localhost"],
        "--listen localhost: not an address: give IP:PORT, e.g. 127.0.0.1:9464",
    );
    assert_exact_error(
        &["serve", "--listen", "256.0.0.1:80"],
        "--listen 256.0.0.1:80: not an address: give IP:PORT, e.g. 127.0.0.1:9464",
    );
    // An address in use: found before anything is attached.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    // The C library names the error: glibc's words on the host, musl's in the VM's static build.
    let in_use = |words: &str| {
        format!(
            "--listen {addr}: cannot listen there: {words} (os error 98) (another memtrace serve or exporter? choose another port)"
        )
    };
    let (glibc, musl) = (in_use("Address already in use"), in_use("Address in use"));
    assert_exact_error_of(&["serve", "--listen", &addr], &[glibc.as_str(), musl.as_str()]);
    assert_one_line_error(&["serve", "--memleak-comm", "a-name-longer-than-15"], "the kernel keeps 1 to 15 bytes");
    assert_one_line_error(&["serve", "--memleak-pid", "999999999"], "999999999");
    let sel = tempdir("serve-selection").join("sel");
    std::fs::write(&sel, "pid 1\nprocess 2\n").unwrap();
    assert_one_line_error(&["serve", "--selection", sel.to_str().unwrap()], "line 2");
    assert_all_detached();
}

/// Whether `/metrics` at `addr` shows the process `pid` traced (1), gone (0) or not at all.
fn traced(addr: &str, pid: u32, comm: &str) -> Option<f64> {
    series(&http::get_text(addr, "/metrics")?, &format!("memtrace_heap_traced{{pid=\"{pid}\",comm=\"{comm}\"}}"))
}

#[test]
fn serve_follows_a_name_through_restarts_and_sighup_reloads_the_selection() {
    if !bpf_available("serve_follows_a_name_through_restarts_and_sighup_reloads_the_selection") {
        return;
    }
    let sel = tempdir("serve-selection").join("selection");
    std::fs::write(&sel, "# nothing yet\n").unwrap();
    let first = Ready::start(Command::new(prog("leaky")).arg("wait"));
    let (mut mt, addr) =
        start_serve(&["--memleak-comm", "leaky", "--selection", sel.to_str().unwrap(), "--interval", "1"]);
    let a = first.child.id();
    // Start-up waits for the heaps it was given: traced from the first scrape.
    assert_eq!(traced(&addr, a, "leaky"), Some(1.0), "serve said:\n{}", mt.stderr_so_far());
    let Ready { mut child, mut stdin, mut lines } = first;
    writeln!(stdin).unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "leaked");
    drop(stdin);
    assert!(child.wait().unwrap().success());
    poll_serve(&mut mt, Duration::from_secs(30), "the first leaky gone", || {
        (traced(&addr, a, "leaky")? == 0.0).then_some(())
    });
    // The same program started again is a new process with the same name: traced too.
    let mut second = Ready::start(Command::new(prog("leaky")).arg("wait"));
    let b = second.child.id();
    poll_serve(&mut mt, Duration::from_secs(30), "the restarted leaky traced", || {
        (traced(&addr, b, "leaky")? == 1.0).then_some(())
    });

    // A process only the selection file names: traced after SIGHUP, not before.
    let mut sleeper = Command::new("sleep").arg("120").spawn().unwrap();
    let c = sleeper.id();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(traced(&addr, c, "sleep"), None, "traced before it was selected");
    std::fs::write(&sel, format!("pid {c}\n")).unwrap();
    mt.signal(libc::SIGHUP);
    poll_serve(&mut mt, Duration::from_secs(30), "sleep traced after SIGHUP", || {
        (traced(&addr, c, "sleep")? == 1.0).then_some(())
    });
    // Out of the selection again: no longer traced, and its heap is refused.
    std::fs::write(&sel, "").unwrap();
    mt.signal(libc::SIGHUP);
    poll_serve(&mut mt, Duration::from_secs(30), "sleep dropped after SIGHUP", || {
        traced(&addr, c, "sleep").is_none().then_some(())
    });
    assert_eq!(http::get(&addr, &format!("/debug/pprof/heap?pid={c}")).unwrap().0, 403);
    let stderr = stop_serve(mt);
    assert_eq!(stderr.matches("SIGHUP: selection reloaded").count(), 2, "{stderr}");
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    writeln!(second.stdin).unwrap();
    assert_eq!(second.lines.next().unwrap().unwrap(), "leaked");
    drop(second.stdin);
    assert!(second.child.wait().unwrap().success());
}

/// The command lines the repository ships (systemd unit, Kubernetes DaemonSet) start serve:
/// each runs as written, with only its selection file and port put somewhere a test may use.
#[test]
fn the_shipped_unit_and_daemonset_command_lines_start_serve() {
    if !bpf_available("the_shipped_unit_and_daemonset_command_lines_start_serve") {
        return;
    }
    let deploy = repo().join("deploy");
    if !deploy.exists() {
        // The VM suite's image carries the tests, not the repository's other files.
        assert!(std::env::var_os("MEMTRACE_VM").is_some(), "{} is missing", deploy.display());
        not_run("the_shipped_unit_and_daemonset_command_lines_start_serve", "deploy/ is not in the VM's image");
        return;
    }
    let unit = std::fs::read_to_string(deploy.join("memtrace-serve.service")).unwrap();
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("the unit has ExecStart");
    let unit_args: Vec<String> = exec.split_whitespace().skip(1).map(String::from).collect();
    assert_eq!(exec.split_whitespace().next(), Some("/usr/local/bin/memtrace"));
    let daemonset = std::fs::read_to_string(deploy.join("memtrace-daemonset.yaml")).unwrap();
    let line = daemonset.lines().find_map(|l| l.trim().strip_prefix("args: ")).expect("the DaemonSet has args");
    // The args are written as a JSON-compatible flow sequence.
    let ds_args: Vec<String> = serde_json::from_str(line).unwrap();
    let sel = tempdir("serve-deploy").join("selection");
    std::fs::write(&sel, "# none\n").unwrap();
    for (what, args, listen) in [("unit", unit_args, "127.0.0.1:9464"), ("DaemonSet", ds_args, "0.0.0.0:9464")] {
        let shown = args.join(" ");
        assert!(shown.contains(&format!("--listen {listen}")), "{what}: {shown}");
        let port = http::free_port();
        let args: Vec<String> = args
            .iter()
            .map(|a| match a.as_str() {
                "/etc/memtrace/selection" => sel.to_str().unwrap().to_string(),
                a if a.ends_with(":9464") => format!("127.0.0.1:{port}"),
                a => a.to_string(),
            })
            .collect();
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut mt = Running::start(&argv);
        mt.wait_ready();
        let text = http::get_text(&format!("127.0.0.1:{port}"), "/metrics").unwrap();
        assert!(text.contains("# TYPE memtrace_kswapd_wakeups counter"), "{what}: {text}");
        stop_serve(mt);
    }
}

/// A traced process killed by the OOM killer: serve counts the kill, marks the heap, and
/// keeps serving the heap memleak read at the kill, whose top is the function that grew.
#[test]
fn serve_keeps_the_heap_of_an_oom_killed_process() {
    const TEST: &str = "serve_keeps_the_heap_of_an_oom_killed_process";
    if !bpf_available(TEST) {
        return;
    }
    let Some(group) = Memcg::new("serve-oom", 64) else { return };
    group.no_swap();
    let mut hog = group.spawn(&prog_nofp("oom_grow"), &[]);
    let pid = hog.pid;
    let (mut mt, addr) = start_serve(&["--memleak-pid", &pid.to_string(), "--interval", "1"]);
    hog.go_until_oom_killed(Duration::from_secs(120));
    let killed = format!("memtrace_heap_oom_killed{{pid=\"{pid}\",comm=\"oom_grow\"}}");
    poll_serve(&mut mt, Duration::from_secs(30), "the heap marked as killed", || {
        (series(&http::get_text(&addr, "/metrics")?, &killed)? == 1.0).then_some(())
    });
    let kills = format!("memtrace_oom_kills_total{{memcg=\"{}\",comm=\"oom_grow\"}}", group.path);
    // oomkill's line and memleak's come through different children: either may be first.
    let n = poll_serve(&mut mt, Duration::from_secs(30), "the kill counted", || {
        series(&http::get_text(&addr, "/metrics")?, &kills)
    });
    assert_eq!(n, 1.0, "{kills}");
    if gopprof::has_go(TEST) {
        let url = format!("http://{addr}/debug/pprof/heap?pid={pid}");
        let top = gopprof::go_pprof(&["-top", "-sample_index=inuse_space", "-unit=B"], &url);
        let first = top.lines().skip_while(|l| !l.trim_start().starts_with("flat")).nth(1).unwrap_or_default();
        assert_eq!(first.split_whitespace().nth(5), Some("grow"), "{top}");
    }
    stop_serve(mt);
}
