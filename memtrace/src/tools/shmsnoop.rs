//! shmsnoop: System V shared memory calls (shmget, shmat, shmdt, shmctl) with their results
//! and arguments decoded.

use anyhow::Result;
use memtrace_common::shmsnoop::{CALL_SHMAT, CALL_SHMCTL, CALL_SHMDT, CALL_SHMGET, Event};
use serde_json::{Value, json};

use crate::{
    kernel::{AttachPoint, Probe, cgroup::Attribution},
    output::{
        self,
        decode::{errno_name, errno_of, flag_names},
        hex::hex,
    },
    tools::{
        self,
        registry::{Plan, ToolSpec},
        syscalls::{self, SnoopArgs, Syscall},
    },
};

const OBJECT: crate::kernel::Object = crate::ebpf_object!("shmsnoop");

pub const SPEC: ToolSpec = ToolSpec {
    names: memtrace_common::syscalls::names::ALL,
    name: "shmsnoop",
    object: OBJECT,
    modes: &[("shmsnoop", Plan::Points(ATTACH))],
    optional: &[],
};

pub type Args = SnoopArgs;

const fn tp(prog: &'static str, names: &'static [&'static str]) -> Probe {
    Probe::Tracepoint { prog, category: "syscalls", names }
}

/// How shmsnoop attaches, in order of preference (also listed by `memtrace probe`).
pub const ATTACH: &[AttachPoint] = &[AttachPoint {
    label: "tracepoints syscalls:sys_{enter,exit}_{shmget,shmat,shmdt,shmctl}",
    probes: &[
        tp("shmsnoop_shmget_enter", &["sys_enter_shmget"]),
        tp("shmsnoop_shmget_exit", &["sys_exit_shmget"]),
        tp("shmsnoop_shmat_enter", &["sys_enter_shmat"]),
        tp("shmsnoop_shmat_exit", &["sys_exit_shmat"]),
        tp("shmsnoop_shmdt_enter", &["sys_enter_shmdt"]),
        tp("shmsnoop_shmdt_exit", &["sys_exit_shmdt"]),
        tp("shmsnoop_shmctl_enter", &["sys_enter_shmctl"]),
        tp("shmsnoop_shmctl_exit", &["sys_exit_shmctl"]),
    ],
}];

const CALLS: &[Syscall] = &[
    Syscall { call: CALL_SHMGET, name: "shmget", args: &["key", "size", "shmflg"] },
    Syscall { call: CALL_SHMAT, name: "shmat", args: &["shmid", "shmaddr", "shmflg"] },
    Syscall { call: CALL_SHMDT, name: "shmdt", args: &["shmaddr"] },
    Syscall { call: CALL_SHMCTL, name: "shmctl", args: &["shmid", "cmd", "buf"] },
];

pub async fn run(args: Args) -> Result<()> {
    let header = format!("{:<7} {:<16} {:<7} {:>14} {:<14} ARGS", "PID", "COMM", "SYSCALL", "RET", "CGROUP");
    let what = if args.failed { "tracing failed shm* calls" } else { "tracing shmget, shmat, shmdt and shmctl" };
    syscalls::run(&SPEC, ATTACH, CALLS, &args, header, what, |out, e, cgroup| {
        let call = Call::of(e);
        out.record(
            e.ts_ns,
            || to_json(e, &call, cgroup),
            || {
                let ret = match errno_of(e.ret) {
                    Some(n) => errno_name(n),
                    None if matches!(call, Call::Shmat { .. }) => format!("{:#x}", e.ret),
                    None => e.ret.to_string(),
                };
                let (comm, name, args) = (tools::c_str(&e.comm), call.name(), call.args());
                format!("{:<7} {comm:<16} {name:<7} {ret:>14} {:<14} {args}", e.pid, cgroup.short())
            },
        )
    })
    .await
}

/// One event's arguments, by call. Int arguments arrive in 64-bit registers: only their
/// low 32 bits count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Shmget { key: u32, size: u64, shmflg: u32 },
    Shmat { shmid: i32, shmaddr: u64, shmflg: u32 },
    Shmdt { shmaddr: u64 },
    Shmctl { shmid: i32, cmd: u32, buf: u64 },
}

