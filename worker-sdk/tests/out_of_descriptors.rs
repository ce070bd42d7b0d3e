//! A receiver that is out of descriptors, with real rlimits: the kernel
//! drops the descriptors sent with a packet it cannot install (`EMFILE`) and
//! sets `MSG_CTRUNC`. The protocol reports that as the receiver's own
//! condition (not "more than 253 descriptors"), with the message that
//! arrived; the channel stays usable; and an SDK worker whose kept values'
//! memfd was lost rejects them (the reload fails) and keeps its channel.
//!
//! `RLIMIT_NOFILE` is process-wide, so this binary holds one test only and
//! lowers the limit only around the receive it is about.

use std::os::fd::{AsFd, AsRawFd, IntoRawFd, OwnedFd};
use std::time::Duration;

use baton_worker::protocol::{
    self, ProtocolError, StateSource, SupervisorMessage, WorkerMessage, PROTOCOL_VERSION,
    SNAPSHOT_SEALS,
};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

/// Holds `RLIMIT_NOFILE` at the lowest free descriptor number, so this
/// process can open no descriptor; restores the limit when dropped.
struct NoFreeDescriptor {
    soft: u64,
    hard: u64,
    /// The lowered soft limit.
    limit: u64,
}

impl NoFreeDescriptor {
    fn new() -> NoFreeDescriptor {
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        let lowest_free = std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .expect("dup")
            .as_raw_fd();
        let limit = u64::try_from(lowest_free).expect("a descriptor number");
        setrlimit(Resource::RLIMIT_NOFILE, limit, hard).expect("setrlimit");
        assert!(
            std::io::stderr().as_fd().try_clone_to_owned().is_err(),
            "no descriptor can be opened now"
        );
        NoFreeDescriptor { soft, hard, limit }
    }
}

impl Drop for NoFreeDescriptor {
    fn drop(&mut self) {
        setrlimit(Resource::RLIMIT_NOFILE, self.soft, self.hard).expect("restoring the limit");
    }
}

fn pair() -> (OwnedFd, OwnedFd) {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .expect("socketpair")
}

