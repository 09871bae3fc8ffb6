//! Property tests of the command line: any argument list, however huge or malformed its
//! values, is either refused (by clap or by `validate`) or accepted with every duration
//! small enough for a timer. Nothing panics. Needs no root and no BPF: `validate` runs
//! before anything is loaded.

use clap::Parser as _;
use proptest::prelude::*;

use crate::{Cli, tools::args::MAX_SECONDS};

/// How an option takes its value.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Flag,
    Number,
    /// A number of seconds: accepted only up to MAX_SECONDS.
    Seconds,
    Text,
    Path,
}

use Kind::*;

/// A subcommand's options: (flag, how it takes its value).
type Options = &'static [(&'static str, Kind)];

const COMMON: Options = &[("-p", Number), ("--comm", Text), ("-d", Seconds), ("--json", Flag)];

/// Each subcommand's options, and whether its first positional is an interval in seconds.
const TOOLS: &[(&str, Options, bool)] = &[
    (
        "memleak",
        &[
            ("-p", Number),
            ("-c", Text),
            ("-T", Number),
            ("-o", Number),
            ("-z", Number),
            ("-Z", Number),
            ("-s", Number),
            ("--sample-bytes", Number),
            ("-a", Flag),
            ("-t", Flag),
            ("-O", Path),
            ("--symbols-prefix", Text),
            ("--percpu", Flag),
            ("-d", Seconds),
            ("--json", Flag),
            ("--folded", Path),
            ("--pprof", Path),
            ("--svg", Path),
            ("--duty-cycle", Number),
            ("--duty-period-ms", Number),
            ("--max-allocs", Number),
            ("--max-stacks", Number),
            ("--unwind", Text),
            ("--unwind-rows", Number),
            ("--no-errors", Flag),
            ("--errors-only", Flag),
            ("--freed-record", Number),
            ("--watch", Number),
            ("--children", Flag),
            ("--user", Text),
            ("--uprobes", Flag),
        ],
        true,
    ),
    (
        "brkstack",
        &[
            ("-T", Text),
            ("--events", Flag),
            ("--folded", Path),
            ("--pprof", Path),
            ("--svg", Path),
            ("--max-stacks", Number),
            ("--unwind", Text),
            ("--unwind-rows", Number),
        ],
        true,
    ),
    (
        "faults",
        &[
            ("-T", Text),
            ("--events", Flag),
            ("--kernel", Flag),
            ("--folded", Path),
            ("--pprof", Path),
            ("--svg", Path),
            ("--max-stacks", Number),
            ("--unwind", Text),
            ("--unwind-rows", Number),
        ],
        true,
    ),
    ("vmscan", &[], true),
    (
        "swapin",
        &[("--timestamp", Flag), ("-T", Flag), ("--stack", Flag), ("--unwind", Text), ("--unwind-rows", Number)],
        true,
    ),
    ("hfaults", &[], true),
    ("migrate", &[], true),
    ("compaction", &[("--timestamp", Flag), ("-T", Flag)], false),
    ("drsnoop", &[("-t", Number), ("-n", Text), ("--timestamp", Flag), ("-T", Flag), ("--memcg", Flag)], false),
    ("oomkill", &[("--unwind", Text), ("--unwind-rows", Number)], false),
    ("segv", &[("--all", Flag), ("--unwind", Text), ("--unwind-rows", Number)], false),
    ("mmapsnoop", &[("--failed", Flag), ("--timestamp", Flag), ("-T", Flag)], false),
    ("shmsnoop", &[("--failed", Flag), ("--timestamp", Flag), ("-T", Flag)], false),
    (
        "mallocstat",
        &[
            ("-c", Text),
            ("-T", Text),
            ("--folded", Path),
            ("--pprof", Path),
            ("--svg", Path),
            ("--max-stacks", Number),
            ("--unwind", Text),
            ("--unwind-rows", Number),
        ],
        true,
    ),
    (
        "serve",
        &[
            ("--listen", Text),
            ("--memleak-pid", Number),
            ("--memleak-comm", Text),
            ("--selection", Path),
            ("--interval", Seconds),
        ],
        false,
    ),
    ("probe", &[("--json", Flag), ("--usdt", Path), ("--trace", Text), ("-p", Number), ("-d", Seconds)], false),
    ("benchfloor", &[("-p", Number), ("--naive", Flag)], false),
    ("completions", &[], false),
    ("man", &[], false),
];

/// The subcommands that take no tracer's common options.
const OWN_OPTIONS_ONLY: &[&str] = &["probe", "benchfloor", "completions", "man", "serve"];

fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        (0u64..4).prop_map(|n| n.to_string()),
        Just(u64::MAX.to_string()),
        Just("18446744073709551616".to_string()),
        Just(u32::MAX.to_string()),
        Just((u64::from(u32::MAX) + 1).to_string()),
        Just((MAX_SECONDS + 1).to_string()),
        Just("-1".to_string()),
        Just(String::new()),
        "\\PC{0,12}",
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![Just("sh".to_string()), Just("/".to_string()), Just("a-name-longer-than-15".to_string()), "\\PC{0,20}"]
}

fn path() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("/".to_string()),
        Just("/tmp".to_string()),
        Just("/proc/version".to_string()),
        Just("/nonexistent/dir/file".to_string()),
        Just("/bin/sh".to_string()),
        "\\PC{0,12}",
    ]
}

fn value(kind: Kind) -> BoxedStrategy<Option<String>> {
    match kind {
        Flag => Just(Some(String::new())).boxed(),
        Number | Seconds => number().prop_map(Some).boxed(),
        Text => text().prop_map(Some).boxed(),
        Path => path().prop_map(Some).boxed(),
    }
}

/// An argument list for one tool: a random subset of its options, each with a random value,
/// and up to two positionals. Also returns the seconds values given.
fn argv() -> impl Strategy<Value = (Vec<String>, Vec<String>)> {
    (0..TOOLS.len()).prop_flat_map(|t| {
        let (name, own, interval) = TOOLS[t];
        let memleak = name == "memleak";
        let options: Vec<(&str, Kind)> = own
            .iter()
            .chain(if memleak || OWN_OPTIONS_ONLY.contains(&name) { &[][..] } else { COMMON })
            .copied()
            .collect();
        let picks: Vec<_> = options
            .iter()
            .map(|&(flag, kind)| proptest::option::of(value(kind)).prop_map(move |v| (flag, kind, v.flatten())))
            .collect();
        (picks, proptest::collection::vec(number(), 0..=2)).prop_map(move |(picks, positionals)| {
            let mut args = vec!["memtrace".to_string(), name.to_string()];
            let mut seconds = Vec::new();
            for (flag, kind, v) in picks {
                let Some(v) = v else { continue };
                args.push(flag.to_string());
                if !matches!(kind, Flag) {
                    if matches!(kind, Seconds) {
                        seconds.push(v.clone());
                    }
                    args.push(v);
                }
            }
            if interval && let Some(first) = positionals.first() {
                seconds.push(first.clone());
            }
            args.extend(positionals);
            (args, seconds)
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn parse_and_validate_never_panic((args, seconds) in argv()) {
        let Ok(cli) = Cli::try_parse_from(&args) else { return Ok(()) };
        if cli.command.validate().is_ok() {
            for s in seconds {
                let n: u64 = s.parse().expect("an accepted number of seconds parses");
                prop_assert!((1..=MAX_SECONDS).contains(&n), "{args:?} accepted {n} s");
            }
        }
    }
}

/// The longest accepted interval still fits a timer deadline, twice over (a ticker adds its
/// period to the previous deadline).
#[test]
fn the_longest_interval_fits_a_timer() {
    let every = std::time::Duration::from_secs(MAX_SECONDS);
    let start = tokio::time::Instant::now();
    assert!(start.checked_add(every * 2).is_some());
}

/// `[interval] [count]` is one option group: every tool that reports per interval refuses the
/// same values with the same words.
#[test]
fn intervals_and_counts_are_checked_the_same_in_every_tool() {
    let cases = [
        (
            ["18446744073709551615", "1"],
            "the interval must be at least 1 second and at most 31536000 (a year), not 18446744073709551615",
        ),
        (["0", "1"], "the interval must be at least 1 second and at most 31536000 (a year), not 0"),
        (
            ["18446744073709551616", "1"],
            "the interval is a number of seconds from 1 to 31536000 (a year), not \"18446744073709551616\"",
        ),
        (["x", "1"], "the interval is a number of seconds from 1 to 31536000 (a year), not \"x\""),
        (["1", "0"], "the count must be at least 1"),
        (["1", "many"], "the count is a number of reports of at least 1, not \"many\""),
    ];
    for tool in ["memleak", "brkstack", "faults", "vmscan", "swapin", "hfaults", "migrate"] {
        for (positionals, message) in &cases {
            let cli = Cli::try_parse_from(["memtrace", tool, positionals[0], positionals[1]]).expect("parses");
            let err = cli.command.validate().expect_err(tool).to_string();
            assert_eq!(&err, message, "{tool} {positionals:?}");
        }
    }
}

/// `-T` means `--top` wherever it is taken; where bcc spells timestamps `-T`, memtrace says so
/// in one line rather than giving the letter a second meaning.
#[test]
fn capital_t_is_top_everywhere_and_timestamps_are_spelled_out() {
    for tool in ["memleak", "brkstack", "faults"] {
        let cli = Cli::try_parse_from(["memtrace", tool, "-T", "0"]).expect("parses");
        let err = cli.command.validate().expect_err(tool).to_string();
        assert_eq!(err, "-T/--top takes a number of rows of at least 1, not \"0\"", "{tool}");
        let cli = Cli::try_parse_from(["memtrace", tool, "--top", "3"]).expect("parses");
        cli.command.validate().unwrap_or_else(|e| panic!("{tool} --top 3: {e}"));
    }
    for tool in ["drsnoop", "mmapsnoop", "shmsnoop", "swapin", "compaction"] {
        let cli = Cli::try_parse_from(["memtrace", tool, "-T"]).expect("parses");
        let err = cli.command.validate().expect_err(tool).to_string();
        assert_eq!(
            err,
            "-T is not a timestamp option: use --timestamp (memtrace's -T is --top, rows per table, in memleak, brkstack and faults)",
            "{tool}"
        );
        let cli = Cli::try_parse_from(["memtrace", tool, "--timestamp"]).expect("parses");
        cli.command.validate().unwrap_or_else(|e| panic!("{tool} --timestamp: {e}"));
    }
}

#[test]
fn unwind_options_are_checked_in_every_tool_that_walks_user_stacks() {
    for tool in ["memleak", "brkstack", "faults", "swapin", "oomkill", "segv"] {
        let cli = Cli::try_parse_from(["memtrace", tool, "--unwind-rows", "1000"]).expect("parses");
        let err = cli.command.validate().expect_err(tool).to_string();
        assert_eq!(err, "--unwind-rows takes 1024 to 16777216, not 1000", "{tool}");
        for mode in ["auto", "dwarf", "fp"] {
            let cli = Cli::try_parse_from(["memtrace", tool, "--unwind", mode]).expect("parses");
            cli.command.validate().unwrap_or_else(|e| panic!("{tool} --unwind {mode}: {e}"));
        }
        let err = Cli::try_parse_from(["memtrace", tool, "--unwind", "frame"]).expect_err(tool);
        assert_eq!(err.kind(), clap::error::ErrorKind::InvalidValue, "{tool}");
    }
}

/// The bench's floor tracer is built only with `--features bench` (`cargo xtask bench`).
#[cfg(not(feature = "bench"))]
#[test]
fn benchfloor_is_not_in_the_product() {
    let Err(err) = Cli::try_parse_from(["memtrace", "benchfloor", "-p", "1"]) else {
        panic!("benchfloor parsed in a build without the bench feature");
    };
    assert_eq!(err.kind(), clap::error::ErrorKind::InvalidSubcommand);
}

/// The table above is the fuzzer's whole view of the command line: every subcommand and every
/// option of each is in it, so a new tool or option is fuzzed from the day it comes.
#[test]
fn the_option_table_covers_every_tool_and_option() {
    use clap::CommandFactory as _;
    let cli = Cli::command();
    let globals: Vec<&str> = cli.get_arguments().filter_map(|a| a.get_id().as_str().into()).collect();
    let subs: Vec<&str> = cli.get_subcommands().map(|s| s.get_name()).filter(|n| *n != "help").collect();
    let tabled: Vec<&str> = TOOLS.iter().map(|(name, _, _)| *name).collect();
    let mut missing = Vec::new();
    for sub in cli.get_subcommands().filter(|s| s.get_name() != "help") {
        let Some((_, own, _)) = TOOLS.iter().find(|(name, _, _)| *name == sub.get_name()) else {
            missing.push(format!("subcommand {}", sub.get_name()));
            continue;
        };
        let common = !(sub.get_name() == "memleak" || OWN_OPTIONS_ONLY.contains(&sub.get_name()));
        let known = |flag: &str| own.iter().chain(if common { COMMON } else { &[][..] }).any(|(f, _)| *f == flag);
        for arg in sub.get_arguments() {
            if arg.is_positional() || globals.contains(&arg.get_id().as_str()) || arg.get_id() == "help" {
                continue;
            }
            let short = arg.get_short().map(|c| format!("-{c}"));
            let long = arg.get_long().map(|l| format!("--{l}"));
            if !short.iter().chain(&long).any(|f| known(f)) {
                missing.push(format!("{} {}", sub.get_name(), long.or(short).unwrap_or_default()));
            }
        }
    }
    assert!(missing.is_empty(), "not in cli_tests' TOOLS: {missing:?}");
    let no_subcommand: Vec<&&str> =
        tabled.iter().filter(|t| !(subs.contains(t) || **t == "benchfloor" && cfg!(not(feature = "bench")))).collect();
    assert!(no_subcommand.is_empty(), "in TOOLS but no subcommand: {no_subcommand:?}");
}
