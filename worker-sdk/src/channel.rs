//! The worker's end of the worker channel: the hello/welcome handshake, a
//! reader task that turns the supervisor's `drain` (or the channel closing)
//! into the worker's drain and answers `freeze`/`thaw` with the kept values,
//! the `take_state` request and its answer, and sending without ever
//! blocking the caller.
//!
//! Sending is synchronous so `ready()` and `status()` work anywhere, in a
//! hook or a timer too: a message goes straight onto the socket; if the
//! socket is full (the supervisor is busy), it waits in a small outbox that
//! a writer task flushes in order when the socket is writable again. The
//! outbox is bounded even if the supervisor never reads again: a newer
//! `status` or `checkpoint` replaces one still waiting (only the latest
//! matters; the older checkpoint's memfd is closed), and beyond
//! [`MAX_QUEUED`] other messages a send fails with
//! [`ProtocolError::OutboxFull`].
//!
//! Only a [fatal](ProtocolError::is_fatal) error ends the channel (and
//! drains the worker); anything else costs at most one message. A `state`
//! whose memfd was lost because this process ran out of descriptors is
//! handed to `keep` as lost, which rejects it. This module never interprets
//! the listeners it receives; `worker` checks them.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::sync::{oneshot, Notify};

use crate::drain::{DrainCause, DrainState};
use crate::error::Error;
use crate::protocol::{
    self, ListenerInfo, ProtocolError, StateSource, SupervisorMessage, WorkerMessage,
    PROTOCOL_VERSION,
};
use crate::state::{Purpose, Shared};

/// What the supervisor's welcome gave this worker.
#[derive(Debug)]
pub(crate) struct Welcome {
    pub(crate) generation: u64,
    pub(crate) listeners: Vec<(ListenerInfo, OwnedFd)>,
}

/// The most messages, besides the latest `status` and `checkpoint`, that
/// wait in the outbox; a send beyond it fails.
pub(crate) const MAX_QUEUED: usize = 64;

/// How long the tasks wait before trying the socket again after the kernel
/// was short of memory (`ENOBUFS`, `ENOMEM`): no readiness event says when
/// that ends.
const RETRY_AFTER: Duration = Duration::from_millis(10);

#[derive(Debug, Default)]
struct Outbox {
    /// Messages the socket had no room for, oldest first, each with the
    /// descriptor it carries.
    queue: VecDeque<(WorkerMessage, Vec<OwnedFd>)>,
    /// Set once the supervisor's end is gone: later sends fail.
    closed: bool,
}

/// The worker channel, shared by the worker handle (sending) and the
/// reader and writer tasks.
#[derive(Debug)]
pub(crate) struct Channel {
    fd: AsyncFd<OwnedFd>,
    outbox: Mutex<Outbox>,
    /// Notified when the outbox gains a message; the writer task waits on
    /// it. `notify_one` stores a permit, so no wake-up is lost.
    wake: Notify,
    /// Where the answer to `TakeState` goes; the reader task fills it.
    state_reply: Mutex<Option<oneshot::Sender<StateReply>>>,
}

/// The supervisor's answer to `TakeState`.
#[derive(Debug)]
pub(crate) struct StateReply {
    pub(crate) source: StateSource,
    pub(crate) generation: Option<u64>,
    pub(crate) bytes: u64,
    /// The size of the pre-copy attached second, for a snapshot that holds
    /// only the values written since it.
    pub(crate) base_bytes: Option<u64>,
    pub(crate) fds: Vec<OwnedFd>,
    /// Why the memfd sent with it never arrived (this process was out of
    /// descriptors), if it did not.
    pub(crate) lost: Option<String>,
}

impl StateReply {
    /// No values (no pre-copy asked for).
    pub(crate) fn none() -> StateReply {
        StateReply {
            source: StateSource::None,
            generation: None,
            bytes: 0,
            base_bytes: None,
            fds: Vec::new(),
            lost: None,
        }
    }
}

impl Channel {
    /// Registers `fd` (already non-blocking) with the current runtime.
    pub(crate) fn new(fd: OwnedFd) -> std::io::Result<Channel> {
        Ok(Channel {
            fd: crate::sys::async_fd(fd)?,
            outbox: Mutex::default(),
            wake: Notify::new(),
            state_reply: Mutex::new(None),
        })
    }

