//! The protocol-agnostic part of a drain: an accept loop over a TCP or Unix
//! stream listener that hands every connection to a handler of the
//! program's own, tells each handler when its connection should end, and
//! waits for the handlers (up to the drain deadline) before it returns.
//!
//! [`serve_connections`] serves until a future resolves;
//! [`serve_worker_connections`] serves a [`Worker`](crate::Worker): until it
//! drains, pausing while it is frozen for a hand-over. Both stop accepting
//! the moment the drain begins (connections still in the kernel's queue go
//! to the next generation, which shares the socket), and give every
//! handler a [`Drain`]: the protocol decides where a connection may end (an
//! HTTP response boundary, a GOAWAY, the end of a message) and ends it
//! there. `http::serve` is built on this module.
//!
//! This module never reads or writes a connection, never binds, and never
//! touches a listener's flags.

use std::future::Future;
use std::io;
use std::time::{Duration, Instant};

use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::state::Shared;

/// How long before the supervisor's drain deadline
/// [`serve_worker_connections`] stops waiting for its connections, aborts
/// the ones still open and returns, so the program can exit by itself
/// rather than be killed.
pub const DEADLINE_MARGIN: Duration = Duration::from_millis(250);

/// How long accepting pauses after an error that is not one connection's
/// (out of descriptors, out of memory), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(200);

/// A stream listener [`serve_connections`] accepts on: tokio's
/// `TcpListener` and `UnixListener`, or a type of the program's own.
pub trait Listener: Send + 'static {
    /// One accepted connection.
    type Io: Send + 'static;

    /// Accepts the next connection. Errors that concern one connection
    /// (it was reset before it was accepted) are skipped by the caller;
    /// others (out of descriptors) pause accepting for a moment.
    fn accept(&mut self) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;

    /// Accepts a connection and sets `TCP_NODELAY` on it: the protocols
    /// served here write whole messages (an HTTP/2 frame, a response), and
    /// Nagle's algorithm would hold a small one back for a round trip.
    async fn accept(&mut self) -> io::Result<tokio::net::TcpStream> {
        let (stream, _peer) = tokio::net::TcpListener::accept(self).await?;
        // A connection without NODELAY is still a connection.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!("setting TCP_NODELAY on an accepted connection: {e}");
        }
        Ok(stream)
    }
}

impl Listener for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;

    async fn accept(&mut self) -> io::Result<tokio::net::UnixStream> {
        tokio::net::UnixListener::accept(self)
            .await
            .map(|(stream, _peer)| stream)
    }
}

/// Tells a connection's handler that its connection should end: the
/// worker is draining, or it froze so that a new generation takes its kept
/// values. Finish what is in hand (the request, the message), close at that
/// boundary, and do not wait for the client to start anything new.
///
/// Cheap to clone; every clone sees the same signal.
///
/// ```
/// use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
///
/// // A line echo: answers line by line until the client hangs up or the
/// // drain begins, and then closes between two lines, never inside one.
/// async fn echo(stream: tokio::net::TcpStream, drain: baton_worker::Drain) {
///     let mut stream = BufReader::new(stream);
///     let mut line = String::new();
///     loop {
///         line.clear();
///         tokio::select! {
///             biased;
///             () = drain.wait() => return,
///             read = stream.read_line(&mut line) => match read {
///                 Ok(0) | Err(_) => return,
///                 Ok(_) => {}
///             },
///         }
///         if stream.get_mut().write_all(line.as_bytes()).await.is_err() {
///             return;
///         }
///     }
/// }
/// ```
#[derive(Clone, Debug)]
pub struct Drain {
    /// `None` for [`Drain::never`].
    rx: Option<watch::Receiver<Signal>>,
}

/// What a cohort of connections has been told.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Signal {
    /// Serve on.
    #[default]
    Serving,
    /// A freeze: end at the next boundary, and read no new request (the
    /// kept values are about to be handed over); no deadline yet.
    Freezing,
    /// End at the next boundary; the worker will be killed at `deadline`,
    /// if the supervisor said when.
    Closing { deadline: Option<Instant> },
}

