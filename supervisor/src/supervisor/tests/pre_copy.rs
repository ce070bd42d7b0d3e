//! The pre-copy on a fake host: a successor's `Prepare` reaches the serving
//! generation, which serves on while its pre-copy goes to the successor;
//! the freeze's snapshot then names the pre-copy it completes, and both
//! count against `--max-state`.

use baton_worker::protocol::{StateSource, SupervisorMessage, WorkerMessage};

use super::{config, snapshot, Rig};
use crate::api::Step;
use crate::generations::Phase;
use crate::supervisor::Config;

#[test]
fn a_pre_copy_goes_on_while_the_old_generation_serves_and_the_freeze_completes_it() {
    let mut rig = Rig::serving();
    rig.hello(1);
    let _answer = rig.reload();
    rig.hello(2);
    rig.say(2, WorkerMessage::Prepare);
    assert!(rig
        .sent_to(1)
        .iter()
        .any(|m| matches!(m, SupervisorMessage::PreCopy { for_generation: 2 })));
    assert!(!rig.status().generations[0].frozen, "it serves on");
    rig.say_with(
        1,
        WorkerMessage::PreCopied {
            bytes: 64,
            for_generation: 2,
        },
        vec![snapshot(64)],
    );
    assert!(rig.sent_to(2).iter().any(|m| matches!(
        m,
        SupervisorMessage::State {
            source: StateSource::PreCopy,
            generation: Some(1),
            bytes: 64,
            base_bytes: None,
        }
    )));
    rig.say(2, WorkerMessage::TakeState);
    assert_eq!(rig.step(), Some(Step::AwaitingSnapshot));
    // Only what changed since, with the pre-copy it completes.
    rig.say_with(
        1,
        WorkerMessage::Frozen {
            bytes: 8,
            base_bytes: Some(64),
        },
        vec![snapshot(8), snapshot(64)],
    );
    assert!(rig.sent_to(2).iter().any(|m| matches!(
        m,
        SupervisorMessage::State {
            source: StateSource::Snapshot,
            bytes: 8,
            base_bytes: Some(64),
            ..
        }
    )));
    rig.say(2, WorkerMessage::Ready);
    assert_eq!(rig.phase(2), Some(Phase::Serving));
}

#[test]
fn a_snapshot_and_its_pre_copy_over_max_state_together_fail_the_reload_and_thaw() {
    let mut rig = Rig::new(Config {
        max_state: 100,
        ..config()
    });
    rig.hello(1);
    rig.say(1, WorkerMessage::Ready);
    let _answer = rig.reload();
    rig.hello(2);
    rig.say(2, WorkerMessage::TakeState);
    rig.say_with(
        1,
        WorkerMessage::Frozen {
            bytes: 60,
            base_bytes: Some(60),
        },
        vec![snapshot(60), snapshot(60)],
    );
    assert!(rig
        .sent_to(1)
        .iter()
        .any(|m| matches!(m, SupervisorMessage::Thaw)));
    assert_eq!(rig.phase(1), Some(Phase::Serving));
}
