//! Kept state across reloads, with the SDK's `counter` example: the count is
//! exact through reload storms under keep-alive load (every increment
//! answered 2xx is in it, and a request on a kept connection during a
//! hand-over is counted once), a request still running when the freeze
//! grace ends is refused (503), not acknowledged, a `kill -9` resumes from the last
//! checkpoint, and a snapshot the new generation rejects (or one over
//! `--max-state`, or a successor that stays unready past `--freeze-timeout`)
//! fails the reload and leaves the old generation serving with its values.

use std::net::TcpStream;
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
fn the_count_is_exact_through_a_reload_storm_under_keep_alive_load() {
    let baton = counter(&[]);
    let addr = baton.address("http");
    let load = Load::http(&baton, "http", |c| {
        c.concurrency = 6;
        c.keep_alive_fraction = 1.0;
        c.slow_fraction = 0.0;
    });
    load.wait_ok(50);
    for i in 1..=40 {
        assert_eq!(baton.reload_ok(), 1 + i);
        load.wait_ok(20);
    }
    let report = load.finish();
    eprintln!("{report}");
    report.assert_no_failures();
    let peek = http::get_json(&addr, "/peek", http::TIMEOUT).expect("GET");
    let count = peek["count"].as_u64().expect("count");
    // Exact: every increment answered 2xx is in the count, and nothing
    // else is (the load's requests are all increments).
    assert_eq!(
        count, report.counts.ok,
        "count {count}, increments answered 2xx {}",
        report.counts.ok
    );
    assert_eq!(peek["generation"], 41);
    // The hand-overs really carried state: the last generation started high.
    baton.wait_log("from generation 40, frozen for us");
}

/// `GET /` on a kept connection; if the server closed it while idle (no
/// byte of an answer arrived), again on a new connection, as HTTP clients
/// do for a reused connection. Returns the answer and whether it was retried.
fn get_retrying(stream: &mut TcpStream, addr: &str) -> (http::Response, bool) {
    match http::get_keep_alive(stream, "/") {
        Ok(response) => (response, false),
        Err(e) => {
            assert!(
                e.contains("in the head: []") || e.contains("sending") || e.contains("head: "),
                "failed after part of an answer: {e}"
            );
            *stream = TcpStream::connect(addr).expect("connecting again");
            stream
                .set_read_timeout(Some(http::TIMEOUT))
                .expect("timeout");
            (http::get_keep_alive(stream, "/").expect("the retry"), true)
        }
    }
}

#[test]
fn a_request_on_a_kept_connection_during_a_hand_over_is_counted_once_by_the_new_generation() {
    // Generation 2 takes the count (freezing generation 1), then takes a
    // second before it says ready: the fourth request comes while
    // generation 1 is frozen.
    let baton = counter(&[]);
    let addr = baton.address("http");
    let mut stream = TcpStream::connect(&addr).expect("connect");
    stream
        .set_read_timeout(Some(http::TIMEOUT))
        .expect("timeout");
    for n in 1..=3 {
        let response = http::get_keep_alive(&mut stream, "/").expect("GET");
        assert_eq!(response.json().expect("json")["count"], n);
    }
    baton.set_flags("--ready-delay 1000");
    let reload = baton.cli_spawn(&["reload", "--wait"]);
    baton.wait_log("freezes to hand its kept values to generation 2");
    let (fourth, retried) = get_retrying(&mut stream, &addr);
    assert_eq!(fourth.status, 200, "{fourth:?}");
    let body = fourth.json().expect("json");
    assert_eq!(body["count"], 4, "{body} (retried: {retried})");
    // Answered by generation 1 before its snapshot, or retried on a new
    // connection that generation 2 answered.
    if retried {
        assert_eq!(body["generation"], 2, "{body}");
    } else {
        assert!(fourth.closes(), "{fourth:?}");
    }
    let output = reload.wait_with_output().expect("baton reload --wait");
    assert!(output.status.success(), "{output:?}");
    let peek = http::get_json(&addr, "/peek", http::TIMEOUT).expect("GET");
    assert_eq!(peek["count"], 4, "{peek}");
    assert_eq!(peek["generation"], 2, "{peek}");
}

#[test]
fn a_request_still_running_when_the_freeze_grace_ends_is_refused_not_lost() {
    let baton = counter(&["--freeze-grace", "300ms"]);
    let addr = baton.address("http");
    for _ in 0..3 {
        http::get_json(&addr, "/", http::TIMEOUT).expect("GET");
    }
    // Both increment after a pause: one well within the grace, one long
    // after it.
    let quick = http::in_flight(&addr, "/slow/50", http::TIMEOUT);
    let slow = http::in_flight(&addr, "/slow/3000", http::TIMEOUT);
    wait_for("both slow requests to start", http::TIMEOUT, || {
        let peek = http::get_json(&addr, "/peek", http::TIMEOUT).expect("GET");
        (peek["slow"] == 2).then_some(())
    });
    assert_eq!(baton.reload_ok(), 2);
    let quick = quick.join().expect("thread").expect("quick answer");
    assert_eq!(quick.status, 200, "{quick:?}");
    assert_eq!(quick.json().expect("json")["count"], 4);
    let slow = slow.join().expect("thread");
    let err = slow.expect_err("refused, not acknowledged");
    assert!(err.ends_with("status 503"), "{err}");
    let peek = http::get_json(&addr, "/peek", http::TIMEOUT).expect("GET");
    assert_eq!(peek["count"], 4, "{peek}");
    assert_eq!(peek["generation"], 2, "{peek}");
    baton.wait_log("still in flight after the freeze grace");
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
