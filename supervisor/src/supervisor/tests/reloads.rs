//! Reloads on a fake host: starting, reloading, the build step, crash
//! restarts beside reloads, and stopping.

use std::time::Duration;

use baton_worker::protocol::{StateSource, SupervisorMessage, WorkerMessage};
use nix::sys::signal::Signal;

use super::{config, outcome, Rig};
use crate::api::{Reply, Request, Step};
use crate::event::{Event, Exit, Timer};
use crate::generations::Phase;
use crate::supervisor::{Config, Outcome, Readiness};

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
    let Outcome::FirstGenerationFailed(reason) = rig.sv.finish() else {
        panic!("not a failed first start");
    };
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
    let Outcome::FirstGenerationFailed(reason) = rig.sv.finish() else {
        panic!("not a failed first start");
    };
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
    rig.build_ends(1, 2, Exit::Code(101), "error[E0425]: cannot find value");
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
    rig.build_ends(0, 2, Exit::Code(0), "");
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
    rig.build_ends(0, 2, Exit::Code(0), "");
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
    assert_eq!(rig.sv.finish(), Outcome::Stopped);
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
    assert_eq!(rig.sv.finish(), Outcome::Stopped);
    assert!(matches!(first.try_recv(), Ok(Reply::Stopped)));
    assert!(matches!(second.try_recv(), Ok(Reply::Stopped)));

    let mut rig = Rig::serving();
    rig.sv.handle(Event::Signal(Signal::SIGINT));
    assert!(rig.host().killed.is_empty());
    rig.sv.handle(Event::Signal(Signal::SIGTERM));
    let pid = rig.pid(1);
    assert!(rig.host().killed.contains(&pid));
}

#[test]
fn a_stop_that_outlasts_stop_timeout_kills_what_is_left_and_says_so() {
    let mut rig = Rig::new(Config {
        stop_timeout: Some(Duration::from_secs(5)),
        ..config()
    });
    rig.ready(1);
    rig.sv.handle(Event::Signal(Signal::SIGTERM));
    assert!(rig.host().killed.is_empty());
    rig.fire(|e| matches!(e, Event::StopTimeout));
    let pid = rig.pid(1);
    assert!(rig.host().killed.contains(&pid));
    rig.exit(1, Exit::Signal(Signal::SIGKILL));
    assert_eq!(
        rig.sv.finish(),
        Outcome::StopTimedOut(Duration::from_secs(5))
    );

    // In time: a clean stop, and the late timer changes nothing.
    let mut rig = Rig::new(Config {
        stop_timeout: Some(Duration::from_secs(5)),
        ..config()
    });
    rig.ready(1);
    rig.sv.handle(Event::Signal(Signal::SIGTERM));
    rig.exit(1, Exit::Code(0));
    rig.fire(|e| matches!(e, Event::StopTimeout));
    assert_eq!(rig.sv.finish(), Outcome::Stopped);
}

#[test]
fn sigquit_kills_at_once() {
    let mut rig = Rig::serving();
    rig.sv.handle(Event::Signal(Signal::SIGQUIT));
    let pid = rig.pid(1);
    assert!(rig.host().killed.contains(&pid));
    assert!(rig.status().stopping);
}

#[test]
fn the_published_metrics_follow_the_loop() {
    let mut rig = Rig::serving();
    let (publish, metrics) = tokio::sync::watch::channel(Default::default());
    rig.sv.publish_metrics(publish);
    assert_eq!(metrics.borrow().serving_generation, Some(1));
    let mut answer = rig.reload();
    assert_eq!(metrics.borrow().workers, [1, 1, 0]);
    rig.ready(2);
    assert!(outcome(&mut answer).ok);
    let m = metrics.borrow().clone();
    assert_eq!(
        (m.serving_generation, m.reloads_ok, m.workers),
        (Some(2), 1, [0, 1, 1])
    );
    rig.exit(2, Exit::Signal(Signal::SIGKILL));
    rig.fire(|e| matches!(e, Event::RestartDue { .. }));
    assert_eq!(metrics.borrow().worker_restarts, 1);
}
