//! The real notes of Debian's python3.11 and libstdc++ against binutils' reading of them.

use std::{path::Path, process::Command};

use super::*;

const PYTHON: &str = "/usr/bin/python3.11";
const LIBSTDCXX: &str = "/usr/lib/x86_64-linux-gnu/libstdc++.so.6";

/// (provider:name, address, semaphore, arguments) of each probe as `readelf -n` prints them,
/// sorted as `probes` sorts.
fn readelf(path: &str) -> Vec<(String, u64, u64, String)> {
    let out = Command::new("readelf").args(["-nW", path]).output().expect("readelf (binutils) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut found = Vec::new();
    let (mut provider, mut name, mut address, mut semaphore) = (String::new(), String::new(), 0, 0);
    let hex = |s: &str| u64::from_str_radix(s.trim().trim_end_matches(',').trim_start_matches("0x"), 16).unwrap();
    for line in text.lines().map(str::trim) {
        // With -W the provider ends the note's header line, after a tab.
        if let Some((_, p)) = line.split_once("Provider: ") {
            provider = p.to_string();
        } else if let Some(n) = line.strip_prefix("Name: ") {
            name = n.to_string();
        } else if let Some(rest) = line.strip_prefix("Location: ") {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            (address, semaphore) = (hex(fields[0]), hex(fields[4]));
        } else if let Some(args) = line.strip_prefix("Arguments:") {
            found.push((format!("{provider}:{name}"), address, semaphore, args.trim().to_string()));
        }
    }
    found.sort();
    found
}

fn ours(path: &str) -> Vec<(String, u64, u64, String)> {
    probes(Path::new(path))
        .unwrap()
        .iter()
        .map(|p| (p.full_name(), p.address, p.semaphore, p.args_text.clone()))
        .collect()
}

fn probe(path: &str, name: &str) -> UsdtProbe {
    probes(Path::new(path)).unwrap().into_iter().find(|p| p.full_name() == name).unwrap()
}

fn types(p: &UsdtProbe) -> Vec<String> {
    p.args.as_ref().unwrap().iter().map(ArgSpec::type_name).collect()
}

#[test]
fn reads_python_notes_as_binutils_does() {
    let expected = readelf(PYTHON);
    assert!(expected.len() >= 8, "python3.11 has its probes: {expected:?}");
    assert_eq!(ours(PYTHON), expected);
    let entry = probe(PYTHON, "python:function__entry");
    assert_ne!(entry.semaphore, 0, "python's probes have semaphores");
    assert_ne!(entry.semaphore_offset, 0);
    assert_eq!(entry.args_text, "8@%rbp 8@%r12 -4@%eax");
    assert_eq!(types(&entry), ["u64", "u64", "s32"]);
    // Every argument python3.11 passes can be read (gc__start's is on the stack: -4@112(%rsp)).
    for p in probes(Path::new(PYTHON)).unwrap() {
        assert!(p.args.is_ok(), "{}: {:?}", p.full_name(), p.args);
    }
}

#[test]
fn reads_libstdcxx_notes_as_binutils_does() {
    let expected = readelf(LIBSTDCXX);
    assert_eq!(
        expected.iter().map(|p| p.0.as_str()).collect::<Vec<_>>(),
        ["libstdcxx:catch", "libstdcxx:rethrow", "libstdcxx:throw"]
    );
    assert_eq!(ours(LIBSTDCXX), expected);
    let throw = probe(LIBSTDCXX, "libstdcxx:throw");
    assert_eq!((throw.semaphore, throw.semaphore_offset), (0, 0));
    assert_eq!(types(&throw), ["u64", "u64"]);
    let catch = probe(LIBSTDCXX, "libstdcxx:catch");
    assert_eq!(catch.args.as_ref().unwrap()[1].arg.kind, memtrace_common::usdt::ARG_DEREF);
    // A shared library links at 0: its file offsets and addresses agree in the first segment.
    assert!(throw.file_offset <= throw.address);
}

#[test]
fn a_file_without_notes_has_no_probes() {
    // Debian's libc is built without <sys/sdt.h> probes.
    let libc = Path::new("/usr/lib/x86_64-linux-gnu/libc.so.6");
    if readelf(libc.to_str().unwrap()).is_empty() {
        assert!(probes(libc).unwrap().is_empty());
    }
    assert!(probes(Path::new("/etc/passwd")).unwrap_err().to_string().contains("not a 64-bit ELF file"));
}
