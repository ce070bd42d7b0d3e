//! Upgrades of baton itself on the fake host: the pre-flight, what waits
//! for what, failures answered with their reason, and the generation
//! table's round trip through the hand-over state (phases, timers with the
//! time they had left, kept values, counters; under `--steer`, the second
//! sockets, sides, target and graces).

use std::time::Duration;

use baton_worker::protocol::WorkerMessage;

use super::{config, snapshot, Fake, Rig};
use crate::api::{Reply, Request};
use crate::event::{Event, Exit, Timer};
use crate::generations::Phase;
use crate::state::Snapshot;
use crate::steer::Side;
use crate::supervisor::Supervisor;
use std::os::fd::IntoRawFd;

use crate::upgrade::state::{CarriedKept, CarriedSteer, Handover, HostFds, STATE_VERSION};

fn upgrade(rig: &mut Rig, binary: &str, wait: bool) {
    let client = wait.then(OwnedFdOf::pipe);
    rig.sv.handle(Event::Upgrade {
        binary: Some(binary.into()),
        client,
    });
}

/// A descriptor to stand for a waiting client's connection.
struct OwnedFdOf;
impl OwnedFdOf {
    fn pipe() -> std::os::fd::OwnedFd {
        nix::unistd::pipe().expect("pipe").0
    }
}

fn step(rig: &mut Rig) -> Option<String> {
    rig.status().upgrading.map(|u| u.step)
}

fn preflight_exits(rig: &mut Rig, exit: Exit) {
    let (pid, _, _) = rig.host().preflights.last().cloned().expect("a pre-flight");
    rig.exit_pid(pid, exit);
}

#[test]
fn the_preflight_runs_first_and_a_failed_exec_leaves_baton_serving() {
    let mut rig = Rig::serving();
    upgrade(&mut rig, "/opt/new/baton", true);
    assert_eq!(step(&mut rig).as_deref(), Some("preflight"));
    assert_eq!(
        rig.host().preflights[0].1,
        std::path::Path::new("/opt/new/baton")
    );
    preflight_exits(&mut rig, Exit::Code(0));
    assert!(rig.sv.upgrade_due());
    assert_eq!(step(&mut rig).as_deref(), Some("exec"));
    rig.sv.exec_upgrade();
    assert_eq!(rig.host().execs.len(), 1);
    // The fake's exec "fails": the upgrade fails, baton serves on.
    let status = rig.status();
    assert_eq!((status.upgrades.ok, status.upgrades.failed), (0, 1));
    assert!(status.upgrading.is_none());
    assert_eq!(rig.phase(1), Some(Phase::Serving));
    match &rig.host().answers[..] {
        [Reply::Upgrade(u)] => {
            assert!(!u.ok);
            assert!(u.error.as_deref().unwrap_or("").contains("fake host"));
        }
        other => panic!("the waiting client got {other:?}"),
    }
}

#[test]
fn a_refused_preflight_fails_the_upgrade_with_its_reason() {
    let mut rig = Rig::serving();
    upgrade(&mut rig, "/bin/false", true);
    rig.host().verdict = Some(Err("its check of the state exited with status 1".into()));
    preflight_exits(&mut rig, Exit::Code(1));
    assert!(!rig.sv.upgrade_due());
    let last = rig.status().last_upgrade.expect("a result");
    assert!(!last.ok);
    assert!(last.error.unwrap_or_default().contains("status 1"));
    assert_eq!(last.binary, "/bin/false");
    assert!(rig.host().execs.is_empty());
}

#[test]
fn an_upgrade_waits_for_a_reload_and_a_reload_waits_for_the_preflight() {
    let mut rig = Rig::serving();
    let mut reload = rig.reload();
    upgrade(&mut rig, "/opt/new/baton", false);
    assert_eq!(step(&mut rig).as_deref(), Some("queued"));
    assert!(rig.host().preflights.is_empty());
    rig.ready(2);
    assert!(super::outcome(&mut reload).ok);
    assert_eq!(step(&mut rig).as_deref(), Some("preflight"));
    // A SIGHUP now waits for the pre-flight.
    rig.sv.handle(Event::Reload);
    assert_eq!(rig.host().workers.len(), 2, "no generation 3 yet");
    assert!(rig.status().reload_queued);
    // A reload nobody waits for crosses the exec.
    preflight_exits(&mut rig, Exit::Code(0));
    rig.sv.exec_upgrade();
    assert!(rig.host().execs[0].1.reload_queued);
    // The exec failed: the reload goes now.
    assert_eq!(rig.host().workers.len(), 3);
}

