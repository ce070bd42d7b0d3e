//! The event loop driven with a fake host: every transition of a reload, a
//! crash restart and a kept-value hand-over, and the edge cases found so
//! far, in milliseconds. The fake starts nothing: it hands out pids, records
//! what the loop asked for (signals, kills, messages, timers, systemd), and
//! the tests play the workers, the reaper and the clock by handing the loop
//! the events the real host would.

use std::collections::HashSet;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::Duration;

use baton_worker::protocol::{
    ProtocolError, StateSource, SupervisorMessage, WorkerMessage, PROTOCOL_VERSION, SNAPSHOT_SEALS,
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

/// What the loop asked of the outside world.
#[derive(Default)]
struct Fake {
    next_pid: i32,
    /// Generation → its worker's pid, in start order.
    workers: Vec<(u64, Pid)>,
    builds: Vec<(u64, Pid)>,
    /// Spawns fail while set.
    refuse_spawn: bool,
    /// Sends to these generations fail (their channel is gone).
    unreachable: HashSet<u64>,
    sent: Vec<(u64, SupervisorMessage)>,
    signals: Vec<(Pid, Signal)>,
    killed: Vec<Pid>,
    /// What the next `reap` returns.
    exited: Vec<(Pid, Exit)>,
    exec_failures: Vec<(Pid, String)>,
    timers: Vec<(TimerId, Duration, Event)>,
    next_timer: TimerId,
    systemd: Vec<String>,
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
    fn listeners(&self) -> Vec<ListenerStatus> {
        Vec::new()
    }
}

fn config() -> Config {
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
    }
}

/// A supervisor on a fake host, and the tests' ways to play the world.
struct Rig {
    sv: Supervisor<Fake>,
}

impl Rig {
    /// Generation 1 started (not ready yet).
    fn new(config: Config) -> Rig {
        let mut sv = Supervisor::new(config, Fake::default());
        sv.start();
        Rig { sv }
    }

    /// Generation 1 serving.
    fn serving() -> Rig {
        let mut rig = Rig::new(config());
        rig.ready(1);
        rig
    }

    fn host(&mut self) -> &mut Fake {
        &mut self.sv.host
    }

    fn pid(&self, generation: u64) -> Pid {
        self.sv
            .host
            .workers
            .iter()
            .find(|(g, _)| *g == generation)
            .map(|(_, p)| *p)
            .unwrap_or_else(|| panic!("generation {generation} was never started"))
    }

    fn ready(&mut self, generation: u64) {
        self.sv.handle(Event::Notify {
            generation,
            message: NotifyMessage {
                ready: true,
                ..NotifyMessage::default()
            },
        });
    }

    fn say(&mut self, generation: u64, message: WorkerMessage) {
        self.say_with(generation, message, Vec::new());
    }

    fn say_with(&mut self, generation: u64, message: WorkerMessage, fds: Vec<OwnedFd>) {
        self.sv.handle(Event::Channel {
            generation,
            message: Ok(message),
            fds,
        });
    }

    fn hello(&mut self, generation: u64) {
        let pid = self.pid(generation).as_raw() as u32;
        self.say(
            generation,
            WorkerMessage::Hello {
                protocol: PROTOCOL_VERSION,
                pid,
            },
        );
    }

    fn exit(&mut self, generation: u64, exit: Exit) {
        let pid = self.pid(generation);
        self.exit_pid(pid, exit);
    }

    fn exit_pid(&mut self, pid: Pid, exit: Exit) {
        self.host().exited.push((pid, exit));
        self.sv.handle(Event::Child);
    }

    fn request(&mut self, request: Request) -> oneshot::Receiver<Reply> {
        let (reply, answer) = oneshot::channel();
        self.sv.handle(Event::Control { request, reply });
        answer
    }

    fn reload(&mut self) -> oneshot::Receiver<Reply> {
        self.request(Request::Reload { wait: true })
    }

    fn status(&mut self) -> Status {
        match self.request(Request::Status).try_recv() {
            Ok(Reply::Status(status)) => *status,
            other => panic!("not a status: {other:?}"),
        }
    }

    fn phase(&mut self, generation: u64) -> Option<Phase> {
        self.sv.generations.get(generation).map(|g| g.phase)
    }