    /// Says hello and waits for the welcome.
    pub(crate) async fn handshake(&self) -> Result<Welcome, Error> {
        let hello = WorkerMessage::Hello {
            protocol: PROTOCOL_VERSION,
            pid: std::process::id(),
            pre_copy: true,
        };
        self.send_async(&hello).await.map_err(Error::Handshake)?;
        let (message, fds) = self.recv().await.map_err(Error::Handshake)?;
        match message {
            SupervisorMessage::Welcome {
                protocol,
                generation,
                listeners,
            } => {
                if protocol != PROTOCOL_VERSION {
                    return Err(Error::Version { theirs: protocol });
                }
                if listeners.len() != fds.len() {
                    return Err(Error::FdCount {
                        names: listeners.len(),
                        fds: fds.len(),
                    });
                }
                Ok(Welcome {
                    generation,
                    listeners: listeners.into_iter().zip(fds).collect(),
                })
            }
            other => Err(Error::Unexpected {
                got: format!("{other:?}"),
            }),
        }
    }

    /// Sends `message` now, or queues it for the writer task if the socket
    /// is full. Fails only if the channel is closed or broken.
    pub(crate) fn send(&self, message: WorkerMessage) -> Result<(), ProtocolError> {
        self.send_with(message, None)
    }

    /// [`send`](Self::send), with a descriptor attached (a snapshot memfd).
    pub(crate) fn send_with(
        &self,
        message: WorkerMessage,
        fd: Option<OwnedFd>,
    ) -> Result<(), ProtocolError> {
        self.send_fds(message, fd.into_iter().collect())
    }

    /// [`send`](Self::send), with descriptors attached, in order.
    pub(crate) fn send_fds(
        &self,
        message: WorkerMessage,
        fd: Vec<OwnedFd>,
    ) -> Result<(), ProtocolError> {
        let mut out = self.outbox.lock().unwrap_or_else(PoisonError::into_inner);
        if out.closed {
            return Err(ProtocolError::Closed);
        }
        if out.queue.is_empty() {
            let fds: Vec<_> = fd.iter().map(|fd| fd.as_fd()).collect();
            match protocol::send(self.fd.get_ref().as_fd(), &message, &fds) {
                Ok(()) => return Ok(()),
                // Full, or short of memory: the writer task retries.
                Err(e) if e.is_transient() => {}
                Err(e) => {
                    if e.is_fatal() {
                        out.closed = true;
                    }
                    return Err(e);
                }
            }
        }
        match message {
            // Only the newest status and the newest checkpoint matter: the
            // older one leaves the queue (closing its memfd), the newer one
            // goes to the back, as if the older had never been sent.
            WorkerMessage::Status { .. } => out
                .queue
                .retain(|(m, _)| !matches!(m, WorkerMessage::Status { .. })),
            WorkerMessage::Checkpoint { .. } => out
                .queue
                .retain(|(m, _)| !matches!(m, WorkerMessage::Checkpoint { .. })),
            _ => {
                let queued = out
                    .queue
                    .iter()
                    .filter(|(m, _)| {
                        !matches!(
                            m,
                            WorkerMessage::Status { .. } | WorkerMessage::Checkpoint { .. }
                        )
                    })
                    .count();
                if queued >= MAX_QUEUED {
                    let e = ProtocolError::OutboxFull { queued };
                    tracing::warn!("{e}: {message:?}");
                    return Err(e);
                }
            }
        }
        out.queue.push_back((message, fd));
        self.wake.notify_one();
        Ok(())
    }

