//! The project's own HTTP/1.1 load client. It owns the bookkeeping that
//! `docs/design.md` ("What counts as a failed request") asks of every load
//! test: each request lands in exactly one bin (`ok`, or one failure kind),
//! and a first attempt that died on a reused keep-alive connection before any
//! byte of its response is counted apart as `retried` and sent once more on a
//! fresh connection. It speaks plain HTTP/1.1 over TCP or a Unix stream socket,
//! sends only `GET`, and never pipelines. It knows nothing of baton: it sees
//! the server only the way a client does.
//!
//! Use [`spawn`] to start a load and steer it from a test ([`LoadHandle`]),
//! or [`run`] to drive one until a future resolves; both give a
//! [`LoadReport`].

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// The largest response head accepted; a longer one is `malformed`.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The most body bytes kept per response to look for `generation`.
const MAX_KEPT_BODY_BYTES: usize = 64 * 1024;
/// The longest chunk-size or trailer line accepted in a chunked body.
const MAX_LINE_BYTES: usize = 4 * 1024;

/// Where the load goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A TCP address, such as a listener of the supervisor's on 127.0.0.1.
    Tcp(SocketAddr),
    /// A Unix stream socket path.
    Unix(PathBuf),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp(addr) => write!(f, "{addr}"),
            Target::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// What load to send. Build with [`LoadConfig::new`] and change the fields.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Where to connect.
    pub target: Target,
    /// Number of client tasks; each has at most one request in flight.
    pub concurrency: usize,
    /// Fraction (0.0 to 1.0) of the tasks that keep connections alive; the
    /// others open a new connection per request and send `Connection: close`.
    /// Task `i` keeps alive when `i < round(concurrency * fraction)`.
    pub keep_alive_fraction: f64,
    /// Fraction (0.0 to 1.0) of each task's requests that are
    /// `GET /slow?ms={slow_ms}`; the others are `GET /`. Spread evenly: with
    /// 0.25, every fourth request of every task is slow.
    pub slow_fraction: f64,
    /// How long a slow request asks the server to take.
    pub slow_ms: u64,
    /// Deadline for one request, from its first connect or write to the last
    /// byte of its response, a retry included. Past it: `timeout`.
    pub timeout: Duration,
    /// Stop after starting this many requests (retries not included).
    /// `None`: go on until stopped.
    pub max_requests: Option<u64>,
    /// How many failure details (and, apart, retry details) to keep.
    pub max_details: usize,
}

impl LoadConfig {
    /// A config for `target` with the defaults: 8 tasks, half of them on
    /// keep-alive connections, no slow requests, a 10 s deadline per request,
    /// no request limit, 50 details kept.
    pub fn new(target: Target) -> Self {
        LoadConfig {
            target,
            concurrency: 8,
            keep_alive_fraction: 0.5,
            slow_fraction: 0.0,
            slow_ms: 200,
            timeout: Duration::from_secs(10),
            max_requests: None,
            max_details: 50,
        }
    }

    fn keep_alive_tasks(&self) -> usize {
        let fraction = self.keep_alive_fraction.clamp(0.0, 1.0);
        // The product is at most `concurrency`, so the cast cannot overflow.
        ((self.concurrency as f64 * fraction).round() as usize).min(self.concurrency)
    }

    /// Whether request number `n` (from 0) of a task is slow: the count of
    /// slow requests among the first `n + 1` is `floor((n + 1) * fraction)`.
    fn is_slow(&self, n: u64) -> bool {
        let fraction = self.slow_fraction.clamp(0.0, 1.0);
        ((n + 1) as f64 * fraction).floor() > (n as f64 * fraction).floor()
    }
}

/// The bins. Every request ends in exactly one of them except `Retried`,
/// which counts first attempts that are sent again (see [`Counts`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Bin {
    /// A complete response with a 2xx status.
    Ok,
    /// A first attempt on a reused keep-alive connection that failed before
    /// any byte of its response arrived (EOF, reset or EPIPE on the write or
    /// the first read). Not a failure: the request is sent once more on a
    /// fresh connection and that attempt is counted in its own bin.
    Retried,
    /// Connecting was refused.
    Refused,
    /// Connecting failed otherwise.
    ConnectError,
    /// A fresh connection was reset or closed before any byte of the
    /// response, or any connection was reset in the middle of a response.
    Reset,
    /// The response started but the connection was closed before its end.
    Truncated,
    /// The request's deadline ([`LoadConfig::timeout`]) passed.
    Timeout,
    /// A complete response with a status that is not 2xx.
    BadStatus,
    /// The response could not be parsed as HTTP/1.1.
    Malformed,
}

impl Bin {
    /// Every bin, in the order reports print them.
    pub const ALL: [Bin; 9] = [
        Bin::Ok,
        Bin::Retried,
        Bin::Refused,
        Bin::ConnectError,
        Bin::Reset,
        Bin::Truncated,
        Bin::Timeout,
        Bin::BadStatus,
        Bin::Malformed,
    ];

    /// Whether a request in this bin breaks the promise.
    pub fn is_failure(self) -> bool {
        !matches!(self, Bin::Ok | Bin::Retried)
    }

    /// The bin's name as reports print it.
    pub fn name(self) -> &'static str {
        match self {
            Bin::Ok => "ok",
            Bin::Retried => "retried",
            Bin::Refused => "refused",
            Bin::ConnectError => "connect_error",
            Bin::Reset => "reset",
            Bin::Truncated => "truncated",
            Bin::Timeout => "timeout",
            Bin::BadStatus => "bad_status",
            Bin::Malformed => "malformed",
        }
    }
}

impl fmt::Display for Bin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Counts per bin. `ok` plus the failure bins is the number of requests;
/// `retried` is counted apart: a retried request adds one to `retried` and
/// one to the bin of its second attempt, so `retried` is never part of
/// [`Counts::total`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// See [`Bin::Ok`].
    pub ok: u64,
    /// See [`Bin::Retried`].
    pub retried: u64,
    /// See [`Bin::Refused`].
    pub refused: u64,
    /// See [`Bin::ConnectError`].
    pub connect_error: u64,
    /// See [`Bin::Reset`].
    pub reset: u64,
    /// See [`Bin::Truncated`].
    pub truncated: u64,
    /// See [`Bin::Timeout`].
    pub timeout: u64,
    /// See [`Bin::BadStatus`].
    pub bad_status: u64,
    /// See [`Bin::Malformed`].
    pub malformed: u64,
}

