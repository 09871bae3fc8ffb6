//! log2 histograms as bcc and bpftrace print them: one row per power-of-two bucket, with a
//! bar scaled to the fullest bucket.

use std::fmt::Write as _;

use serde::Serialize;

/// One bucket: values from `low` to `high` inclusive.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub struct Bucket {
    pub low: u64,
    pub high: u64,
    pub count: u64,
}

/// Slot `i` of a log2 histogram holds [2^i, 2^(i+1)); slot 0 also holds 0. Returns the
/// buckets from the first to the last non-empty one (none when all are empty).
pub fn log2_buckets(counts: &[u64]) -> Vec<Bucket> {
    let (Some(first), Some(last)) = (counts.iter().position(|&c| c > 0), counts.iter().rposition(|&c| c > 0)) else {
        return Vec::new();
    };
    (first..=last)
        .map(|i| Bucket {
            low: if i == 0 { 0 } else { 1u64 << i },
            high: (1u64 << (i + 1).min(63)) - 1,
            count: counts[i],
        })
        .collect()
}

const BAR: usize = 40;

/// The histogram as text, `unit` naming the values ("usecs"); "(no events)" when empty.
pub fn render_log2(counts: &[u64], unit: &str) -> String {
    let buckets = log2_buckets(counts);
    if buckets.is_empty() {
        return "    (no events)".to_string();
    }
    let max = buckets.iter().map(|b| b.count).max().unwrap_or(1).max(1);
    let mut out = format!("{:>24} : count     distribution", unit);
    for b in &buckets {
        let stars = ((b.count as u128 * BAR as u128).div_ceil(max as u128)) as usize;
        let range = format!("{} -> {}", b.low, b.high);
        let _ = write!(out, "\n{range:>24} : {:<9} |{:<BAR$}|", b.count, "*".repeat(stars));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_span_first_to_last_non_empty() {
        let mut counts = [0u64; 32];
        counts[2] = 3;
        counts[4] = 1;
        let b = log2_buckets(&counts);
        assert_eq!(b.len(), 3);
        assert_eq!(b[0], Bucket { low: 4, high: 7, count: 3 });
        assert_eq!(b[1], Bucket { low: 8, high: 15, count: 0 });
        assert_eq!(b[2], Bucket { low: 16, high: 31, count: 1 });
        assert!(log2_buckets(&[0; 8]).is_empty());
        assert_eq!(log2_buckets(&[5])[0], Bucket { low: 0, high: 1, count: 5 });
    }

    #[test]
    fn renders_bars_relative_to_the_fullest_bucket() {
        let text = render_log2(&[4, 2], "usecs");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].trim_start().starts_with("usecs : count"), "{text}");
        assert!(lines[1].contains("0 -> 1") && lines[1].contains(&format!("|{}|", "*".repeat(40))), "{text}");
        assert!(lines[2].contains("2 -> 3") && lines[2].contains(&format!("|{}{}|", "*".repeat(20), " ".repeat(20))));
        assert_eq!(render_log2(&[0, 0], "usecs"), "    (no events)");
    }
}
