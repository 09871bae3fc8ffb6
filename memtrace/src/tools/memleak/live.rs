//! memleak on the shared run loop (`tools::Stream`): the ring's events, and the sources only
//! memleak has: the `-c` command's ptrace stops, exits of processes memtrace did not start,
//! the duty cycle, job control, and a command ended before the run is.

use std::{pin::Pin, time::Duration};

use anyhow::Result;
use aya::Ebpf;
use memtrace_common::memleak::{EV_ERROR, EV_EXEC, EV_FORK, EV_OOM, Event, MemError, ProcEvent};
use tokio::{signal::unix::Signal, task::JoinSet, time::Sleep};

use super::{KillSink, attach::DutyCycle, procs::Procs, report::Session};
use crate::{
    target,
    tools::{Ctx, End, Flow, Stream},
    tracee::{Command, CommandEvent, Ending, GRACE},
    unwind::{UnwindMode, Unwinder},
};

/// Said (-v) of an exec by a thread other than the process's first.
const FROM_THREAD: &str = "exec by a thread other than its first: probes attached again";

const FAR: Duration = Duration::from_secs(u64::MAX / 4);

pub(super) struct Live<'a> {
    pub procs: Procs,
    pub session: Session<'a>,
    pub command: Option<Command>,
    pub ending: Ending,
    duty: Option<DutyCycle>,
    duty_timer: Pin<Box<Sleep>>,
    /// Processes memtrace did not start: their exits are watched through pidfds.
    exits: JoinSet<(u32, Result<()>)>,
    /// SIGTSTP is caught under -c only (elsewhere it stops memtrace as usual): see `Ending`.
    tstp: Option<Signal>,
    suspend_poll: tokio::time::Interval,
    /// How often the in-process recorders' error rings are read.
    error_poll: tokio::time::Interval,
    /// When --watch's watchpoints move next.
    watch_rotation: Pin<Box<Sleep>>,
    grace: Pin<Box<Sleep>>,
    /// The `-p` process or the command's first.
    root: Option<u32>,
    /// Under -c each process waits at its stops until memtrace has acted on them.
    held: bool,
    /// memtrace in a pid namespace of its own: children are learnt of through ptrace only.
    own_pid_ns: bool,
    reports: u64,
    report_count: Option<u64>,
    /// The final report is out (the last of `-r`, or before a command is ended).
    reported_final: bool,
    /// Where the heap of each process the OOM killer chose goes once reported (`run_keeping`).
    kills: Option<KillSink>,
}

/// News from memleak's own sources.
pub(super) enum Side {
    Duty,
    Command(Option<CommandEvent>),
    Exit(u32, Result<()>),
    Grace,
    Tstp,
    SuspendCheck,
    ErrorPoll,
    Watch,
}

