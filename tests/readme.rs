//! The README's examples, run. Each block that README.md marks with `<!-- checked: NAME -->`
//! shows `$ memtrace ...` commands and what they print; the test of NAME runs the same commands
//! on the same programs here and compares the shape of their output with the block (`Shape`),
//! so that neither can change without the other. A marker without a test here, or a test whose
//! marker is gone, fails `every_marked_block_has_its_test`.

#[path = "common/mod.rs"]
mod common;
#[path = "common/compact.rs"]
mod compact;
#[path = "common/memcg.rs"]
mod memcg;

use std::{
    collections::{BTreeSet, HashSet},
    path::Path,
    process::{Command, Output, Stdio},
    time::Duration,
};

use common::*;
use serde_json::Value;

/// The blocks this file checks, each by the test named after it.
const CHECKED: &[&str] = &[
    "demo",
    "errors",
    "probe",
    "unwind-cpp",
    "memleak-errors",
    "memleak-watch",
    "oomkill",
    "mmapsnoop",
    "shmsnoop",
    "vmscan",
    "drsnoop",
    "compaction",
    "migrate",
    "faults",
    "brkstack",
    "segv",
    "mallocstat",
    "probe-usdt",
    "json-frame",
    "json-memleak",
    "json-blind-spots",
];

const MARK: &str = "<!-- checked: ";

fn readme() -> String {
    std::fs::read_to_string(repo().join("README.md")).expect("README.md at the repository's root")
}

/// The names of the marked blocks, in the README's order.
fn marked() -> Vec<String> {
    readme()
        .lines()
        .filter_map(|l| l.trim().strip_prefix(MARK)?.strip_suffix("-->").map(|n| n.trim().to_string()))
        .collect()
}

/// What follows `<!-- checked: NAME -->`: a fenced block's lines without the fences, or else
/// the lines up to the next blank one.
fn marked_text(name: &str) -> Vec<String> {
    let text = readme();
    let mut lines = text.lines().skip_while(|l| l.trim() != format!("{MARK}{name} -->")).skip(1).peekable();
    assert!(lines.peek().is_some(), "README.md has no `{MARK}{name} -->`");
    if lines.peek().is_some_and(|l| l.starts_with("```")) {
        lines.next();
        lines.take_while(|l| !l.starts_with("```")).map(str::to_string).collect()
    } else {
        lines.take_while(|l| !l.trim().is_empty()).map(str::to_string).collect()
    }
}

/// One command of a block and the lines shown under it.
#[derive(Debug)]
struct Example {
    command: String,
    lines: Vec<String>,
}

/// The block `name`, split at its `$ ` lines.
fn examples(name: &str) -> Vec<Example> {
    let mut out: Vec<Example> = Vec::new();
    for line in marked_text(name) {
        match line.strip_prefix("$ ") {
            Some(command) => out.push(Example { command: command.to_string(), lines: Vec::new() }),
            None => {
                out.last_mut().unwrap_or_else(|| panic!("block {name} starts without a `$ ` line")).lines.push(line)
            }
        }
    }
    assert!(!out.is_empty(), "block {name} shows no command");
    out
}

fn example(name: &str) -> Example {
    let mut all = examples(name);
    assert_eq!(all.len(), 1, "block {name} should show one command");
    all.remove(0)
}

/// The command an example shows, run from the repository's root (its paths are relative to
/// it), with the pid it shows after `-p` replaced by `pid` if given; `ready` adds `--ready-fd 3`. Words
/// before `memtrace` are a program that runs it (`setpriv ... memtrace ...`).
fn command(example: &Example, pid: Option<u32>, ready: bool) -> Command {
    let line = &example.command;
    assert!(!line.contains(['"', '\'', '|', '<', '>', '&', ';']), "a checked command is plain words: {line}");
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "memtrace").unwrap_or_else(|| panic!("not a memtrace command: {line}"));
    let memtrace = env!("CARGO_BIN_EXE_memtrace");
    let mut cmd = match words[..at] {
        [] => Command::new(memtrace),
        [program, ref args @ ..] => {
            let mut cmd = Command::new(program);
            cmd.args(args).arg(memtrace);
            cmd
        }
    };
    if ready {
        cmd.args(["--ready-fd", &READY_FD.to_string()]);
    }
    let mut args = words[at + 1..].iter().map(|w| w.to_string()).collect::<Vec<_>>();
    if let (Some(p), Some(pid)) = (args.iter().position(|a| a == "-p"), pid) {
        args[p + 1] = pid.to_string();
    }
    // As root, not as whoever ran the tests through sudo (see common::memtrace).
    cmd.args(args).current_dir(repo()).env_remove("SUDO_UID").env_remove("SUDO_GID").env_remove("SUDO_USER");
    cmd
}

