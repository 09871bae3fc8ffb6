//! The skeleton every tracer runs on: its object loaded (globals and map sizes set by the
//! tool), SIGINT and SIGTERM caught, attach points tried in order under the tool's name, maps
//! handed out typed, and one run loop (`stream`) with an optional ring buffer.

use std::time::Duration;

use anyhow::{Context as _, Result};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapData, PerCpuArray, RingBuf},
};
use memtrace_common::names;

use super::{CommonArgs, Ctx, End, Flow, Signals, Stream, ring_ready, spec::ToolSpec, stdout_closed, watch_stdout};
use crate::{
    kernel::{self, AttachPoint},
    target,
};

pub struct Tracer {
    pub bpf: Ebpf,
    pub spec: &'static ToolSpec,
    pub signals: Signals,
}

impl Tracer {
    /// Catches signals first (a Ctrl-C while loading still ends the run cleanly), then loads
    /// the tool's object, letting `configure` set its globals and map sizes.
    pub fn load<'a>(spec: &'static ToolSpec, configure: impl FnOnce(&mut EbpfLoader<'a>)) -> Result<Tracer> {
        Tracer::load_caught(spec, Signals::catch()?, configure)
    }

    /// `load` for a tool that caught signals earlier (memleak, before it starts a command).
    pub fn load_caught<'a>(
        spec: &'static ToolSpec,
        signals: Signals,
        configure: impl FnOnce(&mut EbpfLoader<'a>),
    ) -> Result<Tracer> {
        let bpf = kernel::load(spec.object.for_this_kernel(), configure)?;
        Ok(Tracer { bpf, spec, signals })
    }

    /// The first of `points` this kernel supports, attached; its label.
    pub fn attach(&mut self, points: &[AttachPoint]) -> Result<&'static str> {
        kernel::attach_preferred(&mut self.bpf, self.spec.name, points)
    }

    /// The map `name`, taken out of the object as the type the caller needs.
    pub fn map<M>(&mut self, name: &str) -> Result<M>
    where
        M: TryFrom<Map, Error = aya::maps::MapError>,
    {
        let map = self.bpf.take_map(name).with_context(|| format!("internal: no map {name} in {}", self.spec.name))?;
        Ok(M::try_from(map)?)
    }

    /// Streams `EVENTS` (when the object has one) into `tool` until a signal, `--duration`,
    /// the `-p` process exits, or `max_ticks` ticks of `tick`. Says the tool is ready once live,
    /// and the lost-event count (from the `LOST` per-CPU counter) at the end.
    pub async fn stream<S: Stream>(
        &mut self,
        common: &CommonArgs,
        tick: Option<Duration>,
        max_ticks: Option<u64>,
        ready: &str,
        tool: &mut S,
    ) -> Result<End> {
        let run = Run {
            duration: common.run.duration,
            watch: common.target.pid,
            ready_pid: common.target.pid,
            tick,
            max_ticks,
            ready,
        };
        self.run(run, tool).await
    }

    /// The run loop itself, for every tool.
    pub async fn run<S: Stream>(&mut self, run: Run<'_>, tool: &mut S) -> Result<End> {
        let name = self.spec.name;
        // A tool that reports from its maps alone (vmscan) has no ring buffer.
        let mut ring = match self.bpf.take_map(names::EVENTS) {
            Some(map) => Some(crate::sys::async_readable(RingBuf::try_from(map)?)?),
            None => None,
        };
        let lost = match self.bpf.take_map(names::LOST) {
            Some(map) => Some(PerCpuArray::<MapData, u64>::try_from(map)?),
            None => None,
        };
        let forever = Duration::from_secs(u64::MAX / 4);
        let every = run.tick.unwrap_or(forever);
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        // After memtrace was stopped (Ctrl-Z), one report, not one per interval missed.
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let deadline = tokio::time::sleep(run.duration.map_or(forever, Duration::from_secs));
        tokio::pin!(deadline);
        let watch = run.watch;
        let exited = async move {
            match watch {
                Some(pid) => target::exited(pid).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(exited);
        let stdout = watch_stdout();
        let output_closed = stdout_closed(stdout.as_ref());
        tokio::pin!(output_closed);
        crate::output::ready::ready(name, run.ready_pid, run.ready);
        let mut ticks = 0u64;
        let mut unwind_poll = tokio::time::interval(crate::unwind::POLL);
        let unwinding = tool.unwinder().is_some_and(|u| u.mode() != crate::unwind::UnwindMode::Fp);
        let end = loop {
            let asked = tokio::select! {
                _ = unwind_poll.tick(), if unwinding => {
                    tool.poll_unwinder(watch);
                    None
                }
                guard = ring_ready(&mut ring), if ring.is_some() => {
                    let mut guard = guard?;
                    tool.drain(&mut Ctx { bpf: &mut self.bpf, ring: Some(guard.get_inner_mut()) })?;
                    guard.clear_ready();
                    None
                }
                side = tool.side() => {
                    let mut ctx = Ctx { bpf: &mut self.bpf, ring: ring.as_mut().map(|r| r.get_mut()) };
                    match tool.on_side(&mut ctx, side)? {
                        Flow::Go => None,
                        Flow::Done => break End::TargetExited,
                    }
                }
                _ = ticker.tick(), if !tool.winding_down() => {
                    tool.tick()?;
                    ticks += 1;
                    run.max_ticks.is_some_and(|m| ticks >= m).then_some(End::Count)
                }
                res = &mut exited => {
                    res?;
                    eprintln!("memtrace: {name}: process {} exited", watch.unwrap_or_default());
                    break End::TargetExited;
                }
                _ = self.signals.recv() => Some(End::Signal),
                _ = &mut deadline, if !tool.winding_down() => Some(End::Duration),
                _ = &mut output_closed => break End::OutputClosed,
            };
            if let Some(why) = asked {
                let mut ctx = Ctx { bpf: &mut self.bpf, ring: ring.as_mut().map(|r| r.get_mut()) };
                if tool.stopping(&mut ctx, why)? {
                    break why;
                }
            }
        };
        if end == End::OutputClosed {
            // Not an error (as for `| head` in general), and there is no one left to report to.
            return Ok(end);
        }
        // Events already in the ring belong to the run.
        tool.drain(&mut Ctx { bpf: &mut self.bpf, ring: ring.as_mut().map(|r| r.get_mut()) })?;
        let lost = lost.as_ref().map_or(0, |lost| crate::kernel::maps::sum(lost, 0));
        if lost > 0 {
            eprintln!("memtrace: {name}: {lost} events lost (ring buffer full)");
        }
        tool.finish(lost)?;
        Ok(end)
    }
}

/// How a run goes: its end and what it reports, set by the tool.
pub struct Run<'a> {
    pub duration: Option<u64>,
    /// The process whose exit ends the run.
    pub watch: Option<u32>,
    /// The pid the ready line names (for scripts, `--ready-fd`).
    pub ready_pid: Option<u32>,
    pub tick: Option<Duration>,
    pub max_ticks: Option<u64>,
    pub ready: &'a str,
}
