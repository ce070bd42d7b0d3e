//! The reload benchmark behind `reload-bench`: baton beside a naive restart
//! and a hold-the-socket restart, under the same load, in one run, plus the
//! figures that say what baton costs. [`run`] does it all and prints the
//! report; the binary only parses flags and maps the outcome to an exit
//! code.
//!
//! The parts: `strategy` (the strategies, the load mix, one round),
//! `figures` (reload latency beside `hello`'s own start-up, RSS and
//! descriptors over many reloads, data path cost), `protocols` (the data
//! path cost over h2c and HTTPS), `upgrade` (an upgrade of baton itself
//! beside a reload, and the load's latency during each), `crate::state_cost` (the
//! state hand-over cost), `baton` (a supervisor driven over its control
//! socket), `procs` (child guards, binaries, `/proc`), `stats` (medians,
//! quantiles, tables) and `sys` (the only `unsafe`: fd 3 and
//! `PR_SET_PDEATHSIG` in the child).
//!
//! Every figure is measured side by side over several rounds, strategies
//! interleaved, and shown as the median with min and max, because the
//! machines it runs on are small and shared. Every process it starts is
//! killed when its guard drops, on errors and panics too, and dies with
//! the bench if the bench is killed. It never fails because a strategy other
//! than baton drops requests: those failures are the result. It fails when
//! baton drops one.

pub mod baton;
pub mod figures;
pub mod procs;
pub mod protocols;
pub mod stats;
pub mod strategy;
pub mod upgrade;

use std::time::{Duration, Instant};

use crate::load::LatencySummary;
use figures::{DataPath, ReloadFigures, ReloadPlan};
use stats::{dur, ratio, secs, Spread, Table};
use strategy::{LoadShape, Round, Strategy};

/// How much to measure.
#[derive(Clone, Debug)]
pub struct Config {
    /// The seconds-long version for CI.
    pub smoke: bool,
    /// Rounds of every side-by-side figure.
    pub rounds: usize,
    /// The load.
    pub load: LoadShape,
    /// How long each strategy runs per round.
    pub round_duration: Duration,
    /// Time between reloads.
    pub reload_interval: Duration,
    /// Reload latency and start-up counts.
    pub reloads: ReloadPlan,
    /// How long each side of the data path comparison runs per round.
    pub data_path_duration: Duration,
    /// Run only this part (`--only`), for working on one figure.
    pub only: Option<Section>,
}

/// A part of the report, for `--only`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    /// The strategy table.
    Strategies,
    /// Reload latency, start-up, RSS and fds.
    Reloads,
    /// Data path cost.
    DataPath,
    /// State handoff cost.
    Handoff,
    /// Upgrading baton itself beside a reload.
    Upgrade,
}

impl Section {
    /// The section named `name` on the command line.
    pub fn parse(name: &str) -> Option<Section> {
        match name {
            "strategies" => Some(Section::Strategies),
            "reloads" => Some(Section::Reloads),
            "data-path" => Some(Section::DataPath),
            "handoff" => Some(Section::Handoff),
            "upgrade" => Some(Section::Upgrade),
            _ => None,
        }
    }
}

impl Config {
    /// The full run: about three minutes on two cores.
    pub fn full() -> Config {
        Config {
            smoke: false,
            rounds: 3,
            load: LoadShape {
                fast: 8,
                slow: 2,
                slow_ms: 100,
                keep_alive: 0.5,
                timeout: Duration::from_secs(5),
            },
            round_duration: Duration::from_secs(8),
            reload_interval: Duration::from_millis(200),
            reloads: ReloadPlan {
                rounds: 3,
                reloads_per_round: 100,
                startups_per_round: 20,
                soak_reloads: 1000,
            },
            data_path_duration: Duration::from_secs(5),
            only: None,
        }
    }

    /// Everything once, for seconds: so the bench cannot rot.
    pub fn smoke() -> Config {
        let full = Config::full();
        Config {
            smoke: true,
            rounds: 1,
            round_duration: Duration::from_millis(1500),
            reloads: ReloadPlan {
                rounds: 1,
                reloads_per_round: 20,
                startups_per_round: 3,
                soak_reloads: 50,
            },
            data_path_duration: Duration::from_secs(1),
            ..full
        }
    }
}

