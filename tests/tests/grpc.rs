//! gRPC through the SDK: the `greeter` example (tonic, served by
//! `baton_worker::http::Server` over h2c) under the real `baton`, reloaded
//! thirty times while tonic clients make unary calls and long
//! server-streaming calls that span several reloads. Every call is counted
//! in one bin: a call that never left the client is retried (as often as it
//! takes, within the call's timeout), one the server's GOAWAY or
//! `REFUSED_STREAM` said it did not process is retried once, as gRPC's
//! transparent retry does; anything else that is not a complete, OK call
//! fails the test. A
//! streaming call must get every message, all from the one generation that
//! started it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_tests::harness::{bin, wait_for, Baton};
use baton_tests::load::{Bin, Detail, LoadReport};
use tonic::codec::ProstCodec;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};

const RELOADS: u64 = 30;
/// Messages per streaming call, one every `STREAM_INTERVAL`: a call lasts
/// about 0.6 s, several reloads.
const STREAM_COUNT: u32 = 10;
const STREAM_INTERVAL: Duration = Duration::from_millis(60);
const TIMEOUT: Duration = Duration::from_secs(15);

/// `greeter.HelloRequest`, as the example writes it.
#[derive(Clone, PartialEq, prost::Message)]
struct HelloRequest {
    #[prost(string, tag = "1")]
    name: String,
}

/// `greeter.StreamRequest`.
#[derive(Clone, PartialEq, prost::Message)]
struct StreamRequest {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(uint32, tag = "2")]
    count: u32,
    #[prost(uint64, tag = "3")]
    interval_ms: u64,
}

/// `greeter.HelloReply`.
#[derive(Clone, PartialEq, prost::Message)]
struct HelloReply {
    #[prost(string, tag = "1")]
    message: String,
    #[prost(uint64, tag = "2")]
    generation: u64,
    #[prost(uint32, tag = "3")]
    pid: u32,
}

#[derive(Default)]
struct Shared {
    stopping: AtomicBool,
    /// Unary calls.
    unary: Mutex<LoadReport>,
    /// Streaming calls.
    streams: Mutex<LoadReport>,
}

fn record(report: &Mutex<LoadReport>, bin: Bin, result: Result<u64, String>, started: Instant) {
    let mut report = report.lock().expect("report lock");
    report.counts.add(bin);
    match result {
        Ok(generation) => {
            report.latencies.push(started.elapsed());
            *report.generations.entry(generation).or_insert(0) += 1;
        }
        Err(message) => report.failures.push(Detail {
            bin,
            message,
            elapsed: started.elapsed(),
            at: Duration::ZERO,
        }),
    }
}

/// Why a failed call may be made again, as gRPC's transparent retry has it
/// (gRFC A6): a call that never left the client may be retried any number
/// of times; one the server received but provably did not process, once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// hyper never sent it: the connection closed (or was not ready)
    /// before the call was written.
    NeverSent,
    /// HTTP/2 said it was not processed: `REFUSED_STREAM`, or the server's
    /// GOAWAY named a last stream below it.
    NotProcessed,
    /// It may have been processed: a failure.
    No,
}

fn retry(status: &tonic::Status) -> Retry {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(status);
    while let Some(cause) = source {
        if let Some(e) = cause.downcast_ref::<hyper::Error>() {
            if e.is_canceled() || e.is_closed() {
                return Retry::NeverSent;
            }
        }
        if let Some(e) = cause.downcast_ref::<h2::Error>() {
            let refused =
                e.reason() == Some(h2::Reason::REFUSED_STREAM) || (e.is_go_away() && e.is_remote());
            return if refused {
                Retry::NotProcessed
            } else {
                Retry::No
            };
        }
        source = cause.source();
    }
    Retry::No
}

fn describe(status: &tonic::Status) -> String {
    let mut text = format!("{status}");
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause} ({cause:?})"));
        source = cause.source();
    }
    text
}

async fn unary(channel: Channel) -> Result<u64, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::from_error(e.into()))?;
    let reply: HelloReply = grpc
        .unary(
            tonic::Request::new(HelloRequest {
                name: "load".into(),
            }),
            PathAndQuery::from_static("/greeter.Greeter/SayHello"),
            ProstCodec::<HelloRequest, HelloReply>::default(),
        )
        .await?
        .into_inner();
    if reply.message != "hello, load" {
        return Err(tonic::Status::data_loss(format!("wrong reply {reply:?}")));
    }
    Ok(reply.generation)
}

/// A streaming call; fails with `DataLoss` (a failure, never retried) if a
/// message is missing or comes from another generation.
async fn stream(channel: Channel) -> Result<u64, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::from_error(e.into()))?;
    let mut replies = grpc
        .server_streaming(
            tonic::Request::new(StreamRequest {
                name: "stream".into(),
                count: STREAM_COUNT,
                interval_ms: STREAM_INTERVAL.as_millis() as u64,
            }),
            PathAndQuery::from_static("/greeter.Greeter/SayHelloStream"),
            ProstCodec::<StreamRequest, HelloReply>::default(),
        )
        .await?
        .into_inner();
    let mut generation = None;
    let mut received = 0;
    while let Some(reply) = replies.message().await.map_err(|e| {
        // Mid-stream, nothing may be retried: the call was processed.
        tonic::Status::data_loss(format!("after {received} messages: {}", describe(&e)))
    })? {
        received += 1;
        let expected = format!("hello {received}/{STREAM_COUNT}, stream");
        if reply.message != expected
            || *generation.get_or_insert(reply.generation) != reply.generation
        {
            return Err(tonic::Status::data_loss(format!(
                "message {received}: {reply:?} (generation {generation:?})"
            )));
        }
    }
    match generation {
        Some(g) if received == STREAM_COUNT => Ok(g),
        _ => Err(tonic::Status::data_loss(format!(
            "{received} of {STREAM_COUNT} messages"
        ))),
    }
}

