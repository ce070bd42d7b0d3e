//! The event loop driven with a fake host: every transition of a reload, a
//! crash restart and a kept-value hand-over, and the edge cases found so
//! far, in milliseconds. The fake starts nothing: it hands out pids, records
//! what the loop asked for (signals, kills, messages, timers, systemd), and
//! the tests play the workers, the reaper and the clock by handing the loop
//! the events the real host would.
//!
//! `reloads.rs`: starting, reloading, building, crash restarts, stopping;
//! `handoff.rs`: what workers say, and kept values; `steer.rs`: `--steer`'s
//! grace before the drain signal; `upgrade.rs`: upgrades of baton itself,
//! and the table's round trip through the hand-over state.

mod handoff;
mod pre_copy;
mod reloads;
mod steer;
mod upgrade;

use std::collections::HashSet;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::Duration;

use baton_worker::protocol::{
    ProtocolError, SupervisorMessage, WorkerMessage, PROTOCOL_VERSION, SNAPSHOT_SEALS,
};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::sync::oneshot;

use super::{Config, Readiness, Supervisor};
use crate::api::{ListenerStatus, Reply, Request, Status, Step};
use crate::event::{Event, Exit, NotifyMessage, Timer};
use crate::generations::Phase;
use crate::host::{Host, TimerId};
use crate::spawn::WorkerCommand;
use crate::upgrade::state::Table;

/// What the loop asked of the outside world.
#[derive(Default)]
pub(super) struct Fake {
    pub(super) next_pid: i32,
    /// Generation → its worker's pid, in start order.
    pub(super) workers: Vec<(u64, Pid)>,
    pub(super) builds: Vec<(u64, Pid)>,
    /// Spawns fail while set.
    pub(super) refuse_spawn: bool,
    /// Sends to these generations fail (their channel is gone).
    pub(super) unreachable: HashSet<u64>,
    pub(super) sent: Vec<(u64, SupervisorMessage)>,
    pub(super) signals: Vec<(Pid, Signal)>,
    pub(super) killed: Vec<Pid>,
    /// What the next `reap` returns.
    pub(super) exited: Vec<(Pid, Exit)>,
    pub(super) exec_failures: Vec<(Pid, String)>,
    pub(super) timers: Vec<(TimerId, Duration, Event)>,
    pub(super) next_timer: TimerId,
    pub(super) systemd: Vec<String>,
    /// What went to systemd's store: a snapshot (`true`) or its removal.
    pub(super) stored_kept: Vec<bool>,
    /// `--steer`: the generations new connections were steered to, in order.
    pub(super) steered: Vec<u64>,
    /// `--steer`: generations with connections waiting in their queue.
    pub(super) queued: HashSet<u64>,
    /// Pre-flights started: their binary and the table they were given.
    pub(super) preflights: Vec<(Pid, std::path::PathBuf, Table)>,
    /// What the next pre-flight verdict is.
    pub(super) verdict: Option<Result<String, String>>,
    /// Execs asked for: the binary and the table (each "fails").
    pub(super) execs: Vec<(std::path::PathBuf, Table)>,
    /// Answers to kept clients.
    pub(super) answers: Vec<Reply>,
}

