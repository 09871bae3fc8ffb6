//! Decoding syscall values for people: errno names (as x86-64 Linux numbers them) and
//! bit flags.

/// Names of errno values 1..=40, indexed by value - 1.
// Ten a row, so that a number's name is easy to find.
#[rustfmt::skip]
const LOW: [&str; 40] = [
    "EPERM", "ENOENT", "ESRCH", "EINTR", "EIO", "ENXIO", "E2BIG", "ENOEXEC", "EBADF", "ECHILD",
    "EAGAIN", "ENOMEM", "EACCES", "EFAULT", "ENOTBLK", "EBUSY", "EEXIST", "EXDEV", "ENODEV", "ENOTDIR",
    "EISDIR", "EINVAL", "ENFILE", "EMFILE", "ENOTTY", "ETXTBSY", "EFBIG", "ENOSPC", "ESPIPE", "EROFS",
    "EMLINK", "EPIPE", "EDOM", "ERANGE", "EDEADLK", "ENAMETOOLONG", "ENOLCK", "ENOSYS", "ENOTEMPTY", "ELOOP",
];

/// Rarer values that memory and IPC calls still return.
const HIGH: [(i64, &str); 5] =
    [(43, "EIDRM"), (75, "EOVERFLOW"), (95, "EOPNOTSUPP"), (110, "ETIMEDOUT"), (122, "EDQUOT")];

/// The errno a raw syscall return value carries (-4095..=-1), or None for a success.
pub fn errno_of(ret: i64) -> Option<i64> {
    (-4095..0).contains(&ret).then_some(-ret)
}

/// `ENOMEM` for 12; an errno without a name here is shown as its number.
pub fn errno_name(errno: i64) -> String {
    let known = usize::try_from(errno - 1).ok().and_then(|i| LOW.get(i).copied());
    known
        .or_else(|| HIGH.iter().find(|(n, _)| *n == errno).map(|(_, s)| *s))
        .map_or_else(|| errno.to_string(), str::to_string)
}

/// `A|B|0x40`: the names of the bits of `value` found in `names`, then any bits left over in hex;
/// `zero` when `value` is 0.
pub fn flag_names(value: u64, names: &[(u64, &str)], zero: &str) -> String {
    if value == 0 {
        return zero.to_string();
    }
    let mut parts: Vec<String> = Vec::new();
    let mut left = value;
    for &(bit, name) in names {
        if bit != 0 && value & bit == bit {
            parts.push(name.to_string());
            left &= !bit;
        }
    }
    if left != 0 {
        parts.push(format!("{left:#x}"));
    }
    parts.join("|")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_common_errors() {
        for (n, s) in [
            (1, "EPERM"),
            (9, "EBADF"),
            (11, "EAGAIN"),
            (12, "ENOMEM"),
            (13, "EACCES"),
            (17, "EEXIST"),
            (19, "ENODEV"),
            (22, "EINVAL"),
            (40, "ELOOP"),
            (43, "EIDRM"),
            (75, "EOVERFLOW"),
        ] {
            assert_eq!(errno_name(n), s);
        }
    }

    #[test]
    fn unknown_errors_are_numbers() {
        assert_eq!(errno_name(200), "200");
        assert_eq!(errno_name(0), "0");
    }

    #[test]
    fn flags_by_name_then_leftover_hex() {
        let names = [(1, "A"), (2, "B"), (8, "D")];
        assert_eq!(flag_names(0, &names, "NONE"), "NONE");
        assert_eq!(flag_names(3, &names, "NONE"), "A|B");
        assert_eq!(flag_names(0x49, &names, "NONE"), "A|D|0x40");
    }

    #[test]
    fn only_the_errno_range_is_an_error() {
        assert_eq!(errno_of(-9), Some(9));
        assert_eq!(errno_of(-4095), Some(4095));
        assert_eq!(errno_of(0), None);
        assert_eq!(errno_of(0x7f00_0000_0000), None);
        assert_eq!(errno_of(-4096), None);
    }
}
