//! `--svg`, read back as XML: memleak's flame graph of leaky has a frame per leaking function
//! titled with its exact bytes and as wide as its share of the report's total; faults' graph
//! counts touch_pages's faults as the report does; bad paths are one-line errors before
//! anything is attached.

#[path = "common/mod.rs"]
mod common;

use std::{path::Path, time::Duration};

use common::*;

/// One frame of an inferno flame graph: a `<g>` holding a `<title>` and a `<rect>`.
#[derive(Debug)]
struct Frame {
    name: String,
    /// The value in its title (`name (3,000 bytes, 8.61%)`), and the unit after it.
    value: u64,
    unit: String,
    /// The rect's width in percent of the graph, and its `fg:w` (the value inferno drew).
    width: f64,
    drawn: u64,
}

/// The graph's title and its frames.
fn read_svg(path: &Path) -> (String, Vec<Frame>) {
    let text = std::fs::read_to_string(path).unwrap();
    // inferno's SVG starts with the SVG 1.1 doctype.
    let options = roxmltree::ParsingOptions { allow_dtd: true, ..Default::default() };
    let doc = roxmltree::Document::parse_with_options(&text, options)
        .unwrap_or_else(|e| panic!("{}: not XML: {e}", path.display()));
    let title = doc
        .descendants()
        .find(|n| n.attribute("id") == Some("title"))
        .and_then(|n| n.text())
        .unwrap_or_else(|| panic!("no title: {text}"))
        .to_string();
    let frames = doc
        .descendants()
        .filter(|n| n.has_tag_name("g"))
        .filter_map(|g| {
            let title = g.children().find(|c| c.has_tag_name("title"))?.text()?;
            let rect = g.children().find(|c| c.has_tag_name("rect"))?;
            // "name (1,234 unit, 5.67%)"; a name may hold parentheses itself ("app (42)").
            let (name, rest) = title.rsplit_once(" (")?;
            let (value, rest) = rest.split_once(' ')?;
            let unit = rest.split_once(',')?.0;
            let width = rect.attribute("width")?.strip_suffix('%')?.parse().ok()?;
            let drawn = rect.attribute((INFERNO, "w"))?;
            Some(Frame {
                name: name.to_string(),
                value: value.replace(',', "").parse().ok()?,
                unit: unit.to_string(),
                width,
                drawn: drawn.parse().ok()?,
            })
        })
        .collect();
    (title, frames)
}

/// The namespace of inferno's own attributes (`fg:w`, a frame's value).
const INFERNO: &str = "http://github.com/jonhoo/inferno";

/// The one frame named `name`.
fn frame<'a>(frames: &'a [Frame], name: &str) -> &'a Frame {
    let found: Vec<&Frame> = frames.iter().filter(|f| f.name == name).collect();
    assert_eq!(found.len(), 1, "{name}: one frame: {frames:#?}");
    found[0]
}

/// inferno prints widths to 4 decimals of a percent.
const WIDTH_ROUNDING: f64 = 0.00005;

/// `f`'s width is its share of `total` (the root's value), to the rounding of the SVG.
fn assert_width_is_share(f: &Frame, total: u64) {
    let share = 100.0 * f.value as f64 / total as f64;
    assert!((f.width - share).abs() <= WIDTH_ROUNDING + 1e-9, "{f:?}: {share}% of {total}");
}

