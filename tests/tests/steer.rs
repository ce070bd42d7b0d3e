//! `--steer` (issue 16): servers nobody here wrote whose own graceful
//! shutdown closes connections they accepted but had not read yet (Puma 5,
//! uvicorn, stock `axum::serve`) reload 50 times under counted load and
//! lose nothing, because a replaced generation gets no new connections for
//! `--steer-grace` before its drain signal. Without `--steer` each of them
//! fails requests in the same storm: `steer-bench` shows both side by side.
//! Puma keeps one failure `--steer` cannot reach (see its ignored test).
//! Steering crosses `baton upgrade`: reloads and upgrades interleaved under
//! load, each upgrade during a replaced generation's grace, lose nothing,
//! and fresh connections still reach only the newest generation after each
//! exec. Puma and uvicorn come from `.ci/run` (Debian's `puma`, uvicorn in
//! `target/ci-venv`); missing under `CI=true`, the test fails.

use baton_tests::harness::{self, Baton};
use baton_tests::lossy::{self, Server};

/// The grace the tests use: long enough for an old generation to read what
/// it accepted, short enough for a storm of 50 reloads.
const GRACE: &str = "200ms";

fn fifty_reloads_lose_nothing(server: Server, keep_alive: f64) {
    let program = server.program();
    if !harness::prerequisite(
        program.as_ref().err().map_or("", String::as_str),
        program.is_ok(),
    ) {
        return;
    }
    let baton = lossy::start(server, Some(GRACE)).expect("starting the server");
    let storm = lossy::storm(&baton, 50, keep_alive);
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

/// Half of the requests on kept-alive connections, half on fresh ones.
const MIXED: f64 = 0.5;

#[test]
#[ignore = "Puma 5.6 answers a request on a kept-alive connection with 500 now and then \
            as its own shutdown begins (it logs `Read: IOError: stream closed in another \
            thread`): about 5 per 50 reloads, on connections established before the steer, \
            which no steering of new connections can reach; fresh connections lose nothing \
            (the next test)"]
fn puma_reloads_fifty_times_under_steer_with_nothing_lost() {
    fifty_reloads_lose_nothing(Server::Puma, MIXED);
}

#[test]
fn puma_reloads_fifty_times_under_steer_with_no_fresh_connection_lost() {
    // Every request on a fresh connection: what Puma loses without
    // --steer (connections it accepted but had not read) is all there is.
    fifty_reloads_lose_nothing(Server::Puma, 0.0);
}

#[test]
fn uvicorn_reloads_fifty_times_under_steer_with_nothing_lost() {
    fifty_reloads_lose_nothing(Server::Uvicorn, MIXED);
}

#[test]
fn stock_axum_serve_reloads_fifty_times_under_steer_with_nothing_lost() {
    fifty_reloads_lose_nothing(Server::AxumServe, MIXED);
}

/// Plays systemd's socket activation: binds `N` TCP sockets on one
/// 127.0.0.1 port (with `SO_REUSEPORT` if asked, as `ReusePort=yes` does),
/// places them at fds 3.. named `web`, sets `LISTEN_*` for its own pid and
/// execs the rest of its arguments (baton) in the same process.
const ACTIVATE: &str = r#"
import os, socket, sys
n, reuse = int(sys.argv[1]), sys.argv[2] == "reuseport"
port, socks = 0, []
for _ in range(n):
    s = socket.socket()
    if reuse:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(128)
    port = s.getsockname()[1]
    socks.append(s)
high = [os.dup(s.fileno()) + 100 for s in socks]
for s, h in zip(socks, high):
    os.dup2(s.fileno(), h)
for i, h in enumerate(high):
    os.dup2(h, 3 + i, inheritable=True)
os.environ.update(LISTEN_FDS=str(n), LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES=":".join(["web"] * n))
os.execvp(sys.argv[3], sys.argv[3:])
"#;

/// baton under [`ACTIVATE`] with `n` sockets, `--steer`, a Python worker.
fn activated(n: usize, reuse: &str) -> Baton {
    let builder = Baton::builder();
    let script = builder.dir().join("activate.py");
    std::fs::write(&script, ACTIVATE).expect("writing the activation script");
    builder
        .wrap([
            "python3".into(),
            script.into_os_string(),
            n.to_string().into(),
            reuse.into(),
        ])
        .args([
            "--listen",
            "web=systemd",
            "--steer",
            "--steer-grace",
            "100ms",
        ])
        .pyworker("")
        .spawn()
}

#[test]
fn steer_refuses_a_systemd_socket_without_reuse_port() {
    let mut baton = activated(1, "plain");
    let status = baton.wait_exit(std::time::Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{}", baton.log());
    let log = baton.log();
    assert!(
        log.contains("--steer: listener `web`") && log.contains("set ReusePort=yes"),
        "{log}"
    );
}

/// Socket activation with `ReusePort=yes`: baton binds the second socket
/// itself (it runs as the socket's uid), or takes a second one systemd
/// passed under the same name; reloads under load lose nothing either way.
fn activated_steer_reloads(n: usize, says: &str) {
    let mut baton = activated(n, "reuseport");
    baton.wait_serving(1);
    baton.wait_log(says);
    let address = baton.address("web");
    let address = address.trim_end_matches(" (from systemd)");
    let addr = address.parse().expect("a TCP address");
    let load = harness::Load::start(baton_tests::load::LoadConfig {
        concurrency: 6,
        keep_alive_fraction: 0.5,
        ..baton_tests::load::LoadConfig::new(baton_tests::load::Target::Tcp(addr))
    });
    load.wait_ok(30);
    for generation in 2..=6 {
        assert_eq!(baton.reload_ok(), generation);
        load.wait_ok(20);
    }
    let report = load.finish();
    eprintln!("{report}");
    report.assert_no_failures();
    // Generations alternated between the two sockets and all served.
    assert!(report.generations.len() >= 4, "{report}");
    baton.wait_settled();
}

#[test]
fn steer_pairs_a_socket_activated_listener_with_one_it_binds() {
    activated_steer_reloads(1, "listener `web`: bound its second socket");
}

#[test]
fn steer_takes_a_second_socket_systemd_passed_under_the_same_name() {
    activated_steer_reloads(2, "its second socket is the one systemd passed");
}

/// Every one of `n` requests, each on a fresh connection, is answered by
/// generation `newest`.
fn fresh_connections_reach(addr: &str, newest: u64, n: usize) {
    for i in 0..n {
        let body = baton_tests::http::get_json(addr, "/", baton_tests::http::TIMEOUT)
            .unwrap_or_else(|e| panic!("fresh request {i}: {e}"));
        assert_eq!(
            body["generation"].as_u64(),
            Some(newest),
            "fresh request {i} reached an older generation: {body}"
        );
    }
}

#[test]
fn steering_crosses_ten_upgrades_interleaved_with_ten_reloads_under_load() {
    let baton = Baton::builder()
        .args([
            "--listen",
            "http=tcp://127.0.0.1:0",
            "--steer",
            "--steer-grace",
            "400ms",
        ])
        .pyworker("")
        .start();
    let pid = baton.pid();
    let addr = baton.address("http");
    let load = harness::Load::http(&baton, "http", |c| {
        c.concurrency = 8;
        c.keep_alive_fraction = 0.5;
        c.slow_fraction = 0.0;
    });
    load.wait_ok(30);
    let mut fds_first = 0;
    for i in 0..10u64 {
        let newest = baton.reload_ok();
        assert_eq!(newest, i + 2);
        // At once, while the replaced generation is in its grace (still
        // alive on the other socket): its grace crosses the exec.
        let out = baton.cli(&["upgrade", "--wait"]);
        assert!(
            out.status.success(),
            "upgrade {i}: {}\nlog:\n{}",
            String::from_utf8_lossy(&out.stderr),
            baton.log()
        );
        let status = baton.status();
        assert_eq!(status["pid"], pid, "the same baton process");
        assert_eq!(status["upgrades"]["ok"], i + 1);
        assert_eq!(status["generation"], newest);
        // Steering still holds after the exec: were the program or a side
        // lost, about half of these would reach the other socket.
        fresh_connections_reach(&addr, newest, 20);
        if i == 0 {
            fds_first = baton_tests::bench::procs::settled_fd_count(pid as u32).expect("fds");
        }
        load.wait_ok(20);
    }
    let report = load.finish();
    eprintln!("{report}");
    report.assert_no_failures();
    assert!(report.generations.len() >= 10, "{report}");
    // The grace carried across each exec still ends in a drain.
    baton.wait_settled();
    assert_eq!(
        baton.status()["generations"].as_array().map(Vec::len),
        Some(1)
    );
    let fds_last = baton_tests::bench::procs::settled_fd_count(pid as u32).expect("fds");
    assert!(
        fds_last < fds_first + 5,
        "descriptors grow across upgrades: {fds_first} -> {fds_last}"
    );
    fresh_connections_reach(&addr, 11, 10);
    let log = baton.log();
    assert_eq!(
        log.matches("--steer: took over 1 second socket(s)").count(),
        10,
        "each upgrade takes the twin over rather than binding one"
    );
    assert_eq!(
        log.matches("bound its second socket on").count(),
        1,
        "a second socket bound after an upgrade: {log}"
    );
}
