//! The figures beside the strategy table: `baton reload --wait` latency
//! next to `hello`'s own start-up time measured without baton, the
//! supervisor's RSS and descriptor count over many reloads, and the data
//! path cost (throughput of `hello` under baton divided by `hello`
//! standalone).
//!
//! Start-up without baton: `hello` sends readiness only over baton's worker
//! channel (the SDK's `ready` does nothing standalone), so the bench gives
//! it a `NOTIFY_SOCKET` of its own and takes `READY=1` if it ever arrives,
//! and otherwise the time from spawn until the first complete response on
//! a fresh port (polled every 250µs). `hello` is executed directly, as baton
//! does, with no shell in between.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::runtime::Runtime;

use super::baton::BatonProc;
use super::procs::{self, Binaries, Proc};
use super::strategy::{LoadMix, LoadShape, Restarter};

/// The wake-up the bench sends its own notify reader when `hello` served
/// without sending `READY=1`.
const STOP_READER: &[u8] = b"BENCH_STOP";

/// `hello`'s start-up, once.
#[derive(Clone, Copy, Debug)]
pub struct Startup {
    /// From spawn to the first complete response.
    pub to_response: Duration,
    /// From spawn to `READY=1` on the bench's notify socket, if it came.
    pub to_ready: Option<Duration>,
}

/// One round of reload latencies and start-ups, measured back to back.
#[derive(Clone, Debug, Default)]
pub struct LatencyRound {
    /// Client-side wall time of each `reload --wait`, sorted.
    pub reloads: Vec<Duration>,
    /// Each start-up of `hello` standalone.
    pub startups: Vec<Startup>,
}

/// baton's RSS and descriptors after some number of reloads.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// Reloads done when sampled.
    pub reloads: u64,
    /// `VmRSS`, KiB.
    pub rss_kib: u64,
    /// Entries in `/proc/PID/fd`.
    pub fds: usize,
    /// CPU time baton has used so far.
    pub cpu: Duration,
}

/// Everything [`reloads_and_startup`] measured.
#[derive(Clone, Debug, Default)]
pub struct ReloadFigures {
    /// One per round.
    pub rounds: Vec<LatencyRound>,
    /// Samples at 0 reloads, after the warm-up, and at each quarter of the
    /// soak still ahead once the timed rounds are done.
    pub samples: Vec<Sample>,
    /// Reloads done in all.
    pub reloads: u64,
    /// Time spent inside `reload --wait` calls, in all.
    pub reload_time: Duration,
    /// Reloads baton answered as failed.
    pub failed: u64,
    /// The first few failure reasons.
    pub problems: Vec<String>,
}

/// The data path cost, per round.
#[derive(Clone, Debug, Default)]
pub struct DataPath {
    /// Successful requests per second with `hello` under baton.
    pub under_baton: Vec<f64>,
    /// Successful requests per second with `hello` standalone.
    pub standalone: Vec<f64>,
    /// Failed requests under baton (the promise: none).
    pub baton_failures: u64,
    /// Requests under baton, in all.
    pub baton_requests: u64,
    /// Failed requests standalone (none expected: nothing reloads).
    pub standalone_failures: u64,
}

impl DataPath {
    /// `under_baton / standalone`, per round.
    pub fn ratios(&self) -> Vec<f64> {
        self.under_baton
            .iter()
            .zip(&self.standalone)
            .map(|(b, s)| if *s > 0.0 { b / s } else { f64::NAN })
            .collect()
    }
}

/// How many reloads and start-ups [`reloads_and_startup`] does.
#[derive(Clone, Copy, Debug)]
pub struct ReloadPlan {
    /// Rounds of latency measurement.
    pub rounds: usize,
    /// Timed reloads per round.
    pub reloads_per_round: usize,
    /// Timed start-ups per round.
    pub startups_per_round: usize,
    /// Reloads in all (the timed ones included) before the last sample.
    pub soak_reloads: u64,
}

