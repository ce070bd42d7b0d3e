//! The worker protocol: what a worker and the baton supervisor say to each
//! other on the worker channel, and how one message travels.
//!
//! The channel is a `SOCK_SEQPACKET` Unix socket, so every message is one
//! packet: one JSON object (unknown fields are ignored, so a newer peer may
//! add some; [`PROTOCOL_VERSION`] guards meaning), at most [`MAX_MESSAGE`] bytes, with any attached
//! descriptors passed alongside it with `SCM_RIGHTS`. Received descriptors are
//! close-on-exec from the moment they arrive (`MSG_CMSG_CLOEXEC`), and a packet
//! whose data or descriptors were truncated is refused, never half-read. When
//! the descriptors were lost because the *receiver* is out of descriptor
//! numbers, the error says so ([`ProtocolError::OutOfDescriptors`]) and
//! still holds the message, and [`ProtocolError::is_fatal`] tells an error
//! that ends the channel from one that only cost a packet.
//!
//! A conversation, as of [`PROTOCOL_VERSION`] 1:
//!
//! ```text
//! worker                                   supervisor
//!   | -- Hello { protocol, pid } ------------> |
//!   | <----------- Welcome { generation, listeners } + one fd per listener
//!   | -- Prepare ----------------------------> |   (first `keep`: "a pre-copy, please")
//!   |                                          | --> PreCopy to the serving generation,
//!   |                                          | <-- PreCopied + memfd (it serves on)
//!   | <------- State { PreCopy, .. } + memfd   |   (read while the old one serves)
//!   | -- TakeState --------------------------> |   ("now the final values")
//!   |                                          | --> Freeze to the serving generation,
//!   |                                          | <-- Frozen + memfd (+ the pre-copy's)
//!   | <------- State { source, .. } + memfds   |   (the snapshot, a checkpoint, or none)
//!   | -- Ready ------------------------------> |   (the generation may now serve)
//!   | -- Status { text } --------------------> |   (any time, shown in `baton status`)
//!   | -- Checkpoint { bytes } + memfd -------> |   (any time: kept for a crash restart)
//!   | <------------------- Drain { timeout_ms } |   (stop accepting, finish, exit)
//! ```
//!
//! The frozen generation has stopped accepting and serialized its kept
//! values; if its successor fails before it is ready (or sends `Rejected`),
//! the supervisor sends it `Thaw` and it accepts again, values intact.
//!
//! Snapshots travel as **sealed memfds** ([`SNAPSHOT_SEALS`]): the writer
//! fills one and seals it, the supervisor passes the very same descriptor on
//! without reading it, and the reader maps or reads it. No byte of a snapshot
//! crosses the channel itself, so its size is bounded only by `--max-state`.
//!
//! This module never blocks on its own: the send and receive functions are
//! meant for non-blocking sockets driven by the caller's event loop, and they
//! return `WouldBlock` like any non-blocking call.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The version of the worker protocol this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// The largest message, in bytes, either side accepts on the channel.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// The most descriptors one message may carry (the kernel's `SCM_MAX_FD`).
pub const MAX_FDS: usize = 253;

/// How long a frozen worker waits for its work in flight when the `Freeze`
/// message does not say (`baton run --freeze-grace`'s default).
pub const DEFAULT_FREEZE_GRACE_MS: u64 = 2_000;

/// The environment variable naming the worker's end of the channel.
pub const CHANNEL_FD_ENV: &str = "BATON_CHANNEL_FD";

/// The environment variable holding the worker's generation number.
pub const GENERATION_ENV: &str = "BATON_GENERATION";

