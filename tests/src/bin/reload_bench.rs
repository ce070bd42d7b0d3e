//! `reload-bench`: baton beside a naive restart and a hold-the-socket
//! restart of the same worker under the same load, plus what baton costs
//! (reload latency beside the worker's own start-up, data path, memory and
//! descriptors over many reloads), in one run. The work is in
//! `baton_tests::bench`; this file parses flags and maps the outcome to an
//! exit code.
//!
//! ```text
//! cargo build --release --workspace
//! cargo run --release -p baton-tests --bin reload-bench            # full, ~3 minutes
//! cargo run --release -p baton-tests --bin reload-bench -- --smoke # seconds, for CI
//! ```
//!
//! `RELOAD_BENCH_SMOKE=1` is the same as `--smoke`; `--rounds N` changes
//! the number of rounds; `--only SECTION` runs one part of the report. Exit status: 0 when
//! baton dropped no request and failed no reload, 1 when it did (the other
//! strategies' failures are the result, not an error), 2 when the bench
//! could not run.

use std::process::ExitCode;

use baton_tests::bench::{self, Config, Section};

const USAGE: &str =
    "usage: reload-bench [--smoke] [--rounds N] [--only strategies|reloads|data-path|handoff|upgrade]";

fn main() -> ExitCode {
    let config = match parse(std::env::args().skip(1)) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("reload-bench: {message}");
            return ExitCode::from(2);
        }
    };
    match bench::run(&config) {
        Ok(outcome) if outcome.kept_the_promise() => ExitCode::SUCCESS,
        Ok(outcome) => {
            eprintln!(
                "reload-bench: baton broke its promise: {} failed request(s), {} failed reload(s)",
                outcome.baton_failed_requests, outcome.baton_failed_reloads
            );
            ExitCode::FAILURE
        }
        Err(message) => {
            eprintln!("reload-bench: {message}");
            ExitCode::from(2)
        }
    }
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Config, String> {
    let smoke_env = std::env::var("RELOAD_BENCH_SMOKE").is_ok_and(|v| !v.is_empty() && v != "0");
    let mut smoke = smoke_env;
    let mut rounds = None;
    let mut only = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--smoke" => smoke = true,
            "--rounds" => {
                let value = args
                    .next()
                    .ok_or_else(|| format!("--rounds needs a number; {USAGE}"))?;
                let n: usize = value
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("--rounds {value:?}: not a positive number"))?;
                rounds = Some(n);
            }
            "--only" => {
                let value = args
                    .next()
                    .ok_or_else(|| format!("--only needs a section; {USAGE}"))?;
                only = Some(
                    Section::parse(&value)
                        .ok_or_else(|| format!("--only {value:?}: no such section; {USAGE}"))?,
                );
            }
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other:?}; {USAGE}")),
        }
    }
    let mut config = if smoke {
        Config::smoke()
    } else {
        Config::full()
    };
    config.only = only;
    if let Some(n) = rounds {
        config.rounds = n;
        config.reloads.rounds = n;
    }
    Ok(config)
}