/// Runs a command to its end (at most `limit`).
fn output(mut cmd: Command, limit: Duration) -> Output {
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    wait_output(child, limit)
}

/// How closely a block must match the output.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Shape {
    /// Numbers as shown, except those that differ from one run to the next anyway: times,
    /// addresses and offsets (hex), pids (`pid N`, `process N`) and growth rates (`N B/s`).
    Exact,
    /// Any number may differ (counts, sizes, latencies, pids), except source lines (`demo.c:45`).
    Numbers,
    /// Only the first word of each line: rows whose values depend on the kernel's features.
    Keys,
}

/// Whether `chars[at..]` starts with `template`, where `d` stands for a digit.
fn looks_like(chars: &[char], at: usize, template: &str) -> bool {
    template
        .chars()
        .enumerate()
        .all(|(i, t)| chars.get(at + i).is_some_and(|&c| if t == 'd' { c.is_ascii_digit() } else { c == t }))
}

/// One line as compared: runs of blanks made one (column widths follow the numbers in them),
/// an indented line keeps one leading blank; times become `T`, hex numbers `0x_`, and the
/// numbers `shape` lets vary `N`. Each word (run of non-blanks) that starts with one of
/// `vary` after its first character is cut to that prefix and `*`. None for a line the README
/// shows but no program prints (`^C`, a terminal's echo).
fn normalize(line: &str, shape: Shape, vary: &[&str]) -> Option<String> {
    let trimmed = line.trim();
    if trimmed == "^C" {
        return None;
    }
    if trimmed == "..." {
        return Some("...".into());
    }
    let indent = if line.starts_with(' ') { " " } else { "" };
    if shape == Shape::Keys {
        return Some(format!("{indent}{}", trimmed.split_whitespace().next().unwrap_or("")));
    }
    let mut joined = trimmed.split_whitespace().collect::<Vec<_>>().join(" ");
    for prefix in vary {
        let mut from = 0;
        while let Some(at) = joined[from..].find(prefix).map(|a| a + from) {
            let start = at + prefix.len();
            let end = joined[start..].find(' ').map_or(joined.len(), |e| e + start);
            joined.replace_range(start..end, "*");
            from = start + 1;
        }
    }
    let chars: Vec<char> = joined.chars().collect();
    let mut out = String::from(indent);
    let mut i = 0;
    while i < chars.len() {
        let prev = if i == 0 { ' ' } else { chars[i - 1] };
        let standalone = !prev.is_ascii_alphanumeric() && prev != '_';
        if standalone && looks_like(&chars, i, "dddd-dd-ddTdd:dd:ddZ") {
            out.push('T');
            i += 20;
        } else if standalone && looks_like(&chars, i, "dd:dd:dd") {
            out.push('T');
            i += 8;
        } else if standalone && chars[i] == '0' && chars.get(i + 1) == Some(&'x') {
            out.push_str("0x_");
            i += 2;
            while chars.get(i).is_some_and(char::is_ascii_hexdigit) {
                i += 1;
            }
        } else if standalone && chars[i].is_ascii_digit() {
            let start = i;
            while chars.get(i).is_some_and(|c| c.is_ascii_digit() || *c == '.') {
                i += 1;
            }
            let number: String = chars[start..i].iter().collect();
            let rest: String = chars[i..].iter().collect();
            let varies = match shape {
                Shape::Numbers => prev != ':',
                _ => out.ends_with("pid ") || out.ends_with("process ") || rest.starts_with(" B/s"),
            };
            out.push_str(if varies { "N" } else { &number });
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    // A histogram's bar: its length follows the counts.
    if let (Some(open), Some(close)) = (out.find('|'), out.rfind('|'))
        && close > open
        && out[open + 1..close].chars().all(|c| c == '*' || c == ' ')
    {
        out.replace_range(open + 1..close, "bar");
    }
    Some(out)
}

/// The lines as compared: normalized, with each run of kernel frames made one line (they
/// follow the kernel's build).
fn shape_of(lines: &[String], shape: Shape, vary: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in lines.iter().filter_map(|l| normalize(l, shape, vary)) {
        let kernel_frame = line.starts_with(' ') && line.ends_with(" [kernel]");
        if kernel_frame && out.last().is_some_and(|l| l == " [kernel frames]") {
            continue;
        }
        out.push(if kernel_frame { " [kernel frames]".into() } else { line });
    }
    out
}

/// Matches `text` against `pattern`, where a `...` line stands for any number of lines; on
/// failure, the index of the first pattern line that no way of matching got past.
fn glob(pattern: &[String], text: &[String]) -> Result<(), usize> {
    fn go(
        p: &[String],
        t: &[String],
        i: usize,
        j: usize,
        best: &mut usize,
        failed: &mut HashSet<(usize, usize)>,
    ) -> bool {
        *best = (*best).max(i);
        if i == p.len() {
            return j == t.len();
        }
        if failed.contains(&(i, j)) {
            return false;
        }
        let ok = if p[i] == "..." {
            (j..=t.len()).any(|k| go(p, t, i + 1, k, best, failed))
        } else {
            j < t.len() && p[i] == t[j] && go(p, t, i + 1, j + 1, best, failed)
        };
        if !ok {
            failed.insert((i, j));
        }
        ok
    }
    let mut best = 0;
    if go(pattern, text, 0, 0, &mut best, &mut HashSet::new()) { Ok(()) } else { Err(best) }
}

/// `text` with this process's memory cgroup (as memtrace shows it) made the root's.
fn in_root_memcg(text: &str) -> String {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let v1 = cgroups.lines().find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()));
    let own = v1.or_else(|| cgroups.lines().find_map(|l| l.strip_prefix("0::").map(str::to_string)));
    match own {
        Some(own) if own != "/" => text.replace(&format!(" {own}"), " /").replace(&format!("={own} "), "=/ "),
        _ => text.to_string(),
    }
}

