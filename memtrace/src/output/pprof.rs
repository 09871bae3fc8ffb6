//! pprof's gzipped `profile.proto`, the format `go tool pprof`, Parca and Pyroscope read: one
//! sample per stack of a report, with its functions, source lines and inlined frames, and the
//! mappings (with build ids) another tool needs to symbolize the addresses again.

use std::{collections::HashMap, io::Write, path::Path};

use anyhow::{Context as _, Result};
use prost::Message as _;

use crate::symbolize::{Frame, MappedFile};

/// One stack of a report: its frames innermost first (an address's inlined frames before its
/// real function, as symbolize gives them) and one value per sample type.
pub struct Sample<'a> {
    pub pid: u32,
    /// The process as the other formats name it (`output::process_root`), as a label.
    pub process: String,
    pub frames: &'a [Frame],
    pub values: Vec<i64>,
}

/// What a profile says of itself beyond its samples.
#[derive(Default)]
pub struct Notes {
    /// Free text a reader of the profile sees (`go tool pprof -comments`).
    pub comments: Vec<String>,
    /// For a sampled profile: (type, unit, period), e.g. ("space", "bytes", 524288) for one
    /// sample every 512 KiB, as Go's heap profiles give it.
    pub period: Option<(&'static str, &'static str, i64)>,
}