impl Drain {
    /// A signal that never fires, for serving a connection outside
    /// [`serve_connections`] (a test, a listener of the program's own).
    pub fn never() -> Drain {
        Drain { rx: None }
    }

    fn signal(&self) -> Signal {
        self.rx.as_ref().map_or(Signal::Serving, |rx| *rx.borrow())
    }

    /// Whether the connection ends for a freeze (not, or not yet, a
    /// drain): a request not read yet is left for the next generation.
    #[cfg_attr(not(feature = "axum"), allow(dead_code))]
    pub(crate) fn is_freeze(&self) -> bool {
        self.signal() == Signal::Freezing
    }

    /// Whether the connection should end.
    pub fn is_draining(&self) -> bool {
        self.signal() != Signal::Serving
    }

    /// Resolves when the connection should end (at once if it should
    /// already). Cancel-safe: use it in `select!` as often as needed.
    pub async fn wait(&self) {
        let Some(rx) = &self.rx else {
            return std::future::pending().await;
        };
        let mut rx = rx.clone();
        // An error means the serving loop is gone: it returned, so the
        // connection should end too.
        let _ = rx.wait_for(|signal| *signal != Signal::Serving).await;
    }

    /// When the supervisor kills this worker, once the drain has begun and
    /// the supervisor said (see
    /// [`Worker::drain_deadline`](crate::Worker::drain_deadline)); `None`
    /// before, while frozen, and for a drain without a deadline.
    pub fn deadline(&self) -> Option<Instant> {
        match self.signal() {
            Signal::Closing { deadline } => deadline,
            Signal::Serving | Signal::Freezing => None,
        }
    }
}

/// The connections accepted since the last freeze share one signal: a
/// freeze ends them all, a thaw starts a new cohort.
struct Cohorts {
    current: watch::Sender<Signal>,
    /// Cohorts told to close at a freeze whose connections may still be
    /// open: a drain gives them the deadline too.
    closed: Vec<watch::Sender<Signal>>,
}

impl Cohorts {
    fn new() -> Cohorts {
        Cohorts {
            current: watch::channel(Signal::Serving).0,
            closed: Vec::new(),
        }
    }

    fn drain(&self) -> Drain {
        Drain {
            rx: Some(self.current.subscribe()),
        }
    }

    /// A freeze: the current cohort closes, a new one begins.
    fn close_current(&mut self) {
        self.current.send_replace(Signal::Freezing);
        self.closed.retain(|cohort| cohort.receiver_count() > 0);
        let next = watch::channel(Signal::Serving).0;
        self.closed.push(std::mem::replace(&mut self.current, next));
    }

    /// The drain: every cohort closes, with the deadline.
    fn close_all(&self, deadline: Option<Instant>) {
        let closing = Signal::Closing { deadline };
        self.current.send_replace(closing);
        for cohort in &self.closed {
            cohort.send_replace(closing);
        }
    }
}

/// Where the accept loop takes its orders from.
struct Orders<D> {
    /// Resolves when the drain begins.
    drained: D,
    /// The frozen flag, for a worker.
    frozen: Option<watch::Receiver<bool>>,
    /// The drain's deadline, asked once it has begun.
    deadline: Box<dyn Fn() -> Option<Instant> + Send>,
    /// For a worker: the kept values, whose freeze waits for this loop to
    /// pause and for every connection it accepted to end.
    state: Option<Arc<Shared>>,
}

