//! The worker's end of the worker channel: the hello/welcome handshake, a
//! reader task that turns the supervisor's `drain` (or the channel closing)
//! into the worker's drain and answers `freeze`/`thaw` with the kept values,
//! the `take_state` request and its answer, and sending without ever
//! blocking the caller.
//!
//! Sending is synchronous so `ready()` and `status()` work anywhere, in a
//! hook or a timer too: a message goes straight onto the socket; if the
//! socket is full (the supervisor is busy), it waits in a small outbox that
//! a writer task flushes in order when the socket is writable again. A
//! newer `status` replaces one still waiting. This module never interprets
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
use crate::state::Shared;

/// What the supervisor's welcome gave this worker.
#[derive(Debug)]
pub(crate) struct Welcome {
    pub(crate) generation: u64,
    pub(crate) listeners: Vec<(ListenerInfo, OwnedFd)>,
}

#[derive(Debug, Default)]
struct Outbox {
    /// Messages the socket had no room for, oldest first, each with the
    /// descriptor it carries.
    queue: VecDeque<(WorkerMessage, Option<OwnedFd>)>,
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
    pub(crate) fd: Option<OwnedFd>,
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
        let mut out = self.outbox.lock().unwrap_or_else(PoisonError::into_inner);
        if out.closed {
            return Err(ProtocolError::Closed);
        }
        if out.queue.is_empty() {
            let fds: Vec<_> = fd.iter().map(|fd| fd.as_fd()).collect();
            match protocol::send(self.fd.get_ref().as_fd(), &message, &fds) {
                Ok(()) => return Ok(()),
                Err(e) if e.is_would_block() => {}
                Err(e) => {
                    if matches!(e, ProtocolError::Closed) {
                        out.closed = true;
                    }
                    return Err(e);
                }
            }
        }
        // Only the newest status matters.
        let replaces_status = matches!(message, WorkerMessage::Status { .. })
            && matches!(out.queue.back(), Some((WorkerMessage::Status { .. }, _)));
        if replaces_status {
            out.queue.pop_back();
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
                let mut out = self.outbox.lock().unwrap_or_else(PoisonError::into_inner);
                let Some((front, fd)) = out.queue.front() else {
                    break;
                };
                let fds: Vec<_> = fd.iter().map(|fd| fd.as_fd()).collect();
                match protocol::send(self.fd.get_ref().as_fd(), front, &fds) {
                    Ok(()) => {
                        out.queue.pop_front();
                    }
                    Err(e) if e.is_would_block() => {
                        drop(out);
                        guard.clear_ready();
                    }
                    Err(e) => {
                        drop(out);
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
    /// with it; the channel closing (the supervisor is gone) drains too.
    /// Messages it does not know (a newer supervisor's) are logged and
    /// skipped.
    pub(crate) async fn read_task(self: Arc<Self>, drain: Arc<DrainState>, state: Arc<Shared>) {
        loop {
            match self.recv().await {
                Ok((SupervisorMessage::Drain { timeout_ms }, _fds)) => {
                    let timeout = Duration::from_millis(timeout_ms);
                    drain.fire(DrainCause::Supervisor { timeout }, Some(timeout));
                }
                Ok((SupervisorMessage::Freeze, _fds)) => self.freeze(&state).await,
                Ok((SupervisorMessage::Thaw, _fds)) => {
                    state.thaw();
                    tracing::info!("thawed: the next generation failed; serving on");
                }
                Ok((
                    SupervisorMessage::State {
                        source,
                        generation,
                        bytes,
                    },
                    mut fds,
                )) => {
                    let reply = StateReply {
                        source,
                        generation,
                        bytes,
                        fd: fds.pop(),
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
                Ok((other, _fds)) => {
                    tracing::warn!(
                        "worker channel: unexpected {other:?} from the supervisor; ignored"
                    );
                }
                Err(ProtocolError::Closed | ProtocolError::Io(_)) => {
                    self.close_outbox();
                    drain.fire(DrainCause::ChannelClosed, None);
                    return;
                }
                Err(e) => tracing::warn!("{e}; ignored"),
            }
        }
    }

    /// Asks for the previous generation's kept values and waits for them.
    pub(crate) async fn take_state(&self) -> Result<StateReply, ProtocolError> {
        let (tx, rx) = oneshot::channel();
        *self
            .state_reply
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(tx);
        self.send(WorkerMessage::TakeState)?;
        rx.await.map_err(|_| ProtocolError::Closed)
    }

    /// Freezes the worker and sends its snapshot (serialized off the async
    /// threads: it may be large).
    async fn freeze(&self, state: &Arc<Shared>) {
        state.freeze();
        let writer = state.clone();
        let snapshot = tokio::task::spawn_blocking(move || writer.snapshot(true)).await;
        let sent = match snapshot {
            Ok(Ok(Some((fd, bytes)))) => {
                tracing::info!("frozen: {bytes} bytes of kept values handed over");
                self.send_with(WorkerMessage::Frozen { bytes }, Some(fd))
            }
            Ok(Ok(None)) => self.send(WorkerMessage::Frozen { bytes: 0 }),
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