/// Whether a line of a block is memtrace's stderr: its own lines and its log's.
fn is_stderr(line: &str) -> bool {
    let t = line.trim_start();
    // and the traced program's own: glibc's heap checks (`free(): double free detected ...`).
    ["memtrace: ", "INFO ", "WARN ", "DEBUG ", "free(): "].iter().any(|p| t.starts_with(p))
}

/// Compares what `example` shows with what its command printed. The block interleaves the two
/// streams as a terminal does; each is compared with its own lines (a `...` stands in both).
fn compare(name: &str, example: &Example, stdout: &str, stderr: &str, shape: Shape, vary: &[&str]) {
    // The examples' processes run in the memory cgroup of whoever runs the tests, which the
    // README shows as the root.
    let (stdout, stderr) = (&in_root_memcg(stdout), &in_root_memcg(stderr));
    // For writing a block: what the command printed, to paste (`--nocapture`).
    if std::env::var_os("MEMTRACE_README_PRINT").is_some() {
        let stderr =
            if stderr.is_empty() || stderr.ends_with('\n') { stderr.to_string() } else { format!("{stderr}\n") };
        println!("<!-- checked: {name} -->\n$ {}\n{stderr}{stdout}", example.command);
    }
    let shown = |err: bool| -> Vec<String> {
        example.lines.iter().filter(|l| l.trim() == "..." || is_stderr(l) == err).cloned().collect()
    };
    let printed = |text: &str| -> Vec<String> { text.lines().map(str::to_string).collect() };
    for (stream, shown, printed) in
        [("stdout", shown(false), printed(stdout)), ("stderr", shown(true), printed(stderr))]
    {
        let (want, got) = (shape_of(&shown, shape, vary), shape_of(&printed, shape, vary));
        if let Err(at) = glob(&want, &got) {
            panic!(
                "README block {name}, `$ {}`: its {stream} differs from the README's ({shape:?} shape), from README \
                 line {:?} on.\nREADME shows:\n{}\nmemtrace printed:\n{}\nas compared, README:\n{}\nprinted:\n{}",
                example.command,
                want.get(at).map_or("(end)", String::as_str),
                shown.join("\n"),
                printed.join("\n"),
                want.join("\n"),
                got.join("\n"),
            );
        }
    }
}

#[test]
fn every_marked_block_has_its_test() {
    let marked: BTreeSet<String> = marked().into_iter().collect();
    let checked: BTreeSet<String> = CHECKED.iter().map(|n| n.to_string()).collect();
    assert_eq!(marked, checked, "README.md's `{MARK}NAME -->` markers and this file's CHECKED differ");
}

