//! The reload strategies the bench compares, and one round of one of them:
//! the same load ([`LoadMix`]) against `hello` while the strategy reloads
//! it at a fixed rate.
//!
//! - [`Strategy::NoReloads`]: `hello` under baton, never reloaded; the
//!   throughput every other row is divided by.
//! - [`Strategy::Baton`]: `hello` under baton, `baton reload --wait`.
//! - [`Strategy::Naive`]: `hello` standalone, binding its port itself; a
//!   reload is SIGTERM, wait for the exit, start again (a plain service
//!   restart).
//! - [`Strategy::Hold`]: the bench binds the listener once and passes it at
//!   fd 3 (`LISTEN_FDS`), as `systemfd` does for `cargo watch`; a reload is
//!   SIGTERM, wait for the exit, then start the next `hello`.
//!
//! Like `baton reload --wait`, a restart is over when the new `hello`
//! answers a request (the bench's own probe, not counted in the load).
//! Reloads follow a fixed clock: one that overruns its tick delays the
//! next, which then starts at once; later ticks are not made up.
//!
//! The bench's processes never share anything between rounds: each round
//! starts its own baton or `hello` and stops it at the end.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use tokio::runtime::Runtime;

use super::baton::BatonProc;
use super::procs::{self, Binaries, Proc};
use super::stats;
use crate::load::{self, LatencySummary, LoadConfig, LoadHandle, LoadReport, Target};

/// How long a stopped `hello` may take to drain and exit before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A way of replacing the worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Under baton, no reloads: the reference throughput.
    NoReloads,
    /// `baton reload --wait`.
    Baton,
    /// Stop the worker, start it again; it binds the port itself.
    Naive,
    /// A parent holds the socket; stop the worker, then start the next.
    Hold,
}

impl Strategy {
    /// Every strategy, in table order.
    pub const ALL: [Strategy; 4] = [
        Strategy::NoReloads,
        Strategy::Baton,
        Strategy::Naive,
        Strategy::Hold,
    ];

    /// The row's name in the table.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::NoReloads => "no reloads (baton)",
            Strategy::Baton => "baton reload",
            Strategy::Naive => "naive restart",
            Strategy::Hold => "hold-the-socket restart",
        }
    }

    /// Whether this strategy makes baton's promise (zero failed requests).
    pub fn is_baton(self) -> bool {
        matches!(self, Strategy::NoReloads | Strategy::Baton)
    }
}

/// The shape of the load: `fast` tasks send `GET /` back to back, `slow`
/// tasks send only `GET /slow?ms=SLOW_MS`, so a slow request is in flight
/// at almost every reload without bounding the throughput by sleeps. In
/// both, `keep_alive` of the tasks keep their connection and the others
/// open one per request.
#[derive(Clone, Debug)]
pub struct LoadShape {
    /// Tasks sending fast requests.
    pub fast: usize,
    /// Tasks sending slow requests.
    pub slow: usize,
    /// How long a slow request takes on the server.
    pub slow_ms: u64,
    /// Fraction of the tasks (of each kind) on keep-alive connections.
    pub keep_alive: f64,
    /// Deadline of one request; past it, `timeout`.
    pub timeout: Duration,
}

/// The fast and the slow load of a [`LoadShape`], running on the bench's
/// runtime. Dropping it stops both.
pub struct LoadMix {
    handles: Vec<LoadHandle>,
}

impl LoadMix {
    /// Starts the load against `addr`; without `with_slow`, only the fast
    /// tasks (for steady-state throughput).
    pub fn start(
        runtime: &Runtime,
        addr: SocketAddr,
        shape: &LoadShape,
        with_slow: bool,
    ) -> LoadMix {
        let config = |concurrency: usize, slow_fraction: f64| {
            let mut config = LoadConfig::new(Target::Tcp(addr));
            config.concurrency = concurrency;
            config.keep_alive_fraction = shape.keep_alive;
            config.slow_fraction = slow_fraction;
            config.slow_ms = shape.slow_ms;
            config.timeout = shape.timeout;
            // Enough to find an example of every kind of failure.
            config.max_details = 1000;
            config
        };
        let _entered = runtime.enter();
        let mut handles = vec![load::spawn(config(shape.fast, 0.0))];
        if with_slow && shape.slow > 0 {
            handles.push(load::spawn(config(shape.slow, 1.0)));
        }
        LoadMix { handles }
    }

