//! The worker handle's tests: a fake supervisor on a socketpair plays the
//! handshake, the drain and the kept-values answers; standalone starts bind
//! real sockets.

use super::*;
use crate::protocol::StateSource;
use crate::protocol::{self, SupervisorMessage, PROTOCOL_VERSION};

fn fresh_state() -> Arc<state::Shared> {
    Arc::new(state::Shared::new(1, None))
}
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use std::net::{TcpListener, UdpSocket};

fn pair() -> (OwnedFd, OwnedFd) {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .expect("socketpair")
}

/// Plays the supervisor's side of the handshake on a thread: reads
/// hello, answers with `listeners` and their descriptors, then hands its
/// end back.
fn fake_supervisor(
    ours: OwnedFd,
    generation: u64,
    listeners: Vec<(ListenerInfo, OwnedFd)>,
) -> std::thread::JoinHandle<OwnedFd> {
    std::thread::spawn(move || {
        let (hello, _): (WorkerMessage, _) = protocol::recv(ours.as_fd()).expect("hello");
        assert!(matches!(
            hello,
            WorkerMessage::Hello {
                protocol: PROTOCOL_VERSION,
                ..
            }
        ));
        let welcome = SupervisorMessage::Welcome {
            protocol: PROTOCOL_VERSION,
            generation,
            listeners: listeners.iter().map(|(i, _)| i.clone()).collect(),
        };
        let fds: Vec<_> = listeners.iter().map(|(_, fd)| fd.as_fd()).collect();
        protocol::send(ours.as_fd(), &welcome, &fds).expect("welcome");
        ours
    })
}

fn info(name: &str, kind: ListenerKind) -> ListenerInfo {
    ListenerInfo {
        name: name.into(),
        kind,
    }
}

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

#[tokio::test]
async fn under_a_supervisor_listeners_arrive_and_drain_fires() {
    let (ours, theirs) = pair();
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = tcp.local_addr().unwrap();
    let supervisor = fake_supervisor(ours, 3, vec![(info("http", ListenerKind::Tcp), tcp.into())]);
    let worker = supervised(Handle::current(), theirs, 0..0, fresh_state())
        .await
        .expect("start");
    let ours = supervisor.join().unwrap();
    assert_eq!(worker.generation(), 3);
    assert!(worker.is_reload());
    assert!(worker.is_supervised());

    let listener = worker.tcp_listener("http").expect("tcp listener");
    assert_eq!(listener.local_addr().unwrap(), addr);

    // ready() is idempotent: one message however often it is called.
    worker.ready().unwrap();
    worker.ready().unwrap();
    worker.status("line one\nline two").unwrap();
    let (m, _): (WorkerMessage, _) = protocol::recv(ours.as_fd()).unwrap();
    assert_eq!(m, WorkerMessage::Ready);
    let (m, _): (WorkerMessage, _) = protocol::recv(ours.as_fd()).unwrap();
    assert_eq!(
        m,
        WorkerMessage::Status {
            text: "line one line two".into()
        }
    );

    let hooked = Arc::new(AtomicBool::new(false));
    let flag = hooked.clone();
    worker.on_drain(move || flag.store(true, Ordering::SeqCst));
    let (ticked_tx, mut ticked) = tokio::sync::mpsc::unbounded_channel();
    let timer = worker.interval(Duration::from_millis(1), move || {
        let _ = ticked_tx.send(());
        ControlFlow::Continue(())
    });
    within("a first tick", ticked.recv()).await;
    assert!(!worker.is_draining());

    protocol::send(
        ours.as_fd(),
        &SupervisorMessage::Drain { timeout_ms: 30_000 },
        &[],
    )
    .unwrap();
    within("the drain", worker.drained()).await;
    assert!(worker.is_draining());
    assert!(hooked.load(Ordering::SeqCst), "the hook ran");
    assert_eq!(
        worker.drain_cause(),
        Some(DrainCause::Supervisor {
            timeout: Duration::from_secs(30)
        })
    );
    let left = worker.drain_deadline().unwrap() - Instant::now();
    assert!(left > Duration::from_secs(29) && left <= Duration::from_secs(30));
    within("the timer to stop", timer).await.unwrap();
    // Late futures resolve at once.
    within("a late drained()", worker.drained()).await;
}

