//! HTTP serving that drains without losing a request (cargo feature `axum`).
//!
//! [`serve`] is `axum::serve(..).with_graceful_shutdown(..)` done the way a
//! reload needs. Stock axum (through hyper's `graceful_shutdown`) closes
//! every connection it has accepted but not yet read a request from the
//! moment shutdown begins: a client that connected a moment before the
//! drain, and whose request is already on its way, sees its fresh connection
//! closed with no response, the one failure a reload must never cause. Here
//! a connection is shut down gracefully only once its first request has
//! arrived (or [`FIRST_REQUEST_GRACE`] has passed without one).
//!
//! Keep-alive connections are not simply closed when the drain begins
//! either (stock servers close the idle ones at once): a client's next
//! request may already be on its way, and closing under it makes the
//! client retry. Here every response finished while draining says
//! `Connection: close`, so the client opens its next connection to the new
//! generation, and an idle connection gets [`IDLE_GRACE`] for one more
//! request. With the project's load test this took retried requests from
//! about 1.8 per reload to none.
//!
//! It serves HTTP/1.1 (with upgrades, so WebSockets work; an upgraded
//! connection belongs to its handler and is not waited for). It never binds,
//! and it never touches the listener's flags.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use axum::serve::Listener;
use axum::Router;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION};
use hyper::service::{service_fn, Service};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

/// While draining, how long a connection that has sent no request yet may
/// take to send its first one before it is closed.
pub const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(5);

/// While draining, how long an idle keep-alive connection may take to send
/// one more request (answered with `Connection: close`) before it is
/// closed. Short, so idle connections cannot keep a drained worker alive.
pub const IDLE_GRACE: Duration = Duration::from_millis(200);

/// Serves `app` on `listener` (a tokio `TcpListener` or `UnixListener`)
/// until `shutdown` resolves, then drains and returns once every connection
/// is closed:
///
/// - stops accepting at once (connections still in the kernel's queue go to
///   the next generation, which shares the socket);
/// - lets requests in flight finish; their responses carry
///   `Connection: close`;
/// - answers one more request on idle keep-alive connections if it comes
///   within [`IDLE_GRACE`] (with `Connection: close`), and closes them
///   then, so they cannot keep a drained worker alive until its deadline
///   (a request racing that close fails before any byte of a response,
///   which HTTP clients retry on a reused connection);
/// - answers the first request of connections accepted but not yet read
///   from, waiting up to [`FIRST_REQUEST_GRACE`] for it.
///
/// Pass [`Worker::drained`](crate::Worker::drained) as `shutdown`; tests can
/// pass any future.
///
/// ```no_run
/// use axum::{routing::get, Router};
///
/// #[tokio::main]
/// async fn main() -> Result<(), baton_worker::Error> {
///     let worker = baton_worker::Worker::builder()
///         .default_listener("http", "tcp://127.0.0.1:3000")
///         .start()
///         .await?;
///     let listener = worker.tcp_listener("http")?;
///     let app = Router::new().route("/", get(|| async { "hello\n" }));
///     worker.ready()?;
///     baton_worker::http::serve(listener, app, worker.drained()).await;
///     Ok(())
/// }
/// ```
pub async fn serve<L>(mut listener: L, app: Router, shutdown: impl Future<Output = ()>)
where
    L: Listener,
{
    // Set once when draining starts. Every connection task holds a
    // receiver, so `closed()` on the sender resolves when the last one is
    // gone.
    let (drain_tx, drain_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let io = tokio::select! {
            biased;
            () = &mut shutdown => break,
            // axum's `Listener` retries accept errors itself (and backs off
            // on EMFILE).
            (io, _peer) = listener.accept() => io,
        };
        tokio::spawn(serve_connection(io, app.clone(), drain_rx.clone()));
    }
    drain_tx.send_replace(true);
    drop(listener);
    drop(drain_rx);
    drain_tx.closed().await;
}