/// Serves `listener` until `shutdown` resolves: each accepted connection
/// goes to `handler` with a [`Drain`], on a task of its own. When
/// `shutdown` resolves it stops accepting at once (and drops the listener),
/// tells every handler, and returns once every handler has returned.
///
/// Pass [`Worker::drained`](crate::Worker::drained) as `shutdown`, or use
/// [`serve_worker_connections`], which also pauses while the worker is
/// frozen and gives up on handlers at the drain deadline.
///
/// ```no_run
/// use tokio::io::AsyncWriteExt;
///
/// #[tokio::main]
/// async fn main() -> Result<(), baton_worker::Error> {
///     let worker = baton_worker::Worker::builder()
///         .default_listener("greet", "tcp://127.0.0.1:4000")
///         .start()
///         .await?;
///     let listener = worker.tcp_listener("greet")?;
///     worker.ready()?;
///     baton_worker::serve_connections(
///         listener,
///         |mut stream: tokio::net::TcpStream, _drain| async move {
///             let _ = stream.write_all(b"hello\n").await;
///         },
///         worker.drained(),
///     )
///     .await;
///     Ok(())
/// }
/// ```
pub async fn serve_connections<L, H, F>(listener: L, handler: H, shutdown: impl Future<Output = ()>)
where
    L: Listener,
    H: FnMut(L::Io, Drain) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let orders = Orders {
        drained: shutdown,
        frozen: None,
        deadline: Box::new(|| None),
        state: None,
    };
    run(listener, handler, orders).await;
}

/// [`serve_connections`] for a [`Worker`](crate::Worker): serves until the
/// worker drains, and pauses while it is **frozen** (its kept values are
/// being handed to the next generation): it stops accepting, so new clients
/// wait in the kernel's queue for the next generation, and the handlers of
/// the connections accepted so far are told to end them, so no client goes
/// on touching values that have moved on. If the next generation fails and
/// this one thaws, it accepts again.
///
/// Once the drain has begun it waits for the handlers until
/// [`DEADLINE_MARGIN`] before the supervisor's deadline, then aborts the
/// ones still running and returns.
///
/// ```no_run
/// use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
///
/// #[tokio::main]
/// async fn main() -> Result<(), baton_worker::Error> {
///     let worker = baton_worker::start().await?;
///     let listener = worker.tcp_listener("echo")?;
///     worker.ready()?;
///     baton_worker::serve_worker_connections(&worker, listener, |stream, drain| async move {
///         let (read, mut write) = tokio::io::split(stream);
///         let mut lines = BufReader::new(read).lines();
///         // Between two lines, never inside one.
///         while !drain.is_draining() {
///             tokio::select! {
///                 () = drain.wait() => break,
///                 line = lines.next_line() => match line {
///                     Ok(Some(line)) => {
///                         if write.write_all(format!("{line}\n").as_bytes()).await.is_err() {
///                             break;
///                         }
///                     }
///                     _ => break,
///                 },
///             }
///         }
///     })
///     .await;
///     Ok(())
/// }
/// ```
pub async fn serve_worker_connections<L, H, F>(worker: &crate::Worker, listener: L, handler: H)
where
    L: Listener,
    H: FnMut(L::Io, Drain) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let deadline_of = worker.clone();
    let orders = Orders {
        drained: worker.drained(),
        frozen: Some(worker.frozen_watch()),
        deadline: Box::new(move || deadline_of.drain_deadline()),
        state: Some(worker.shared_state().clone()),
    };
    run(listener, handler, orders).await;
}

