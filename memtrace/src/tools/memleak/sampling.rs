//! Sampled recording (`-s N`, `--sample-bytes N`) and the estimates that undo it: each
//! recorded block stands for the blocks like it that were left out.

use anyhow::Result;
use aya::maps::{Array, MapData};
use memtrace_common::memleak::SAMPLE_TABLE_LEN;
use serde::Serialize;

/// How allocations are chosen for recording.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Sampling {
    All,
    /// `-s N`: one allocation in N, at random (as bcc's memleak -s).
    EveryNth(u32),
    /// `--sample-bytes N`: one sample on average every N bytes allocated (tcmalloc's and
    /// jemalloc's heap sampling).
    Bytes(u64),
}

/// The sampling parameters as JSON reports carry them.
#[derive(Serialize, Clone, Copy, Debug, PartialEq)]
#[serde(tag = "by", rename_all = "snake_case")]
pub(super) enum SamplingJson {
    /// `-s`: one allocation in `every`.
    Allocations { every: u32 },
    /// `--sample-bytes`: an allocation every `mean_bytes` bytes on average.
    Bytes { mean_bytes: u64 },
}

impl Sampling {
    pub(super) fn new(sample_rate: u32, sample_bytes: Option<u64>) -> Sampling {
        match (sample_bytes, sample_rate) {
            (Some(n), _) => Sampling::Bytes(n),
            (None, n) if n > 1 => Sampling::EveryNth(n),
            _ => Sampling::All,
        }
    }

    pub(super) fn is_sampled(self) -> bool {
        self != Sampling::All
    }

    /// How many allocations of `size` bytes one recorded block stands for.
    /// `--sample-bytes`: a block of s bytes is sampled with probability 1 - exp(-s/N) (an
    /// exponential countdown crosses zero inside it), so it stands for 1 / (1 - exp(-s/N))
    /// blocks, the unbiasing pprof and tcmalloc apply.
    pub(super) fn weight(self, size: u64) -> f64 {
        match self {
            Sampling::All => 1.0,
            Sampling::EveryNth(n) => f64::from(n),
            Sampling::Bytes(_) if size == 0 => 1.0,
            // -expm1(-x) is 1 - exp(-x) without the loss of precision for small x.
            Sampling::Bytes(n) => 1.0 / -(-(size as f64) / n as f64).exp_m1(),
        }
    }

    pub(super) fn json(self) -> Option<SamplingJson> {
        match self {
            Sampling::All => None,
            Sampling::EveryNth(every) => Some(SamplingJson::Allocations { every }),
            Sampling::Bytes(mean_bytes) => Some(SamplingJson::Bytes { mean_bytes }),
        }
    }

    /// What the estimates are estimated from, said once above a table, in a pprof's
    /// comments and beside folded stacks.
    pub(super) fn describe(self) -> Option<String> {
        match self {
            Sampling::All => None,
            Sampling::EveryNth(n) => Some(format!("estimated from 1 allocation in {n} sampled at random (-s {n})")),
            Sampling::Bytes(n) => Some(format!(
                "estimated from allocations sampled every {} on average (--sample-bytes {n})",
                crate::output::bytes(n)
            )),
        }
    }
}

/// The kernel side's table of intervals for a mean of `mean` bytes: slice i of the
/// exponential distribution holds the survival probabilities u in [i/L, (i+1)/L), and its
/// entry is the mean of -ln(u) over the slice, times `mean`:
/// L * [u - u ln u] from i/L to (i+1)/L. Each slice's own mean keeps the table's mean exactly
/// N (up to rounding to whole bytes, under one byte); a countdown drawn from it differs from an
/// exponential one only within a slice (at most 0.1% of probability near s = N) and in the
/// last slice's tail (intervals past 6.9 N all become 7.9 N, which changes the chance to
/// sample a block only for blocks past 6.9 N, already sampled 99.9% of the time).
pub(super) fn interval_table(mean: u64) -> Vec<u64> {
    let len = f64::from(SAMPLE_TABLE_LEN);
    let antiderivative = |u: f64| if u <= 0.0 { 0.0 } else { u - u * u.ln() };
    (0..SAMPLE_TABLE_LEN)
        .map(|i| {
            let (a, b) = (f64::from(i) / len, f64::from(i + 1) / len);
            let slice_mean = (antiderivative(b) - antiderivative(a)) * len;
            // At least 1: a zero interval would sample the next allocation whatever its size.
            (slice_mean * mean as f64).round().max(1.0) as u64
        })
        .collect()
}

/// Writes the table into the loaded object, before any probe is attached.
pub(super) fn fill<T: std::borrow::BorrowMut<MapData>>(map: &mut Array<T, u64>, mean: u64) -> Result<()> {
    for (i, v) in interval_table(mean).into_iter().enumerate() {
        map.set(i as u32, v, 0)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_keeps_the_mean() {
        let table = interval_table(65_536);
        let mean = table.iter().sum::<u64>() as f64 / table.len() as f64;
        assert!((mean - 65_536.0).abs() < 1.0, "{mean}");
        // Its chance of a countdown below N is the exponential's, 1 - 1/e.
        let below = table.iter().filter(|&&v| v < 65_536).count() as f64 / table.len() as f64;
        assert!((below - (1.0 - (-1.0f64).exp())).abs() < 2.0 / 1024.0, "{below}");
    }

    #[test]
    fn weights_undo_the_sampling() {
        assert_eq!(Sampling::All.weight(100), 1.0);
        assert_eq!(Sampling::EveryNth(10).weight(100), 10.0);
        let w = Sampling::Bytes(65_536).weight(65_536);
        assert!((w - 1.0 / (1.0 - (-1.0f64).exp())).abs() < 1e-12);
        // Small blocks: about N / s blocks each.
        assert!((Sampling::Bytes(65_536).weight(16) - 4096.5).abs() < 0.01);
        assert_eq!(Sampling::new(1, None), Sampling::All);
        assert_eq!(Sampling::new(1, Some(4096)), Sampling::Bytes(4096));
    }
}