/// What a worker sends to the supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkerMessage {
    /// The first message: the worker speaks the protocol.
    Hello {
        /// The protocol version the worker speaks.
        protocol: u32,
        /// The worker's process id, as it sees it.
        pid: u32,
        /// It answers `PreCopy` (absent from older workers: `false`).
        #[serde(default)]
        pre_copy: bool,
    },
    /// The worker can serve: the supervisor may drain the previous generation.
    Ready,
    /// A free-form status line, shown by `baton status`.
    Status {
        /// The status text, one line.
        text: String,
    },
    /// Asks for the kept values of the generation before: the supervisor
    /// freezes the serving generation and answers with `State`.
    TakeState,
    /// Asks for a **pre-copy** of the serving generation's kept values,
    /// which serves on meanwhile: the supervisor sends it `PreCopy` and
    /// answers with `State` (source `PreCopy`), or with a `State` of no
    /// bytes when there is nothing to pre-copy. `TakeState` follows; its
    /// snapshot then holds only the values written since the pre-copy.
    Prepare,
    /// The answer to `PreCopy`: every kept value, in the attached sealed
    /// memfd (none when `bytes` is 0), written while this generation
    /// serves on. Values written after it are sent again at the freeze.
    PreCopied {
        /// The snapshot's size in bytes.
        bytes: u64,
        /// The generation it is for, as `PreCopy` said.
        for_generation: u64,
    },
    /// The answer to `Freeze`: this generation stopped accepting and
    /// serialized its kept values into the attached sealed memfd (none when
    /// `bytes` is 0).
    Frozen {
        /// The snapshot's size in bytes.
        bytes: u64,
        /// With a pre-copy: the snapshot holds only the values written
        /// since the pre-copy, which is attached second, `base_bytes` long.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        base_bytes: Option<u64>,
    },
    /// The answer to `Freeze` when the values could not be serialized; the
    /// worker goes on serving and the reload fails.
    FreezeFailed {
        /// Why, for the operator.
        reason: String,
    },
    /// The worker refuses the snapshot it was given (say, a format it cannot
    /// migrate). The reload fails before cut-over; the frozen generation thaws.
    Rejected {
        /// Why, for the operator.
        reason: String,
    },
    /// The current kept values, in the attached sealed memfd (none when
    /// `bytes` is 0): the supervisor keeps the latest for a crash restart.
    Checkpoint {
        /// The snapshot's size in bytes.
        bytes: u64,
    },
}

/// What the supervisor sends to a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SupervisorMessage {
    /// The answer to `Hello`. Carries one descriptor per listener, in order.
    Welcome {
        /// The protocol version the supervisor speaks.
        protocol: u32,
        /// This worker's generation, 1 for the first.
        generation: u64,
        /// The listeners, in the order of the attached descriptors.
        listeners: Vec<ListenerInfo>,
    },
    /// Stop accepting, finish in-flight work and exit. The supervisor kills
    /// the worker once `timeout_ms` milliseconds have passed.
    Drain {
        /// How long the worker has before it is killed, in milliseconds.
        timeout_ms: u64,
    },
    /// Stop accepting and stop reading new requests (keep-alive connections
    /// close after the request in flight), wait up to `grace_ms` for the
    /// work in flight to finish, then answer with `Frozen` and a snapshot.
    /// A write attempted after the snapshot is refused, never acknowledged.
    Freeze {
        /// How long the work in flight may take before the snapshot is
        /// written anyway (its later writes are then refused), in
        /// milliseconds; absent from an older supervisor, which means
        /// [`DEFAULT_FREEZE_GRACE_MS`].
        #[serde(default)]
        grace_ms: Option<u64>,
        /// The successor reads a snapshot that holds only the values
        /// written since this generation's last pre-copy (it said so in its
        /// `hello`); otherwise the snapshot holds every value.
        #[serde(default)]
        delta: bool,
    },
    /// The successor failed: accept again, with the values as they are.
    Thaw,
    /// Write every kept value into a sealed memfd and answer with
    /// `PreCopied`, serving on: generation `for_generation` reads it while
    /// this one still serves, and the freeze that follows sends only what
    /// changed since.
    PreCopy {
        /// The generation that will read it.
        for_generation: u64,
    },
    /// The answer to `TakeState`, with the snapshot's sealed memfd attached
    /// unless `source` is `None`.
    State {
        /// Where the values come from.
        source: StateSource,
        /// The generation that wrote them, if any.
        generation: Option<u64>,
        /// The snapshot's size in bytes.
        bytes: u64,
        /// The snapshot holds only the values written since a pre-copy,
        /// which is attached second, `base_bytes` long.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        base_bytes: Option<u64>,
    },
}

