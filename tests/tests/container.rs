//! baton as a container's entrypoint: PID 1 of a PID namespace of its own
//! (`unshare --pid --fork --mount-proc`, what `docker run` gives it), with a
//! worker that leaves orphaned grandchildren behind, under load; and
//! `--stop-timeout`, which bounds a stop below the orchestrator's grace
//! period and says in the exit status that it ran out.

use std::time::{Duration, Instant};

use baton_tests::harness::{self, process_gone, pyworker, wait_for, Baton, Load};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Whether process `pid` is a zombie nobody has reaped.
fn zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

#[test]
fn as_pid_1_baton_reaps_every_orphan_and_drains_on_sigterm_under_load() {
    if !harness::root("a PID namespace of its own needs it") {
        return;
    }
    // Each start leaves 100 orphaned grandchildren behind, which outlive
    // their parent and then exit: in a PID namespace they are PID 1's.
    let script = format!(
        "for i in $(seq 100); do sh -c 'sleep 0.3 &'; done; exec python3 {}",
        pyworker().display()
    );
    let mut baton = Baton::builder()
        .wrap(["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"])
        .args(["--listen", "http=tcp://127.0.0.1:0"])
        .worker(["sh", "-c", &script])
        .start();
    // The harness started `unshare`; baton is its only child, PID 1 inside
    // (`--kill-child`: killing `unshare`, as the harness does when a test
    // fails, kills baton too, and with it everything in the namespace).
    let pid1 = wait_for("baton as PID 1", Duration::from_secs(10), || {
        harness::children(baton.pid()).first().copied()
    });
    let ns_pid = std::fs::read_to_string(format!("/proc/{pid1}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:").map(str::to_owned))
        .expect("NSpid");
    assert!(ns_pid.split_whitespace().last() == Some("1"), "{ns_pid}");

    let load = Load::http(&baton, "http", |c| {
        c.concurrency = 4;
        c.slow_fraction = 0.1;
        c.slow_ms = 300;
    });
    load.wait_ok(20);
    assert_eq!(baton.reload_ok(), 2);
    load.wait_ok(20);
    // 200 orphans came and went: none is left a zombie, and baton's only
    // child is its worker. (Its status shows pids as the namespace numbers
    // them; /proc here numbers them as the host does.)
    baton.wait_settled();
    wait_for("every orphan to be reaped", Duration::from_secs(20), || {
        let kids = harness::children(pid1);
        (kids.len() == 1 && kids.iter().all(|&k| !zombie(k))).then_some(())
    });
    load.wait_ok(20);
    load.finish().assert_no_failures();
    // Requests in flight when SIGTERM reaches PID 1 are answered; then it
    // exits 0.
    let addr = baton.address("http");
    let slow: Vec<_> = (0..8)
        .map(|_| baton_tests::http::in_flight(&addr, "/slow?ms=1000", Duration::from_secs(20)))
        .collect();
    // A request on a later connection answered: the slow ones, queued
    // first, were accepted.
    wait_for("the worker to answer", Duration::from_secs(10), || {
        baton_tests::http::get(&addr, "/", Duration::from_secs(5)).ok()
    });
    kill(Pid::from_raw(pid1), Signal::SIGTERM).expect("SIGTERM");
    for request in slow {
        let answered = request.join().expect("a slow request's thread");
        assert!(answered.is_ok(), "cut by the stop: {answered:?}");
    }
    let status = baton.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "baton as PID 1 exited {status}");
}

#[test]
fn a_stop_that_outlasts_stop_timeout_is_cut_there_and_exits_124() {
    let mut baton = Baton::builder()
        .args(["--listen", "http=tcp://127.0.0.1:0"])
        .args(["--stop-timeout", "1s", "--drain-timeout", "60s"])
        .pyworker("--ignore-drain")
        .start();
    let worker = baton.worker_pid(1).expect("generation 1 serves");
    let started = Instant::now();
    baton.signal(Signal::SIGTERM);
    let status = baton.wait_exit(Duration::from_secs(20));
    let took = started.elapsed();
    assert_eq!(status.code(), Some(124), "{status}");
    assert!(took < Duration::from_secs(10), "the stop took {took:?}");
    assert!(process_gone(worker), "the worker outlived baton");
    let log = baton.wait_log("longer than --stop-timeout");
    assert!(log.contains("killing the 1 generations left"), "{log}");
}

#[test]
fn a_stop_within_stop_timeout_exits_0() {
    let mut baton = Baton::builder()
        .args([
            "--listen",
            "http=tcp://127.0.0.1:0",
            "--stop-timeout",
            "20s",
        ])
        .pyworker("")
        .start();
    let load = Load::http(&baton, "http", |c| c.concurrency = 2);
    load.wait_ok(20);
    load.finish().assert_no_failures();
    baton.signal(Signal::SIGTERM);
    let status = baton.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status}");
}
