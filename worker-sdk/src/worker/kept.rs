//! The kept-values side of [`Worker`]: `keep` (a pre-copy read while the
//! previous generation serves, then the final values of its freeze),
//! checkpoints, refused writes, and the work a freeze waits for.
//!
//! This module never serializes a value itself (`state.rs` does) and never
//! reads the channel (`channel.rs` does).

use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::Worker;
use crate::channel::Channel;
use crate::error::Error;
use crate::protocol::{StateSource, WorkerMessage};
use crate::state::{self, Kept};

impl Worker {
    /// The value the previous generation kept under `name`, or `init()` on
    /// a first start (or when it kept nothing under that name).
    ///
    /// The first call asks the supervisor for a **pre-copy** of the previous
    /// generation's values (written while it serves on) and parses it, then
    /// for the final values: the supervisor **freezes** that generation for
    /// the hand-over: it stops accepting (clients wait in the kernel's
    /// queue), reads no new request, finishes the requests in flight, and
    /// writes only the values changed since the pre-copy. So call `keep`
    /// after slow initialisation, just before [`ready`](Self::ready). If this
    /// generation then fails before it is ready, the old one thaws and
    /// serves on with every value it had.
    ///
    /// A value of the previous generation that does not decode as `T`, or a
    /// snapshot this program cannot read (see
    /// [`Builder::state_format`](crate::Builder::state_format)), is **rejected**: the supervisor fails the
    /// reload before cut-over and this returns the reason. Without baton,
    /// every value starts from `init()`.
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), baton_worker::Error> {
    /// let worker = baton_worker::start().await?;
    /// let visits = worker.keep("visits", || 0u64).await?;
    /// worker.ready()?;
    /// visits.update(|n| *n += 1)?;
    /// # Ok(()) }
    /// ```
    pub async fn keep<T>(&self, name: &str, init: impl FnOnce() -> T) -> Result<Kept<T>, Error>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        let shared = &self.inner.state;
        let previous = shared
            .previous
            .get_or_try_init(|| self.load_previous())
            .await?;
        let value = match state::claim::<T>(previous, name) {
            Ok(Some(value)) => value,
            Ok(None) => init(),
            Err(reason) => return Err(self.reject(reason)),
        };
        shared
            .register(name, value)
            .map_err(|()| Error::DuplicateKeep {
                name: name.to_owned(),
            })
    }

    /// Asks the supervisor for the previous generation's values: first a
    /// pre-copy, read while the previous generation serves on, then the
    /// final values (the freeze), which hold only what changed since.
    async fn load_previous(
        &self,
    ) -> Result<std::sync::Mutex<serde_json::Map<String, serde_json::Value>>, Error> {
        let Some(channel) = &self.inner.channel else {
            return Ok(Default::default());
        };
        let pre_copy = if self.inner.state.pre_copy.load(Ordering::SeqCst) {
            self.ask(channel, WorkerMessage::Prepare).await?
        } else {
            crate::channel::StateReply::none()
        };
        let pre_copy = match (pre_copy.fds.into_iter().next(), pre_copy.bytes) {
            (Some(fd), bytes) => {
                let identity = state::identity(&fd);
                // A pre-copy that does not read is no reason to reject
                // anything yet: the final values decide.
                match parse_blocking(fd, bytes).await {
                    Ok(doc) => Some((identity, doc)),
                    Err(e) => {
                        tracing::warn!(
                            "reading the pre-copy: {e}; taking every value at the freeze"
                        );
                        None
                    }
                }
            }
            (None, _) => None,
        };
        let reply = self.ask(channel, WorkerMessage::TakeState).await?;
        if let Some(reason) = reply.lost {
            return Err(self.reject(format!("receiving the kept values: {reason}")));
        }
        let mut fds = reply.fds.into_iter();
        let values = match fds.next() {
            None if reply.bytes == 0 => Default::default(),
            None => {
                return Err(self.reject(format!(
                    "the supervisor announced {} bytes of kept values but sent no memfd",
                    reply.bytes
                )))
            }
            Some(fd) => {
                let top = match parse_blocking(fd, reply.bytes).await {
                    Ok(doc) => doc,
                    Err(reason) => return Err(self.reject(reason)),
                };
                let base = match (reply.base_bytes, fds.next()) {
                    (None, _) => None,
                    (Some(bytes), None) => {
                        return Err(self.reject(format!(
                            "the supervisor announced a pre-copy of {bytes} bytes but sent no \
                             memfd for it"
                        )))
                    }
                    (Some(bytes), Some(fd)) => {
                        let id = state::identity(&fd);
                        match pre_copy {
                            // The very pre-copy read before the freeze.
                            Some((pre_id, doc)) if pre_id.is_some() && pre_id == id => Some(doc),
                            _ => match parse_blocking(fd, bytes).await {
                                Ok(doc) => Some(doc),
                                Err(reason) => return Err(self.reject(reason)),
                            },
                        }
                    }
                };
                if base.is_some() {
                    self.inner.state.rebase.store(true, Ordering::SeqCst);
                }
                match self.inner.state.finish(base, top) {
                    Ok(values) => values,
                    Err(reason) => return Err(self.reject(reason)),
                }
            }
        };
        tracing::info!(
            "kept values: {} from {}",
            values.len(),
            match (reply.source, reply.generation) {
                (StateSource::Snapshot, Some(g)) => format!("generation {g}, frozen for us"),
                (StateSource::Checkpoint, Some(g)) => format!("generation {g}'s last checkpoint"),
                _ => "nowhere: a first start".to_owned(),
            }
        );
        Ok(std::sync::Mutex::new(values))
    }

    /// Sends `ask` (`Prepare` or `TakeState`) and waits for the answer; a
    /// generation failed while it waits (its predecessor's snapshot was
    /// refused, say) is told to drain: stop waiting then.
    async fn ask(
        &self,
        channel: &Channel,
        ask: WorkerMessage,
    ) -> Result<crate::channel::StateReply, Error> {
        tokio::select! {
            reply = channel.ask_state(ask) => reply.map_err(|source| Error::Send {
                what: "a request for the kept values",
                source,
            }),
            () = self.drained() => Err(Error::DrainedBeforeState),
        }
    }

    /// Tells the supervisor the kept values cannot be used; the error for
    /// the caller.
    fn reject(&self, reason: String) -> Error {
        if let Some(channel) = &self.inner.channel {
            let _ = channel.send(WorkerMessage::Rejected {
                reason: reason.clone(),
            });
        }
        Error::StateRejected { reason }
    }

    /// Hands the current kept values to the supervisor, which keeps the
    /// latest: if this worker crashes, the next one starts from them rather
    /// than from nothing. Writes every value (blocking; from an async task
    /// with large values, use `spawn_blocking`). Does nothing without baton,
    /// without kept values, or while frozen (the values already moved on).
    ///
    /// ```no_run
    /// # async fn doc(worker: baton_worker::Worker) -> Result<(), baton_worker::Error> {
    /// let checkpointer = worker.clone();
    /// worker.interval(std::time::Duration::from_secs(1), move || {
    ///     let _ = checkpointer.checkpoint();
    ///     std::ops::ControlFlow::Continue(())
    /// });
    /// # Ok(()) }
    /// ```
    pub fn checkpoint(&self) -> Result<(), Error> {
        let Some(channel) = &self.inner.channel else {
            return Ok(());
        };
        if self.inner.state.is_frozen() {
            return Ok(());
        }
        match self.inner.state.snapshot(state::Purpose::Checkpoint) {
            Ok(Some(written)) => channel
                .send_with(
                    WorkerMessage::Checkpoint {
                        bytes: written.bytes,
                    },
                    Some(written.fd),
                )
                .map_err(|source| Error::Send {
                    what: "a checkpoint",
                    source,
                }),
            Ok(None) => Ok(()),
            Err(source) => Err(Error::Snapshot { source }),
        }
    }

    /// How many writes to kept values were refused because they came after
    /// this generation's values were handed to the next one (see
    /// [`Kept::update`]). Each was answered as an error, never acknowledged.
    pub fn writes_refused(&self) -> u64 {
        self.inner.state.refused_writes()
    }

    /// Marks work in flight that may write kept values, for a program that
    /// serves without the SDK's serving functions (which hold one per
    /// connection): a freeze waits until every guard is dropped, up to the
    /// freeze grace (`baton run --freeze-grace`), before it hands the values
    /// over. Take it before reading a request, drop it once answered.
    ///
    /// ```no_run
    /// # async fn doc(worker: baton_worker::Worker) -> Result<(), baton_worker::Error> {
    /// let hits = worker.keep("hits", || 0u64).await?;
    /// let guard = worker.in_flight();
    /// if !worker.is_frozen() {
    ///     let _ = hits.update(|n| *n += 1);
    /// }
    /// drop(guard);
    /// # Ok(()) }
    /// ```
    pub fn in_flight(&self) -> crate::InFlight {
        self.inner.state.in_flight()
    }

    pub(crate) fn shared_state(&self) -> &Arc<state::Shared> {
        &self.inner.state
    }

    /// Whether this generation is frozen: its kept values were handed to the
    /// next generation, which is starting.
    pub fn is_frozen(&self) -> bool {
        self.inner.state.is_frozen()
    }

    /// A watch of the frozen flag, for accept loops that must pause while
    /// frozen (`http::serve_worker` uses it).
    pub fn frozen_watch(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.state.gate()
    }
}

/// Parses a snapshot memfd off the async threads (it may be large).
async fn parse_blocking(fd: OwnedFd, bytes: u64) -> Result<state::Doc, String> {
    tokio::task::spawn_blocking(move || state::parse(fd, bytes))
        .await
        .map_err(|e| format!("the loading task failed: {e}"))
        .and_then(|r| r)
}