/// A sealed memfd holding `content`.
fn snapshot(content: &[u8]) -> OwnedFd {
    use nix::sys::memfd::{memfd_create, MFdFlags};
    use std::os::unix::fs::FileExt;
    let fd = memfd_create(
        c"snapshot",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .expect("memfd_create");
    let file = std::fs::File::from(fd);
    file.write_all_at(content, 0).expect("write");
    let fd = OwnedFd::from(file);
    nix::fcntl::fcntl(
        &fd,
        nix::fcntl::FcntlArg::F_ADD_SEALS(nix::fcntl::SealFlag::from_bits_truncate(SNAPSHOT_SEALS)),
    )
    .expect("seal");
    fd
}

#[test]
fn descriptors_lost_to_the_receivers_own_limit_are_reported_as_such() {
    a_receive_out_of_descriptors_says_so_and_keeps_the_message();
    an_sdk_worker_rejects_kept_values_whose_memfd_was_lost_and_keeps_its_channel();
}

fn a_receive_out_of_descriptors_says_so_and_keeps_the_message() {
    let (worker, supervisor) = pair();
    let checkpoint = WorkerMessage::Checkpoint { bytes: 3 };
    let memfd = snapshot(b"{}x");
    protocol::send(worker.as_fd(), &checkpoint, &[memfd.as_fd()]).expect("send");
    let limited = NoFreeDescriptor::new();
    let err = protocol::recv::<WorkerMessage>(supervisor.as_fd()).expect_err("no room");
    let limit = limited.limit;
    drop(limited);
    assert_eq!(
        err.to_string(),
        format!(
            "worker channel: this process is out of descriptors (RLIMIT_NOFILE {limit}); \
             descriptors sent with a `checkpoint` message were lost"
        )
    );
    assert!(
        matches!(err, ProtocolError::OutOfDescriptors { limit: l, .. } if l == limit),
        "{err:?}"
    );
    assert!(err.is_transient() && !err.is_fatal());
    assert_eq!(
        err.lost_message::<WorkerMessage>(),
        Some(checkpoint.clone())
    );

    // The channel goes on: the next message arrives with its descriptor.
    protocol::send(worker.as_fd(), &checkpoint, &[memfd.as_fd()]).expect("send");
    let (got, fds) = protocol::recv::<WorkerMessage>(supervisor.as_fd()).expect("recv");
    assert_eq!((got, fds.len()), (checkpoint, 1));
}

fn an_sdk_worker_rejects_kept_values_whose_memfd_was_lost_and_keeps_its_channel() {
    let (supervisor, worker) = pair();
    std::env::set_var(protocol::CHANNEL_FD_ENV, worker.into_raw_fd().to_string());
    for inherited in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "BATON_LISTEN"] {
        std::env::remove_var(inherited);
    }
    let doc = br#"{"format":1,"values":{"count":5}}"#;
    let fake_supervisor = std::thread::spawn(move || {
        let (hello, _) = protocol::recv::<WorkerMessage>(supervisor.as_fd()).expect("hello");
        assert!(matches!(hello, WorkerMessage::Hello { .. }), "{hello:?}");
        let welcome = SupervisorMessage::Welcome {
            protocol: PROTOCOL_VERSION,
            generation: 2,
            listeners: vec![],
        };
        protocol::send(supervisor.as_fd(), &welcome, &[]).expect("welcome");
        let (ask, _) = protocol::recv::<WorkerMessage>(supervisor.as_fd()).expect("prepare");
        assert_eq!(ask, WorkerMessage::Prepare);
        let no_pre_copy = SupervisorMessage::State {
            source: StateSource::PreCopy,
            generation: None,
            bytes: 0,
            base_bytes: None,
        };
        protocol::send(supervisor.as_fd(), &no_pre_copy, &[]).expect("no pre-copy");
        let (ask, _) = protocol::recv::<WorkerMessage>(supervisor.as_fd()).expect("take_state");
        assert_eq!(ask, WorkerMessage::TakeState);
        let memfd = snapshot(doc);
        let limited = NoFreeDescriptor::new();
        let state = SupervisorMessage::State {
            source: StateSource::Snapshot,
            generation: Some(1),
            bytes: doc.len() as u64,
            base_bytes: None,
        };
        protocol::send(supervisor.as_fd(), &state, &[memfd.as_fd()]).expect("state");
        // The worker's answer carries no descriptor: it arrives even now.
        let (answer, _) = protocol::recv::<WorkerMessage>(supervisor.as_fd()).expect("answer");
        let limit = limited.limit;
        drop(limited);
        protocol::send(
            supervisor.as_fd(),
            &SupervisorMessage::Drain { timeout_ms: 5_000 },
            &[],
        )
        .expect("drain");
        (answer, limit, supervisor)
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let within = Duration::from_secs(10);
    runtime.block_on(async {
        let worker = baton_worker::start().await.expect("start");
        let kept = tokio::time::timeout(within, worker.keep("count", || 0u64))
            .await
            .expect("keep answers, not hangs");
        let err = kept.expect_err("the kept values' memfd was lost");
        let (answer, limit, _supervisor) = fake_supervisor.join().expect("fake supervisor");
        let reason = format!(
            "receiving the kept values: worker channel: this process is out of descriptors \
             (RLIMIT_NOFILE {limit}); descriptors sent with a `state` message were lost"
        );
        assert_eq!(
            answer,
            WorkerMessage::Rejected {
                reason: reason.clone()
            }
        );
        assert!(err.to_string().contains(&reason), "{err}");
        // The channel was kept: the supervisor's drain arrives.
        tokio::time::timeout(within, worker.drained())
            .await
            .expect("the drain arrives");
        assert!(
            matches!(
                worker.drain_cause(),
                Some(baton_worker::DrainCause::Supervisor { .. })
            ),
            "{:?}",
            worker.drain_cause()
        );
    });
}