/// Where the values in a `State` message come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateSource {
    /// Frozen from the serving generation just now: exact.
    Snapshot,
    /// The last checkpoint of a generation that is gone (a crash restart).
    Checkpoint,
    /// Nothing kept: the first start, or no generation ever kept values.
    None,
    /// The answer to `Prepare`: a pre-copy of the serving generation's
    /// values, which it serves on with (not final: `TakeState` follows).
    PreCopy,
}

/// The seals a snapshot memfd must carry: nobody, writer included, can
/// change it after it was handed over.
pub const SNAPSHOT_SEALS: libc::c_int =
    libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;

/// A listener as the supervisor describes it to a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerInfo {
    /// The listener's name, as given by `--listen NAME=ADDR`.
    pub name: String,
    /// What kind of socket it is.
    pub kind: ListenerKind,
}

/// The kinds of listener baton holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ListenerKind {
    /// A listening TCP socket, IPv4 or IPv6.
    Tcp,
    /// A bound UDP socket, IPv4 or IPv6.
    Udp,
    /// A listening Unix stream socket.
    Unix,
    /// A bound Unix datagram socket.
    UnixDgram,
}

/// Why a message could not be sent or received.
///
/// Every error falls in one of three classes, which say what to do next:
///
/// | class | variants | the channel | what to do |
/// | --- | --- | --- | --- |
/// | [fatal](Self::is_fatal) | `Closed`; `Io` other than below | gone | stop reading and sending |
/// | [transient](Self::is_transient) | `OutOfDescriptors`, `OutboxFull`; `Io` `WouldBlock`, `EINTR`, `ENOBUFS`, `ENOMEM`, `ETOOMANYREFS` | usable | this process's own passing condition, not the peer's fault: go on (later) |
/// | neither | `TooLarge`, `TooManyFds`, `Malformed` | usable | one bad packet, dropped whole (`SOCK_SEQPACKET` keeps packet boundaries): the peer's fault |
///
/// An `OutOfDescriptors` packet's message did arrive, only its descriptors
/// were lost: [`lost_message`](Self::lost_message) decodes it, so the caller
/// can tell which message it was (a snapshot that lost its memfd, say).
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The socket call itself failed (including `WouldBlock`).
    #[error("worker channel: {0}")]
    Io(#[from] io::Error),
    /// The peer closed its end.
    #[error("worker channel closed by the peer")]
    Closed,
    /// A packet was larger than [`MAX_MESSAGE`].
    #[error("worker channel: message larger than {MAX_MESSAGE} bytes")]
    TooLarge,
    /// Descriptors attached to a packet did not fit and were dropped (or,
    /// sending, more than [`MAX_FDS`] were given).
    #[error("worker channel: message carried more than {MAX_FDS} descriptors")]
    TooManyFds,
    /// The packet was not a valid message of this protocol.
    #[error("worker channel: malformed message {excerpt:?}: {source}")]
    Malformed {
        /// The start of the packet, for the error message.
        excerpt: String,
        /// What the JSON decoder said.
        source: serde_json::Error,
    },
    /// A packet arrived, but the descriptors sent with it were lost: this
    /// process had no free descriptor number to put them at (`EMFILE`; the
    /// kernel then drops them and sets `MSG_CTRUNC`). The receiver's own
    /// condition, not the sender's fault; the channel stays usable.
    #[error(
        "worker channel: this process is out of descriptors (RLIMIT_NOFILE {limit}); \
         descriptors sent with {} were lost",
        describe_packet(packet)
    )]
    OutOfDescriptors {
        /// This process's soft `RLIMIT_NOFILE` when it happened.
        limit: u64,
        /// The packet's data, as received: the message whose descriptors
        /// were lost (see [`lost_message`](ProtocolError::lost_message)).
        packet: String,
    },
    /// Sending: the peer has not read for so long that `queued` messages
    /// already wait for it; this one was not queued. Only the SDK's outbox
    /// returns it.
    #[error(
        "worker channel: {queued} messages already wait for the supervisor, which is not \
         reading; this one was dropped"
    )]
    OutboxFull {
        /// How many messages were waiting.
        queued: usize,
    },
}

