//! USDT probes (`<sys/sdt.h>`): how to read each argument of a probe, decoded by user space
//! from the file's `.note.stapsdt` and looked up by the eBPF side under the probe's address.

use crate::user_pod;

/// Most arguments `<sys/sdt.h>` lets a probe have.
pub const MAX_ARGS: usize = 12;

// `names::USDT_SPECS` is the hash map from a probe's address in the traced process to its
// `Spec`: the kernel passes no per-probe value to a uprobe program before 5.15 (attach
// cookies), so the program finds its probe by the instruction pointer.

/// The argument is a constant (`-4@$5`): `value`.
pub const ARG_CONST: u32 = 1;
/// The argument is in a register (`8@%rdi`, `-4@%eax`): the register's saved value.
pub const ARG_REG: u32 = 2;
/// The argument is in memory at a register plus `value` (`8@-16(%rbp)`).
pub const ARG_DEREF: u32 = 3;

/// One argument: where it is, its size in bytes and whether it is signed.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Arg {
    /// The constant, or the displacement added to the register for `ARG_DEREF`.
    pub value: i64,
    /// `ARG_CONST`, `ARG_REG` or `ARG_DEREF`.
    pub kind: u32,
    /// Byte offset of the register in the kernel's `struct pt_regs` (x86-64).
    pub reg_offset: u32,
    /// 1, 2, 4 or 8.
    pub size: u32,
    /// Non-zero: sign-extend from `size` bytes.
    pub signed: u32,
}

/// Every argument of one probe.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Spec {
    pub args: [Arg; MAX_ARGS],
    /// How many of `args` the probe has.
    pub count: u32,
    /// The caller's own number for the probe (its index in user space's list).
    pub id: u32,
}

user_pod!(Arg, Spec);

/// Arguments of a hit that are also read as strings (the first ones of 8 bytes): USDT
/// arguments carry no types, and providers pass names as `char *`.
pub const STRING_ARGS: usize = 4;
/// Bytes read of each string, NUL included.
pub const STRING_BYTES: usize = 64;

/// One hit of a traced probe (`memtrace probe --usdt FILE --trace`).
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct Hit {
    pub pid: u32,
    pub tid: u32,
    /// `Spec::id` of the probe.
    pub id: u32,
    /// How many of `args` the probe has.
    pub count: u32,
    /// Each argument, sign- or zero-extended from its size.
    pub args: [i64; MAX_ARGS],
    /// Bytes read into `strings[i]` from the address in `args[i]`, NUL included; 0: none.
    pub string_len: [u32; STRING_ARGS],
    pub strings: [[u8; STRING_BYTES]; STRING_ARGS],
}

user_pod!(Hit);
