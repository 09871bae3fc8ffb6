//! The printer of tools that print reports (memleak, brkstack, faults, swapin, hfaults, vmscan).
//! Tools hand it a report's typed value and its table text; it owns what is the same in all of
//! them: JSON or table, the report's time, the `--timestamp` line before a table, the final
//! JSON line, and the blind-spots line on stderr.
//!
//! A *titled* report is whole by itself (memleak, brkstack, faults): its table opens with
//! `[TIME]`, its JSON carries that time, its own `final` flag and its blind spots, and the final
//! report is the run's last line. An *interval* report (swapin, hfaults, vmscan) holds one
//! interval's counts; the run ends with a line of its own (`finish`).

use anyhow::Result;
use serde::Serialize;
use serde_json::Value;

pub struct ReportPrinter {
    tool: &'static str,
    json: bool,
    /// `--timestamp`: the time of day on a line before each interval table.
    timestamp: bool,
}

impl ReportPrinter {
    pub fn new(tool: &'static str, json: bool) -> ReportPrinter {
        ReportPrinter { tool, json, timestamp: false }
    }

    pub fn with_timestamp(self, timestamp: bool) -> ReportPrinter {
        ReportPrinter { timestamp, ..self }
    }

    /// A titled report: `value(time)` (time to the second) as one JSON line, or `[TIME] ` and
    /// `table(&value)`. The value comes back: the final one also feeds `--folded`.
    pub fn titled<T: Serialize>(&self, value: impl FnOnce(String) -> T, table: impl FnOnce(&T) -> String) -> Result<T> {
        let time = super::now();
        let value = value(time.clone());
        if self.json {
            super::json_line(&value)?;
        } else {
            super::line(&format!("[{time}] {}", table(&value)))?;
        }
        Ok(value)
    }

    /// An interval report: `value(time)` (time to the millisecond) as one JSON line, or
    /// `table()`'s lines; only the one printed is built.
    pub fn interval<T: Serialize>(
        &self,
        value: impl FnOnce(String) -> T,
        table: impl FnOnce() -> String,
    ) -> Result<()> {
        if self.json {
            return super::json_line(&value(super::now_ms()));
        }
        if self.timestamp {
            super::line(&super::hms())?;
        }
        super::line(&table())
    }

    /// The end of a run of interval reports. In JSON one line, `{"final": true, "events_lost":
    /// L}` plus `extra()`'s fields; in a table, `table()`'s text when it has some (vmscan's
    /// histograms), then `blind_spots()` (`output::blind_spots`) on stderr after the tool's name.
    pub fn finish(
        &self,
        lost: u64,
        extra: impl FnOnce() -> Value,
        table: impl FnOnce() -> Option<String>,
        blind_spots: impl FnOnce() -> Option<String>,
    ) -> Result<()> {
        if self.json {
            return super::final_line(lost, extra());
        }
        if let Some(text) = table() {
            super::line(&text)?;
        }
        if let Some(spots) = blind_spots() {
            eprintln!("memtrace: {}: {spots}", self.tool);
        }
        Ok(())
    }
}