#[tokio::test]
async fn a_closed_channel_drains_and_later_sends_fail() {
    let (ours, theirs) = pair();
    let supervisor = fake_supervisor(ours, 1, vec![]);
    let worker = supervised(Handle::current(), theirs, 0..0, fresh_state())
        .await
        .expect("start");
    assert!(!worker.is_reload());
    drop(supervisor.join().unwrap());
    within("the drain", worker.drained()).await;
    assert_eq!(worker.drain_cause(), Some(DrainCause::ChannelClosed));
    assert_eq!(worker.drain_deadline(), None);
    let err = worker.ready().unwrap_err();
    assert!(
        err.to_string()
            .starts_with("sending ready to the supervisor"),
        "{err}"
    );
}

#[tokio::test]
async fn kept_values_announced_without_their_memfd_are_rejected() {
    let (ours, theirs) = pair();
    let supervisor = fake_supervisor(ours, 2, vec![]);
    let worker = supervised(Handle::current(), theirs, 0..0, fresh_state())
        .await
        .expect("start");
    let ours = supervisor.join().unwrap();
    let answer = std::thread::spawn(move || {
        let (ask, _): (WorkerMessage, _) = protocol::recv(ours.as_fd()).expect("prepare");
        assert_eq!(ask, WorkerMessage::Prepare);
        let none = SupervisorMessage::State {
            source: StateSource::PreCopy,
            generation: None,
            bytes: 0,
            base_bytes: None,
        };
        protocol::send(ours.as_fd(), &none, &[]).expect("no pre-copy");
        let (ask, _): (WorkerMessage, _) = protocol::recv(ours.as_fd()).expect("take_state");
        assert_eq!(ask, WorkerMessage::TakeState);
        let state = SupervisorMessage::State {
            source: StateSource::Snapshot,
            generation: Some(1),
            bytes: 10,
            base_bytes: None,
        };
        protocol::send(ours.as_fd(), &state, &[]).expect("state");
        let (answer, _): (WorkerMessage, _) = protocol::recv(ours.as_fd()).expect("answer");
        answer
    });
    let err = within("keep", worker.keep("count", || 0u64))
        .await
        .expect_err("no memfd");
    let reason = "the supervisor announced 10 bytes of kept values but sent no memfd";
    assert_eq!(
        err.to_string(),
        format!("rejecting the previous generation's kept values: {reason}")
    );
    assert_eq!(
        answer.join().unwrap(),
        WorkerMessage::Rejected {
            reason: reason.into()
        }
    );
}

#[tokio::test]
async fn a_socket_of_the_wrong_kind_is_refused_naming_the_listener() {
    let (ours, theirs) = pair();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let supervisor = fake_supervisor(ours, 1, vec![(info("http", ListenerKind::Tcp), udp.into())]);
    let err = supervised(Handle::current(), theirs, 0..0, fresh_state())
        .await
        .expect_err("a UDP socket declared as TCP");
    drop(supervisor.join());
    assert_eq!(
        err.to_string(),
        "listener `http`: the supervisor declared a listening TCP socket but sent an IPv4 \
         UDP socket"
    );
}

#[tokio::test]
async fn a_channel_that_is_not_a_seqpacket_socket_is_refused() {
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let fd: OwnedFd = tcp.into();
    let raw = fd.as_raw_fd();
    let err = supervised(Handle::current(), fd, 0..0, fresh_state())
        .await
        .expect_err("not a channel");
    assert_eq!(
        err.to_string(),
        format!(
            "taking the worker channel (fd {raw}, from BATON_CHANNEL_FD): expected a Unix \
             seqpacket socket, found a listening IPv4 TCP socket"
        )
    );
}