/// What the run found about baton's promise.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// Failed requests under baton (with and without reloads).
    pub baton_failed_requests: u64,
    /// Reloads baton answered as failed.
    pub baton_failed_reloads: u64,
    /// Requests under baton, in all.
    pub baton_requests: u64,
    /// Reloads done by baton, in all.
    pub baton_reloads: u64,
}

impl Outcome {
    /// baton dropped nothing and no reload failed.
    pub fn kept_the_promise(&self) -> bool {
        self.baton_failed_requests == 0 && self.baton_failed_reloads == 0
    }
}

/// Runs the whole bench with `config`, printing the report on stdout and
/// progress on stderr. An error means the bench itself could not run.
pub fn run(config: &Config) -> Result<Outcome, String> {
    let started = Instant::now();
    let bins = procs::Binaries::locate()?;
    let progress = |what: &str| {
        eprintln!("[{:>5.1}s] {what}", started.elapsed().as_secs_f64());
    };
    // The load runs on two threads of its own; the bench drives reloads
    // from the main thread, which starts every process (see `sys`).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("starting the load's tokio runtime: {e}"))?;

    print_header(config, &bins);
    let mut outcome = Outcome::default();
    let wants = |section: Section| config.only.is_none_or(|only| only == section);

    // Reload latency and start-ups first, while the bench is small: every
    // start-up forks this process, and a fork costs more the more memory
    // the forking process maps.
    let reloads = if wants(Section::Reloads) {
        progress("reload latency beside hello's start-up; RSS and fds over reloads");
        let reloads = figures::reloads_and_startup(&bins, config.reloads)?;
        outcome.baton_failed_reloads += reloads.failed;
        outcome.baton_reloads += reloads.reloads;
        Some(reloads)
    } else {
        None
    };

    if wants(Section::Strategies) {
        progress("checking whether hello takes LISTEN_FDS without baton");
        let hold_unsupported = strategy::probe_hold(&bins);
        let strategies: Vec<Strategy> = Strategy::ALL
            .into_iter()
            .filter(|s| *s != Strategy::Hold || hold_unsupported.is_none())
            .collect();
        let mut rounds: Vec<Round> = Vec::new();
        for round in 0..config.rounds {
            // Rotate the order so no strategy always runs first or last.
            let n = strategies.len();
            for i in 0..n {
                let strategy = strategies[(i + round) % n];
                progress(&format!(
                    "round {}/{}: {}",
                    round + 1,
                    config.rounds,
                    strategy.name()
                ));
                let mut ran = strategy::run_round(
                    strategy,
                    &bins,
                    &runtime,
                    &config.load,
                    config.round_duration,
                    config.reload_interval,
                )?;
                ran.round = round;
                rounds.push(ran);
            }
        }
        print_strategies(config, &rounds, hold_unsupported.as_deref());
        for round in rounds.iter().filter(|r| r.strategy.is_baton()) {
            outcome.baton_failed_requests += round.report.counts.failed();
            outcome.baton_failed_reloads += round.reload_problems;
            outcome.baton_requests += round.report.counts.total();
            outcome.baton_reloads += round.reloads;
        }
    }

    if let Some(reloads) = &reloads {
        print_reloads(reloads);
    }

    if wants(Section::DataPath) {
        progress("data path: hello under baton and standalone");
        let data_path = figures::data_path(
            &bins,
            &runtime,
            &config.load,
            config.rounds,
            config.data_path_duration,
        )?;
        print_data_path(config, &data_path);
        outcome.baton_failed_requests += data_path.baton_failures;
        outcome.baton_requests += data_path.baton_requests;
        progress("data path by protocol: h2c and HTTPS, under baton and standalone");
        let by_protocol = protocols::protocol_data_path(
            &bins,
            config.rounds,
            config.data_path_duration,
            config.load.fast,
        )?;
        print_protocol_paths(config, &by_protocol);
        for path in &by_protocol {
            outcome.baton_failed_requests += path.baton_failures;
            outcome.baton_requests += path.baton_requests;
        }
    }

    if wants(Section::Upgrade) {
        progress("upgrades of baton itself beside reloads, under load");
        let per_phase = if config.smoke { 5 } else { 30 };
        let figures = upgrade::measure(
            &bins,
            &runtime,
            &config.load,
            config.rounds,
            per_phase,
            Duration::from_millis(100),
        )?;
        upgrade::print(&figures);
        let (requests, upgrades) = upgrade::failures(&figures);
        outcome.baton_failed_requests += requests;
        outcome.baton_failed_reloads += upgrades;
        outcome.baton_requests += figures
            .loads
            .iter()
            .map(|(_, r)| r.counts.total())
            .sum::<u64>();
    }

    if wants(Section::Handoff) {
        println!("\n== State handoff ==");
        let (sizes, rounds): (&[usize], usize) = if config.smoke {
            (&[1 << 10, 1 << 20], 2)
        } else {
            (&[1 << 10, 1 << 20, 64 << 20], 5)
        };
        let rows = crate::state_cost::measure(sizes, rounds)?;
        println!("{}", crate::state_cost::table(&rows));
    }

    println!(
        "\nbaton: {} failed requests of {}, {} failed reloads of {}; whole run {:.0}s",
        outcome.baton_failed_requests,
        outcome.baton_requests,
        outcome.baton_failed_reloads,
        outcome.baton_reloads,
        started.elapsed().as_secs_f64()
    );
    Ok(outcome)
}