    /// The writer task: flushes the outbox whenever it has messages.
    pub(crate) async fn write_task(self: Arc<Self>) {
        loop {
            self.wake.notified().await;
            loop {
                let mut guard = match self.fd.writable().await {
                    Ok(guard) => guard,
                    Err(e) => {
                        tracing::warn!("worker channel: waiting to send: {e}");
                        self.close_outbox();
                        return;
                    }
                };
                let sent = {
                    let mut out = self.outbox.lock().unwrap_or_else(PoisonError::into_inner);
                    let Some((front, fd)) = out.queue.front() else {
                        break;
                    };
                    let fds: Vec<_> = fd.iter().map(|fd| fd.as_fd()).collect();
                    match protocol::send(self.fd.get_ref().as_fd(), front, &fds) {
                        Ok(()) => {
                            out.queue.pop_front();
                            Ok(())
                        }
                        // This one message cannot be sent (too large, say);
                        // the ones after it still can.
                        Err(e) if !e.is_fatal() && !e.is_transient() => {
                            let dropped = out.queue.pop_front().map(|(m, _)| m);
                            tracing::warn!(
                                "worker channel: sending a queued message: {e}; dropped \
                                 {dropped:?}"
                            );
                            Ok(())
                        }
                        Err(e) => Err(e),
                    }
                };
                match sent {
                    Ok(()) => {}
                    Err(e) if e.is_would_block() => guard.clear_ready(),
                    Err(e) if e.is_transient() => tokio::time::sleep(RETRY_AFTER).await,
                    Err(e) => {
                        tracing::warn!("worker channel: sending a queued message: {e}");
                        self.close_outbox();
                        return;
                    }
                }
            }
        }
    }

    fn close_outbox(&self) {
        let mut out = self.outbox.lock().unwrap_or_else(PoisonError::into_inner);
        out.closed = true;
        out.queue.clear();
    }

    /// The reader task: waits for `drain` and begins the worker's drain
    /// with it; the channel closing (the supervisor is gone, or a
    /// [fatal](ProtocolError::is_fatal) error) drains too. Messages it does
    /// not know (a newer supervisor's) and bad packets are logged and
    /// skipped; a message whose descriptors were lost (this process is out
    /// of descriptors) is handled without them.
    pub(crate) async fn read_task(self: Arc<Self>, drain: Arc<DrainState>, state: Arc<Shared>) {
        loop {
            let (message, mut fds, lost) = match self.recv().await {
                Ok((message, fds)) => (message, fds, None),
                Err(e) if e.is_fatal() => {
                    if !matches!(e, ProtocolError::Closed) {
                        tracing::warn!("{e}");
                    }
                    self.close_outbox();
                    drain.fire(DrainCause::ChannelClosed, None);
                    return;
                }
                Err(e) => match e.lost_message::<SupervisorMessage>() {
                    Some(message) => {
                        tracing::warn!("{e}");
                        (message, Vec::new(), Some(e.to_string()))
                    }
                    None if e.is_transient() => {
                        tracing::warn!("{e}; trying again");
                        tokio::time::sleep(RETRY_AFTER).await;
                        continue;
                    }
                    None => {
                        tracing::warn!("{e}; ignored");
                        continue;
                    }
                },
            };
            match message {
                SupervisorMessage::Drain { timeout_ms } => {
                    let timeout = Duration::from_millis(timeout_ms);
                    drain.fire(DrainCause::Supervisor { timeout }, Some(timeout));
                }
                SupervisorMessage::Freeze { grace_ms, delta } => {
                    let grace = grace_ms.unwrap_or(protocol::DEFAULT_FREEZE_GRACE_MS);
                    self.freeze(&state, Duration::from_millis(grace), delta)
                        .await;
                }
                SupervisorMessage::PreCopy { for_generation } => {
                    self.pre_copy(&state, for_generation).await;
                }
                SupervisorMessage::Thaw => {
                    state.thaw();
                    tracing::info!("thawed: the next generation failed; serving on");
                }
                SupervisorMessage::State {
                    source,
                    generation,
                    bytes,
                    base_bytes,
                } => {
                    let reply = StateReply {
                        source,
                        generation,
                        bytes,
                        base_bytes,
                        fds: std::mem::take(&mut fds),
                        lost,
                    };
                    let waiting = self
                        .state_reply
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .take();
                    match waiting {
                        Some(tx) => {
                            let _ = tx.send(reply);
                        }
                        None => tracing::warn!("worker channel: kept values nobody asked for"),
                    }
                }
                other => {
                    tracing::warn!(
                        "worker channel: unexpected {other:?} from the supervisor; ignored"
                    );
                }
            }
        }
    }

    /// Asks for the previous generation's kept values (`TakeState`) or a
    /// pre-copy of them (`Prepare`) and waits for the answer.
    pub(crate) async fn ask_state(&self, ask: WorkerMessage) -> Result<StateReply, ProtocolError> {
        let (tx, rx) = oneshot::channel();
        *self
            .state_reply
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(tx);
        self.send(ask)?;
        rx.await.map_err(|_| ProtocolError::Closed)
    }

