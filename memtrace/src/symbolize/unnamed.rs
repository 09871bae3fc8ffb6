//! Frames shown without a function name, and why: a blind spot every report of stacks states.

use serde::Serialize;

use super::Frame;

/// Why a frame has no function name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unnamed {
    /// In no executable mapping of the process as memtrace last saw it (gone before it looked,
    /// or a bad return address).
    NoMapping,
    /// In executable memory mapped from no file (JIT code).
    Anonymous,
    /// In a file memtrace could not open or read as ELF.
    Unreadable,
    /// In a file with no symbol there (stripped, or code between functions); the kernel's too.
    NoSymbol,
    /// In the vDSO, whose symbols memtrace does not read.
    Vdso,
}

/// How many frames of a report's stacks have no function name, by cause; `frames` is how many
/// frames the report shows in all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UnnamedFrames {
    pub frames: u64,
    pub no_mapping: u64,
    pub anonymous: u64,
    pub unreadable: u64,
    pub no_symbol: u64,
    pub vdso: u64,
}

impl UnnamedFrames {
    /// Counts `frames`; a frame without a name that does not say why counts as `no_mapping`.
    pub fn of<'a>(frames: impl IntoIterator<Item = &'a Frame>) -> UnnamedFrames {
        let mut counts = UnnamedFrames::default();
        for frame in frames {
            counts.frames += 1;
            if frame.func.is_some() {
                continue;
            }
            *match frame.unnamed.unwrap_or(Unnamed::NoMapping) {
                Unnamed::NoMapping => &mut counts.no_mapping,
                Unnamed::Anonymous => &mut counts.anonymous,
                Unnamed::Unreadable => &mut counts.unreadable,
                Unnamed::NoSymbol => &mut counts.no_symbol,
                Unnamed::Vdso => &mut counts.vdso,
            } += 1;
        }
        counts
    }

    /// How many frames have no name, whatever the cause.
    pub fn unnamed(&self) -> u64 {
        self.no_mapping + self.anonymous + self.unreadable + self.no_symbol + self.vdso
    }

    /// The blind-spot entries: frames shown without a name, by cause.
    pub fn blind_spots(&self) -> Vec<(u64, &'static str)> {
        vec![
            (self.no_mapping, "frames without a name (in no executable mapping)"),
            (self.anonymous, "frames without a name (in code mapped from no file: JIT)"),
            (self.unreadable, "frames without a name (their file could not be read)"),
            (self.no_symbol, "frames without a name (no symbol in their file)"),
            (self.vdso, "frames without a name (in the vDSO)"),
        ]
    }
}

/// Reports that show stacks one interval (or one event) at a time count over the run.
impl std::ops::AddAssign for UnnamedFrames {
    fn add_assign(&mut self, other: UnnamedFrames) {
        self.frames += other.frames;
        self.no_mapping += other.no_mapping;
        self.anonymous += other.anonymous;
        self.unreadable += other.unreadable;
        self.no_symbol += other.no_symbol;
        self.vdso += other.vdso;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_each_unnamed_frame_by_its_cause() {
        let named = Frame { func: Some("main".into()), unnamed: None, ..Frame::unknown(1) };
        let file = |why| Frame::unnamed(2, Some("lib.so"), why);
        let frames = [
            named.clone(),
            Frame::unknown(3),
            file(Unnamed::NoSymbol),
            file(Unnamed::NoSymbol),
            file(Unnamed::Unreadable),
            Frame::unnamed(4, None, Unnamed::Anonymous),
            Frame::unnamed(5, Some("[vdso]"), Unnamed::Vdso),
            // A name without a stated cause is still unnamed.
            Frame { unnamed: None, ..Frame::unknown(6) },
        ];
        let counts = UnnamedFrames::of(&frames);
        assert_eq!(
            counts,
            UnnamedFrames { frames: 8, no_mapping: 2, anonymous: 1, unreadable: 1, no_symbol: 2, vdso: 1 }
        );
        let line = crate::output::blind_spots(&counts.blind_spots());
        assert_eq!(
            line,
            "blind spots: 2 frames without a name (in no executable mapping), 1 frames without a name (in code \
             mapped from no file: JIT), 1 frames without a name (their file could not be read), 2 frames without \
             a name (no symbol in their file), 1 frames without a name (in the vDSO)"
        );
        assert_eq!(counts.unnamed(), 7);
        let mut run = UnnamedFrames::of([&named]);
        assert_eq!((run.frames, run.unnamed()), (1, 0));
        run += counts;
        assert_eq!((run.frames, run.unnamed(), run.no_symbol), (9, 7, 2));
    }
}