#[test]
fn the_handle_can_go_anywhere() {
    fn send_sync_clone<T: Send + Sync + Clone + 'static>() {}
    send_sync_clone::<Worker>();
}

#[test]
fn the_channel_variable_is_checked() {
    let pid = std::process::id().to_string();
    assert_eq!(parse_channel_fd("7", Some(pid.clone())).unwrap(), 7);
    assert_eq!(parse_channel_fd("7", None).unwrap(), 7);
    for bad in ["", "x", "-1", "2"] {
        let err = parse_channel_fd(bad, None).unwrap_err();
        assert!(matches!(err, Error::BadChannelFd { .. }), "{bad}: {err}");
    }
    let err = parse_channel_fd("7", Some("1".into())).unwrap_err();
    assert!(
        err.to_string()
            .contains("LISTEN_PID is 1, not this process"),
        "{err}"
    );
}

#[tokio::test]
async fn standalone_binds_defaults_and_baton_listen_overrides_them() {
    let worker = standalone(
        Handle::current(),
        &[
            ("http".into(), "tcp://127.0.0.1:0".into()),
            ("admin".into(), "tcp://127.0.0.1:0".into()),
        ],
        Some("http=udp://127.0.0.1:0,extra=udp://[::1]:0"),
        fresh_state(),
    );
    let worker = match worker {
        Ok(w) => w,
        // Machines without IPv6 loopback: try again without it.
        Err(Error::Bind { name, .. }) if name == "extra" => standalone(
            Handle::current(),
            &[
                ("http".into(), "tcp://127.0.0.1:0".into()),
                ("admin".into(), "tcp://127.0.0.1:0".into()),
            ],
            Some("http=udp://127.0.0.1:0,extra=udp://127.0.0.1:0"),
            fresh_state(),
        )
        .expect("standalone"),
        Err(e) => panic!("{e}"),
    };
    assert_eq!(worker.generation(), 0);
    assert!(!worker.is_reload());
    assert!(!worker.is_supervised());
    let kinds: Vec<(String, ListenerKind)> = worker
        .listeners()
        .into_iter()
        .map(|l| (l.name, l.kind))
        .collect();
    assert_eq!(
        kinds,
        [
            ("http".to_owned(), ListenerKind::Udp),
            ("admin".to_owned(), ListenerKind::Tcp),
            ("extra".to_owned(), ListenerKind::Udp),
        ]
    );
    worker.ready().expect("ready is a no-op standalone");
    worker.status("fine").expect("status is a no-op standalone");
    let udp = worker.udp_socket("http").expect("udp");
    let admin = worker.tcp_listener("admin").expect("tcp");
    assert!(udp.local_addr().unwrap().port() != 0);
    assert!(admin.local_addr().unwrap().port() != 0);
}

#[tokio::test]
async fn standalone_errors_name_the_entry() {
    let err = standalone(
        Handle::current(),
        &[],
        Some("http=tcp://localhost:80"),
        fresh_state(),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("parsing BATON_LISTEN \"http=tcp://localhost:80\": "),
        "{err}"
    );
    let err = standalone(
        Handle::current(),
        &[("http".into(), "nope".into())],
        None,
        fresh_state(),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("parsing default_listener \"http=nope\": "),
        "{err}"
    );
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let spec = format!("busy=tcp://{}", taken.local_addr().unwrap());
    let err = standalone(Handle::current(), &[], Some(&spec), fresh_state()).unwrap_err();
    assert!(
        err.to_string().starts_with(&format!(
            "binding listener `busy` on tcp://{}: ",
            taken.local_addr().unwrap()
        )),
        "{err}"
    );
}

#[tokio::test]
async fn an_interval_stops_when_its_closure_says_so() {
    let worker = standalone(Handle::current(), &[], None, fresh_state()).unwrap();
    let mut n = 0;
    let timer = worker.interval(Duration::ZERO, move || {
        n += 1;
        if n == 3 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    within("the timer to stop", timer).await.unwrap();
    assert!(!worker.is_draining());
}