fn print_header(config: &Config, bins: &procs::Binaries) {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let shape = &config.load;
    println!(
        "reload-bench{}: {} round(s); baton and hello from {}",
        if config.smoke { " --smoke" } else { "" },
        config.rounds,
        bins.baton
            .parent()
            .map_or_else(String::new, |d| d.display().to_string())
    );
    println!("machine: {cpus} CPUs ({model}), Linux {kernel}");
    println!(
        "load: {} tasks sending GET / and {} sending GET /slow?ms={} (each at most one request \
         in flight), {:.0}% of each on keep-alive connections, the rest on a new connection per \
         request; {} per request before it is a timeout",
        shape.fast,
        shape.slow,
        shape.slow_ms,
        shape.keep_alive * 100.0,
        dur(shape.timeout)
    );
}

fn print_strategies(config: &Config, rounds: &[Round], hold_unsupported: Option<&str>) {
    println!(
        "\n== Requests while reloading hello every {} for {} ({} round(s) per strategy) ==",
        dur(config.reload_interval),
        dur(config.round_duration),
        config.rounds
    );
    let mut table = Table::new(&[
        "strategy",
        "reloads",
        "requests",
        "ok",
        "refused",
        "reset",
        "truncated",
        "timeout",
        "bad status",
        "other",
        "retried",
        "p50",
        "p99",
        "max",
        "throughput",
    ]);
    for strategy in Strategy::ALL {
        let mine: Vec<&Round> = rounds.iter().filter(|r| r.strategy == strategy).collect();
        if mine.is_empty() {
            let mut row = vec![strategy.name().to_owned(), "skipped".to_owned()];
            row.resize(15, "-".to_owned());
            table.row(row);
            continue;
        }
        let sum = |f: &dyn Fn(&Round) -> u64| mine.iter().map(|r| f(r)).sum::<u64>();
        let c = |f: fn(&crate::load::Counts) -> u64| sum(&|r: &Round| f(&r.report.counts));
        let quantiles = |pick: fn(&LatencySummary) -> Duration| {
            let per_round: Vec<Duration> = mine
                .iter()
                .filter_map(|r| r.latency.as_ref().map(pick))
                .collect();
            Spread::of_durations(&per_round).map_or_else(|| "-".into(), |s| secs(s.median))
        };
        let max = mine
            .iter()
            .filter_map(|r| r.latency.map(|l| l.max))
            .max()
            .map_or_else(|| "-".into(), dur);
        // Throughput relative to the no-reload row of the same round.
        let relative: Vec<f64> = mine
            .iter()
            .filter_map(|r| {
                let baseline = rounds
                    .iter()
                    .find(|x| x.round == r.round && x.strategy == Strategy::NoReloads)?;
                Some(r.ok_rate() / baseline.ok_rate())
            })
            .collect();
        let reloads = sum(&|r| r.reloads);
        let problems = sum(&|r| r.reload_problems);
        table.row(vec![
            strategy.name().to_owned(),
            if problems > 0 {
                format!("{reloads} ({problems} bad)")
            } else {
                reloads.to_string()
            },
            c(|c| c.total()).to_string(),
            c(|c| c.ok).to_string(),
            c(|c| c.refused).to_string(),
            c(|c| c.reset).to_string(),
            c(|c| c.truncated).to_string(),
            c(|c| c.timeout).to_string(),
            c(|c| c.bad_status).to_string(),
            c(|c| c.connect_error + c.malformed).to_string(),
            c(|c| c.retried).to_string(),
            quantiles(|l| l.p50),
            quantiles(|l| l.p99),
            max,
            Spread::of(&relative).map_or_else(|| "-".into(), |s| s.show(ratio)),
        ]);
    }
    print!("{table}");
    println!(
        "requests, failures and retried: summed over the rounds; p50 and p99: median of the \
         rounds; max: of all rounds; throughput: successful requests per second divided by the \
         no-reload row's in the same round, median (min–max). other = connect errors + malformed \
         responses; retried = first attempts on a reused keep-alive connection that the server \
         closed while idle, sent again (not failures)."
    );
    if let Some(reason) = hold_unsupported {
        let first = reason.lines().next().unwrap_or(reason);
        println!("hold-the-socket restart skipped: hello did not serve on a listener passed at fd 3 with LISTEN_FDS: {first}");
    }
    for strategy in Strategy::ALL {
        let mine: Vec<&Round> = rounds.iter().filter(|r| r.strategy == strategy).collect();
        // One example of each kind of failure, the first seen.
        let mut failures: Vec<&crate::load::Detail> = Vec::new();
        for detail in mine.iter().flat_map(|r| &r.report.failures) {
            if !failures.iter().any(|f| f.bin == detail.bin) {
                failures.push(detail);
            }
        }
        let problems: Vec<_> = mine.iter().flat_map(|r| &r.problems).take(3).collect();
        if failures.is_empty() && problems.is_empty() {
            continue;
        }
        println!("{}: a failure of each kind seen:", strategy.name());
        for failure in failures {
            println!("  {failure}");
        }
        for problem in problems {
            println!("  reload: {problem}");
        }
    }
}

