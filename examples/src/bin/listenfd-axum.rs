//! `listenfd-axum`: an ordinary axum server that knows nothing about baton.
//! It takes its listener with `listenfd` (systemd socket activation, fd 3,
//! else 127.0.0.1:3000), says `READY=1` with `sd-notify`, and drains on
//! SIGTERM or ctrl-c. It is the plain worker the integration tests reload;
//! it never links baton and never reads baton's worker channel.
//!
//! Routes: `GET /` and `GET /slow?ms=N` (after N ms) answer
//! `{"generation": G, "pid": P}`, G from `BATON_GENERATION` (0 if unset).
//!
//! # Draining
//!
//! By default it serves with its own accept loop ([`serve_draining`]) rather
//! than `axum::serve(..).with_graceful_shutdown(..)`, which on shutdown
//! closes connections it has accepted but not yet read a request from: the
//! clients of those see a fresh connection closed or reset before any
//! response, the one failure a reload must never cause. `--axum-serve`
//! serves with stock `axum::serve` instead, to show that race.

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use hyper::service::{service_fn, Service};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// While draining, how long a connection that has sent no request yet may
/// take to send its first one before it is closed.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(5);

#[derive(Clone, Copy)]
struct Served {
    generation: u64,
    pid: u32,
}

#[derive(Deserialize)]
struct SlowParams {
    ms: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("listenfd-axum: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), String> {
    let mut axum_serve = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--axum-serve" => axum_serve = true,
            other => return Err(format!("unknown argument `{other}` (known: --axum-serve)")),
        }
    }
    let generation = match std::env::var("BATON_GENERATION") {
        Ok(text) => text
            .parse::<u64>()
            .map_err(|e| format!("parsing BATON_GENERATION `{text}`: {e}"))?,
        Err(_) => 0,
    };
    let served = Served {
        generation,
        pid: std::process::id(),
    };

    let listener = match listenfd::ListenFd::from_env()
        .take_tcp_listener(0)
        .map_err(|e| format!("taking listener fd 3 from LISTEN_FDS: {e}"))?
    {
        Some(listener) => listener,
        None => {
            let addr = SocketAddr::from(([127, 0, 0, 1], 3000));
            std::net::TcpListener::bind(addr).map_err(|e| format!("binding {addr}: {e}"))?
        }
    };
    // tokio needs a non-blocking socket. This sets O_NONBLOCK on the open file
    // description, which every holder of a shared listener sees; every
    // listenfd app does it, and baton copes.
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("making the listener non-blocking: {e}"))?;
    let listener = TcpListener::from_std(listener)
        .map_err(|e| format!("registering the listener with tokio: {e}"))?;

    let mut terminate =
        signal(SignalKind::terminate()).map_err(|e| format!("handling SIGTERM: {e}"))?;
    let mut interrupt =
        signal(SignalKind::interrupt()).map_err(|e| format!("handling SIGINT: {e}"))?;
    let shutdown = async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    };

    let app = Router::new()
        .route("/", get(root))
        .route("/slow", get(slow))
        .with_state(served);

    // Without NOTIFY_SOCKET this does nothing and returns Ok.
    sd_notify::notify(&[sd_notify::NotifyState::Ready])
        .map_err(|e| format!("sending READY=1 to NOTIFY_SOCKET: {e}"))?;

    if axum_serve {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|e| format!("serving: {e}"))
    } else {
        serve_draining(listener, app, shutdown).await;
        Ok(())
    }
}

/// Serves HTTP/1.1 until `shutdown` resolves, then drains: stops accepting,
/// closes idle keep-alive connections at once, lets requests in flight
/// finish (their responses say `Connection: close`), answers the first
/// request of connections accepted but not yet read from (waiting up to
/// [`FIRST_REQUEST_GRACE`] for it), and returns when every connection is
/// closed.
///
/// hyper's `graceful_shutdown` closes a connection at once when it has read
/// nothing from it yet (and hyper-util's auto-detecting connection, which
/// `axum::serve` uses, does the same until it has read the first bytes).
/// A request already sent by the client is then lost and the connection
/// reset. So each connection here calls `graceful_shutdown` only once it has
/// seen its first request.
async fn serve_draining(listener: TcpListener, app: Router, shutdown: impl Future<Output = ()>) {
    // Sent once when draining starts; every connection task holds a
    // receiver, so `closed()` on the sender resolves when the last is gone.
    let (drain_tx, drain_rx) = watch::channel(());
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Per-connection errors (ECONNABORTED) and running out
                    // of fds (EMFILE): neither is fatal to the listener.
                    eprintln!("listenfd-axum: accepting a connection: {e}");
                    if !matches!(e.kind(), std::io::ErrorKind::ConnectionAborted) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    continue;
                }
            },
        };
        tokio::spawn(serve_connection(stream, app.clone(), drain_rx.clone()));
    }
    drop(listener);
    drop(drain_rx);
    drain_tx.send_replace(());
    drain_tx.closed().await;
}

/// Serves one connection; see [`serve_draining`] for how it drains.
async fn serve_connection(stream: TcpStream, app: Router, mut drain: watch::Receiver<()>) {
    // Set by the service when the connection's first request has arrived.
    let (seen_tx, mut seen_rx) = watch::channel(false);
    let inner = TowerToHyperService::new(app);
    let service = service_fn(move |request| {
        seen_tx.send_replace(true);
        inner.call(request)
    });
    let conn =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        biased;
        result = conn.as_mut() => return report(result),
        _ = drain.changed() => {}
    }
    tokio::select! {
        biased;
        result = conn.as_mut() => return report(result),
        _ = tokio::time::timeout(FIRST_REQUEST_GRACE, seen_rx.wait_for(|seen| *seen)) => {}
    }
    // Idle: closes now. Busy: finishes the response, then closes.
    conn.as_mut().graceful_shutdown();
    report(conn.await);
}

fn report(result: Result<(), hyper::Error>) {
    // A client going away mid-request is its business, not a server error;
    // print the rest for whoever reads the worker's stderr.
    if let Err(e) = result {
        if !e.is_incomplete_message() {
            eprintln!("listenfd-axum: serving a connection: {e}");
        }
    }
}

async fn root(State(served): State<Served>) -> Json<serde_json::Value> {
    reply(served)
}

async fn slow(
    State(served): State<Served>,
    Query(params): Query<SlowParams>,
) -> Json<serde_json::Value> {
    tokio::time::sleep(Duration::from_millis(params.ms)).await;
    reply(served)
}

fn reply(served: Served) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "generation": served.generation, "pid": served.pid }))
}
