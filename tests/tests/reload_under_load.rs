//! The promise itself: reloads under concurrent HTTP load (keep-alive and
//! fresh connections, and slow requests that span several reloads) lose no
//! request. Every request is counted in one bin by the project's load client;
//! a single failure fails the test.

use baton_tests::harness::{bin, nodeworker, Baton, Load};

/// Reloads `reloads` times under load and checks every request.
fn reload_under_load(baton: &Baton, reloads: u64) {
    let load = Load::http(baton, "http", |c| {
        c.concurrency = 12;
        c.keep_alive_fraction = 0.5;
        // Every 50th request takes 700ms: it starts on one generation and
        // must be finished by it while several reloads go by.
        c.slow_fraction = 0.02;
        c.slow_ms = 700;
    });
    load.wait_ok(50);
    let first = baton.status()["generation"].as_u64().expect("serving");
    for i in 1..=reloads {
        assert_eq!(baton.reload_ok(), first + i);
        // Let traffic reach the new generation before the next reload.
        load.wait_ok(10);
    }
    load.wait_ok(50);
    let report = load.finish();
    eprintln!("{report}");
    report.assert_no_failures();
    // Many generations really served: the load saw the reloads.
    let served = report.generations.len() as u64;
    assert!(
        served > reloads / 2,
        "only {served} generations served: {report}"
    );
    baton.wait_settled();
}

#[test]
fn a_hundred_reloads_of_an_ordinary_axum_server_lose_nothing() {
    let baton = Baton::builder()
        .args(["--listen", "http=tcp://127.0.0.1:0"])
        .worker([bin("listenfd-axum")])
        .start();
    reload_under_load(&baton, 100);
}

#[test]
fn reloads_of_a_python_worker_lose_nothing() {
    let baton = Baton::builder()
        .args(["--listen", "http=tcp://127.0.0.1:0"])
        .pyworker("")
        .start();
    reload_under_load(&baton, 20);
}

#[test]
fn reloads_of_a_node_server_on_fd_3_lose_nothing() {
    let Some(node) = nodeworker() else { return };
    let baton = Baton::builder()
        .args(["--listen", "http=tcp://127.0.0.1:0"])
        // Node cannot reach NOTIFY_SOCKET on its own.
        .args(["--ready", "after:100ms"])
        .worker(node)
        .start();
    reload_under_load(&baton, 20);
}