#[test]
fn the_comparison_keeps_what_matters() {
    let n = |l: &str, s: Shape| normalize(l, s, &["memcg=/"]).unwrap();
    assert_eq!(
        n("[2026-11-30T18:38:57Z] final report, pid 2432: 34.8 KiB outstanding in 3 stacks", Shape::Exact),
        "[T] final report, pid N: 34.8 KiB outstanding in 3 stacks"
    );
    assert_eq!(
        n("  30720 bytes in 120 allocations from stack [growing, +2684 B/s]", Shape::Exact),
        " 30720 bytes in 120 allocations from stack [growing, +N B/s]"
    );
    assert_eq!(n("      cache_insert+0x16 [demo] demo.c:45", Shape::Numbers), " cache_insert+0x_ [demo] demo.c:45");
    assert_eq!(
        n("00:54:35 12371 (hog) killed memcg=/demo loadavg: 1.95 5/131", Shape::Numbers),
        "T N (hog) killed memcg=/* loadavg: N N/N"
    );
    assert_eq!(n("  libc.so.6 x86_64 v1252", Shape::Numbers), " libc.so.N x86_64 v1252");
    assert_eq!(n("   2 -> 3 : 30   |****    |", Shape::Numbers), " N -> N : N |bar|");
    assert_eq!(n("  kprobes   no   /sys/bus", Shape::Keys), " kprobes");
    assert_eq!(normalize("^C", Shape::Exact, &[]), None);
    let lines = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(glob(&lines(&["a", "...", "d"]), &lines(&["a", "b", "c", "d"])), Ok(()));
    assert_eq!(glob(&lines(&["a", "...", "d"]), &lines(&["a", "d"])), Ok(()));
    assert_eq!(glob(&lines(&["a", "x", "d"]), &lines(&["a", "b", "d"])), Err(1));
    assert_eq!(glob(&lines(&["a"]), &lines(&["a", "b"])), Err(1));
    let kernel = lines(&["  f+0x1 [kernel]", "  g+0x2 [kernel]", "  --", "  main+0x3 [prog] prog.c:4"]);
    assert_eq!(
        shape_of(&kernel, Shape::Numbers, &[]),
        lines(&[" [kernel frames]", " --", " main+0x_ [prog] prog.c:4"])
    );
}

/// The first example: what `cargo xtask demo` runs and prints.
#[test]
fn demo() {
    if !unwind_tables("demo") {
        return;
    }
    demo_program();
    let example = example("demo");
    let out = output(command(&example, None, false), Duration::from_secs(90));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{}: {stderr}", out.status);
    compare("demo", &example, &stdout, &stderr, Shape::Exact, &[]);
    // And it is what the demo task runs.
    let task = std::fs::read_to_string(repo().join("xtask/src/tasks.rs")).unwrap_or_default();
    if !task.is_empty() {
        let args: Vec<String> = example.command.split_whitespace().skip(1).map(|w| format!("{w:?}")).collect();
        assert!(
            task.contains(&format!("[{}]", args.join(", "))),
            "cargo xtask demo does not run `{}`",
            example.command
        );
    }
}

/// Each error shown, with its one line and exit status 1.
#[test]
fn errors() {
    if !bpf_available("errors") {
        return;
    }
    for example in examples("errors") {
        // Only a kernel without kprobes has no way to see swap-ins.
        if example.command.contains(" swapin") && kprobes() {
            continue;
        }
        let out = output(command(&example, None, false), Duration::from_secs(30));
        assert_eq!(out.status.code(), Some(1), "`{}` exited {}", example.command, out.status);
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        compare("errors", &example, &stdout, &stderr, Shape::Exact, &[]);
    }
}

#[test]
fn probe() {
    if !bpf_available("probe") {
        return;
    }
    // The block is this project's machine: no kprobes, unwind tables. Elsewhere the same rows,
    // with other values.
    let shape = if kprobes() || !bpf_loop() { Shape::Keys } else { Shape::Numbers };
    let example = example("probe");
    let out = output(command(&example, None, false), Duration::from_secs(30));
    assert!(out.status.success(), "{}", out.status);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    compare("probe", &example, &stdout, &stderr, shape, &["kernel "]);
}