impl Counts {
    /// The count in `bin`.
    pub fn get(&self, bin: Bin) -> u64 {
        match bin {
            Bin::Ok => self.ok,
            Bin::Retried => self.retried,
            Bin::Refused => self.refused,
            Bin::ConnectError => self.connect_error,
            Bin::Reset => self.reset,
            Bin::Truncated => self.truncated,
            Bin::Timeout => self.timeout,
            Bin::BadStatus => self.bad_status,
            Bin::Malformed => self.malformed,
        }
    }

    /// Counts one more in `bin` (for load clients of other protocols).
    pub fn add(&mut self, bin: Bin) {
        *self.get_mut(bin) += 1;
    }

    fn get_mut(&mut self, bin: Bin) -> &mut u64 {
        match bin {
            Bin::Ok => &mut self.ok,
            Bin::Retried => &mut self.retried,
            Bin::Refused => &mut self.refused,
            Bin::ConnectError => &mut self.connect_error,
            Bin::Reset => &mut self.reset,
            Bin::Truncated => &mut self.truncated,
            Bin::Timeout => &mut self.timeout,
            Bin::BadStatus => &mut self.bad_status,
            Bin::Malformed => &mut self.malformed,
        }
    }

    /// Requests that failed, in any failure bin.
    pub fn failed(&self) -> u64 {
        Bin::ALL
            .iter()
            .filter(|bin| bin.is_failure())
            .map(|&bin| self.get(bin))
            .sum()
    }

    /// Requests finished: `ok` plus every failure (not `retried`).
    pub fn total(&self) -> u64 {
        self.ok + self.failed()
    }
}

/// One failure or retry, kept for diagnostics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detail {
    /// The bin it was counted in.
    pub bin: Bin,
    /// What was being done and what went wrong.
    pub message: String,
    /// From the start of the request to the failure.
    pub elapsed: Duration,
    /// From the start of the load to the failure, to line it up with a
    /// reload.
    pub at: Duration,
}

impl fmt::Display for Detail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{}] at +{:.3?} after {:.3?}: {}",
            self.bin, self.at, self.elapsed, self.message
        )
    }
}

/// p50, p99 and max of the latencies of `ok` requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LatencySummary {
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Slowest.
    pub max: Duration,
}

/// What a load did, bin by bin.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Requests per bin.
    pub counts: Counts,
    /// Latency of every `ok` request, from its first attempt to the last
    /// byte of its response, in completion order.
    pub latencies: Vec<Duration>,
    /// For `ok` responses whose body is JSON with an integer `generation`:
    /// how many each generation served.
    pub generations: BTreeMap<u64, u64>,
    /// `ok` responses without a readable `generation`.
    pub without_generation: u64,
    /// `ok` responses whose JSON body says `"after_freeze": true`: a write
    /// to kept state the server reported as made after its values were
    /// handed to the next generation (see the `counter` example).
    pub after_freeze: u64,
    /// Connections opened successfully.
    pub connections: u64,
    /// The first failures, at most [`LoadConfig::max_details`].
    pub failures: Vec<Detail>,
    /// The first retries, at most [`LoadConfig::max_details`].
    pub retries: Vec<Detail>,
    /// How long the load ran (while it runs: until the latest request).
    pub elapsed: Duration,
}

impl LoadReport {
    /// The latency below which a fraction `q` (0.0 to 1.0) of the `ok`
    /// requests fall (nearest rank); `None` without `ok` requests.
    pub fn latency_quantile(&self, q: f64) -> Option<Duration> {
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        quantile(&sorted, q)
    }

    /// p50, p99 and max latency; `None` without `ok` requests.
    pub fn latency_summary(&self) -> Option<LatencySummary> {
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        Some(LatencySummary {
            p50: quantile(&sorted, 0.5)?,
            p99: quantile(&sorted, 0.99)?,
            max: *sorted.last()?,
        })
    }

    /// `Ok` when at least one request finished and none failed; else an
    /// error whose message is this whole report, failure details included.
    pub fn check_no_failures(&self) -> Result<(), LoadError> {
        if self.counts.total() == 0 {
            return Err(LoadError::NoRequests {
                report: self.to_string(),
            });
        }
        if self.counts.failed() > 0 {
            return Err(LoadError::Failures {
                failed: self.counts.failed(),
                report: self.to_string(),
            });
        }
        Ok(())
    }

    /// Panics with this report unless [`LoadReport::check_no_failures`]
    /// passes.
    #[track_caller]
    pub fn assert_no_failures(&self) {
        if let Err(err) = self.check_no_failures() {
            panic!("{err}");
        }
    }
}

fn quantile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        let rate = if secs > 0.0 {
            self.counts.total() as f64 / secs
        } else {
            0.0
        };
        write!(
            f,
            "{} requests in {:.2?} ({rate:.0}/s) on {} connections:",
            self.counts.total(),
            self.elapsed,
            self.connections
        )?;
        for bin in Bin::ALL {
            write!(f, " {bin} {}", self.counts.get(bin))?;
            if bin != Bin::Malformed {
                f.write_str(",")?;
            }
        }
        match self.latency_summary() {
            Some(l) => write!(
                f,
                "\nlatency: p50 {:.2?}, p99 {:.2?}, max {:.2?}",
                l.p50, l.p99, l.max
            )?,
            None => f.write_str("\nlatency: no ok request")?,
        }
        f.write_str("\ngenerations:")?;
        for (generation, count) in &self.generations {
            write!(f, " {generation}: {count},")?;
        }
        write!(f, " none: {}", self.without_generation)?;
        if !self.failures.is_empty() {
            write!(
                f,
                "\nfailures ({} of {} shown):",
                self.failures.len(),
                self.counts.failed()
            )?;
            for detail in &self.failures {
                write!(f, "\n  {detail}")?;
            }
        }
        if !self.retries.is_empty() {
            write!(
                f,
                "\nretries ({} of {} shown):",
                self.retries.len(),
                self.counts.retried
            )?;
            for detail in &self.retries {
                write!(f, "\n  {detail}")?;
            }
        }
        Ok(())
    }
}

