//! A load client on hyper's own client connections, for what the
//! hand-written HTTP/1.1 client of `load` does not speak: HTTP/2 by prior
//! knowledge (h2c) and HTTPS with ALPN `h2` or `http/1.1`. It keeps the
//! bookkeeping of `docs/design.md` ("What counts as a failed request"):
//! every request lands in exactly one bin of [`LoadReport`], and a first
//! attempt the server provably did not process is counted apart as
//! `retried` and sent once more on a fresh connection. "Provably": hyper
//! never sent it (the connection was gone first), HTTP/2 said so (a GOAWAY
//! whose last stream id is below the request's, or `REFUSED_STREAM`, RFC
//! 9113 8.7), or, on a reused HTTP/1.1 connection, it closed before any
//! byte of the response (RFC 9112 9.3.1).
//!
//! HTTP/2 tasks share connections ([`HyperLoadConfig::connections`]), so
//! several streams are in flight on one connection when a GOAWAY comes;
//! each HTTP/1.1 task keeps its own connection alive. It sends only `GET`
//! and knows nothing of baton.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::load::{Bin, Detail, LoadReport};

/// How the client speaks to the server.
#[derive(Clone)]
pub enum Protocol {
    /// HTTP/1.1 in cleartext, keep-alive.
    Http1,
    /// HTTP/2 in cleartext, by prior knowledge.
    H2c,
    /// TLS with `config`, which names the ALPN protocol to offer (`h2` or
    /// `http/1.1`); the server must pick it.
    Tls {
        /// The client configuration: trusted roots, ALPN.
        config: Arc<tokio_rustls::rustls::ClientConfig>,
        /// The name the certificate must be valid for.
        server_name: String,
        /// Whether ALPN asks for HTTP/2.
        http2: bool,
    },
}

impl Protocol {
    fn http2(&self) -> bool {
        match self {
            Protocol::Http1 => false,
            Protocol::H2c => true,
            Protocol::Tls { http2, .. } => *http2,
        }
    }

    /// A name for reports.
    pub fn name(&self) -> &'static str {
        match self {
            Protocol::Http1 => "http/1.1",
            Protocol::H2c => "h2c",
            Protocol::Tls { http2: true, .. } => "https h2",
            Protocol::Tls { http2: false, .. } => "https http/1.1",
        }
    }
}

/// A TLS client configuration that trusts `root` (a DER certificate) and
/// offers ALPN `h2` or `http/1.1`.
pub fn tls_client(root: &[u8], http2: bool) -> Arc<tokio_rustls::rustls::ClientConfig> {
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(root.to_vec()))
        .expect("adding the test root certificate");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![if http2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    Arc::new(config)
}

/// What load to send.
#[derive(Clone)]
pub struct HyperLoadConfig {
    /// Where to connect.
    pub addr: SocketAddr,
    /// How to speak.
    pub protocol: Protocol,
    /// Client tasks; each has at most one request in flight.
    pub concurrency: usize,
    /// HTTP/2: how many connections the tasks share (task `i` uses
    /// connection `i % connections`). HTTP/1.1: ignored, one per task.
    pub connections: usize,
    /// Fraction of each task's requests that are `GET /slow?ms={slow_ms}`.
    pub slow_fraction: f64,
    /// How long a slow request asks the server to take.
    pub slow_ms: u64,
    /// Deadline for one request, a retry included.
    pub timeout: Duration,
    /// How many failure and retry details to keep.
    pub max_details: usize,
}

impl HyperLoadConfig {
    /// 8 tasks on 2 connections, no slow requests, 10 s per request.
    pub fn new(addr: SocketAddr, protocol: Protocol) -> HyperLoadConfig {
        HyperLoadConfig {
            addr,
            protocol,
            concurrency: 8,
            connections: 2,
            slow_fraction: 0.0,
            slow_ms: 200,
            timeout: Duration::from_secs(10),
            max_details: 50,
        }
    }

    fn is_slow(&self, n: u64) -> bool {
        let fraction = self.slow_fraction.clamp(0.0, 1.0);
        ((n + 1) as f64 * fraction).floor() > (n as f64 * fraction).floor()
    }
}