fn print_reloads(figures: &ReloadFigures) {
    println!("\n== Reload latency beside hello's own start-up ==");
    let per_round = |q: f64| -> Option<Spread> {
        let values: Vec<Duration> = figures
            .rounds
            .iter()
            .filter_map(|r| stats::quantile(&r.reloads, q))
            .collect();
        Spread::of_durations(&values)
    };
    let show = |s: Option<Spread>| s.map_or_else(|| "-".into(), |s| s.show(secs));
    let reloads_per_round = figures.rounds.first().map_or(0, |r| r.reloads.len());
    let startups_per_round = figures.rounds.first().map_or(0, |r| r.startups.len());
    let all_ready = figures
        .rounds
        .iter()
        .flat_map(|r| &r.startups)
        .all(|s| s.to_ready.is_some());
    let startup = |q: f64, ready: bool| -> Option<Spread> {
        let values: Vec<Duration> = figures
            .rounds
            .iter()
            .filter_map(|r| {
                let mut times: Vec<Duration> = r
                    .startups
                    .iter()
                    .filter_map(|s| {
                        if ready {
                            s.to_ready
                        } else {
                            Some(s.to_response)
                        }
                    })
                    .collect();
                times.sort_unstable();
                stats::quantile(&times, q)
            })
            .collect();
        Spread::of_durations(&values)
    };
    let mut table = Table::new(&["", "p50", "p99"]);
    table.row(vec![
        format!("baton reload --wait ({reloads_per_round} per round, client's wall time)"),
        show(per_round(0.5)),
        show(per_round(0.99)),
    ]);
    if all_ready {
        table.row(vec![
            format!("hello start-up standalone, spawn to READY=1 ({startups_per_round} per round)"),
            show(startup(0.5, true)),
            show(startup(0.99, true)),
        ]);
    }
    table.row(vec![
        format!(
            "hello start-up standalone, spawn to first response ({startups_per_round} per round)"
        ),
        show(startup(0.5, false)),
        show(startup(0.99, false)),
    ]);
    print!("{table}");
    if !all_ready {
        println!(
            "(hello sends no READY=1 on NOTIFY_SOCKET without baton, so its start-up is timed from \
             spawn to its first complete response on a fresh port, polled every 250µs)"
        );
    }
    // The supervisor's share: reload p50 over start-up p50, per round.
    let shares: Vec<f64> = figures
        .rounds
        .iter()
        .filter_map(|r| {
            let reload = stats::quantile(&r.reloads, 0.5)?;
            let mut startups: Vec<Duration> = r
                .startups
                .iter()
                .map(|s| {
                    if all_ready {
                        s.to_ready.unwrap_or(s.to_response)
                    } else {
                        s.to_response
                    }
                })
                .collect();
            startups.sort_unstable();
            let startup = stats::quantile(&startups, 0.5)?;
            Some(reload.as_secs_f64() / startup.as_secs_f64())
        })
        .collect();
    if let Some(s) = Spread::of(&shares) {
        println!(
            "reload p50 / start-up p50: {} (median of rounds, min–max)",
            s.show(ratio)
        );
    }
    if figures.failed > 0 {
        println!("failed reloads: {}", figures.failed);
        for problem in &figures.problems {
            println!("  {problem}");
        }
    }

    println!(
        "\n== baton's memory and descriptors over {} reloads ==",
        figures.reloads
    );
    let mut table = Table::new(&["after reloads", "RSS", "open fds", "CPU time"]);
    for s in &figures.samples {
        table.row(vec![
            s.reloads.to_string(),
            format!("{:.1} MiB", s.rss_kib as f64 / 1024.0),
            s.fds.to_string(),
            dur(s.cpu),
        ]);
    }
    print!("{table}");
    if let (Some(first), Some(warm), Some(last)) = (
        figures.samples.first(),
        figures.samples.get(1),
        figures.samples.last(),
    ) {
        println!(
            "growth from {} to {} reloads: RSS {:+} KiB, fds {:+}; from 0: RSS {:+} KiB, fds {:+}",
            warm.reloads,
            last.reloads,
            last.rss_kib as i64 - warm.rss_kib as i64,
            last.fds as i64 - warm.fds as i64,
            last.rss_kib as i64 - first.rss_kib as i64,
            last.fds as i64 - first.fds as i64,
        );
        let reloads = last.reloads.saturating_sub(warm.reloads);
        if reloads > 0 {
            println!(
                "baton's CPU time per reload: {} (user + system, from {} to {} reloads)",
                dur(last.cpu.saturating_sub(warm.cpu) / reloads as u32),
                warm.reloads,
                last.reloads
            );
        }
    }
    if figures.reloads > 0 {
        println!(
            "{} reloads took {:.1}s inside reload --wait ({} each on average)",
            figures.reloads,
            figures.reload_time.as_secs_f64(),
            dur(figures.reload_time / figures.reloads as u32)
        );
    }
}

