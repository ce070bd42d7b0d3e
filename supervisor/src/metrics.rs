//! `--metrics ADDR`: Prometheus text on `GET /metrics`.
//!
//! The event loop keeps its counters in a [`Metrics`] and publishes a copy
//! after every event on a `watch` channel; the server here renders the
//! latest copy, so a scrape never waits on the loop and the loop never waits
//! on a scraper. Like the control socket, the server bounds what a client
//! may send (one request head, at most 8 KiB, within 5 s; no body) and how
//! many connections it serves at once, so a slowloris or a flood costs
//! nothing but its own connections.
//!
//! This module never touches supervisor state.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::Error;

/// The reload duration histogram's upper bounds, in seconds.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// The longest request head read.
const MAX_HEAD: usize = 8192;
/// How long a client may take to send it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How many scrapes are served at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 16;

/// What the loop counts, as published to the metrics server (and carried
/// across an upgrade of baton).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Metrics {
    /// The serving generation.
    pub serving_generation: Option<u64>,
    /// Workers starting, serving, draining.
    pub workers: [u64; 3],
    /// Reloads whose new generation served.
    pub reloads_ok: u64,
    /// Reloads that failed.
    pub reloads_failed: u64,
    /// How many reloads took at most each of `BUCKETS` seconds.
    pub reload_buckets: [u64; BUCKETS.len()],
    /// Every reload's duration, summed, in seconds.
    pub reload_seconds: f64,
    /// Crash restarts started.
    pub worker_restarts: u64,
    /// `--build` runs that failed.
    pub build_failures: u64,
    /// The size of the kept values baton holds.
    pub kept_bytes: Option<u64>,
    /// The last hand-over's accept pause, in seconds.
    pub last_accept_pause: Option<f64>,
    /// baton is stopping.
    pub stopping: bool,
    /// Upgrades of baton itself whose new supervisor runs.
    pub upgrades_ok: u64,
    /// Upgrades of baton itself that failed.
    pub upgrades_failed: u64,
}

impl Metrics {
    /// Counts a finished reload that took `took`.
    pub fn reload(&mut self, ok: bool, took: Duration) {
        if ok {
            self.reloads_ok += 1;
        } else {
            self.reloads_failed += 1;
        }
        let seconds = took.as_secs_f64();
        self.reload_seconds += seconds;
        for (bound, count) in BUCKETS.iter().zip(&mut self.reload_buckets) {
            if seconds <= *bound {
                *count += 1;
            }
        }
    }

    /// The Prometheus text exposition (format 0.0.4) of these metrics and
    /// the control socket's connection count.
    pub fn render(&self, control_connections: u64) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let one = |v: String| vec![(String::new(), v)];
        metric(
            "baton_serving_generation",
            "gauge",
            "The generation that serves (0 while none does).",
            &one(self.serving_generation.unwrap_or(0).to_string()),
        );
        let states = ["starting", "serving", "draining"];
        metric(
            "baton_workers",
            "gauge",
            "Worker processes, by state.",
            &states
                .iter()
                .zip(self.workers)
                .map(|(s, n)| (format!("{{state=\"{s}\"}}"), n.to_string()))
                .collect::<Vec<_>>(),
        );
        metric(
            "baton_reloads_total",
            "counter",
            "Reloads, by result.",
            &[
                ("{result=\"ok\"}".into(), self.reloads_ok.to_string()),
                (
                    "{result=\"failed\"}".into(),
                    self.reloads_failed.to_string(),
                ),
            ],
        );
        let count = self.reloads_ok + self.reloads_failed;
        let mut histogram: Vec<(String, String)> = BUCKETS
            .iter()
            .zip(self.reload_buckets)
            .map(|(b, n)| (format!("_bucket{{le=\"{b}\"}}"), n.to_string()))
            .collect();
        histogram.push(("_bucket{le=\"+Inf\"}".into(), count.to_string()));
        histogram.push(("_sum".into(), self.reload_seconds.to_string()));
        histogram.push(("_count".into(), count.to_string()));
        metric(
            "baton_reload_duration_seconds",
            "histogram",
            "How long reloads took, from trigger to outcome.",
            &histogram,
        );
        metric(
            "baton_worker_restarts_total",
            "counter",
            "Crashed workers restarted.",
            &one(self.worker_restarts.to_string()),
        );
        metric(
            "baton_upgrades_total",
            "counter",
            "Upgrades of baton itself in place, by result.",
            &[
                ("{result=\"ok\"}".into(), self.upgrades_ok.to_string()),
                (
                    "{result=\"failed\"}".into(),
                    self.upgrades_failed.to_string(),
                ),
            ],
        );
        metric(
            "baton_build_failures_total",
            "counter",
            "--build runs that failed.",
            &one(self.build_failures.to_string()),
        );
        metric(
            "baton_kept_state_bytes",
            "gauge",
            "The size of the kept values baton holds for the next generation.",
            &one(self.kept_bytes.unwrap_or(0).to_string()),
        );
        metric(
            "baton_last_accept_pause_seconds",
            "gauge",
            "The last hand-over of kept values: how long no generation accepted.",
            &one(self.last_accept_pause.unwrap_or(0.0).to_string()),
        );
        metric(
            "baton_control_connections_total",
            "counter",
            "Connections to the control socket.",
            &one(control_connections.to_string()),
        );
        metric(
            "baton_stopping",
            "gauge",
            "1 while baton stops.",
            &one(u8::from(self.stopping).to_string()),
        );
        out
    }
}

