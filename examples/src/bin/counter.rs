//! `counter`: a count that survives reloads, the SDK's kept values in
//! twenty lines of handler.
//!
//! Routes (listener `http`):
//!
//! - `GET /` increments the count and answers
//!   `{"count": N, "generation": G, "pid": P}`. An increment the SDK
//!   refuses (this generation's values were already handed to the next
//!   one) answers `503` with `Retry-After: 0` and `Connection: close`, and
//!   does not count: every `200` is in the count the next generation starts
//!   with.
//! - `GET /slow/MS` waits MS milliseconds, then increments as `GET /` does
//!   (a request in flight across a hand-over, for tests).
//! - `GET /note` rewrites `note`, a kept value of 1 KiB, and `GET
//!   /ballast` rewrites the whole ballast (for benchmarks: what a freeze
//!   hands over after a pre-copy is what was written since).
//! - `GET /peek` answers the same without incrementing, plus
//!   `"checkpointed"`: the count in the last checkpoint, and `"slow"`: how
//!   many `/slow` requests have started.
//!
//! It checkpoints at least once a second while the count changes, so a
//! `kill -9` loses at most a second of increments. `--state-format N`
//! declares the state format (default 1): a generation started with 0
//! cannot read format 1 and rejects it, which fails the reload and leaves
//! the old generation serving with its count. `--ballast BYTES` also keeps
//! that many bytes of filler, to measure what a large hand-over costs.
//! `--ready-delay MS` waits that long between taking the count and saying
//! ready: the wrong order, which baton's `--freeze-timeout` guards against.
//! `--keep-delay MS` initialises that long before taking the count: the
//! right order, while the previous generation still serves.
//! `--no-pre-copy` takes every value at the freeze, inside the accept pause
//! (for benchmarks: what a hand-over costs when everything was written
//! since the pre-copy).
//!
//! ```sh
//! baton run --listen http=tcp://127.0.0.1:8080 -- target/debug/counter
//! curl localhost:8080; baton reload --wait; curl localhost:8080   # 1, then 2
//! ```

use std::io::IsTerminal;
use std::ops::ControlFlow;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use baton_worker::{Frozen, Kept, Worker};
use serde_json::{json, Value};

/// How often the count is checkpointed when it changed.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