fn print_protocol_paths(config: &Config, paths: &[protocols::ProtocolPath]) {
    println!(
        "\n== Data path by protocol: hello under baton vs standalone, no reloads, {} tasks on 2 HTTP/2 connections (or one HTTP/1.1 connection each) for {} ({} round(s)) ==",
        config.load.fast,
        dur(config.data_path_duration),
        config.rounds
    );
    let rate =
        |v: &[f64]| Spread::of(v).map_or_else(|| "-".into(), |s| s.show(|x| format!("{x:.0}/s")));
    for path in paths {
        println!(
            "{:<15} under baton: {}; standalone: {}; ratio: {}",
            path.name,
            rate(&path.under_baton),
            rate(&path.standalone),
            Spread::of(&path.ratios()).map_or_else(|| "-".into(), |s| s.show(ratio))
        );
        if path.baton_failures + path.standalone_failures > 0 {
            println!(
                "  failed requests: {} under baton, {} standalone",
                path.baton_failures, path.standalone_failures
            );
        }
    }
}

fn print_data_path(config: &Config, figures: &DataPath) {
    println!(
        "\n== Data path: hello under baton vs standalone, no reloads, {} tasks of GET / for {} ({} round(s)) ==",
        config.load.fast,
        dur(config.data_path_duration),
        config.rounds
    );
    let rate =
        |v: &[f64]| Spread::of(v).map_or_else(|| "-".into(), |s| s.show(|x| format!("{x:.0}/s")));
    println!("under baton: {}", rate(&figures.under_baton));
    println!("standalone:  {}", rate(&figures.standalone));
    println!(
        "ratio (baton / standalone, per round): {}",
        Spread::of(&figures.ratios()).map_or_else(|| "-".into(), |s| s.show(ratio))
    );
    if figures.baton_failures + figures.standalone_failures > 0 {
        println!(
            "failed requests: {} under baton, {} standalone",
            figures.baton_failures, figures.standalone_failures
        );
    }
}