/// "a `checkpoint` message" for a packet that names its type, else "a
/// message".
fn describe_packet(packet: &str) -> String {
    serde_json::from_str::<serde_json::Value>(packet)
        .ok()
        .and_then(|v| v.get("type")?.as_str().map(|t| format!("a `{t}` message")))
        .unwrap_or_else(|| "a message".to_owned())
}

impl ProtocolError {
    /// Whether this is a `WouldBlock` from a non-blocking socket.
    pub fn is_would_block(&self) -> bool {
        matches!(self, ProtocolError::Io(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Whether the channel is gone: the peer closed or reset it, or the
    /// socket failed in a way no retry mends. Nothing more can be read or
    /// sent; stop using the channel. Every other error leaves it usable.
    pub fn is_fatal(&self) -> bool {
        match self {
            ProtocolError::Closed => true,
            ProtocolError::Io(e) => !io_is_transient(e),
            ProtocolError::TooLarge
            | ProtocolError::TooManyFds
            | ProtocolError::Malformed { .. }
            | ProtocolError::OutOfDescriptors { .. }
            | ProtocolError::OutboxFull { .. } => false,
        }
    }

    /// Whether this is a passing condition of this process, not the
    /// peer's fault: out of descriptors or memory, an interrupted or
    /// would-block call, a full outbox. The channel stays usable; do not
    /// blame the peer. A transient error is never [fatal](Self::is_fatal).
    pub fn is_transient(&self) -> bool {
        match self {
            ProtocolError::Io(e) => io_is_transient(e),
            ProtocolError::OutOfDescriptors { .. } | ProtocolError::OutboxFull { .. } => true,
            ProtocolError::Closed
            | ProtocolError::TooLarge
            | ProtocolError::TooManyFds
            | ProtocolError::Malformed { .. } => false,
        }
    }

    /// For [`OutOfDescriptors`](Self::OutOfDescriptors): the message that
    /// arrived without its descriptors, decoded as `M` (`None` if it does
    /// not decode). `None` for every other error.
    ///
    /// ```
    /// use baton_worker::protocol::{ProtocolError, WorkerMessage};
    /// let lost = ProtocolError::OutOfDescriptors {
    ///     limit: 64,
    ///     packet: r#"{"type":"frozen","bytes":12}"#.into(),
    /// };
    /// assert_eq!(
    ///     lost.lost_message::<WorkerMessage>(),
    ///     Some(WorkerMessage::Frozen { bytes: 12, base_bytes: None })
    /// );
    /// assert!(lost.is_transient() && !lost.is_fatal());
    /// assert_eq!(
    ///     lost.to_string(),
    ///     "worker channel: this process is out of descriptors (RLIMIT_NOFILE 64); \
    ///      descriptors sent with a `frozen` message were lost"
    /// );
    /// ```
    pub fn lost_message<M: DeserializeOwned>(&self) -> Option<M> {
        match self {
            ProtocolError::OutOfDescriptors { packet, .. } => serde_json::from_str(packet).ok(),
            _ => None,
        }
    }
}

/// `WouldBlock`, `EINTR`, the kernel short of memory for a moment, and
/// `ETOOMANYREFS` (sending: this process has more descriptors in flight
/// than its `RLIMIT_NOFILE`, until the peer reads some).
fn io_is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    ) || matches!(
        e.raw_os_error(),
        Some(libc::ENOBUFS | libc::ENOMEM | libc::ETOOMANYREFS)
    )
}

/// Encodes `message` and sends it as one packet with `fds` attached.
pub fn send<M: Serialize>(
    channel: BorrowedFd<'_>,
    message: &M,
    fds: &[BorrowedFd<'_>],
) -> Result<(), ProtocolError> {
    let bytes = serde_json::to_vec(message).map_err(io::Error::other)?;
    if bytes.len() > MAX_MESSAGE {
        return Err(ProtocolError::TooLarge);
    }
    if fds.len() > MAX_FDS {
        return Err(ProtocolError::TooManyFds);
    }
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
    let iov = [IoSlice::new(&bytes)];
    loop {
        match socket::sendmsg::<()>(
            channel.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EPIPE) | Err(nix::errno::Errno::ECONNRESET) => {
                return Err(ProtocolError::Closed)
            }
            Err(e) => return Err(io::Error::from(e).into()),
        }
    }
}

/// Receives one packet and decodes it, with the descriptors it carried
/// (already close-on-exec).
///
/// Any descriptors that arrived are owned by the result, so they are closed
/// when a malformed message is dropped. If descriptors sent with the packet
/// were lost because this process is out of descriptors, the error is
/// [`ProtocolError::OutOfDescriptors`], which holds the message (see
/// [`ProtocolError::lost_message`]); any of its descriptors that did arrive
/// are closed.
pub fn recv<M: for<'de> Deserialize<'de>>(
    channel: BorrowedFd<'_>,
) -> Result<(M, Vec<OwnedFd>), ProtocolError> {
    let mut buf = vec![0u8; MAX_MESSAGE + 1];
    let (len, fds) = recv_packet(channel, &mut buf)?;
    let message = serde_json::from_slice(&buf[..len]).map_err(|source| {
        let excerpt = String::from_utf8_lossy(&buf[..len.min(80)]).into_owned();
        ProtocolError::Malformed { excerpt, source }
    })?;
    Ok((message, fds))
}

fn recv_packet(
    channel: BorrowedFd<'_>,
    buf: &mut [u8],
) -> Result<(usize, Vec<OwnedFd>), ProtocolError> {
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match socket::recvmsg::<()>(
            channel.as_fd().as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => break msg,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::ECONNRESET) => return Err(ProtocolError::Closed),
            Err(e) => return Err(io::Error::from(e).into()),
        }
    };
    // Own every descriptor first, so each one is closed on every error path.
    let mut fds = Vec::new();
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(raw) = c {
                fds.extend(crate::sys::own_received(&raw));
            }
        }
    }
    let (bytes, flags) = (msg.bytes, msg.flags);
    if flags.contains(MsgFlags::MSG_CTRUNC) {
        // The kernel also truncates when it cannot install the descriptors
        // here: tell that apart from a sender that sent too many.
        if let Some(limit) = out_of_descriptors(channel) {
            let len = bytes.min(buf.len());
            return Err(ProtocolError::OutOfDescriptors {
                limit,
                packet: String::from_utf8_lossy(&buf[..len]).into_owned(),
            });
        }
        return Err(ProtocolError::TooManyFds);
    }
    if flags.contains(MsgFlags::MSG_TRUNC) || bytes > MAX_MESSAGE {
        return Err(ProtocolError::TooLarge);
    }
    if bytes == 0 && fds.is_empty() {
        return Err(ProtocolError::Closed);
    }
    Ok((bytes, fds))
}

