//! `ticker`: a baton SDK worker with a timer. It counts a tick every
//! period (500ms, or `--period MS`) with `Worker::interval`, logs each one,
//! shows the count in `baton status`, and tells the count to whoever asks
//! on its listener `ticks`:
//!
//! - a Unix stream listener (`unix:PATH`, the default is `unix:ticker.sock`
//!   when run without baton): each line a client sends is answered with one
//!   JSON line;
//! - a UDP socket (`udp://HOST:PORT`): each datagram is answered with one.
//!
//! The answer is `{"generation": G, "pid": P, "ticks": N, "draining": D}`.
//!
//! When its generation drains, the timer stops by itself, so the count
//! stops too, and ticker stops accepting (or, on UDP, stops reading). It
//! goes on answering on the Unix connections it already has, so a client
//! can watch a drained generation's count stand still, until the client
//! hangs up or one second before the supervisor's drain deadline.
//!
//! ```sh
//! baton run --listen ticks=unix:/tmp/ticks.sock -- target/debug/ticker
//! echo | nc -U -q1 /tmp/ticks.sock
//! ```

use std::io::IsTerminal;
use std::ops::ControlFlow;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use baton_worker::{ListenerKind, Worker};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UdpSocket, UnixListener, UnixStream};
use tokio::task::JoinSet;

/// What every answer needs.
#[derive(Clone)]
struct Ticker {
    worker: Worker,
    ticks: Arc<AtomicU64>,
}

impl Ticker {
    fn answer(&self) -> String {
        let answer = serde_json::json!({
            "generation": self.worker.generation(),
            "pid": std::process::id(),
            "ticks": self.ticks.load(Ordering::SeqCst),
            "draining": self.worker.is_draining(),
        });
        format!("{answer}\n")
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("ticker: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), String> {
    let period = parse_period(std::env::args().skip(1))?;
    let worker = Worker::builder()
        .default_listener("ticks", "unix:ticker.sock")
        .start()
        .await
        .map_err(|e| e.to_string())?;
    let ticker = Ticker {
        worker: worker.clone(),
        ticks: Arc::new(AtomicU64::new(0)),
    };

    // The timer: no tick starts once this generation drains.
    let ticks = ticker.ticks.clone();
    let status = worker.clone();
    worker.interval(period, move || {
        let n = ticks.fetch_add(1, Ordering::SeqCst) + 1;
        tracing::info!("generation {} tick {n}", status.generation());
        if let Err(e) = status.status(format!("{n} ticks")) {
            tracing::warn!("{e}");
        }
        ControlFlow::Continue(())
    });
    let ticks = ticker.ticks.clone();
    worker.on_drain(move || {
        tracing::info!(
            "draining: the timer stopped after {} ticks",
            ticks.load(Ordering::SeqCst)
        );
    });

    match worker.listener_kind("ticks") {
        Some(ListenerKind::Udp) => {
            let socket = worker.udp_socket("ticks").map_err(|e| e.to_string())?;
            worker.ready().map_err(|e| e.to_string())?;
            serve_udp(socket, ticker).await;
        }
        _ => {
            let listener = worker.unix_listener("ticks").map_err(|e| e.to_string())?;
            worker.ready().map_err(|e| e.to_string())?;
            serve_unix(listener, ticker).await;
        }
    }
    tracing::info!("drained");
    Ok(())
}

fn parse_period(mut args: impl Iterator<Item = String>) -> Result<Duration, String> {
    let mut period = Duration::from_millis(500);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--period" => {
                let ms = args
                    .next()
                    .ok_or("--period needs a value in milliseconds")?;
                let ms: u64 = ms
                    .parse()
                    .map_err(|_| format!("--period {ms:?}: not a number of milliseconds"))?;
                period = Duration::from_millis(ms.max(1));
            }
            other => return Err(format!("unknown argument `{other}` (known: --period MS)")),
        }
    }
    Ok(period)
}

/// Answers each datagram until the drain; then leaves the socket to the
/// next generation.
async fn serve_udp(socket: UdpSocket, ticker: Ticker) {
    let drained = ticker.worker.drained();
    tokio::pin!(drained);
    let mut buf = [0u8; 512];
    loop {
        let peer = tokio::select! {
            biased;
            () = &mut drained => return,
            received = socket.recv_from(&mut buf) => match received {
                Ok((_, peer)) => peer,
                Err(e) => {
                    tracing::warn!("receiving on `ticks`: {e}");
                    continue;
                }
            },
        };
        if let Err(e) = socket.send_to(ticker.answer().as_bytes(), peer).await {
            tracing::warn!("answering {peer:?}: {e}");
        }
    }
}

/// Accepts until the drain, then answers on the connections it has until
/// their clients hang up, or one second before the drain deadline.
async fn serve_unix(listener: UnixListener, ticker: Ticker) {
    let mut connections = JoinSet::new();
    let drained = ticker.worker.drained();
    tokio::pin!(drained);
    loop {
        tokio::select! {
            biased;
            () = &mut drained => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, ticker.clone()));
                }
                Err(e) => tracing::warn!("accepting on `ticks`: {e}"),
            },
            // Reap finished connections as we go.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let all_closed = async { while connections.join_next().await.is_some() {} };
    match ticker.worker.drain_deadline() {
        Some(deadline) => {
            let until = deadline
                .checked_sub(Duration::from_secs(1))
                .unwrap_or(deadline);
            let _ = tokio::time::timeout_at(until.into(), all_closed).await;
        }
        None => all_closed.await,
    }
}

async fn serve_connection(stream: UnixStream, ticker: Ticker) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    loop {
        match lines.next_line().await {
            Ok(Some(_)) => {
                if write.write_all(ticker.answer().as_bytes()).await.is_err() {
                    return;
                }
            }
            Ok(None) | Err(_) => return,
        }
    }
}