impl Call {
    fn of(e: &Event) -> Call {
        let a = e.args;
        match e.call {
            CALL_SHMAT => Call::Shmat { shmid: a[0] as u32 as i32, shmaddr: a[1], shmflg: a[2] as u32 },
            CALL_SHMDT => Call::Shmdt { shmaddr: a[0] },
            CALL_SHMCTL => Call::Shmctl { shmid: a[0] as u32 as i32, cmd: a[1] as u32, buf: a[2] },
            _ => Call::Shmget { key: a[0] as u32, size: a[1], shmflg: a[2] as u32 },
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Call::Shmget { .. } => "shmget",
            Call::Shmat { .. } => "shmat",
            Call::Shmdt { .. } => "shmdt",
            Call::Shmctl { .. } => "shmctl",
        }
    }

    /// The ARGS column, as bcc's shmsnoop writes it.
    fn args(&self) -> String {
        match *self {
            Call::Shmget { key, size, shmflg } => {
                format!("key: {key:#x}, size: {size}, shmflg: {}", shmget_flags_str(shmflg))
            }
            Call::Shmat { shmid, shmaddr, shmflg } => {
                format!("shmid: {shmid}, shmaddr: {shmaddr:#x}, shmflg: {}", shmat_flags_str(shmflg))
            }
            Call::Shmdt { shmaddr } => format!("shmaddr: {shmaddr:#x}"),
            Call::Shmctl { shmid, cmd, buf } => format!("shmid: {shmid}, cmd: {}, buf: {buf:#x}", shmctl_cmd_str(cmd)),
        }
    }
}

fn to_json(e: &Event, call: &Call, cgroup: &Attribution) -> Value {
    let ok = errno_of(e.ret).is_none();
    let mut v = json!({
        "time": output::now_ms(),
        "ts_ns": e.ts_ns,
        "pid": e.pid,
        "tid": e.tid,
        "comm": tools::c_str(&e.comm),
        "call": call.name(),
        "ret": e.ret,
        "error": errno_of(e.ret).map(errno_name),
    });
    let fields = match *call {
        Call::Shmget { key, size, shmflg } => json!({
            "key": key, "key_str": format!("{key:#x}"), "size": size,
            "shmflg": hex(shmflg), "shmflg_str": shmget_flags_str(shmflg),
            "shmid": ok.then_some(e.ret),
        }),
        Call::Shmat { shmid, shmaddr, shmflg } => json!({
            "shmid": shmid, "shmaddr": hex(shmaddr), "shmflg": hex(shmflg), "shmflg_str": shmat_flags_str(shmflg),
            "addr": ok.then(|| hex(e.ret as u64)),
        }),
        Call::Shmdt { shmaddr } => json!({ "shmaddr": hex(shmaddr) }),
        Call::Shmctl { shmid, cmd, buf } => json!({
            "shmid": shmid, "cmd": cmd, "cmd_str": shmctl_cmd_str(cmd), "buf": hex(buf),
        }),
    };
    if let (Some(obj), Value::Object(extra)) = (v.as_object_mut(), fields) {
        obj.extend(extra);
    }
    output::add_fields(&mut v, cgroup);
    v
}

const SHM_HUGETLB: u32 = 0o4000;
const SHM_HUGE_SHIFT: u32 = 26;
const SHM_HUGE_MASK: u32 = 0x3f;

/// shmget's flags: `IPC_CREAT|IPC_EXCL|0600`, the permission bits always last, in octal.
pub fn shmget_flags_str(flags: u32) -> String {
    const NAMES: &[(u64, &str)] =
        &[(0o1000, "IPC_CREAT"), (0o2000, "IPC_EXCL"), (0o4000, "SHM_HUGETLB"), (0o10000, "SHM_NORESERVE")];
    let mut rest = flags & !0o777;
    let mut huge = None;
    // With SHM_HUGETLB, bits 26-31 are log2 of the page size.
    let size = (rest >> SHM_HUGE_SHIFT) & SHM_HUGE_MASK;
    if flags & SHM_HUGETLB != 0 && size != 0 {
        huge = Some(match size {
            21 => "SHM_HUGE_2MB".to_string(),
            30 => "SHM_HUGE_1GB".to_string(),
            n => format!("SHM_HUGE_2^{n}"),
        });
        rest &= !(SHM_HUGE_MASK << SHM_HUGE_SHIFT);
    }
    let mut parts = Vec::new();
    if rest != 0 {
        parts.push(flag_names(rest.into(), NAMES, ""));
    }
    parts.extend(huge);
    parts.push(format!("0{:03o}", flags & 0o777));
    parts.join("|")
}