/// A load running on its own runtime while the test thread drives baton.
/// Dropping it stops the load.
pub struct HyperLoad {
    runtime: tokio::runtime::Runtime,
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

struct Shared {
    config: HyperLoadConfig,
    started: Instant,
    /// Set to stop; tasks read it before each request.
    stopping: AtomicBool,
    /// Tasks still running.
    running: AtomicUsize,
    /// Numbers connections, so a task replaces only the one that failed.
    next_id: AtomicU64,
    /// HTTP/2 connections, shared by tasks.
    slots: Vec<tokio::sync::Mutex<Option<Arc<Conn>>>>,
    report: Mutex<LoadReport>,
    /// Notified after every request and when a task ends.
    changed: Notify,
}

impl Shared {
    fn report(&self) -> std::sync::MutexGuard<'_, LoadReport> {
        self.report.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, bin: Bin, result: Result<Option<u64>, String>, elapsed: Duration) {
        let at = self.started.elapsed();
        let mut report = self.report();
        report.elapsed = at;
        report.counts.add(bin);
        match result {
            Ok(generation) => {
                report.latencies.push(elapsed);
                match generation {
                    Some(g) => *report.generations.entry(g).or_insert(0) += 1,
                    None => report.without_generation += 1,
                }
            }
            Err(message) => {
                if report.failures.len() < self.config.max_details {
                    report.failures.push(Detail {
                        bin,
                        message,
                        elapsed,
                        at,
                    });
                }
            }
        }
        drop(report);
        self.changed.notify_waiters();
    }

    fn record_retry(&self, message: String, elapsed: Duration) {
        let at = self.started.elapsed();
        let mut report = self.report();
        report.counts.retried += 1;
        if report.retries.len() < self.config.max_details {
            report.retries.push(Detail {
                bin: Bin::Retried,
                message,
                elapsed,
                at,
            });
        }
    }

    fn connected(&self) {
        self.report().connections += 1;
    }
}

impl HyperLoad {
    /// Starts `config` on two runtime threads of its own.
    pub fn start(config: HyperLoadConfig) -> HyperLoad {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("building the load runtime");
        let slots = (0..config.connections.max(1))
            .map(|_| tokio::sync::Mutex::new(None))
            .collect();
        let shared = Arc::new(Shared {
            running: AtomicUsize::new(config.concurrency),
            config,
            started: Instant::now(),
            stopping: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            slots,
            report: Mutex::new(LoadReport::default()),
            changed: Notify::new(),
        });
        let tasks = (0..shared.config.concurrency)
            .map(|i| runtime.spawn(client_task(shared.clone(), i)))
            .collect();
        HyperLoad {
            runtime,
            shared,
            tasks,
        }
    }

    /// The report so far.
    pub fn report(&self) -> LoadReport {
        let mut report = self.shared.report().clone();
        report.elapsed = self.shared.started.elapsed();
        report
    }

    /// Waits until `n` more requests have succeeded; panics with the
    /// report after 30 s, or if every task ended.
    pub fn wait_ok(&self, n: u64) {
        if let Err(e) = self.try_wait_ok(n, Duration::from_secs(30)) {
            panic!("{e}");
        }
    }

    /// Waits until `n` more requests have succeeded, at most `timeout`;
    /// the error carries the report.
    pub fn try_wait_ok(&self, n: u64, timeout: Duration) -> Result<(), String> {
        let target = self.report().counts.ok + n;
        let deadline = tokio::time::Instant::now() + timeout;
        let shared = &self.shared;
        self.runtime.block_on(async {
            loop {
                let changed = shared.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if shared.report().counts.ok >= target {
                    return Ok(());
                }
                if shared.running.load(Ordering::Acquire) == 0 {
                    return Err(format!("the load ended first: {}", self.report()));
                }
                if tokio::time::timeout_at(deadline, changed).await.is_err() {
                    return Err(format!(
                        "waiting {timeout:?} for {n} successful {} requests: {}",
                        shared.config.protocol.name(),
                        self.report()
                    ));
                }
            }
        })
    }

    /// Stops the load, lets requests in flight finish, returns the report.
    pub fn finish(mut self) -> LoadReport {
        self.shared.stopping.store(true, Ordering::Relaxed);
        for task in std::mem::take(&mut self.tasks) {
            if let Err(e) = self.runtime.block_on(task) {
                if e.is_panic() {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
        }
        self.report()
    }
}

impl Drop for HyperLoad {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
    }
}

/// One connection.
struct Conn {
    id: u64,
    sender: Sender,
    /// A response has completed on it.
    reused: AtomicBool,
    /// An HTTP/1.1 response said `Connection: close`.
    closing: AtomicBool,
}

enum Sender {
    H1(tokio::sync::Mutex<http1::SendRequest<Empty<Bytes>>>),
    H2(http2::SendRequest<Empty<Bytes>>),
}

impl Conn {
    fn is_closed(&self) -> bool {
        if self.closing.load(Ordering::Relaxed) {
            return true;
        }
        match &self.sender {
            Sender::H1(s) => s.try_lock().is_ok_and(|s| s.is_closed()),
            Sender::H2(s) => s.is_closed(),
        }
    }
}

/// Counts a task in `running` until it ends, even by a panic.
struct Running(Arc<Shared>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
    }
}

