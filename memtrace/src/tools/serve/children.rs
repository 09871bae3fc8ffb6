//! The tracers serve runs as children: one `memtrace oomkill --json` for the whole machine,
//! and one `memtrace memleak -p PID --json --pprof FILE` per chosen process. Their JSON lines
//! become metrics; each memleak's profile file, replaced at every report and kept after its
//! process is gone, is what `/debug/pprof/heap?pid=N` serves.
//!
//! A child is started only for what the command line or the selection file names: no
//! request reaches this module except to read.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    io::Read as _,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    process::{Child, Command},
    sync::mpsc,
};

use super::metrics::Snapshot;

/// Heaps of processes that are gone, kept for `/debug/pprof/heap` (the oldest goes first).
const KEPT_GONE: usize = 32;
/// Processes traced at once (each has a memleak of its own): a name that matches more is
/// traced for the first this many, and the rest are said in the log.
const MAX_TRACED: usize = 64;
/// How long start-up waits for a child to attach its probes.
const READY_WAIT: Duration = Duration::from_secs(30);

/// What to trace: pids, and names looked for among running processes.
#[derive(Default, Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub pids: BTreeSet<u32>,
    pub comms: BTreeSet<String>,
}

impl Selection {
    /// A selection file: `pid N` or `comm NAME` per line; `#` comments and blank lines.
    pub fn read(path: &Path) -> Result<Selection> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("--selection {}: cannot read it", path.display()))?;
        Selection::parse(&text).map_err(|e| anyhow::anyhow!("--selection {}: {e}", path.display()))
    }

    fn parse(text: &str) -> Result<Selection> {
        let mut sel = Selection::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            match line.split_once(char::is_whitespace).map(|(k, v)| (k, v.trim())) {
                Some(("pid", v)) => {
                    let pid = v.parse().ok().filter(|&p| p > 0);
                    sel.pids.insert(pid.with_context(|| format!("line {}: `pid {v}` is not a pid", n + 1))?);
                }
                Some(("comm", v)) => {
                    check_comm(v).with_context(|| format!("line {}", n + 1))?;
                    sel.comms.insert(v.to_string());
                }
                _ => bail!("line {}: `{line}`: write `pid N` or `comm NAME`", n + 1),
            }
        }
        Ok(sel)
    }
}

/// A process name as the kernel keeps it: 1 to 15 bytes.
pub fn check_comm(comm: &str) -> Result<()> {
    if comm.is_empty() || comm.len() > 15 {
        bail!("process name `{comm}`: the kernel keeps 1 to 15 bytes of a name (see /proc/PID/comm)");
    }
    Ok(())
}

/// serve's private directory for the profiles: $RUNTIME_DIRECTORY under systemd, else one
/// of its own under /run (or the temporary directory); removed when serve ends.
pub struct StateDir(PathBuf);