/// Why a check on a load did not pass. Each message carries the report.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// [`LoadReport::check_no_failures`] found failed requests.
    #[error("load had {failed} failed request(s): {report}")]
    Failures {
        /// How many failed.
        failed: u64,
        /// The whole report.
        report: String,
    },
    /// [`LoadReport::check_no_failures`] found no finished request at all.
    #[error("load finished no request: {report}")]
    NoRequests {
        /// The whole report.
        report: String,
    },
    /// [`LoadHandle::wait_until`] reached its deadline.
    #[error("waiting {waited:?} for a load condition: timed out; so far: {report}")]
    WaitTimedOut {
        /// How long it waited.
        waited: Duration,
        /// The report so far.
        report: String,
    },
    /// [`LoadHandle::wait_until`]: every task finished first.
    #[error("waiting for a load condition: the load finished first: {report}")]
    Finished {
        /// The final report.
        report: String,
    },
}

/// A load in progress, started by [`spawn`]. Dropping it stops the load
/// (tasks finish their request in flight and exit).
pub struct LoadHandle {
    shared: Arc<Shared>,
    /// One per client task; each ends when the load stops or runs out of
    /// requests. Taken by `stop`/`join`.
    tasks: Vec<JoinHandle<()>>,
}

/// State shared by the handle and the client tasks.
struct Shared {
    config: LoadConfig,
    started: Instant,
    /// Set by the handle to stop; tasks read it before each request.
    stopping: AtomicBool,
    /// Requests started, for `max_requests`.
    tickets: AtomicU64,
    /// Tasks still running.
    running: AtomicUsize,
    /// The report so far; tasks add to it after each request.
    report: Mutex<LoadReport>,
    /// Notified after every change to `report` and when a task ends.
    changed: Notify,
}

impl Shared {
    fn report(&self) -> MutexGuard<'_, LoadReport> {
        // A task that panicked while holding the lock has already failed the
        // test through its JoinHandle; the counts it left are still useful.
        self.report
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn take_ticket(&self) -> bool {
        if self.stopping.load(Ordering::Relaxed) {
            return false;
        }
        match self.config.max_requests {
            Some(max) => self.tickets.fetch_add(1, Ordering::Relaxed) < max,
            None => true,
        }
    }

    fn record(&self, outcome: Outcome) {
        let at = self.started.elapsed();
        let max_details = self.config.max_details;
        let mut report = self.report();
        report.elapsed = at;
        report.connections += outcome.connections;
        if let Some(retry) = outcome.retry {
            report.counts.retried += 1;
            if report.retries.len() < max_details {
                report.retries.push(Detail {
                    bin: Bin::Retried,
                    message: retry.message,
                    elapsed: retry.elapsed,
                    at,
                });
            }
        }
        *report.counts.get_mut(outcome.bin) += 1;
        match outcome.result {
            Ok(Seen {
                generation,
                after_freeze,
            }) => {
                report.latencies.push(outcome.elapsed);
                report.after_freeze += u64::from(after_freeze);
                match generation {
                    Some(generation) => *report.generations.entry(generation).or_insert(0) += 1,
                    None => report.without_generation += 1,
                }
            }
            Err(message) => {
                if report.failures.len() < max_details {
                    report.failures.push(Detail {
                        bin: outcome.bin,
                        message,
                        elapsed: outcome.elapsed,
                        at,
                    });
                }
            }
        }
        drop(report);
        self.changed.notify_waiters();
    }

    fn snapshot(&self) -> LoadReport {
        let mut report = self.report().clone();
        report.elapsed = self.started.elapsed();
        report
    }
}

/// Starts a load on the current tokio runtime and returns at once.
pub fn spawn(config: LoadConfig) -> LoadHandle {
    let concurrency = config.concurrency;
    let keep_alive_tasks = config.keep_alive_tasks();
    let shared = Arc::new(Shared {
        config,
        started: Instant::now(),
        stopping: AtomicBool::new(false),
        tickets: AtomicU64::new(0),
        running: AtomicUsize::new(concurrency),
        report: Mutex::new(LoadReport::default()),
        changed: Notify::new(),
    });
    let tasks = (0..concurrency)
        .map(|i| {
            let shared = Arc::clone(&shared);
            tokio::spawn(client_task(shared, i < keep_alive_tasks))
        })
        .collect();
    LoadHandle { shared, tasks }
}

/// Runs a load until `stop` resolves or the load runs out of requests
/// ([`LoadConfig::max_requests`]), then lets requests in flight finish.
pub async fn run(config: LoadConfig, stop: impl Future<Output = ()>) -> LoadReport {
    let handle = spawn(config);
    tokio::select! {
        () = stop => {}
        () = handle.all_tasks_done() => {}
    }
    handle.stop().await
}

impl LoadHandle {
    /// The report so far.
    pub fn report(&self) -> LoadReport {
        self.shared.snapshot()
    }

    /// Waits until `condition` holds for the report so far, checking after
    /// every request. Fails after `deadline`, or when every task has ended
    /// without the condition holding. `condition` runs under the report's
    /// lock: keep it quick.
    pub async fn wait_until(
        &self,
        deadline: Duration,
        mut condition: impl FnMut(&LoadReport) -> bool,
    ) -> Result<(), LoadError> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if condition(&self.shared.report()) {
                return Ok(());
            }
            if self.shared.running.load(Ordering::Acquire) == 0 {
                return Err(LoadError::Finished {
                    report: self.report().to_string(),
                });
            }
            if tokio::time::timeout_at(until, changed).await.is_err() {
                return Err(LoadError::WaitTimedOut {
                    waited: deadline,
                    report: self.report().to_string(),
                });
            }
        }
    }

    /// Stops starting requests and returns at once: the ones in flight go
    /// on (a retry included), and [`LoadHandle::stop`] waits for them. For a
    /// test that stops the server next and counts only the requests sent
    /// before.
    pub fn stop_starting(&self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
    }

    /// Stops starting requests, waits for the ones in flight (each bounded by
    /// [`LoadConfig::timeout`]) and returns the final report.
    pub async fn stop(mut self) -> LoadReport {
        self.shared.stopping.store(true, Ordering::Relaxed);
        self.join_tasks().await
    }

    /// Waits for the load to run out of requests by itself
    /// ([`LoadConfig::max_requests`]); without a limit it never returns.
    pub async fn join(mut self) -> LoadReport {
        self.join_tasks().await
    }

    async fn all_tasks_done(&self) {
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.shared.running.load(Ordering::Acquire) == 0 {
                return;
            }
            changed.await;
        }
    }

    async fn join_tasks(&mut self) -> LoadReport {
        for task in std::mem::take(&mut self.tasks) {
            if let Err(err) = task.await {
                if err.is_panic() {
                    std::panic::resume_unwind(err.into_panic());
                }
            }
        }
        self.shared.snapshot()
    }
}

