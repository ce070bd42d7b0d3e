//! systemd's file descriptor store, from baton's side: with `$FDSTORE` set
//! (systemd 254+ sets it when the unit has `FileDescriptorStoreMax=`), baton
//! puts the listeners it bound itself and its latest kept values there, each
//! under its own name, replacing the old under that name; what the store
//! gives back after a crash is tested under the real systemd
//! (`real_systemd.rs`). Here a datagram socket plays systemd.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use baton_tests::harness::{bin, recv_with_fds, Baton};

/// A datagram socket that plays systemd's notify socket, at `notify` in a
/// directory of its own.
fn fake_systemd() -> (tempfile::TempDir, UnixDatagram) {
    let dir = tempfile::tempdir().expect("tempdir");
    let systemd = UnixDatagram::bind(dir.path().join("notify")).expect("binding the fake systemd");
    systemd
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    (dir, systemd)
}

#[test]
fn baton_stores_its_own_listeners_and_each_new_snapshot_by_name() {
    let (dir, systemd) = fake_systemd();
    let path = dir.path().join("notify");
    let baton = Baton::builder()
        .args(["--listen", "http=tcp://127.0.0.1:0"])
        .env("NOTIFY_SOCKET", path.as_os_str())
        .env("FDSTORE", "8")
        .flagged(bin("counter").to_str().expect("utf-8"), "")
        .start();
    let next = || recv_with_fds(&systemd).expect("a message for systemd within 30s");
    let (msg, fds) = next();
    assert_eq!(msg, "FDSTOREREMOVE=1\nFDNAME=baton-listen-http");
    assert!(fds.is_empty());
    let (msg, fds) = next();
    assert_eq!(msg, "FDSTORE=1\nFDNAME=baton-listen-http");
    // The very listener baton holds: same address.
    let [listener] = fds.as_slice() else {
        panic!("{} descriptors with {msg:?}", fds.len());
    };
    let stored = nix::sys::socket::getsockname::<nix::sys::socket::SockaddrIn>(
        std::os::fd::AsRawFd::as_raw_fd(listener),
    )
    .expect("getsockname");
    assert_eq!(stored.to_string(), baton.address("http"));
    let (msg, _) = next();
    assert!(msg.starts_with("READY=1"), "{msg:?}");

    // An increment: the counter checkpoints it within a second, and the
    // checkpoint replaces the kept values in the store.
    baton_tests::http::get(&baton.address("http"), "/", Duration::from_secs(10)).expect("GET /");
    let (msg, _) = next();
    assert_eq!(msg, "FDSTOREREMOVE=1\nFDNAME=baton-kept");
    let (msg, fds) = next();
    assert_eq!(msg, "FDSTORE=1\nFDNAME=baton-kept");
    let [memfd] = fds.as_slice() else {
        panic!("{} descriptors with {msg:?}", fds.len());
    };
    let size = nix::sys::stat::fstat(memfd).expect("fstat").st_size;
    assert_eq!(
        Some(size as u64),
        baton.status()["kept"]["bytes"].as_u64(),
        "the stored memfd is the checkpoint baton holds"
    );
}

#[test]
fn without_a_store_nothing_is_sent_and_the_log_says_so() {
    let (dir, systemd) = fake_systemd();
    let path = dir.path().join("notify");
    let baton = Baton::builder()
        .args(["--listen", "http=tcp://127.0.0.1:0"])
        .env("NOTIFY_SOCKET", path.as_os_str())
        .pyworker("")
        .start();
    let (msg, _) = recv_with_fds(&systemd).expect("READY=1");
    assert!(msg.starts_with("READY=1"), "{msg:?}");
    baton.wait_log("file descriptor store is not in use");
}
