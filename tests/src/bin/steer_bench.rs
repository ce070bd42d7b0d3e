//! `steer-bench`: `--steer` (issue 16) measured. Puma, uvicorn and stock
//! `axum::serve` reloaded under counted load (half the requests on
//! kept-alive connections; Puma also with fresh connections only), with the
//! mode off and on side by side (failed requests counted, reload time);
//! then the data path cost
//! of steering: the same fresh-connection load on `listenfd-axum` with and
//! without `--steer`, no reloads.
//!
//! ```text
//! cargo build --release --workspace
//! cargo run --release -p baton-tests --bin steer-bench [-- --reloads 50 --grace 200ms]
//! ```
//!
//! A server whose program is missing is skipped with a line saying so.

use std::process::ExitCode;
use std::time::Duration;

use baton_tests::harness::{bin, Baton, Load};
use baton_tests::lossy::{self, Server, Storm};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

/// The `q` quantile of `times` (nearest rank).
fn quantile(times: &[Duration], q: f64) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort_unstable();
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len().max(1)) - 1;
    sorted.get(i).copied().unwrap_or_default()
}

fn row(server: Server, load: &str, mode: &str, storm: &Storm) -> String {
    let c = &storm.report.counts;
    format!(
        "| {} | {load} | {mode} | {} | {} | {} | {} | {} | {} |",
        server.name(),
        storm.reloads.len(),
        c.ok,
        c.retried,
        storm.report.counts.failed(),
        ms(quantile(&storm.reloads, 0.5)),
        ms(quantile(&storm.reloads, 1.0)),
    )
}

/// Requests per second and p50/p99 latency of fresh-connection load on
/// `listenfd-axum`, steered or not, for `secs`.
fn data_path(steer: bool, secs: u64) -> String {
    let mut builder = Baton::builder().args(["--listen", "http=tcp://127.0.0.1:0"]);
    if steer {
        builder = builder.args(["--steer"]);
    }
    let baton = builder.worker([bin("listenfd-axum")]).start();
    let load = Load::http(&baton, "http", |c| {
        c.concurrency = 8;
        c.keep_alive_fraction = 0.0;
    });
    load.wait_ok(200);
    let before = load.report();
    std::thread::sleep(Duration::from_secs(secs));
    let report = load.finish();
    let ok = report.counts.ok - before.counts.ok;
    let elapsed = report.elapsed - before.elapsed;
    let latencies = &report.latencies[before.latencies.len()..];
    format!(
        "| listenfd-axum, fresh connections | {} | {:.0} | {} | {} | {} |",
        if steer { "on" } else { "off" },
        ok as f64 / elapsed.as_secs_f64(),
        format_args!("{:.2}", quantile(latencies, 0.5).as_secs_f64() * 1000.0),
        format_args!("{:.2}", quantile(latencies, 0.99).as_secs_f64() * 1000.0),
        report.counts.failed(),
    )
}

fn main() -> ExitCode {
    let reloads: u64 = arg("--reloads").and_then(|r| r.parse().ok()).unwrap_or(50);
    let grace = arg("--grace").unwrap_or_else(|| "200ms".into());
    let secs: u64 = arg("--seconds").and_then(|r| r.parse().ok()).unwrap_or(5);
    println!("reload storms: {reloads} reloads each, --steer-grace {grace}\n");
    println!(
        "| server | connections | --steer | reloads | ok | retried | failed | reload p50 ms | \
         reload max ms |"
    );
    println!("| --- | --- | --- | --: | --: | --: | --: | --: | --: |");
    for server in Server::ALL {
        if let Err(missing) = server.program() {
            println!(
                "| {} | skipped: {missing} missing | | | | | | |",
                server.name()
            );
            continue;
        }
        // Puma also with fresh connections only: its failures on kept-alive
        // connections are its own shutdown's, which steering cannot reach.
        let loads: &[(f64, &str)] = match server {
            Server::Puma => &[(0.5, "mixed"), (0.0, "fresh")],
            _ => &[(0.5, "mixed")],
        };
        for &(keep_alive, load) in loads {
            for (mode, g) in [("off", None), ("on", Some(grace.as_str()))] {
                let baton = match lossy::start(server, g) {
                    Ok(b) => b,
                    Err(e) => {
                        eprintln!("steer-bench: {}: {e}", server.name());
                        return ExitCode::FAILURE;
                    }
                };
                let storm = lossy::storm(&baton, reloads, keep_alive);
                println!("{}", row(server, load, mode, &storm));
                for f in storm.report.failures.iter().take(3) {
                    eprintln!("  {} {load} {mode}: {f}", server.name());
                }
            }
        }
    }
    println!("\ndata path: {secs}s of load, 8 clients, a new connection per request\n");
    println!("| worker | --steer | requests/s | p50 ms | p99 ms | failed |");
    println!("| --- | --- | --: | --: | --: | --: |");
    for steer in [false, true] {
        println!("{}", data_path(steer, secs));
    }
    ExitCode::SUCCESS
}
