//! `--pprof` read back by the real pprof (`go tool pprof`, Debian's golang-go): memleak's
//! profile of leaky names each leaking function at its file:line with its exact bytes and
//! blocks; bad paths are one-line errors before anything is attached.

#[path = "common/mod.rs"]
mod common;
#[path = "common/gopprof.rs"]
mod gopprof;

use std::{io::Write as _, path::Path, process::Command, time::Duration};

use common::*;
use gopprof::{go_pprof, pprof_tool, row_of, top_rows};

#[test]
fn memleak_pprof_of_leaky_reads_back_in_go_pprof_exactly() {
    if !bpf_available("memleak_pprof_of_leaky_reads_back_in_go_pprof_exactly")
        || !pprof_tool("memleak_pprof_of_leaky_reads_back_in_go_pprof_exactly")
    {
        return;
    }
    let file = std::env::temp_dir().join(format!("memleak-pprof-{}.pb.gz", std::process::id()));
    let leaky = prog("leaky");
    let args = ["memleak", "--json", "-T", "100", "--pprof", file.to_str().unwrap(), "-c", leaky.to_str().unwrap()];
    let out = run(&args, Duration::from_secs(60));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report = final_report(&String::from_utf8_lossy(&out.stdout));
    assert_leaks(&report, "leaky.c", LEAKY_C, "no_leak");
    assert_detached("memleak");

    let space = go_pprof(&["-top", "-lines", "-nodecount=1000", "-sample_index=inuse_space", "-unit=B"], &file);
    let objects = go_pprof(&["-top", "-lines", "-nodecount=1000", "-sample_index=inuse_objects"], &file);
    let raw = go_pprof(&["-raw"], &file);
    std::fs::remove_file(&file).unwrap();
    let (space, objects) = (top_rows(&space), top_rows(&objects));
    // Each leak function is its stack's innermost frame: its own (flat) bytes and blocks.
    for &(func, bytes, blocks) in LEAKY_C {
        assert_eq!(row_of(&space, func, "leaky.c").flat, format!("{bytes}B"), "{func}: bytes");
        assert_eq!(row_of(&objects, func, "leaky.c").flat, blocks.to_string(), "{func}: blocks");
    }
    assert!(!space.iter().any(|r| r.func == "no_leak"), "freed memory in the profile: {space:#?}");
    // The executable's mapping, with its build id, for a server to symbolize again.
    let mapping = format!(" {} {} [FN][FL][LN][IN]", leaky.canonicalize().unwrap().display(), elf_build_id(&leaky));
    assert!(raw.lines().skip_while(|l| *l != "Mappings").any(|l| l.ends_with(&mapping)), "{mapping}: {raw}");
}

#[test]
fn brkstack_pprof_reads_back_in_go_pprof_exactly() {
    if !unwind_tables("brkstack_pprof_reads_back_in_go_pprof_exactly")
        || !pprof_tool("brkstack_pprof_reads_back_in_go_pprof_exactly")
    {
        return;
    }
    // tests/progs/brkstack_grow.c: sbrk(4096) this many times from grow_heap.
    const GROWS: u64 = 5;
    let file = std::env::temp_dir().join(format!("brkstack-pprof-{}.pb.gz", std::process::id()));
    let Ready { mut child, mut stdin, mut lines } = Ready::start(&mut Command::new(prog("brkstack_grow")));
    let pid = child.id().to_string();
    let mut mt = Running::start(&["brkstack", "-p", &pid, "--pprof", file.to_str().unwrap()]);
    mt.wait_ready();
    writeln!(stdin).unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "grown");
    drop(stdin);
    assert!(child.wait().unwrap().success());
    let (status, _, stderr) = mt.finish(Duration::from_secs(20));
    assert!(status.success(), "{status}: {stderr}");
    assert_detached("brkstack");

    let calls = top_rows(&go_pprof(&["-top", "-lines", "-sample_index=calls"], &file));
    let growth = top_rows(&go_pprof(&["-top", "-lines", "-sample_index=growth", "-unit=B"], &file));
    std::fs::remove_file(&file).unwrap();
    // grow_heap calls sbrk in libc: its calls and growth are cumulative.
    assert_eq!(row_of(&calls, "grow_heap", "brkstack_grow.c").cum, GROWS.to_string(), "{calls:#?}");
    assert_eq!(row_of(&growth, "grow_heap", "brkstack_grow.c").cum, format!("{}B", GROWS * 4096), "{growth:#?}");
}

/// The GNU build id of an ELF file in hex, as `readelf -n` prints it.
fn elf_build_id(path: &Path) -> String {
    let out = Command::new("readelf").arg("-n").arg(path).output().expect("readelf (binutils) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find_map(|l| l.trim().strip_prefix("Build ID: ")).unwrap_or_else(|| panic!("{text}"));
    line.trim().to_string()
}

#[test]
fn pprof_paths_that_cannot_be_written_are_one_line_errors() {
    let leaky = prog("leaky");
    for (args, said) in [
        (
            vec!["memleak", "--pprof", "/nonexistent/p.pb.gz", "-c", leaky.to_str().unwrap()],
            "memtrace: error: --pprof /nonexistent/p.pb.gz: directory /nonexistent does not exist",
        ),
        (vec!["brkstack", "--pprof", "/tmp"], "memtrace: error: --pprof /tmp is a directory: give a file path"),
    ] {
        let out = run(&args, Duration::from_secs(20));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end(), said, "{args:?}");
    }
    // The C library names the error: glibc's words on the host, musl's in the VM's static build.
    assert_exact_error_of(
        &["faults", "--pprof", "/proc/version"],
        &[
            "--pprof /proc/version: cannot write /proc/version: Input/output error (os error 5); give a path memtrace can write",
            "--pprof /proc/version: cannot write /proc/version: I/O error (os error 5); give a path memtrace can write",
        ],
    );
    assert_detached("memleak");
}

#[test]
fn faults_pprof_reads_back_in_go_pprof_as_the_report_counts() {
    if !bpf_available("faults_pprof_reads_back_in_go_pprof_as_the_report_counts")
        || !pprof_tool("faults_pprof_reads_back_in_go_pprof_as_the_report_counts")
    {
        return;
    }
    let file = std::env::temp_dir().join(format!("faults-pprof-{}.pb.gz", std::process::id()));
    let (_, faults) = faults_of_touch_pages(&["--pprof", file.to_str().unwrap()]);

    let rows = top_rows(&go_pprof(&["-top", "-lines", "-sample_index=faults"], &file));
    std::fs::remove_file(&file).unwrap();
    // The faulting write is the stack's first frame: touch_pages's own faults, the report's count.
    assert_eq!(row_of(&rows, "touch_pages", "faults_touch.c").flat, faults.to_string(), "{rows:#?}");
}
