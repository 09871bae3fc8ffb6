//! benchfloor (hidden): attaches the floor tracer to a process's allocator until it exits;
//! `cargo xtask bench` compares memleak's cost with this one's.

use anyhow::Result;

use crate::{kernel, target};

const OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/benchfloor"));

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(short, long)]
    pub pid: u32,
    /// Probe every function at its first instruction, as naive tracers do, instead of where
    /// memleak places its entry probes.
    #[arg(long)]
    pub naive: bool,
}

pub async fn run(args: Args) -> Result<()> {
    kernel::require_root()?;
    target::check_pid(args.pid)?;
    let libc = target::allocator_of_pid(args.pid)?.primary;
    let mut bpf = kernel::load(OBJECT, |_| {})?;
    let placement = kernel::placement::Placement::new(&libc);
    let attach = |bpf: &mut aya::Ebpf, prog: &str, func: &str| {
        let entry = prog != "benchfloor_ret" && !args.naive;
        let offset = if entry { placement.entry_offset(func, func == "free") } else { 0 };
        kernel::attach_uprobe(bpf, prog, &libc, func, offset, Some(args.pid)).map(drop).map_err(|e| match e {
            kernel::UprobeError::NoSymbol => anyhow::anyhow!("{} has no {func}", libc.display()),
            kernel::UprobeError::Other(e) => e,
        })
    };
    for func in ["malloc", "calloc", "realloc"] {
        attach(&mut bpf, "benchfloor_ret", func)?;
    }
    attach(&mut bpf, "benchfloor_free", "free")?;
    for func in ["malloc", "calloc", "realloc"] {
        attach(&mut bpf, "benchfloor_enter", func)?;
    }
    // The bench waits for --ready-fd, as for every tracer.
    crate::output::ready::ready("benchfloor", Some(args.pid), &format!("tracing pid {}", args.pid));
    let mut signals = crate::tools::Signals::catch()?;
    tokio::select! {
        res = target::exited(args.pid) => res?,
        _ = signals.recv() => {}
    }
    Ok(())
}
