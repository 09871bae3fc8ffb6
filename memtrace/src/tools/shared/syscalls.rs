//! What the syscall snoops (mmapsnoop, shmsnoop) share in user space: their options, the
//! offsets of their tracepoints' fields, and the run that prints each finished call (the
//! kernel half is `memtrace_ebpf::syscall_snoop!`).

use anyhow::{Result, bail};
use memtrace_common::{
    names,
    syscalls::{Config, Event, MAX_ARGS, MAX_CALLS, Offsets},
};

use crate::{
    kernel::{
        self, AttachPoint,
        cgroup::{Attribution, MemcgPaths},
        tracefs::Format,
    },
    output::events::Events,
    tools::{self, CommonArgs, args::Timestamp, spec::ToolSpec, tracer::Tracer},
};

#[derive(clap::Args, Debug)]
pub struct SnoopArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Only calls that failed.
    #[arg(long)]
    pub failed: bool,
    #[command(flatten)]
    pub timestamp: Timestamp,
}

impl SnoopArgs {
    /// Everything that can be checked before loading anything (and without root).
    pub fn validate(&self) -> Result<()> {
        self.timestamp.validate()?;
        self.common.validate()
    }
}

/// One call a snoop follows: its number (the tool's `CALL_*`), its name as in
/// `sys_enter_<name>`, and its arguments' field names in order.
pub struct Syscall {
    pub call: u32,
    pub name: &'static str,
    pub args: &'static [&'static str],
}

/// Field offsets of every call's entry and exit tracepoints, from the running kernel.
fn offsets(calls: &[Syscall]) -> Result<Offsets> {
    let mut o = Offsets::default();
    for c in calls {
        let i = c.call as usize;
        if i >= MAX_CALLS || c.args.len() > MAX_ARGS {
            bail!("internal: syscall {} does not fit the event", c.name);
        }
        let enter = Format::read("syscalls", &format!("sys_enter_{}", c.name))?;
        for (slot, field) in o.args[i].iter_mut().zip(c.args) {
            *slot = enter.offset(field)?;
        }
        o.nargs[i] = c.args.len() as u32;
        o.ret[i] = Format::read("syscalls", &format!("sys_exit_{}", c.name))?.offset("ret")?;
    }
    Ok(o)
}

/// Loads `spec` for `calls`, attaches `attach`, and hands each finished call to `show`, which
/// prints it through the `Events` printer (`header`: the table's columns) with the caller's
/// memory cgroup (read by the kernel side at the call).
pub async fn run(
    spec: &'static ToolSpec,
    attach: &[AttachPoint],
    calls: &[Syscall],
    args: &SnoopArgs,
    header: String,
    what: &str,
    show: impl FnMut(&mut Events, &Event, &Attribution) -> Result<()>,
) -> Result<()> {
    kernel::require_root()?;
    let filter = args.common.filter()?;
    let offsets = offsets(calls)?;
    let config = Config { failed_only: args.failed.into(), self_pid: std::process::id() };
    let mut tracer = Tracer::load(spec, |loader| {
        loader
            .override_global(names::FILTER, &filter, true)
            .override_global(memtrace_common::syscalls::names::OFFSETS, &offsets, true)
            .override_global(memtrace_common::syscalls::names::CONFIG, &config, true);
    })?;
    tracer.attach(attach)?;
    let out = Events::new(args.common.run.json, args.timestamp.timestamp, header);
    let mut snoop = Snoop { out, show, cgroups: MemcgPaths::new() };
    tracer.stream(&args.common, None, None, what, &mut snoop).await?;
    Ok(())
}

struct Snoop<F> {
    out: Events,
    show: F,
    cgroups: MemcgPaths,
}

impl<F: FnMut(&mut Events, &Event, &Attribution) -> Result<()>> tools::Stream for Snoop<F> {
    type Side = ();

    fn event(&mut self, data: &[u8]) -> Result<()> {
        let Some(e) = tools::read_event::<Event>(data) else { return Ok(()) };
        let cgroup = self.cgroups.attribution_of_id(e.memcg_id);
        (self.show)(&mut self.out, &e, &cgroup)
    }

    fn finish(&mut self, lost: u64) -> Result<()> {
        self.out.finish(lost, serde_json::Value::Null)
    }
}
