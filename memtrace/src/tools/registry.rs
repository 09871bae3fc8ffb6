//! The one list of tracers. Each tool module exports `Args` (with `validate`), `run` and a
//! `SPEC`; one line in `registry!` below makes it a subcommand, a row in `memtrace probe`, and
//! a checked entry in the tests that hold program names to the eBPF objects.

use anyhow::Result;

pub use super::shared::spec::{Plan, ToolSpec};
use super::{
    brkstack, compaction, drsnoop, faults, hfaults, mallocstat, memleak, migrate, mmapsnoop, oomkill, probe, segv,
    serve, shmsnoop, swapin, vmscan,
};

/// Declares the subcommands: `Variant => module` per tracer, with the variant's doc comment
/// as its one-line help.
macro_rules! registry {
    ($($(#[$doc:meta])* $variant:ident => $module:ident,)*) => {
        #[derive(clap::Subcommand, Debug)]
        pub enum Tool {
            $($(#[$doc])* $variant($module::Args),)*
            /// What this kernel supports, and how each tool would attach.
            Probe(probe::Args),
            /// The floor tracer of `cargo xtask bench` (not a tool; built with `--features bench`).
            #[cfg(feature = "bench")]
            #[command(hide = true)]
            Benchfloor(super::benchfloor::Args),
        }

        /// Every tracer, in `--help` order.
        pub const SPECS: &[&ToolSpec] = &[$(&$module::SPEC,)*];

        impl Tool {
            /// Checks the arguments before anything is loaded: bad input is a one-line error
            /// here, without root and before any probe exists.
            pub fn validate(&self) -> Result<()> {
                match self {
                    $(Tool::$variant(args) => args.validate(),)*
                    Tool::Probe(args) => args.validate(),
                    #[cfg(feature = "bench")]
                    Tool::Benchfloor(args) => crate::target::check_pid(args.pid),
                }
            }

            pub async fn run(self) -> Result<super::Status> {
                match self {
                    $(Tool::$variant(args) => $module::run(args).await.map(Into::into),)*
                    Tool::Probe(args) => probe::run(args).await.map(Into::into),
                    #[cfg(feature = "bench")]
                    Tool::Benchfloor(args) => super::benchfloor::run(args).await.map(Into::into),
                }
            }
        }
    };
}

registry! {
    /// Memory allocated and not freed, per stack (user process or kernel).
    Memleak => memleak,
    /// OOM kills: victim, trigger, memory, cgroup.
    Oomkill => oomkill,
    /// Every mmap, munmap and mremap, decoded.
    Mmapsnoop => mmapsnoop,
    /// Heap growth (brk) per user stack.
    Brkstack => brkstack,
    /// System V shared memory calls, decoded.
    Shmsnoop => shmsnoop,
    /// Page faults per stack and process, or each fault.
    Faults => faults,
    /// Reclaim activity per interval, with latency histograms.
    Vmscan => vmscan,
    /// Each direct reclaim: who stalled and for how long.
    Drsnoop => drsnoop,
    /// Each zone compaction: direct, kcompactd, proactive or manual, with latency and result.
    Compaction => compaction,
    /// Page migrations per reason and process per interval, beside /proc/vmstat's counts.
    Migrate => migrate,
    /// Swap-ins per process per interval.
    Swapin => swapin,
    /// Hugetlb page faults per process and file.
    Hfaults => hfaults,
    /// Crashes (SIGSEGV, SIGBUS, SIGABRT): classified, with the stack at the fault.
    Segv => segv,
    /// glibc's allocator events (libc:memory_* USDT probes): heap growth, arenas, tunables.
    Mallocstat => mallocstat,
    /// A long-running agent: Prometheus metrics per memory cgroup and heap profiles over HTTP.
    Serve => serve,
}

#[cfg(test)]
mod tests {
    use object::{Object as _, ObjectSymbol as _};

    use super::*;

    /// Program names are strings on the user side and function names on the eBPF side: every
    /// one a spec names must be in that tool's object, and every spec must be a subcommand.
    #[test]
    fn every_program_a_spec_names_is_in_its_object() {
        use clap::CommandFactory as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(subcommand)]
            tool: Tool,
        }
        let cmd = Cli::command();
        // probe's own tracer (`probe --usdt --trace`), which is no subcommand.
        for build in super::probe::usdt::SPEC.object.builds() {
            check_object(&super::probe::usdt::SPEC, build);
        }
        for spec in SPECS {
            assert!(cmd.find_subcommand(spec.name).is_some(), "{} is not a subcommand", spec.name);
            for build in spec.object.builds() {
                check_object(spec, build);
            }
            // The walker's bpf_loop callback: in the full build of a tool that walks user
            // stacks, and in no build a kernel without bpf_loop loads.
            let has_callback = |build: &[u8]| {
                let file = object::File::parse(build).unwrap_or_else(|e| panic!("{}: {e}", spec.name));
                file.symbols().filter_map(|s| s.name().ok()).any(|n| n.ends_with("6unwind4step"))
            };
            let found: Vec<bool> = spec.object.builds().map(has_callback).collect();
            let expected = if spec.object.walks_user_stacks() { vec![true, false] } else { vec![false] };
            assert_eq!(found, expected, "{}: bpf_loop callback in its builds (full, without bpf_loop)", spec.name);
        }
        let names: Vec<&str> = SPECS.iter().map(|s| s.name).collect();
        for sub in cmd.get_subcommands().map(|s| s.get_name()) {
            assert!(names.contains(&sub) || sub == "probe" || sub == "benchfloor", "subcommand {sub} has no spec");
        }
    }

    fn check_object(spec: &ToolSpec, build: &[u8]) {
        use memtrace_common::names;
        let file = object::File::parse(build).unwrap_or_else(|e| panic!("{}: {e}", spec.name));
        let symbols: Vec<&str> = file.symbols().filter_map(|s| s.name().ok()).collect();
        let programs = spec.programs();
        assert!(!programs.is_empty() || spec.name == "memleak", "{}: no programs", spec.name);
        for prog in programs {
            assert!(prog.starts_with(spec.name), "{}: program {prog} not named after its tool", spec.name);
            assert!(symbols.contains(&prog), "{}: no program {prog} in its object", spec.name);
        }
        for name in spec.names.iter().chain([&names::PID_NS, &names::OUTSIDE_PID_NS]) {
            assert!(symbols.contains(name), "{}: no map or global {name} in its object", spec.name);
        }
        // The tools whose records carry the memory cgroup the kernel side read: user space sets
        // this global by name (kernel::cgroup::configure), and a missing one is no error there.
        let reads_memcg = ["segv", "compaction", "drsnoop", "faults", "mmapsnoop", "shmsnoop", "migrate", "serve"];
        if reads_memcg.contains(&spec.name) {
            assert!(symbols.contains(&names::MEMCG_ID), "{}: no {}", spec.name, names::MEMCG_ID);
        }
        if spec.object.walks_user_stacks() {
            for name in [names::UNWIND_MODE, names::UNWIND_TRAMPOLINE, names::UNWIND_ROWS, names::UNWIND_STATS] {
                assert!(symbols.contains(&name), "{}: no {name} in its object", spec.name);
            }
        }
        // What user space finds by name in every tracer but memleak (which has no -p/--comm
        // filter in the kernel and counts lost events in its STATS) and serve (machine-wide
        // counters, no events).
        if !["memleak", "serve"].contains(&spec.name) {
            assert!(symbols.contains(&names::FILTER), "{}: no {}", spec.name, names::FILTER);
            let events = symbols.contains(&names::EVENTS);
            assert_eq!(
                events,
                symbols.contains(&names::LOST),
                "{}: {} without {}",
                spec.name,
                names::EVENTS,
                names::LOST
            );
            assert!(events || ["vmscan", "migrate"].contains(&spec.name), "{}: no {}", spec.name, names::EVENTS);
        }
        let usdt = spec.modes.iter().any(|(_, p)| matches!(p, Plan::Usdt { .. }));
        let specs = names::USDT_SPECS;
        assert_eq!(symbols.contains(&specs), usdt, "{}: {specs} where USDT probes are used", spec.name);
    }
}
