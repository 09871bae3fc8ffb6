//! What every tracer stands on: common options (`args`), the run loop (`tracer::Tracer`
//! and `Stream`), signals, the stack store and stack reports, and the snoop tools' syscall
//! base.

pub mod args;
pub mod spec;
pub mod stack_report;
pub mod stacks;
pub mod syscalls;
pub mod tracer;

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use tokio::signal::unix::{Signal, SignalKind, signal};

pub use self::args::CommonArgs;

/// What memtrace exits with after a run that did not fail: 0, or with `-c` the status of the
/// command it ran (its exit code, or 128 + the signal that ended it), as `time` and `strace`
/// pass it on to scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Status(pub u8);

impl From<()> for Status {
    fn from(_: ()) -> Status {
        Status(0)
    }
}

/// SIGINT and SIGTERM, caught from the start of a run so that any later one ends it cleanly.
pub struct Signals {
    int: Signal,
    term: Signal,
}

impl Signals {
    pub fn catch() -> Result<Signals> {
        Ok(Signals { int: signal(SignalKind::interrupt())?, term: signal(SignalKind::terminate())? })
    }

    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}

/// What a streaming tracer does with its events; each tool's implementor is its `Live`, the
/// state of a run as it goes. Most tools need `event` alone; memleak also brings sources of
/// its own (`side`: a command's ptrace stops, timers, exits) and decides how a stop goes
/// (`stopping`: a command is ended before the run is).
pub trait Stream {
    /// What the tool's own sources yield (`()` for a tool without any).
    type Side;
    /// One record from the `EVENTS` ring buffer.
    fn event(&mut self, data: &[u8]) -> Result<()>;
    /// Every record waiting in the ring buffer.
    fn drain(&mut self, ctx: &mut Ctx<'_>) -> Result<()> {
        while let Some(item) = ctx.ring.as_mut().and_then(|r| r.next()) {
            self.event(&item)?;
        }
        Ok(())
    }
    /// Called every `tick` (interval reports).
    fn tick(&mut self) -> Result<()> {
        Ok(())
    }
    /// The tool's user-stack unwinder, served while the run goes on.
    fn unwinder(&mut self) -> Option<&mut crate::unwind::Unwinder> {
        None
    }
    /// Loads the tables of processes that mapped new code since the last call.
    fn poll_unwinder(&mut self, watch: Option<u32>) {
        if let Some(unwinder) = self.unwinder() {
            unwinder.poll(|pid| watch.is_none_or(|w| w == pid));
        }
    }
    /// The next news from the tool's own sources; never, by default.
    fn side(&mut self) -> impl std::future::Future<Output = Self::Side> {
        std::future::pending()
    }
    /// Acts on what `side` yielded.
    fn on_side(&mut self, _ctx: &mut Ctx<'_>, _side: Self::Side) -> Result<Flow> {
        Ok(Flow::Go)
    }
    /// The run was asked to end: true to end it now, false to go on (the tool winds down, and
    /// ends the run with `Flow::Done`).
    fn stopping(&mut self, _ctx: &mut Ctx<'_>, _why: End) -> Result<bool> {
        Ok(true)
    }
    /// While true, no more ticks, and `--duration` no longer counts.
    fn winding_down(&self) -> bool {
        false
    }
    /// Called once at the end, with the number of events lost on the way.
    fn finish(&mut self, _lost: u64) -> Result<()> {
        Ok(())
    }
}

/// What a tool's hooks may use of the run: its object and its ring buffer.
pub struct Ctx<'a> {
    pub bpf: &'a mut aya::Ebpf,
    pub ring: Option<&'a mut RingBuf<MapData>>,
}

/// What the run does after a tool's news.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Go,
    /// The run is over: nothing is left to trace.
    Done,
}

/// Why a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Signal,
    Duration,
    TargetExited,
    Count,
    /// Whoever read stdout went away (`| head -1`): nothing more can be shown.
    OutputClosed,
}

/// File descriptor 1, borrowed for readiness only (never closed here).
struct Stdout;

impl std::os::fd::AsRawFd for Stdout {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        libc::STDOUT_FILENO
    }
}

/// Stdout registered for error readiness: the write end of a pipe reports EPOLLERR as soon as
/// the reader closes its end, without anything written. None when stdout cannot be polled (a
/// regular file, /dev/null, closed): such an output never goes away.
fn watch_stdout() -> Option<tokio::io::unix::AsyncFd<Stdout>> {
    // SAFETY: fd 1 stays open for the whole process, so it outlives the registration.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(Stdout, tokio::io::Interest::ERROR) }.ok()
}

/// Resolves once the reader of stdout is gone; never without a watch.
async fn stdout_closed(watch: Option<&tokio::io::unix::AsyncFd<Stdout>>) {
    let Some(watch) = watch else { return std::future::pending().await };
    loop {
        match watch.ready(tokio::io::Interest::ERROR).await {
            Ok(guard) if guard.ready().is_error() || guard.ready().is_write_closed() => return,
            Ok(mut guard) => guard.clear_ready(),
            Err(_) => return std::future::pending().await,
        }
    }
}

/// Reads a `#[repr(C)]` event out of a ring-buffer record.
pub fn read_event<T: Copy>(data: &[u8]) -> Option<T> {
    // SAFETY: length checked; the eBPF side writes whole `T`s; read unaligned.
    (data.len() >= size_of::<T>()).then(|| unsafe { std::ptr::read_unaligned(data.as_ptr().cast::<T>()) })
}

/// A NUL-terminated byte array (comm, path) as text.
pub fn c_str(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// The ring buffer's next readiness (only polled when there is a ring).
async fn ring_ready(
    ring: &mut Option<tokio::io::unix::AsyncFd<RingBuf<MapData>>>,
) -> std::io::Result<tokio::io::unix::AsyncFdReadyMutGuard<'_, RingBuf<MapData>>> {
    match ring {
        Some(ring) => ring.readable_mut().await,
        None => std::future::pending().await,
    }
}