/// `Some(soft RLIMIT_NOFILE)` if this process cannot open one more
/// descriptor now (tried by duplicating `probe` and closing the copy at
/// once), `None` if it can.
fn out_of_descriptors(probe: BorrowedFd<'_>) -> Option<u64> {
    match probe.try_clone_to_owned() {
        Ok(_copy) => None,
        Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => Some(
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .map_or(libc::RLIM_INFINITY, |(soft, _hard)| soft),
        ),
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair")
    }

    #[test]
    fn message_with_descriptors_round_trips() {
        let (a, b) = pair();
        let (x, _y) = pair();
        let welcome = SupervisorMessage::Welcome {
            protocol: PROTOCOL_VERSION,
            generation: 7,
            listeners: vec![ListenerInfo {
                name: "http".into(),
                kind: ListenerKind::Tcp,
            }],
        };
        send(a.as_fd(), &welcome, &[x.as_fd()]).expect("send");
        let (got, fds): (SupervisorMessage, _) = recv(b.as_fd()).expect("recv");
        assert_eq!(got, welcome);
        assert_eq!(fds.len(), 1);
        let flags = nix::fcntl::fcntl(&fds[0], nix::fcntl::FcntlArg::F_GETFD).expect("F_GETFD");
        assert_ne!(flags & libc::FD_CLOEXEC, 0, "received fd must be CLOEXEC");
    }

    #[test]
    fn garbage_is_a_malformed_error_naming_the_bytes() {
        let (a, b) = pair();
        nix::unistd::write(&a, b"\x00\xffnot json").expect("write");
        let err = recv::<WorkerMessage>(b.as_fd()).expect_err("garbage");
        assert!(matches!(err, ProtocolError::Malformed { .. }), "{err}");
        assert!(err.to_string().contains("not json"), "{err}");
    }

    #[test]
    fn oversized_packets_are_refused() {
        let (a, b) = pair();
        let big = vec![b'x'; MAX_MESSAGE + 10];
        nix::unistd::write(&a, &big).expect("write");
        let err = recv::<WorkerMessage>(b.as_fd()).expect_err("too large");
        assert!(matches!(err, ProtocolError::TooLarge), "{err}");
    }

    #[test]
    fn unknown_types_are_malformed_and_unknown_fields_ignored() {
        let (a, b) = pair();
        // Newer peers may add fields; the protocol version guards meaning.
        nix::unistd::write(&a, br#"{"type":"ready","extra":1}"#).expect("write");
        let (msg, _) = recv::<WorkerMessage>(b.as_fd()).expect("extra field");
        assert_eq!(msg, WorkerMessage::Ready);
        nix::unistd::write(&a, br#"{"type":"explode"}"#).expect("write");
        assert!(recv::<WorkerMessage>(b.as_fd()).is_err());
    }

    #[test]
    fn closed_peer_is_reported() {
        let (a, b) = pair();
        drop(a);
        assert!(matches!(
            recv::<WorkerMessage>(b.as_fd()),
            Err(ProtocolError::Closed)
        ));
    }

    #[test]
    fn errors_say_whether_the_channel_is_gone_or_only_a_packet() {
        let errno = |e| ProtocolError::Io(io::Error::from_raw_os_error(e));
        for fatal in [
            ProtocolError::Closed,
            errno(libc::EBADF),
            errno(libc::ENOTCONN),
        ] {
            assert!(fatal.is_fatal() && !fatal.is_transient(), "{fatal:?}");
        }
        let lost = ProtocolError::OutOfDescriptors {
            limit: 8,
            packet: "{}".into(),
        };
        let full = ProtocolError::OutboxFull { queued: 64 };
        for e in [
            libc::EAGAIN,
            libc::EINTR,
            libc::ENOBUFS,
            libc::ENOMEM,
            libc::ETOOMANYREFS,
        ] {
            let transient = errno(e);
            assert!(
                transient.is_transient() && !transient.is_fatal(),
                "{transient:?}"
            );
        }
        assert!(lost.is_transient() && !lost.is_fatal());
        assert!(full.is_transient() && !full.is_fatal());
        let (a, b) = pair();
        nix::unistd::write(&a, b"not json").expect("write");
        let malformed = recv::<WorkerMessage>(b.as_fd()).expect_err("garbage");
        for peer_fault in [
            ProtocolError::TooLarge,
            ProtocolError::TooManyFds,
            malformed,
        ] {
            assert!(
                !peer_fault.is_fatal() && !peer_fault.is_transient(),
                "{peer_fault:?}"
            );
            assert!(peer_fault.lost_message::<WorkerMessage>().is_none());
        }
        // The packet after a malformed one still arrives.
        send(a.as_fd(), &WorkerMessage::Ready, &[]).expect("send");
        assert_eq!(
            recv::<WorkerMessage>(b.as_fd()).expect("recv").0,
            WorkerMessage::Ready
        );
        assert_eq!(
            lost.to_string(),
            "worker channel: this process is out of descriptors (RLIMIT_NOFILE 8); descriptors \
             sent with a message were lost"
        );
    }
}