/// Reload latency beside `hello`'s start-up (rounds alternate the two),
/// then reloads up to `plan.soak_reloads` with baton's RSS and descriptors
/// sampled on the way. Samples are taken once old generations have exited.
pub fn reloads_and_startup(bins: &Binaries, plan: ReloadPlan) -> Result<ReloadFigures, String> {
    let dir = tempfile::Builder::new()
        .prefix("reload-bench-")
        .tempdir()
        .map_err(|e| format!("creating a temporary directory for start-ups: {e}"))?;
    let log_path = dir.path().join("hello.log");
    let log =
        File::create(&log_path).map_err(|e| format!("creating {}: {e}", log_path.display()))?;
    let baton = BatonProc::start(bins)?;
    let mut figures = ReloadFigures::default();
    let settle = Duration::from_secs(30);
    let sample = |figures: &mut ReloadFigures| -> Result<(), String> {
        baton.wait_settled(settle)?;
        figures.samples.push(Sample {
            reloads: figures.reloads,
            rss_kib: procs::rss_kib(baton.pid())?,
            fds: procs::settled_fd_count(baton.pid())?,
            cpu: procs::cpu_time(baton.pid())?,
        });
        Ok(())
    };
    let reload = |figures: &mut ReloadFigures| -> Result<Duration, String> {
        let answer = baton.reload()?;
        figures.reloads += 1;
        figures.reload_time += answer.wall;
        if let Some(error) = answer.error {
            figures.failed += 1;
            if figures.problems.len() < 5 {
                figures.problems.push(error);
            }
        }
        Ok(answer.wall)
    };

    sample(&mut figures)?;
    // Warm-up: the first reloads and the first start-up pay for page cache
    // and allocator growth once.
    for _ in 0..10 {
        reload(&mut figures)?;
    }
    startup_once(bins, dir.path(), 0, &log)?;
    sample(&mut figures)?;

    for round in 0..plan.rounds {
        let mut this = LatencyRound::default();
        for _ in 0..plan.reloads_per_round {
            this.reloads.push(reload(&mut figures)?);
        }
        this.reloads.sort_unstable();
        for n in 0..plan.startups_per_round {
            this.startups.push(startup_once(
                bins,
                dir.path(),
                1 + round * plan.startups_per_round + n,
                &log,
            )?);
        }
        figures.rounds.push(this);
    }

    // Samples at each quarter of the soak still ahead, and at its end.
    let mut checkpoints: Vec<u64> = (1..=4)
        .map(|k| plan.soak_reloads * k / 4)
        .filter(|&at| at > figures.reloads)
        .collect();
    checkpoints.dedup();
    for at in checkpoints {
        while figures.reloads < at {
            reload(&mut figures)?;
        }
        sample(&mut figures)?;
    }
    if figures.samples.last().map(|s| s.reloads) != Some(figures.reloads) {
        sample(&mut figures)?;
    }
    baton.stop()?;
    Ok(figures)
}

/// Starts `hello` standalone on a fresh port with a notify socket of the
/// bench's, times it until `READY=1` (if it comes) and until its first
/// complete response, then stops it.
fn startup_once(bins: &Binaries, dir: &Path, n: usize, log: &File) -> Result<Startup, String> {
    let notify_path = dir.join(format!("notify-{n}.sock"));
    let notify = UnixDatagram::bind(&notify_path)
        .map_err(|e| format!("binding the notify socket {}: {e}", notify_path.display()))?;
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| format!("setting a timeout on {}: {e}", notify_path.display()))?;
    // Reads datagrams until `READY=1` (its arrival time) or the bench's own
    // wake-up (none).
    let reader = std::thread::spawn(move || -> Option<Instant> {
        let mut buf = [0u8; 4096];
        loop {
            let len = notify.recv(&mut buf).ok()?;
            let message = &buf[..len];
            if message == STOP_READER {
                return None;
            }
            if message
                .split(|&b| b == b'\n')
                .any(|line| line == b"READY=1")
            {
                return Some(Instant::now());
            }
        }
    });
    let port = procs::reserve_port()?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut cmd = procs::hello_standalone(bins, log, port)?;
    cmd.env("NOTIFY_SOCKET", &notify_path);
    let spawned = Instant::now();
    let mut proc = Proc::spawn("hello", &mut cmd, None)?;
    let served = procs::wait_http(addr, Duration::from_secs(30), Some(&mut proc));
    let to_response = spawned.elapsed();
    let woke = UnixDatagram::unbound().and_then(|s| s.send_to(STOP_READER, &notify_path));
    let ready = reader
        .join()
        .map_err(|_| "the notify reader thread panicked".to_owned())?;
    woke.map_err(|e| format!("waking the notify reader: {e}"))?;
    served?;
    match proc.terminate(Duration::from_secs(10))? {
        status if status.success() => {}
        status => return Err(format!("hello exited with {status} on SIGTERM")),
    }
    // Best effort: the directory goes at the end anyway.
    let _ = std::fs::remove_file(&notify_path);
    Ok(Startup {
        to_response,
        to_ready: ready.map(|at| at.saturating_duration_since(spawned)),
    })
}

/// Steady-state throughput (fast requests only, no reloads) of `hello`
/// under baton and standalone, alternating which goes first.
pub fn data_path(
    bins: &Binaries,
    runtime: &Runtime,
    shape: &LoadShape,
    rounds: usize,
    duration: Duration,
) -> Result<DataPath, String> {
    let mut figures = DataPath::default();
    for round in 0..rounds {
        for under_baton in [round % 2 == 0, round % 2 == 1] {
            if under_baton {
                let baton = BatonProc::start(bins)?;
                let load = LoadMix::start(runtime, baton.addr(), shape, false);
                std::thread::sleep(duration);
                let report = load.finish(runtime);
                baton.stop()?;
                figures.baton_failures += report.counts.failed();
                figures.baton_requests += report.counts.total();
                figures.under_baton.push(rate(&report));
            } else {
                let hello = Restarter::start(bins, false, Duration::from_secs(30))?;
                let load = LoadMix::start(runtime, hello.addr(), shape, false);
                std::thread::sleep(duration);
                let report = load.finish(runtime);
                if let Some(problem) = hello.finish()? {
                    return Err(format!("stopping standalone hello: {problem}"));
                }
                figures.standalone_failures += report.counts.failed();
                figures.standalone.push(rate(&report));
            }
        }
    }
    Ok(figures)
}

fn rate(report: &crate::load::LoadReport) -> f64 {
    let secs = report.elapsed.as_secs_f64();
    if secs > 0.0 {
        report.counts.ok as f64 / secs
    } else {
        0.0
    }
}
