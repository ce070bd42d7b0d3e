//! The data path cost by protocol: `hello`'s steady-state throughput over
//! h2c, HTTPS with ALPN `h2` and HTTPS with ALPN `http/1.1`, under baton
//! and standalone, side by side (the order alternating per round), with
//! `hyper_load`. baton is not on the data path (the worker accepts on the
//! socket itself), so the expected ratio is 1.
//!
//! It starts and stops its own processes; a certificate is made with
//! `rcgen` in a temporary directory. It never reloads.

use std::ffi::OsStr;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use super::baton::BatonProc;
use super::procs::{self, Binaries, Proc};
use crate::hyper_load::{tls_client, HyperLoad, HyperLoadConfig, Protocol};

/// One protocol's figures, per round.
#[derive(Clone, Debug, Default)]
pub struct ProtocolPath {
    /// The protocol's name (`Protocol::name`).
    pub name: &'static str,
    /// Successful requests per second under baton.
    pub under_baton: Vec<f64>,
    /// Successful requests per second standalone.
    pub standalone: Vec<f64>,
    /// Failed requests under baton (the promise: none).
    pub baton_failures: u64,
    /// Requests under baton, in all.
    pub baton_requests: u64,
    /// Failed requests standalone.
    pub standalone_failures: u64,
}

impl ProtocolPath {
    /// `under_baton / standalone`, per round.
    pub fn ratios(&self) -> Vec<f64> {
        self.under_baton
            .iter()
            .zip(&self.standalone)
            .map(|(b, s)| if *s > 0.0 { b / s } else { f64::NAN })
            .collect()
    }
}

/// How long a load may take to see its first successes.
const WARM_UP: Duration = Duration::from_secs(30);

/// Measures h2c, HTTPS h2 and HTTPS http/1.1, `rounds` times each side,
/// `duration` per measurement, with `tasks` client tasks on 2 connections
/// (HTTP/2) or one connection each (HTTP/1.1).
pub fn protocol_data_path(
    bins: &Binaries,
    rounds: usize,
    duration: Duration,
    tasks: usize,
) -> Result<Vec<ProtocolPath>, String> {
    let dir = tempfile::Builder::new()
        .prefix("reload-bench-tls-")
        .tempdir()
        .map_err(|e| format!("creating a temporary directory for the certificate: {e}"))?;
    let (cert, key, der) = certificate(dir.path())?;
    let tls_args: [&OsStr; 3] = ["--tls".as_ref(), cert.as_os_str(), key.as_os_str()];
    let tls = |http2| Protocol::Tls {
        config: tls_client(&der, http2),
        server_name: "localhost".into(),
        http2,
    };
    let protocols = [
        (Protocol::H2c, &[][..]),
        (tls(true), &tls_args[..]),
        (tls(false), &tls_args[..]),
    ];
    let mut figures = Vec::new();
    for (protocol, args) in protocols {
        let mut path = ProtocolPath {
            name: protocol.name(),
            ..ProtocolPath::default()
        };
        for round in 0..rounds {
            for under_baton in [round % 2 == 0, round % 2 == 1] {
                if under_baton {
                    let baton = BatonProc::start_with(bins, args)?;
                    let (rate, report) = measure(baton.addr(), &protocol, tasks, duration)
                        .map_err(|e| baton.with_log(e))?;
                    baton.stop()?;
                    path.baton_failures += report.counts.failed();
                    path.baton_requests += report.counts.total();
                    path.under_baton.push(rate);
                } else {
                    let (mut hello, addr) = standalone(bins, args, dir.path())?;
                    let measured = measure(addr, &protocol, tasks, duration);
                    let stopped = hello.terminate(Duration::from_secs(30));
                    let (rate, report) = measured?;
                    stopped?;
                    path.standalone_failures += report.counts.failed();
                    path.standalone.push(rate);
                }
            }
        }
        figures.push(path);
    }
    Ok(figures)
}

/// A self-signed certificate for `localhost` as PEM files in `dir`: the
/// paths, and the certificate's DER for the clients.
fn certificate(dir: &Path) -> Result<(std::path::PathBuf, std::path::PathBuf, Vec<u8>), String> {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()])
        .map_err(|e| format!("generating a certificate: {e}"))?;
    let (cert_path, key_path) = (dir.join("bench.crt"), dir.join("bench.key"));
    std::fs::write(&cert_path, cert.cert.pem())
        .map_err(|e| format!("writing {}: {e}", cert_path.display()))?;
    std::fs::write(&key_path, cert.key_pair.serialize_pem())
        .map_err(|e| format!("writing {}: {e}", key_path.display()))?;
    Ok((cert_path, key_path, cert.cert.der().to_vec()))
}

/// `hello` without baton on a reserved port, with `args`.
fn standalone(bins: &Binaries, args: &[&OsStr], dir: &Path) -> Result<(Proc, SocketAddr), String> {
    let log_path = dir.join("hello.log");
    let log = std::fs::File::create(&log_path)
        .map_err(|e| format!("creating {}: {e}", log_path.display()))?;
    let port = procs::reserve_port()?;
    let mut cmd = procs::hello_standalone(bins, &log, port)?;
    cmd.args(args);
    let proc = Proc::spawn("hello", &mut cmd, None)?;
    Ok((proc, SocketAddr::from((Ipv4Addr::LOCALHOST, port))))
}

/// Runs a load at `addr` until it succeeds, then counts the successes of
/// `duration`: the rate, and the whole report.
fn measure(
    addr: SocketAddr,
    protocol: &Protocol,
    tasks: usize,
    duration: Duration,
) -> Result<(f64, crate::load::LoadReport), String> {
    let mut config = HyperLoadConfig::new(addr, protocol.clone());
    config.concurrency = tasks;
    config.connections = 2;
    let load = HyperLoad::start(config);
    // A standalone hello binds when it starts: until then the load's
    // connections are refused. Wait for a first success, then count anew.
    load.try_wait_ok(1, WARM_UP)?;
    let before = load.report();
    let started = Instant::now();
    std::thread::sleep(duration);
    let after = load.report();
    let elapsed = started.elapsed().as_secs_f64();
    let report = load.finish();
    let ok = after.counts.ok.saturating_sub(before.counts.ok);
    // Refusals before the first success were a standalone hello starting,
    // not failures of the data path.
    let mut counted = report.clone();
    counted.counts.refused = counted.counts.refused.saturating_sub(before.counts.refused);
    Ok((ok as f64 / elapsed, counted))
}
