//! /proc/vmstat: the kernel's own event counts, which tracers hold their figures against.

use anyhow::{Context as _, Result};
use serde::Serialize;

/// Pages migrate_pages moved and could not move, since boot. Event counts are summed over
/// CPUs when read, so they are exact.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug, Serialize)]
pub struct Migrations {
    pub success: u64,
    pub fail: u64,
}

pub fn migrations() -> Result<Migrations> {
    let text = std::fs::read_to_string("/proc/vmstat").context("cannot read /proc/vmstat")?;
    Ok(Migrations { success: value(&text, "pgmigrate_success"), fail: value(&text, "pgmigrate_fail") })
}

/// The count on `key`'s line; 0 when the kernel has none (built without CONFIG_MIGRATION).
fn value(text: &str, key: &str) -> u64 {
    text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::value;

    #[test]
    fn reads_a_count_by_its_whole_key() {
        let text = "pgmigrate_success_x 9\npgmigrate_success 120\npgmigrate_fail 3\n";
        assert_eq!(value(text, "pgmigrate_success"), 120);
        assert_eq!(value(text, "pgmigrate_fail"), 3);
        assert_eq!(value(text, "compact_stall"), 0);
    }
}