impl StateDir {
    pub fn create() -> Result<StateDir> {
        use std::os::unix::fs::DirBuilderExt as _;
        // /run where the system has one (a minimal image may not): the temporary directory else.
        let run = Some(PathBuf::from("/run")).filter(|r| r.is_dir()).unwrap_or_else(std::env::temp_dir);
        let base = std::env::var_os("RUNTIME_DIRECTORY").map(PathBuf::from).unwrap_or(run);
        let dir = base.join(format!("memtrace-serve.{}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot make {} for the heap profiles", dir.display()))?;
        Ok(StateDir(dir))
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a child said, for the main loop.
pub enum News {
    Heap(u32, String),
    HeapEnded(u32),
    Oom(String),
    OomEnded,
}

/// One traced process's heap, as its memleak last reported it.
#[derive(Default)]
struct Heap {
    comm: String,
    /// Its memleak, while it runs.
    child: Option<u32>,
    gone: bool,
    /// memleak ended before any report: why is in serve's log.
    failed: bool,
    oom_killed: bool,
    total_bytes: u64,
    growing_stacks: u64,
    blind_spots: BTreeMap<String, u64>,
    events_lost: u64,
}

pub struct Children {
    dir: StateDir,
    interval: Duration,
    selection: Selection,
    exe: PathBuf,
    tx: mpsc::UnboundedSender<News>,
    heaps: BTreeMap<u32, Heap>,
    gone_order: VecDeque<u32>,
    /// Pids past MAX_TRACED, said once each.
    refused: BTreeSet<u32>,
    /// OOM kills by (memory cgroup, victim comm).
    kills: BTreeMap<(String, String), u64>,
    oomkill: Option<u32>,
    oomkill_restarts: u64,
    oomkill_events_lost: u64,
    /// Children still to be waited for when serve ends.
    running: Vec<Child>,
}

impl Children {
    pub fn new(
        dir: StateDir,
        interval: Duration,
        selection: Selection,
        tx: mpsc::UnboundedSender<News>,
    ) -> Result<Children> {
        let exe = std::env::current_exe().context("cannot find memtrace's own executable to run its tracers")?;
        Ok(Children {
            dir,
            interval,
            selection,
            exe,
            tx,
            heaps: BTreeMap::new(),
            gone_order: VecDeque::new(),
            refused: BTreeSet::new(),
            kills: BTreeMap::new(),
            oomkill: None,
            oomkill_restarts: 0,
            oomkill_events_lost: 0,
            running: Vec::new(),
        })
    }

    fn profile_path(&self, pid: u32) -> PathBuf {
        self.dir.0.join(format!("heap.{pid}.pb.gz"))
    }

    /// A forgotten process's profiles: its last report's and the one at its OOM kill.
    fn remove_profiles(&self, pid: u32) {
        let path = self.profile_path(pid);
        let _ = std::fs::remove_file(crate::tools::memleak::oom::oom_path(&path, pid));
        let _ = std::fs::remove_file(path);
    }

    /// Starts `memtrace ARGS` with its stdout read line by line into `news`; returns the
    /// child's pid and the read end of its `--ready-fd` pipe.
    fn spawn(&mut self, args: &[String], news: impl Fn(String) -> News + 'static, end: News) -> Result<(u32, OwnedFd)> {
        let (read, write) = pipe()?;
        let w = write.as_raw_fd();
        let mut cmd = Command::new(&self.exe);
        cmd.arg("--ready-fd").arg("3").args(args).stdin(Stdio::null()).stdout(Stdio::piped()).kill_on_drop(true);
        // SAFETY: dup2, fcntl and prctl are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                // A child outlives no serve, however serve ends.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                let r = if w == 3 { libc::fcntl(w, libc::F_SETFD, 0) } else { libc::dup2(w, 3) };
                if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
            });
        }
        let mut child = cmd.spawn().with_context(|| format!("cannot run {}", self.exe.display()))?;
        drop(write);
        let pid = child.id().unwrap_or_default();
        let stdout = child.stdout.take().context("internal: child without stdout")?;
        let tx = self.tx.clone();
        tokio::task::spawn_local(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = tx.send(news(line));
            }
            let _ = tx.send(end);
        });
        self.running.push(child);
        Ok((pid, read))
    }

    /// Starts the OOM-kill tracer; the returned pipe says when it is live (`wait_ready`).
    pub fn start_oomkill(&mut self) -> Result<OwnedFd> {
        let args = ["oomkill".to_string(), "--json".to_string()];
        let (pid, ready) = self.spawn(&args, News::Oom, News::OomEnded)?;
        self.oomkill = Some(pid);
        Ok(ready)
    }

    /// Starts memleak for every selected process not yet traced, stops it for those no longer
    /// selected, and starts oomkill again if it ended. Returns the new children's readiness
    /// pipes (`wait_ready`), so that no borrow of the state is held while waiting.
    pub fn reconcile(&mut self) -> Vec<OwnedFd> {
        self.reap();
        let mut wanted: BTreeSet<u32> = self.selection.pids.iter().copied().filter(|&p| alive(p)).collect();
        if !self.selection.comms.is_empty() {
            wanted.extend(processes_named(&self.selection.comms));
        }
        let own: BTreeSet<u32> = self.running.iter().filter_map(Child::id).chain([std::process::id()]).collect();
        let mut readies = Vec::new();
        for pid in wanted.difference(&own) {
            // Known already: traced, gone, or one memleak could not trace (not tried again
            // every interval; a pid reused that soon is rare).
            if self.heaps.contains_key(pid) {
                continue;
            }
            if self.heaps.values().filter(|h| !h.gone).count() >= MAX_TRACED {
                if self.refused.insert(*pid) {
                    eprintln!("memtrace: serve: pid {pid} not traced: {MAX_TRACED} processes are traced already");
                }
                continue;
            }
            match self.start_memleak(*pid) {
                Ok(ready) => readies.push(ready),
                Err(e) => eprintln!("memtrace: serve: pid {pid}: {e:#}"),
            }
        }
        // Processes no longer selected: their memleak stops, their heap is forgotten.
        let dropped: Vec<u32> = self
            .heaps
            .iter()
            .filter(|(pid, h)| !h.gone && !self.selection.pids.contains(pid) && !self.selection.comms.contains(&h.comm))
            .map(|(&pid, _)| pid)
            .collect();
        for pid in dropped {
            if let Some(child) = self.heaps.remove(&pid).and_then(|h| h.child) {
                terminate(child);
            }
            self.remove_profiles(pid);
        }
        if self.oomkill.is_none() {
            // It ended on its own: counting kills matters more than a quiet log.
            self.oomkill_restarts += 1;
            match self.start_oomkill() {
                Ok(ready) => readies.push(ready),
                Err(e) => eprintln!("memtrace: serve: {e:#}"),
            }
        }
        readies
    }

    fn start_memleak(&mut self, pid: u32) -> Result<OwnedFd> {
        let path = self.profile_path(pid);
        let args: Vec<String> = [
            "memleak",
            "-p",
            &pid.to_string(),
            "--json",
            "-T",
            "1",
            "--pprof",
            path.to_str().context("internal: non-UTF-8 state directory")?,
            &self.interval.as_secs().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let comm = crate::target::comm(pid);
        let (child, ready) = self.spawn(&args, move |line| News::Heap(pid, line), News::HeapEnded(pid))?;
        self.gone_order.retain(|&p| p != pid);
        self.heaps.insert(pid, Heap { comm, child: Some(child), ..Heap::default() });
        Ok(ready)
    }

    pub fn select(&mut self, selection: Selection) {
        self.selection = selection;
    }

    /// A line from a child.
    pub fn on_news(&mut self, news: News) {
        match news {
            News::Oom(line) => self.on_oom_line(&line),
            News::OomEnded => {
                self.oomkill = None;
                eprintln!("memtrace: serve: memtrace oomkill ended: starting it again at the next look");
            }
            News::Heap(pid, line) => {
                let Some(heap) = self.heaps.get_mut(&pid) else { return };
                let Ok(v) = serde_json::from_str::<Value>(&line) else { return };
                let num = |k: &str| v.get(k).and_then(Value::as_u64);
                if let Some(total) = num("total_bytes") {
                    heap.total_bytes = total;
                    heap.growing_stacks = num("growing_stacks").unwrap_or_default();
                    heap.oom_killed |= v.get("oom_killed").and_then(Value::as_bool).unwrap_or(false);
                    if let Some(spots) = v.get("blind_spots").and_then(Value::as_object) {
                        // Counts of what memleak missed; a capacity is a size, not a miss.
                        heap.blind_spots = spots
                            .iter()
                            .filter(|(k, _)| !k.ends_with("_capacity"))
                            .filter_map(|(k, v)| v.as_u64().map(|n| (k.clone(), n)))
                            .collect();
                    }
                }
                if let Some(lost) = num("events_lost") {
                    heap.events_lost = lost;
                }
            }
            News::HeapEnded(pid) => self.heap_ended(pid),
        }
    }

    fn heap_ended(&mut self, pid: u32) {
        let has_profile = self.profile_path(pid).exists();
        let Some(heap) = self.heaps.get_mut(&pid) else { return };
        heap.child = None;
        heap.gone = true;
        heap.failed = !has_profile;
        self.gone_order.push_back(pid);
        while self.gone_order.len() > KEPT_GONE {
            if let Some(old) = self.gone_order.pop_front() {
                self.heaps.remove(&old);
                self.remove_profiles(old);
            }
        }
    }

    fn on_oom_line(&mut self, line: &str) {
        let Ok(v) = serde_json::from_str::<Value>(line) else { return };
        let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        if v.get("victim_pid").is_some() {
            // The group whose limit was hit; for a global OOM, the victim's own group.
            let memcg = text("memcg").or_else(|| text("victim_memcg")).unwrap_or_else(|| "/".into());
            let comm = text("victim_comm").unwrap_or_default();
            *self.kills.entry((memcg, comm)).or_default() += 1;
        } else if let Some(lost) = v.get("events_lost").and_then(Value::as_u64) {
            self.oomkill_events_lost += lost;
        }
    }

    /// The gzipped profile of `pid`, or the HTTP status and why not.
    pub fn profile(&self, pid: u32) -> Result<Vec<u8>, (u16, String)> {
        let Some(heap) = self.heaps.get(&pid) else {
            return Err((
                403,
                format!(
                    "pid {pid} is not traced by this agent: it serves the processes chosen by --memleak-pid, --memleak-comm and --selection"
                ),
            ));
        };
        // The heap memleak read at the OOM kill, where there was one; else its last report's.
        let at_kill = crate::tools::memleak::oom::oom_path(&self.profile_path(pid), pid);
        let read = if heap.oom_killed {
            std::fs::read(at_kill).or_else(|_| std::fs::read(self.profile_path(pid)))
        } else {
            std::fs::read(self.profile_path(pid))
        };
        match read {
            Ok(bytes) => Ok(bytes),
            Err(_) if heap.failed => Err((503, format!("memleak could not trace pid {pid}: see the agent's log"))),
            Err(_) => Err((
                503,
                format!(
                    "no heap report for pid {pid} yet: the first comes {} s after it is traced",
                    self.interval.as_secs()
                ),
            )),
        }
    }

    /// The children's numbers, into a scrape.
    pub fn add_to(&self, snap: &mut Snapshot) {
        for ((memcg, comm), n) in &self.kills {
            snap.oom_kill(memcg, comm, *n);
        }
        for (pid, h) in &self.heaps {
            if h.gone && !h.oom_killed && h.failed {
                continue;
            }
            snap.heap(*pid, &h.comm, h.total_bytes, h.growing_stacks, !h.gone, h.oom_killed);
            for (kind, n) in &h.blind_spots {
                snap.heap_blind_spot(*pid, &h.comm, kind, *n);
            }
            snap.events_lost(&format!("memleak pid {pid}"), h.events_lost);
        }
        snap.events_lost("oomkill", self.oomkill_events_lost);
        snap.restarts("oomkill", self.oomkill_restarts);
    }

    /// The children still running, for `stop_all` (taken out so that no borrow of the state
    /// is held while they are waited for).
    pub fn take_running(&mut self) -> Vec<Child> {
        std::mem::take(&mut self.running)
    }

    /// Forgets children that have ended (their exit was already news).
    fn reap(&mut self) {
        self.running.retain_mut(|c| matches!(c.try_wait(), Ok(None)));
    }
}

