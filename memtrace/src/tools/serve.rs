//! serve: a long-running agent. `/metrics` (Prometheus/OpenMetrics text) carries OOM kills,
//! reclaim latency, page faults and swap-ins per memory cgroup, kswapd wake-ups, the heaps of
//! the processes chosen at start, and memtrace's own blind spots; `/debug/pprof/heap?pid=N`
//! serves those heaps as pprof profiles.
//!
//! The per-cgroup counters are this tool's own object, summed in the kernel and read at each
//! scrape. OOM kills and heaps come from `memtrace oomkill` and `memtrace memleak -p`, run as
//! children (`children`): the same answers as the tools give, and a tracer that ends with its
//! process does not end the agent.

mod children;
mod http;
mod metrics;

use std::{cell::RefCell, net::SocketAddr, path::PathBuf, rc::Rc, time::Duration};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, PerCpuArray, PerCpuHashMap};
use memtrace_common::serve::{CgroupStats, STAT_COUNT};

use crate::{
    kernel::{self, AttachPoint, Probe, cgroup::MemcgPaths},
    tools::registry::{Plan, ToolSpec},
    tools::tracer::Tracer,
};

const OBJECT: crate::kernel::Object = crate::ebpf_object!("serve");

pub const SPEC: ToolSpec = ToolSpec {
    names: memtrace_common::serve::names::ALL,
    name: "serve",
    object: OBJECT,
    modes: &[("serve", Plan::Points(ATTACH))],
    optional: &[SWAPIN],
};

const fn tp(prog: &'static str, category: &'static str, name: &'static [&'static str]) -> Probe {
    Probe::Tracepoint { prog, category, names: name }
}

/// What the per-cgroup counters need: all of it, or the agent does not start.
pub const ATTACH: &[AttachPoint] = &[AttachPoint {
    label: "tracepoints exceptions:page_fault_*, vmscan:mm_vmscan_*",
    probes: &[
        tp("serve_fault_user", "exceptions", &["page_fault_user"]),
        tp("serve_fault_kernel", "exceptions", &["page_fault_kernel"]),
        tp("serve_direct_begin", "vmscan", &["mm_vmscan_direct_reclaim_begin"]),
        tp("serve_direct_end", "vmscan", &["mm_vmscan_direct_reclaim_end"]),
        tp("serve_memcg_begin", "vmscan", &["mm_vmscan_memcg_reclaim_begin"]),
        tp("serve_memcg_end", "vmscan", &["mm_vmscan_memcg_reclaim_end"]),
        tp("serve_kswapd", "vmscan", &["mm_vmscan_wakeup_kswapd"]),
    ],
}];

/// Swap-ins have no tracepoint: a kprobe, where the kernel has kprobes (a blind spot otherwise).
const SWAPIN: Probe = Probe::Kprobe { prog: "serve_swapin", funcs: &["swap_read_folio", "swap_readpage"] };

/// Serve metrics and heap profiles over HTTP, as a long-running agent.
#[derive(clap::Args, Debug)]
#[command(after_help = "\
Endpoints: /metrics (Prometheus text), /debug/pprof/heap?pid=N (gzipped pprof, for the chosen \
processes only). It attaches only to what it is told here or in --selection, never on request.
SIGHUP re-reads --selection and looks for --memleak-comm processes again; SIGTERM detaches everything.")]
pub struct Args {
    /// Address to listen on (loopback unless told otherwise).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9464")]
    pub listen: String,
    /// Trace this process's heap (memleak -p); repeatable.
    #[arg(long = "memleak-pid", value_name = "PID")]
    pub memleak_pid: Vec<u32>,
    /// Trace the heap of every process with this name, now and as they start; repeatable.
    #[arg(long = "memleak-comm", value_name = "COMM")]
    pub memleak_comm: Vec<String>,
    /// A file of more processes to trace, one `pid N` or `comm NAME` per line, re-read on SIGHUP.
    #[arg(long, value_name = "FILE")]
    pub selection: Option<PathBuf>,
    /// Seconds between heap reports (the age of a served heap profile at most), and between
    /// looks for new --memleak-comm processes.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub interval: u64,
}

impl Args {
    /// Everything that can be checked before loading anything (and without root).
    pub fn validate(&self) -> Result<()> {
        listen_addr(&self.listen)?;
        crate::tools::args::in_range("--interval", self.interval, 1..=3600)?;
        for &pid in &self.memleak_pid {
            crate::target::check_pid(pid)?;
        }
        for comm in &self.memleak_comm {
            children::check_comm(comm)?;
        }
        if let Some(path) = &self.selection {
            children::Selection::read(path)?;
        }
        Ok(())
    }

    /// The processes asked for: the command line's and the selection file's.
    fn selection(&self) -> Result<children::Selection> {
        let mut sel = match &self.selection {
            Some(path) => children::Selection::read(path)?,
            None => children::Selection::default(),
        };
        sel.pids.extend(&self.memleak_pid);
        sel.comms.extend(self.memleak_comm.iter().cloned());
        Ok(sel)
    }
}

fn listen_addr(text: &str) -> Result<SocketAddr> {
    text.parse().map_err(|_| anyhow::anyhow!("--listen {text}: not an address: give IP:PORT, e.g. 127.0.0.1:9464"))
}

/// What the endpoints read: the kernel side's maps, and what the children said last.
pub(crate) struct State {
    cgroups: PerCpuHashMap<MapData, u64, CgroupStats>,
    stats: PerCpuArray<MapData, u64>,
    memcgs: MemcgPaths,
    /// Why swap-ins are not counted, when they are not.
    swapin_missing: Option<String>,
    children: children::Children,
}

