//! `hello`: the smallest baton SDK worker, an axum server that takes its
//! listener by name, says when it is ready, and drains exactly.
//!
//! Routes: `GET /` and `GET /slow?ms=N` (after N ms) answer
//! `{"generation": G, "pid": P}`. The listener is named `http`; without
//! baton it binds `BATON_LISTEN`'s `http`, else 127.0.0.1:3000, and
//! reports generation 0. It speaks HTTP/1.1 and HTTP/2 (h2c, by prior
//! knowledge) on the same listener; with `--tls CERT KEY` (PEM files, read
//! at each start) it serves HTTPS instead, HTTP/2 or HTTP/1.1 by ALPN.
//!
//! ```sh
//! cargo run --bin hello                                   # standalone
//! baton run --listen http=tcp://127.0.0.1:8080 -- target/debug/hello
//! baton run --listen http=tcp://127.0.0.1:8443 -- target/debug/hello --tls cert.pem key.pem
//! ```
//!
//! It serves with `baton_worker::http::Server`, which finishes every request
//! a generation has started (and answers connections it accepted but had
//! not read yet) before the process exits.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use baton_worker::Worker;
use serde::Deserialize;

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
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hello: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Reads `--tls CERT KEY`, the only arguments.
fn tls_paths() -> Result<Option<(String, String)>, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => Ok(None),
        [flag, cert, key] if flag == "--tls" => Ok(Some((cert.clone(), key.clone()))),
        _ => Err(format!("usage: hello [--tls CERT KEY], not {args:?}")),
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let tls = tls_paths()?;
    let worker = Worker::builder()
        .default_listener("http", "tcp://127.0.0.1:3000")
        .start()
        .await?;
    let listener = worker.tcp_listener("http")?;
    let served = Served {
        generation: worker.generation(),
        pid: std::process::id(),
    };
    let app = Router::new()
        .route("/", get(root))
        .route("/slow", get(slow))
        .with_state(served);
    let mut server = baton_worker::http::Server::new(app);
    let scheme = match &tls {
        // Read at every start: a reload picks up renewed files.
        Some((cert, key)) => {
            server = server.tls(baton_worker::tls::load(cert, key)?);
            "https"
        }
        None => "http",
    };

    let addr = listener
        .local_addr()
        .map_or_else(|e| format!("an unknown address ({e})"), |a| a.to_string());
    tracing::info!(
        "generation {} (pid {}) serving {scheme} on {addr}{}",
        served.generation,
        served.pid,
        if worker.is_reload() {
            " (a reload)"
        } else {
            ""
        }
    );
    worker.on_drain(|| tracing::info!("draining: finishing the requests in flight"));
    worker.status(format!("serving {scheme} on {addr}"))?;
    worker.ready()?;

    server.serve(listener, worker.drained()).await;
    tracing::info!("drained");
    Ok(())
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
