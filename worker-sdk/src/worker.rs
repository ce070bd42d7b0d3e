//! [`Worker`], the handle a program gets at start-up, and [`Builder`], which
//! makes one: under baton (`BATON_CHANNEL_FD` set) by greeting the
//! supervisor and receiving its listeners; standalone by binding
//! `BATON_LISTEN` or the program's defaults. The handle owns the listeners
//! until they are taken, sends `ready` and `status`, and carries the drain
//! (future, deadline, hooks, timers).
//!
//! This module never forks, execs or signals a process, and never changes
//! the environment (other threads may be reading it).

use std::future::Future;
use std::ops::{ControlFlow, Range};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use tokio::runtime::Handle;
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinHandle;

use crate::channel::Channel;
use crate::drain::{self, DrainCause, DrainState};
use crate::error::Error;
use crate::listen::{self, LISTEN_ENV};
use crate::listeners::{self, Listeners};
use crate::protocol::{ListenerInfo, ListenerKind, WorkerMessage};
use crate::state;

/// Set when a start in this process took the worker channel: the channel
/// has exactly one owner.
static CHANNEL_TAKEN: AtomicBool = AtomicBool::new(false);

/// The longest status text sent; longer text is cut at a character
/// boundary.
const MAX_STATUS: usize = 4096;

/// Starts this worker with no default listeners: under baton, greets the
/// supervisor and receives its listeners; standalone, binds `BATON_LISTEN`.
/// The same as `Worker::builder().start()`.
///
/// Call it once, early, inside a tokio runtime (with IO, time and signals
/// enabled, as `#[tokio::main]` gives), and clone the [`Worker`] it returns
/// wherever it is needed.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), baton_worker::Error> {
/// let worker = baton_worker::start().await?;
/// for listener in worker.listeners() {
///     println!("listener `{}`: {:?}", listener.name, listener.kind);
/// }
/// worker.ready()?;
/// # Ok(()) }
/// ```
pub async fn start() -> Result<Worker, Error> {
    Worker::builder().start().await
}

/// Reads `BATON_CHANNEL_FD`, refusing one inherited through another process.
fn parse_channel_fd(value: &str, listen_pid: Option<String>) -> Result<RawFd, Error> {
    let fd = value
        .trim()
        .parse::<RawFd>()
        .ok()
        .filter(|fd| *fd >= 3)
        .ok_or_else(|| Error::BadChannelFd {
            value: value.to_owned(),
        })?;
    let pid = std::process::id();
    if let Some(listen_pid) = listen_pid {
        if listen_pid.trim() != pid.to_string() {
            return Err(Error::NotForThisProcess { listen_pid, pid });
        }
    }
    Ok(fd)
}

/// Starts under baton on `channel`; `inherited` are the descriptor numbers
/// where the supervisor also placed the listeners (fds 3..3+LISTEN_FDS).
pub(crate) async fn supervised(
    runtime: Handle,
    channel: OwnedFd,
    inherited: Range<RawFd>,
    state: Arc<state::Shared>,
) -> Result<Worker, Error> {
    let raw = channel.as_raw_fd();
    let channel_error = |reason: String| Error::Channel { fd: raw, reason };
    listeners::check_channel(channel.as_fd()).map_err(channel_error)?;
    // Our end of the channel is ours alone: close-on-exec, so programs we
    // start do not inherit it, and non-blocking for tokio.
    fcntl(channel.as_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map_err(|e| channel_error(format!("setting close-on-exec: {e}")))?;
    let flags = OFlag::from_bits_retain(
        fcntl(channel.as_fd(), FcntlArg::F_GETFL)
            .map_err(|e| channel_error(format!("reading its flags: {e}")))?,
    );
    fcntl(
        channel.as_fd(),
        FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK),
    )
    .map_err(|e| channel_error(format!("making it non-blocking: {e}")))?;
    let channel = {
        let _entered = runtime.enter();
        Arc::new(
            Channel::new(channel)
                .map_err(|e| channel_error(format!("registering it with tokio: {e}")))?,
        )
    };
    let welcome = channel.handshake().await?;
    for (info, fd) in &welcome.listeners {
        listeners::check_kind(fd.as_fd(), info.kind).map_err(|found| Error::ListenerMismatch {
            name: info.name.clone(),
            expected: listeners::expected(info.kind),
            found,
        })?;
    }
    let received: Vec<BorrowedFd<'_>> =
        welcome.listeners.iter().map(|(_, fd)| fd.as_fd()).collect();
    let closed = listeners::close_inherited_duplicates(inherited, raw, &received);
    tracing::debug!(
        "generation {}: {} listeners received over the worker channel; closed the inherited copies at fds {closed:?}",
        welcome.generation,
        welcome.listeners.len()
    );
    let table = Listeners::new(
        welcome
            .listeners
            .into_iter()
            .map(|(info, fd)| (info.name, info.kind, fd))
            .collect(),
    );
    let inner = Arc::new(Inner {
        generation: welcome.generation,
        channel: Some(channel.clone()),
        listeners: table,
        drain: Arc::new(DrainState::new()),
        ready_sent: AtomicBool::new(false),
        runtime,
        state,
    });
    inner.runtime.spawn(
        channel
            .clone()
            .read_task(inner.drain.clone(), inner.state.clone()),
    );
    inner.runtime.spawn(channel.write_task());
    Ok(Worker { inner })
}