impl Drop for LoadHandle {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
    }
}

/// How one request ended, as a task reports it.
struct Outcome {
    bin: Bin,
    /// What the body said for `Bin::Ok`, else the failure's message.
    result: Result<Seen, String>,
    elapsed: Duration,
    /// Set when a first attempt on a reused connection was retried.
    retry: Option<Retry>,
    /// Connections this request opened.
    connections: u64,
}

struct Retry {
    message: String,
    elapsed: Duration,
}

/// One client task: requests one after another until stopped.
async fn client_task(shared: Arc<Shared>, keep_alive: bool) {
    let _running = Running(Arc::clone(&shared));
    let mut conn: Option<Conn> = None;
    let mut n: u64 = 0;
    while shared.take_ticket() {
        let path = if shared.config.is_slow(n) {
            format!("/slow?ms={}", shared.config.slow_ms)
        } else {
            "/".to_owned()
        };
        n += 1;
        let outcome = one_request(&shared.config, &path, keep_alive, &mut conn).await;
        shared.record(outcome);
    }
}

/// Counts a client task in `Shared::running` until it ends, even by a panic,
/// so that waiters never wait for a task that is gone.
struct Running(Arc<Shared>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
    }
}

/// Sends one request, retrying once on a fresh connection when a reused
/// connection failed before any byte of the response. Leaves in `conn` a
/// connection that may carry the next request.
async fn one_request(
    config: &LoadConfig,
    path: &str,
    keep_alive: bool,
    conn: &mut Option<Conn>,
) -> Outcome {
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + config.timeout;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: baton-load\r\n{}\r\n",
        host_header(&config.target),
        if keep_alive {
            ""
        } else {
            "Connection: close\r\n"
        },
    );
    let mut connections = 0;
    let mut retry = None;
    let result = tokio::time::timeout_at(deadline, async {
        loop {
            let mut current = match conn.take() {
                Some(current) => current,
                None => {
                    let fresh = Conn::connect(&config.target).await?;
                    connections += 1;
                    fresh
                }
            };
            match current.exchange(request.as_bytes()).await {
                Ok(response) => {
                    if keep_alive && response.reusable {
                        current.reused = true;
                        *conn = Some(current);
                    }
                    return Ok(response);
                }
                Err(failure) if failure.retriable && current.reused && retry.is_none() => {
                    retry = Some(Retry {
                        message: format!("on a reused connection: {}", failure.message),
                        elapsed: start.elapsed(),
                    });
                }
                Err(mut failure) => {
                    let which = if current.reused { "reused" } else { "fresh" };
                    failure.message = format!("on a {which} connection: {}", failure.message);
                    return Err(failure);
                }
            }
        }
    })
    .await;
    let elapsed = start.elapsed();
    let (bin, result) = match result {
        Err(_) => (
            Bin::Timeout,
            Err(format!(
                "GET {path}: no complete response within {:?}",
                config.timeout
            )),
        ),
        Ok(Err(failure)) => (failure.bin, Err(format!("GET {path}: {}", failure.message))),
        Ok(Ok(response)) if (200..300).contains(&response.status) => {
            (Bin::Ok, Ok(Seen::of(&response.body)))
        }
        Ok(Ok(response)) => (
            Bin::BadStatus,
            Err(format!(
                "GET {path}: status {}: {}",
                response.status,
                String::from_utf8_lossy(&response.body[..response.body.len().min(200)])
            )),
        ),
    };
    Outcome {
        bin,
        result,
        elapsed,
        retry,
        connections,
    }
}

fn host_header(target: &Target) -> String {
    match target {
        Target::Tcp(addr) => addr.to_string(),
        Target::Unix(_) => "localhost".to_owned(),
    }
}

/// What a successful response's JSON body says.
#[derive(Debug, Default)]
struct Seen {
    generation: Option<u64>,
    after_freeze: bool,
}

impl Seen {
    fn of(body: &[u8]) -> Seen {
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
            return Seen::default();
        };
        Seen {
            generation: value.get("generation").and_then(|g| g.as_u64()),
            after_freeze: value.get("after_freeze") == Some(&serde_json::Value::Bool(true)),
        }
    }
}

/// A byte stream to the server.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A failed attempt.
#[derive(Debug)]
struct Failure {
    bin: Bin,
    message: String,
    /// Failed before any byte of the response arrived, with EOF, a reset or
    /// EPIPE: the kind of failure a client retries on a reused connection.
    retriable: bool,
}

impl Failure {
    fn new(bin: Bin, message: String) -> Self {
        Failure {
            bin,
            message,
            retriable: false,
        }
    }
}

/// A complete response.
struct Response {
    status: u16,
    /// The body, or its first `MAX_KEPT_BODY_BYTES`.
    body: Vec<u8>,
    /// The connection may carry another request.
    reusable: bool,
}

/// How the body of a response is delimited (RFC 9112, 6.3).
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

struct Conn {
    io: Box<dyn Io>,
    /// Bytes read and not yet consumed.
    buf: Vec<u8>,
    /// A response has already completed on this connection.
    reused: bool,
}

impl Conn {
    async fn connect(target: &Target) -> Result<Conn, Failure> {
        let io: Box<dyn Io> = match target {
            Target::Tcp(addr) => {
                let stream = TcpStream::connect(addr)
                    .await
                    .map_err(|err| connect_failure(target, err))?;
                // Requests are written in one call; nothing to coalesce.
                stream
                    .set_nodelay(true)
                    .map_err(|err| connect_failure(target, err))?;
                Box::new(stream)
            }
            Target::Unix(path) => Box::new(
                UnixStream::connect(path)
                    .await
                    .map_err(|err| connect_failure(target, err))?,
            ),
        };
        Ok(Conn {
            io,
            buf: Vec::with_capacity(4096),
            reused: false,
        })
    }