/// Calls `call` until stopped, retrying what [`retry`] allows.
async fn client<F, Fut>(
    channel: Channel,
    shared: Arc<Shared>,
    report: fn(&Shared) -> &Mutex<LoadReport>,
    call: F,
) where
    F: Fn(Channel) -> Fut,
    Fut: std::future::Future<Output = Result<u64, tonic::Status>>,
{
    while !shared.stopping.load(Ordering::Relaxed) {
        let started = Instant::now();
        let mut refused_once = false;
        let outcome = tokio::time::timeout(TIMEOUT, async {
            loop {
                let status = match call(channel.clone()).await {
                    Ok(generation) => return Ok(generation),
                    Err(status) => status,
                };
                match retry(&status) {
                    Retry::NeverSent => {}
                    Retry::NotProcessed if !refused_once => refused_once = true,
                    Retry::NotProcessed | Retry::No => return Err(describe(&status)),
                }
                let mut report = report(&shared).lock().expect("report lock");
                report.counts.retried += 1;
                if report.retries.len() < 20 {
                    report.retries.push(Detail {
                        bin: Bin::Retried,
                        message: describe(&status),
                        elapsed: started.elapsed(),
                        at: Duration::ZERO,
                    });
                }
            }
        })
        .await;
        match outcome {
            Ok(Ok(generation)) => record(report(&shared), Bin::Ok, Ok(generation), started),
            Ok(Err(message)) => record(report(&shared), Bin::Reset, Err(message), started),
            Err(_) => record(
                report(&shared),
                Bin::Timeout,
                Err(format!("no answer within {TIMEOUT:?}")),
                started,
            ),
        }
    }
}

fn ok(report: &Mutex<LoadReport>) -> u64 {
    report.lock().expect("report lock").counts.ok
}

#[test]
fn thirty_reloads_of_a_tonic_greeter_under_unary_and_streaming_calls_fail_none() {
    let baton = Baton::builder()
        .args(["--listen", "grpc=tcp://127.0.0.1:0"])
        .args(["--drain-timeout", "60s"])
        .worker([bin("greeter")])
        .start();
    let addr: SocketAddr = baton.address("grpc").parse().expect("a TCP address");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let shared = Arc::new(Shared::default());
    // Channels spawn their connection tasks on the runtime they are made in.
    let _entered = runtime.enter();
    // Two channels (each one HTTP/2 connection at a time, reconnecting by
    // itself); unary and streaming calls share them.
    let channels: Vec<Channel> = (0..2)
        .map(|_| {
            Endpoint::from_shared(format!("http://{addr}"))
                .expect("an endpoint")
                .connect_lazy()
        })
        .collect();
    let mut tasks = Vec::new();
    let load_started = Instant::now();
    for i in 0..6 {
        let channel = channels[i % 2].clone();
        tasks.push(runtime.spawn(client(channel, shared.clone(), |s| &s.unary, unary)));
    }
    for i in 0..4 {
        let channel = channels[i % 2].clone();
        tasks.push(runtime.spawn(client(channel, shared.clone(), |s| &s.streams, stream)));
    }
    let wait = |report: &Mutex<LoadReport>, n: u64, what: &str| {
        let target = ok(report) + n;
        wait_for(what, Duration::from_secs(30), || {
            (ok(report) >= target).then_some(())
        });
    };
    wait(&shared.unary, 20, "unary calls");
    wait(&shared.streams, 2, "streaming calls");
    let reloaded = Instant::now();
    for i in 1..=RELOADS {
        assert_eq!(baton.reload_ok(), 1 + i);
        wait(&shared.unary, 10, "unary calls");
        // Now and then, let a streaming call end between reloads too.
        if i % 3 == 0 {
            wait(&shared.streams, 1, "a streaming call");
        }
    }
    // Streams that began before the last reload finish after it.
    wait(&shared.streams, 4, "streaming calls");
    let spanned = reloaded.elapsed();
    shared.stopping.store(true, Ordering::Relaxed);
    for task in tasks {
        runtime.block_on(task).expect("a client task");
    }
    let mut unary = shared.unary.lock().expect("report lock").clone();
    let mut streams = shared.streams.lock().expect("report lock").clone();
    unary.elapsed = load_started.elapsed();
    streams.elapsed = unary.elapsed;
    eprintln!("unary: {unary}\nstreaming: {streams}\n{RELOADS} reloads in {spanned:?}");
    unary.assert_no_failures();
    streams.assert_no_failures();
    assert!(
        unary.generations.len() as u64 > RELOADS / 2,
        "unary calls saw {} generations: {unary}",
        unary.generations.len()
    );
    // The streaming calls lasted longer than a reload: each one spanned
    // reloads and was finished by the generation that started it.
    let per_reload = spanned / RELOADS as u32;
    let call = STREAM_INTERVAL * STREAM_COUNT;
    assert!(
        call > per_reload * 2,
        "a streaming call ({call:?}) spans fewer than two reloads ({per_reload:?} each)"
    );
    assert!(streams.counts.ok >= 4, "{streams}");
    baton.wait_settled();
    let log = baton.log();
    assert!(
        !log.contains("killing it"),
        "a drain deadline passed:\n{log}"
    );
}