    /// Writes every kept value for generation `to` while this one serves
    /// on, and sends them (off the async threads: they may be large).
    async fn pre_copy(&self, state: &Arc<Shared>, to: u64) {
        let writer = state.clone();
        let written = tokio::task::spawn_blocking(move || writer.snapshot(Purpose::PreCopy)).await;
        let sent = match written {
            Ok(Ok(Some(w))) => {
                tracing::info!(
                    "pre-copied {} bytes of kept values for generation {to}",
                    w.bytes
                );
                self.send_with(
                    WorkerMessage::PreCopied {
                        bytes: w.bytes,
                        for_generation: to,
                    },
                    Some(w.fd),
                )
            }
            Ok(Ok(None)) => self.send(WorkerMessage::PreCopied {
                bytes: 0,
                for_generation: to,
            }),
            Ok(Err(e)) => {
                // The freeze will write everything, or fail the reload.
                tracing::warn!("pre-copying the kept values: {e}; the freeze sends them all");
                self.send(WorkerMessage::PreCopied {
                    bytes: 0,
                    for_generation: to,
                })
            }
            Err(e) => {
                tracing::warn!("the pre-copy task failed: {e}; the freeze sends them all");
                self.send(WorkerMessage::PreCopied {
                    bytes: 0,
                    for_generation: to,
                })
            }
        };
        if let Err(e) = sent {
            tracing::warn!("worker channel: sending a pre-copy: {e}");
        }
    }

    /// Freezes the worker and sends its snapshot (serialized off the async
    /// threads: it may be large).
    ///
    /// The order is what makes the hand-over exact: the accept loops stop
    /// and their connections stop reading new requests; the work in flight
    /// (every [`InFlight`](crate::state::InFlight) guard: accept loops still
    /// accepting, open connections) finishes, for up to `grace`; only then
    /// are the values written, and a write after that is refused. So every
    /// write acknowledged before the snapshot is in it.
    async fn freeze(&self, state: &Arc<Shared>, grace: Duration, delta: bool) {
        state.freeze();
        if tokio::time::timeout(grace, state.quiet()).await.is_err() {
            tracing::warn!(
                "frozen: {} piece(s) of work still in flight after the freeze grace of \
                 {grace:?}; the snapshot is written now and their writes will be refused",
                state.busy()
            );
        }
        let writer = state.clone();
        let purpose = if delta {
            Purpose::Freeze
        } else {
            Purpose::FreezeWhole
        };
        let snapshot = tokio::task::spawn_blocking(move || writer.snapshot(purpose)).await;
        let sent = match snapshot {
            Ok(Ok(Some(w))) => {
                let mut fds = vec![w.fd];
                let base_bytes = w.base.map(|(fd, bytes)| {
                    fds.push(fd);
                    bytes
                });
                match base_bytes {
                    Some(base) => tracing::info!(
                        "frozen: {} bytes of kept values written since the pre-copy ({base} \
                         bytes) handed over",
                        w.bytes
                    ),
                    None => tracing::info!("frozen: {} bytes of kept values handed over", w.bytes),
                }
                self.send_fds(
                    WorkerMessage::Frozen {
                        bytes: w.bytes,
                        base_bytes,
                    },
                    fds,
                )
            }
            Ok(Ok(None)) => self.send(WorkerMessage::Frozen {
                bytes: 0,
                base_bytes: None,
            }),
            Ok(Err(e)) => {
                state.thaw();
                tracing::error!("saving the kept values for the next generation: {e}");
                self.send(WorkerMessage::FreezeFailed {
                    reason: e.to_string(),
                })
            }
            Err(e) => {
                state.thaw();
                self.send(WorkerMessage::FreezeFailed {
                    reason: format!("the snapshot task failed: {e}"),
                })
            }
        };
        if let Err(e) = sent {
            tracing::warn!("worker channel: answering the freeze: {e}");
        }
    }

    async fn recv(&self) -> Result<(SupervisorMessage, Vec<OwnedFd>), ProtocolError> {
        loop {
            let mut guard = self.fd.readable().await?;
            match protocol::recv(self.fd.get_ref().as_fd()) {
                Err(e) if e.is_would_block() => guard.clear_ready(),
                other => return other,
            }
        }
    }

