//! `/metrics`: what serve knows at a scrape, as Prometheus/OpenMetrics text through
//! prometheus-client. Values are read at the scrape (a `Collector`), not kept twice.
//!
//! Cardinality is bounded: series are per memory cgroup (at most `MAX_CGROUPS` tracked), per
//! (memory cgroup, victim comm) for OOM kills, and per chosen process for heaps; never per
//! address or stack.

use aya::maps::PerCpuValues;
use memtrace_common::serve::{
    CgroupStats, HIST_SLOTS, KIND_NAMES, KINDS, STAT_CGROUPS_FULL, STAT_KSWAPD_WAKEUPS, STAT_NO_CGROUP,
    STAT_STARTS_FULL,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::MetricType,
    registry::{Registry, Unit},
};

type Labels = Vec<(String, String)>;

#[derive(Debug, Clone)]
enum Value {
    Counter(u64),
    Gauge(i64),
    Histogram { sum: f64, count: u64, buckets: Vec<(f64, u64)> },
}

#[derive(Debug)]
struct Family {
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    kind: MetricType,
    series: Vec<(Labels, Value)>,
}

/// Every series of one scrape.
#[derive(Debug, Default)]
pub struct Snapshot {
    families: Vec<Family>,
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

impl Snapshot {
    fn add(&mut self, name: &'static str, help: &'static str, unit: Option<Unit>, labels: Labels, value: Value) {
        let kind = match value {
            Value::Counter(_) => MetricType::Counter,
            Value::Gauge(_) => MetricType::Gauge,
            Value::Histogram { .. } => MetricType::Histogram,
        };
        let at = match self.families.iter().position(|f| f.name == name) {
            Some(at) => at,
            None => {
                self.families.push(Family { name, help, unit, kind, series: Vec::new() });
                self.families.len() - 1
            }
        };
        self.families[at].series.push((labels, value));
    }

    /// One memory cgroup's counters.
    pub fn cgroup(&mut self, path: &str, row: &CgroupStats) {
        let base = with_container(labels(&[("memcg", path)]), path);
        let with = |extra: &[(&str, &str)]| -> Labels { base.iter().cloned().chain(labels(extra)).collect() };
        for (mode, n) in [("user", row.faults_user), ("kernel", row.faults_kernel)] {
            self.add(
                "memtrace_page_faults",
                "Page faults taken by the group's tasks.",
                None,
                with(&[("mode", mode)]),
                Value::Counter(n),
            );
        }
        self.add(
            "memtrace_swapins",
            "Pages or folios read from swap for the group's tasks.",
            None,
            base.clone(),
            Value::Counter(row.swapins),
        );
        for (kind, name) in KIND_NAMES.iter().enumerate() {
            if row.reclaims[kind] == 0 {
                // A group that never stalled in reclaim has no histogram: 15 series saved per group.
                continue;
            }
            // prometheus-client sums the buckets itself: each holds its own range's count.
            let mut in_range = 0;
            let mut buckets = Vec::new();
            for slot in 0..HIST_SLOTS as usize {
                in_range += row.hist[kind][slot];
                // Slot i holds [2^i, 2^(i+1)) microseconds. Every other bound (x4 steps, 4 us
                // to 16 s) keeps the series few; the counts at those bounds are exact.
                if slot % 2 == 1 && slot + 1 < HIST_SLOTS as usize {
                    buckets.push(((1u64 << (slot + 1)) as f64 / 1e6, std::mem::take(&mut in_range)));
                }
            }
            buckets.push((f64::INFINITY, in_range));
            self.add(
                "memtrace_reclaim_latency",
                "Time the group's tasks spent in direct reclaim (global memory short) or memcg reclaim (at the group's limit).",
                Some(Unit::Seconds),
                with(&[("kind", name)]),
                Value::Histogram { sum: row.reclaim_ns[kind] as f64 / 1e9, count: row.reclaims[kind], buckets },
            );
        }
    }

    /// serve's own counters: kswapd, and what its kernel side could not see.
    pub fn own(&mut self, stats: &[u64], swapins_missing: bool) {
        self.add(
            "memtrace_kswapd_wakeups",
            "Times kswapd was woken to reclaim.",
            None,
            Vec::new(),
            Value::Counter(stats[STAT_KSWAPD_WAKEUPS as usize]),
        );
        let spots = [
            ("cgroups_over_limit", stats[STAT_CGROUPS_FULL as usize]),
            ("reclaim_starts_lost", stats[STAT_STARTS_FULL as usize]),
            ("events_without_cgroup", stats[STAT_NO_CGROUP as usize]),
            ("swapins_not_traced", swapins_missing as u64),
        ];
        for (kind, n) in spots {
            self.blind_spot("serve", kind, n);
        }
    }

    fn blind_spot(&mut self, source: &str, kind: &str, n: u64) {
        self.add(
            "memtrace_blind_spots",
            "What memtrace could not see, by source and kind (0 when it saw everything).",
            None,
            labels(&[("source", source), ("kind", kind)]),
            Value::Gauge(n as i64),
        );
    }

    pub fn oom_kill(&mut self, memcg: &str, comm: &str, n: u64) {
        let l = with_container(labels(&[("memcg", memcg), ("comm", comm)]), memcg);
        self.add(
            "memtrace_oom_kills",
            "OOM kills, by the memory cgroup whose limit was hit (the victim's for a global OOM) and victim name.",
            None,
            l,
            Value::Counter(n),
        );
    }