/// Starts without baton: binds the defaults, with `BATON_LISTEN`'s entries
/// (`listen_env`) replacing those of the same name and adding others.
fn standalone(
    runtime: Handle,
    defaults: &[(String, String)],
    listen_env: Option<&str>,
    state: Arc<state::Shared>,
) -> Result<Worker, Error> {
    let mut specs = Vec::new();
    for (name, addr) in defaults {
        let spec =
            listen::parse_spec(&format!("{name}={addr}")).map_err(|reason| Error::ListenSpec {
                origin: "default_listener",
                spec: format!("{name}={addr}"),
                reason,
            })?;
        specs.retain(|s: &listen::ListenSpec| s.name != spec.name);
        specs.push(spec);
    }
    if let Some(list) = listen_env {
        let from_env = listen::parse_list(list).map_err(|(spec, reason)| Error::ListenSpec {
            origin: LISTEN_ENV,
            spec,
            reason,
        })?;
        for spec in from_env {
            match specs.iter_mut().find(|s| s.name == spec.name) {
                Some(existing) => *existing = spec,
                None => specs.push(spec),
            }
        }
    }
    // Socket activation without baton (systemd, `systemfd`): the sockets
    // passed at fds 3.. take the place of the specs of the same name.
    let mut bound = listeners::take_activated()?;
    specs.retain(|spec| !bound.iter().any(|(name, _, _)| *name == spec.name));
    for spec in specs {
        let fd = listen::bind(&spec.addr).map_err(|source| Error::Bind {
            name: spec.name.clone(),
            addr: spec.addr.to_string(),
            source,
        })?;
        tracing::info!("standalone: listener `{}` on {}", spec.name, spec.addr);
        bound.push((spec.name, spec.addr.kind(), fd));
    }
    Ok(Worker {
        inner: Arc::new(Inner {
            generation: 0,
            channel: None,
            listeners: Listeners::new(bound),
            drain: Arc::new(DrainState::new()),
            ready_sent: AtomicBool::new(false),
            runtime,
            state,
        }),
    })
}

/// The handle of a started worker: its listeners, readiness, status and
/// drain. Cheap to clone; every clone is the same worker.
///
/// ```no_run
/// use baton_worker::Worker;
///
/// #[tokio::main]
/// async fn main() -> Result<(), baton_worker::Error> {
///     let worker = Worker::builder()
///         .default_listener("http", "tcp://127.0.0.1:3000")
///         .start()
///         .await?;
///     let listener = worker.tcp_listener("http")?;
///     worker.ready()?;
///     let drained = worker.drained();
///     tokio::pin!(drained);
///     loop {
///         tokio::select! {
///             () = &mut drained => break,
///             accepted = listener.accept() => {
///                 let Ok((stream, _)) = accepted else { continue };
///                 tokio::spawn(async move { drop(stream) /* serve it */ });
///             }
///         }
///     }
///     Ok(())
/// }
/// ```
#[derive(Clone)]
pub struct Worker {
    inner: Arc<Inner>,
}