    /// Writes `request` and reads its whole response.
    async fn exchange(&mut self, request: &[u8]) -> Result<Response, Failure> {
        if let Err(err) = self.io.write_all(request).await {
            return Err(Failure {
                bin: Bin::Reset,
                message: format!("writing the request: {err}"),
                retriable: is_reset(&err),
            });
        }
        let (status, framing, close) = self.read_head().await?;
        let mut body = Vec::new();
        let mut reusable = !close;
        match framing {
            Framing::Empty => {}
            Framing::Length(len) => self.read_length(len, &mut body).await?,
            Framing::Chunked => self.read_chunked(&mut body).await?,
            Framing::UntilClose => {
                self.read_until_close(&mut body).await?;
                reusable = false;
            }
        }
        // Bytes after the response: the server is confused; do not reuse.
        if !self.buf.is_empty() {
            reusable = false;
        }
        Ok(Response {
            status,
            body,
            reusable,
        })
    }

    /// Reads more bytes into `buf`; `Ok(0)` at EOF.
    async fn fill(&mut self) -> io::Result<usize> {
        self.buf.reserve(16 * 1024);
        self.io.read_buf(&mut self.buf).await
    }

    /// Reads and parses a response head (skipping 1xx responses) and
    /// consumes it from `buf`. Returns the status, the body's framing and
    /// whether the server will close the connection after the body.
    async fn read_head(&mut self) -> Result<(u16, Framing, bool), Failure> {
        let mut received_any = false;
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut parsed = httparse::Response::new(&mut headers);
            let head_len = match parsed.parse(&self.buf) {
                Ok(httparse::Status::Complete(len)) => Some(len),
                Ok(httparse::Status::Partial) => None,
                Err(err) => {
                    return Err(Failure::new(
                        Bin::Malformed,
                        format!(
                            "parsing the response head: {err}: {:?}",
                            String::from_utf8_lossy(&self.buf[..self.buf.len().min(200)])
                        ),
                    ))
                }
            };
            let Some(head_len) = head_len else {
                if self.buf.len() > MAX_HEAD_BYTES {
                    return Err(Failure::new(
                        Bin::Malformed,
                        format!("response head longer than {MAX_HEAD_BYTES} bytes"),
                    ));
                }
                match self.fill().await {
                    Ok(0) if !received_any => {
                        return Err(Failure {
                            bin: Bin::Reset,
                            message: "connection closed before any byte of the response".to_owned(),
                            retriable: true,
                        })
                    }
                    Ok(0) => {
                        return Err(Failure::new(
                            Bin::Truncated,
                            format!(
                                "connection closed after {} bytes of the response head",
                                self.buf.len()
                            ),
                        ))
                    }
                    Ok(_) => received_any = true,
                    Err(err) if !received_any => {
                        return Err(Failure {
                            bin: Bin::Reset,
                            message: format!("reading the response: {err}"),
                            retriable: is_reset(&err),
                        })
                    }
                    Err(err) => {
                        return Err(Failure::new(
                            Bin::Reset,
                            format!("reading the response head: {err}"),
                        ))
                    }
                }
                continue;
            };
            let status = parsed.code.unwrap_or(0);
            let framing = framing(status, parsed.headers)?;
            let close = (parsed.version == Some(0) && !has_token(parsed.headers, "keep-alive"))
                || has_token(parsed.headers, "close");
            self.buf.drain(..head_len);
            // 101 switches protocols: we never ask for that, so it is wrong.
            if (100..200).contains(&status) && status != 101 {
                continue;
            }
            return Ok((status, framing, close));
        }
    }

    async fn read_length(&mut self, len: u64, body: &mut Vec<u8>) -> Result<(), Failure> {
        let mut left = len;
        loop {
            let take = self
                .buf
                .len()
                .min(usize::try_from(left).unwrap_or(usize::MAX));
            keep_body(body, &self.buf[..take]);
            self.buf.drain(..take);
            left -= take as u64;
            if left == 0 {
                return Ok(());
            }
            self.fill_body(|| format!("{} of {len} body bytes", len - left))
                .await?;
        }
    }

    async fn read_chunked(&mut self, body: &mut Vec<u8>) -> Result<(), Failure> {
        loop {
            let line = self.read_line().await?;
            let size_text = line.split(|&b| b == b';').next().unwrap_or(&[]);
            let size = std::str::from_utf8(size_text)
                .ok()
                .and_then(|text| u64::from_str_radix(text.trim(), 16).ok())
                .ok_or_else(|| {
                    Failure::new(
                        Bin::Malformed,
                        format!(
                            "parsing a chunk size line {:?}",
                            String::from_utf8_lossy(&line)
                        ),
                    )
                })?;
            if size == 0 {
                // Trailers, up to an empty line.
                while !self.read_line().await?.is_empty() {}
                return Ok(());
            }
            self.read_length(size, body).await?;
            if !self.read_line().await?.is_empty() {
                return Err(Failure::new(
                    Bin::Malformed,
                    "chunk data not followed by CRLF".to_owned(),
                ));
            }
        }
    }

    /// Reads one CRLF-terminated line of a chunked body, without the CRLF.
    async fn read_line(&mut self) -> Result<Vec<u8>, Failure> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf[..pos].to_vec();
                self.buf.drain(..pos + 2);
                return Ok(line);
            }
            if self.buf.len() > MAX_LINE_BYTES {
                return Err(Failure::new(
                    Bin::Malformed,
                    format!("chunked body line longer than {MAX_LINE_BYTES} bytes"),
                ));
            }
            self.fill_body(|| "a chunked body".to_owned()).await?;
        }
    }

    async fn read_until_close(&mut self, body: &mut Vec<u8>) -> Result<(), Failure> {
        loop {
            keep_body(body, &self.buf);
            self.buf.clear();
            match self.fill().await {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(err) => {
                    return Err(Failure::new(
                        Bin::Reset,
                        format!("reading a body delimited by close: {err}"),
                    ))
                }
            }
        }
    }

    /// Reads more body bytes; EOF is `truncated`, an error `reset`.
    /// `what` says how far the body had come.
    async fn fill_body(&mut self, what: impl FnOnce() -> String) -> Result<(), Failure> {
        match self.fill().await {
            Ok(0) => Err(Failure::new(
                Bin::Truncated,
                format!("connection closed after {}", what()),
            )),
            Ok(_) => Ok(()),
            Err(err) => Err(Failure::new(
                Bin::Reset,
                format!("reading the body after {}: {err}", what()),
            )),
        }
    }
}