pub async fn run(args: Args) -> Result<()> {
    kernel::require_root()?;
    let addr = listen_addr(&args.listen)?;
    // Bound before anything is attached: an address in use ends the run with nothing to undo.
    let listener = std::net::TcpListener::bind(addr).map_err(|e| {
        anyhow::anyhow!(
            "--listen {addr}: cannot listen there: {e} (another memtrace serve or exporter? choose another port)"
        )
    })?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let selection = args.selection()?;
    let memcgs = MemcgPaths::new();
    // The kernel side keys its counters by the task's memory cgroup (kernel::load sets how).
    let mut tracer = Tracer::load(&SPEC, |_| {})?;
    let how = tracer.attach(ATTACH)?;
    let swapin_missing = match kernel::resolve(&AttachPoint { label: "swap-ins", probes: &[SWAPIN] }) {
        Ok(_) => {
            kernel::attach_preferred(&mut tracer.bpf, "serve", &[AttachPoint { label: "kprobe", probes: &[SWAPIN] }])
                .err()
                .map(|e| format!("{e:#}"))
        }
        Err(why) => Some(why),
    };
    if let Some(why) = &swapin_missing {
        eprintln!("memtrace: serve: swap-ins are not counted: {why}");
    }
    let dir = children::StateDir::create()?;
    let (tx, news) = tokio::sync::mpsc::unbounded_channel();
    let state = Rc::new(RefCell::new(State {
        cgroups: tracer.map(memtrace_common::serve::names::CGROUPS)?,
        stats: tracer.map(memtrace_common::names::STATS)?,
        memcgs,
        swapin_missing,
        children: children::Children::new(dir, Duration::from_secs(args.interval), selection, tx)?,
    }));
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            tokio::task::spawn_local(http::serve(listener, state.clone()));
            let oomkill = state.borrow_mut().children.start_oomkill()?;
            children::wait_ready(oomkill).await.context("memtrace oomkill did not start (see above)")?;
            // Start-up waits for the first heaps, so that ready means traced.
            let readies = state.borrow_mut().children.reconcile();
            for ready in readies {
                let _ = children::wait_ready(ready).await;
            }
            crate::output::ready::ready("serve", None, &format!("serving http://{addr}/metrics ({how})"));
            main_loop(&mut tracer, &state, &args, news).await
        })
        .await?;
    // Children are asked to stop and waited for: their probes are gone when serve exits.
    let running = state.borrow_mut().children.take_running();
    children::stop_all(running).await;
    Ok(())
}

/// Until SIGINT or SIGTERM: children's news, SIGHUP, and the periodic look for processes.
async fn main_loop(
    tracer: &mut Tracer,
    state: &Rc<RefCell<State>>,
    args: &Args,
    mut news: tokio::sync::mpsc::UnboundedReceiver<children::News>,
) -> Result<()> {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut look = tokio::time::interval(Duration::from_secs(args.interval));
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Readiness of children started later is waited for in the background.
    let background = |readies: Vec<std::os::fd::OwnedFd>| {
        for ready in readies {
            tokio::task::spawn_local(async move {
                let _ = children::wait_ready(ready).await;
            });
        }
    };
    loop {
        tokio::select! {
            _ = tracer.signals.recv() => return Ok(()),
            _ = hup.recv() => {
                match args.selection() {
                    Ok(sel) => {
                        eprintln!("memtrace: serve: SIGHUP: selection reloaded");
                        state.borrow_mut().children.select(sel);
                    }
                    Err(e) => eprintln!("memtrace: serve: SIGHUP: keeping the selection: {e:#}"),
                }
                background(state.borrow_mut().children.reconcile());
            }
            _ = look.tick() => background(state.borrow_mut().children.reconcile()),
            Some(item) = news.recv() => state.borrow_mut().children.on_news(item),
        }
    }
}

impl State {
    /// Everything `/metrics` shows, read now.
    fn snapshot(&mut self) -> metrics::Snapshot {
        let mut snap = metrics::Snapshot::default();
        let mut gone = Vec::new();
        let rows: Vec<(u64, CgroupStats)> =
            self.cgroups.iter().filter_map(Result::ok).map(|(id, per_cpu)| (id, metrics::sum_cpus(&per_cpu))).collect();
        for (id, row) in rows {
            match self.memcgs.path_of_id(id) {
                Some(path) => snap.cgroup(&path, &row),
                None => gone.push(id),
            }
        }
        // A group removed since: its row goes, so the map keeps room for live ones.
        for id in gone {
            let _ = self.cgroups.remove(&id);
        }
        let stat = |i: u32| kernel::maps::sum(&self.stats, i);
        let stats: Vec<u64> = (0..STAT_COUNT).map(stat).collect();
        snap.own(&stats, self.swapin_missing.is_some());
        self.children.add_to(&mut snap);
        snap
    }
}

/// The heap profile of `pid`, when it is one serve traces.
pub(crate) fn heap_profile(state: &State, pid: u32) -> Result<Vec<u8>, (u16, String)> {
    state.children.profile(pid)
}

#[cfg(test)]
mod tests {
    #[test]
    fn listen_addresses() {
        assert!(super::listen_addr("127.0.0.1:9464").is_ok());
        assert!(super::listen_addr("[::1]:80").is_ok());
        let e = super::listen_addr("localhost").unwrap_err().to_string();
        assert!(e.contains("give IP:PORT"), "{e}");
    }
}