impl<'a> Live<'a> {
    #[allow(clippy::too_many_arguments, reason = "the parts of a run, built once by `run`")]
    pub fn new(
        procs: Procs,
        session: Session<'a>,
        command: Option<Command>,
        duty: Option<DutyCycle>,
        root: Option<u32>,
        own_pid_ns: bool,
        report_count: Option<u64>,
    ) -> Result<Live<'a>> {
        let mut exits = JoinSet::new();
        if let (Some(pid), None) = (root, &command) {
            exits.spawn(async move { (pid, target::exited(pid).await) });
        }
        let tstp = match &command {
            Some(_) => Some(tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(libc::SIGTSTP))?),
            None => None,
        };
        let duty_timer = Box::pin(tokio::time::sleep(duty.as_ref().map_or(FAR, |d| d.open_for)));
        Ok(Live {
            procs,
            session,
            held: command.is_some(),
            command,
            ending: Ending::new("memleak"),
            duty,
            duty_timer,
            exits,
            tstp,
            suspend_poll: tokio::time::interval(Duration::from_millis(10)),
            error_poll: tokio::time::interval(Duration::from_millis(100)),
            watch_rotation: Box::pin(tokio::time::sleep(super::watch::ROTATION)),
            grace: Box::pin(tokio::time::sleep(FAR)),
            root,
            own_pid_ns,
            reports: 0,
            report_count,
            reported_final: false,
            kills: None,
        })
    }

    /// Sends the heap of each process the OOM killer chooses to `sink`.
    pub fn keep_kills(&mut self, sink: Option<KillSink>) {
        self.kills = sink;
    }

    /// Says how a process of the tree is now traced: the command's own images are news, its
    /// children's detail (-v).
    fn say(&self, pid: u32, how: &str) {
        let line = format!("pid {pid} ({}) {how}", target::comm(pid));
        if Some(pid) == self.root { eprintln!("memtrace: memleak: {line}") } else { tracing::info!("{line}") }
    }

    /// Acts on the kernel side's news of a tracked process forking, exec'ing or chosen by the
    /// OOM killer.
    fn lifecycle(&mut self, bpf: &mut Ebpf, event: &ProcEvent) -> Result<()> {
        let held = self.held;
        match event.kind {
            EV_FORK => {
                let (parent, child) = (event.parent, event.pid);
                // Under -c the child waits at its fork until the command's event is handled.
                self.procs.fork(bpf, self.session.allocs_mut(), parent, child, event.timestamp_ns, held);
                let _ = self.session.user_sym.refresh(child);
                if !held {
                    self.session.unwinder.load(child);
                }
                if !held && self.procs.list.contains_key(&child) {
                    tracing::info!("pid {child}: fork of pid {parent} followed");
                    self.exits.spawn(async move { (child, target::exited(child).await) });
                }
            }
            EV_EXEC if !held => {
                let image = event.image;
                let from_thread = event.from_thread != 0;
                if let Some(how) = self.procs.exec(bpf, event.pid, image, false, from_thread)? {
                    tracing::info!("pid {} {}", event.pid, how.describe());
                }
                if from_thread {
                    tracing::info!("pid {}: {FROM_THREAD}", event.pid);
                }
                tracing::info!("pid {}: exec into image {image} followed", event.pid);
                self.session.user_sym.forget(event.pid);
                self.session.unwinder.load(event.pid);
            }
            EV_OOM => {
                // Before its exit is handled: the kernel frees nothing of the heap memleak
                // knows, so its blocks are still all there (in the maps, or in the process).
                let Some(read) = self.procs.read_at_kill(event.pid) else { return Ok(()) };
                if let (Some(heap), Some(sink)) =
                    (self.session.heap_at_kill(&self.procs, event.pid, read)?, &self.kills)
                {
                    // Whoever keeps them may be gone already: the report is out anyway.
                    let _ = sink.send(heap);
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn on_command(&mut self, ctx: &mut Ctx<'_>, event: Option<CommandEvent>) -> Result<Flow> {
        match event {
            Some(CommandEvent::Exec { pid, from_thread, ack }) => {
                // The kernel side saw the exec first; take its generation from the ring.
                self.drain(ctx)?;
                let image = self.procs.images().get(&pid).copied().unwrap_or(0);
                if let Some(how) = self.procs.exec(ctx.bpf, pid, image, true, from_thread)? {
                    self.say(pid, &how.describe());
                }
                if from_thread {
                    tracing::info!("pid {pid}: {FROM_THREAD}");
                }
                self.session.user_sym.forget(pid);
                self.session.unwinder.load(pid);
                let _ = ack.send(());
            }
            Some(CommandEvent::Fork { parent, child, shared, ack }) => {
                self.drain(ctx)?;
                if self.own_pid_ns {
                    // The kernel side cannot name the child here: track it from user space.
                    self.procs.track_child(child, parent, shared)?;
                }
                let now = crate::sys::monotonic_ns();
                self.procs.fork(ctx.bpf, self.session.allocs_mut(), parent, child, now, true);
                let _ = self.session.user_sym.refresh(child);
                self.session.unwinder.load(child);
                let _ = ack.send(());
            }
            Some(CommandEvent::Mapped { pid, ack }) => {
                // Stacks taken before the new code was mapped are named with the maps they
                // were taken in; later ones need the new maps.
                self.drain(ctx)?;
                if let Some(how) = self.procs.mapped(ctx.bpf, pid)? {
                    self.say(pid, &how.describe());
                }
                self.session.user_sym.mapped(pid);
                self.session.unwinder.load(pid);
                let _ = ack.send(());
            }
            Some(CommandEvent::Exiting { pid, ack }) => {
                // Stopped at exit with its memory map intact: snapshot it for symbolization.
                let _ = self.session.user_sym.refresh(pid);
                // The kernel side's errors too: its ring may hold this process's last ones.
                self.drain(ctx)?;
                self.procs.exiting(pid);
                // Before the process is let go: glibc aborts on many of the errors found.
                self.session.report_errors(&mut self.procs)?;
                let _ = ack.send(());
            }
            Some(CommandEvent::Exited { pid, code }) => {
                self.drain(ctx)?;
                if Some(pid) == self.root {
                    eprintln!("memtrace: memleak: command exited with status {code}");
                    self.ending.status = Some(code);
                }
                self.procs.exited(pid, Some(code));
                self.session.unwinder.forget(pid);
            }
            Some(CommandEvent::PtraceRefused { pid }) => self.ending.ptrace_refused(pid),
            Some(CommandEvent::Done) | None => return Ok(Flow::Done),
        }
        Ok(Flow::Go)
    }
}

impl Stream for Live<'_> {
    type Side = Side;

    fn event(&mut self, _data: &[u8]) -> Result<()> {
        unreachable!("memleak drains its ring itself: its events need the object")
    }

    fn drain(&mut self, ctx: &mut Ctx<'_>) -> Result<()> {
        /// The ring's records, told apart by the `kind` they all start with.
        enum Item {
            Block(Event),
            Proc(ProcEvent),
            Error(MemError),
        }
        let Some(ring) = ctx.ring.as_mut() else { return Ok(()) };
        let mut items = Vec::new();
        while let Some(item) = ring.next() {
            let Some(kind) = crate::tools::read_event::<u32>(&item) else { continue };
            items.extend(match kind {
                EV_ERROR => crate::tools::read_event(&item).map(Item::Error),
                EV_FORK | EV_EXEC | EV_OOM => crate::tools::read_event(&item).map(Item::Proc),
                _ => crate::tools::read_event(&item).map(Item::Block),
            });
        }
        for item in &items {
            match item {
                Item::Block(event) => self.session.on_event(event)?,
                Item::Proc(event) => self.lifecycle(ctx.bpf, event)?,
                Item::Error(error) => self.session.on_error(error)?,
            }
        }
        Ok(())
    }

    fn tick(&mut self) -> Result<()> {
        self.reports += 1;
        let last = self.report_count.is_some_and(|c| self.reports >= c);
        self.session.report(&mut self.procs, last, false)?;
        self.reported_final |= last;
        Ok(())
    }

    fn unwinder(&mut self) -> Option<&mut Unwinder> {
        Some(&mut self.session.unwinder)
    }

    fn poll_unwinder(&mut self, _watch: Option<u32>) {
        if self.session.unwinder.mode() != UnwindMode::Fp {
            let procs = &self.procs;
            self.session.unwinder.poll(|pid| procs.list.contains_key(&pid));
        }
    }

    async fn side(&mut self) -> Side {
        let ending = self.ending.started();
        let (duty, suspending) = (self.duty.is_some(), self.ending.suspending());
        let errors = self.held && !self.session.args_no_errors();
        let watching = self.session.watch.is_some() && !ending;
        tokio::select! {
            _ = &mut self.duty_timer, if duty => Side::Duty,
            event = recv_command(&mut self.command) => Side::Command(event),
            Some(Ok((pid, res))) = self.exits.join_next(), if !self.exits.is_empty() => Side::Exit(pid, res),
            _ = &mut self.grace, if ending => Side::Grace,
            Some(()) = recv_signal(&mut self.tstp), if !ending => Side::Tstp,
            _ = self.suspend_poll.tick(), if suspending => Side::SuspendCheck,
            _ = self.error_poll.tick(), if errors => Side::ErrorPoll,
            _ = &mut self.watch_rotation, if watching => Side::Watch,
        }
    }

    fn on_side(&mut self, ctx: &mut Ctx<'_>, side: Side) -> Result<Flow> {
        match side {
            Side::Duty => {
                let cycle = self.duty.as_mut().expect("only with a duty cycle");
                let next = if cycle.is_open() { cycle.close(ctx.bpf)? } else { cycle.open(ctx.bpf)? };
                self.duty_timer.as_mut().reset(tokio::time::Instant::now() + next);
            }
            Side::Command(event) => return self.on_command(ctx, event),
            Side::Exit(pid, res) => {
                res?;
                // An OOM kill's news comes first: the heap at the kill before the exit.
                self.drain(ctx)?;
                if Some(pid) == self.root {
                    eprintln!("memtrace: memleak: process {pid} exited");
                }
                self.procs.exited(pid, None);
                if self.procs.all_exited() {
                    return Ok(Flow::Done);
                }
            }
            Side::Grace => {
                self.ending.kill(self.command.as_ref(), &format!("still running after {} s", GRACE.as_secs()));
                self.grace.as_mut().reset(tokio::time::Instant::now() + FAR);
            }
            Side::Tstp => self.ending.suspend(self.command.as_ref()),
            Side::SuspendCheck => self.ending.suspend_check(self.command.as_ref()),
            Side::ErrorPoll => {
                self.procs.poll_errors();
                self.session.report_errors(&mut self.procs)?;
            }
            Side::Watch => {
                let next = self.session.rotate_watch(&self.procs);
                self.watch_rotation.as_mut().reset(tokio::time::Instant::now() + next);
            }
        }
        Ok(Flow::Go)
    }

    fn stopping(&mut self, ctx: &mut Ctx<'_>, why: End) -> Result<bool> {
        let Some(cmd) = &self.command else {
            // The last of `-r` reports was the final one; otherwise `finish` prints it.
            self.reported_final |= why == End::Count;
            return Ok(true);
        };
        if self.ending.started() {
            self.ending.kill(Some(cmd), "asked again");
            return Ok(false);
        }
        // A command is ended (not left without its tracer: see `tracee::Ending`), after the
        // final report of what it holds now.
        if why != End::Count {
            self.drain(ctx)?;
            self.session.report(&mut self.procs, true, false)?;
        }
        self.reported_final = true;
        let cmd = self.command.as_ref().expect("checked above");
        if self.ending.start(cmd) {
            self.grace.as_mut().reset(tokio::time::Instant::now() + GRACE);
        }
        Ok(false)
    }

    fn winding_down(&self) -> bool {
        self.ending.started()
    }

    fn finish(&mut self, _lost: u64) -> Result<()> {
        if !self.reported_final {
            let gone = self.root.is_some() && self.procs.all_exited();
            self.session.report(&mut self.procs, true, gone)?;
        }
        Ok(())
    }
}

async fn recv_signal(signal: &mut Option<Signal>) -> Option<()> {
    match signal {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

async fn recv_command(command: &mut Option<Command>) -> Option<CommandEvent> {
    match command {
        Some(c) => c.events.recv().await,
        None => std::future::pending().await,
    }
}
