//! The command line as a user meets it: bad input gets a clear error naming
//! what was wrong (never a panic), and the control socket is owned by one
//! live baton at a time, while a stale one left by a dead baton is replaced.

use std::process::{Command, Output};
use std::time::Duration;

use baton_tests::harness::{bin, Baton};

fn baton(args: &[&str]) -> Output {
    Command::new(bin("baton"))
        .args(args)
        .env_remove("BATON_CONTROL")
        .output()
        .expect("running baton")
}

/// Runs `baton run` with `args`, expecting it to fail at once with `needle`
/// on stderr.
fn refused(args: &[&str], needle: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = dir.path().join("c.sock");
    let mut full = vec!["run", "--control", control.to_str().expect("utf-8 path")];
    full.extend_from_slice(args);
    let out = baton(&full);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(
        stderr.contains(needle),
        "{args:?}: {stderr:?} lacks {needle:?}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_flags_are_refused_with_the_reason() {
    refused(&["--listen", "http", "--", "true"], "missing `=`");
    refused(
        &["--listen", "http=tcp://localhost:80", "--", "true"],
        "not an IP address",
    );
    refused(
        &["--listen", "http=tcp://127.0.0.1:99999", "--", "true"],
        "not a number from 0 to 65535",
    );
    refused(
        &["--listen", "http=ftp://x", "--", "true"],
        "unknown address",
    );
    refused(
        &["--drain-signal", "FOO", "--", "true"],
        "not a signal name",
    );
    refused(&["--ready-timeout", "soon", "--", "true"], "not a duration");
    refused(
        &["--ready", "later", "--", "true"],
        "expected `notify` or `after:DURATION`",
    );
    refused(&["--", "no-such-command-anywhere"], "not found in PATH");
    let dir = tempfile::tempdir().expect("tempdir");
    let plain = dir.path().join("plain.txt");
    std::fs::write(&plain, "not a program").expect("writing a file");
    refused(
        &["--", plain.to_str().expect("utf-8")],
        "the file is not executable",
    );
    refused(&["--listen", "http=tcp://127.0.0.1:0"], "COMMAND");
}

#[test]
fn an_address_in_use_is_named() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("binding");
    let addr = taken.local_addr().expect("address");
    refused(
        &["--listen", &format!("web=tcp://{addr}"), "--", "true"],
        &format!("binding listener `web` on tcp://{addr}: Address already in use"),
    );
}

#[test]
fn a_live_baton_keeps_its_control_socket_and_a_stale_one_is_replaced() {
    let first = Baton::builder()
        .args(["--listen", "http=tcp://127.0.0.1:0"])
        .pyworker("")
        .start();
    let control = first.control.to_str().expect("utf-8 path").to_owned();
    let out = baton(&["run", "--control", &control, "--", "true"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("is in use by a running baton")
            && stderr.contains(&first.pid().to_string()),
        "{stderr}"
    );
    // The refused start did not disturb the first one.
    assert_eq!(first.status()["generation"], 1);

    // A socket file left by a dead process is replaced.
    let dir = tempfile::tempdir().expect("tempdir");
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("binding a socket"));
    assert!(stale.exists());
    let second = Baton::builder()
        .control(&stale)
        .args(["--listen", "http=tcp://127.0.0.1:0"])
        .pyworker("")
        .start();
    assert_eq!(second.status()["generation"], 1);
}

#[test]
fn client_commands_explain_when_no_baton_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = dir.path().join("none.sock");
    let out = baton(&["status", "--control", control.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no baton is running with control socket"),
        "{stderr}"
    );
}

#[test]
fn status_reload_and_stop_from_the_command_line() {
    let mut baton = Baton::builder()
        .args(["--listen", "http=tcp://127.0.0.1:0"])
        .pyworker("")
        .start();
    let out = baton.cli(&["reload", "--wait"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("generation 2 is serving"));
    let out = baton.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("generation 2 serving") && text.contains("last reload: generation 2 ok"),
        "{text}"
    );
    let out = baton.cli(&["status", "--json"]);
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    assert_eq!(json["generation"], 2);
    assert_eq!(json["last_reload"]["ok"], true);
    let out = baton.cli(&["stop"]);
    assert!(out.status.success(), "{out:?}");
    // `stop` answers once everything has drained; baton then exits 0.
    assert!(baton.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn garbage_on_the_control_socket_gets_an_error_and_changes_nothing() {
    use std::io::{Read, Write};
    let baton = Baton::builder()
        .args(["--listen", "http=tcp://127.0.0.1:0"])
        .pyworker("")
        .start();
    for garbage in [
        &b"\x00\x01\x02\n"[..],
        b"{\"command\":\"explode\"}\n",
        b"not json\n",
        &[b'x'; 10_000][..],
    ] {
        let mut s = std::os::unix::net::UnixStream::connect(&baton.control).expect("connect");
        s.write_all(garbage).expect("write");
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut answer = String::new();
        match s.read_to_string(&mut answer) {
            Ok(_) => assert!(answer.contains("\"ok\":false"), "{answer}"),
            // An over-long request is answered and the connection closed
            // with bytes still unread, which Unix sockets report as a reset.
            Err(e) if garbage.len() > 4096 => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset)
            }
            Err(e) => panic!("reading the answer: {e}"),
        }
    }
    assert_eq!(baton.status()["generation"], 1);
}