impl Host for Fake {
    fn spawn_worker(&mut self, number: u64) -> Result<Pid, String> {
        if self.refuse_spawn {
            return Err("binding its notify socket: Too many open files".into());
        }
        self.next_pid += 1;
        let pid = Pid::from_raw(1000 + self.next_pid);
        self.workers.push((number, pid));
        Ok(pid)
    }
    fn spawn_build(&mut self, number: u64, _script: &str) -> Result<Pid, String> {
        self.next_pid += 1;
        let pid = Pid::from_raw(1000 + self.next_pid);
        self.builds.push((number, pid));
        Ok(pid)
    }
    fn exec_failure(&mut self, pid: Pid) -> Option<String> {
        let i = self.exec_failures.iter().position(|(p, _)| *p == pid)?;
        Some(self.exec_failures.remove(i).1)
    }
    fn forget(&mut self, _number: u64) {}
    fn abandon_build_output(&mut self, _number: u64) {}
    fn send(
        &mut self,
        number: u64,
        message: &SupervisorMessage,
        _fds: &[BorrowedFd<'_>],
    ) -> Result<(), ProtocolError> {
        if self.unreachable.contains(&number) {
            return Err(ProtocolError::Closed);
        }
        self.sent.push((number, message.clone()));
        Ok(())
    }
    fn welcome(&mut self, number: u64) -> Result<(), ProtocolError> {
        let welcome = SupervisorMessage::Welcome {
            protocol: PROTOCOL_VERSION,
            generation: number,
            listeners: Vec::new(),
        };
        self.send(number, &welcome, &[])
    }
    fn signal(&mut self, pid: Pid, signal: Signal) -> Result<(), nix::Error> {
        self.signals.push((pid, signal));
        Ok(())
    }
    fn kill(&mut self, pid: Pid) {
        self.killed.push(pid);
    }
    fn reap(&mut self) -> Vec<(Pid, Exit)> {
        std::mem::take(&mut self.exited)
    }
    fn arm(&mut self, delay: Duration, event: Event) -> TimerId {
        self.next_timer += 1;
        self.timers.push((self.next_timer, delay, event));
        self.next_timer
    }
    fn cancel(&mut self, timer: TimerId) {
        self.timers.retain(|(id, _, _)| *id != timer);
    }
    fn systemd(&mut self, message: &str) {
        self.systemd.push(message.to_owned());
    }
    fn systemd_reloading(&mut self, status: &str) {
        self.systemd.push(format!("RELOADING=1\nSTATUS={status}"));
    }
    fn store_kept(&mut self, snapshot: Option<BorrowedFd<'_>>) {
        self.stored_kept.push(snapshot.is_some());
    }
    fn listeners(&self) -> Vec<ListenerStatus> {
        Vec::new()
    }
    fn steer_to(&mut self, number: u64) {
        self.steered.push(number);
    }
    fn steered_queue(&self, number: u64) -> bool {
        self.queued.contains(&number)
    }
    fn default_binary(&self) -> std::path::PathBuf {
        "/usr/bin/baton".into()
    }
    fn spawn_preflight(&mut self, binary: &std::path::Path, table: &Table) -> Result<Pid, String> {
        self.next_pid += 1;
        let pid = Pid::from_raw(1000 + self.next_pid);
        self.preflights.push((pid, binary.into(), table.clone()));
        Ok(pid)
    }
    fn preflight_verdict(&mut self, _pid: Pid, _exit: Exit) -> Result<String, String> {
        self.verdict.take().unwrap_or_else(|| Ok("9.9.9".into()))
    }
    fn exec(&mut self, binary: &std::path::Path, table: Table) -> String {
        self.execs.push((binary.into(), table));
        "executing it: the fake host cannot".into()
    }
    fn answer(&mut self, _client: OwnedFd, reply: Reply) {
        self.answers.push(reply);
    }
}

pub(super) fn config() -> Config {
    Config {
        listeners: Vec::new(),
        command: WorkerCommand {
            program: "worker".into(),
            argv: vec!["worker".into()],
        },
        control: "/nonexistent/baton.sock".into(),
        ready_timeout: Duration::from_secs(30),
        readiness: Readiness::Notify,
        drain_signal: Signal::SIGTERM,
        drain_timeout: Duration::from_secs(30),
        max_draining: 8,
        watch: Vec::new(),
        debounce: Duration::from_millis(300),
        build: None,
        user: None,
        group: None,
        max_state: 1 << 20,
        freeze_timeout: Duration::from_secs(10),
        freeze_grace: Duration::from_secs(2),
        stop_timeout: None,
        steer_grace: None,
        metrics: None,
    }
}

/// A supervisor on a fake host, and the tests' ways to play the world.
pub(super) struct Rig {
    pub(super) sv: Supervisor<Fake>,
}

impl Rig {
    /// Generation 1 started (not ready yet).
    pub(super) fn new(config: Config) -> Rig {
        let mut sv = Supervisor::new(config, Fake::default());
        sv.start();
        Rig { sv }
    }

    /// Generation 1 serving.
    pub(super) fn serving() -> Rig {
        let mut rig = Rig::new(config());
        rig.ready(1);
        rig
    }

    pub(super) fn host(&mut self) -> &mut Fake {
        &mut self.sv.host
    }

    pub(super) fn pid(&self, generation: u64) -> Pid {
        self.sv
            .host
            .workers
            .iter()
            .find(|(g, _)| *g == generation)
            .map(|(_, p)| *p)
            .unwrap_or_else(|| panic!("generation {generation} was never started"))
    }

