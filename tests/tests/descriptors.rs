//! What a worker receives, checked from inside the worker: its descriptors,
//! `LISTEN_PID`, `LISTEN_FDNAMES`, and every kind of listener (TCP over IPv4
//! and IPv6, UDP, Unix stream, Unix datagram) working the same before and
//! after a reload, because the kernel socket is the same one.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use baton_tests::harness::{wait_for, Baton};
use baton_tests::http;
use serde_json::Value;

/// The worker's own view of what it inherited.
fn check_inheritance(fds: &Value, generation: u64) {
    let pid = fds["pid"].as_i64().expect("pid");
    assert_eq!(
        fds["listen_pid"],
        pid.to_string(),
        "LISTEN_PID must be the worker's own pid: {fds}"
    );
    assert_eq!(fds["generation"], generation, "{fds}");
    assert_eq!(fds["listen_fds"], "5", "{fds}");
    assert_eq!(fds["listen_fdnames"], "v4:v6:udp:unix:dgram", "{fds}");
    assert_eq!(fds["channel_fd"], "8", "{fds}");
    let open: Vec<&str> = fds["fds"]
        .as_object()
        .expect("fd map")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        open,
        ["0", "1", "2", "3", "4", "5", "6", "7", "8"],
        "no other fd may leak: {fds}"
    );
    assert_eq!(fds["fds"]["0"], "/dev/null", "{fds}");
    for fd in 3..=8 {
        assert_eq!(
            fds["cloexec"][fd.to_string()],
            false,
            "fd {fd} must survive exec: {fds}"
        );
    }
    let sock = |fd: u32| &fds["sockets"][fd.to_string()];
    assert_eq!(sock(3)["family"], "AF_INET", "{fds}");
    assert_eq!(sock(4)["family"], "AF_INET6", "{fds}");
    assert_eq!(sock(5)["type"], "SOCK_DGRAM", "{fds}");
    assert_eq!(sock(6)["family"], "AF_UNIX", "{fds}");
    assert_eq!(sock(6)["type"], "SOCK_STREAM", "{fds}");
    assert_eq!(sock(7)["type"], "SOCK_DGRAM", "{fds}");
    assert_eq!(sock(8)["type"], "SOCK_SEQPACKET", "the channel: {fds}");
    for fd in [3, 4, 6] {
        assert_eq!(sock(fd)["listening"], true, "fd {fd}: {fds}");
    }
}

#[test]
fn every_listener_kind_is_handed_over_with_exact_descriptors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let unix = dir.path().join("http.sock");
    let dgram = dir.path().join("dgram.sock");
    let baton = Baton::builder()
        .args(["--listen", "v4=tcp://127.0.0.1:0"])
        .args(["--listen", "v6=tcp://[::1]:0"])
        .args(["--listen", "udp=udp://127.0.0.1:0"])
        .option("--listen", format!("unix=unix:{}", unix.display()))
        .option("--listen", format!("dgram=unix-dgram:{}", dgram.display()))
        .pyworker("")
        .start();
    let v4 = baton.address("v4");
    let v6 = baton.address("v6");
    let udp = baton.address("udp");
    assert!(v6.starts_with("[::1]:"), "{v6}");

    let client_path = dir.path().join("client.sock");
    let client = UnixDatagram::bind(&client_path).expect("binding a datagram client");
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let udp_client = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp client");
    udp_client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");

    for generation in [1, 2, 3] {
        if generation > 1 {
            assert_eq!(baton.reload_ok(), generation);
            baton.wait_settled();
        }
        let fds = http::get_json(&v4, "/fds", http::TIMEOUT).expect("IPv4");
        check_inheritance(&fds, generation);
        let pid = fds["pid"].as_i64().expect("pid");

        let body = http::get_json(&v6, "/", http::TIMEOUT).expect("IPv6");
        assert_eq!(body["generation"], generation, "IPv6: {body}");

        assert_eq!(
            http::get_unix_json(&unix, "/", http::TIMEOUT).expect("unix stream")["generation"],
            generation,
            "unix stream"
        );

        let expect = format!("gen={generation} pid={pid} ping");
        udp_client.send_to(b"ping", &udp).expect("udp send");
        let mut buf = [0u8; 256];
        let (n, _) = udp_client.recv_from(&mut buf).expect("udp reply");
        assert_eq!(std::str::from_utf8(&buf[..n]).unwrap_or("?"), expect, "udp");

        client.send_to(b"ping", &dgram).expect("unix-dgram send");
        let n = client.recv(&mut buf).expect("unix-dgram reply");
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap_or("?"),
            expect,
            "unix-dgram"
        );
    }
}

#[test]
fn baton_does_not_pass_on_the_listen_and_notify_variables_it_received() {
    let baton = Baton::builder()
        .args(["--listen", "http=tcp://127.0.0.1:0"])
        .env("LISTEN_FDNAMES", "bogus")
        .env("BATON_GENERATION", "99")
        .pyworker("")
        .start();
    let fds = http::get_json(&baton.address("http"), "/fds", http::TIMEOUT).expect("GET /fds");
    assert_eq!(fds["listen_fdnames"], "http", "{fds}");
    assert_eq!(fds["generation"], 1, "{fds}");
    let notify = fds["notify_socket"].as_str().expect("NOTIFY_SOCKET is set");
    assert!(notify.ends_with("notify-1.sock"), "{fds}");
}

#[test]
fn a_worker_that_never_notifies_is_ready_after_the_fallback_delay() {
    let baton = Baton::builder()
        .args([
            "--listen",
            "http=tcp://127.0.0.1:0",
            "--ready",
            "after:300ms",
        ])
        .pyworker("--no-notify")
        .start();
    assert_eq!(baton.reload_ok(), 2);
    wait_for(
        "alive-for readiness in the log",
        Duration::from_secs(5),
        || {
            baton
                .log()
                .contains("is ready (alive for 300ms)")
                .then_some(())
        },
    );
}
