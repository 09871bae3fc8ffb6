//! The libtest summary line, `test result: ok. 5 passed; 1 failed; ...`, read by xtask (the
//! host's tests) and by the VM's /init (xtask/vm-init, which includes this file).

/// (passed, failed) of a summary line; None for any other line.
pub fn counts(line: &str) -> Option<(u32, u32)> {
    let rest = line.strip_prefix("test result: ")?;
    let count = |what: &str| {
        rest.split(';').find_map(|part| {
            part.trim()
                .trim_start_matches("ok. ")
                .trim_start_matches("FAILED. ")
                .strip_suffix(what)
                .and_then(|n| n.trim().parse::<u32>().ok())
        })
    };
    Some((count(" passed").unwrap_or(0), count(" failed").unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_summary_lines() {
        let line = "test result: FAILED. 5 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.2s";
        assert_eq!(super::counts(line), Some((5, 1)));
        assert_eq!(super::counts("test result: ok. 23 passed; 0 failed; 0 ignored"), Some((23, 0)));
        assert_eq!(super::counts("test foo ... ok"), None);
    }
}