    /// Stops the load, lets requests in flight finish, and returns one
    /// report for both.
    pub fn finish(self, runtime: &Runtime) -> LoadReport {
        let reports = runtime.block_on(async move {
            let mut reports = Vec::new();
            for handle in self.handles {
                reports.push(handle.stop().await);
            }
            reports
        });
        stats::merge(reports)
    }
}

/// `hello` started and restarted by the bench itself, without baton.
pub struct Restarter {
    bins: Binaries,
    mode: Mode,
    addr: SocketAddr,
    log: File,
    current: Option<Proc>,
    /// Holds `hello`'s log until the round is over.
    _dir: tempfile::TempDir,
}

enum Mode {
    /// `hello` binds `127.0.0.1:port` itself at every start.
    Naive { port: u16 },
    /// The bench's listener goes to every `hello` at fd 3.
    Hold { listener: TcpListener },
}

impl Restarter {
    /// Starts the first `hello` (naive: on a port reserved now; hold: on a
    /// listener the bench binds and keeps) and waits until it serves, at
    /// most `ready_timeout`.
    pub fn start(
        bins: &Binaries,
        hold: bool,
        ready_timeout: Duration,
    ) -> Result<Restarter, String> {
        let dir = tempfile::Builder::new()
            .prefix("reload-bench-")
            .tempdir()
            .map_err(|e| format!("creating a temporary directory for hello: {e}"))?;
        let log_path = dir.path().join("hello.log");
        let log =
            File::create(&log_path).map_err(|e| format!("creating {}: {e}", log_path.display()))?;
        let (mode, addr) = if hold {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .map_err(|e| format!("binding the held listener on 127.0.0.1:0: {e}"))?;
            let addr = listener
                .local_addr()
                .map_err(|e| format!("reading the held listener's address: {e}"))?;
            (Mode::Hold { listener }, addr)
        } else {
            let port = procs::reserve_port()?;
            (
                Mode::Naive { port },
                SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            )
        };
        let mut restarter = Restarter {
            bins: bins.clone(),
            mode,
            addr,
            log,
            current: None,
            _dir: dir,
        };
        restarter.spawn()?;
        let proc = restarter.current.as_mut();
        procs::wait_http(addr, ready_timeout, proc).map_err(|e| {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            format!("first hello: {e}\n--- hello's log ---\n{log}")
        })?;
        Ok(restarter)
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn spawn(&mut self) -> Result<(), String> {
        let proc = match &self.mode {
            Mode::Naive { port } => {
                let mut cmd = procs::hello_standalone(&self.bins, &self.log, *port)?;
                Proc::spawn("hello", &mut cmd, None)?
            }
            Mode::Hold { listener } => {
                let mut cmd = procs::hello_hold(&self.bins, &self.log)?;
                Proc::spawn("hello", &mut cmd, Some(listener.as_fd()))?
            }
        };
        self.current = Some(proc);
        Ok(())
    }

    /// Stops the running `hello` (SIGTERM, wait for its exit), starts the
    /// next one and waits until it answers a request, as `reload --wait`
    /// waits for the new generation to serve (and as `systemctl restart`
    /// waits for a notify service). Returns what went wrong, if anything:
    /// the old one had died, did not exit in time or exited with a failure,
    /// or the new one did not serve.
    pub fn restart(&mut self) -> Result<Option<String>, String> {
        let problem = self.stop_current()?;
        self.spawn()?;
        let proc = self.current.as_mut();
        if let Err(e) = procs::wait_http(self.addr, STOP_TIMEOUT, proc) {
            return Ok(Some(match problem {
                Some(problem) => format!("{problem}; then the next hello: {e}"),
                None => format!("the next hello: {e}"),
            }));
        }
        Ok(problem)
    }

    fn stop_current(&mut self) -> Result<Option<String>, String> {
        let Some(mut old) = self.current.take() else {
            return Ok(None);
        };
        if let Some(status) = old.try_exit()? {
            return Ok(Some(format!(
                "hello had exited ({status}) before it was stopped"
            )));
        }
        Ok(match old.terminate(STOP_TIMEOUT) {
            Ok(status) if status.success() => None,
            Ok(status) => Some(format!("hello exited with {status} on SIGTERM")),
            Err(e) => Some(e),
        })
    }

    /// Stops the running `hello`.
    pub fn finish(mut self) -> Result<Option<String>, String> {
        self.stop_current()
    }
}

/// Checks that `hello` takes a listener at fd 3 when it runs without baton
/// (`LISTEN_FDS`): `None` if it does, else why not.
pub fn probe_hold(bins: &Binaries) -> Option<String> {
    match Restarter::start(bins, true, Duration::from_secs(3)) {
        Ok(restarter) => restarter.finish().err(),
        Err(e) => Some(e),
    }
}

/// A strategy's setup while a round runs.
enum Running {
    Baton(BatonProc),
    Restart(Restarter),
}

impl Running {
    fn start(strategy: Strategy, bins: &Binaries) -> Result<Running, String> {
        let ready = Duration::from_secs(30);
        Ok(match strategy {
            Strategy::NoReloads | Strategy::Baton => Running::Baton(BatonProc::start(bins)?),
            Strategy::Naive => Running::Restart(Restarter::start(bins, false, ready)?),
            Strategy::Hold => Running::Restart(Restarter::start(bins, true, ready)?),
        })
    }

