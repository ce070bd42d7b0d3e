//! `--steer` on a fake host: a replaced generation is steered away from at
//! once and told to drain only after the grace (and once its queue is
//! empty); a reload waits while two generations hold the two sockets; a
//! stop cuts the grace short.

use std::time::Duration;

use super::{config, outcome, Rig};
use crate::event::{Exit, Timer};
use crate::generations::Phase;

fn steered() -> Rig {
    let mut rig = Rig::new(crate::supervisor::Config {
        steer_grace: Some(Duration::from_millis(250)),
        ..config()
    });
    rig.ready(1);
    rig
}

#[test]
fn a_replaced_generation_gets_its_drain_signal_only_after_the_grace() {
    let mut rig = steered();
    assert_eq!(rig.host().steered, [1]);
    let mut answer = rig.reload();
    rig.ready(2);
    assert!(outcome(&mut answer).ok);
    assert_eq!(rig.host().steered, [1, 2]);
    // Generation 1 serves nothing new from now on, but is not told yet.
    assert_eq!(rig.phase(1), Some(Phase::Draining));
    assert!(!rig.drained_by_signal(1), "signalled before the grace");
    rig.fire_timer(1, Timer::SteerGrace);
    assert!(rig.drained_by_signal(1));
    // Its kill deadline runs from the signal.
    assert!(rig
        .host()
        .timers
        .iter()
        .any(|(_, d, e)| *d == Duration::from_secs(30)
            && matches!(
                e,
                crate::event::Event::Timer {
                    generation: 1,
                    timer: Timer::DrainTimeout
                }
            )));
}

#[test]
fn connections_still_queued_for_it_earn_another_grace() {
    let mut rig = steered();
    rig.reload();
    rig.ready(2);
    rig.host().queued.insert(1);
    rig.fire_timer(1, Timer::SteerGrace);
    assert!(
        !rig.drained_by_signal(1),
        "signalled with its queue not empty"
    );
    rig.host().queued.clear();
    rig.fire_timer(1, Timer::SteerGrace);
    assert!(rig.drained_by_signal(1));
}

#[test]
fn a_reload_waits_while_two_generations_hold_both_sockets() {
    let mut rig = steered();
    rig.reload();
    rig.ready(2);
    let mut third = rig.reload();
    assert_eq!(rig.phase(3), None, "started a third generation beside two");
    assert!(third.try_recv().is_err());
    rig.fire_timer(1, Timer::SteerGrace);
    rig.exit(1, Exit::Code(0));
    assert_eq!(rig.phase(3), Some(Phase::Starting));
    rig.ready(3);
    assert!(outcome(&mut third).ok);
    assert_eq!(rig.host().steered, [1, 2, 3]);
}

#[test]
fn a_stop_tells_a_generation_in_its_grace_to_drain_at_once() {
    let mut rig = steered();
    rig.reload();
    rig.ready(2);
    rig.request(crate::api::Request::Stop { now: false });
    assert!(rig.drained_by_signal(1));
    assert!(rig.drained_by_signal(2));
}

#[test]
fn without_steer_the_replaced_generation_is_told_at_once() {
    let mut rig = Rig::serving();
    rig.reload();
    rig.ready(2);
    assert!(rig.drained_by_signal(1));
    assert!(rig.host().steered.is_empty());
}

#[test]
fn an_sdk_worker_is_drained_at_once_and_reloads_do_not_wait_for_it() {
    // Its drain is exact and its freeze stops its accepting early: its
    // successor shares its sockets, and it needs no grace.
    let mut rig = steered();
    rig.hello(1);
    let mut answer = rig.reload();
    rig.hello(2);
    rig.ready(2);
    assert!(outcome(&mut answer).ok);
    assert!(rig
        .sent_to(1)
        .iter()
        .any(|m| matches!(m, baton_worker::protocol::SupervisorMessage::Drain { .. })));
    let mut third = rig.reload();
    assert_eq!(
        rig.phase(3),
        Some(Phase::Starting),
        "waited for generation 1"
    );
    rig.ready(3);
    assert!(outcome(&mut third).ok);
}