/// [`serve`] for a [`Worker`](crate::Worker): serves until the worker
/// drains, and also pauses while it is **frozen** (its kept values are being
/// handed to the next generation): it stops accepting, so new clients wait in
/// the kernel's queue for the next generation, and its open connections
/// finish the request in flight and close (`Connection: close`), so no
/// client goes on writing to values that have moved on. If the next
/// generation fails and this one thaws, it accepts again.
///
/// ```no_run
/// use axum::{routing::get, Router};
///
/// #[tokio::main]
/// async fn main() -> Result<(), baton_worker::Error> {
///     let worker = baton_worker::start().await?;
///     let hits = worker.keep("hits", || 0u64).await?;
///     let listener = worker.tcp_listener("http")?;
///     let app = Router::new().route("/", get(move || async move {
///         hits.update(|n| { *n += 1; n.to_string() })
///     }));
///     worker.ready()?;
///     baton_worker::http::serve_worker(&worker, listener, app).await;
///     Ok(())
/// }
/// ```
pub async fn serve_worker<L>(worker: &crate::Worker, mut listener: L, app: Router)
where
    L: Listener,
{
    let drained = worker.drained();
    tokio::pin!(drained);
    let mut frozen = worker.frozen_watch();
    // Connections are closed in cohorts: a freeze closes every connection
    // accepted before it; a thaw starts a new cohort.
    let (mut close_tx, mut close_rx) = watch::channel(false);
    let mut closed_cohorts: Vec<watch::Sender<bool>> = Vec::new();
    'serve: loop {
        if *frozen.borrow_and_update() {
            close_tx.send_replace(true);
            let (tx, rx) = watch::channel(false);
            // Cohorts whose connections are all gone need no waiting for.
            closed_cohorts.retain(|cohort| !cohort.is_closed());
            closed_cohorts.push(std::mem::replace(&mut close_tx, tx));
            close_rx = rx;
            // Paused: wait for a thaw, or the drain that follows a handover.
            loop {
                tokio::select! {
                    biased;
                    () = &mut drained => break 'serve,
                    changed = frozen.changed() => {
                        if changed.is_err() || !*frozen.borrow_and_update() {
                            continue 'serve;
                        }
                    }
                }
            }
        }
        let io = tokio::select! {
            biased;
            () = &mut drained => break,
            _ = frozen.changed() => continue,
            (io, _peer) = listener.accept() => io,
        };
        tokio::spawn(serve_connection(io, app.clone(), close_rx.clone()));
    }
    close_tx.send_replace(true);
    drop(listener);
    drop(close_rx);
    closed_cohorts.push(close_tx);
    for cohort in closed_cohorts {
        cohort.closed().await;
    }
}