    pub(super) fn ready(&mut self, generation: u64) {
        self.sv.handle(Event::Notify {
            generation,
            message: NotifyMessage {
                ready: true,
                ..NotifyMessage::default()
            },
        });
    }

    pub(super) fn say(&mut self, generation: u64, message: WorkerMessage) {
        self.say_with(generation, message, Vec::new());
    }

    pub(super) fn say_with(&mut self, generation: u64, message: WorkerMessage, fds: Vec<OwnedFd>) {
        self.sv.handle(Event::Channel {
            generation,
            message: Ok(message),
            fds,
        });
    }

    pub(super) fn hello(&mut self, generation: u64) {
        let pid = self.pid(generation).as_raw() as u32;
        self.say(
            generation,
            WorkerMessage::Hello {
                protocol: PROTOCOL_VERSION,
                pid,
                pre_copy: true,
            },
        );
    }

    pub(super) fn exit(&mut self, generation: u64, exit: Exit) {
        let pid = self.pid(generation);
        self.exit_pid(pid, exit);
    }

    pub(super) fn exit_pid(&mut self, pid: Pid, exit: Exit) {
        self.host().exited.push((pid, exit));
        self.sv.handle(Event::Child);
    }

    pub(super) fn request(&mut self, request: Request) -> oneshot::Receiver<Reply> {
        let (reply, answer) = oneshot::channel();
        self.sv.handle(Event::Control { request, reply });
        answer
    }

    pub(super) fn reload(&mut self) -> oneshot::Receiver<Reply> {
        self.request(Request::Reload { wait: true })
    }

    /// The build of generation `generation` (the `index`th build run)
    /// exits with `exit` and its output ends with `tail`.
    pub(super) fn build_ends(&mut self, index: usize, generation: u64, exit: Exit, tail: &str) {
        let (_, build) = self.host().builds[index];
        self.exit_pid(build, exit);
        self.sv.handle(Event::BuildOutput {
            generation,
            tail: tail.into(),
        });
    }

    pub(super) fn status(&mut self) -> Status {
        match self.request(Request::Status).try_recv() {
            Ok(Reply::Status(status)) => *status,
            other => panic!("not a status: {other:?}"),
        }
    }

    pub(super) fn phase(&mut self, generation: u64) -> Option<Phase> {
        self.sv.generations.get(generation).map(|g| g.phase)
    }

    pub(super) fn step(&mut self) -> Option<Step> {
        self.status().reloading.map(|r| r.step)
    }

    /// Fires the pending timer whose event `matches`.
    pub(super) fn fire(&mut self, matches: impl Fn(&Event) -> bool) {
        let i = self
            .host()
            .timers
            .iter()
            .position(|(_, _, e)| matches(e))
            .expect("no such timer is armed");
        let (_, _, event) = self.host().timers.remove(i);
        self.sv.handle(event);
    }

    pub(super) fn fire_timer(&mut self, generation: u64, timer: Timer) {
        self.fire(|e| {
            matches!(e, Event::Timer { generation: g, timer: t } if *g == generation && *t == timer)
        });
    }

    pub(super) fn drained_by_signal(&self, generation: u64) -> bool {
        let pid = self.pid(generation);
        self.sv.host.signals.contains(&(pid, Signal::SIGTERM))
    }

    pub(super) fn sent_to(&self, generation: u64) -> Vec<SupervisorMessage> {
        self.sv
            .host
            .sent
            .iter()
            .filter(|(g, _)| *g == generation)
            .map(|(_, m)| m.clone())
            .collect()
    }
}

pub(super) fn outcome(answer: &mut oneshot::Receiver<Reply>) -> crate::api::ReloadOutcome {
    match answer.try_recv() {
        Ok(Reply::Reload(outcome)) => outcome,
        other => panic!("no reload outcome yet: {other:?}"),
    }
}

/// A sealed memfd of `bytes` bytes, as a worker's snapshot.
pub(super) fn snapshot(bytes: usize) -> OwnedFd {
    let fd = nix::sys::memfd::memfd_create(
        c"test-snapshot",
        nix::sys::memfd::MFdFlags::MFD_CLOEXEC | nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING,
    )
    .expect("memfd_create");
    nix::unistd::write(&fd, &vec![b'x'; bytes]).expect("write");
    let seals = nix::fcntl::SealFlag::from_bits_truncate(SNAPSHOT_SEALS);
    nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_ADD_SEALS(seals)).expect("seal");
    fd
}