#[test]
fn memleak_svg_of_leaky_has_each_leak_as_wide_as_its_bytes() {
    if !bpf_available("memleak_svg_of_leaky_has_each_leak_as_wide_as_its_bytes") {
        return;
    }
    let file = std::env::temp_dir().join(format!("memleak-svg-{}.svg", std::process::id()));
    let leaky = prog("leaky");
    let args = ["memleak", "--json", "--svg", file.to_str().unwrap(), "-c", leaky.to_str().unwrap()];
    let out = run(&args, Duration::from_secs(60));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report = final_report(&String::from_utf8_lossy(&out.stdout));
    assert_detached("memleak");
    let (title, frames) = read_svg(&file);
    std::fs::remove_file(&file).unwrap();

    assert_eq!(title, "memleak: outstanding bytes");
    // The whole heap, not only the table's top 10 stacks: the report's total.
    let all = frame(&frames, "all");
    assert_eq!(all.value, report["total_bytes"].as_u64().unwrap(), "{report:#}");
    assert_eq!(all.width, 100.0);
    // Each leak function is its stack's innermost frame: the exact bytes it leaked.
    for &(func, bytes, _) in LEAKY_C {
        let f = frame(&frames, func);
        assert_eq!((f.value, f.drawn, f.unit.as_str()), (bytes, bytes, "bytes"), "{f:?}");
        assert_width_is_share(f, all.value);
    }
    // Widths in the ratio of bytes: 12288 leaked by mmap against 300 by realloc(NULL).
    let (big, small) = (frame(&frames, "leak_mmap"), frame(&frames, "leak_realloc_null"));
    let ratio = big.width / small.width;
    let tolerance = ratio * WIDTH_ROUNDING * (1.0 / big.width + 1.0 / small.width);
    assert!((ratio - 12288.0 / 300.0).abs() <= tolerance, "{ratio} for {big:?} and {small:?}");
    assert!(!frames.iter().any(|f| f.name == "no_leak"), "freed memory in the graph: {frames:#?}");
    // The process is the root's one child, and each frame holds at least its children.
    assert!(frames.iter().any(|f| f.name.starts_with("leaky (") && f.value == all.value), "{frames:#?}");
}

#[test]
fn faults_svg_counts_touch_pages_as_the_report_does() {
    if !bpf_available("faults_svg_counts_touch_pages_as_the_report_does") {
        return;
    }
    let file = std::env::temp_dir().join(format!("faults-svg-{}.svg", std::process::id()));
    let (report, faults) = faults_of_touch_pages(&["-T", "1000", "--svg", file.to_str().unwrap()]);
    let (title, frames) = read_svg(&file);
    std::fs::remove_file(&file).unwrap();

    assert_eq!(title, "faults: page faults");
    let touch = frame(&frames, "touch_pages");
    assert_eq!((touch.value, touch.unit.as_str()), (faults, "faults"), "{touch:?}");
    let total: u64 = report["stacks"].as_array().unwrap().iter().map(|s| s["faults"].as_u64().unwrap()).sum();
    let all = frame(&frames, "all");
    assert_eq!(all.value, total, "{report:#}");
    assert_width_is_share(touch, all.value);
}

#[test]
fn svg_paths_that_cannot_be_written_are_one_line_errors() {
    let leaky = prog("leaky");
    assert_exact_error(
        &["memleak", "--svg", "/nonexistent/g.svg", "-c", leaky.to_str().unwrap()],
        "--svg /nonexistent/g.svg: directory /nonexistent does not exist",
    );
    assert_exact_error(&["brkstack", "--svg", "/tmp"], "--svg /tmp is a directory: give a file path");
    assert_exact_error(&["mallocstat", "--svg", "/"], "--svg / is a directory: give a file path");
    // The C library names the error: glibc's words on the host, musl's in the VM's static build.
    assert_exact_error_of(
        &["faults", "--svg", "/proc/version"],
        &[
            "--svg /proc/version: cannot write /proc/version: Input/output error (os error 5); give a path memtrace can write",
            "--svg /proc/version: cannot write /proc/version: I/O error (os error 5); give a path memtrace can write",
        ],
    );
}

/// The flame graph the README shows is memtrace's, of the demo, with the bytes the README says.
#[test]
fn the_readme_shows_memleaks_flame_graph_of_the_demo() {
    if std::env::var_os("MEMTRACE_VM").is_some() {
        not_run(
            "the_readme_shows_memleaks_flame_graph_of_the_demo",
            "docs/ is not in the VM's image (the host runs this test)",
        );
        return;
    }
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    assert!(readme.contains("](docs/memleak-flamegraph.svg)"), "README.md does not show the flame graph");
    assert!(readme.contains("`memtrace memleak --svg docs/memleak-flamegraph.svg -c target/progs/demo`"));
    let (title, frames) = read_svg(&repo().join("docs/memleak-flamegraph.svg"));
    assert_eq!(title, "memleak: outstanding bytes");
    let bytes = |name: &str| frame(&frames, name).value;
    assert_eq!((bytes("all"), bytes("cache_insert"), bytes("parse_header")), (35_584, 30_720, 768));
    assert!(readme.contains("holds 30,720 of the 35,584 outstanding bytes"), "the README's numbers are the image's");
}