/// Serves one connection; see [`serve`] for how it drains.
async fn serve_connection<I>(io: I, app: Router, mut drain: watch::Receiver<bool>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // How many requests have arrived on this connection, counted by the
    // service as each one starts.
    let (seen_tx, mut seen_rx) = watch::channel(0u64);
    let inner = TowerToHyperService::new(app);
    let draining = drain.clone();
    let service = service_fn(move |request: Request<Incoming>| {
        seen_tx.send_modify(|n| *n += 1);
        let response = inner.call(request);
        let draining = draining.clone();
        async move {
            let mut response = response.await?;
            // A response finished while draining closes its connection.
            // Saying so in the response itself (rather than by a later
            // `graceful_shutdown`, which finds the connection idle and just
            // closes it) keeps the client from sending another request on a
            // connection about to close.
            if *draining.borrow() && response.status() != StatusCode::SWITCHING_PROTOCOLS {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(response)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        biased;
        result = conn.as_mut() => return report(result),
        _ = drain.wait_for(|draining| *draining) => {}
    }
    // Still serving, wait for one more request: the first one (it may be on
    // its way), or the next one on an idle keep-alive connection. Its
    // response says `Connection: close`. A request in flight now gets that
    // too, and its connection closes after it.
    let at_drain = *seen_rx.borrow_and_update();
    let grace = if at_drain == 0 {
        FIRST_REQUEST_GRACE
    } else {
        IDLE_GRACE
    };
    tokio::select! {
        biased;
        result = conn.as_mut() => return report(result),
        _ = tokio::time::timeout(grace, seen_rx.wait_for(|n| *n > at_drain)) => {}
    }
    // Idle: closes now. Busy: finishes the response, then closes.
    conn.as_mut().graceful_shutdown();
    report(conn.await);
}

fn report(result: Result<(), hyper::Error>) {
    // A client going away mid-request is its business, not a server error.
    if let Err(e) = result {
        if !e.is_incomplete_message() {
            tracing::debug!("serving a connection: {e}");
        }
    }
}

// `Router`'s service never fails; spelled out so a change in axum shows here.
const _: fn() = || {
    fn assert_infallible<S: Service<Request<Incoming>, Error = Infallible>>(_: &S) {}
    let router = TowerToHyperService::new(Router::new());
    assert_infallible(&router);
};

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use std::io::{Read, Write};
    use std::sync::Arc;
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::{mpsc, Notify};

    /// A listener that reports each connection it accepts.
    struct Reporting {
        inner: TcpListener,
        accepted: mpsc::UnboundedSender<()>,
    }

    impl Listener for Reporting {
        type Io = TcpStream;
        type Addr = std::net::SocketAddr;

        async fn accept(&mut self) -> (TcpStream, std::net::SocketAddr) {
            let accepted = Listener::accept(&mut self.inner).await;
            let _ = self.accepted.send(());
            accepted
        }

        fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
            self.inner.local_addr()
        }
    }

    async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), future)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
    }

    fn get_on(stream: &mut std::net::TcpStream, path: &str) -> String {
        write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = vec![0; 4096];
        let mut response = String::new();
        while !response.ends_with("\r\n\r\nok") {
            let n = stream.read(&mut buf).unwrap();
            assert!(n > 0, "closed early: {response:?}");
            response.push_str(std::str::from_utf8(&buf[..n]).unwrap());
        }
        response
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drain_answers_fresh_connections_and_closes_idle_ones() {
        let inner = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = inner.local_addr().unwrap();
        let (accepted_tx, mut accepted) = mpsc::unbounded_channel();
        let listener = Reporting {
            inner,
            accepted: accepted_tx,
        };
        let app = Router::new().route("/", get(|| async { "ok" }));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, app, async move {
            let _ = stop_rx.await;
        }));

        // An idle keep-alive connection that has served a request, and a
        // fresh one that has sent nothing yet, both accepted before the drain.
        let mut idle = std::net::TcpStream::connect(addr).unwrap();
        let mut idle = tokio::task::spawn_blocking(move || {
            assert!(get_on(&mut idle, "/").starts_with("HTTP/1.1 200"));
            idle
        })
        .await
        .unwrap();
        let fresh = std::net::TcpStream::connect(addr).unwrap();
        within("two accepts", async {
            accepted.recv().await;
            accepted.recv().await;
        })
        .await;
        stop_tx.send(()).unwrap();

        let clients = tokio::task::spawn_blocking(move || {
            // The idle connection is closed by the server (after IDLE_GRACE).
            let mut rest = Vec::new();
            idle.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty(), "{rest:?}");
            // The fresh one still gets its answer, then the server closes it.
            let mut fresh = fresh;
            let response = get_on(&mut fresh, "/");
            assert!(response.starts_with("HTTP/1.1 200"), "{response}");
            fresh.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty(), "{rest:?}");
        });
        within("the clients", clients).await.unwrap();
        within("serve to return", server).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_in_flight_when_the_drain_begins_says_connection_close() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (started_tx, mut started) = mpsc::unbounded_channel::<()>();
        let release = Arc::new(Notify::new());
        let app = {
            let release = release.clone();
            Router::new().route(
                "/",
                get(move || {
                    let (started_tx, release) = (started_tx.clone(), release.clone());
                    async move {
                        let _ = started_tx.send(());
                        release.notified().await;
                        "ok"
                    }
                }),
            )
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, app, async move {
            let _ = stop_rx.await;
        }));
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        let client = tokio::task::spawn_blocking(move || {
            let response = get_on(&mut client, "/");
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).unwrap();
            (response, rest)
        });
        within("the request to start", started.recv()).await;
        stop_tx.send(()).unwrap();
        // The listener is dropped right after the drain flag is set: once
        // connecting is refused, the drain has begun.
        within("the listener to close", async {
            while std::net::TcpStream::connect(addr).is_ok() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        release.notify_one();
        let (response, rest) = within("the response", client).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(
            response
                .to_ascii_lowercase()
                .contains("\r\nconnection: close\r\n"),
            "{response}"
        );
        assert!(rest.is_empty(), "closed after the response: {rest:?}");
        within("serve to return", server).await.unwrap();
    }
}
