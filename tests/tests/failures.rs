//! Failure cases of the supervisor, with the real `baton` binary and the
//! Python worker: a new generation that crashes, never becomes ready, speaks
//! garbage on its channel or ignores the drain signal; a serving worker that
//! is killed; baton itself killed; a storm of SIGHUPs. In each, the
//! generation that serves must go on serving, and the failure must be
//! reported with its reason.

use std::time::Duration;

use baton_tests::harness::{process_gone, wait_for, Baton, Load};
use baton_tests::http;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn set_flags(baton: &Baton, flags: &str) {
    std::fs::write(baton.dir.path().join("flags"), flags).expect("writing worker flags");
}

fn py(flags: &str) -> Baton {
    Baton::builder()
        .args(["--listen", "http=tcp://127.0.0.1:0"])
        .args(["--ready-timeout", "2s", "--drain-timeout", "3s"])
        .pyworker(flags)
        .start()
}

/// A failed reload: the answer says why, status shows it, generation 1 still
/// serves, and a load running through it sees no failure.
fn assert_failed_reload_keeps_serving(flags: &str, reason: &str) {
    let baton = py("");
    let load = Load::http(&baton, "http", |c| {
        c.concurrency = 4;
        c.slow_fraction = 0.1;
    });
    load.wait_ok(20);
    set_flags(&baton, flags);
    let answer = baton.reload();
    assert_eq!(answer["ok"], false, "{answer}");
    let error = answer["error"].as_str().unwrap_or_default();
    assert!(error.contains(reason), "reason {error:?} lacks {reason:?}");
    let status = baton.status();
    assert_eq!(status["generation"], 1, "{status}");
    assert_eq!(status["last_reload"]["ok"], false, "{status}");
    assert_eq!(status["last_reload"]["generation"], 2, "{status}");
    // The log names the reason too.
    baton.wait_log(reason);
    // The failed generation is stopped: only generation 1 is left.
    baton.wait_settled();
    load.wait_ok(20);
    // A new generation may serve before it fails (a plain worker accepts as
    // soon as it starts); what matters is that no request failed.
    load.finish().assert_no_failures();

    // The client command reports it too, with a non-zero exit.
    let out = baton.cli(&["reload", "--wait"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("reload failed") && stderr.contains(reason),
        "{stderr}"
    );
}

#[test]
fn a_new_generation_that_crashes_at_start_leaves_the_old_one_serving() {
    assert_failed_reload_keeps_serving(
        "--crash-at-start",
        "exited with status 3 before it was ready",
    );
}

#[test]
fn a_new_generation_that_never_becomes_ready_is_stopped_at_the_deadline() {
    assert_failed_reload_keeps_serving("--never-ready", "not ready within 2s");
}

#[test]
fn malformed_channel_data_fails_the_new_generation() {
    assert_failed_reload_keeps_serving("--garbage-channel", "malformed message");
}

#[test]
fn a_generation_that_ignores_the_drain_signal_is_killed_after_the_drain_timeout() {
    let baton = Baton::builder()
        .args([
            "--listen",
            "http=tcp://127.0.0.1:0",
            "--drain-timeout",
            "1s",
        ])
        .pyworker("--ignore-drain")
        .start();
    let old = baton.worker_pid(1).expect("generation 1 runs");
    set_flags(&baton, "");
    assert_eq!(baton.reload_ok(), 2);
    // Still alive right after the drain signal: it ignores it.
    assert!(!process_gone(old));
    wait_for(
        "the old worker to be killed",
        Duration::from_secs(10),
        || process_gone(old).then_some(()),
    );
    baton.wait_settled();
    baton.wait_log("killing it");
    baton.wait_log("was killed by SIGKILL");
}

#[test]
fn a_killed_serving_worker_is_restarted_and_no_connection_is_refused() {
    let mut baton = py("");
    let addr = baton.address("http");
    let pid = baton.worker_pid(1).expect("generation 1 runs");
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("killing the worker");
    // Right away, before any restart: the kernel queues the connection on
    // baton's listener, and the next generation answers it.
    let body = http::get(&addr, "/", http::TIMEOUT).expect("GET");
    assert!(
        body.contains("\"generation\": 2") || body.contains("\"generation\":2"),
        "{body}"
    );
    baton.wait_serving(2);
    baton.wait_log("was killed by SIGKILL while serving");
}

#[test]
fn a_worker_that_keeps_crashing_is_restarted_with_growing_delays() {
    let mut baton = py("--crash-after 50");
    // Each generation serves 50ms, crashes, and is started again.
    wait_for("three restarts", Duration::from_secs(20), || {
        (baton.log().matches("while serving").count() >= 3).then_some(())
    });
    baton.wait_log("restarting the worker in 100ms");
    baton.wait_log("restarting the worker in 200ms");
    set_flags(&baton, "");
    // A reload cuts the back-off short and serves for good.
    let generation = baton.reload_ok();
    baton.wait_serving(generation);
}

#[test]
fn killing_baton_makes_its_workers_finish_their_requests_and_exit() {
    let baton = py("");
    let worker = baton.worker_pid(1).expect("generation 1 runs");
    let addr = baton.address("http");
    let slow = baton_tests::http::in_flight(&addr, "/slow?ms=1500", Duration::from_secs(20));
    // A request on a later connection answered: the slow one, queued first,
    // was accepted.
    wait_for("the worker to answer", Duration::from_secs(10), || {
        baton_tests::http::get(&addr, "/", Duration::from_secs(5)).ok()
    });
    baton.signal(Signal::SIGKILL);
    // The parent-death signal is the drain signal: the request in flight is
    // answered, and then the worker is gone.
    let answered = slow.join().expect("the slow request's thread");
    assert!(answered.is_ok(), "cut by baton's death: {answered:?}");
    wait_for(
        "the orphaned worker to exit",
        Duration::from_secs(10),
        || process_gone(worker).then_some(()),
    );
}

#[test]
fn a_storm_of_sighups_coalesces_and_nothing_is_dropped() {
    let baton = py("");
    let load = Load::http(&baton, "http", |c| {
        c.concurrency = 6;
        c.slow_fraction = 0.1;
        c.slow_ms = 300;
    });
    load.wait_ok(20);
    for _ in 0..50 {
        baton.signal(Signal::SIGHUP);
    }
    // Signals arrive asynchronously: first see the reload happen.
    wait_for("a reload to serve", Duration::from_secs(30), || {
        (baton.status()["generation"].as_u64() >= Some(2)).then_some(())
    });
    baton.wait_settled();
    let status = baton.status();
    let generation = status["generation"].as_u64().expect("a generation serves");
    // Fifty signals, but at most one reload queued behind the running one.
    assert!((2..=10).contains(&generation), "{status}");
    assert!(status["last_reload"]["ok"] == true, "{status}");
    load.wait_ok(20);
    let report = load.finish();
    report.assert_no_failures();
    // And baton still answers and reloads.
    assert_eq!(baton.reload_ok(), generation + 1);
}

#[test]
fn the_first_generation_failing_makes_baton_run_exit_non_zero_with_the_reason() {
    let mut baton = Baton::builder()
        .args(["--listen", "http=tcp://127.0.0.1:0"])
        .pyworker("--crash-at-start")
        .spawn();
    let status = baton.wait_exit(Duration::from_secs(20));
    assert!(!status.success());
    baton.wait_log("the first generation did not start");
    baton.wait_log("exited with status 3 before it was ready");

    let mut baton = Baton::builder()
        .args([
            "--listen",
            "http=tcp://127.0.0.1:0",
            "--ready-timeout",
            "500ms",
        ])
        .pyworker("--never-ready")
        .spawn();
    let status = baton.wait_exit(Duration::from_secs(20));
    assert!(!status.success());
    baton.wait_log("not ready within 500ms");
}

#[test]
fn reloads_wait_while_max_draining_old_generations_are_still_draining() {
    let baton = Baton::builder()
        .args(["--listen", "http=tcp://127.0.0.1:0"])
        .args(["--max-draining", "1", "--drain-timeout", "2s"])
        .pyworker("--ignore-drain")
        .start();
    // Generation 1 ignores the drain: it stays draining until killed at 2s.
    set_flags(&baton, "");
    assert_eq!(baton.reload_ok(), 2);
    let queued = baton.request(r#"{"command":"reload"}"#);
    assert_eq!(queued["queued"], true, "{queued}");
    let status = baton.status();
    assert_eq!(status["reload_queued"], true, "{status}");
    assert!(
        status["reloading"].is_null(),
        "not started while one drains: {status}"
    );
    baton.wait_log("reload waits: 1 old generations are still draining");
    // Once generation 1 is gone, the queued reload runs: generation 3.
    wait_for("the queued reload", Duration::from_secs(20), || {
        (baton.status()["generation"] == 3).then_some(())
    });
    baton.wait_log("was killed by SIGKILL");
}

#[test]
fn stopping_during_the_first_start_is_a_clean_stop() {
    let mut baton = Baton::builder()
        .args([
            "--listen",
            "http=tcp://127.0.0.1:0",
            "--ready-timeout",
            "60s",
        ])
        .pyworker("--never-ready")
        .spawn();
    wait_for("generation 1 to start", Duration::from_secs(20), || {
        baton.control.exists().then_some(())?;
        baton.worker_pid(1)
    });
    baton.signal(Signal::SIGTERM);
    let status = baton.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status}: {}", baton.log());
    // Logged once the last generation is gone, after any kill.
    let log = baton.wait_log("every generation has exited; baton stops");
    assert!(!log.contains("killing every generation"), "{log}");
}