    pub fn heap(&mut self, pid: u32, comm: &str, bytes: u64, growing: u64, live: bool, oom_killed: bool) {
        let pid = pid.to_string();
        let l = labels(&[("pid", &pid), ("comm", comm)]);
        self.add(
            "memtrace_heap_outstanding_bytes",
            "Bytes allocated and not freed by a chosen process, at its last report.",
            None,
            l.clone(),
            Value::Gauge(bytes as i64),
        );
        self.add(
            "memtrace_heap_growing_stacks",
            "Allocation stacks whose outstanding bytes kept growing over the last reports.",
            None,
            l.clone(),
            Value::Gauge(growing as i64),
        );
        self.add(
            "memtrace_heap_traced",
            "1 while the process is traced, 0 once it is gone (its last heap is kept).",
            None,
            l.clone(),
            Value::Gauge(live as i64),
        );
        self.add(
            "memtrace_heap_oom_killed",
            "1 when the process was killed by the OOM killer.",
            None,
            l,
            Value::Gauge(oom_killed as i64),
        );
    }

    pub fn heap_blind_spot(&mut self, pid: u32, comm: &str, kind: &str, n: u64) {
        self.blind_spot(&format!("memleak pid {pid} ({comm})"), kind, n);
    }

    pub fn events_lost(&mut self, source: &str, n: u64) {
        self.add(
            "memtrace_events_lost",
            "Events a tracer's ring buffer could not take.",
            None,
            labels(&[("source", source)]),
            Value::Counter(n),
        );
    }

    pub fn restarts(&mut self, source: &str, n: u64) {
        self.add(
            "memtrace_tracer_restarts",
            "Times a tracer serve runs had to be started again.",
            None,
            labels(&[("source", source)]),
            Value::Counter(n),
        );
    }

    /// The text exposition, as prometheus-client writes it.
    pub fn encode(self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        text
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.families {
            let mut metric = encoder.encode_descriptor(f.name, f.help, f.unit.as_ref(), f.kind)?;
            for (labels, value) in &f.series {
                let mut m = metric.encode_family(labels)?;
                match value {
                    Value::Counter(n) => m.encode_counter::<NoLabelSet, _, u64>(n, None)?,
                    Value::Gauge(n) => m.encode_gauge(n)?,
                    Value::Histogram { sum, count, buckets } => {
                        m.encode_histogram::<NoLabelSet>(*sum, *count, buckets, None)?
                    }
                }
            }
        }
        Ok(())
    }
}

/// A row's per-CPU copies, summed.
pub fn sum_cpus(per_cpu: &PerCpuValues<CgroupStats>) -> CgroupStats {
    let mut sum = CgroupStats::ZERO;
    for v in per_cpu.iter() {
        sum.faults_user += v.faults_user;
        sum.faults_kernel += v.faults_kernel;
        sum.swapins += v.swapins;
        for k in 0..KINDS as usize {
            sum.reclaim_ns[k] += v.reclaim_ns[k];
            sum.reclaims[k] += v.reclaims[k];
            for s in 0..HIST_SLOTS as usize {
                sum.hist[k][s] += v.hist[k][s];
            }
        }
    }
    sum
}

/// A group's labels, with its container's id (and pod) where its path names one, as every
/// tool's records carry them (`kernel::container`).
fn with_container(mut labels: Labels, path: &str) -> Labels {
    if let Some(c) = crate::kernel::cgroup::container_id(path) {
        labels.push(("container".into(), c.id));
        if let Some(pod) = c.pod {
            labels.push(("pod".into(), pod));
        }
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_and_counters_encode_as_prometheus_reads_them() {
        let mut row = CgroupStats::ZERO;
        row.faults_user = 7;
        row.hist[1][3] = 2; // two memcg reclaims of 8-16 us
        row.reclaims[1] = 2;
        row.reclaim_ns[1] = 20_000;
        let mut snap = Snapshot::default();
        snap.cgroup("/small", &row);
        snap.oom_kill("/small", "hog", 1);
        let text = snap.encode();
        assert!(text.contains("memtrace_page_faults_total{memcg=\"/small\",mode=\"user\"} 7"), "{text}");
        assert!(text.contains("memtrace_oom_kills_total{memcg=\"/small\",comm=\"hog\"} 1"), "{text}");
        assert!(
            text.contains("memtrace_reclaim_latency_seconds_bucket{le=\"0.000004\",memcg=\"/small\",kind=\"memcg\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("memtrace_reclaim_latency_seconds_bucket{le=\"0.000016\",memcg=\"/small\",kind=\"memcg\"} 2"),
            "{text}"
        );
        // No reclaim of the direct kind: no histogram for it.
        assert!(!text.contains("kind=\"direct\""), "{text}");
        assert!(text.contains("memtrace_reclaim_latency_seconds_count{memcg=\"/small\",kind=\"memcg\"} 2"), "{text}");
        assert!(text.contains("le=\"0.000064\",memcg=\"/small\",kind=\"memcg\"} 2"), "{text}");
        assert!(text.contains("le=\"+Inf\",memcg=\"/small\",kind=\"memcg\"} 2"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
