//! An upgrade of baton itself in place beside a reload: the client's wall
//! time of `baton upgrade --wait` (command to the new supervisor's answer,
//! the pre-flight included) next to `baton reload --wait`, and whether any
//! request slowed: the latency of `hello`'s requests while nothing happens,
//! while baton reloads, and while it upgrades itself, each under the same
//! load, every request counted.
//!
//! Phases alternate within a round (quiet, reloads, upgrades) so that the
//! machine's noise falls on all three. This module never asserts a number:
//! it measures and prints.

use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::runtime::Runtime;

use super::baton::BatonProc;
use super::procs::Binaries;
use super::stats::{self, Spread, Table};
use super::strategy::{LoadMix, LoadShape};
use crate::load::LoadReport;

/// What one phase of a round does while the load runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Quiet,
    Reloads,
    Upgrades,
}

const PHASES: [Phase; 3] = [Phase::Quiet, Phase::Reloads, Phase::Upgrades];

/// Everything [`measure`] found.
#[derive(Debug, Default)]
pub struct UpgradeFigures {
    /// Client wall time of every `reload --wait`, sorted.
    pub reloads: Vec<Duration>,
    /// Client wall time of every `upgrade --wait`, sorted.
    pub upgrades: Vec<Duration>,
    /// The load's report per phase (quiet, reloads, upgrades), merged over
    /// rounds.
    pub loads: Vec<(String, LoadReport)>,
    /// Reloads or upgrades baton answered as failed, with why.
    pub problems: Vec<String>,
    /// baton's pid before and after: the same process.
    pub same_pid: bool,
}

/// `rounds` rounds of `per_phase` reloads and upgrades under the fast part
/// of `shape`, one every `interval`.
pub fn measure(
    bins: &Binaries,
    runtime: &Runtime,
    shape: &LoadShape,
    rounds: usize,
    per_phase: usize,
    interval: Duration,
) -> Result<UpgradeFigures, String> {
    let baton = BatonProc::start(bins)?;
    let pid = baton.pid();
    let mut figures = UpgradeFigures::default();
    let mut loads: Vec<Vec<LoadReport>> = vec![Vec::new(); PHASES.len()];
    for _ in 0..rounds {
        for (i, phase) in PHASES.iter().enumerate() {
            let load = LoadMix::start(runtime, baton.addr(), shape, false);
            std::thread::sleep(interval);
            for _ in 0..per_phase {
                let started = Instant::now();
                let answer = match phase {
                    Phase::Quiet => None,
                    Phase::Reloads => Some(baton.request(r#"{"command":"reload","wait":true}"#)?),
                    Phase::Upgrades => Some(baton.request(r#"{"command":"upgrade","wait":true}"#)?),
                };
                let wall = started.elapsed();
                match answer {
                    Some(a) if a["ok"] == Value::Bool(true) => match phase {
                        Phase::Reloads => figures.reloads.push(wall),
                        _ => figures.upgrades.push(wall),
                    },
                    Some(a) => figures.problems.push(a.to_string()),
                    None => {}
                }
                std::thread::sleep(interval);
            }
            baton.wait_settled(Duration::from_secs(30))?;
            loads[i].push(load.finish(runtime));
        }
    }
    figures.same_pid = baton.status()?["pid"].as_u64() == Some(u64::from(pid));
    figures.reloads.sort_unstable();
    figures.upgrades.sort_unstable();
    figures.loads = PHASES
        .iter()
        .zip(loads)
        .map(|(p, reports)| {
            let name = match p {
                Phase::Quiet => "nothing happens",
                Phase::Reloads => "baton reloads",
                Phase::Upgrades => "baton upgrades itself",
            };
            (name.to_owned(), stats::merge(reports))
        })
        .collect();
    baton.stop()?;
    Ok(figures)
}

/// Prints the figures.
pub fn print(figures: &UpgradeFigures) {
    println!("\n== Upgrading baton itself beside a reload ==");
    let show = |times: &[Duration], q: f64| {
        stats::quantile(times, q).map_or_else(|| "-".into(), stats::dur)
    };
    let mut table = Table::new(&["client's wall time", "n", "p50", "p99", "max"]);
    for (name, times) in [
        ("baton reload --wait", &figures.reloads),
        (
            "baton upgrade --wait (pre-flight + exec + first answer)",
            &figures.upgrades,
        ),
    ] {
        table.row(vec![
            name.into(),
            times.len().to_string(),
            show(times, 0.5),
            show(times, 0.99),
            show(times, 1.0),
        ]);
    }
    print!("{table}");
    let mut table = Table::new(&[
        "hello's requests while",
        "ok",
        "failed",
        "p50",
        "p99",
        "max",
    ]);
    for (name, report) in &figures.loads {
        let l = report.latency_summary();
        let cell = |f: fn(&crate::load::LatencySummary) -> Duration| {
            l.as_ref().map_or_else(|| "-".into(), |l| stats::dur(f(l)))
        };
        table.row(vec![
            name.clone(),
            report.counts.ok.to_string(),
            report.counts.failed().to_string(),
            cell(|l| l.p50),
            cell(|l| l.p99),
            cell(|l| l.max),
        ]);
    }
    print!("{table}");
    let spread = Spread::of_durations(&figures.upgrades);
    if let Some(s) = spread {
        println!(
            "upgrades: {} (median, min–max); the same baton pid throughout: {}",
            s.show(stats::secs),
            figures.same_pid
        );
    }
    for problem in figures.problems.iter().take(5) {
        println!("  failed: {problem}");
    }
}

/// Failed requests while baton reloaded or upgraded, and failed upgrades.
pub fn failures(figures: &UpgradeFigures) -> (u64, u64) {
    let requests = figures.loads.iter().map(|(_, r)| r.counts.failed()).sum();
    (
        requests,
        figures.problems.len() as u64 + u64::from(!figures.same_pid),
    )
}
