//! The skeleton every tracer runs on: its object loaded (globals and map sizes set by the
//! tool), SIGINT and SIGTERM caught, attach points tried in order under the tool's name, maps
//! handed out typed, and one run loop (`stream`) with an optional ring buffer.

use std::time::Duration;

use anyhow::{Context as _, Result};
use aya::{Ebpf, EbpfLoader, maps::Map};

use super::{CommonArgs, End, Signals, Stream, registry::ToolSpec};
use crate::kernel::{self, AttachPoint};

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

    /// Runs `tool` until a signal, `--duration`, the `-p` process's exit, or `max_ticks`
    /// ticks of `tick`; see `super::stream`.
    pub async fn stream(
        &mut self,
        common: &CommonArgs,
        tick: Option<Duration>,
        max_ticks: Option<u64>,
        ready: &str,
        tool: &mut impl Stream,
    ) -> Result<End> {
        super::stream(&mut self.bpf, self.spec.name, common, &mut self.signals, tick, max_ticks, ready, tool).await
    }
}
