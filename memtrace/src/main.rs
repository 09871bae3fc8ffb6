//! memtrace: Linux memory debugging with eBPF, one subcommand per tracer.

mod kernel;
mod output;
mod procfs;
mod symbolize;
mod target;
mod tools;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "memtrace",
    version,
    about = "Linux memory debugging with eBPF: leaks, OOM kills, reclaim, page faults"
)]
struct Cli {
    /// More detail on stderr: which probes and tracepoints were attached (-vv for debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    tool: Tool,
}

#[derive(Subcommand, Debug)]
enum Tool {
    /// Memory allocated and not freed, per stack (user process or kernel).
    Memleak(tools::memleak::Args),
    /// OOM kills: victim, trigger, memory, cgroup.
    Oomkill(tools::oomkill::Args),
    /// Every mmap, munmap and mremap, decoded.
    Mmapsnoop(tools::mmapsnoop::Args),
    /// Heap growth (brk) per user stack.
    Brkstack(tools::brkstack::Args),
    /// System V shared memory calls, decoded.
    Shmsnoop(tools::shmsnoop::Args),
    /// Page faults per stack and process, or each fault.
    Faults(tools::faults::Args),
    /// Reclaim activity per interval, with latency histograms.
    Vmscan(tools::vmscan::Args),
    /// Each direct reclaim: who stalled and for how long.
    Drsnoop(tools::drsnoop::Args),
    /// Swap-ins per process per interval.
    Swapin(tools::swapin::Args),
    /// Hugetlb page faults per process and file.
    Hfaults(tools::hfaults::Args),
    /// What this kernel supports, and how each tool would attach.
    Probe(tools::probe::Args),
    /// The floor tracer of `cargo xtask bench` (not a tool).
    #[command(hide = true)]
    Benchfloor(tools::benchfloor::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("MEMTRACE_LOG").unwrap_or_else(|_| level.into()))
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(&e.into()),
    };
    let result = runtime.block_on(async {
        match cli.tool {
            Tool::Memleak(args) => tools::memleak::run(args).await,
            Tool::Oomkill(args) => tools::oomkill::run(args).await,
            Tool::Mmapsnoop(args) => tools::mmapsnoop::run(args).await,
            Tool::Brkstack(args) => tools::brkstack::run(args).await,
            Tool::Shmsnoop(args) => tools::shmsnoop::run(args).await,
            Tool::Faults(args) => tools::faults::run(args).await,
            Tool::Vmscan(args) => tools::vmscan::run(args).await,
            Tool::Drsnoop(args) => tools::drsnoop::run(args).await,
            Tool::Swapin(args) => tools::swapin::run(args).await,
            Tool::Hfaults(args) => tools::hfaults::run(args).await,
            Tool::Probe(args) => tools::probe::run(args).await,
            Tool::Benchfloor(args) => tools::benchfloor::run(args).await,
        }
    });
    kernel::pidns::report_outside();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// One line with the cause chain; a closed stdout (`| head`) is not an error.
fn fail(e: &anyhow::Error) -> ExitCode {
    if e.chain()
        .any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
    {
        return ExitCode::SUCCESS;
    }
    eprintln!("memtrace: error: {e:#}");
    ExitCode::FAILURE
}
