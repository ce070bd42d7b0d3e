//! HTTP serving that drains without losing a request (cargo feature `axum`;
//! TLS with feature `tls`).
//!
//! [`serve`] is `axum::serve(..).with_graceful_shutdown(..)` done the way a
//! reload needs, on the protocol-agnostic accept loop of the
//! [`crate::connections`] module. It speaks HTTP/1.1 and HTTP/2 on the
//! same listener (HTTP/2 by prior knowledge in cleartext, "h2c", and by ALPN
//! over TLS), through hyper-util's automatic connection builder.
//!
//! Stock axum (through hyper's `graceful_shutdown`) closes every connection
//! it has accepted but not yet read a request from the moment shutdown
//! begins: a client that connected a moment before the drain, and whose
//! request is already on its way, sees its fresh connection closed with no
//! response, the one failure a reload must never cause. Here a connection
//! is shut down gracefully only once its first request has arrived (or
//! [`FIRST_REQUEST_GRACE`] has passed without one).
//!
//! Keep-alive connections are not simply closed when the drain begins
//! either (stock servers close the idle ones at once): a client's next
//! request may already be on its way, and closing under it makes the
//! client retry. Here every HTTP/1.1 response finished while draining says
//! `Connection: close`, so the client opens its next connection to the new
//! generation, and an idle connection gets [`IDLE_GRACE`] for one more
//! request. With the project's load test this took retried requests from
//! about 1.8 per reload to none. An HTTP/2 connection that has served a
//! request gets a GOAWAY at once: hyper sends it in two steps (first with
//! the highest stream id, then, a round trip later, with the last stream
//! it took), so a request the client sent before it saw the GOAWAY is still
//! served, and the streams in flight finish.
//!
//! When hyper is done with a connection it is closed the lingering way
//! (half-close, read until the client closes, at most two seconds): closed
//! with a request of the client's still unread, the kernel would answer
//! with a reset that can swallow the GOAWAY or the response before it, and
//! the client could not tell that its request was never processed.
//!
//! With TLS (feature `tls`, [`Server::tls`]), the handshake happens on the
//! connection's own task: a handshake in progress when the drain begins
//! completes, and the connection is then served as any other.
//!
//! HTTP/1.1 upgrades work (WebSockets); an upgraded connection belongs to
//! its handler and is not waited for. This module never binds, and it never
//! touches the listener's flags.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION};
use hyper::service::{service_fn, Service};
use hyper::{Request, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use crate::connections::{self, Drain, Listener};
use crate::linger;

/// While draining, how long a connection that has sent no request yet may
/// take to send its first one before it is closed.
pub const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(5);

/// While draining, how long an idle HTTP/1.1 keep-alive connection may take
/// to send one more request (answered with `Connection: close`) before it
/// is closed. Short, so idle connections cannot keep a drained worker alive.
pub const IDLE_GRACE: Duration = Duration::from_millis(200);

/// Serves `app` on `listener` (a tokio `TcpListener` or `UnixListener`)
/// until `shutdown` resolves, then drains and returns once every connection
/// is closed:
///
/// - stops accepting at once (connections still in the kernel's queue go to
///   the next generation, which shares the socket);
/// - lets requests in flight finish; HTTP/1.1 responses carry
///   `Connection: close`, HTTP/2 connections get a GOAWAY and finish their
///   open streams;
/// - answers one more request on idle HTTP/1.1 keep-alive connections if it
///   comes within [`IDLE_GRACE`] (with `Connection: close`), and closes
///   them then, so they cannot keep a drained worker alive until its
///   deadline (a request racing that close fails before any byte of a
///   response, which HTTP clients retry on a reused connection);
/// - answers the first request of connections accepted but not yet read
///   from, waiting up to [`FIRST_REQUEST_GRACE`] for it.
///
/// Pass [`Worker::drained`](crate::Worker::drained) as `shutdown`; tests can
/// pass any future. [`Server`] adds TLS.
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
pub async fn serve<L>(listener: L, app: Router, shutdown: impl Future<Output = ()>)
where
    L: Listener,
    L::Io: AsyncRead + AsyncWrite + Unpin,
{
    Server::new(app).serve(listener, shutdown).await;
}

/// [`serve`] for a [`Worker`](crate::Worker): serves until the worker
/// drains, and also pauses while it is **frozen** (its kept values are being
/// handed to the next generation): it stops accepting, so new clients wait in
/// the kernel's queue for the next generation, and its open connections
/// finish the request in flight and close (`Connection: close`, or a
/// GOAWAY), so no client goes on writing to values that have moved on. If
/// the next generation fails and this one thaws, it accepts again. Once
/// draining, it waits for its connections up to the drain deadline (see
/// [`serve_worker_connections`](crate::serve_worker_connections)).
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
pub async fn serve_worker<L>(worker: &crate::Worker, listener: L, app: Router)
where
    L: Listener,
    L::Io: AsyncRead + AsyncWrite + Unpin,
{
    Server::new(app).serve_worker(worker, listener).await;
}

/// An HTTP server for an axum `Router`, with what [`serve`] and
/// [`serve_worker`] take as defaults made explicit: TLS (feature `tls`).
///
/// ```no_run
/// # #[cfg(feature = "tls")]
/// # async fn doc(worker: baton_worker::Worker, app: axum::Router) -> Result<(), baton_worker::Error> {
/// // HTTPS with HTTP/2 and HTTP/1.1 by ALPN. A reload reads the files
/// // again: renew a certificate, then `baton reload`.
/// let tls = baton_worker::tls::load("cert.pem", "key.pem")?;
/// let listener = worker.tcp_listener("https")?;
/// worker.ready()?;
/// baton_worker::http::Server::new(app)
///     .tls(tls)
///     .serve_worker(&worker, listener)
///     .await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Server {
    app: Router,
    #[cfg(feature = "tls")]
    tls: Option<Arc<crate::tls::rustls::ServerConfig>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = f.debug_struct("Server");
        #[cfg(feature = "tls")]
        s.field("tls", &self.tls.is_some());
        s.finish_non_exhaustive()
    }
}

