//! baton under systemd's protocols, with systemd's own tools where they
//! exist: socket activation through `systemd-socket-activate`, readiness from
//! `systemd-notify` in a shell-script worker, and the exact sd_notify sequence
//! baton sends, read from a datagram socket that plays systemd's
//! `NOTIFY_SOCKET` and checks every sender pid.

use std::io::IoSliceMut;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use baton_tests::harness::{wait_for, Baton};
use baton_tests::http;
use nix::sys::socket::{self, sockopt, ControlMessageOwned, MsgFlags};

fn need(tool: &str) {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{tool} is missing: install Debian's `systemd` package (.ci/run does)"
    );
}

#[test]
fn baton_adopts_a_socket_from_systemd_socket_activate_and_reloads_on_it() {
    need("systemd-socket-activate");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("web.sock");
    let listen = format!("--listen={}", path.display());
    let baton = Baton::builder()
        .wrap(["systemd-socket-activate", listen.as_str(), "--fdname=web"])
        .args(["--listen", "web=systemd"])
        .pyworker("")
        .spawn();
    // systemd-socket-activate execs baton on the first connection, which
    // waits in the socket's queue until generation 1 answers it.
    wait_for("the activation socket", Duration::from_secs(20), || {
        path.exists().then_some(())
    });
    let first = http::get_unix(&path, "/", http::TIMEOUT).expect("the activated socket");
    assert!(first.contains("\"generation\": 1"), "{first}");
    let status = baton.status();
    assert!(
        status["listeners"][0]["address"]
            .as_str()
            .is_some_and(|a| a.contains("(from systemd)")),
        "{status}"
    );
    assert_eq!(baton.reload_ok(), 2);
    let second =
        http::get_unix(&path, "/", http::TIMEOUT).expect("the activated socket after a reload");
    assert!(second.contains("\"generation\": 2"), "{second}");
    // The worker saw the name baton gave, not systemd's LISTEN_* for baton.
    let fds = http::get_unix(&path, "/fds", http::TIMEOUT).expect("GET /fds");
    assert!(fds.contains("\"listen_fdnames\": \"web\""), "{fds}");
}

#[test]
fn a_missing_systemd_socket_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(baton_tests::harness::bin("baton"))
        .args(["run", "--control"])
        .arg(dir.path().join("c.sock"))
        .args(["--listen", "web=systemd", "--", "true"])
        .env_remove("LISTEN_FDS")
        .output()
        .expect("running baton");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--listen web=systemd: baton was not socket-activated"),
        "{stderr}"
    );
}

/// A datagram socket playing systemd: every message with its sender's pid.
struct FakeSystemd {
    socket: UnixDatagram,
    path: std::path::PathBuf,
}

impl FakeSystemd {
    fn new(dir: &std::path::Path) -> FakeSystemd {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("binding the notify socket");
        socket::setsockopt(&socket, sockopt::PassCred, &true).expect("SO_PASSCRED");
        socket
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        FakeSystemd { socket, path }
    }

    /// The next message and its sender's pid.
    fn next(&self) -> (String, i32) {
        let mut buf = vec![0u8; 4096];
        let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = socket::recvmsg::<()>(
            self.socket.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        )
        .expect("a notify message within 30s");
        let mut pid = 0;
        for c in msg.cmsgs().expect("control messages") {
            if let ControlMessageOwned::ScmCredentials(creds) = c {
                pid = creds.pid();
            }
        }
        let len = msg.bytes;
        (String::from_utf8_lossy(&buf[..len]).into_owned(), pid)
    }
}

