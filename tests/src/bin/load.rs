//! `load`: the project's load client as a command, for trying baton by hand
//! against any HTTP server (the tests use the same client as a library).
//!
//! ```text
//! cargo run --release -p baton-tests --bin load -- 127.0.0.1:8080 10s
//!     [--concurrency N] [--keep-alive FRACTION] [--slow FRACTION] [--slow-ms MS]
//! ```
//!
//! It prints every request's bin, the latencies and the generations seen,
//! and exits non-zero if any request failed.

use std::process::ExitCode;
use std::time::Duration;

use baton_tests::load::{self, LoadConfig, Target};

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(message) => {
            eprintln!("load: {message}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<bool, String> {
    const USAGE: &str = "usage: load HOST:PORT|unix:PATH DURATION [--concurrency N] \
                         [--keep-alive FRACTION] [--slow FRACTION] [--slow-ms MS]";
    let mut args = std::env::args().skip(1);
    let target = args.next().ok_or(USAGE)?;
    let target = match target.strip_prefix("unix:") {
        Some(path) => Target::Unix(path.into()),
        None => Target::Tcp(
            target
                .parse()
                .map_err(|e| format!("target {target:?}: {e}; {USAGE}"))?,
        ),
    };
    let duration = args.next().ok_or(USAGE)?;
    let duration: Duration = humantime_like(&duration)?;
    let mut config = LoadConfig::new(target);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value; {USAGE}"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value:?}: {e}");
        match flag.as_str() {
            "--concurrency" => config.concurrency = value.parse().map_err(|e| bad(&e))?,
            "--keep-alive" => config.keep_alive_fraction = value.parse().map_err(|e| bad(&e))?,
            "--slow" => config.slow_fraction = value.parse().map_err(|e| bad(&e))?,
            "--slow-ms" => config.slow_ms = value.parse().map_err(|e| bad(&e))?,
            _ => return Err(format!("unknown option {flag}; {USAGE}")),
        }
    }
    let runtime = tokio::runtime::Runtime::new().map_err(|e| format!("starting tokio: {e}"))?;
    let report = runtime.block_on(async { load::run(config, tokio::time::sleep(duration)).await });
    println!("{report}");
    Ok(report.check_no_failures().is_ok())
}

/// `10s`, `500ms`, `2m`.
fn humantime_like(s: &str) -> Result<Duration, String> {
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 10s"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{s:?} is not a duration like 500ms, 10s or 2m")),
    }
}
