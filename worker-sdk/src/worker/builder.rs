//! [`Builder`]: how a [`Worker`] starts (default listeners for standalone
//! runs, signals, the state format, migration, the pre-copy), and
//! `Builder::start`, which takes the worker channel under baton or binds
//! standalone.
//!
//! This module never forks, execs or signals a process.

use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::runtime::Handle;

use super::{parse_channel_fd, standalone, supervised, Worker, CHANNEL_TAKEN};
use crate::error::Error;
use crate::listen::LISTEN_ENV;
use crate::protocol::CHANNEL_FD_ENV;
use crate::state::{self, Migrate};
use crate::sys;

/// How to start a [`Worker`]: default listeners for standalone runs, and
/// whether to handle `SIGTERM`/`SIGINT`. Made by [`Worker::builder`].
#[derive(Clone)]
pub struct Builder {
    defaults: Vec<(String, String)>,
    signals: bool,
    state_format: u32,
    migrate: Option<Migrate>,
    pre_copy: bool,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("defaults", &self.defaults)
            .field("signals", &self.signals)
            .field("state_format", &self.state_format)
            .field("migrate", &self.migrate.is_some())
            .field("pre_copy", &self.pre_copy)
            .finish()
    }
}

impl Builder {
    /// The defaults: no default listeners, signals handled, state format 1,
    /// no migration, a pre-copy.
    pub(super) fn new() -> Builder {
        Builder {
            defaults: Vec::new(),
            signals: true,
            state_format: 1,
            migrate: None,
            pre_copy: true,
        }
    }

    /// Adds a listener to bind when the program runs without baton and
    /// `BATON_LISTEN` does not name it. `addr` is written as for
    /// `baton run --listen`: `tcp://HOST:PORT` (HOST may be `[IPv6]`),
    /// `udp://HOST:PORT`, `unix:PATH`, `unix-dgram:PATH`. Under baton the
    /// defaults are ignored: the supervisor's listeners are the only ones.
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), baton_worker::Error> {
    /// let worker = baton_worker::Worker::builder()
    ///     .default_listener("http", "tcp://127.0.0.1:3000")
    ///     .start()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn default_listener(mut self, name: impl Into<String>, addr: impl Into<String>) -> Self {
        self.defaults.push((name.into(), addr.into()));
        self
    }

    /// Whether the first [`keep`](Worker::keep) asks for a pre-copy of the
    /// previous generation's values (the default: `true`), read while it
    /// serves on, so that its freeze hands over only what changed since.
    /// With `false`, every value is written and read inside the accept
    /// pause (benchmarks use it to measure that worst case).
    pub fn pre_copy(mut self, pre_copy: bool) -> Self {
        self.pre_copy = pre_copy;
        self
    }

    /// Whether `SIGTERM` and `SIGINT` begin the drain (the default: `true`).
    /// A second one exits the process at once with status 128 + the
    /// signal's number, so a second ctrl-c always works. With `false`, the
    /// program handles signals itself.
    pub fn handle_signals(mut self, handle: bool) -> Self {
        self.signals = handle;
        self
    }

    /// The version of this program's kept values (default 1). Raise it when
    /// a kept value's type changes shape; snapshots of an older format are
    /// then passed through [`migrate_state`](Self::migrate_state), and a
    /// snapshot of a newer format (a rollback) is rejected, which fails the
    /// reload before the old generation stops serving.
    pub fn state_format(mut self, version: u32) -> Self {
        self.state_format = version;
        self
    }

    /// How to upgrade kept values written with an older state format: gets
    /// the old format and the values by name (JSON), changes them in place,
    /// or returns why it cannot (the reload then fails, the old generation
    /// serves on).
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), baton_worker::Error> {
    /// let worker = baton_worker::Worker::builder()
    ///     .state_format(2)
    ///     .migrate_state(|from, values| {
    ///         // Format 1 kept `hits` as a number; 2 keeps `stats` as an object.
    ///         if from == 1 {
    ///             let hits = values.remove("hits").unwrap_or_default();
    ///             values.insert("stats".into(), serde_json::json!({ "hits": hits }));
    ///         }
    ///         Ok(())
    ///     })
    ///     .start()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn migrate_state(
        mut self,
        migrate: impl Fn(u32, &mut serde_json::Map<String, serde_json::Value>) -> Result<(), String>
            + Send
            + Sync
            + 'static,
    ) -> Self {
        self.migrate = Some(Arc::new(migrate));
        self
    }

    /// Starts the worker: under baton (`BATON_CHANNEL_FD` is set), greets the
    /// supervisor, receives and checks its listeners, and closes the
    /// inherited copies of them at fds 3..; standalone, binds the listeners
    /// of `BATON_LISTEN` and the defaults.
    ///
    /// Under baton, this takes ownership of the worker channel and of the
    /// inherited listener descriptors at fds `3..3+LISTEN_FDS`: do not also
    /// take those with another library (`listenfd`, `sd_listen_fds`).
    pub async fn start(self) -> Result<Worker, Error> {
        let runtime = Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let state = Arc::new(state::Shared::new(self.state_format, self.migrate.clone()));
        state.pre_copy.store(self.pre_copy, Ordering::SeqCst);
        let env = |key: &str| std::env::var(key).ok().filter(|v| !v.is_empty());
        let worker = match env(CHANNEL_FD_ENV) {
            Some(value) => {
                let fd = parse_channel_fd(&value, env("LISTEN_PID"))?;
                if CHANNEL_TAKEN.swap(true, Ordering::SeqCst) {
                    return Err(Error::AlreadyStarted);
                }
                let channel = sys::take_channel(fd).map_err(|e| Error::Channel {
                    fd,
                    reason: e.to_string(),
                })?;
                let listen_fds = env("LISTEN_FDS")
                    .and_then(|n| n.parse::<RawFd>().ok())
                    .unwrap_or(0)
                    .clamp(0, 65536);
                supervised(runtime, channel, 3..3 + listen_fds, state).await?
            }
            None => standalone(runtime, &self.defaults, env(LISTEN_ENV).as_deref(), state)?,
        };
        if self.signals {
            worker.watch_signals()?;
        }
        Ok(worker)
    }
}