fn keep_body(body: &mut Vec<u8>, bytes: &[u8]) {
    let room = MAX_KEPT_BODY_BYTES.saturating_sub(body.len());
    body.extend_from_slice(&bytes[..bytes.len().min(room)]);
}

fn connect_failure(target: &Target, err: io::Error) -> Failure {
    let bin = if err.kind() == io::ErrorKind::ConnectionRefused {
        Bin::Refused
    } else {
        Bin::ConnectError
    };
    Failure::new(bin, format!("connecting to {target}: {err}"))
}

/// Whether a read error means the peer is gone: what a client retries on a
/// reused connection.
fn is_reset(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
    )
}

/// Whether a `Connection` header lists `token`.
fn has_token(headers: &[httparse::Header<'_>], token: &str) -> bool {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .any(|value| {
            std::str::from_utf8(value).is_ok_and(|value| value.trim().eq_ignore_ascii_case(token))
        })
}

/// How the body of a response to a GET with `status` is delimited.
fn framing(status: u16, headers: &[httparse::Header<'_>]) -> Result<Framing, Failure> {
    if (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(Framing::Empty);
    }
    let malformed = |what: String| Failure::new(Bin::Malformed, what);
    let mut transfer_encoding = None;
    let mut length: Option<u64> = None;
    for header in headers {
        let value = std::str::from_utf8(header.value)
            .map_err(|_| malformed(format!("header {} is not UTF-8", header.name)))?;
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = Some(value.to_owned());
        } else if header.name.eq_ignore_ascii_case("content-length") {
            let parsed: u64 = value
                .trim()
                .parse()
                .map_err(|_| malformed(format!("parsing Content-Length {value:?}")))?;
            if length.is_some_and(|seen| seen != parsed) {
                return Err(malformed("conflicting Content-Length headers".to_owned()));
            }
            length = Some(parsed);
        }
    }
    Ok(match (transfer_encoding, length) {
        (Some(encoding), _) => {
            let last = encoding.rsplit(',').next().unwrap_or("").trim();
            if last.eq_ignore_ascii_case("chunked") {
                Framing::Chunked
            } else {
                Framing::UntilClose
            }
        }
        (None, Some(0)) => Framing::Empty,
        (None, Some(len)) => Framing::Length(len),
        (None, None) => Framing::UntilClose,
    })
}

#[cfg(test)]
mod tests {
    //! Each test runs a small server on 127.0.0.1:0 (or a Unix socket) and
    //! checks how the client counts what it does. The ways a server can
    //! fail a request are one table, `CASES` (what the server does → the
    //! bin the request lands in), run by `each_misbehaviour_lands_in_its_bin`;
    //! the other tests cover keep-alive, retries, framing and steering.
    //! Servers and clients synchronise only through their sockets.

    use super::*;
    use tokio::net::TcpListener;