#[test]
fn a_reload_someone_waits_for_goes_before_the_exec() {
    let mut rig = Rig::serving();
    upgrade(&mut rig, "/opt/new/baton", false);
    let mut reload = rig.reload();
    preflight_exits(&mut rig, Exit::Code(0));
    rig.sv.exec_upgrade();
    assert!(
        rig.host().execs.is_empty(),
        "no exec while a client waits for a reload"
    );
    assert_eq!(rig.host().workers.len(), 2);
    rig.ready(2);
    assert!(super::outcome(&mut reload).ok);
    // Then the upgrade checks the new table again.
    assert_eq!(rig.host().preflights.len(), 2);
}

#[test]
fn a_stop_abandons_the_upgrade_and_kills_its_preflight() {
    let mut rig = Rig::serving();
    upgrade(&mut rig, "/opt/new/baton", true);
    let (pid, _, _) = rig.host().preflights[0].clone();
    drop(rig.request(Request::Stop { now: false }));
    assert!(rig.host().killed.contains(&pid));
    assert!(matches!(&rig.host().answers[..], [Reply::Upgrade(u)] if !u.ok));
    // Asked while stopping: refused at once.
    upgrade(&mut rig, "/opt/new/baton", true);
    assert!(matches!(rig.host().answers.last(), Some(Reply::Refused(_))));
}

#[test]
fn a_second_upgrade_to_another_binary_is_refused() {
    let mut rig = Rig::serving();
    upgrade(&mut rig, "/opt/a/baton", true);
    upgrade(&mut rig, "/opt/b/baton", true);
    assert!(matches!(&rig.host().answers[..], [Reply::Refused(why)] if why.contains("/opt/a")));
    upgrade(&mut rig, "/opt/a/baton", true);
    assert_eq!(rig.host().preflights.len(), 1);
}