/// Writes the gzipped profile of `samples` to `path`, with `notes`. `sample_types` are (type,
/// unit) pairs in the order of each sample's values; the last one is what pprof shows by
/// default. `mapping` gives the file mapping of a process's user address.
pub fn write(
    path: &Path,
    sample_types: &[(&str, &str)],
    samples: &[Sample<'_>],
    notes: &Notes,
    mapping: impl FnMut(u32, u64) -> Option<MappedFile>,
) -> Result<()> {
    let write = || -> Result<()> {
        // A regular file is replaced whole (written aside, then renamed), so whoever reads it
        // while a run goes on (`memtrace serve`) never sees half a profile.
        let regular = path.metadata().map_or(true, |m| m.is_file());
        let aside = path.with_file_name(format!(
            ".{}.{}.tmp",
            path.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        let target = if regular { aside.as_path() } else { path };
        let file = std::fs::File::create(target)?;
        write_to(std::io::BufWriter::new(file), sample_types, samples, notes, mapping)?;
        if regular {
            std::fs::rename(&aside, path)?;
        }
        Ok(())
    };
    write().with_context(|| format!("cannot write {}", path.display()))
}

/// `write` into any writer.
pub fn write_to(
    out: impl Write,
    sample_types: &[(&str, &str)],
    samples: &[Sample<'_>],
    notes: &Notes,
    mapping: impl FnMut(u32, u64) -> Option<MappedFile>,
) -> Result<()> {
    encode(out, &Builder::new(mapping).build(sample_types, samples, notes))
}

fn encode(out: impl Write, profile: &proto::Profile) -> Result<()> {
    let mut gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
    gz.write_all(&profile.encode_to_vec())?;
    gz.finish()?.flush()?;
    Ok(())
}

/// Interns what a profile refers to by id: strings, functions, mappings and locations.
struct Builder<M> {
    mapping_of: M,
    profile: proto::Profile,
    strings: HashMap<String, i64>,
    functions: HashMap<(String, String), u64>,
    /// By (file, start): the same library mapped by two processes is one mapping per place.
    mappings: HashMap<(String, u64), u64>,
    /// By (pid, address): an address means other code in another process.
    locations: HashMap<(u32, u64), u64>,
}

impl<M: FnMut(u32, u64) -> Option<MappedFile>> Builder<M> {
    fn new(mapping_of: M) -> Self {
        let mut b = Builder {
            mapping_of,
            profile: proto::Profile::default(),
            strings: HashMap::new(),
            functions: HashMap::new(),
            mappings: HashMap::new(),
            locations: HashMap::new(),
        };
        // The format wants the empty string first.
        b.string("");
        b
    }

    fn build(mut self, sample_types: &[(&str, &str)], samples: &[Sample<'_>], notes: &Notes) -> proto::Profile {
        for comment in &notes.comments {
            let id = self.string(comment);
            self.profile.comment.push(id);
        }
        if let Some((kind, unit, period)) = notes.period {
            self.profile.period_type = Some(proto::ValueType { r#type: self.string(kind), unit: self.string(unit) });
            self.profile.period = period;
        }
        for (name, unit) in sample_types {
            let value_type = proto::ValueType { r#type: self.string(name), unit: self.string(unit) };
            self.profile.sample_type.push(value_type);
        }
        self.profile.default_sample_type = self.profile.sample_type.last().map_or(0, |t| t.r#type);
        self.profile.time_nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos().try_into().unwrap_or(i64::MAX));
        for sample in samples {
            let location_id = address_groups(sample.frames).map(|frames| self.location(sample.pid, frames)).collect();
            let label = vec![
                proto::Label { key: self.string("pid"), num: sample.pid.into(), ..Default::default() },
                proto::Label { key: self.string("process"), str: self.string(&sample.process), ..Default::default() },
            ];
            self.profile.sample.push(proto::Sample { location_id, value: sample.values.clone(), label });
        }
        self.profile
    }

    fn string(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.strings.get(s) {
            return i;
        }
        let i = self.profile.string_table.len() as i64;
        self.profile.string_table.push(s.to_string());
        self.strings.insert(s.to_string(), i);
        i
    }

    /// The location of one address: its frames become lines, innermost first.
    fn location(&mut self, pid: u32, frames: &[Frame]) -> u64 {
        let addr = frames[0].addr;
        if let Some(&id) = self.locations.get(&(pid, addr)) {
            return id;
        }
        let mapping_id = self.mapping(pid, &frames[0]);
        let line = frames
            .iter()
            .filter_map(|f| {
                let name = f.func.as_deref()?;
                let function_id = self.function(name, f.file.as_deref().unwrap_or(""));
                Some(proto::Line { function_id, line: f.line.map_or(0, i64::from), column: 0 })
            })
            .collect();
        let id = self.profile.location.len() as u64 + 1;
        self.profile.location.push(proto::Location { id, mapping_id, address: addr, line, is_folded: false });
        self.locations.insert((pid, addr), id);
        id
    }

    fn function(&mut self, name: &str, file: &str) -> u64 {
        if let Some(&id) = self.functions.get(&(name.to_string(), file.to_string())) {
            return id;
        }
        let id = self.profile.function.len() as u64 + 1;
        let (name_i, file_i) = (self.string(name), self.string(file));
        let function = proto::Function { id, name: name_i, system_name: name_i, filename: file_i, start_line: 0 };
        self.profile.function.push(function);
        self.functions.insert((name.to_string(), file.to_string()), id);
        id
    }

    /// The mapping of a frame: the file mapped where the process ran it, else (kernel frames,
    /// files gone unread) one per module name with no range.
    fn mapping(&mut self, pid: u32, frame: &Frame) -> u64 {
        let mapped = (self.mapping_of)(pid, frame.addr).unwrap_or_else(|| MappedFile {
            start: 0,
            limit: 0,
            offset: 0,
            path: frame.module.clone().unwrap_or_else(|| "[unknown]".into()),
            build_id: None,
        });
        if let Some(&id) = self.mappings.get(&(mapped.path.clone(), mapped.start)) {
            return id;
        }
        let id = self.profile.mapping.len() as u64 + 1;
        let filename = self.string(&mapped.path);
        let build_id = self.string(mapped.build_id.as_deref().unwrap_or(""));
        // Symbolized here: pprof must not look for the files again.
        self.profile.mapping.push(proto::Mapping {
            id,
            memory_start: mapped.start,
            memory_limit: mapped.limit,
            file_offset: mapped.offset,
            filename,
            build_id,
            has_functions: true,
            has_filenames: true,
            has_line_numbers: true,
            has_inline_frames: true,
        });
        self.mappings.insert((mapped.path, mapped.start), id);
        id
    }
}

/// Splits frames into one group per address: an address's inlined frames end with its one
/// non-inlined frame.
fn address_groups(frames: &[Frame]) -> impl Iterator<Item = &[Frame]> {
    let mut rest = frames;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let same = |f: &Frame| f.addr == rest[0].addr;
        let mut end = rest.iter().take_while(|f| f.inlined && same(f)).count();
        if rest.get(end).is_some_and(same) {
            end += 1;
        }
        let (group, tail) = rest.split_at(end);
        rest = tail;
        Some(group)
    })
}

/// profile.proto's messages (github.com/google/pprof/proto/profile.proto), field for field.
pub mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        #[prost(message, repeated, tag = "3")]
        pub mapping: Vec<Mapping>,
        #[prost(message, repeated, tag = "4")]
        pub location: Vec<Location>,
        #[prost(message, repeated, tag = "5")]
        pub function: Vec<Function>,
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
        #[prost(int64, tag = "7")]
        pub drop_frames: i64,
        #[prost(int64, tag = "8")]
        pub keep_frames: i64,
        #[prost(int64, tag = "9")]
        pub time_nanos: i64,
        #[prost(int64, tag = "10")]
        pub duration_nanos: i64,
        #[prost(message, optional, tag = "11")]
        pub period_type: Option<ValueType>,
        #[prost(int64, tag = "12")]
        pub period: i64,
        #[prost(int64, repeated, tag = "13")]
        pub comment: Vec<i64>,
        #[prost(int64, tag = "14")]
        pub default_sample_type: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueType {
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        #[prost(int64, tag = "2")]
        pub unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        #[prost(uint64, repeated, tag = "1")]
        pub location_id: Vec<u64>,
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
        #[prost(message, repeated, tag = "3")]
        pub label: Vec<Label>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Label {
        #[prost(int64, tag = "1")]
        pub key: i64,
        #[prost(int64, tag = "2")]
        pub str: i64,
        #[prost(int64, tag = "3")]
        pub num: i64,
        #[prost(int64, tag = "4")]
        pub num_unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Mapping {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub memory_start: u64,
        #[prost(uint64, tag = "3")]
        pub memory_limit: u64,
        #[prost(uint64, tag = "4")]
        pub file_offset: u64,
        #[prost(int64, tag = "5")]
        pub filename: i64,
        #[prost(int64, tag = "6")]
        pub build_id: i64,
        #[prost(bool, tag = "7")]
        pub has_functions: bool,
        #[prost(bool, tag = "8")]
        pub has_filenames: bool,
        #[prost(bool, tag = "9")]
        pub has_line_numbers: bool,
        #[prost(bool, tag = "10")]
        pub has_inline_frames: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Location {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub mapping_id: u64,
        #[prost(uint64, tag = "3")]
        pub address: u64,
        #[prost(message, repeated, tag = "4")]
        pub line: Vec<Line>,
        #[prost(bool, tag = "5")]
        pub is_folded: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Line {
        #[prost(uint64, tag = "1")]
        pub function_id: u64,
        #[prost(int64, tag = "2")]
        pub line: i64,
        #[prost(int64, tag = "3")]
        pub column: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Function {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "2")]
        pub name: i64,
        #[prost(int64, tag = "3")]
        pub system_name: i64,
        #[prost(int64, tag = "4")]
        pub filename: i64,
        #[prost(int64, tag = "5")]
        pub start_line: i64,
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use prost::Message as _;

    use super::*;

    fn frame(addr: u64, func: &str, file: &str, line: u32, inlined: bool) -> Frame {
        Frame {
            addr,
            func: Some(func.into()),
            offset: 0,
            module: Some("app".into()),
            file: Some(file.into()),
            line: Some(line),
            inlined,
            unnamed: None,
        }
    }

    fn decode(bytes: &[u8]) -> proto::Profile {
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(bytes).read_to_end(&mut raw).unwrap();
        proto::Profile::decode(raw.as_slice()).unwrap()
    }

    #[test]
    fn a_report_decodes_to_its_samples_functions_lines_and_mappings() {
        // `leaf` inlined into `mid` at one address, called from `main`; a kernel frame outside any file.
        let one = [
            frame(0x1010, "leaf", "/src/a.c", 3, true),
            frame(0x1010, "mid", "/src/a.c", 9, false),
            frame(0x1100, "main", "/src/m.c", 20, false),
        ];
        let two = [
            frame(0x1100, "main", "/src/m.c", 20, false),
            Frame { module: Some("[kernel]".into()), ..frame(0xffff_8000_0000_0000, "do_brk", "", 0, false) },
        ];
        let samples = [
            Sample { pid: 7, process: "app (7)".into(), frames: &one, values: vec![2, 300] },
            Sample { pid: 7, process: "app (7)".into(), frames: &two, values: vec![1, 50] },
        ];
        let app = MappedFile {
            start: 0x1000,
            limit: 0x2000,
            offset: 0x400,
            path: "/usr/bin/app".into(),
            build_id: Some("abcd".into()),
        };
        let mut out = Vec::new();
        let mapping = |pid: u32, addr: u64| (pid == 7 && (0x1000..0x2000).contains(&addr)).then(|| app.clone());
        write_to(
            &mut out,
            &[("inuse_objects", "count"), ("inuse_space", "bytes")],
            &samples,
            &Notes::default(),
            mapping,
        )
        .unwrap();
        let p = decode(&out);
        let s = |i: i64| p.string_table[i as usize].as_str();

        assert_eq!(s(0), "");
        let types: Vec<(&str, &str)> = p.sample_type.iter().map(|t| (s(t.r#type), s(t.unit))).collect();
        assert_eq!(types, [("inuse_objects", "count"), ("inuse_space", "bytes")]);
        assert_eq!(s(p.default_sample_type), "inuse_space");

        // Each sample: its values, and per location the lines innermost first as "func file:line".
        let lines = |location_ids: &[u64]| -> Vec<Vec<String>> {
            location_ids
                .iter()
                .map(|&id| {
                    let l = &p.location[id as usize - 1];
                    assert_eq!(l.id, id);
                    l.line
                        .iter()
                        .map(|line| {
                            let f = &p.function[line.function_id as usize - 1];
                            format!("{} {}:{}", s(f.name), s(f.filename), line.line)
                        })
                        .collect()
                })
                .collect()
        };
        assert_eq!(p.sample.len(), 2);
        assert_eq!(p.sample[0].value, [2, 300]);
        assert_eq!(
            lines(&p.sample[0].location_id),
            [vec!["leaf /src/a.c:3", "mid /src/a.c:9"], vec!["main /src/m.c:20"]]
        );
        assert_eq!(p.sample[1].value, [1, 50]);
        assert_eq!(lines(&p.sample[1].location_id), [vec!["main /src/m.c:20"], vec!["do_brk :0"]]);
        // The same address in the same process is one location, and the same function one function.
        assert_eq!(p.sample[0].location_id[1], p.sample[1].location_id[0]);
        assert_eq!(p.location.len(), 3);
        assert_eq!(p.function.len(), 4);
        let labels: Vec<(&str, i64, &str)> = p.sample[0].label.iter().map(|l| (s(l.key), l.num, s(l.str))).collect();
        assert_eq!(labels, [("pid", 7, ""), ("process", 0, "app (7)")]);

        // Addresses and mappings: the file's with its range, offset and build id; the kernel's by name.
        let addrs: Vec<(u64, u64)> = p.location.iter().map(|l| (l.address, l.mapping_id)).collect();
        assert_eq!(addrs, [(0x1010, 1), (0x1100, 1), (0xffff_8000_0000_0000, 2)]);
        let maps: Vec<(u64, u64, u64, u64, &str, &str)> = p
            .mapping
            .iter()
            .map(|m| (m.id, m.memory_start, m.memory_limit, m.file_offset, s(m.filename), s(m.build_id)))
            .collect();
        assert_eq!(maps, [(1, 0x1000, 0x2000, 0x400, "/usr/bin/app", "abcd"), (2, 0, 0, 0, "[kernel]", "")]);
        assert!(
            p.mapping.iter().all(|m| m.has_functions && m.has_filenames && m.has_line_numbers && m.has_inline_frames)
        );
    }

    #[test]
    fn notes_are_the_profiles_comments_and_period() {
        let frames = [Frame::unknown(0x42)];
        let samples = [Sample { pid: 1, process: "[pid 1]".into(), frames: &frames, values: vec![5] }];
        let notes = Notes { comments: vec!["estimated".into()], period: Some(("space", "bytes", 65_536)) };
        let p = Builder::new(|_, _| None).build(&[("inuse_space", "bytes")], &samples, &notes);
        let s = |i: i64| p.string_table[i as usize].as_str();
        assert_eq!(p.comment.iter().map(|&c| s(c)).collect::<Vec<_>>(), ["estimated"]);
        let period = p.period_type.as_ref().map(|t| (s(t.r#type), s(t.unit)));
        assert_eq!((period, p.period), (Some(("space", "bytes")), 65_536));
    }

    #[test]
    fn unnamed_frames_are_addresses_without_lines() {
        let frames = [Frame::unknown(0x42)];
        let samples = [Sample { pid: 1, process: "[pid 1]".into(), frames: &frames, values: vec![5] }];
        let mut out = Vec::new();
        write_to(&mut out, &[("faults", "count")], &samples, &Notes::default(), |_, _| None).unwrap();
        let p = decode(&out);
        assert_eq!(p.location.len(), 1);
        assert_eq!((p.location[0].address, p.location[0].line.len()), (0x42, 0));
        assert_eq!(p.string_table[p.mapping[0].filename as usize], "[unknown]");
    }
}