    async fn send_async(&self, message: &WorkerMessage) -> Result<(), ProtocolError> {
        loop {
            let mut guard = self.fd.writable().await?;
            match protocol::send(self.fd.get_ref().as_fd(), message, &[]) {
                Err(e) if e.is_would_block() => guard.clear_ready(),
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

    fn memfd() -> OwnedFd {
        nix::sys::memfd::memfd_create(c"checkpoint", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .expect("memfd_create")
    }

    fn queued(channel: &Channel) -> Vec<WorkerMessage> {
        let out = channel
            .outbox
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        out.queue.iter().map(|(m, _)| m.clone()).collect()
    }

    #[tokio::test]
    async fn the_outbox_of_a_channel_nobody_reads_stays_bounded() {
        let (supervisor, worker) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )
        .expect("socketpair");
        let channel = Arc::new(Channel::new(worker).expect("channel"));
        // Fill the socket: the supervisor does not read.
        let mut filler = 0;
        loop {
            match protocol::send(channel.fd.get_ref().as_fd(), &WorkerMessage::Ready, &[]) {
                Ok(()) => filler += 1,
                Err(e) if e.is_would_block() => break,
                Err(e) => panic!("filling the socket: {e}"),
            }
        }

        // A worker that checkpoints and reports status often, for long.
        channel.send(WorkerMessage::TakeState).expect("queued");
        for i in 1..=1000 {
            channel
                .send_with(WorkerMessage::Checkpoint { bytes: i }, Some(memfd()))
                .expect("a checkpoint replaces the one waiting");
            channel
                .send(WorkerMessage::Status {
                    text: format!("tick {i}"),
                })
                .expect("a status replaces the one waiting");
        }
        let latest = vec![
            WorkerMessage::TakeState,
            WorkerMessage::Checkpoint { bytes: 1000 },
            WorkerMessage::Status {
                text: "tick 1000".into(),
            },
        ];
        let now = queued(&channel);
        assert_eq!(now.len(), latest.len(), "queued: {} messages", now.len());
        assert_eq!(now, latest);
        let fds = channel
            .outbox
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .queue
            .iter()
            .filter(|(_, fds)| !fds.is_empty())
            .count();
        assert_eq!(fds, 1, "only the latest checkpoint's memfd is held");

        // Any other message: up to the cap, then a clear error.
        for _ in 1..MAX_QUEUED {
            channel
                .send(WorkerMessage::Rejected { reason: "x".into() })
                .expect("below the cap");
        }
        let err = channel
            .send(WorkerMessage::Rejected { reason: "x".into() })
            .expect_err("over the cap");
        assert_eq!(
            err.to_string(),
            format!(
                "worker channel: {MAX_QUEUED} messages already wait for the supervisor, which \
                 is not reading; this one was dropped"
            )
        );
        assert!(err.is_transient() && !err.is_fatal(), "{err:?}");
        // The latest checkpoint still replaces the older one at the cap.
        channel
            .send_with(WorkerMessage::Checkpoint { bytes: 1001 }, Some(memfd()))
            .expect("a checkpoint at the cap");
        assert_eq!(queued(&channel).len(), MAX_QUEUED + 2);

        // The supervisor reads again: everything arrives, in order, the
        // latest checkpoint with its memfd.
        tokio::spawn(channel.clone().write_task());
        let mut got = Vec::new();
        let expected = filler + MAX_QUEUED + 2;
        let reader = std::thread::spawn(move || {
            nix::fcntl::fcntl(
                &supervisor,
                nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
            )
            .expect("blocking");
            while got.len() < expected {
                let (m, fds): (WorkerMessage, _) =
                    protocol::recv(supervisor.as_fd()).expect("recv");
                got.push((m, fds.len()));
            }
            got
        });
        let got = tokio::task::spawn_blocking(move || reader.join().expect("reader"))
            .await
            .expect("join");
        let rest: Vec<_> = got[filler..].to_vec();
        assert_eq!(rest[0], (WorkerMessage::TakeState, 0));
        assert_eq!(
            rest[1],
            (
                WorkerMessage::Status {
                    text: "tick 1000".into()
                },
                0
            )
        );
        assert_eq!(
            rest[rest.len() - 1],
            (WorkerMessage::Checkpoint { bytes: 1001 }, 1)
        );
        assert_eq!(
            rest.iter()
                .filter(|(m, _)| matches!(m, WorkerMessage::Checkpoint { .. }))
                .count(),
            1
        );
    }
}
