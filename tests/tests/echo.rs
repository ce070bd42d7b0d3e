//! The protocol-agnostic building block under the real `baton`: the `echo`
//! example (a line protocol on `serve_worker_connections`) reloaded thirty
//! times under load on long-lived connections. Every line is counted in one
//! bin of the load report: answered (`ok`), or answered `bye` instead,
//! which means "not processed, ask the next generation" (`retried`, and
//! sent again on a new connection). A connection that ends without `bye`,
//! a wrong answer, or a line never answered is a failure; so the test also
//! proves that every connection was ended by the server at a message
//! boundary.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_tests::harness::{bin, Baton};
use baton_tests::load::{Bin, Detail, LoadReport};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const RELOADS: u64 = 30;
const CONNECTIONS: usize = 8;
/// Per line, a retry on a new connection included.
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Shared {
    stopping: AtomicBool,
    report: Mutex<LoadReport>,
    /// Connections the server ended with `bye`.
    byes: AtomicU64,
}

impl Shared {
    fn record(&self, bin: Bin, result: Result<u64, String>, started: Instant, at: Instant) {
        let mut report = self.report.lock().expect("report lock");
        report.counts.add(bin);
        let elapsed = started.elapsed();
        match result {
            Ok(generation) => {
                report.latencies.push(elapsed);
                *report.generations.entry(generation).or_insert(0) += 1;
            }
            Err(message) => report.failures.push(Detail {
                bin,
                message,
                elapsed,
                at: at.elapsed(),
            }),
        }
    }

    fn ok(&self) -> u64 {
        self.report.lock().expect("report lock").counts.ok
    }
}

/// What the server said to one line.
enum Answer {
    Echo(u64),
    Bye,
}

async fn connect(addr: SocketAddr) -> Result<BufReader<TcpStream>, String> {
    TcpStream::connect(addr)
        .await
        .map(BufReader::new)
        .map_err(|e| format!("connecting: {e}"))
}

/// Sends `line` and reads the answer.
async fn exchange(conn: &mut BufReader<TcpStream>, line: &str) -> Result<Answer, (Bin, String)> {
    conn.get_mut()
        .write_all(format!("{line}\n").as_bytes())
        .await
        .map_err(|e| (Bin::Reset, format!("writing {line:?}: {e}")))?;
    let mut answer = String::new();
    match conn.read_line(&mut answer).await {
        Ok(0) => Err((Bin::Reset, format!("{line:?}: closed without bye"))),
        Err(e) => Err((Bin::Reset, format!("{line:?}: reading: {e}"))),
        Ok(_) if answer == "bye\n" => Ok(Answer::Bye),
        Ok(_) => {
            let parsed = answer
                .strip_suffix('\n')
                .and_then(|a| a.split_once(' '))
                .filter(|(_, echoed)| *echoed == line)
                .and_then(|(generation, _)| generation.parse().ok());
            parsed
                .map(Answer::Echo)
                .ok_or_else(|| (Bin::Malformed, format!("{line:?} answered {answer:?}")))
        }
    }
}

/// One long-lived connection after another, a line at a time.
async fn client(addr: SocketAddr, index: usize, shared: Arc<Shared>, at: Instant) {
    let mut conn: Option<BufReader<TcpStream>> = None;
    let mut n = 0u64;
    while !shared.stopping.load(Ordering::Relaxed) {
        n += 1;
        let line = format!("client {index} line {n}");
        let started = Instant::now();
        let mut retried = false;
        let outcome = tokio::time::timeout(TIMEOUT, async {
            loop {
                let mut current = match conn.take() {
                    Some(c) => c,
                    None => connect(addr).await.map_err(|e| (Bin::Refused, e))?,
                };
                match exchange(&mut current, &line).await? {
                    Answer::Echo(generation) => {
                        conn = Some(current);
                        return Ok(generation);
                    }
                    // Not processed: again, on a new connection. The
                    // server closes this one once we hang up.
                    Answer::Bye if !retried => {
                        retried = true;
                        shared.byes.fetch_add(1, Ordering::Relaxed);
                        shared.report.lock().expect("report lock").counts.retried += 1;
                    }
                    Answer::Bye => {
                        return Err((Bin::Reset, format!("{line:?}: bye twice in a row")))
                    }
                }
            }
        })
        .await;
        match outcome {
            Ok(Ok(generation)) => shared.record(Bin::Ok, Ok(generation), started, at),
            Ok(Err((bin, message))) => shared.record(bin, Err(message), started, at),
            Err(_) => {
                conn = None;
                shared.record(
                    Bin::Timeout,
                    Err(format!("{line:?}: no answer")),
                    started,
                    at,
                )
            }
        }
    }
}

#[test]
fn thirty_reloads_of_an_echo_server_end_long_connections_at_a_message_boundary() {
    let baton = Baton::builder()
        .args(["--listen", "echo=tcp://127.0.0.1:0"])
        .args(["--drain-timeout", "60s"])
        .worker([bin("echo")])
        .start();
    let addr: SocketAddr = baton.address("echo").parse().expect("a TCP address");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let shared = Arc::new(Shared::default());
    let at = Instant::now();
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|i| runtime.spawn(client(addr, i, shared.clone(), at)))
        .collect();
    let wait_ok = |n: u64| {
        let target = shared.ok() + n;
        baton_tests::harness::wait_for("answered lines", Duration::from_secs(30), || {
            (shared.ok() >= target).then_some(())
        });
    };
    wait_ok(50);
    for i in 1..=RELOADS {
        assert_eq!(baton.reload_ok(), 1 + i);
        wait_ok(20);
    }
    shared.stopping.store(true, Ordering::Relaxed);
    for task in tasks {
        runtime.block_on(task).expect("a client task");
    }
    let mut report = shared.report.lock().expect("report lock").clone();
    report.elapsed = at.elapsed();
    eprintln!("{report}");
    report.assert_no_failures();
    let byes = shared.byes.load(Ordering::Relaxed);
    // Each reload ends the old generation's connections with `bye`: every
    // client whose connection the old generation held.
    assert!(
        byes >= RELOADS,
        "{byes} connections ended with bye in {RELOADS} reloads"
    );
    let served = report.generations.len() as u64;
    assert!(served > RELOADS / 2, "only {served} generations: {report}");
    // Long-lived: many lines per connection.
    let per_connection = report.counts.ok / (byes + CONNECTIONS as u64);
    assert!(
        per_connection >= 5,
        "{per_connection} lines per connection: {report}"
    );
    // Every old generation exited by itself, long before its deadline.
    baton.wait_settled();
    let log = baton.log();
    assert!(
        !log.contains("killing it"),
        "a drain deadline passed:\n{log}"
    );
}