#[test]
fn baton_tells_systemd_ready_reloading_and_stopping_in_order_from_its_own_pid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let systemd = FakeSystemd::new(dir.path());
    let mut baton = Baton::builder()
        .args([
            "--listen",
            "http=tcp://127.0.0.1:0",
            "--ready-timeout",
            "2s",
        ])
        .env("NOTIFY_SOCKET", systemd.path.as_os_str())
        .pyworker("")
        .start();
    let me = baton.pid();
    let expect = |prefix: &str, contains: &str| {
        let (msg, pid) = systemd.next();
        assert_eq!(pid, me, "{msg:?} came from pid {pid}, not baton's {me}");
        assert!(
            msg.starts_with(prefix) && msg.contains(contains),
            "expected {prefix:?} with {contains:?}, got {msg:?}"
        );
        msg
    };
    expect("READY=1\n", "STATUS=serving generation 1");

    assert_eq!(baton.reload_ok(), 2);
    let reloading = expect(
        "RELOADING=1\nMONOTONIC_USEC=",
        "STATUS=reloading to generation 2",
    );
    let usec: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse().ok())
        .expect("MONOTONIC_USEC is a number");
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    let now_usec = now.tv_sec() as u64 * 1_000_000 + now.tv_nsec() as u64 / 1000;
    assert!(
        usec <= now_usec && now_usec - usec < 60_000_000,
        "{usec} vs {now_usec}"
    );
    expect("READY=1\n", "STATUS=serving generation 2");

    // A failed reload: RELOADING=1, then READY=1 all the same.
    std::fs::write(baton.dir.path().join("flags"), "--crash-at-start").expect("flags");
    assert_eq!(baton.reload()["ok"], false);
    expect("RELOADING=1\n", "generation 3");
    expect(
        "READY=1\n",
        "STATUS=serving generation 2; generation 3 failed to start",
    );

    // A crash restart is not a reload: no RELOADING=1.
    std::fs::write(baton.dir.path().join("flags"), "").expect("flags");
    let worker = baton.worker_pid(2).expect("generation 2 runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(worker),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    expect("READY=1\n", "STATUS=serving generation 4");

    baton.signal(nix::sys::signal::Signal::SIGTERM);
    expect("STOPPING=1", "");
    assert!(baton.wait_exit(Duration::from_secs(20)).success());
    // Nothing after STOPPING=1.
    systemd.socket.set_nonblocking(true).expect("non-blocking");
    let mut buf = [0u8; 64];
    assert!(
        systemd.socket.recv(&mut buf).is_err(),
        "a message after STOPPING=1"
    );
}

#[test]
fn systemd_notify_in_a_shell_script_worker_counts_as_ready_and_its_stopping_is_not_forwarded() {
    need("systemd-notify");
    let dir = tempfile::tempdir().expect("tempdir");
    let systemd = FakeSystemd::new(dir.path());
    let script = dir.path().join("worker.sh");
    // A plain shell worker: no listener use, readiness and STOPPING=1 from
    // systemd-notify (its own pid, not the worker's), a trap to drain.
    std::fs::write(
        &script,
        "#!/bin/sh\n\
         trap 'systemd-notify STOPPING=1; exit 0' TERM\n\
         systemd-notify --ready --status=\"shell worker $BATON_GENERATION\"\n\
         while :; do sleep 1 & wait $!; done\n",
    )
    .expect("writing the script");
    let mut baton = Baton::builder()
        .args([
            "--listen",
            "http=tcp://127.0.0.1:0",
            "--ready-timeout",
            "10s",
        ])
        .env("NOTIFY_SOCKET", systemd.path.as_os_str())
        .worker(["sh", script.to_str().expect("utf-8")])
        .start();
    assert_eq!(baton.reload_ok(), 2);
    baton.wait_settled();
    let status = baton.status();
    assert_eq!(
        status["generations"][0]["status"], "shell worker 2",
        "{status}"
    );
    baton.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(baton.wait_exit(Duration::from_secs(20)).success());
    let mut seen = Vec::new();
    systemd.socket.set_nonblocking(true).expect("non-blocking");
    let mut buf = [0u8; 4096];
    while let Ok(n) = systemd.socket.recv(&mut buf) {
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    // baton's own messages only: READY (gen 1), RELOADING, READY (gen 2),
    // STOPPING once; the workers' STOPPING=1 never reached "systemd".
    let stopping = seen.iter().filter(|m| m.contains("STOPPING=1")).count();
    assert_eq!(stopping, 1, "{seen:?}");
    assert!(seen.last().is_some_and(|m| m == "STOPPING=1"), "{seen:?}");
}
