//! What workers say, and kept values, on a fake host: the freeze, the
//! snapshot, the thaw, checkpoints, and what baton could not receive.

use baton_worker::protocol::{ProtocolError, StateSource, SupervisorMessage, WorkerMessage};
use nix::sys::signal::Signal;
use tokio::sync::oneshot;

use super::{config, outcome, snapshot, Rig};
use crate::api::{Reply, Step};
use crate::event::{Event, Exit, NotifyMessage, Timer};
use crate::generations::Phase;

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
        .any(|m| matches!(m, SupervisorMessage::Freeze { .. })));
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
        .any(|m| matches!(m, SupervisorMessage::Freeze { .. })));
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
    rig.say_with(
        1,
        WorkerMessage::Frozen {
            bytes: 64,
            base_bytes: None,
        },
        vec![snapshot(64)],
    );
    // The snapshot went on, and only then did 2 serve and 1 drain.
    assert!(rig.sent_to(2).iter().any(|m| matches!(
        m,
        SupervisorMessage::State {
            source: StateSource::Snapshot,
            bytes: 64,
            base_bytes: None,
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
    rig.say_with(
        1,
        WorkerMessage::Frozen {
            bytes: 8,
            base_bytes: None,
        },
        vec![snapshot(8)],
    );
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
        .filter(|m| matches!(m, SupervisorMessage::Freeze { .. }))
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
                rig.say_with(
                    1,
                    WorkerMessage::Frozen {
                        bytes: 8,
                        base_bytes: None,
                    },
                    vec![snapshot(8)],
                );
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
            _ => rig.say_with(
                1,
                WorkerMessage::Frozen {
                    bytes: 100,
                    base_bytes: None,
                },
                vec![snapshot(8)],
            ),
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
            base_bytes: None,
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
        message: Err(lost(WorkerMessage::Frozen {
            bytes: 8,
            base_bytes: None,
        })),
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
            base_bytes: None,
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

#[test]
fn every_new_snapshot_or_checkpoint_goes_to_systemds_store() {
    let (mut rig, _answer) = frozen();
    rig.say_with(
        1,
        WorkerMessage::Frozen {
            bytes: 8,
            base_bytes: None,
        },
        vec![snapshot(8)],
    );
    rig.say(2, WorkerMessage::Ready);
    rig.hello(2);
    rig.say_with(2, WorkerMessage::Checkpoint { bytes: 9 }, vec![snapshot(9)]);
    // An empty snapshot removes what the store held.
    rig.reload();
    rig.hello(3);
    rig.say(3, WorkerMessage::TakeState);
    rig.say(
        2,
        WorkerMessage::Frozen {
            bytes: 0,
            base_bytes: None,
        },
    );
    assert_eq!(rig.host().stored_kept, [true, true, false]);
}