    fn step(&mut self) -> Option<Step> {
        self.status().reloading.map(|r| r.step)
    }

    /// Fires the pending timer whose event `matches`.
    fn fire(&mut self, matches: impl Fn(&Event) -> bool) {
        let i = self
            .host()
            .timers
            .iter()
            .position(|(_, _, e)| matches(e))
            .expect("no such timer is armed");
        let (_, _, event) = self.host().timers.remove(i);
        self.sv.handle(event);
    }

    fn fire_timer(&mut self, generation: u64, timer: Timer) {
        self.fire(|e| {
            matches!(e, Event::Timer { generation: g, timer: t } if *g == generation && *t == timer)
        });
    }

    fn drained_by_signal(&self, generation: u64) -> bool {
        let pid = self.pid(generation);
        self.sv.host.signals.contains(&(pid, Signal::SIGTERM))
    }

    fn sent_to(&self, generation: u64) -> Vec<SupervisorMessage> {
        self.sv
            .host
            .sent
            .iter()
            .filter(|(g, _)| *g == generation)
            .map(|(_, m)| m.clone())
            .collect()
    }
}

fn outcome(answer: &mut oneshot::Receiver<Reply>) -> crate::api::ReloadOutcome {
    match answer.try_recv() {
        Ok(Reply::Reload(outcome)) => outcome,
        other => panic!("no reload outcome yet: {other:?}"),
    }
}

