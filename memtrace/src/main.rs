//! memtrace: Linux memory debugging with eBPF, one subcommand per tracer.

mod docs;
mod kernel;
mod loader;
mod output;
mod procfs;
mod symbolize;
mod sys;
mod target;
mod tools;
mod tracee;
mod unwind;

#[cfg(test)]
mod cli_tests;

// x86-64 only, by design for now: entry probes are placed by decoding x86 instructions, page
// faults come from the x86-only `exceptions` tracepoints and their x86 error code, stacks are
// walked by the x86-64 ABI, and syscall and errno numbers are x86-64's.
#[cfg(not(target_arch = "x86_64"))]
compile_error!(
    "memtrace supports x86-64 Linux only (x86 instruction decoding, the x86 `exceptions` tracepoints, \
     the x86-64 ABI); build it for an x86_64 target"
);

use std::process::ExitCode;

use clap::{CommandFactory as _, Parser};

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
    /// When live (probes attached), write `{"ready": true, "tool": ..., "pid": ...}` to this
    /// open file descriptor and close it: what scripts and tests wait for.
    #[arg(long, global = true, value_name = "FD")]
    ready_fd: Option<i32>,
    #[command(subcommand)]
    command: Command,
}

/// The tracers, then what is no tracer: the shell's completions and the man pages.
#[derive(clap::Subcommand, Debug)]
#[expect(clippy::large_enum_variant, reason = "parsed once per run")]
enum Command {
    #[command(flatten)]
    Tool(tools::registry::Tool),
    /// Print the completion script for SHELL on stdout (bash: save it as
    /// /usr/share/bash-completion/completions/memtrace).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write memtrace's man pages (memtrace.1 and one per subcommand) into DIR: what
    /// `cargo xtask build` leaves beside the binary.
    #[command(hide = true)]
    Man {
        #[arg(value_name = "DIR")]
        dir: std::path::PathBuf,
    },
}

impl Command {
    /// Checks a tracer's arguments before anything is loaded (see `Tool::validate`).
    fn validate(&self) -> anyhow::Result<()> {
        match self {
            Command::Tool(tool) => tool.validate(),
            Command::Completions { .. } | Command::Man { .. } => Ok(()),
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never into a pipe or a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .without_time()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("MEMTRACE_LOG").unwrap_or_else(|_| level.into()))
        .init();
    if let Err(e) = cli.command.validate() {
        return fail(&e);
    }
    let tool = match cli.command {
        Command::Tool(tool) => tool,
        Command::Completions { shell } => return done(docs::completions(shell, Cli::command())),
        Command::Man { dir } => return done(docs::man_pages(&dir, Cli::command())),
    };
    if let Some(fd) = cli.ready_fd
        && let Err(e) = output::ready::set_fd(fd)
    {
        return fail(&e);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(&e.into()),
    };
    let result = runtime.block_on(tool.run());
    // After the tool's last report, on success or error: one grace period, not one per probe.
    kernel::detach_all_fast();
    kernel::pidns::report_outside();
    match result {
        Ok(status) => ExitCode::from(status.0),
        Err(e) => fail(&e),
    }
}

/// clap's errors made one line like every other (`--help` and `--version` print as usual).
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if !e.use_stderr() || e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        e.exit();
    }
    let text = e.render().to_string();
    // The message and its indented details (e.g. the missing argument), without the usage lines.
    let mut lines = text.lines().take_while(|l| !l.is_empty() && !l.starts_with("Usage:"));
    let first = lines.next().unwrap_or_default();
    let details: Vec<&str> = lines.map(str::trim).collect();
    let message = first.strip_prefix("error: ").unwrap_or(first);
    let message = if details.is_empty() { message.to_string() } else { format!("{message} {}", details.join(", ")) };
    eprintln!("memtrace: error: {message} (see --help)");
    ExitCode::FAILURE
}

/// The exit of a command that runs no tracer.
fn done(result: anyhow::Result<()>) -> ExitCode {
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