    /// Reads one request head; `false` at EOF before any byte of it.
    async fn read_request(stream: &mut (impl AsyncRead + Unpin)) -> io::Result<bool> {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).await? == 0 {
                return if head.is_empty() {
                    Ok(false)
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                };
            }
            head.push(byte[0]);
        }
        Ok(true)
    }

    fn json_response(generation: u64, extra_headers: &str) -> String {
        let body = format!("{{\"generation\": {generation}, \"pid\": 1}}");
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{extra_headers}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    /// Binds 127.0.0.1:0.
    async fn listener() -> (TcpListener, Target) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = Target::Tcp(listener.local_addr().unwrap());
        (listener, target)
    }

    /// A well-behaved server: keep-alive unless the request asks to close.
    async fn serve_well(listener: TcpListener, generation: u64) {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                while let Ok(true) = read_request(&mut stream).await {
                    let response = json_response(generation, "");
                    if stream.write_all(response.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    }

    fn config(target: Target, keep_alive: bool, max_requests: u64) -> LoadConfig {
        let mut config = LoadConfig::new(target);
        config.concurrency = 1;
        config.keep_alive_fraction = if keep_alive { 1.0 } else { 0.0 };
        config.max_requests = Some(max_requests);
        config
    }

    async fn run_to_end(config: LoadConfig) -> LoadReport {
        run(config, std::future::pending()).await
    }

    #[tokio::test]
    async fn keep_alive_reuses_one_connection() {
        let (listener, target) = listener().await;
        tokio::spawn(serve_well(listener, 4));
        let report = run_to_end(config(target, true, 5)).await;
        report.assert_no_failures();
        assert_eq!(report.counts.ok, 5);
        assert_eq!(report.connections, 1);
        assert_eq!(report.generations, BTreeMap::from([(4, 5)]));
        assert_eq!(report.latencies.len(), 5);
    }

    #[tokio::test]
    async fn fresh_connection_per_request() {
        let (listener, target) = listener().await;
        tokio::spawn(serve_well(listener, 1));
        let report = run_to_end(config(target, false, 5)).await;
        report.assert_no_failures();
        assert_eq!(report.counts.ok, 5);
        assert_eq!(report.connections, 5);
    }

    /// What a misbehaving server does with the one connection it accepts
    /// (after reading the request, where there is a connection).
    #[derive(Clone, Copy, Debug)]
    enum Server {
        /// Closes its listener before any client connects.
        NotListening,
        /// Sends 3 bytes of a 100-byte body, then resets (zero linger).
        ResetsMidResponse,
        /// Closes the connection without a byte of an answer.
        ClosesWithoutAnswer,
        /// Sends these bytes, closes its side cleanly (FIN; the request was
        /// read, so nothing unread turns the close into a reset), and reads
        /// until the client closes.
        SendsThenFinishes(&'static [u8]),
        /// Sends these bytes and reads until the client closes.
        SendsThenWaits(&'static [u8]),
        /// Answers every request on the connection with a 500.
        AnswersErrors,
        /// Reads until the client gives up and closes, answering nothing.
        NeverAnswers,
    }

    impl Server {
        /// Runs this server on `listener`.
        async fn run(self, listener: TcpListener) {
            if let Server::NotListening = self {
                drop(listener);
                return;
            }
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut rest = Vec::new();
            match self {
                Server::NotListening => {}
                Server::ResetsMidResponse => {
                    read_request(&mut stream).await.unwrap();
                    stream
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
                        .await
                        .unwrap();
                    stream.set_zero_linger().unwrap();
                }
                Server::ClosesWithoutAnswer => {
                    read_request(&mut stream).await.unwrap();
                }
                Server::SendsThenFinishes(bytes) => {
                    read_request(&mut stream).await.unwrap();
                    stream.write_all(bytes).await.unwrap();
                    stream.shutdown().await.unwrap();
                    let _ = stream.read_to_end(&mut rest).await;
                }
                Server::SendsThenWaits(bytes) => {
                    read_request(&mut stream).await.unwrap();
                    stream.write_all(bytes).await.unwrap();
                    let _ = stream.read_to_end(&mut rest).await;
                }
                Server::AnswersErrors => {
                    while let Ok(true) = read_request(&mut stream).await {
                        let response =
                            "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\noops";
                        stream.write_all(response.as_bytes()).await.unwrap();
                    }
                }
                Server::NeverAnswers => {
                    let _ = stream.read_to_end(&mut rest).await;
                }
            }
        }
    }

    /// One misbehaviour and where the client must count it.
    struct Case {
        server: Server,
        /// Requests sent, one at a time, on keep-alive connections.
        requests: u64,
        /// The client's deadline per request, when not the default.
        timeout: Option<Duration>,
        /// The bin every one of the requests lands in.
        bin: Bin,
        /// Connections opened, where the case is about them.
        connections: Option<u64>,
        /// A fragment of the first failure's message, or "".
        message: &'static str,
    }

    const CASES: &[Case] = &[
        Case {
            server: Server::NotListening,
            requests: 3,
            timeout: None,
            bin: Bin::Refused,
            connections: None,
            message: "",
        },
        Case {
            server: Server::ResetsMidResponse,
            requests: 1,
            timeout: None,
            bin: Bin::Reset,
            connections: None,
            message: "",
        },
        // On a fresh connection this is a failure, not a retry.
        Case {
            server: Server::ClosesWithoutAnswer,
            requests: 1,
            timeout: None,
            bin: Bin::Reset,
            connections: None,
            message: "",
        },
        Case {
            server: Server::SendsThenFinishes(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc"),
            requests: 1,
            timeout: None,
            bin: Bin::Truncated,
            connections: None,
            message: "3 of 100",
        },
        Case {
            server: Server::SendsThenFinishes(b"HTTP/1.1 200 OK\r\nConte"),
            requests: 1,
            timeout: None,
            bin: Bin::Truncated,
            connections: None,
            message: "",
        },
        // The connection stays usable after an error status.
        Case {
            server: Server::AnswersErrors,
            requests: 2,
            timeout: None,
            bin: Bin::BadStatus,
            connections: Some(1),
            message: "status 500: oops",
        },
        Case {
            server: Server::SendsThenWaits(b"SPDY/9 what\r\n\r\n"),
            requests: 1,
            timeout: None,
            bin: Bin::Malformed,
            connections: None,
            message: "",
        },
        Case {
            server: Server::NeverAnswers,
            requests: 1,
            timeout: Some(Duration::from_millis(200)),
            bin: Bin::Timeout,
            connections: None,
            message: "",
        },
    ];

    #[tokio::test]
    async fn each_misbehaviour_lands_in_its_bin() {
        for case in CASES {
            let what = format!("{:?} ({} requests)", case.server, case.requests);
            let (listener, target) = listener().await;
            tokio::spawn(case.server.run(listener));
            let mut config = config(target, true, case.requests);
            if let Some(timeout) = case.timeout {
                config.timeout = timeout;
            }
            let report = run_to_end(config).await;
            assert_eq!(
                report.counts.get(case.bin),
                case.requests,
                "{what}: {report}"
            );
            assert_eq!(report.counts.total(), case.requests, "{what}: {report}");
            assert_eq!(report.counts.retried, 0, "{what}: {report}");
            assert_eq!(
                report.failures.len() as u64,
                case.requests,
                "{what}: {report}"
            );
            assert!(
                report.failures.iter().all(|f| f.bin == case.bin),
                "{what}: {report}"
            );
            assert!(
                report.failures[0].message.contains(case.message),
                "{what}: {}",
                report.failures[0]
            );
            if let Some(connections) = case.connections {
                assert_eq!(report.connections, connections, "{what}: {report}");
            }
            if let Some(timeout) = case.timeout {
                assert!(report.failures[0].elapsed >= timeout, "{what}: {report}");
            }
            let err = report.check_no_failures().unwrap_err();
            let counted = format!("{} {}", case.bin, case.requests);
            assert!(err.to_string().contains(&counted), "{what}: {err}");
        }
    }

    #[tokio::test]
    async fn idle_connection_closed_by_server_is_retried() {
        let (listener, target) = listener().await;
        tokio::spawn(async move {
            // First connection: one response, then close while idle.
            let (mut stream, _) = listener.accept().await.unwrap();
            read_request(&mut stream).await.unwrap();
            stream
                .write_all(json_response(1, "").as_bytes())
                .await
                .unwrap();
            drop(stream);
            // The retry arrives on a second connection.
            serve_well(listener, 2).await;
        });
        let report = run_to_end(config(target, true, 2)).await;
        report.assert_no_failures();
        assert_eq!(report.counts.ok, 2, "{report}");
        assert_eq!(report.counts.retried, 1, "{report}");
        assert_eq!(report.counts.total(), 2);
        assert_eq!(report.connections, 2);
        assert_eq!(report.generations, BTreeMap::from([(1, 1), (2, 1)]));
        assert_eq!(report.retries.len(), 1);
        assert!(
            report.retries[0].message.contains("reused"),
            "{}",
            report.retries[0]
        );
    }

    #[tokio::test]
    async fn chunked_and_close_delimited_bodies() {
        let (listener, target) = listener().await;
        tokio::spawn(async move {
            // Chunked, with an extension, a 100 Continue first and a trailer.
            let (mut stream, _) = listener.accept().await.unwrap();
            read_request(&mut stream).await.unwrap();
            stream
                .write_all(
                    b"HTTP/1.1 100 Continue\r\n\r\n\
                      HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                      5;x=y\r\n{\"gen\r\n\
                      e\r\neration\": 7, \"\r\n\
                      8\r\npid\": 1}\r\n\
                      0\r\nX-Trailer: 1\r\n\r\n",
                )
                .await
                .unwrap();
            // Then, on the same connection: delimited by close.
            read_request(&mut stream).await.unwrap();
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{\"generation\": 8}")
                .await
                .unwrap();
            drop(stream);
            // HTTP/1.0 without keep-alive closes too.
            let (mut stream, _) = listener.accept().await.unwrap();
            read_request(&mut stream).await.unwrap();
            stream
                .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 16\r\n\r\n{\"generation\":9}")
                .await
                .unwrap();
            drop(stream);
            serve_well(listener, 10).await;
        });
        let report = run_to_end(config(target, true, 4)).await;
        report.assert_no_failures();
        assert_eq!(report.counts.ok, 4);
        assert_eq!(report.counts.retried, 0, "{report}");
        assert_eq!(report.connections, 3);
        assert_eq!(
            report.generations,
            BTreeMap::from([(7, 1), (8, 1), (9, 1), (10, 1)])
        );
    }

    #[tokio::test]
    async fn connection_close_makes_a_new_connection() {
        let (listener, target) = listener().await;
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                read_request(&mut stream).await.unwrap();
                let response = json_response(3, "Connection: close\r\n");
                stream.write_all(response.as_bytes()).await.unwrap();
            }
        });
        let report = run_to_end(config(target, true, 3)).await;
        report.assert_no_failures();
        assert_eq!(report.counts.ok, 3);
        assert_eq!(report.counts.retried, 0);
        assert_eq!(report.connections, 3);
    }

    #[tokio::test]
    async fn unix_socket_target() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("http.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            while let Ok(true) = read_request(&mut stream).await {
                let response = json_response(5, "");
                stream.write_all(response.as_bytes()).await.unwrap();
            }
        });
        let report = run_to_end(config(Target::Unix(path), true, 3)).await;
        report.assert_no_failures();
        assert_eq!(report.generations, BTreeMap::from([(5, 3)]));
    }

    #[tokio::test]
    async fn slow_requests_follow_the_fraction() {
        let (listener, target) = listener().await;
        let slow_seen = Arc::new(AtomicU64::new(0));
        let seen = Arc::clone(&slow_seen);
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut head = [0u8; 10];
            loop {
                // Requests are written whole and answered one at a time, so
                // the first bytes tell the path.
                if stream.read_exact(&mut head).await.is_err() {
                    return;
                }
                if &head == b"GET /slow?" {
                    seen.fetch_add(1, Ordering::Relaxed);
                }
                let mut rest = head.to_vec();
                while !rest.ends_with(b"\r\n\r\n") {
                    let mut byte = [0u8; 1];
                    stream.read_exact(&mut byte).await.unwrap();
                    rest.push(byte[0]);
                }
                stream
                    .write_all(json_response(1, "").as_bytes())
                    .await
                    .unwrap();
            }
        });
        let mut config = config(target, true, 8);
        config.slow_fraction = 0.25;
        config.slow_ms = 1;
        let report = run_to_end(config).await;
        report.assert_no_failures();
        assert_eq!(slow_seen.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn wait_until_then_stop() {
        let (listener, target) = listener().await;
        tokio::spawn(serve_well(listener, 1));
        let mut config = LoadConfig::new(target);
        config.concurrency = 4;
        let load = spawn(config);
        load.wait_until(Duration::from_secs(10), |report| report.counts.ok >= 20)
            .await
            .unwrap();
        assert!(load.report().counts.ok >= 20);
        let report = load.stop().await;
        report.assert_no_failures();
        assert!(report.counts.ok >= 20);
        assert_eq!(report.counts.ok, report.latencies.len() as u64);
    }

    #[tokio::test]
    async fn wait_until_fails_when_the_load_ends_first() {
        let (listener, target) = listener().await;
        tokio::spawn(serve_well(listener, 1));
        let load = spawn(config(target, true, 2));
        let err = load
            .wait_until(Duration::from_secs(10), |report| report.counts.ok >= 3)
            .await
            .unwrap_err();
        assert!(matches!(err, LoadError::Finished { .. }), "{err}");
        assert_eq!(load.join().await.counts.ok, 2);
    }

    #[tokio::test]
    async fn run_stops_when_the_future_resolves() {
        let (listener, target) = listener().await;
        tokio::spawn(serve_well(listener, 1));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tx.send(()).unwrap();
        let report = run(LoadConfig::new(target), async {
            let _ = rx.await;
        })
        .await;
        // Stopped before or soon after the first requests: however many
        // finished, none failed and every task has ended.
        assert_eq!(report.counts.failed(), 0, "{report}");
    }

    #[test]
    fn quantiles_use_nearest_rank() {
        let report = LoadReport {
            latencies: (1..=100).rev().map(Duration::from_millis).collect(),
            ..LoadReport::default()
        };
        assert_eq!(
            report.latency_quantile(0.5),
            Some(Duration::from_millis(50))
        );
        assert_eq!(
            report.latency_summary(),
            Some(LatencySummary {
                p50: Duration::from_millis(50),
                p99: Duration::from_millis(99),
                max: Duration::from_millis(100),
            })
        );
        assert_eq!(LoadReport::default().latency_summary(), None);
    }

    #[test]
    fn mix_is_deterministic() {
        let mut config = LoadConfig::new(Target::Unix("x".into()));
        config.concurrency = 10;
        config.keep_alive_fraction = 0.3;
        assert_eq!(config.keep_alive_tasks(), 3);
        config.slow_fraction = 0.1;
        let slow: Vec<u64> = (0..30).filter(|&n| config.is_slow(n)).collect();
        assert_eq!(slow, vec![9, 19, 29]);
        config.slow_fraction = 0.0;
        assert!((0..100).all(|n| !config.is_slow(n)));
    }

    #[test]
    fn empty_report_does_not_pass() {
        let err = LoadReport::default().check_no_failures().unwrap_err();
        assert!(matches!(err, LoadError::NoRequests { .. }));
    }
}
