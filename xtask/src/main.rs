//! Developer tasks for memtrace: `cargo xtask <setup|build|demo|test|vm-test>`.

mod bench;
mod cmd;
/// The tests' own program builder (the demo's too).
#[path = "../../tests/common/progs.rs"]
mod progs;
mod ready;
mod setup;
mod summary;
mod tasks;
mod vm;
mod vm_image;
mod vm_tests;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(bin_name = "cargo xtask", about = "Set up, build, demo and test memtrace")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing memtrace needs (root; safe to re-run).
    Setup,
    /// Set up, then build the release binary target/release/memtrace, and its man pages beside it
    /// (memtrace.1, memtrace-memleak.1, ...).
    Build {
        /// Build a static (musl) binary instead, stripped, at target/static/memtrace: the machine
        /// it is copied to needs no Rust and no particular C library.
        #[arg(long = "static")]
        static_binary: bool,
    },
    /// Build, then run `memtrace memleak` on the bundled leaky demo program.
    Demo,
    /// Measure memtrace's cost on a malloc-heavy workload and on real programs, side by side
    /// with heaptrack and bcc, and its start-up (writes target/bench.json).
    Bench(bench::Options),
    /// Set up, then run the test suite one test at a time.
    Test {
        /// Extra arguments for the test harness, e.g. a test name filter.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the integration tests (tests/*.rs), built static, in QEMU VMs booting stock Debian
    /// kernels (5.10, 6.1, 6.12) side by side; one `N passed, N failed` line per kernel.
    VmTest(vm::Options),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run().map(|()| 0),
        Task::Build { static_binary: false } => tasks::build().map(|()| 0),
        Task::Build { static_binary: true } => tasks::build_static().map(|()| 0),
        Task::Demo => tasks::demo(),
        Task::Test { args } => tasks::test(&args),
        Task::Bench(opts) => bench::run(&opts),
        Task::VmTest(opts) => setup::run().and_then(|()| vm::run(&opts)),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