async fn client_task(shared: Arc<Shared>, index: usize) {
    let _running = Running(shared.clone());
    let mut own: Option<Arc<Conn>> = None;
    let mut n = 0u64;
    while !shared.stopping.load(Ordering::Relaxed) {
        let path = if shared.config.is_slow(n) {
            format!("/slow?ms={}", shared.config.slow_ms)
        } else {
            "/".to_owned()
        };
        n += 1;
        let start = Instant::now();
        // Where the request was, for a timeout's message.
        let mut stage = String::new();
        let outcome = tokio::time::timeout(
            shared.config.timeout,
            one_request(&shared, index, &mut own, &path, &mut stage),
        )
        .await;
        let elapsed = start.elapsed();
        match outcome {
            Ok(Ok(generation)) => shared.record(Bin::Ok, Ok(generation), elapsed),
            Ok(Err((bin, message))) => {
                shared.record(bin, Err(format!("GET {path}: {message}")), elapsed)
            }
            Err(_) => {
                // The connection may be stuck: do not reuse it.
                own = None;
                shared.record(
                    Bin::Timeout,
                    Err(format!(
                        "GET {path}: no complete response within {:?} ({stage})",
                        shared.config.timeout
                    )),
                    elapsed,
                );
            }
        }
    }
}

type Failure = (Bin, String);

/// One request, retried once on a fresh connection when the first attempt
/// was provably not processed. Returns the generation the body names.
async fn one_request(
    shared: &Shared,
    index: usize,
    own: &mut Option<Arc<Conn>>,
    path: &str,
    stage: &mut String,
) -> Result<Option<u64>, Failure> {
    let start = Instant::now();
    let mut retried = false;
    loop {
        *stage = format!("task {index} getting a connection, retried: {retried}");
        let conn = connection(shared, index, own).await?;
        *stage = format!(
            "task {index} on connection {} (reused: {}), retried: {retried}",
            conn.id,
            conn.reused.load(Ordering::Relaxed)
        );
        match attempt(shared, &conn, path).await {
            Ok(generation) => {
                conn.reused.store(true, Ordering::Relaxed);
                return Ok(generation);
            }
            Err(Attempt::NotProcessed(message)) if !retried => {
                retried = true;
                forget(shared, index, own, &conn).await;
                shared.record_retry(message, start.elapsed());
            }
            Err(Attempt::NotProcessed(message)) => {
                return Err((Bin::Reset, format!("again, after a retry: {message}")))
            }
            Err(Attempt::Failed(bin, message)) => {
                forget(shared, index, own, &conn).await;
                return Err((bin, message));
            }
        }
    }
}

enum Attempt {
    /// The server provably did not process it: retry.
    NotProcessed(String),
    /// A failure, in this bin.
    Failed(Bin, String),
}

/// The connection for task `index`: its own (HTTP/1.1) or its shared slot's
/// (HTTP/2), opened if there is none or it closed.
async fn connection(
    shared: &Shared,
    index: usize,
    own: &mut Option<Arc<Conn>>,
) -> Result<Arc<Conn>, Failure> {
    if shared.config.protocol.http2() {
        let slot = &shared.slots[index % shared.slots.len()];
        let mut slot = slot.lock().await;
        if let Some(conn) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(conn.clone());
        }
        let conn = Arc::new(connect(shared).await?);
        *slot = Some(conn.clone());
        Ok(conn)
    } else {
        if let Some(conn) = own.as_ref().filter(|c| !c.is_closed()) {
            return Ok(conn.clone());
        }
        let conn = Arc::new(connect(shared).await?);
        *own = Some(conn.clone());
        Ok(conn)
    }
}

/// Drops `conn` from where task `index` keeps it, unless it was replaced.
async fn forget(shared: &Shared, index: usize, own: &mut Option<Arc<Conn>>, conn: &Conn) {
    if shared.config.protocol.http2() {
        let mut slot = shared.slots[index % shared.slots.len()].lock().await;
        if slot.as_ref().is_some_and(|c| c.id == conn.id) {
            *slot = None;
        }
    } else {
        *own = None;
    }
}

