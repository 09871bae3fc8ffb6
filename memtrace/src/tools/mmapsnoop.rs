//! mmapsnoop: every mmap, munmap and mremap, with its result, its protection and flags
//! decoded, and the file behind a file mapping. Anonymous mappings are shown too.

use std::fs;

use anyhow::Result;
use memtrace_common::mmapsnoop::{CALL_MMAP, CALL_MREMAP, CALL_MUNMAP, Event};
use serde_json::{Value, json};

use crate::{
    kernel::{AttachPoint, Probe, cgroup::Attribution},
    output::{
        self,
        decode::{errno_name, errno_of, flag_names},
        hex::hex,
    },
    procfs,
    tools::{
        self,
        registry::{Plan, ToolSpec},
        syscalls::{self, SnoopArgs, Syscall},
    },
};

const OBJECT: crate::kernel::Object = crate::ebpf_object!("mmapsnoop");

pub const SPEC: ToolSpec = ToolSpec {
    names: memtrace_common::syscalls::names::ALL,
    name: "mmapsnoop",
    object: OBJECT,
    modes: &[("mmapsnoop", Plan::Points(ATTACH))],
    optional: &[],
};

pub type Args = SnoopArgs;

/// How mmapsnoop attaches, in order of preference (also listed by `memtrace probe`).
pub const ATTACH: &[AttachPoint] = &[AttachPoint {
    label: "tracepoints syscalls:sys_{enter,exit}_{mmap,munmap,mremap}",
    probes: &[
        Probe::Tracepoint { prog: "mmapsnoop_mmap_enter", category: "syscalls", names: &["sys_enter_mmap"] },
        Probe::Tracepoint { prog: "mmapsnoop_mmap_exit", category: "syscalls", names: &["sys_exit_mmap"] },
        Probe::Tracepoint { prog: "mmapsnoop_munmap_enter", category: "syscalls", names: &["sys_enter_munmap"] },
        Probe::Tracepoint { prog: "mmapsnoop_munmap_exit", category: "syscalls", names: &["sys_exit_munmap"] },
        Probe::Tracepoint { prog: "mmapsnoop_mremap_enter", category: "syscalls", names: &["sys_enter_mremap"] },
        Probe::Tracepoint { prog: "mmapsnoop_mremap_exit", category: "syscalls", names: &["sys_exit_mremap"] },
    ],
}];

const CALLS: &[Syscall] = &[
    Syscall { call: CALL_MMAP, name: "mmap", args: &["addr", "len", "prot", "flags", "fd", "off"] },
    Syscall { call: CALL_MUNMAP, name: "munmap", args: &["addr", "len"] },
    Syscall { call: CALL_MREMAP, name: "mremap", args: &["addr", "old_len", "new_len", "flags", "new_addr"] },
];

pub async fn run(args: Args) -> Result<()> {
    let what =
        if args.failed { "tracing failed mmap, munmap and mremap calls" } else { "tracing mmap, munmap and mremap" };
    syscalls::run(&SPEC, ATTACH, CALLS, &args, header(), what, |out, e, cgroup| {
        let call = Call::of(e);
        let path = call.file_path(e.pid, e.ret);
        out.record(e.ts_ns, || to_json(e, &call, &path, cgroup), || row(e, &call, &path, cgroup))
    })
    .await
}

fn header() -> String {
    format!(
        "{:<7} {:<16} {:<6} {:>14} {:>14} {:>10} {:<20} {:<40} {:>4} {:<14} PATH",
        "PID", "COMM", "CALL", "RET", "ADDR", "LEN", "PROT", "FLAGS", "FD", "CGROUP"
    )
}

/// The table's columns after TIME.
fn row(e: &Event, call: &Call, path: &FilePath, cgroup: &Attribution) -> String {
    let ret = match errno_of(e.ret) {
        Some(n) => errno_name(n),
        None if e.call == CALL_MUNMAP => e.ret.to_string(),
        None => format!("{:#x}", e.ret),
    };
    let (len, prot, flags, fd) = match *call {
        Call::Mmap { len, prot, flags, fd, .. } => {
            let fd = if is_file(flags, fd) { fd.to_string() } else { "-".into() };
            (len.to_string(), prot_str(prot), map_flags_str(flags), fd)
        }
        Call::Munmap { len, .. } => (len.to_string(), "-".into(), "-".into(), "-".into()),
        Call::Mremap { old_len, new_len, flags, .. } => {
            (format!("{old_len}->{new_len}"), "-".into(), mremap_flags_str(flags), "-".into())
        }
    };
    let path = match path {
        FilePath::NotFile => "-".into(),
        FilePath::Known { path, .. } => path.clone(),
        FilePath::Unknown => "[unknown]".into(),
    };
    format!(
        "{:<7} {:<16} {:<6} {:>14} {:>14} {:>10} {:<20} {:<40} {:>4} {:<14} {path}",
        e.pid,
        tools::c_str(&e.comm),
        call.name(),
        ret,
        format!("{:#x}", call.addr()),
        len,
        prot,
        flags,
        fd,
        cgroup.short()
    )
}

