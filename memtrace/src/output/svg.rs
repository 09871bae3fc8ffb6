//! `--svg`: a flame graph of a report's stacks, drawn by inferno from the same folded lines
//! as `--folded` (process first, then each function, inlined ones included), so the two never
//! disagree. A frame's width is its share of the report's value (bytes, faults, calls).

use std::{io::Write, path::Path};

use anyhow::{Context as _, Result};
use inferno::flamegraph::{self, Options, color};

use crate::symbolize::Frame;

/// What a flame graph shows.
pub struct Chart<'a> {
    /// The tool and what the widths measure, e.g. "memleak: outstanding bytes".
    pub title: &'a str,
    /// The unit of a frame's value in its tooltip, e.g. "bytes" or "faults".
    pub unit: &'a str,
}

/// Writes the flame graph of `stacks` (root, frames innermost first, value) to `path`.
pub fn write<'a>(
    path: &Path,
    chart: &Chart<'_>,
    stacks: impl Iterator<Item = (String, &'a [Frame], u64)>,
) -> Result<()> {
    let write = || -> Result<()> {
        let file = std::fs::File::create(path)?;
        write_to(std::io::BufWriter::new(file), chart, stacks)
    };
    write().with_context(|| format!("cannot write {}", path.display()))
}

/// `write` into any writer.
pub fn write_to<'a>(
    mut out: impl Write,
    chart: &Chart<'_>,
    stacks: impl Iterator<Item = (String, &'a [Frame], u64)>,
) -> Result<()> {
    let lines: Vec<String> = stacks
        .filter(|(_, _, value)| *value > 0)
        .map(|(root, frames, value)| super::folded(&root, frames, value))
        .collect();
    if lines.is_empty() {
        // inferno draws an error for an empty graph; an empty report is no error.
        write_empty(&mut out, chart)?;
        return Ok(out.flush()?);
    }
    let mut options = Options::default();
    options.title = chart.title.to_string();
    options.count_name = chart.unit.to_string();
    // Memory flame graphs are drawn in greens and blues; colours follow the names, not chance,
    // so two runs of the same program look alike.
    options.colors = color::Palette::Basic(color::BasicPalette::Mem);
    options.hash = true;
    flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), &mut out)?;
    Ok(out.flush()?)
}

/// An SVG that says there was nothing to draw.
fn write_empty(out: &mut impl Write, chart: &Chart<'_>) -> std::io::Result<()> {
    let escape = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    write!(
        out,
        concat!(
            r#"<?xml version="1.0" standalone="no"?>"#,
            r#"<svg version="1.1" width="1200" height="60" xmlns="http://www.w3.org/2000/svg">"#,
            r#"<text x="600" y="24" text-anchor="middle" font-family="Verdana" font-size="17">{title}</text>"#,
            r#"<text x="600" y="48" text-anchor="middle" font-family="Verdana" font-size="12">no stacks: nothing to draw</text>"#,
            "</svg>\n"
        ),
        title = escape(chart.title)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(name: &str) -> Frame {
        Frame { func: Some(name.into()), unnamed: None, ..Frame::unknown(0x10) }
    }

    fn svg(stacks: &[(&str, Vec<Frame>, u64)]) -> String {
        let mut out = Vec::new();
        let chart = Chart { title: "memleak: outstanding bytes", unit: "bytes" };
        write_to(&mut out, &chart, stacks.iter().map(|(r, f, v)| (r.to_string(), f.as_slice(), *v))).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn frames_are_titled_with_their_values_in_the_unit() {
        let text = svg(&[
            ("app (7)", vec![frame("leak_a"), frame("main")], 3000),
            ("app (7)", vec![frame("leak_b"), frame("main")], 1000),
            ("app (7)", vec![frame("freed"), frame("main")], 0),
        ]);
        assert!(text.contains("memleak: outstanding bytes"), "{text}");
        for title in [
            "<title>leak_a (3,000 bytes, 75.00%)</title>",
            "<title>leak_b (1,000 bytes, 25.00%)</title>",
            "<title>main (4,000 bytes, 100.00%)</title>",
            "<title>app (7) (4,000 bytes, 100.00%)</title>",
        ] {
            assert!(text.contains(title), "{title}: {text}");
        }
        assert!(!text.contains("freed"), "a stack of no value is drawn: {text}");
    }

    #[test]
    fn an_empty_report_is_a_graph_that_says_so() {
        let text = svg(&[]);
        assert!(text.contains(">memleak: outstanding bytes</text>") && text.contains("no stacks"), "{text}");
    }
}