#[derive(Clone)]
struct App {
    count: Kept<u64>,
    generation: u64,
    pid: u32,
    checkpointed: Arc<AtomicU64>,
    slow: Arc<AtomicU64>,
    note: Kept<String>,
    ballast: Kept<String>,
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
            eprintln!("counter: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--state-format N`, `--ballast BYTES`, `--ready-delay MS`,
/// `--keep-delay MS`; `--no-pre-copy` is read by `run`.
fn options() -> Result<(u32, usize, u64, u64), String> {
    let mut args = std::env::args().skip(1).filter(|a| a != "--no-pre-copy");
    let (mut format, mut ballast, mut delay, mut keep_delay) = (1, 0, 0, 0);
    while let Some(arg) = args.next() {
        let mut number = |flag: &str| -> Result<u64, String> {
            let value = args.next().ok_or(format!("{flag} needs a number"))?;
            value
                .parse()
                .map_err(|_| format!("{flag} {value:?} is not a number"))
        };
        match arg.as_str() {
            "--state-format" => {
                format = u32::try_from(number("--state-format")?)
                    .map_err(|_| "--state-format is too large".to_owned())?;
            }
            "--ballast" => {
                ballast = usize::try_from(number("--ballast")?)
                    .map_err(|_| "--ballast is too large".to_owned())?;
            }
            "--ready-delay" => delay = number("--ready-delay")?,
            "--keep-delay" => keep_delay = number("--keep-delay")?,
            other => {
                return Err(format!(
                    "unknown argument {other:?} (known: --state-format N, --ballast BYTES, \
                     --ready-delay MS, --keep-delay MS)"
                ))
            }
        }
    }
    Ok((format, ballast, delay, keep_delay))
}

async fn run() -> Result<(), String> {
    let (format, ballast, ready_delay, keep_delay) = options()?;
    let worker = Worker::builder()
        .default_listener("http", "tcp://127.0.0.1:3000")
        .state_format(format)
        .pre_copy(!std::env::args().any(|a| a == "--no-pre-copy"))
        .start()
        .await
        .map_err(|e| e.to_string())?;
    let listener = worker.tcp_listener("http").map_err(|e| e.to_string())?;
    // Slow initialisation (tests: `--keep-delay`), while the previous
    // generation still serves.
    tokio::time::sleep(Duration::from_millis(keep_delay)).await;
    // Everything slow is done: take the count (this freezes the previous
    // generation), then say ready.
    let count = worker
        .keep("count", || 0u64)
        .await
        .map_err(|e| e.to_string())?;
    let filler = worker
        .keep("ballast", || "x".repeat(ballast))
        .await
        .map_err(|e| e.to_string())?;
    let note = worker
        .keep("note", || "a".repeat(1024))
        .await
        .map_err(|e| e.to_string())?;
    if filler.read(String::len) != ballast {
        filler.set("x".repeat(ballast)).map_err(|e| e.to_string())?;
    }
    let app = App {
        count: count.clone(),
        generation: worker.generation(),
        pid: std::process::id(),
        checkpointed: Arc::new(AtomicU64::new(count.get())),
        slow: Arc::new(AtomicU64::new(0)),
        note,
        ballast: filler,
    };
    let checkpointer = worker.clone();
    let checkpointed = app.checkpointed.clone();
    worker.interval(CHECKPOINT_EVERY, move || {
        let now = count.get();
        if now != checkpointed.load(Ordering::SeqCst) {
            match checkpointer.checkpoint() {
                Ok(()) => checkpointed.store(now, Ordering::SeqCst),
                Err(e) => tracing::warn!("checkpoint: {e}"),
            }
        }
        ControlFlow::Continue(())
    });
    tracing::info!(
        "generation {} starts at count {}",
        app.generation,
        app.count.get()
    );
    let router = Router::new()
        .route("/", get(increment))
        .route("/slow/{ms}", get(slow))
        .route("/note", get(rewrite_note))
        .route("/ballast", get(rewrite_ballast))
        .route("/peek", get(peek))
        .with_state(app);
    tokio::select! {
        () = tokio::time::sleep(Duration::from_millis(ready_delay)) => {}
        // Failed before it was ready (say, at baton's --freeze-timeout).
        () = worker.drained() => return Err("stopped before it was ready".into()),
    }
    worker.ready().map_err(|e| e.to_string())?;
    baton_worker::http::serve_worker(&worker, listener, router).await;
    if worker.writes_refused() > 0 {
        tracing::warn!(
            "{} increments were refused (answered 503): they came after the hand-over",
            worker.writes_refused()
        );
    }
    Ok(())
}

async fn increment(State(app): State<App>) -> Result<Json<Value>, Frozen> {
    let count = app.count.update(|n| {
        *n += 1;
        *n
    })?;
    Ok(Json(json!({
        "count": count,
        "generation": app.generation,
        "pid": app.pid,
    })))
}

async fn slow(State(app): State<App>, Path(ms): Path<u64>) -> Result<Json<Value>, Frozen> {
    app.slow.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    increment(State(app)).await
}

/// Rewrites `value` whole with the other of two letters.
fn rewrite(value: &Kept<String>) -> Result<Json<Value>, Frozen> {
    let bytes = value.update(|s| {
        let next = if s.starts_with('a') { "b" } else { "a" };
        *s = next.repeat(s.len());
        s.len()
    })?;
    Ok(Json(json!({ "rewrote": value.name(), "bytes": bytes })))
}

async fn rewrite_note(State(app): State<App>) -> Result<Json<Value>, Frozen> {
    rewrite(&app.note)
}

async fn rewrite_ballast(State(app): State<App>) -> Result<Json<Value>, Frozen> {
    rewrite(&app.ballast)
}

async fn peek(State(app): State<App>) -> Json<Value> {
    Json(json!({
        "count": app.count.get(),
        "generation": app.generation,
        "pid": app.pid,
        "checkpointed": app.checkpointed.load(Ordering::SeqCst),
        "slow": app.slow.load(Ordering::SeqCst),
    }))
}
