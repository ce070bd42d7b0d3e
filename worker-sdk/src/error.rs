//! [`Error`]: everything that can go wrong while a worker starts, takes its
//! listeners or talks to the supervisor. Each message names what was being
//! done and to what, and already includes its cause, so printing it once
//! (`{e}`) says everything.
//!
//! This module only describes errors; it never logs or recovers.

use std::io;

use crate::protocol::{ListenerKind, ProtocolError, CHANNEL_FD_ENV, PROTOCOL_VERSION};

/// Why starting a worker, taking a listener or sending to the supervisor
/// failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// [`start`](crate::start) was called outside a tokio runtime.
    #[error("baton_worker::start must be called inside a tokio runtime (with IO, time and signals enabled, as #[tokio::main] does)")]
    NoRuntime,

    /// The worker channel was already taken by an earlier start in this
    /// process. Clone the [`Worker`](crate::Worker) instead.
    #[error("the worker channel was already taken by an earlier baton_worker start in this process; clone the Worker handle instead")]
    AlreadyStarted,

    /// `BATON_CHANNEL_FD` is not a descriptor number.
    #[error("reading {CHANNEL_FD_ENV}: {value:?} is not a descriptor number of 3 or more")]
    BadChannelFd {
        /// The variable's value.
        value: String,
    },

    /// `BATON_CHANNEL_FD` was inherited from another process: `LISTEN_PID`
    /// names a different pid.
    #[error(
        "{CHANNEL_FD_ENV} is set, but LISTEN_PID is {listen_pid}, not this process ({pid}): \
         the variables were inherited from the worker baton started (a wrapper script \
         should `exec` the worker rather than run it as a child)"
    )]
    NotForThisProcess {
        /// The value of `LISTEN_PID`.
        listen_pid: String,
        /// This process's pid.
        pid: u32,
    },

    /// The descriptor named by `BATON_CHANNEL_FD` is not usable as the
    /// worker channel.
    #[error("taking the worker channel (fd {fd}, from {CHANNEL_FD_ENV}): {reason}")]
    Channel {
        /// The descriptor number.
        fd: i32,
        /// What is wrong with it.
        reason: String,
    },

    /// Saying hello to the supervisor, or hearing its welcome, failed.
    #[error("greeting the supervisor: {0}")]
    Handshake(#[source] ProtocolError),

    /// The supervisor answered hello with something other than a welcome.
    #[error("greeting the supervisor: expected a welcome, got {got}")]
    Unexpected {
        /// What arrived instead, as debug text.
        got: String,
    },

    /// The supervisor speaks another protocol version.
    #[error(
        "the supervisor speaks worker protocol version {theirs}; this baton-worker speaks \
         {PROTOCOL_VERSION} (update baton or baton-worker)"
    )]
    Version {
        /// The supervisor's version.
        theirs: u32,
    },

    /// The welcome's listener list and its descriptors disagree.
    #[error("the supervisor's welcome names {names} listeners but carries {fds} descriptors")]
    FdCount {
        /// How many listeners the welcome names.
        names: usize,
        /// How many descriptors came with it.
        fds: usize,
    },

    /// A descriptor the supervisor sent is not the kind of socket it was
    /// declared as.
    #[error("listener `{name}`: the supervisor declared {expected} but sent {found}")]
    ListenerMismatch {
        /// The listener's name.
        name: String,
        /// What it was declared as, in words.
        expected: &'static str,
        /// What the descriptor really is, in words.
        found: String,
    },

    /// An entry of `BATON_LISTEN` or a default listener could not be parsed.
    #[error("parsing {origin} {spec:?}: {reason}")]
    ListenSpec {
        /// Where the entry came from: `BATON_LISTEN` or `default_listener`.
        origin: &'static str,
        /// The entry as written.
        spec: String,
        /// What is wrong with it, and what is expected.
        reason: String,
    },

    /// A standalone worker could not bind one of its listeners.
    #[error("binding listener `{name}` on {addr}: {source}")]
    Bind {
        /// The listener's name.
        name: String,
        /// The address, as written.
        addr: String,
        /// What the system said.
        #[source]
        source: io::Error,
    },

    /// No listener has this name.
    #[error("no listener named `{name}` (this worker has {available})")]
    NoSuchListener {
        /// The name asked for.
        name: String,
        /// The names there are, in words.
        available: String,
    },

    /// The listener is of another kind than the one asked for.
    #[error("listener `{name}` is a {kind} listener, not {wanted}")]
    WrongKind {
        /// The listener's name.
        name: String,
        /// What it is.
        kind: KindName,
        /// What was asked for.
        wanted: KindName,
    },

    /// The listener was already taken from this worker.
    #[error("listener `{name}` was already taken (each listener can be taken once)")]
    AlreadyTaken {
        /// The listener's name.
        name: String,
    },

    /// Preparing a listener for use failed.
    #[error("listener `{name}`: {what}: {source}")]
    Listener {
        /// The listener's name.
        name: String,
        /// What was being done.
        what: &'static str,
        /// What the system said.
        #[source]
        source: io::Error,
    },

    /// Setting up a signal handler failed.
    #[error("handling {signal}: {source}")]
    Signal {
        /// The signal's name.
        signal: &'static str,
        /// What the system said.
        #[source]
        source: io::Error,
    },

    /// A message to the supervisor could not be sent.
    #[error("sending {what} to the supervisor: {source}")]
    Send {
        /// The message: `ready` or `status`.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: ProtocolError,
    },

    /// The previous generation's kept values cannot be used; the supervisor
    /// was told, and fails the reload (the old generation serves on).
    #[error("rejecting the previous generation's kept values: {reason}")]
    StateRejected {
        /// Why.
        reason: String,
    },

    /// A write to a kept value was refused: this generation's values were
    /// already handed to the next one (see [`Kept::update`](crate::Kept::update)).
    #[error(transparent)]
    Frozen(#[from] crate::Frozen),

    /// The supervisor told this generation to drain while it waited for
    /// the previous generation's kept values (the hand-over failed).
    #[error(
        "this generation was stopped before the kept values arrived (see baton's log for why)"
    )]
    DrainedBeforeState,

    /// `keep` was called twice with one name.
    #[error("kept value `{name}` is kept already; keep each name once and clone the handle")]
    DuplicateKeep {
        /// The name.
        name: String,
    },

    /// Writing the kept values into a snapshot failed.
    #[error("writing the kept values into a snapshot: {source}")]
    Snapshot {
        /// Why.
        source: std::io::Error,
    },

    /// A socket passed by socket activation (`LISTEN_FDS`, without baton)
    /// cannot be used.
    #[error("socket activation: {reason}")]
    Activation {
        /// What is wrong with it.
        reason: String,
    },

    /// Loading a TLS certificate or key, or building a TLS configuration
    /// from them, failed (feature `tls`).
    #[error("{what}: {reason}")]
    Tls {
        /// What was being done, naming the file.
        what: String,
        /// Why it failed.
        reason: String,
    },
}

/// A [`ListenerKind`] as it reads in messages: `tcp`, `udp`, `unix`,
/// `unix-dgram` (the scheme of its `--listen` address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindName(pub ListenerKind);

impl std::fmt::Display for KindName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            ListenerKind::Tcp => "tcp",
            ListenerKind::Udp => "udp",
            ListenerKind::Unix => "unix",
            ListenerKind::UnixDgram => "unix-dgram",
        })
    }
}
