//! `baton-worker`: the worker side of baton, a supervisor for zero-downtime
//! reloads.
//!
//! baton holds your server's listening sockets for its whole life and, on a
//! reload, starts a new *generation* of your server on the very same
//! sockets, waits until it is *ready*, and only then tells the old one to
//! *drain*. Any server that takes its socket the systemd way works under
//! baton unchanged; linking this crate makes readiness and drain exact:
//!
//! - the listeners arrive by name over the worker channel and are checked
//!   (family, type, listening) before you see them;
//! - [`Worker::ready`] says "serve from now on" at the exact moment you
//!   choose, not after a guessed delay;
//! - [`Worker::drained`] resolves when *this* generation must stop (the
//!   supervisor's message, not a signal shared with anything else), with its
//!   deadline; `http::serve` drains axum without losing a request, over
//!   HTTP/1.1, HTTP/2 and TLS, and [`serve_connections`] drains any other
//!   protocol over TCP or Unix streams;
//! - the same binary runs without baton (`cargo run`), binding its own
//!   listeners.
//!
//! # Five-minute tutorial
//!
//! **1. Depend on it.** With axum, enable the `axum` feature for
//! `http::serve`:
//!
//! ```toml
//! [dependencies]
//! baton-worker = { version = "0.1", features = ["axum"] }
//! tokio = { version = "1", features = ["full"] }
//! axum = "0.8"
//! ```
//!
//! **2. Start the worker, take a listener, say ready, serve until drained.**
//!
//! ```no_run
//! # #[cfg(feature = "axum")]
//! # mod example {
//! use axum::{routing::get, Router};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), baton_worker::Error> {
//!     // Under baton: greets the supervisor and receives its listeners.
//!     // Without baton: binds BATON_LISTEN, or this default.
//!     let worker = baton_worker::Worker::builder()
//!         .default_listener("http", "tcp://127.0.0.1:3000")
//!         .start()
//!         .await?;
//!     let listener = worker.tcp_listener("http")?;
//!     let generation = worker.generation();
//!     let app = Router::new().route("/", get(move || async move {
//!         format!("hello from generation {generation}\n")
//!     }));
//!     // Everything a request needs is in place: the old generation may go.
//!     worker.ready()?;
//!     // Serves until this generation is told to drain, then finishes
//!     // every request it has and returns.
//!     baton_worker::http::serve(listener, app, worker.drained()).await;
//!     Ok(())
//! }
//! # }
//! # fn main() {}
//! ```
//!
//! **3. Run it alone.** `cargo run` serves on 127.0.0.1:3000 (generation
//! 0, [`Worker::is_supervised`] is false). `BATON_LISTEN` overrides or adds
//! listeners, in the syntax of `baton run --listen`:
//!
//! ```sh
//! BATON_LISTEN=http=tcp://127.0.0.1:8080,admin=unix:/tmp/admin.sock cargo run
//! ```
//!
//! Ctrl-C (or `SIGTERM`) drains it like a reload would; a second one exits
//! at once.
//!
//! **4. Run it under baton and reload it while it serves.**
//!
//! ```sh
//! baton run --listen http=tcp://127.0.0.1:8080 -- target/debug/my-server
//! curl localhost:8080            # hello from generation 1
//! baton reload --wait            # generation 2 is serving
//! curl localhost:8080            # hello from generation 2
//! ```
//!
//! Generation 2 starts beside generation 1 on the same socket; generation 1
//! is told to drain only after generation 2 called `ready()`, and finishes
//! its requests in flight (even slow ones) before it exits. `baton status`
//! shows `"sdk": true` for both.
//!
//! **5. Do more when draining.** [`Worker::on_drain`] runs a hook when the
//! drain begins; [`Worker::interval`] is a timer that stops by itself then;
//! [`Worker::drain_deadline`] says when the supervisor will kill the
//! process; [`Worker::status`] sets the line `baton status` shows;
//! [`Worker::is_reload`] tells a first start from a reload.
//!
//! ```
//! use std::ops::ControlFlow;
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), baton_worker::Error> {
//! let worker = baton_worker::start().await?;
//! if worker.is_reload() {
//!     eprintln!("taking over from generation {}", worker.generation() - 1);
//! }
//! worker.on_drain(|| eprintln!("draining"));
//! let status = worker.clone();
//! let mut flushed = 0;
//! worker.interval(Duration::from_secs(1), move || {
//!     flushed += 1; // flush a buffer, refresh a cache, ...
//!     let _ = status.status(format!("{flushed} flushes"));
//!     ControlFlow::Continue(())
//! });
//! # Ok(()) }
//! ```
//!
//! **6. Keep state across reloads.** [`Worker::keep`] returns the value
//! the previous generation kept under a name (or `init()` on a first start):
//! the old generation is frozen for the hand-over (it stops accepting, its
//! requests in flight finish), writes its kept values into a sealed memfd
//! that baton passes on unread, and this generation reads them in place.
//! Call it after slow initialisation, just before `ready()`, and serve with
//! `http::serve_worker`, which pauses accepting while frozen.
//! [`Kept::update`] reports a write that lands after the freeze (it will
//! not reach the next generation); [`Worker::checkpoint`] hands the values
//! to baton between reloads so a crash restart resumes from them;
//! [`Builder::state_format`] and [`Builder::migrate_state`] version them,
//! and a snapshot this program cannot read is rejected, which fails the
//! reload while the old generation thaws and serves on.
//!
//! ```no_run
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), baton_worker::Error> {
//! let worker = baton_worker::start().await?;
//! let sessions = worker
//!     .keep("sessions", std::collections::HashMap::<String, u64>::new)
//!     .await?;
//! worker.ready()?;
//! sessions.update(|s| *s.entry("alice".into()).or_default() += 1);
//! # Ok(()) }
//! ```
//!
//! # Every protocol drains exactly
//!
//! A drain (or a freeze for a hand-over) ends each connection where its
//! protocol allows, never in the middle of a message, and a client is never
//! left with a request that was neither answered nor refused in a way it
//! may retry.
//!
//! **HTTP/1.1 and HTTP/2 on one listener** (feature `axum`):
//! `http::serve` and `http::serve_worker` detect the protocol per
//! connection. HTTP/1.1 responses finished while draining say
//! `Connection: close`; an HTTP/2 connection gets a GOAWAY (in hyper's two
//! steps, so a request already on its way is still served) and its open
//! streams finish. Clients speak HTTP/2 in cleartext by prior knowledge
//! (h2c), as gRPC and service meshes do.
//!
//! **HTTPS** (features `axum` and `tls`: rustls through tokio-rustls, the
//! `ring` provider, no OpenSSL). ALPN offers `h2` and `http/1.1`. The
//! handshake runs on the connection's own task: one in progress when the
//! drain begins completes, and its requests are served. A new generation
//! reads the files again, so renewing a certificate is a `baton reload`.
//!
//! ```no_run
//! # #[cfg(all(feature = "axum", feature = "tls"))]
//! # async fn doc(worker: baton_worker::Worker, app: axum::Router) -> Result<(), baton_worker::Error> {
//! let tls = baton_worker::tls::load("cert.pem", "key.pem")?;
//! let listener = worker.tcp_listener("https")?;
//! worker.ready()?;
//! baton_worker::http::Server::new(app).tls(tls).serve_worker(&worker, listener).await;
//! # Ok(()) }
//! ```
//!
//! **gRPC with tonic**: tonic's routes are an axum `Router`, served like
//! any other; a drain sends GOAWAY, so clients start new calls on the next
//! generation while long streaming calls finish on this one.
//!
//! ```ignore
//! let app = tonic::service::Routes::new(GreeterServer::new(MyGreeter)).into_axum_router();
//! baton_worker::http::serve_worker(&worker, listener, app).await;
//! ```
//!
//! **Anything else over TCP or Unix streams**: [`serve_worker_connections`]
//! accepts until the drain or a freeze, hands each connection to your
//! handler with a [`Drain`], and waits for the handlers up to the drain
//! deadline. The handler ends its connection at a message boundary once
//! [`Drain::wait`] resolves (with TLS: `tls::accept` in the
//! handler).
//!
//! ```no_run
//! use tokio::io::AsyncWriteExt;
//!
//! # async fn doc(worker: baton_worker::Worker) -> Result<(), baton_worker::Error> {
//! let listener = worker.tcp_listener("push")?;
//! worker.ready()?;
//! baton_worker::serve_worker_connections(&worker, listener, |mut stream: tokio::net::TcpStream, drain: baton_worker::Drain| async move {
//!     let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
//!     loop {
//!         tokio::select! {
//!             () = drain.wait() => break,
//!             _ = tick.tick() => {
//!                 if stream.write_all(b"tick\n").await.is_err() { return; }
//!             }
//!         }
//!     }
//!     let _ = stream.write_all(b"bye\n").await; // a boundary the client understands
//! })
//! .await;
//! # Ok(()) }
//! ```
//!
//! The examples show each in full: `hello` (HTTP/1.1, h2c, `--tls`),
//! `greeter` (tonic, unary and streaming), `echo` (a line protocol on the
//! raw building block).
//!
//! # When a worker drains
//!
//! | event | standalone | under baton |
//! | --- | --- | --- |
//! | the supervisor's `drain` message | — | drain, with a deadline ([`DrainCause::Supervisor`]) |
//! | the worker channel closes | — | drain ([`DrainCause::ChannelClosed`]) |
//! | first `SIGTERM` or `SIGINT` | drain ([`DrainCause::Signal`]) | drain (baton signals only a worker whose channel failed) |
//! | second `SIGTERM` or `SIGINT` | exit at once, status 128 + signal | the same |
//!
//! [`Builder::handle_signals`]`(false)` leaves both signals to the program.
//! A worker that ignores the drain is killed at the deadline.
//!
//! # Descriptors
//!
//! Under baton, [`start`] takes ownership of the worker channel
//! (`BATON_CHANNEL_FD`, made close-on-exec) and of the listener copies the
//! supervisor also placed at fds `3..3+LISTEN_FDS` for plain workers: once
//! the same sockets have arrived over the channel, it closes those copies
//! (only descriptors that are provably the same sockets), so each listener
//! is open once in the worker. Do not take fd 3.. with another library as
//! well. The environment is left as it is.
//!
//! **`O_NONBLOCK` is shared.** A listener is one kernel socket held by the
//! supervisor and every generation, and the non-blocking flag belongs to
//! the socket, not to a descriptor. tokio needs it set, so taking a
//! listener sets it (for the std variants too, so every SDK worker sees the
//! same flag). This is what every listenfd-style server does; baton never
//! accepts on a listener, and this crate never clears the flag.
//!
//! # The crate
//!
//! * [`Worker`] / [`Builder`] / [`start`]: the handle, its listeners,
//!   readiness, status and drain.
//! * [`connections`]: [`serve_connections`] and
//!   [`serve_worker_connections`], the protocol-agnostic drain over TCP or
//!   Unix streams, and the [`Drain`] each connection's handler gets.
//! * `http` (feature `axum`): `http::serve` and `http::Server`, a
//!   drain-exact HTTP/1.1 and HTTP/2 server for an axum `Router` (tonic's
//!   gRPC routes included), built on `connections`.
//! * `tls` (feature `tls`): loading a certificate and key into a rustls
//!   configuration with ALPN, and a handshake with a deadline.
//! * [`protocol`]: the versioned messages on the worker channel and their
//!   framing; the supervisor links this crate for the very same types.
//! * [`Error`]: every failure, each message naming what and which.
//!
//! This crate never forks, execs or signals a process.

#![deny(missing_docs)]

mod channel;
pub mod connections;
mod drain;
mod error;
#[cfg(feature = "axum")]
pub mod http;
#[cfg(feature = "axum")]
mod linger;
pub mod listen;
mod listeners;
pub mod protocol;
mod state;
mod sys;
#[cfg(feature = "tls")]
pub mod tls;
mod worker;

pub use connections::{serve_connections, serve_worker_connections, Drain};
pub use drain::DrainCause;
pub use error::{Error, KindName};
pub use listen::LISTEN_ENV;
pub use protocol::{ListenerInfo, ListenerKind};
pub use state::{Frozen, Kept};
pub use worker::{start, Builder, Worker};