/// `probe --usdt` on Debian's python3.11: its probes, semaphores and arguments.
#[test]
fn probe_usdt() {
    if !Path::new("/usr/bin/python3.11").exists() {
        return not_run("probe_usdt", "no /usr/bin/python3.11 here");
    }
    let example = example("probe-usdt");
    let out = output(command(&example, None, false), Duration::from_secs(30));
    assert!(out.status.success(), "{}", out.status);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    compare("probe-usdt", &example, &stdout, &stderr, Shape::Exact, &[]);
}

/// mallocstat on a program that fires glibc's malloc probes from its own notes.
#[test]
fn mallocstat() {
    // Its stacks run into libc, which has no frame pointers: unwind tables (5.17+).
    if !unwind_tables("mallocstat") {
        return;
    }
    let example = example("mallocstat");
    let (stdout, stderr) = on_gated(&example, "mallocstat_probes", 0);
    compare("mallocstat", &example, &stdout, &stderr, Shape::Numbers, &[]);
}

/// A glibc double free: memtrace's report with its three stacks is out before the abort,
/// and memtrace exits with the command's status (134).
#[test]
fn memleak_errors() {
    // The stacks shown run through libc, which has no frame pointers: unwind tables (5.17+).
    if !unwind_tables("memleak_errors") {
        return;
    }
    prog("bad_free");
    let example = example("memleak-errors");
    let out = output(command(&example, None, false), Duration::from_secs(60));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(134), "{stderr}");
    compare("memleak-errors", &example, &stdout, &stderr, Shape::Numbers, &[]);
}

/// Writes past the end of blocks, caught by --watch at the writing line, where the machine has
/// hardware breakpoints (`tests/memleak_watch.rs` checks each kind exactly).
#[test]
fn memleak_watch() {
    // The stacks shown run through libc, which has no frame pointers: unwind tables (5.17+).
    if !unwind_tables("memleak_watch") {
        return;
    }
    if !watchable("memleak_watch") {
        return;
    }
    prog("watch_writes");
    let example = example("memleak-watch");
    let out = output(command(&example, None, false), Duration::from_secs(60));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    compare("memleak-watch", &example, &stdout, &stderr, Shape::Numbers, &[]);
}

#[test]
fn unwind_cpp() {
    if !unwind_tables("unwind_cpp") {
        return;
    }
    prog_nofp("unwind_cpp");
    let example = example("unwind-cpp");
    let out = output(command(&example, None, false), Duration::from_secs(60));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{}: {stderr}", out.status);
    // The VM images hold libstdc++ under its soname (libstdc++.so.6), not its file's name.
    compare("unwind-cpp", &example, &stdout, &stderr, Shape::Exact, &["libstdc++.so.6"]);
}

/// Runs `example` on tests/progs/`prog`, which waits for a line before it acts: memtrace
/// attaches by pid, the program acts once and exits, and memtrace with it. `rows` stdout lines
/// are awaited while the program lives (some tools read its /proc). Returns (stdout, stderr).
fn on_gated(example: &Example, prog: &str, rows: usize) -> (String, String) {
    let mut target = Gated::start(prog);
    let mut mt = Running::spawn(command(example, Some(target.pid()), true));
    mt.wait_ready();
    target.act_line();
    mt.wait_for(&format!("{rows} lines"), |out, _| out.len() >= rows);
    target.end();
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(30));
    assert!(status.success(), "{status}: {stderr}");
    (stdout, stderr)
}

#[test]
fn mmapsnoop() {
    if !bpf_available("mmapsnoop") {
        return;
    }
    let example = example("mmapsnoop");
    let (stdout, stderr) = on_gated(&example, "mmapsnoop_maps", 8);
    compare("mmapsnoop", &example, &stdout, &stderr, Shape::Numbers, &["/tmp/mmapsnoop_"]);
}

#[test]
fn shmsnoop() {
    if !bpf_available("shmsnoop") {
        return;
    }
    let example = example("shmsnoop");
    let (stdout, stderr) = on_gated(&example, "shmsnoop_shm", 6);
    compare("shmsnoop", &example, &stdout, &stderr, Shape::Numbers, &[]);
}

#[test]
fn faults() {
    // Its stacks go through libc, built without frame pointers.
    if !unwind_tables("faults") {
        return;
    }
    for example in examples("faults") {
        let (stdout, stderr) = on_gated(&example, "faults_touch", 0);
        compare("faults", &example, &stdout, &stderr, Shape::Numbers, &[]);
    }
}