#[test]
fn the_table_survives_the_hand_over_state_with_its_deadlines() {
    // Generation 1 drains with its deadline armed, generation 2 serves with
    // a checkpoint kept, and one reload failed before.
    let mut rig = Rig::serving();
    rig.hello(1);
    let mut reload = rig.reload();
    rig.hello(2);
    rig.ready(2);
    assert!(super::outcome(&mut reload).ok);
    rig.say_with(
        2,
        WorkerMessage::Checkpoint { bytes: 12 },
        vec![snapshot(12)],
    );
    rig.sv.handle(Event::Notify {
        generation: 2,
        message: crate::event::NotifyMessage {
            status: Some("42 clients".into()),
            ..Default::default()
        },
    });
    upgrade(&mut rig, "/opt/new/baton", false);
    let table = rig.host().preflights[0].2.clone();
    assert_eq!(table.generations.len(), 2);
    let old = &table.generations[0];
    assert_eq!((old.number, old.phase), (1, Phase::Draining));
    assert_eq!(old.timers.len(), 1);
    assert_eq!(old.timers[0].timer, Timer::DrainTimeout);
    assert!(old.timers[0].remaining_ms <= 30_000 && old.timers[0].remaining_ms > 29_000);

    // Through JSON, as it crosses the exec.
    let state = Handover {
        version: STATE_VERSION,
        baton_version: "0.0.1".into(),
        written_at_ns: 0,
        table: table.clone(),
        host: HostFds {
            listeners: Vec::new(),
            workers: Vec::new(),
            run_dir: "/run/baton-x".into(),
            control: crate::upgrade::state::CarriedControl {
                path: "/run/baton.sock".into(),
                listener: 90_001,
                dir: 90_002,
                lock: 90_003,
            },
            metrics: None,
            default_binary: "/usr/bin/baton".into(),
            steer: None,
        },
    };
    let json = serde_json::to_string(&state).expect("json");
    // An older writer that knew none of the fields added with defaults.
    let mut older: serde_json::Value = serde_json::from_str(&json).expect("json");
    for field in ["reload_queued", "upgrades", "last_upgrade"] {
        older["table"].as_object_mut().expect("table").remove(field);
    }
    let older = Handover::parse(&older.to_string()).expect("an older state reads");
    assert!(!older.table.reload_queued && older.table.upgrades.ok == 0);
    let mut state = Handover::parse(&json).expect("reads");
    // Kept values that are a pair (a pre-copy and the values written
    // since) cross as two memfds and come back as one snapshot.
    let (top, base) = (snapshot(12).into_raw_fd(), snapshot(40).into_raw_fd());
    state.table.kept = Some(CarriedKept {
        generation: 2,
        bytes: 12,
        fd: top,
        base: Some(Box::new(CarriedKept {
            generation: 2,
            bytes: 40,
            fd: base,
            base: None,
        })),
    });
    assert!(state.fds().contains(&top) && state.fds().contains(&base));
    let pair = crate::upgrade::adopt::kept(&state, 1 << 20)
        .expect("a pair crosses")
        .expect("kept values");
    assert_eq!((pair.bytes, pair.total_bytes()), (12, 52));
    state.table.kept = None;

    let mut new = Supervisor::new(config(), Fake::default());
    let kept = Snapshot::accept(2, 12, vec![snapshot(12)], 1 << 20).expect("kept");
    let gap = Duration::from_millis(250);
    new.import(
        state.table,
        gap,
        kept,
        vec![OwnedFdOf::pipe()],
        "0.0.1".into(),
    );
    let status = new.status();
    assert_eq!(status.generation, Some(2));
    assert_eq!(status.generations.len(), 2);
    assert_eq!(status.generations[0].state, Phase::Draining);
    assert_eq!(status.generations[1].status.as_deref(), Some("42 clients"));
    assert_eq!(status.kept.map(|k| (k.generation, k.bytes)), Some((2, 12)));
    assert_eq!(status.reloads.ok, 1);
    assert_eq!((status.upgrades.ok, status.upgrades.failed), (1, 0));
    let last = status.last_upgrade.expect("counted");
    assert!(last.ok && last.from == "0.0.1");
    // The deadline is re-armed with what it had left, less the gap.
    let armed: Vec<_> = new.host.timers.iter().map(|(_, d, e)| (*d, e)).collect();
    match armed[..] {
        [(
            delay,
            Event::Timer {
                generation: 1,
                timer: Timer::DrainTimeout,
            },
        )] => {
            assert!(delay <= Duration::from_millis(old.timers[0].remaining_ms) - gap);
        }
        _ => panic!("armed: {armed:?}"),
    }
    assert!(matches!(&new.host.answers[..], [Reply::Upgrade(u)] if u.ok));
    // The new table exports as the old one did (times aside).
    let again = new.export(&dummy_pending());
    let strip = |t: &crate::upgrade::state::Table| {
        t.generations
            .iter()
            .map(|g| {
                (
                    g.number,
                    g.pid,
                    g.phase,
                    g.speaks_protocol,
                    g.status.clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&again), strip(&table));
    assert_eq!(again.next_generation, table.next_generation);
    // It drains on: the deadline fires, the worker is killed.
    new.handle(Event::Timer {
        generation: 1,
        timer: Timer::DrainTimeout,
    });
    assert_eq!(new.host.killed.len(), 1);
}

fn dummy_pending() -> crate::supervisor::upgrade::Pending {
    crate::supervisor::upgrade::Pending::for_tests("/opt/new/baton".into())
}

#[test]
fn an_older_state_reads_and_a_newer_one_is_refused_with_why() {
    let newer = r#"{"version":99,"baton_version":"9.0.0","later":true}"#;
    let why = Handover::parse(newer).expect_err("refused");
    assert!(why.contains("version 99") && why.contains("newer"), "{why}");
    assert!(Handover::parse("not json")
        .expect_err("refused")
        .contains("not a baton"));
}

#[test]
fn steering_and_a_pending_grace_survive_the_hand_over_state() {
    // --steer: generation 2 took over, generation 1 is in its grace.
    let steer = crate::supervisor::Config {
        steer_grace: Some(Duration::from_millis(250)),
        ..config()
    };
    let mut rig = Rig::new(steer.clone());
    rig.ready(1);
    rig.reload();
    rig.ready(2);
    assert_eq!(rig.host().steered, [1, 2]);
    assert!(!rig.drained_by_signal(1));
    upgrade(&mut rig, "/opt/new/baton", false);
    let table = rig.host().preflights[0].2.clone();
    assert_eq!(table.steer_graced.len(), 1);
    assert_eq!(table.steer_graced[0].generation, 1);
    let grace = &table.generations[0].timers;
    assert!(
        matches!(grace[..], [t] if t.timer == Timer::SteerGrace && t.remaining_ms <= 250),
        "{grace:?}"
    );

    // The host's side: generation 1 on the listener's own socket, 2 on the
    // twin, new connections to the twin.
    let state = Handover {
        version: STATE_VERSION,
        baton_version: "0.0.1".into(),
        written_at_ns: 0,
        table,
        host: HostFds {
            listeners: vec![("web".into(), 90_020)],
            workers: Vec::new(),
            run_dir: "/run/baton-x".into(),
            control: crate::upgrade::state::CarriedControl {
                path: "/run/baton.sock".into(),
                listener: 90_001,
                dir: 90_002,
                lock: 90_003,
            },
            metrics: None,
            default_binary: "/usr/bin/baton".into(),
            steer: Some(CarriedSteer {
                twins: vec![(0, 90_010)],
                sides: vec![(1, Side::A), (2, Side::B)],
                target: Side::B,
            }),
        },
    };
    assert!(state.fds().contains(&90_010), "the twin crosses the exec");
    let json = serde_json::to_string(&state).expect("json");
    let read = Handover::parse(&json).expect("reads");
    assert_eq!(read, state);
    // A twin of a listener the state does not carry is refused by name.
    let mut bad = state.clone();
    bad.host.steer.as_mut().expect("steer").twins[0].0 = 3;
    let why = Handover::parse(&serde_json::to_string(&bad).expect("json")).expect_err("refused");
    assert!(why.contains("listener 3"), "{why}");
    // Without --steer the state is what a baton before it wrote (no new
    // key), and such a state still reads.
    let mut plain = state.clone();
    plain.host.steer = None;
    plain.table.steer_graced.clear();
    let plain = serde_json::to_string(&plain).expect("json");
    assert!(
        !plain.contains("\"steer\"") && !plain.contains("steer_graced"),
        "{plain}"
    );
    assert!(Handover::parse(&plain).expect("reads").host.steer.is_none());

    // The new supervisor re-arms the grace with what it had left and tells
    // generation 1 to drain when it passes, not before.
    let mut new = Rig {
        sv: Supervisor::new(steer, Fake::default()),
    };
    // The fake host of the new supervisor knows the adopted workers' pids.
    let pids = read
        .table
        .generations
        .iter()
        .map(|g| (g.number, nix::unistd::Pid::from_raw(g.pid)));
    new.host().workers.extend(pids);
    let gap = Duration::from_millis(20);
    new.sv
        .import(read.table, gap, None, Vec::new(), "0.0.1".into());
    assert_eq!(new.phase(1), Some(Phase::Draining));
    assert!(!new.drained_by_signal(1), "told before its grace passed");
    let armed = &new.host().timers;
    assert!(
        armed
            .iter()
            .any(|(_, d, e)| *d <= Duration::from_millis(230)
                && matches!(
                    e,
                    Event::Timer {
                        generation: 1,
                        timer: Timer::SteerGrace
                    }
                )),
        "{armed:?}"
    );
    new.fire_timer(1, Timer::SteerGrace);
    assert!(
        new.drained_by_signal(1),
        "the carried grace ended in a drain"
    );
}