async fn connect(shared: &Shared) -> Result<Conn, Failure> {
    let addr = shared.config.addr;
    let tcp = TcpStream::connect(addr).await.map_err(|e| {
        let bin = if e.kind() == std::io::ErrorKind::ConnectionRefused {
            Bin::Refused
        } else {
            Bin::ConnectError
        };
        (bin, format!("connecting to {addr}: {e}"))
    })?;
    tcp.set_nodelay(true)
        .map_err(|e| (Bin::ConnectError, format!("setting TCP_NODELAY: {e}")))?;
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let protocol = &shared.config.protocol;
    let conn = match protocol {
        Protocol::Http1 | Protocol::H2c => handshake(TokioIo::new(tcp), protocol.http2()).await?,
        Protocol::Tls {
            config,
            server_name,
            http2,
        } => {
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from(server_name.clone())
                .map_err(|e| (Bin::ConnectError, format!("server name: {e}")))?;
            let tls = tokio_rustls::TlsConnector::from(config.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| (Bin::Reset, format!("TLS handshake: {e}")))?;
            let want: &[u8] = if *http2 { b"h2" } else { b"http/1.1" };
            let got = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            if got.as_deref() != Some(want) {
                return Err((
                    Bin::Malformed,
                    format!(
                        "ALPN: asked for {}, the server chose {:?}",
                        String::from_utf8_lossy(want),
                        got.map(|p| String::from_utf8_lossy(&p).into_owned())
                    ),
                ));
            }
            handshake(TokioIo::new(tls), *http2).await?
        }
    };
    shared.connected();
    Ok(Conn {
        id,
        sender: conn,
        reused: AtomicBool::new(false),
        closing: AtomicBool::new(false),
    })
}

async fn handshake<T>(io: TokioIo<T>, http2: bool) -> Result<Sender, Failure>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    if http2 {
        let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| (Bin::Reset, format!("HTTP/2 handshake: {e}")))?;
        tokio::spawn(conn);
        Ok(Sender::H2(sender))
    } else {
        let (sender, conn) = http1::handshake(io)
            .await
            .map_err(|e| (Bin::Reset, format!("HTTP/1.1 handshake: {e}")))?;
        tokio::spawn(conn);
        Ok(Sender::H1(tokio::sync::Mutex::new(sender)))
    }
}

/// One attempt on `conn`.
async fn attempt(shared: &Shared, conn: &Conn, path: &str) -> Result<Option<u64>, Attempt> {
    let authority = shared.config.addr.to_string();
    let reused = conn.reused.load(Ordering::Relaxed);
    let response = match &conn.sender {
        Sender::H2(sender) => {
            let scheme = match shared.config.protocol {
                Protocol::Tls { .. } => "https",
                _ => "http",
            };
            let request = Request::get(format!("{scheme}://{authority}{path}"))
                .version(Version::HTTP_2)
                .body(Empty::new())
                .map_err(|e| Attempt::Failed(Bin::Malformed, e.to_string()))?;
            let mut sender = sender.clone();
            // Not handed to the connection yet: whatever failed, the server
            // never saw this request.
            sender.ready().await.map_err(|e| {
                Attempt::NotProcessed(format!("waiting for the connection: {e} ({e:?})"))
            })?;
            sender
                .send_request(request)
                .await
                .map_err(|e| classify(&e, false, "sending the request"))?
        }
        Sender::H1(sender) => {
            let request = Request::get(path)
                .header(hyper::header::HOST, &authority)
                .body(Empty::new())
                .map_err(|e| Attempt::Failed(Bin::Malformed, e.to_string()))?;
            let mut sender = sender.lock().await;
            sender.ready().await.map_err(|e| {
                Attempt::NotProcessed(format!("waiting for the connection: {e} ({e:?})"))
            })?;
            sender
                .send_request(request)
                .await
                .map_err(|e| classify(&e, reused, "sending the request"))?
        }
    };
    let status = response.status();
    let closes = response
        .headers()
        .get_all(hyper::header::CONNECTION)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    if closes {
        conn.closing.store(true, Ordering::Relaxed);
    }
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| Attempt::Failed(Bin::Truncated, format!("reading the body: {e}")))?
        .to_bytes();
    if !status.is_success() {
        return Err(Attempt::Failed(
            Bin::BadStatus,
            format!(
                "status {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ),
        ));
    }
    Ok(serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("generation").and_then(|g| g.as_u64())))
}

/// Sorts a request error: provably not processed, or a failure.
/// `retriable_close`: on HTTP/1.1, whether the connection was reused (a
/// close before any byte of the response is then retried); on HTTP/2
/// false, since only hyper's and h2's own verdicts count there.
fn classify(e: &hyper::Error, retriable_close: bool, what: &str) -> Attempt {
    let message = format!("{what}: {e} ({e:?})");
    if e.is_canceled() {
        return Attempt::NotProcessed(message);
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            let refused = h2.reason() == Some(h2::Reason::REFUSED_STREAM);
            // A GOAWAY from the server fails only the streams above its
            // last stream id: those it did not process.
            let went_away = h2.is_go_away() && h2.is_remote();
            return if refused || went_away {
                Attempt::NotProcessed(message)
            } else {
                Attempt::Failed(Bin::Reset, message)
            };
        }
        source = cause.source();
    }
    if retriable_close && (e.is_incomplete_message() || e.is_closed()) {
        return Attempt::NotProcessed(message);
    }
    Attempt::Failed(Bin::Reset, message)
}