/// The example crashes tests/progs/segv_crash.c through glibc's heap check (the way with the
/// most to show: the allocator's message, and a stack through libc to the program).
#[test]
fn segv() {
    // Its stack goes through libc, built without frame pointers.
    if !unwind_tables("segv") {
        return;
    }
    let example = example("segv");
    let mut victim = Ready::start(Command::new(prog("segv_crash")).arg("overrun").stderr(Stdio::null()));
    let mut mt = Running::spawn(command(&example, Some(victim.child.id()), true));
    mt.wait_ready();
    std::io::Write::write_all(&mut victim.stdin, b"\n").unwrap();
    victim.child.wait().unwrap();
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(30));
    assert!(status.success(), "{status}: {stderr}");
    // The VM suite's machines mount no cgroup2 hierarchy, where every process would be in "/".
    let stdout = stdout.replace(" cgroup -", " cgroup /");
    // Nor a merged /usr: libc is found at /lib there.
    let stderr = stderr.replace(" /lib/x86_64-linux-gnu/", " /usr/lib/x86_64-linux-gnu/");
    compare("segv", &example, &stdout, &stderr, Shape::Numbers, &[]);
}

#[test]
fn brkstack() {
    if !unwind_tables("brkstack") {
        return;
    }
    let example = example("brkstack");
    let (stdout, stderr) = on_gated(&example, "brkstack_grow", 0);
    compare("brkstack", &example, &stdout, &stderr, Shape::Exact, &[]);
}

/// Runs `example`, a system-wide tracer, while tests/progs/oomkill_hog is OOM-killed in a
/// 32 MiB memory cgroup, for at least `rows` stdout lines, then stops it with Ctrl-C.
/// Returns (stdout, stderr), or None where there is no memory cgroup controller.
fn during_an_oom_kill(test: &str, example: &Example, rows: usize) -> Option<(String, String)> {
    let group = memcg::Memcg::new(test, 32)?;
    let mut hog = group.spawn(&prog("oomkill_hog"), &["512"]);
    let mut mt = Running::spawn(command(example, None, true));
    mt.wait_ready();
    hog.go_until_oom_killed(Duration::from_secs(60));
    mt.wait_for(&format!("{rows} lines"), |out, _| out.len() >= rows);
    mt.signal(libc::SIGINT);
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(30));
    assert!(status.success(), "{status}: {stderr}");
    Some((stdout.replace(&group.path, "/demo"), stderr))
}

#[test]
fn oomkill() {
    if !bpf_available("oomkill") {
        return;
    }
    if kprobes() {
        not_run("oomkill", "the README's oomkill example is a kernel without kprobes (oom:mark_victim)");
        return;
    }
    let example = example("oomkill");
    let Some((stdout, stderr)) = during_an_oom_kill("readme-oomkill", &example, 2) else { return };
    compare("oomkill", &example, &stdout, &stderr, Shape::Numbers, &[]);
}

#[test]
fn vmscan() {
    if !bpf_available("vmscan") {
        return;
    }
    let example = example("vmscan");
    // The header and two rows at least.
    let Some((stdout, stderr)) = during_an_oom_kill("readme-vmscan", &example, 3) else { return };
    compare("vmscan", &example, &stdout, &stderr, Shape::Numbers, &[]);
}

#[test]
fn drsnoop() {
    if !bpf_available("drsnoop") {
        return;
    }
    let example = example("drsnoop");
    let Some((stdout, stderr)) = during_an_oom_kill("readme-drsnoop", &example, 3) else { return };
    compare("drsnoop", &example, &stdout, &stderr, Shape::Numbers, &[]);
}

/// Runs `example`, a system-wide tracer, while a shell writes /proc/sys/vm/compact_memory
/// with 16 MiB of this process in pieces for it to move, until `done` holds for its stdout,
/// then stops it with Ctrl-C a report's time later. Returns (stdout, stderr).
fn during_compact_memory(example: &Example, done: impl Fn(&[String]) -> bool) -> (String, String) {
    let pieces = compact::Pieces::new(16);
    let mut mt = Running::spawn(command(example, None, true));
    mt.wait_ready();
    compact::compact_memory();
    drop(pieces);
    mt.wait_for("the compaction's lines", |out, _| done(out));
    std::thread::sleep(Duration::from_millis(1200));
    mt.signal(libc::SIGINT);
    let (status, stdout, stderr) = mt.finish(Duration::from_secs(30));
    assert!(status.success(), "{status}: {stderr}");
    (stdout, stderr)
}