impl Server {
    /// A server for `app`, in cleartext.
    pub fn new(app: Router) -> Server {
        Server {
            app,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    /// Serves HTTPS with `config` (see [`tls::load`](crate::tls::load),
    /// which offers ALPN `h2` and `http/1.1`). Each connection's handshake
    /// runs on its own task, bounded by
    /// [`tls::HANDSHAKE_TIMEOUT`](crate::tls::HANDSHAKE_TIMEOUT); one in
    /// progress when the drain begins completes and is served.
    #[cfg(feature = "tls")]
    pub fn tls(mut self, config: Arc<crate::tls::rustls::ServerConfig>) -> Server {
        self.tls = Some(config);
        self
    }

    /// Serves until `shutdown` resolves; see [`serve`].
    pub async fn serve<L>(self, listener: L, shutdown: impl Future<Output = ()>)
    where
        L: Listener,
        L::Io: AsyncRead + AsyncWrite + Unpin,
    {
        connections::serve_connections(listener, self.handler(), shutdown).await;
    }

    /// Serves a worker until it drains, pausing while frozen; see
    /// [`serve_worker`].
    pub async fn serve_worker<L>(self, worker: &crate::Worker, listener: L)
    where
        L: Listener,
        L::Io: AsyncRead + AsyncWrite + Unpin,
    {
        connections::serve_worker_connections(worker, listener, self.handler()).await;
    }

    /// What each accepted connection gets.
    fn handler<I>(
        self,
    ) -> impl FnMut(I, Drain) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        move |io: I, drain: Drain| {
            let app = self.app.clone();
            #[cfg(feature = "tls")]
            if let Some(config) = self.tls.clone() {
                return Box::pin(async move {
                    // The handshake goes on whatever the drain says: the
                    // client is already talking to this generation.
                    match crate::tls::accept(&config, io).await {
                        Ok(stream) => serve_connection(stream, app, drain).await,
                        Err(e) => tracing::debug!("TLS handshake: {e}"),
                    }
                });
            }
            Box::pin(serve_connection(io, app, drain))
        }
    }
}

/// Serves one connection, HTTP/1.1 or HTTP/2; see [`serve`] for how it
/// drains.
async fn serve_connection<I>(io: I, app: Router, drain: Drain)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // How many requests have arrived on this connection, counted by the
    // service as each one starts.
    let (seen_tx, mut seen_rx) = watch::channel(0u64);
    // Set by the service when a request arrives over HTTP/2.
    let http2 = Arc::new(AtomicBool::new(false));
    let inner = TowerToHyperService::new(app);
    let draining = drain.clone();
    let saw_http2 = http2.clone();
    let service = service_fn(move |request: Request<Incoming>| {
        seen_tx.send_modify(|n| *n += 1);
        let http1 = request.version() < Version::HTTP_2;
        if !http1 {
            saw_http2.store(true, Ordering::Relaxed);
        }
        let response = inner.call(request);
        let draining = draining.clone();
        async move {
            let mut response = response.await?;
            // An HTTP/1.1 response finished while draining closes its
            // connection. Saying so in the response itself (rather than by
            // a later `graceful_shutdown`, which finds the connection idle
            // and just closes it) keeps the client from sending another
            // request on a connection about to close. (HTTP/2 has no such
            // header: its GOAWAY says it.)
            if http1
                && draining.is_draining()
                && response.status() != StatusCode::SWITCHING_PROTOCOLS
            {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(response)
        }
    });
    let (io, claim) = linger::hold(io);
    let builder = auto::Builder::new(TokioExecutor::new());
    let mut conn = Box::pin(builder.serve_connection_with_upgrades(TokioIo::new(io), service));
    // Serve, shutting down gracefully once the drain begins.
    let result = async {
        tokio::select! {
            biased;
            result = conn.as_mut() => return result,
            () = drain.wait() => {}
        }
        // An HTTP/2 connection that has served a request gets its GOAWAY now
        // (see the module docs). Otherwise wait for one more request: the first
        // one (it may be on its way; a graceful shutdown before it would close
        // the connection unanswered), or the next one on an idle HTTP/1.1
        // keep-alive connection. Its response says `Connection: close`. A
        // request in flight now gets that too, and its connection closes after
        // it.
        let at_drain = *seen_rx.borrow_and_update();
        if at_drain == 0 || !http2.load(Ordering::Relaxed) {
            let grace = if at_drain == 0 {
                FIRST_REQUEST_GRACE
            } else {
                IDLE_GRACE
            };
            tokio::select! {
                biased;
                result = conn.as_mut() => return result,
                _ = tokio::time::timeout(grace, seen_rx.wait_for(|n| *n > at_drain)) => {}
            }
        }
        // HTTP/1.1 idle: closes now; busy: finishes the response, then closes.
        // HTTP/2: GOAWAY, the open streams finish, then it closes.
        conn.as_mut().graceful_shutdown();
        conn.as_mut().await
    }
    .await;
    report(result);
    // hyper is done with the stream: close it the lingering way.
    drop(conn);
    claim.close().await;
}

fn report(result: Result<(), Box<dyn std::error::Error + Send + Sync>>) {
    // A client going away mid-request is its business, not a server error.
    if let Err(e) = result {
        let incomplete = e
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_incomplete_message);
        if !incomplete {
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

        async fn accept(&mut self) -> std::io::Result<TcpStream> {
            let accepted = Listener::accept(&mut self.inner).await;
            let _ = self.accepted.send(());
            accepted
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

    /// Waits until connecting to `addr` is refused: the listener is
    /// dropped right after the drain flag is set, so the drain has begun.
    async fn drain_begun(addr: std::net::SocketAddr) {
        within("the listener to close", async {
            while TcpStream::connect(addr).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    }

    /// An app whose `/` reports each request's start, then waits for
    /// `release`; `/quick` answers at once.
    fn held_app(started: mpsc::UnboundedSender<()>, release: watch::Receiver<bool>) -> Router {
        Router::new()
            .route(
                "/",
                get(move || {
                    let (started, mut release) = (started.clone(), release.clone());
                    async move {
                        let _ = started.send(());
                        let _ = release.wait_for(|released| *released).await;
                        "ok"
                    }
                }),
            )
            .route("/quick", get(|| async { "quick" }))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http2_gets_a_goaway_and_finishes_its_open_streams() {
        use http_body_util::{BodyExt, Empty};
        use hyper::body::Bytes;

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (started_tx, mut started) = mpsc::unbounded_channel::<()>();
        let (release, released) = watch::channel(false);
        let app = held_app(started_tx, released);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, app, async move {
            let _ = stop_rx.await;
        }));

        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(stream),
        )
        .await
        .unwrap();
        let conn = tokio::spawn(conn);
        let request = || {
            Request::get(format!("http://{addr}/"))
                .version(Version::HTTP_2)
                .body(Empty::<Bytes>::new())
                .unwrap()
        };
        // Two streams in flight on one connection when the drain begins.
        let first = tokio::spawn(sender.send_request(request()));
        let second = tokio::spawn(sender.send_request(request()));
        within("both requests to start", async {
            started.recv().await;
            started.recv().await;
        })
        .await;
        stop_tx.send(()).unwrap();
        drain_begun(addr).await;
        // Until the GOAWAY arrives new streams are served (the server has
        // not told the client anything yet); then a new request fails
        // before it is sent.
        let refused = within("the GOAWAY", async {
            loop {
                let quick = Request::get(format!("http://{addr}/quick"))
                    .version(Version::HTTP_2)
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                match sender.send_request(quick).await {
                    Ok(response) => assert_eq!(response.status(), StatusCode::OK),
                    Err(e) => break e,
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        let went_away = std::error::Error::source(&refused)
            .and_then(|s| s.downcast_ref::<h2::Error>())
            .is_some_and(|e| e.is_go_away() && e.is_remote());
        assert!(
            refused.is_canceled() || went_away,
            "not sent because of the GOAWAY: {refused:?}"
        );
        release.send_replace(true);
        for response in [first, second] {
            let response = within("a response", response).await.unwrap().unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(response.version(), Version::HTTP_2);
            assert!(response.headers().get(CONNECTION).is_none());
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok");
        }
        within("the connection to end", conn)
            .await
            .unwrap()
            .unwrap();
        within("serve to return", server).await.unwrap();
    }

    #[cfg(feature = "tls")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tls_handshake_in_progress_when_the_drain_begins_completes_and_is_served() {
        use crate::tls::rustls;
        use http_body_util::{BodyExt, Empty};
        use hyper::body::Bytes;

        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let config = crate::tls::server_config(
            vec![cert.cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into()),
        )
        .unwrap();
        let inner = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = inner.local_addr().unwrap();
        let (accepted_tx, mut accepted) = mpsc::unbounded_channel();
        let listener = Reporting {
            inner,
            accepted: accepted_tx,
        };
        let app = Router::new().route("/", get(|| async { "ok" }));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(Server::new(app).tls(config).serve(listener, async move {
            let _ = stop_rx.await;
        }));

        // Accepted, and the server waits in its handshake for the
        // ClientHello when the drain begins.
        let stream = TcpStream::connect(addr).await.unwrap();
        within("the accept", accepted.recv()).await;
        stop_tx.send(()).unwrap();
        drain_begun(addr).await;

        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.cert.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = within(
            "the handshake",
            tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, stream),
        )
        .await
        .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        let conn = tokio::spawn(conn);
        let request = Request::get("/")
            .header(hyper::header::HOST, "localhost")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = within("the response", sender.send_request(request))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[CONNECTION], "close");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
        within("the connection to end", conn)
            .await
            .unwrap()
            .unwrap();
        within("serve to return", server).await.unwrap();
    }
}