struct Inner {
    /// 0 when standalone.
    generation: u64,
    /// `None` when standalone.
    channel: Option<Arc<Channel>>,
    listeners: Listeners,
    drain: Arc<DrainState>,
    ready_sent: AtomicBool,
    /// The runtime `start` ran on: timers and tokio sockets are made on it,
    /// so they work when asked for from any thread.
    runtime: Handle,
    /// Kept values, the frozen flag, the previous generation's values.
    state: Arc<state::Shared>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("generation", &self.inner.generation)
            .field("supervised", &self.is_supervised())
            .field("listeners", &self.inner.listeners.infos())
            .field("drain", &self.inner.drain)
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// A [`Builder`], to give default listeners for standalone runs or to
    /// leave signals to the program.
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), baton_worker::Error> {
    /// let worker = baton_worker::Worker::builder()
    ///     .default_listener("http", "tcp://127.0.0.1:3000")
    ///     .default_listener("stats", "udp://127.0.0.1:8125")
    ///     .start()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn builder() -> Builder {
        Builder::new()
    }

    /// This worker's generation: 1 for the first baton started, 2 after the
    /// first reload or restart, and so on; 0 when running without baton.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), baton_worker::Error> {
    /// let worker = baton_worker::start().await?;
    /// match worker.generation() {
    ///     0 => println!("running without baton"),
    ///     1 => println!("first start under baton"),
    ///     n => println!("generation {n}, after a reload"),
    /// }
    /// # Ok(()) }
    /// ```
    pub fn generation(&self) -> u64 {
        self.inner.generation
    }

    /// Whether an earlier generation ran before this one (a reload, or a
    /// restart after a crash): `generation() > 1`. Always `false` without
    /// baton.
    pub fn is_reload(&self) -> bool {
        self.inner.generation > 1
    }

    /// Whether this worker runs under baton (it found `BATON_CHANNEL_FD`).
    pub fn is_supervised(&self) -> bool {
        self.inner.channel.is_some()
    }

    /// Tells the supervisor this worker can serve; only then is the previous
    /// generation told to drain. Call it once the listeners are taken and
    /// everything a first request needs is in place: connections that
    /// arrive before the worker accepts simply wait in the kernel's queue.
    /// Calling it again does nothing; without baton it does nothing.
    ///
    /// It never blocks: if the supervisor is busy, the message waits in a
    /// queue that a background task flushes.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), baton_worker::Error> {
    /// let worker = baton_worker::Worker::builder()
    ///     .default_listener("http", "tcp://127.0.0.1:0")
    ///     .start()
    ///     .await?;
    /// let listener = worker.tcp_listener("http")?;
    /// // ... load configuration, warm caches ...
    /// worker.ready()?;
    /// worker.ready()?; // again: nothing happens
    /// # Ok(()) }
    /// ```
    pub fn ready(&self) -> Result<(), Error> {
        let Some(channel) = &self.inner.channel else {
            return Ok(());
        };
        if self.inner.ready_sent.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        channel.send(WorkerMessage::Ready).map_err(|source| {
            self.inner.ready_sent.store(false, Ordering::SeqCst);
            Error::Send {
                what: "ready",
                source,
            }
        })?;
        // Started from values in two pieces (a pre-copy and what changed
        // since): hand baton every value in one, for a crash restart and
        // systemd's store, now that the accept pause is over.
        if self.inner.state.rebase.swap(false, Ordering::SeqCst) {
            let worker = self.clone();
            self.inner.runtime.spawn_blocking(move || {
                if let Err(e) = worker.checkpoint() {
                    tracing::warn!("checkpointing the values taken over: {e}");
                }
            });
        }
        Ok(())
    }

    /// Sets the status line `baton status` shows for this generation. Line
    /// breaks become spaces, and text past 4 KiB is cut. Never blocks (see
    /// [`ready`](Self::ready)); without baton it does nothing.
    pub fn status(&self, text: impl Into<String>) -> Result<(), Error> {
        let Some(channel) = &self.inner.channel else {
            return Ok(());
        };
        let mut text: String = text.into();
        if text.len() > MAX_STATUS {
            let mut end = MAX_STATUS;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        let text = text.replace(['\n', '\r'], " ");
        channel
            .send(WorkerMessage::Status { text })
            .map_err(|source| Error::Send {
                what: "status",
                source,
            })
    }

    /// A future that resolves when this worker begins to drain: the
    /// supervisor sent `drain` (a newer generation is ready, or baton is
    /// stopping), the worker channel closed, or `SIGTERM`/`SIGINT` arrived.
    /// Resolves at once if the drain has begun. Make as many as needed; they
    /// are `Send + 'static`, so they fit
    /// `axum::serve(..).with_graceful_shutdown(..)` and
    /// `baton_worker::http::serve` alike.
    ///
    /// On drain, stop accepting, finish what is in flight, close idle
    /// connections, and return from `main` before
    /// [`drain_deadline`](Self::drain_deadline).
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), baton_worker::Error> {
    /// let worker = baton_worker::start().await?;
    /// let listener = worker.tcp_listener("http")?;
    /// worker.ready()?;
    /// tokio::select! {
    ///     () = worker.drained() => {}
    ///     _ = listener.accept() => { /* ... */ }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn drained(&self) -> impl Future<Output = ()> + Send + 'static {
        drain::wait(self.inner.drain.subscribe())
    }

    /// Whether the drain has begun.
    pub fn is_draining(&self) -> bool {
        self.inner.drain.current().is_some()
    }

    /// Why the drain began, once it has.
    pub fn drain_cause(&self) -> Option<DrainCause> {
        self.inner.drain.current().map(|d| d.cause)
    }

    /// When the supervisor will kill this worker: set once the supervisor
    /// has sent `drain` (its `--drain-timeout` after the message); `None`
    /// before, and for a drain with no deadline (a signal, the channel
    /// closing).
    pub fn drain_deadline(&self) -> Option<Instant> {
        self.inner.drain.current().and_then(|d| d.deadline)
    }

    /// Runs `hook` when the drain begins, after every `drained()` future has
    /// been woken (at once if it has begun already). Hooks run in the order
    /// they were added, on the task that noticed the drain: keep them short,
    /// and spawn a task for anything that waits.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), baton_worker::Error> {
    /// let worker = baton_worker::start().await?;
    /// worker.on_drain(|| eprintln!("draining: finishing in-flight work"));
    /// # Ok(()) }
    /// ```
    pub fn on_drain(&self, hook: impl FnOnce() + Send + 'static) {
        self.inner.drain.on_drain(Box::new(hook));
    }

    /// Calls `tick` every `period` (the first call one period from now)
    /// until the drain begins or `tick` returns `ControlFlow::Break`. No tick
    /// starts once the drain has begun. A tick that runs late delays the
    /// next ones rather than bunching them up. A zero period counts as one
    /// millisecond. The timer runs on the worker's runtime; the returned
    /// handle can abort it.
    ///
    /// ```
    /// use std::ops::ControlFlow;
    /// use std::time::Duration;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), baton_worker::Error> {
    /// let worker = baton_worker::start().await?;
    /// let mut n = 0;
    /// let timer = worker.interval(Duration::from_millis(10), move || {
    ///     n += 1;
    ///     eprintln!("tick {n}");
    ///     if n == 3 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
    /// });
    /// timer.await.expect("the timer ran to its end");
    /// # Ok(()) }
    /// ```
    pub fn interval<F>(&self, period: Duration, mut tick: F) -> JoinHandle<()>
    where
        F: FnMut() -> ControlFlow<()> + Send + 'static,
    {
        let period = period.max(Duration::from_millis(1));
        let mut drain = self.inner.drain.subscribe();
        self.inner.runtime.spawn(async move {
            let start = tokio::time::Instant::now() + period;
            let mut timer = tokio::time::interval_at(start, period);
            timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    biased;
                    _ = drain.wait_for(Option::is_some) => return,
                    _ = timer.tick() => {}
                }
                if drain.borrow().is_some() || tick().is_break() {
                    return;
                }
            }
        })
    }

    /// The listeners this worker was given, taken or not, in order.
    pub fn listeners(&self) -> Vec<ListenerInfo> {
        self.inner.listeners.infos()
    }

    /// The kind of listener `name`, if there is one.
    pub fn listener_kind(&self, name: &str) -> Option<ListenerKind> {
        self.listeners()
            .into_iter()
            .find(|l| l.name == name)
            .map(|l| l.kind)
    }

    /// Takes TCP listener `name` as a tokio listener. Each listener can be
    /// taken once. The socket is made non-blocking, which every holder of it
    /// shares (see the crate docs on `O_NONBLOCK`).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), baton_worker::Error> {
    /// let worker = baton_worker::Worker::builder()
    ///     .default_listener("http", "tcp://127.0.0.1:0")
    ///     .start()
    ///     .await?;
    /// let listener = worker.tcp_listener("http")?;
    /// println!("serving on {:?}", listener.local_addr());
    /// assert!(worker.tcp_listener("http").is_err(), "taken once");
    /// # Ok(()) }
    /// ```
    pub fn tcp_listener(&self, name: &str) -> Result<tokio::net::TcpListener, Error> {
        let std = self.std_tcp_listener(name)?;
        let _entered = self.inner.runtime.enter();
        tokio::net::TcpListener::from_std(std).map_err(|e| register_error(name, e))
    }

    /// Takes UDP socket `name` as a tokio socket (see
    /// [`tcp_listener`](Self::tcp_listener)).
    pub fn udp_socket(&self, name: &str) -> Result<tokio::net::UdpSocket, Error> {
        let std = self.std_udp_socket(name)?;
        let _entered = self.inner.runtime.enter();
        tokio::net::UdpSocket::from_std(std).map_err(|e| register_error(name, e))
    }

    /// Takes Unix stream listener `name` as a tokio listener (see
    /// [`tcp_listener`](Self::tcp_listener)).
    pub fn unix_listener(&self, name: &str) -> Result<tokio::net::UnixListener, Error> {
        let std = self.std_unix_listener(name)?;
        let _entered = self.inner.runtime.enter();
        tokio::net::UnixListener::from_std(std).map_err(|e| register_error(name, e))
    }

    /// Takes Unix datagram socket `name` as a tokio socket (see
    /// [`tcp_listener`](Self::tcp_listener)).
    pub fn unix_datagram(&self, name: &str) -> Result<tokio::net::UnixDatagram, Error> {
        let std = self.std_unix_datagram(name)?;
        let _entered = self.inner.runtime.enter();
        tokio::net::UnixDatagram::from_std(std).map_err(|e| register_error(name, e))
    }

    /// Takes TCP listener `name` as a std listener. It is **non-blocking**
    /// like every listener this crate hands out (the flag is shared with
    /// other generations, and tokio-based ones need it): an `accept` with
    /// nothing queued returns `WouldBlock`. Meant for other event loops.
    pub fn std_tcp_listener(&self, name: &str) -> Result<std::net::TcpListener, Error> {
        self.take(name, ListenerKind::Tcp).map(Into::into)
    }

    /// Takes UDP socket `name` as a std socket, non-blocking (see
    /// [`std_tcp_listener`](Self::std_tcp_listener)).
    pub fn std_udp_socket(&self, name: &str) -> Result<std::net::UdpSocket, Error> {
        self.take(name, ListenerKind::Udp).map(Into::into)
    }

    /// Takes Unix stream listener `name` as a std listener, non-blocking
    /// (see [`std_tcp_listener`](Self::std_tcp_listener)).
    pub fn std_unix_listener(&self, name: &str) -> Result<std::os::unix::net::UnixListener, Error> {
        self.take(name, ListenerKind::Unix).map(Into::into)
    }

    /// Takes Unix datagram socket `name` as a std socket, non-blocking (see
    /// [`std_tcp_listener`](Self::std_tcp_listener)).
    pub fn std_unix_datagram(&self, name: &str) -> Result<std::os::unix::net::UnixDatagram, Error> {
        self.take(name, ListenerKind::UnixDgram).map(Into::into)
    }

    fn take(&self, name: &str, kind: ListenerKind) -> Result<OwnedFd, Error> {
        self.inner.listeners.take(name, kind)
    }

    /// Starts the task that turns `SIGTERM`/`SIGINT` into the drain, and a
    /// second one into an exit.
    fn watch_signals(&self) -> Result<(), Error> {
        let _entered = self.inner.runtime.enter();
        let handler = |kind: SignalKind, name: &'static str| {
            signal(kind).map_err(|source| Error::Signal {
                signal: name,
                source,
            })
        };
        let mut term = handler(SignalKind::terminate(), "SIGTERM")?;
        let mut int = handler(SignalKind::interrupt(), "SIGINT")?;
        let drain = self.inner.drain.clone();
        self.inner.runtime.spawn(async move {
            let mut seen = 0;
            loop {
                let (name, number) = tokio::select! {
                    Some(()) = term.recv() => ("SIGTERM", libc::SIGTERM),
                    Some(()) = int.recv() => ("SIGINT", libc::SIGINT),
                    else => return,
                };
                seen += 1;
                if seen > 1 {
                    tracing::warn!("{name} again: exiting now");
                    std::process::exit(128 + number);
                }
                drain.fire(DrainCause::Signal(name), None);
            }
        });
        Ok(())
    }
}

fn register_error(name: &str, source: std::io::Error) -> Error {
    Error::Listener {
        name: name.to_owned(),
        what: "registering it with tokio",
        source,
    }
}

mod builder;
mod kept;

pub use builder::Builder;
#[cfg(test)]
mod tests;
