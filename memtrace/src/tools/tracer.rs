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

use super::{
    CommonArgs, End, Signals, Stream, async_readable, registry::ToolSpec, ring_ready, stdout_closed, watch_stdout,
};
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
    pub async fn stream(
        &mut self,
        common: &CommonArgs,
        tick: Option<Duration>,
        max_ticks: Option<u64>,
        ready: &str,
        tool: &mut impl Stream,
    ) -> Result<End> {
        let name = self.spec.name;
        // A tool that reports from its maps alone (vmscan) has no ring buffer.
        let mut ring = match self.bpf.take_map(names::EVENTS) {
            Some(map) => Some(async_readable(RingBuf::try_from(map)?)?),
            None => None,
        };
        let lost = match self.bpf.take_map(names::LOST) {
            Some(map) => Some(PerCpuArray::<MapData, u64>::try_from(map)?),
            None => None,
        };
        let forever = Duration::from_secs(u64::MAX / 4);
        let every = tick.unwrap_or(forever);
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let deadline = tokio::time::sleep(common.duration.map_or(forever, Duration::from_secs));
        tokio::pin!(deadline);
        let watch = common.pid;
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
        crate::output::ready::ready(name, common.pid, ready);
        let mut ticks = 0u64;
        let mut unwind_poll = tokio::time::interval(crate::unwind::POLL);
        let unwinding = tool.unwinder().is_some_and(|u| u.mode() != crate::unwind::UnwindMode::Fp);
        let end = loop {
            tokio::select! {
                _ = unwind_poll.tick(), if unwinding => {
                    if let Some(unwinder) = tool.unwinder() {
                        unwinder.poll(|pid| watch.is_none_or(|w| w == pid));
                    }
                }
                guard = ring_ready(&mut ring), if ring.is_some() => {
                    let mut guard = guard?;
                    while let Some(item) = guard.get_inner_mut().next() {
                        tool.event(&item)?;
                    }
                    guard.clear_ready();
                }
                _ = ticker.tick() => {
                    tool.tick()?;
                    ticks += 1;
                    if max_ticks.is_some_and(|m| ticks >= m) {
                        break End::Count;
                    }
                }
                res = &mut exited => {
                    res?;
                    eprintln!("memtrace: {name}: process {} exited", watch.unwrap_or_default());
                    break End::TargetExited;
                }
                _ = self.signals.recv() => break End::Signal,
                _ = &mut deadline => break End::Duration,
                _ = &mut output_closed => break End::OutputClosed,
            }
        };
        if end == End::OutputClosed {
            // Not an error (as for `| head` in general), and there is no one left to report to.
            return Ok(end);
        }
        // Events already in the ring belong to the run.
        if let Some(ring) = ring.as_mut() {
            while let Some(item) = ring.get_mut().next() {
                tool.event(&item)?;
            }
        }
        let lost = lost.as_ref().map_or(0, |lost| crate::kernel::maps::sum(lost, 0));
        if lost > 0 {
            eprintln!("memtrace: {name}: {lost} events lost (ring buffer full)");
        }
        tool.finish(lost)?;
        Ok(end)
    }
}