async fn run<L, H, F, D>(mut listener: L, mut handler: H, orders: Orders<D>)
where
    L: Listener,
    H: FnMut(L::Io, Drain) -> F,
    F: Future<Output = ()> + Send + 'static,
    D: Future<Output = ()>,
{
    let Orders {
        drained,
        frozen,
        deadline,
        state,
    } = orders;
    // Held while this loop accepts: a freeze waits until the loop has seen
    // it and paused. Taken before the frozen flag is read, so a freeze that
    // found no work in flight is always seen here.
    let hold = || state.as_ref().map(|s| s.in_flight());
    let mut accepting = hold();
    tokio::pin!(drained);
    // Without a freeze to watch (or once its sender is gone), a receiver
    // whose sender is kept here, which never changes.
    let (_never_frozen, unfrozen) = watch::channel(false);
    let mut frozen = frozen.unwrap_or_else(|| unfrozen.clone());
    let mut cohorts = Cohorts::new();
    let mut tasks = JoinSet::new();
    'serve: loop {
        if accepting.is_none() {
            accepting = hold();
        }
        if *frozen.borrow_and_update() {
            cohorts.close_current();
            accepting = None;
            // Paused: wait for a thaw, or the drain that follows a handover.
            loop {
                tokio::select! {
                    biased;
                    () = &mut drained => break 'serve,
                    changed = frozen.changed() => {
                        if changed.is_err() {
                            frozen = unfrozen.clone();
                        }
                        if !*frozen.borrow_and_update() {
                            continue 'serve;
                        }
                    }
                    Some(done) = tasks.join_next() => reap(done),
                }
            }
        }
        let accepted = tokio::select! {
            biased;
            () = &mut drained => break,
            changed = frozen.changed() => {
                if changed.is_err() {
                    frozen = unfrozen.clone();
                }
                continue;
            }
            Some(done) = tasks.join_next() => {
                reap(done);
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok(io) => {
                // The connection is work in flight until its handler returns.
                let busy = hold();
                let served = handler(io, cohorts.drain());
                tasks.spawn(async move {
                    served.await;
                    drop(busy);
                });
            }
            Err(e) if is_connection_error(&e) => {}
            Err(e) => {
                tracing::warn!("accepting a connection: {e}; pausing for {ACCEPT_BACKOFF:?}");
                tokio::select! {
                    biased;
                    () = &mut drained => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
            }
        }
    }
    let deadline = deadline();
    cohorts.close_all(deadline);
    drop(accepting);
    drop(listener);
    let give_up = deadline.map(|d| d.checked_sub(DEADLINE_MARGIN).unwrap_or(d));
    let all_done = async {
        while let Some(done) = tasks.join_next().await {
            reap(done);
        }
    };
    match give_up {
        None => all_done.await,
        Some(at) => {
            if tokio::time::timeout_at(at.into(), all_done).await.is_err() {
                tracing::warn!(
                    "{} connection(s) still open at the drain deadline: closing them",
                    tasks.len()
                );
                tasks.shutdown().await;
            }
        }
    }
}

/// Logs a handler that panicked; the others serve on.
fn reap(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            tracing::error!("a connection handler panicked: {e}");
        }
    }
}

/// Errors of one connection, not of the listener: skip it and accept the
/// next.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::mpsc;

    async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), future)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
    }

    #[tokio::test]
    async fn handlers_hear_the_drain_and_are_waited_for() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted_tx, mut accepted) = mpsc::unbounded_channel();
        let finished = Arc::new(AtomicUsize::new(0));
        let done = finished.clone();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_connections(
            listener,
            move |mut stream: TcpStream, drain: Drain| {
                let accepted = accepted_tx.clone();
                let done = done.clone();
                async move {
                    assert!(!drain.is_draining());
                    let _ = accepted.send(());
                    drain.wait().await;
                    // Says goodbye at its boundary, after the drain began.
                    stream.write_all(b"bye\n").await.unwrap();
                    done.fetch_add(1, Ordering::SeqCst);
                }
            },
            async move {
                let _ = stop_rx.await;
            },
        ));
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(TcpStream::connect(addr).await.unwrap());
            within("the accept", accepted.recv()).await;
        }
        stop_tx.send(()).unwrap();
        within("serve to return", server).await.unwrap();
        assert_eq!(finished.load(Ordering::SeqCst), 3, "every handler finished");
        for mut client in clients {
            let mut said = String::new();
            client.read_to_string(&mut said).await.unwrap();
            assert_eq!(said, "bye\n");
        }
        // The listener is closed.
        assert!(TcpStream::connect(addr).await.is_err());
    }

    #[test]
    fn a_never_signal_never_fires() {
        let drain = Drain::never();
        assert!(!drain.is_draining());
        assert_eq!(drain.deadline(), None);
    }

    #[test]
    fn a_freeze_closes_the_cohort_and_a_drain_gives_everyone_the_deadline() {
        let mut cohorts = Cohorts::new();
        let before = cohorts.drain();
        cohorts.close_current();
        let after = cohorts.drain();
        assert!(before.is_draining() && before.is_freeze());
        assert_eq!(before.deadline(), None);
        assert!(!after.is_draining());
        let at = Instant::now() + Duration::from_secs(5);
        cohorts.close_all(Some(at));
        assert!(!before.is_freeze());
        assert_eq!(before.deadline(), Some(at));
        assert_eq!(after.deadline(), Some(at));
    }
}
