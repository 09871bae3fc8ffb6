//! What the compaction and migrate tests provoke: compaction asked for through
//! /proc/sys/vm/compact_memory by a process whose pid is known, memory left in pieces for it
//! to move, and the kernel's own counts to hold the tools' figures against.
#![allow(dead_code, reason = "each test file uses a different part of this module")]

use std::process::{Command, Stdio};

const PAGE: usize = 4096;

/// Writes /proc/sys/vm/compact_memory from a shell of its own (`echo` is built in, so the
/// shell itself writes); returns its pid once it has exited.
pub fn compact_memory() -> u32 {
    let mut child = Command::new("sh")
        .args(["-c", "echo 1 > /proc/sys/vm/compact_memory"])
        .stdin(Stdio::null())
        .spawn()
        .expect("sh");
    let pid = child.id();
    let status = child.wait().unwrap();
    assert!(status.success(), "writing /proc/sys/vm/compact_memory: {status}");
    pid
}

/// The zones compaction of a whole node goes through, in order: (node, zone) of each zone
/// with pages, from /proc/zoneinfo.
pub fn populated_zones() -> Vec<(i64, String)> {
    let text = std::fs::read_to_string("/proc/zoneinfo").unwrap();
    let mut zones = Vec::new();
    let mut current = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Node ") {
            let (node, zone) = rest.split_once(", zone").unwrap();
            current = Some((node.trim().parse().unwrap(), zone.trim().to_string()));
        } else if let Some(present) = line.trim().strip_prefix("present")
            && present.trim().parse::<u64>().unwrap() > 0
            && let Some(zone) = current.take()
        {
            zones.push(zone);
        }
    }
    zones
}

/// A count of /proc/vmstat.
pub fn vmstat(key: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/vmstat").unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/vmstat"))
}

/// Anonymous memory of this process with every other page given back: pieces that
/// compaction moves. Unmapped when dropped.
pub struct Pieces {
    addr: *mut libc::c_void,
    len: usize,
}

impl Pieces {
    pub fn new(mib: usize) -> Pieces {
        let len = mib << 20;
        // SAFETY: a fresh anonymous mapping, written and released only here.
        unsafe {
            let addr = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(addr, libc::MAP_FAILED, "mmap {mib} MiB");
            // Base pages only: a huge page would not leave holes.
            libc::madvise(addr, len, libc::MADV_NOHUGEPAGE);
            for off in (0..len).step_by(PAGE) {
                *addr.cast::<u8>().add(off) = 1;
            }
            for off in (0..len).step_by(2 * PAGE) {
                assert_eq!(libc::madvise(addr.cast::<u8>().add(off).cast(), PAGE, libc::MADV_DONTNEED), 0);
            }
            Pieces { addr, len }
        }
    }
}

impl Drop for Pieces {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// The order of an x86-64 huge page (2 MiB), which direct compaction for one is for.
pub const HUGE_ORDER: i64 = 9;

/// Runs tests/progs/compact_frag: free memory in pieces, then huge pages asked for by the
/// program itself; returns its pid.
pub fn huge_pages_in_pieces() -> u32 {
    let child = Command::new(super::prog("compact_frag")).arg("50").stdout(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.starts_with("done"), "compact_frag: {} {text}", out.status);
    eprintln!("compact_frag: {}", text.trim());
    pid
}