/// shmat's flags: `SHM_RDONLY|SHM_RND`; `0` for none.
pub fn shmat_flags_str(flags: u32) -> String {
    const NAMES: &[(u64, &str)] =
        &[(0o10000, "SHM_RDONLY"), (0o20000, "SHM_RND"), (0o40000, "SHM_REMAP"), (0o100000, "SHM_EXEC")];
    flag_names(flags.into(), NAMES, "0")
}

/// shmctl's command: `IPC_RMID`, `SHM_LOCK`, ...; `|IPC_64` when the new-layout bit is set;
/// an unknown command as its number.
pub fn shmctl_cmd_str(cmd: u32) -> String {
    const IPC_64: u32 = 0x100;
    let name = match cmd & !IPC_64 {
        0 => "IPC_RMID".to_string(),
        1 => "IPC_SET".to_string(),
        2 => "IPC_STAT".to_string(),
        3 => "IPC_INFO".to_string(),
        11 => "SHM_LOCK".to_string(),
        12 => "SHM_UNLOCK".to_string(),
        13 => "SHM_STAT".to_string(),
        14 => "SHM_INFO".to_string(),
        15 => "SHM_STAT_ANY".to_string(),
        _ => return cmd.to_string(),
    };
    if cmd & IPC_64 != 0 { format!("{name}|IPC_64") } else { name }
}

#[cfg(test)]
mod tests {
    use memtrace_common::shmsnoop::CALL_SHMGET;

    use super::*;

    #[test]
    fn shmget_flags() {
        assert_eq!(shmget_flags_str(0o1600), "IPC_CREAT|0600");
        assert_eq!(shmget_flags_str(0o3600), "IPC_CREAT|IPC_EXCL|0600");
        assert_eq!(shmget_flags_str(0o1666), "IPC_CREAT|0666");
        assert_eq!(shmget_flags_str(0o666), "0666");
        assert_eq!(shmget_flags_str(0), "0000");
        assert_eq!(shmget_flags_str(0o15600 | (21 << 26)), "IPC_CREAT|SHM_HUGETLB|SHM_NORESERVE|SHM_HUGE_2MB|0600");
        assert_eq!(shmget_flags_str(0o1600 | 0o100000), "IPC_CREAT|0x8000|0600");
    }

    #[test]
    fn shmat_flags() {
        assert_eq!(shmat_flags_str(0), "0");
        assert_eq!(shmat_flags_str(0o10000), "SHM_RDONLY");
        assert_eq!(shmat_flags_str(0o30000), "SHM_RDONLY|SHM_RND");
        assert_eq!(shmat_flags_str(0o140000), "SHM_REMAP|SHM_EXEC");
    }

    #[test]
    fn shmctl_commands() {
        assert_eq!(shmctl_cmd_str(0), "IPC_RMID");
        assert_eq!(shmctl_cmd_str(2), "IPC_STAT");
        assert_eq!(shmctl_cmd_str(0x102), "IPC_STAT|IPC_64");
        assert_eq!(shmctl_cmd_str(11), "SHM_LOCK");
        assert_eq!(shmctl_cmd_str(15), "SHM_STAT_ANY");
        assert_eq!(shmctl_cmd_str(99), "99");
    }

    #[test]
    fn int_arguments_use_their_low_half() {
        let e = Event { call: CALL_SHMGET, args: [0xffff_ffff_8000_0001, 4096, 0o1600, 0, 0, 0], ..Default::default() };
        assert_eq!(Call::of(&e), Call::Shmget { key: 0x8000_0001, size: 4096, shmflg: 0o1600 });
        let e = Event { call: CALL_SHMCTL, args: [7, 0, 0, 0, 0, 0], ..Default::default() };
        assert_eq!(Call::of(&e).args(), "shmid: 7, cmd: IPC_RMID, buf: 0x0");
        let e = Event { call: CALL_SHMGET, args: [0x4d54_0001, 12288, 0o1600, 0, 0, 0], ..Default::default() };
        assert_eq!(Call::of(&e).args(), "key: 0x4d540001, size: 12288, shmflg: IPC_CREAT|0600");
    }
}