/// One event's arguments, by call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Mmap { hint: u64, len: u64, prot: u64, flags: u64, fd: i32, off: u64 },
    Munmap { addr: u64, len: u64 },
    Mremap { addr: u64, old_len: u64, new_len: u64, flags: u64, new_addr: u64 },
}

impl Call {
    fn of(e: &Event) -> Call {
        let a = e.args;
        match e.call {
            CALL_MUNMAP => Call::Munmap { addr: a[0], len: a[1] },
            CALL_MREMAP => Call::Mremap { addr: a[0], old_len: a[1], new_len: a[2], flags: a[3], new_addr: a[4] },
            // The fd argument is an int passed in a 64-bit register: -1 arrives as 0xffff_ffff.
            _ => Call::Mmap { hint: a[0], len: a[1], prot: a[2], flags: a[3], fd: a[4] as u32 as i32, off: a[5] },
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Call::Mmap { .. } => "mmap",
            Call::Munmap { .. } => "munmap",
            Call::Mremap { .. } => "mremap",
        }
    }

    /// The address the ADDR column shows: mmap's hint, the address unmapped or remapped.
    fn addr(&self) -> u64 {
        match *self {
            Call::Mmap { hint, .. } => hint,
            Call::Munmap { addr, .. } | Call::Mremap { addr, .. } => addr,
        }
    }