    fn addr(&self) -> SocketAddr {
        match self {
            Running::Baton(baton) => baton.addr(),
            Running::Restart(restarter) => restarter.addr(),
        }
    }

    /// One reload; `Ok(Some(reason))` when it failed but the round goes on.
    fn reload(&mut self) -> Result<Option<String>, String> {
        match self {
            Running::Baton(baton) => baton.reload().map(|r| r.error),
            Running::Restart(restarter) => restarter.restart(),
        }
    }

    fn finish(self) -> Result<Option<String>, String> {
        match self {
            Running::Baton(baton) => baton.stop().map(|()| None),
            Running::Restart(restarter) => restarter.finish(),
        }
    }
}

/// What one round of one strategy gave.
#[derive(Debug)]
pub struct Round {
    /// Which round of the run (from 0); set by the caller.
    pub round: usize,
    /// Which strategy.
    pub strategy: Strategy,
    /// The load's report: fast and slow tasks together, without its
    /// `latencies` (summarized in `latency`; a full run would otherwise
    /// hold millions of them).
    pub report: LoadReport,
    /// p50, p99 and max latency of the successful requests.
    pub latency: Option<LatencySummary>,
    /// Reloads done.
    pub reloads: u64,
    /// Reloads that went wrong (baton: failed; restarts: the old worker
    /// had died, would not stop, or exited with a failure).
    pub reload_problems: u64,
    /// The first few of those, described.
    pub problems: Vec<String>,
}

impl Round {
    fn note(&mut self, problem: String) {
        self.reload_problems += 1;
        if self.problems.len() < 5 {
            self.problems.push(problem);
        }
    }

    /// Successful requests per second.
    pub fn ok_rate(&self) -> f64 {
        let secs = self.report.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.report.counts.ok as f64 / secs
        } else {
            0.0
        }
    }
}

/// Runs `shape`'s load against `hello` under `strategy` for `duration`,
/// reloading every `interval` (none for [`Strategy::NoReloads`]). A reload
/// that takes longer than `interval` delays the next one; missed ticks are
/// not made up.
pub fn run_round(
    strategy: Strategy,
    bins: &Binaries,
    runtime: &Runtime,
    shape: &LoadShape,
    duration: Duration,
    interval: Duration,
) -> Result<Round, String> {
    let mut running = Running::start(strategy, bins)?;
    let load = LoadMix::start(runtime, running.addr(), shape, true);
    let started = Instant::now();
    let end = started + duration;
    let mut round = Round {
        round: 0,
        strategy,
        report: LoadReport::default(),
        latency: None,
        reloads: 0,
        reload_problems: 0,
        problems: Vec::new(),
    };
    if strategy != Strategy::NoReloads {
        let mut next = started + interval;
        while next < end {
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            if let Some(problem) = running.reload()? {
                round.note(problem);
            }
            round.reloads += 1;
            next = (next + interval).max(Instant::now());
        }
    }
    std::thread::sleep(end.saturating_duration_since(Instant::now()));
    round.report = load.finish(runtime);
    round.latency = round.report.latency_summary();
    round.report.latencies = Vec::new();
    if let Some(problem) = running.finish()? {
        round.note(problem);
    }
    Ok(round)
}
