//! The printer of tools that print one record per event (mmapsnoop, shmsnoop, drsnoop,
//! oomkill). Tools hand it typed records; it owns what is the same in all of them: the table's
//! header above the first row, the TIME(s) (`--timestamp`, kernel clock) and TIME (wall clock)
//! columns in front of each row, one JSON object per line, and the final line.

use anyhow::Result;
use serde::Serialize;
use serde_json::{Map, Value, json};

pub struct Events {
    json: bool,
    /// The kernel-clock start of the trace.
    start_ns: u64,
    /// Rows get a TIME(s) column.
    timestamp: bool,
    /// The tool's columns, without TIME(s) and TIME.
    header: String,
    headed: bool,
    /// Records printed so far.
    pub count: u64,
}

impl Events {
    pub fn new(json: bool, timestamp: bool, header: impl Into<String>) -> Events {
        let start_ns = crate::sys::monotonic_ns();
        Events { json, start_ns, timestamp, header: header.into(), headed: false, count: 0 }
    }

    /// Seconds from the start of the trace to `ts_ns` (kernel clock).
    pub fn secs(&self, ts_ns: u64) -> f64 {
        ts_ns.saturating_sub(self.start_ns) as f64 / 1e9
    }

    /// One record: `value()` as a JSON line, or `row()` (the tool's columns) as a table row;
    /// only the one printed is built. `ts_ns` is the event's kernel-clock time.
    pub fn record<T: Serialize>(
        &mut self,
        ts_ns: u64,
        value: impl FnOnce() -> T,
        row: impl FnOnce() -> String,
    ) -> Result<()> {
        self.count += 1;
        if self.json {
            return super::json_line(&value());
        }
        if !self.headed {
            self.headed = true;
            let secs = if self.timestamp { format!("{:<11} ", "TIME(s)") } else { String::new() };
            super::line(&format!("{secs}{:<8} {}", "TIME", self.header))?;
        }
        let secs = if self.timestamp { format!("{:<11.6} ", self.secs(ts_ns)) } else { String::new() };
        super::line(&format!("{secs}{} {}", super::hms(), row()))
    }

    /// The last line in JSON: `{"final": true, "events": N, "events_lost": L}` plus `extra`'s
    /// fields. Tables end without one (lost events go to stderr, from the run loop).
    pub fn finish(&mut self, lost: u64, extra: Value) -> Result<()> {
        if !self.json {
            return Ok(());
        }
        let mut fields = Map::new();
        fields.insert("events".into(), json!(self.count));
        if let Value::Object(more) = extra {
            fields.extend(more);
        }
        super::final_line(lost, Value::Object(fields))
    }
}