    /// The file behind an mmap of a file. The eBPF side cannot follow the fd to a path without
    /// BTF offsets into struct file, so /proc answers here: the fd first (programs usually
    /// still hold it), then the mapping at the returned address (the fd may be closed by now).
    /// Both can change after the call; when neither answers the path is unknown, not guessed.
    fn file_path(&self, pid: u32, ret: i64) -> FilePath {
        let Call::Mmap { flags, fd, .. } = *self else { return FilePath::NotFile };
        if !is_file(flags, fd) {
            return FilePath::NotFile;
        }
        if let Ok(path) = fs::read_link(format!("/proc/{pid}/fd/{fd}")) {
            return FilePath::Known { path: path.to_string_lossy().into_owned(), source: "fd" };
        }
        if errno_of(ret).is_none()
            && let Ok(maps) = procfs::mappings(pid)
            && let Some(path) = file_at(&maps, ret as u64)
        {
            return FilePath::Known { path, source: "maps" };
        }
        FilePath::Unknown
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum FilePath {
    /// Anonymous, or not an mmap.
    NotFile,
    Known {
        path: String,
        source: &'static str,
    },
    Unknown,
}

fn to_json(e: &Event, call: &Call, path: &FilePath, cgroup: &Attribution) -> Value {
    let error = errno_of(e.ret).map(errno_name);
    let mut v = json!({
        "time": output::now_ms(),
        "ts_ns": e.ts_ns,
        "pid": e.pid,
        "tid": e.tid,
        "comm": tools::c_str(&e.comm),
        "call": call.name(),
        "ret": e.ret,
        "error": error,
    });
    // The address the call produced: mmap's and mremap's result; munmap's argument.
    let result = (errno_of(e.ret).is_none()).then_some(hex(e.ret as u64));
    let fields = match *call {
        Call::Mmap { hint, len, prot, flags, fd, off } => {
            let (path, source) = match path {
                FilePath::NotFile => (None, None),
                FilePath::Known { path, source } => (Some(path.as_str()), Some(*source)),
                FilePath::Unknown => (None, Some("unknown")),
            };
            json!({
                "addr": result, "hint": hex(hint), "len": len,
                "prot": hex(prot), "prot_str": prot_str(prot),
                "flags": hex(flags), "flags_str": map_flags_str(flags),
                "fd": fd, "offset": off, "path": path, "path_source": source,
            })
        }
        Call::Munmap { addr, len } => json!({ "addr": hex(addr), "len": len }),
        Call::Mremap { addr, old_len, new_len, flags, new_addr } => json!({
            "addr": result, "old_addr": hex(addr), "old_len": old_len, "new_len": new_len,
            "flags": hex(flags), "flags_str": mremap_flags_str(flags), "new_addr_arg": hex(new_addr),
        }),
    };
    if let (Some(obj), Value::Object(extra)) = (v.as_object_mut(), fields) {
        obj.extend(extra);
    }
    output::add_fields(&mut v, cgroup);
    v
}

const MAP_ANONYMOUS: u64 = 0x20;
const MAP_HUGETLB: u64 = 0x40000;
const MAP_HUGE_SHIFT: u64 = 26;
const MAP_HUGE_MASK: u64 = 0x3f;

/// An mmap backed by a file: not anonymous and given a real fd.
fn is_file(flags: u64, fd: i32) -> bool {
    flags & MAP_ANONYMOUS == 0 && fd >= 0
}

/// `PROT_READ|PROT_WRITE`; `PROT_NONE` for 0 (x86-64 values).
pub fn prot_str(prot: u64) -> String {
    const NAMES: &[(u64, &str)] = &[
        (0x1, "PROT_READ"),
        (0x2, "PROT_WRITE"),
        (0x4, "PROT_EXEC"),
        (0x8, "PROT_SEM"),
        (0x0100_0000, "PROT_GROWSDOWN"),
        (0x0200_0000, "PROT_GROWSUP"),
    ];
    flag_names(prot, NAMES, "PROT_NONE")
}

/// `MAP_PRIVATE|MAP_ANONYMOUS`: the mapping type, then the flags (x86-64 values).
pub fn map_flags_str(flags: u64) -> String {
    const TYPES: &[(u64, &str)] =
        &[(0x1, "MAP_SHARED"), (0x2, "MAP_PRIVATE"), (0x3, "MAP_SHARED_VALIDATE"), (0x8, "MAP_DROPPABLE")];
    const NAMES: &[(u64, &str)] = &[
        (0x10, "MAP_FIXED"),
        (0x20, "MAP_ANONYMOUS"),
        (0x40, "MAP_32BIT"),
        (0x100, "MAP_GROWSDOWN"),
        (0x800, "MAP_DENYWRITE"),
        (0x1000, "MAP_EXECUTABLE"),
        (0x2000, "MAP_LOCKED"),
        (0x4000, "MAP_NORESERVE"),
        (0x8000, "MAP_POPULATE"),
        (0x10000, "MAP_NONBLOCK"),
        (0x20000, "MAP_STACK"),
        (0x40000, "MAP_HUGETLB"),
        (0x80000, "MAP_SYNC"),
        (0x10_0000, "MAP_FIXED_NOREPLACE"),
    ];
    let mut parts = Vec::new();
    let kind = flags & 0xf;
    match TYPES.iter().find(|(v, _)| *v == kind) {
        Some((_, name)) => parts.push(name.to_string()),
        None if kind != 0 => parts.push(format!("{kind:#x}")),
        None => {}
    }
    let mut rest = flags & !0xf;
    // With MAP_HUGETLB, bits 26-31 are log2 of the page size; without, bit 26 is MAP_UNINITIALIZED.
    let huge = (rest >> MAP_HUGE_SHIFT) & MAP_HUGE_MASK;
    let mut huge_name = None;
    if flags & MAP_HUGETLB != 0 && huge != 0 {
        huge_name = Some(match huge {
            21 => "MAP_HUGE_2MB".to_string(),
            30 => "MAP_HUGE_1GB".to_string(),
            n => format!("MAP_HUGE_2^{n}"),
        });
        rest &= !(MAP_HUGE_MASK << MAP_HUGE_SHIFT);
    } else if rest & (1 << MAP_HUGE_SHIFT) != 0 {
        huge_name = Some("MAP_UNINITIALIZED".to_string());
        rest &= !(1 << MAP_HUGE_SHIFT);
    }
    if rest != 0 {
        parts.push(flag_names(rest, NAMES, ""));
    }
    parts.extend(huge_name);
    if parts.is_empty() { "0".into() } else { parts.join("|") }
}

/// `MREMAP_MAYMOVE|MREMAP_FIXED`; `0` for none.
pub fn mremap_flags_str(flags: u64) -> String {
    const NAMES: &[(u64, &str)] = &[(0x1, "MREMAP_MAYMOVE"), (0x2, "MREMAP_FIXED"), (0x4, "MREMAP_DONTUNMAP")];
    flag_names(flags, NAMES, "0")
}

/// The file mapped at `addr`, as maps names it. Anonymous mappings have no path, or a kernel
/// name such as [heap]: not a file.
fn file_at(maps: &[procfs::Mapping], addr: u64) -> Option<String> {
    procfs::holding(maps, addr).filter(|m| m.is_file()).map(procfs::Mapping::shown_path)
}

#[cfg(test)]
mod tests {
    use memtrace_common::mmapsnoop::CALL_MMAP;

    use super::*;

    #[test]
    fn prot_names() {
        assert_eq!(prot_str(0), "PROT_NONE");
        assert_eq!(prot_str(3), "PROT_READ|PROT_WRITE");
        assert_eq!(prot_str(5), "PROT_READ|PROT_EXEC");
        assert_eq!(prot_str(0x0100_0001), "PROT_READ|PROT_GROWSDOWN");
        assert_eq!(prot_str(0x11), "PROT_READ|0x10");
    }

    #[test]
    fn map_flag_names() {
        assert_eq!(map_flags_str(0x22), "MAP_PRIVATE|MAP_ANONYMOUS");
        assert_eq!(map_flags_str(0x01), "MAP_SHARED");
        assert_eq!(map_flags_str(0x03), "MAP_SHARED_VALIDATE");
        assert_eq!(map_flags_str(0x812), "MAP_PRIVATE|MAP_FIXED|MAP_DENYWRITE");
        assert_eq!(map_flags_str(0x2_0122), "MAP_PRIVATE|MAP_ANONYMOUS|MAP_GROWSDOWN|MAP_STACK");
        assert_eq!(map_flags_str(0x10_0022), "MAP_PRIVATE|MAP_ANONYMOUS|MAP_FIXED_NOREPLACE");
        assert_eq!(map_flags_str(0x8001), "MAP_SHARED|MAP_POPULATE");
        assert_eq!(map_flags_str(0), "0");
    }

    #[test]
    fn huge_page_sizes_and_uninitialized_share_bits() {
        assert_eq!(map_flags_str(0x4_0022 | (21 << 26)), "MAP_PRIVATE|MAP_ANONYMOUS|MAP_HUGETLB|MAP_HUGE_2MB");
        assert_eq!(map_flags_str(0x4_0022 | (30 << 26)), "MAP_PRIVATE|MAP_ANONYMOUS|MAP_HUGETLB|MAP_HUGE_1GB");
        assert_eq!(map_flags_str(0x22 | (1 << 26)), "MAP_PRIVATE|MAP_ANONYMOUS|MAP_UNINITIALIZED");
        assert_eq!(map_flags_str(0x22 | (1 << 40)), "MAP_PRIVATE|MAP_ANONYMOUS|0x10000000000");
        assert_eq!(map_flags_str(0x5), "0x5");
    }

    #[test]
    fn mremap_flag_names() {
        assert_eq!(mremap_flags_str(0), "0");
        assert_eq!(mremap_flags_str(1), "MREMAP_MAYMOVE");
        assert_eq!(mremap_flags_str(3), "MREMAP_MAYMOVE|MREMAP_FIXED");
        assert_eq!(mremap_flags_str(5), "MREMAP_MAYMOVE|MREMAP_DONTUNMAP");
    }

    #[test]
    fn the_fd_is_an_int() {
        let mut e = Event { call: CALL_MMAP, ..Default::default() };
        e.args = [0, 4096, 3, 0x22, 0xffff_ffff, 0];
        assert!(matches!(Call::of(&e), Call::Mmap { fd: -1, .. }));
        e.args[4] = u64::MAX;
        assert!(matches!(Call::of(&e), Call::Mmap { fd: -1, .. }));
        assert!(!is_file(0x22, 3));
        assert!(!is_file(0x01, -1));
        assert!(is_file(0x01, 3));
    }

    const MAPS: &str = "\
55d0c0a00000-55d0c0a21000 rw-p 00000000 00:00 0                          [heap]
7f1200000000-7f1200003000 rw-s 00000000 fd:01 1234                       /tmp/with space (deleted)
7f1200003000-7f1200004000 rw-p 00000000 00:00 0 
7f1200004000-7f1200006000 r--p 00002000 fd:01 99                         /usr/lib/libc.so.6
";

    #[test]
    fn mapping_paths_from_maps() {
        let maps = procfs::parse_maps(MAPS);
        let mapping_path = |_: &str, addr| file_at(&maps, addr);
        assert_eq!(mapping_path(MAPS, 0x7f12_0000_1000).as_deref(), Some("/tmp/with space (deleted)"));
        assert_eq!(mapping_path(MAPS, 0x7f12_0000_4000).as_deref(), Some("/usr/lib/libc.so.6"));
        assert_eq!(mapping_path(MAPS, 0x7f12_0000_6000), None, "end is exclusive");
        assert_eq!(mapping_path(MAPS, 0x7f12_0000_3000), None, "anonymous");
        assert_eq!(mapping_path(MAPS, 0x55d0_c0a0_0000), None, "[heap] is not a file");
    }
}