/// A sealed memfd of `bytes` bytes, as a worker's snapshot.
fn snapshot(bytes: usize) -> OwnedFd {
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

// ---- starting and reloading --------------------------------------------

#[test]
fn the_first_generation_serves_once_ready_and_systemd_hears_ready() {
    let mut rig = Rig::new(config());
    assert_eq!(rig.phase(1), Some(Phase::Starting));
    assert_eq!(rig.step(), Some(Step::Starting));
    rig.ready(1);
    assert_eq!(rig.phase(1), Some(Phase::Serving));
    assert_eq!(rig.status().generation, Some(1));
    assert!(rig.host().systemd.iter().any(|m| m.starts_with("READY=1")));
    // Its start-up deadlines are gone.
    assert!(rig.host().timers.is_empty());
}

#[test]
fn a_failed_first_generation_stops_baton_with_the_reason() {
    let mut rig = Rig::new(config());
    rig.exit(1, Exit::Code(3));
    assert!(rig.sv.is_done());
    let reason = rig.sv.finish().expect_err("a failed first start");
    assert!(
        reason.contains("exited with status 3 before it was ready"),
        "{reason}"
    );
    assert!(!rig.host().systemd.iter().any(|m| m.starts_with("READY=1")));
}

#[test]
fn an_exec_failure_is_the_reason_not_the_exit_status() {
    let mut rig = Rig::new(config());
    let pid = rig.pid(1);
    rig.host()
        .exec_failures
        .push((pid, "exec: No such file or directory".into()));
    rig.exit(1, Exit::Code(127));
    let reason = rig.sv.finish().expect_err("failed");
    assert!(
        reason.contains("exec: No such file or directory"),
        "{reason}"
    );
}

#[test]
fn the_old_generation_drains_only_once_the_new_one_is_ready() {
    let mut rig = Rig::serving();
    let mut answer = rig.reload();
    assert_eq!(rig.phase(2), Some(Phase::Starting));
    assert!(
        !rig.drained_by_signal(1),
        "drained before its successor was ready"
    );
    assert!(answer.try_recv().is_err(), "answered before the outcome");
    rig.ready(2);
    assert!(rig.drained_by_signal(1));
    assert_eq!(rig.phase(1), Some(Phase::Draining));
    let result = outcome(&mut answer);
    assert!(result.ok && result.generation == 2, "{result:?}");
    assert_eq!(rig.status().reloads.ok, 1);
    assert!(rig
        .host()
        .systemd
        .iter()
        .any(|m| m.starts_with("RELOADING=1")));
    // Its drain deadline kills it.
    rig.fire_timer(1, Timer::DrainTimeout);
    let pid = rig.pid(1);
    assert!(rig.host().killed.contains(&pid));
    rig.exit(1, Exit::Signal(Signal::SIGKILL));
    assert_eq!(rig.phase(1), None);
}

#[test]
fn a_new_generation_that_dies_or_times_out_fails_and_the_old_serves_on() {
    let mut rig = Rig::serving();
    let mut answer = rig.reload();
    rig.exit(2, Exit::Code(3));
    let result = outcome(&mut answer);
    assert!(!result.ok);
    assert!(result.error.unwrap_or_default().contains("status 3"));
    assert_eq!(rig.phase(1), Some(Phase::Serving));
    assert!(!rig.drained_by_signal(1));
    // No restart: generation 1 serves.
    assert!(!rig
        .host()
        .timers
        .iter()
        .any(|(_, _, e)| matches!(e, Event::RestartDue { .. })));

    let mut answer = rig.reload();
    rig.fire_timer(3, Timer::ReadyTimeout);
    let result = outcome(&mut answer);
    assert!(result.error.unwrap_or_default().contains("--ready-timeout"));
    // It may have accepted connections: it drains before it is killed.
    assert!(rig.drained_by_signal(3));
    assert_eq!(rig.phase(1), Some(Phase::Serving));
    assert_eq!(rig.status().reloads.failed, 2);
}

#[test]
fn reloads_asked_for_during_a_reload_coalesce_into_one() {
    let mut rig = Rig::serving();
    let mut first = rig.reload();
    let mut second = rig.reload();
    let mut third = rig.reload();
    assert!(rig.status().reload_queued);
    rig.ready(2);
    assert_eq!(outcome(&mut first).generation, 2);
    // One queued reload for both, already started.
    assert_eq!(rig.phase(3), Some(Phase::Starting));
    assert_eq!(rig.phase(4), None);
    rig.ready(3);
    assert_eq!(outcome(&mut second).generation, 3);
    assert_eq!(outcome(&mut third).generation, 3);
}

#[test]
fn reloads_wait_while_max_draining_generations_drain() {
    let mut rig = Rig::new(Config {
        max_draining: 1,
        ..config()
    });
    rig.ready(1);
    rig.reload();
    rig.ready(2);
    // Generation 1 drains: the next reload waits for it.
    let mut waiting = rig.reload();
    assert_eq!(rig.phase(3), None);
    assert!(rig.status().reload_queued);
    rig.exit(1, Exit::Code(0));
    assert_eq!(rig.phase(3), Some(Phase::Starting));
    rig.ready(3);
    assert!(outcome(&mut waiting).ok);
}

#[test]
fn ready_after_a_fallback_delay_for_workers_that_never_notify() {
    let mut rig = Rig::new(Config {
        readiness: Readiness::After(Duration::from_millis(500)),
        ..config()
    });
    rig.fire_timer(1, Timer::ReadyAfter);
    assert_eq!(rig.phase(1), Some(Phase::Serving));
}

// ---- the build step ----------------------------------------------------

#[test]
fn a_build_gates_the_start_and_a_failed_one_keeps_the_old_generation() {
    let mut rig = Rig::new(Config {
        build: Some("make".into()),
        ..config()
    });
    assert_eq!(rig.step(), Some(Step::Building));
    let (_, build) = rig.host().builds[0];
    // Exit first, output after: started only when both are in.
    rig.exit_pid(build, Exit::Code(0));
    assert!(rig.host().workers.is_empty());
    rig.sv.handle(Event::BuildOutput {
        generation: 1,
        tail: "ok".into(),
    });
    assert_eq!(rig.phase(1), Some(Phase::Starting));
    rig.ready(1);

    let mut answer = rig.reload();
    let (_, build) = rig.host().builds[1];
    rig.sv.handle(Event::BuildOutput {
        generation: 2,
        tail: "error[E0425]: cannot find value".into(),
    });
    rig.exit_pid(build, Exit::Code(101));
    let error = outcome(&mut answer).error.unwrap_or_default();
    assert!(error.contains("exited with status 101"), "{error}");
    assert!(error.contains("cannot find value"), "{error}");
    assert_eq!(rig.phase(2), None, "a failed build starts nothing");
    assert_eq!(rig.phase(1), Some(Phase::Serving));
}

#[test]
fn a_build_whose_output_stays_open_goes_on_a_moment_after_its_exit() {
    let mut rig = Rig::new(Config {
        build: Some("make &".into()),
        ..config()
    });
    let (_, build) = rig.host().builds[0];
    rig.exit_pid(build, Exit::Code(0));
    rig.fire(|e| matches!(e, Event::BuildOutputLate { generation: 1 }));
    assert_eq!(rig.phase(1), Some(Phase::Starting));
}

#[test]
fn a_build_sh_cannot_run_fails_with_the_exec_reason() {
    let mut rig = Rig::serving();
    rig.sv.config.build = Some("make".into());
    let mut answer = rig.reload();
    let (_, build) = rig.host().builds[0];
    rig.host()
        .exec_failures
        .push((build, "exec: Permission denied".into()));
    rig.exit_pid(build, Exit::Code(127));
    rig.sv.handle(Event::BuildOutput {
        generation: 2,
        tail: String::new(),
    });
    let error = outcome(&mut answer).error.unwrap_or_default();
    assert!(
        error.contains("could not start: exec: Permission denied"),
        "{error}"
    );
}

// ---- crash restarts ------------------------------------------------------

#[test]
fn a_crashed_serving_worker_restarts_with_growing_back_off() {
    let mut rig = Rig::serving();
    let mut delays = Vec::new();
    for generation in 1..=3 {
        rig.exit(generation, Exit::Signal(Signal::SIGKILL));
        assert_eq!(rig.status().generation, None);
        let delay = rig
            .host()
            .timers
            .iter()
            .find_map(|(_, d, e)| matches!(e, Event::RestartDue { .. }).then_some(*d))
            .expect("a restart is armed");
        delays.push(delay);
        rig.fire(|e| matches!(e, Event::RestartDue { .. }));
        assert_eq!(
            rig.status().restarting.map(|r| r.generation),
            Some(generation + 1)
        );
        rig.ready(generation + 1);
        assert_eq!(rig.status().restarting, None);
    }
    assert_eq!(delays, [100, 200, 400].map(Duration::from_millis).to_vec());
    // A restart is not a reload: no RELOADING=1.
    assert!(!rig
        .host()
        .systemd
        .iter()
        .any(|m| m.starts_with("RELOADING")));
}

#[test]
fn a_crash_during_a_build_restarts_at_once_beside_it() {
    let mut rig = Rig::serving();
    rig.sv.config.build = Some("make".into());
    let mut answer = rig.reload();
    assert_eq!(rig.step(), Some(Step::Building));
    rig.exit(1, Exit::Signal(Signal::SIGKILL));
    rig.fire(|e| matches!(e, Event::RestartDue { .. }));
    // Generation 2 is the reload's; the restart is 3, beside the build.
    assert_eq!(rig.phase(3), Some(Phase::Starting));
    rig.ready(3);
    assert_eq!(rig.status().generation, Some(3));
    assert_eq!(rig.step(), Some(Step::Building));
    // The build ends: the reload's generation replaces the restarted one.
    let (_, build) = rig.host().builds[0];
    rig.exit_pid(build, Exit::Code(0));
    rig.sv.handle(Event::BuildOutput {
        generation: 2,
        tail: String::new(),
    });
    rig.ready(2);
    assert!(outcome(&mut answer).ok);
    assert_eq!(rig.phase(3), Some(Phase::Draining));
}

#[test]
fn a_crash_while_a_slow_successor_starts_restarts_beside_it_and_the_first_ready_serves() {
    let mut rig = Rig::serving();
    let mut answer = rig.reload();
    rig.exit(1, Exit::Signal(Signal::SIGKILL));
    rig.fire(|e| matches!(e, Event::RestartDue { .. }));
    assert_eq!(rig.phase(3), Some(Phase::Starting));
    // The reload's generation is ready first: the restart is not needed.
    rig.ready(2);
    assert!(outcome(&mut answer).ok);
    assert_eq!(rig.phase(3), Some(Phase::Draining));
    assert_eq!(rig.status().restarting, None);
}

#[test]
fn a_reload_triggered_while_a_crash_restart_waits_is_a_reload() {
    let mut rig = Rig::serving();
    rig.sv.config.build = Some("make".into());
    rig.exit(1, Exit::Code(1));
    let mut answer = rig.reload();
    // It builds, and systemd hears of it.
    assert_eq!(rig.step(), Some(Step::Building));
    assert!(rig
        .host()
        .systemd
        .iter()
        .any(|m| m.starts_with("RELOADING=1")));
    let (_, build) = rig.host().builds[0];
    rig.exit_pid(build, Exit::Code(0));
    rig.sv.handle(Event::BuildOutput {
        generation: 2,
        tail: String::new(),
    });
    rig.ready(2);
    assert!(outcome(&mut answer).ok);
    // The back-off timer, when it fires, finds a generation serving.
    rig.fire(|e| matches!(e, Event::RestartDue { .. }));
    assert_eq!(rig.phase(3), None);
}

#[test]
fn a_restart_that_serves_after_a_reload_took_kept_values_sends_the_reload_round_again() {
    let mut rig = Rig::serving();
    rig.hello(1);
    let mut answer = rig.reload();
    rig.hello(2);
    rig.say(2, WorkerMessage::TakeState);
    // Generation 1 dies frozen: 2 gets the last checkpoint (nothing).
    rig.exit(1, Exit::Signal(Signal::SIGKILL));
    assert!(rig.sent_to(2).iter().any(|m| matches!(
        m,
        SupervisorMessage::State {
            source: StateSource::None,
            ..
        }
    )));
    rig.fire(|e| matches!(e, Event::RestartDue { .. }));
    rig.ready(3);
    // Generation 3 now serves values 2 does not have: 2 fails, the reload
    // goes round again (generation 4), and the waiter hears of that one.
    assert_eq!(rig.phase(2), Some(Phase::Draining));
    assert_eq!(rig.phase(4), Some(Phase::Starting));
    assert!(
        answer.try_recv().is_err(),
        "the waiter waits for the reload that counts"
    );
    rig.ready(4);
    assert_eq!(outcome(&mut answer).generation, 4);
}

// ---- stopping ------------------------------------------------------------

#[test]
fn a_stop_during_the_first_start_is_a_clean_stop() {
    let mut rig = Rig::new(config());
    rig.sv.handle(Event::Signal(Signal::SIGTERM));
    assert!(rig.drained_by_signal(1));
    rig.exit(1, Exit::Code(0));
    assert!(rig.sv.is_done());
    assert_eq!(rig.sv.finish(), Ok(()));
    assert_eq!(
        rig.host().systemd.last().map(String::as_str),
        Some("STOPPING=1")
    );
}

#[test]
fn a_repeated_stop_waits_for_the_drain_and_only_now_or_a_second_signal_kills() {
    let mut rig = Rig::serving();
    let mut first = rig.request(Request::Stop { now: false });
    let mut second = rig.request(Request::Stop { now: false });
    assert!(rig.host().killed.is_empty(), "a repeated stop killed");
    assert!(rig.drained_by_signal(1));
    // A reload is refused while stopping.
    let mut refused = rig.reload();
    assert!(matches!(refused.try_recv(), Ok(Reply::Refused(_))));
    rig.request(Request::Stop { now: true });
    let pid = rig.pid(1);
    assert!(rig.host().killed.contains(&pid));
    rig.exit(1, Exit::Signal(Signal::SIGKILL));
    assert!(rig.sv.is_done());
    rig.sv.finish().expect("a clean stop");
    assert!(matches!(first.try_recv(), Ok(Reply::Stopped)));
    assert!(matches!(second.try_recv(), Ok(Reply::Stopped)));

    let mut rig = Rig::serving();
    rig.sv.handle(Event::Signal(Signal::SIGINT));
    assert!(rig.host().killed.is_empty());
    rig.sv.handle(Event::Signal(Signal::SIGTERM));
    let pid = rig.pid(1);
    assert!(rig.host().killed.contains(&pid));
}

// ---- worker messages -----------------------------------------------------

#[test]
fn sdk_workers_are_welcomed_once_and_drained_by_message() {
    let mut rig = Rig::new(config());
    rig.hello(1);
    assert!(matches!(
        rig.sent_to(1).as_slice(),
        [SupervisorMessage::Welcome { .. }]
    ));
    rig.say(1, WorkerMessage::Ready);
    rig.reload();
    rig.ready(2);
    assert!(rig
        .sent_to(1)
        .iter()
        .any(|m| matches!(m, SupervisorMessage::Drain { .. })));
    assert!(!rig.drained_by_signal(1));
    // A second hello from a serving worker is ignored, not a second welcome.
    rig.hello(2);
    rig.say(2, WorkerMessage::Ready);
    rig.hello(2);
    let welcomes = rig
        .sent_to(2)
        .iter()
        .filter(|m| matches!(m, SupervisorMessage::Welcome { .. }))
        .count();
    assert_eq!(welcomes, 1);
    assert_eq!(rig.phase(2), Some(Phase::Serving));
}

#[test]
fn malformed_data_fails_a_starting_generation_and_is_ignored_from_a_serving_one() {
    let mut rig = Rig::serving();
    rig.hello(1);
    let garbage = || {
        Err(ProtocolError::Malformed {
            excerpt: "{{{".into(),
            source: serde_json::from_str::<u8>("{{{").expect_err("garbage"),
        })
    };
    rig.sv.handle(Event::Channel {
        generation: 1,
        message: garbage(),
        fds: Vec::new(),
    });
    assert_eq!(rig.phase(1), Some(Phase::Serving));
    let mut answer = rig.reload();
    rig.sv.handle(Event::Channel {
        generation: 2,
        message: garbage(),
        fds: Vec::new(),
    });
    assert!(!outcome(&mut answer).ok);
    // Generation 1 still speaks: the next reload freezes it.
    rig.reload();
    rig.hello(3);
    rig.say(3, WorkerMessage::TakeState);
    assert!(rig
        .sent_to(1)
        .iter()
        .any(|m| matches!(m, SupervisorMessage::Freeze)));
}

#[test]
fn a_worker_status_shows_and_its_stopping_is_never_forwarded() {
    let mut rig = Rig::serving();
    rig.sv.handle(Event::Notify {
        generation: 1,
        message: NotifyMessage {
            stopping: true,
            status: Some("42 clients".into()),
            ..NotifyMessage::default()
        },
    });
    assert_eq!(
        rig.status().generations[0].status.as_deref(),
        Some("42 clients")
    );
    assert!(!rig.host().systemd.iter().any(|m| m.contains("STOPPING")));
}

// ---- kept values -----------------------------------------------------------

/// Generation 1 serving and speaking the protocol; a reload to 2 asked for
/// its values, so 1 is frozen.
fn frozen() -> (Rig, oneshot::Receiver<Reply>) {
    let mut rig = Rig::serving();
    rig.hello(1);
    let answer = rig.reload();
    rig.hello(2);
    rig.say(2, WorkerMessage::TakeState);
    assert!(rig
        .sent_to(1)
        .iter()
        .any(|m| matches!(m, SupervisorMessage::Freeze)));
    assert_eq!(rig.step(), Some(Step::AwaitingSnapshot));
    assert!(rig.status().generations[0].frozen);
    (rig, answer)
}

#[test]
fn ready_before_the_snapshot_arrived_waits_for_it() {
    let (mut rig, mut answer) = frozen();
    rig.say(2, WorkerMessage::Ready);
    assert_eq!(rig.step(), Some(Step::ReadyPending));
    assert_eq!(
        rig.phase(1),
        Some(Phase::Serving),
        "drained before handing over"
    );
    rig.say_with(1, WorkerMessage::Frozen { bytes: 64 }, vec![snapshot(64)]);
    // The snapshot went on, and only then did 2 serve and 1 drain.
    assert!(rig.sent_to(2).iter().any(|m| matches!(
        m,
        SupervisorMessage::State {
            source: StateSource::Snapshot,
            bytes: 64,
            ..
        }
    )));
    assert_eq!(rig.phase(2), Some(Phase::Serving));
    assert_eq!(rig.phase(1), Some(Phase::Draining));
    assert!(outcome(&mut answer).ok);
    let last = rig.status().last_reload.expect("a last reload");
    assert!(last.accept_pause_ms.is_some());
    assert_eq!(rig.status().kept.map(|k| k.bytes), Some(64));
}

#[test]
fn the_steps_of_a_hand_over_show_in_status() {
    let (mut rig, mut answer) = frozen();
    rig.say_with(1, WorkerMessage::Frozen { bytes: 8 }, vec![snapshot(8)]);
    assert_eq!(rig.step(), Some(Step::StartingWithState));
    // An abandoned `keep` asks again: the snapshot is sent again.
    rig.say(2, WorkerMessage::TakeState);
    let states = rig
        .sent_to(2)
        .iter()
        .filter(|m| matches!(m, SupervisorMessage::State { .. }))
        .count();
    assert_eq!(states, 2);
    rig.say(2, WorkerMessage::Ready);
    assert!(outcome(&mut answer).ok);
    assert_eq!(rig.step(), None);
}

#[test]
fn a_repeated_take_state_while_the_snapshot_is_awaited_sends_nothing_older() {
    let (mut rig, _answer) = frozen();
    rig.say(2, WorkerMessage::TakeState);
    assert!(!rig
        .sent_to(2)
        .iter()
        .any(|m| matches!(m, SupervisorMessage::State { .. })));
    // Nor a second freeze.
    let freezes = rig
        .sent_to(1)
        .iter()
        .filter(|m| matches!(m, SupervisorMessage::Freeze))
        .count();
    assert_eq!(freezes, 1);
}

#[test]
fn a_successor_that_fails_or_rejects_thaws_the_frozen_generation() {
    for fail in [
        "exit",
        "reject",
        "freeze timeout",
        "freeze failed",
        "bad snapshot",
    ] {
        let (mut rig, mut answer) = frozen();
        match fail {
            "exit" => rig.exit(2, Exit::Code(1)),
            "reject" => {
                rig.say_with(1, WorkerMessage::Frozen { bytes: 8 }, vec![snapshot(8)]);
                rig.say(
                    2,
                    WorkerMessage::Rejected {
                        reason: "format 2".into(),
                    },
                );
            }
            "freeze timeout" => rig.fire_timer(2, Timer::FreezeTimeout),
            "freeze failed" => rig.say(
                1,
                WorkerMessage::FreezeFailed {
                    reason: "no space".into(),
                },
            ),
            // Claims 100 bytes, the memfd has 8.
            _ => rig.say_with(1, WorkerMessage::Frozen { bytes: 100 }, vec![snapshot(8)]),
        }
        let result = outcome(&mut answer);
        assert!(!result.ok, "{fail}");
        assert!(
            rig.sent_to(1)
                .iter()
                .any(|m| matches!(m, SupervisorMessage::Thaw)),
            "{fail}: no thaw"
        );
        assert!(!rig.status().generations[0].frozen, "{fail}");
        assert_eq!(rig.phase(1), Some(Phase::Serving), "{fail}");
    }
}

#[test]
fn a_failed_thaw_replaces_the_still_frozen_generation() {
    let (mut rig, mut answer) = frozen();
    rig.host().unreachable.insert(1);
    rig.exit(2, Exit::Code(1));
    assert!(!outcome(&mut answer).ok);
    // Still frozen, it accepts nothing: it drains, and a restart is armed.
    assert_eq!(rig.phase(1), Some(Phase::Draining));
    assert!(rig
        .host()
        .timers
        .iter()
        .any(|(_, _, e)| matches!(e, Event::RestartDue { .. })));
}

#[test]
fn a_frozen_generation_that_dies_gives_its_successor_the_last_checkpoint() {
    let mut rig = Rig::serving();
    rig.hello(1);
    rig.say_with(
        1,
        WorkerMessage::Checkpoint { bytes: 16 },
        vec![snapshot(16)],
    );
    let mut answer = rig.reload();
    rig.hello(2);
    rig.say(2, WorkerMessage::TakeState);
    rig.say(2, WorkerMessage::Ready);
    rig.exit(1, Exit::Signal(Signal::SIGKILL));
    assert!(rig.sent_to(2).iter().any(|m| matches!(
        m,
        SupervisorMessage::State {
            source: StateSource::Checkpoint,
            bytes: 16,
            ..
        }
    )));
    // It had said ready: it serves now.
    assert!(outcome(&mut answer).ok);
}

#[test]
fn checkpoints_count_only_from_a_serving_unfrozen_generation() {
    let mut rig = Rig::new(config());
    rig.hello(1);
    // Starting: not its values to keep yet.
    rig.say_with(1, WorkerMessage::Checkpoint { bytes: 8 }, vec![snapshot(8)]);
    assert_eq!(rig.status().kept, None);
    rig.ready(1);
    rig.say_with(1, WorkerMessage::Checkpoint { bytes: 8 }, vec![snapshot(8)]);
    assert_eq!(rig.status().kept.map(|k| k.bytes), Some(8));
    // Frozen: its values moved on.
    rig.reload();
    rig.hello(2);
    rig.say(2, WorkerMessage::TakeState);
    rig.say_with(1, WorkerMessage::Checkpoint { bytes: 9 }, vec![snapshot(9)]);
    assert_eq!(rig.status().kept.map(|k| k.bytes), Some(8));
}

#[test]
fn rejected_from_a_serving_worker_is_only_logged() {
    let mut rig = Rig::serving();
    rig.hello(1);
    rig.say(
        1,
        WorkerMessage::Rejected {
            reason: "late".into(),
        },
    );
    assert_eq!(rig.phase(1), Some(Phase::Serving));
    assert!(rig.host().signals.is_empty());
}

#[test]
fn a_serving_generation_that_cannot_be_asked_for_its_values_fails_the_reload() {
    let mut rig = Rig::serving();
    rig.hello(1);
    rig.say_with(1, WorkerMessage::Checkpoint { bytes: 8 }, vec![snapshot(8)]);
    rig.host().unreachable.insert(1);
    let mut answer = rig.reload();
    rig.hello(2);
    rig.say(2, WorkerMessage::TakeState);
    let error = outcome(&mut answer).error.unwrap_or_default();
    assert!(
        error.contains("asking it to hand them over failed"),
        "{error}"
    );
    // Never the older checkpoint.
    assert!(!rig
        .sent_to(2)
        .iter()
        .any(|m| matches!(m, SupervisorMessage::State { .. })));
}

#[test]
fn a_snapshot_baton_could_not_receive_fails_the_reload_and_a_lost_checkpoint_is_skipped() {
    let lost = |message: WorkerMessage| ProtocolError::OutOfDescriptors {
        limit: 20,
        packet: serde_json::to_string(&message).expect("json"),
    };
    let (mut rig, mut answer) = frozen();
    rig.sv.handle(Event::Channel {
        generation: 1,
        message: Err(lost(WorkerMessage::Checkpoint { bytes: 8 })),
        fds: Vec::new(),
    });
    assert!(
        answer.try_recv().is_err(),
        "a lost checkpoint changes nothing"
    );
    rig.sv.handle(Event::Channel {
        generation: 1,
        message: Err(lost(WorkerMessage::Frozen { bytes: 8 })),
        fds: Vec::new(),
    });
    let error = outcome(&mut answer).error.unwrap_or_default();
    assert!(error.contains("did not reach baton"), "{error}");
    assert!(rig
        .sent_to(1)
        .iter()
        .any(|m| matches!(m, SupervisorMessage::Thaw)));
}

#[test]
fn a_crash_restart_takes_the_last_checkpoint() {
    let mut rig = Rig::serving();
    rig.hello(1);
    rig.say_with(
        1,
        WorkerMessage::Checkpoint { bytes: 32 },
        vec![snapshot(32)],
    );
    rig.exit(1, Exit::Signal(Signal::SIGKILL));
    rig.fire(|e| matches!(e, Event::RestartDue { .. }));
    rig.hello(2);
    rig.say(2, WorkerMessage::TakeState);
    assert!(rig.sent_to(2).iter().any(|m| matches!(
        m,
        SupervisorMessage::State {
            source: StateSource::Checkpoint,
            bytes: 32,
            ..
        }
    )));
}

#[test]
fn a_spawn_that_fails_fails_its_reload_and_the_old_generation_serves() {
    let mut rig = Rig::serving();
    rig.host().refuse_spawn = true;
    let mut answer = rig.reload();
    let error = outcome(&mut answer).error.unwrap_or_default();
    assert!(error.contains("Too many open files"), "{error}");
    assert_eq!(rig.phase(1), Some(Phase::Serving));
    rig.host().refuse_spawn = false;
    let mut answer = rig.reload();
    rig.ready(3);
    assert!(outcome(&mut answer).ok);
}