/// Parses `--metrics`: `tcp://HOST:PORT` (or `HOST:PORT`; `[::1]:9090`).
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.strip_prefix("tcp://")
        .unwrap_or(s)
        .parse()
        .map_err(|_| format!("{s:?} is not an address like tcp://127.0.0.1:9090"))
}

/// Binds the metrics listener (non-blocking, close-on-exec).
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, Error> {
    let err = |source| Error::Bind {
        name: "--metrics".into(),
        addr: addr.to_string(),
        source,
    };
    let listener = std::net::TcpListener::bind(addr).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    Ok(listener)
}

/// Serves `GET /metrics` on `listener` (bound by [`bind`], or carried
/// across an upgrade) from what `metrics` publishes; returns where.
pub fn serve(
    listener: std::net::TcpListener,
    metrics: watch::Receiver<Metrics>,
    control_connections: Arc<AtomicU64>,
) -> Result<SocketAddr, Error> {
    let addr = listener.local_addr().map_err(|source| Error::Io {
        context: "--metrics: its address".into(),
        source,
    })?;
    let listener = TcpListener::from_std(listener).map_err(|source| Error::Io {
        context: "--metrics: serving".into(),
        source,
    })?;
    let bound = listener.local_addr().unwrap_or(addr);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("metrics: accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let metrics = metrics.clone();
            let control = control_connections.clone();
            tokio::spawn(async move {
                answer(stream, metrics, control).await;
                drop(permit);
            });
        }
    });
    Ok(bound)
}

/// Reads one request head (bounded) and answers it.
async fn answer(
    mut stream: TcpStream,
    metrics: watch::Receiver<Metrics>,
    control_connections: Arc<AtomicU64>,
) {
    let head = tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)).await;
    let response = match head {
        Ok(Some(head))
            if head.starts_with("GET /metrics ") || head.starts_with("GET /metrics?") =>
        {
            let body = metrics
                .borrow()
                .render(control_connections.load(Ordering::Relaxed));
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        }
        Ok(Some(_)) => {
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned()
        }
        // Too long, too slow, or gone: nothing to answer.
        _ => return,
    };
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, stream.write_all(response.as_bytes())).await;
    let _ = stream.shutdown().await;
}

/// The request head, up to the blank line; `None` if it is longer than
/// [`MAX_HEAD`] or the client went away.
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            return Some(String::from_utf8_lossy(&head).into_owned());
        }
        if head.len() > MAX_HEAD {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!(
            parse_addr("tcp://127.0.0.1:9090"),
            Ok("127.0.0.1:9090".parse().unwrap())
        );
        assert_eq!(
            parse_addr("127.0.0.1:0"),
            Ok("127.0.0.1:0".parse().unwrap())
        );
        assert_eq!(
            parse_addr("tcp://[::1]:9090"),
            Ok("[::1]:9090".parse().unwrap())
        );
        assert!(parse_addr("tcp://localhost").is_err());
    }

    #[test]
    fn the_histogram_counts_each_reload_in_every_bucket_it_fits() {
        let mut m = Metrics::default();
        m.reload(true, Duration::from_millis(3));
        m.reload(false, Duration::from_millis(200));
        assert_eq!(m.reload_buckets[0], 1);
        assert_eq!(m.reload_buckets[5], 2);
        let text = m.render(7);
        assert!(
            text.contains("baton_reloads_total{result=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("baton_reload_duration_seconds_count 2"),
            "{text}"
        );
        assert!(
            text.contains("baton_reload_duration_seconds_bucket{le=\"+Inf\"} 2"),
            "{text}"
        );
        assert!(text.contains("baton_control_connections_total 7"), "{text}");
    }
}