/// Every child asked to stop (SIGTERM: each detaches and ends), then waited for.
pub async fn stop_all(mut running: Vec<Child>) {
    for child in &running {
        if let Some(pid) = child.id() {
            terminate(pid);
        }
    }
    for child in &mut running {
        if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
            let _ = child.kill().await;
        }
    }
}

fn terminate(pid: u32) {
    // SAFETY: a signal to our own child, which is waited for later.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Processes whose /proc/PID/comm is one of `comms`.
fn processes_named(comms: &BTreeSet<String>) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| comms.contains(c.trim_end())))
        .collect()
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors, owned from here on.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: just created, owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Waits for a child's `--ready-fd` line; an end without it means the child failed.
pub async fn wait_ready(read: OwnedFd) -> Result<()> {
    let read = tokio::task::spawn_blocking(move || {
        let mut text = String::new();
        let _ = std::fs::File::from(read).read_to_string(&mut text);
        text
    });
    let text = tokio::time::timeout(READY_WAIT, read).await.context("timed out")?.context("internal: reader")?;
    if !text.contains("\"ready\":true") {
        bail!("it ended before its probes were attached");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_files() {
        let sel = Selection::parse("# traced\npid 12\ncomm redis-server  # the cache\n\n").unwrap();
        assert_eq!(sel.pids, [12].into());
        assert_eq!(sel.comms, ["redis-server".to_string()].into());
        let e = Selection::parse("pid x").unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("not a pid"), "{e}");
        let e = Selection::parse("pid 1\nprocess 2").unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("pid N"), "{e}");
        assert!(Selection::parse("comm abcdefghijklmnop").is_err());
    }
}