#[test]
fn compaction() {
    if !bpf_available("compaction") {
        return;
    }
    let example = example("compaction");
    let (stdout, stderr) = during_compact_memory(&example, |out| out.iter().any(|l| l.contains(" sh ")));
    // How a zone's compaction ends follows the machine (the README's shows "complete"); the
    // VM suite's machines mount no cgroup2 hierarchy, where every process would be in "/".
    let stdout: String = stdout
        .lines()
        .map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.len() != 10 || words[0] == "TIME" {
                return format!("{line}\n");
            }
            assert!(!words[8].starts_with("status"), "result not decoded: {line}");
            let cgroup = if words[9] == "-" { "/" } else { words[9] };
            format!("{} complete {cgroup}\n", words[..8].join(" "))
        })
        .collect();
    compare("compaction", &example, &stdout, &stderr, Shape::Numbers, &[]);
}

#[test]
fn migrate() {
    if !bpf_available("migrate") {
        return;
    }
    let example = example("migrate");
    let (stdout, stderr) = during_compact_memory(&example, |out| out.iter().any(|l| l.contains(" sh ")));
    compare("migrate", &example, &stdout, &stderr, Shape::Numbers, &[]);
}

/// The key names a paragraph of the README shows in backticks.
fn documented(name: &str) -> BTreeSet<String> {
    let text = marked_text(name).join(" ");
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .map(str::to_string)
        .collect()
}

/// Every key of `value`, at any depth, except inside the objects under `skip` keys.
fn keys(value: &Value, skip: &[&str], into: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                into.insert(k.clone());
                if !skip.contains(&k.as_str()) {
                    keys(v, skip, into);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| keys(v, skip, into)),
        _ => {}
    }
}

/// memleak's JSON, one line per report (`-a`) or per call (`-t`), of tests/progs/leaky.
fn memleak_json(extra: &str) -> Vec<Value> {
    let leaky = prog("leaky");
    let out = output(
        {
            let mut cmd = memtrace();
            cmd.args(["memleak", "--json", extra, "-c"]).arg(leaky);
            cmd
        },
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    json_lines(&String::from_utf8_lossy(&out.stdout))
}

/// Each key memleak's JSON has is named in the README, as are the frames', `dropped`'s and
/// `cut_stacks`'; stack ids are hex strings.
#[test]
fn json_frame() {
    if !bpf_available("json_frame") {
        return;
    }
    let reports = memleak_json("-a");
    let mut frame = BTreeSet::new();
    for stack in reports.iter().flat_map(|r| r["stacks"].as_array().unwrap()) {
        for f in stack["frames"].as_array().unwrap() {
            keys(f, &[], &mut frame);
        }
    }
    let missing: Vec<String> = frame.difference(&documented("json-frame")).cloned().collect();
    assert!(missing.is_empty(), "the README's frame lacks {missing:?}");
}

#[test]
fn json_memleak() {
    if !bpf_available("json_memleak") {
        return;
    }
    let mut all = BTreeSet::new();
    let reports = memleak_json("-a");
    for line in reports.iter().chain(&memleak_json("-t")) {
        keys(line, &["frames", "blind_spots"], &mut all);
    }
    let missing: Vec<String> = all.difference(&documented("json-memleak")).cloned().collect();
    assert!(missing.is_empty(), "the README's memleak JSON lacks {missing:?}");
    let last = reports.last().unwrap();
    for stack in last["stacks"].as_array().unwrap() {
        let id = &stack["stack_id"];
        assert!(id.is_null() || id.as_str().is_some_and(|s| s.starts_with("0x")), "stack_id {id}");
    }
}

#[test]
fn json_blind_spots() {
    if !bpf_available("json_blind_spots") {
        return;
    }
    let reports = memleak_json("-a");
    let mut all = BTreeSet::new();
    keys(&reports.last().unwrap()["blind_spots"], &[], &mut all);
    assert!(all.contains("cut_stacks"), "{all:?}");
    let missing: Vec<String> = all.difference(&documented("json-blind-spots")).cloned().collect();
    assert!(missing.is_empty(), "the README's blind spots lack {missing:?}");
}
