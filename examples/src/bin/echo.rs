//! `echo`: a line protocol of its own on the SDK's protocol-agnostic
//! building block, `baton_worker::serve_worker_connections`, with
//! long-lived connections that the server ends at a message boundary when
//! its generation drains (or freezes).
//!
//! The protocol: the client sends a line, the server answers
//! `G LINE` (G is its generation), one answer per line, in order. When the
//! drain begins the server finishes the answer it is writing, sends `bye`
//! instead of any further answer, shuts down its sending side and reads
//! until the client hangs up (so nothing it had not read turns into a
//! reset). A line the client sent that got `bye` instead of an answer was
//! not processed: the client sends it again on a new connection, which the
//! next generation accepts. This is the GOAWAY of HTTP/2 in one word.
//!
//! The listener is named `echo`, TCP or a Unix stream socket; without
//! baton it binds `BATON_LISTEN`'s `echo`, else 127.0.0.1:4000.
//!
//! ```sh
//! baton run --listen echo=tcp://127.0.0.1:4000 -- target/debug/echo
//! nc 127.0.0.1 4000
//! ```

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use baton_worker::{Drain, ListenerKind, Worker};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

/// The longest line answered; a longer one ends the connection.
const MAX_LINE: u64 = 64 * 1024;

/// How long, after `bye`, the client may take to hang up.
const LINGER: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("echo: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), baton_worker::Error> {
    let worker = Worker::builder()
        .default_listener("echo", "tcp://127.0.0.1:4000")
        .start()
        .await?;
    let generation = worker.generation();
    tracing::info!(
        "generation {generation} (pid {}) echoing",
        std::process::id()
    );
    worker.status("echoing")?;
    if worker.listener_kind("echo") == Some(ListenerKind::Unix) {
        let listener = worker.unix_listener("echo")?;
        worker.ready()?;
        baton_worker::serve_worker_connections(&worker, listener, move |stream, drain| {
            echo(stream, drain, generation)
        })
        .await;
    } else {
        let listener = worker.tcp_listener("echo")?;
        worker.ready()?;
        baton_worker::serve_worker_connections(&worker, listener, move |stream, drain| {
            echo(stream, drain, generation)
        })
        .await;
    }
    tracing::info!("drained");
    Ok(())
}

/// Serves one connection until the client hangs up or the drain begins.
async fn echo<S>(stream: S, drain: Drain, generation: u64)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (read, mut write) = tokio::io::split(stream);
    let mut read = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        // Reading is where a connection waits, so it is where the drain
        // may end it: never while an answer is being written.
        let read_line = async {
            (&mut read)
                .take(MAX_LINE)
                .read_until(b'\n', &mut line)
                .await
        };
        let done = tokio::select! {
            biased;
            () = drain.wait() => break,
            done = read_line => done,
        };
        match done {
            Ok(n) if n > 0 && line.ends_with(b"\n") => {}
            // The client hung up (or sent a line too long, or half a line
            // and hung up).
            _ => return,
        }
        let mut answer = format!("{generation} ").into_bytes();
        answer.extend_from_slice(&line);
        if write.write_all(&answer).await.is_err() {
            return;
        }
    }
    // Draining: say so at this boundary, then let the client close first.
    // A line it sent meanwhile (even one read in part above) gets no
    // answer: `bye` told it that line was not processed.
    if write.write_all(b"bye\n").await.is_err() || write.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(LINGER, async {
        while matches!(read.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}
