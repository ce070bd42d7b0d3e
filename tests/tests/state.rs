//! Kept state across reloads, with the SDK's `counter` example: the count is
//! exact through reload storms under load (only writes the SDK reported as
//! made after a freeze are missing), a `kill -9` resumes from the last
//! checkpoint, and a snapshot the new generation rejects (or one over
//! `--max-state`, or a successor that stays unready past `--freeze-timeout`)
//! fails the reload and leaves the old generation serving with its values.

use std::time::Duration;

use baton_tests::harness::{bin, wait_for, Baton, Load};
use baton_tests::http;

fn counter(options: &[&str]) -> Baton {
    Baton::builder()
        .args(["--listen", "http=tcp://127.0.0.1:0"])
        .args(options.iter().copied())
        .flagged(bin("counter").to_str().expect("utf-8 path"), "")
        .start()
}

#[test]
fn the_count_is_exact_through_a_reload_storm_under_load() {
    let baton = counter(&[]);
    let addr = baton.address("http");
    let load = Load::http(&baton, "http", |c| {
        c.concurrency = 8;
        c.keep_alive_fraction = 0.5;
        c.slow_fraction = 0.0;
    });
    load.wait_ok(50);
    for i in 1..=40 {
        assert_eq!(baton.reload_ok(), 1 + i);
        load.wait_ok(20);
    }
    let report = load.finish();
    eprintln!("{report}\nafter freeze: {}", report.after_freeze);
    report.assert_no_failures();
    let peek = http::get_json(&addr, "/peek", http::TIMEOUT).expect("GET");
    let count = peek["count"].as_u64().expect("count");
    // Every increment answered is in the count, but those the SDK reported
    // as landing after a freeze (they stayed with the old generation).
    assert_eq!(
        count,
        report.counts.ok - report.after_freeze,
        "count {count}, answered {}, after freeze {}",
        report.counts.ok,
        report.after_freeze
    );
    assert_eq!(peek["generation"], 41);
    // The hand-overs really carried state: the last generation started high.
    baton.wait_log("from generation 40, frozen for us");
}

#[test]
fn a_killed_worker_resumes_from_its_last_checkpoint() {
    let mut baton = counter(&[]);
    let addr = baton.address("http");
    for _ in 0..25 {
        http::get_json(&addr, "/", http::TIMEOUT).expect("GET");
    }
    // The counter checkpoints within a second of a change.
    let pid = wait_for("a checkpoint of 25", Duration::from_secs(10), || {
        let peek = http::get_json(&addr, "/peek", http::TIMEOUT).expect("GET");
        (peek["checkpointed"] == 25).then(|| peek["pid"].as_i64().expect("pid") as i32)
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9");
    baton.wait_serving(2);
    let peek = http::get_json(&addr, "/peek", http::TIMEOUT).expect("GET");
    assert_eq!(peek["count"], 25, "{peek}");
    baton.wait_log("from generation 1's last checkpoint");
    assert_eq!(
        http::get_json(&addr, "/", http::TIMEOUT).expect("GET")["count"],
        26
    );
}

/// A reload that must fail at the hand-over: the old generation thaws and
/// serves on with its count, under load, with no failed request.
fn failed_handover_keeps_the_old_values(baton: &Baton, flags: &str, reason: &str) {
    let addr = baton.address("http");
    for _ in 0..5 {
        http::get_json(&addr, "/", http::TIMEOUT).expect("GET");
    }
    let load = Load::http(baton, "http", |c| c.concurrency = 4);
    load.wait_ok(20);
    baton.set_flags(flags);
    let answer = baton.reload();
    assert_eq!(answer["ok"], false, "{answer}");
    let error = answer["error"].as_str().unwrap_or_default();
    assert!(error.contains(reason), "{error:?} lacks {reason:?}");
    baton.wait_settled();
    load.wait_ok(20);
    let report = load.finish();
    report.assert_no_failures();
    let peek = http::get_json(&addr, "/peek", http::TIMEOUT).expect("GET");
    assert_eq!(peek["generation"], 1, "{peek}");
    // Nothing was lost: the thawed generation kept counting.
    assert_eq!(
        peek["count"].as_u64(),
        Some(5 + report.counts.ok),
        "{peek} after {report}"
    );
    baton.wait_log("thaws and serves on");
    assert_eq!(baton.status()["generations"][0]["frozen"], false);
}

#[test]
fn a_snapshot_the_new_generation_rejects_leaves_the_old_one_serving_with_its_values() {
    let baton = counter(&[]);
    failed_handover_keeps_the_old_values(
        &baton,
        "--state-format 0",
        "rejected the kept values of generation 1: the snapshot has state format 1, newer than this program's 0",
    );
}

#[test]
fn a_snapshot_over_max_state_fails_the_reload_and_the_old_generation_thaws() {
    let baton = counter(&["--max-state", "10"]);
    failed_handover_keeps_the_old_values(&baton, "", "but --max-state is 10 bytes");
}

#[test]
fn a_successor_slow_after_taking_the_state_is_failed_at_the_freeze_timeout() {
    let baton = counter(&["--freeze-timeout", "500ms"]);
    failed_handover_keeps_the_old_values(
        &baton,
        "--ready-delay 20000",
        "not ready within 500ms of freezing its predecessor (--freeze-timeout)",
    );
}
