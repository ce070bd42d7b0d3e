//! `--metrics` read by Prometheus' own text parser (the `prometheus-client`
//! Python package, which `.ci/run` installs) before, during and after a
//! reload storm, its counters checked against `baton status --json`; a
//! slowloris on the metrics port that must not delay a reload; and the
//! shell completions, loaded by a real bash.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use baton_tests::harness::{self, bin, Baton, Load};
use serde_json::Value;

/// A Python with `prometheus_client`: `.ci/run`'s virtualenv, or the
/// system's if it has the package.
fn prometheus_python() -> Option<PathBuf> {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/ci-venv/bin/python");
    [venv, PathBuf::from("python3")].into_iter().find(|python| {
        std::process::Command::new(python)
            .args(["-c", "import prometheus_client.parser"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Parses `text` with Prometheus' parser; returns `{name: value}` of every
/// sample (labels folded into the name as `name{k="v"}`).
fn parse(python: &PathBuf, text: &str) -> serde_json::Map<String, Value> {
    let program = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        out[s.name + ("{" + labels + "}" if labels else "")] = s.value
print(json.dumps(out))
"#;
    let mut child = std::process::Command::new(python)
        .args(["-c", program])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running the parser");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feeding the parser");
    let out = child.wait_with_output().expect("the parser");
    assert!(
        out.status.success(),
        "Prometheus' parser refused the metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the parser's JSON")
}

/// The metrics address baton logged.
fn metrics_addr(baton: &Baton) -> String {
    let log = baton.wait_log("metrics on http://");
    log.split("metrics on http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("the metrics address")
        .to_owned()
}

fn scrape(addr: &str) -> String {
    baton_tests::http::get(addr, "/metrics", Duration::from_secs(5)).expect("GET /metrics")
}

#[test]
fn metrics_parse_with_prometheus_parser_through_a_reload_storm_and_match_status() {
    let python = prometheus_python();
    if !harness::prerequisite(
        "Python's prometheus_client (.ci/run installs it; or pip install prometheus-client)",
        python.is_some(),
    ) {
        return;
    }
    let python = python.expect("checked");
    let baton = Baton::builder()
        .args([
            "--listen",
            "http=tcp://127.0.0.1:0",
            "--metrics",
            "tcp://127.0.0.1:0",
        ])
        .pyworker("")
        .start();
    let addr = metrics_addr(&baton);
    let before = parse(&python, &scrape(&addr));
    assert_eq!(before["baton_serving_generation"], 1.0);
    assert_eq!(before["baton_workers{state=\"serving\"}"], 1.0);

    let load = Load::http(&baton, "http", |c| c.concurrency = 4);
    load.wait_ok(20);
    // Reload storm, scraping as it goes.
    let storm = {
        let control = baton.control.clone();
        std::thread::spawn(move || {
            for _ in 0..10 {
                let out = std::process::Command::new(bin("baton"))
                    .args(["reload", "--wait", "--control"])
                    .arg(&control)
                    .output()
                    .expect("baton reload");
                assert!(out.status.success(), "{out:?}");
            }
        })
    };
    let mut scrapes = 0;
    while !storm.is_finished() {
        parse(&python, &scrape(&addr));
        scrapes += 1;
    }
    storm.join().expect("the storm");
    assert!(scrapes > 0);
    load.finish().assert_no_failures();
    baton.wait_settled();

    let after = parse(&python, &scrape(&addr));
    let status = baton.status();
    assert_eq!(
        after["baton_serving_generation"],
        status["generation"].as_f64().expect("a generation")
    );
    assert_eq!(
        after["baton_reloads_total{result=\"ok\"}"],
        status["reloads"]["ok"].as_f64().expect("ok")
    );
    assert_eq!(
        after["baton_reloads_total{result=\"failed\"}"],
        status["reloads"]["failed"].as_f64().expect("failed")
    );
    assert_eq!(after["baton_reload_duration_seconds_count"], 10.0);
    assert!(after["baton_control_connections_total"].as_f64() > Some(10.0));
}

#[test]
fn a_slowloris_on_the_metrics_port_does_not_delay_a_reload() {
    let baton = Baton::builder()
        .args([
            "--listen",
            "http=tcp://127.0.0.1:0",
            "--metrics",
            "tcp://127.0.0.1:0",
        ])
        .pyworker("")
        .start();
    let addr = metrics_addr(&baton);
    // More idle, half-sent requests than the server answers at once.
    let idle: Vec<_> = (0..64)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(&addr).expect("connect");
            s.write_all(b"GET /metr").expect("half a request");
            s
        })
        .collect();
    let started = Instant::now();
    assert_eq!(baton.reload_ok(), 2);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "the reload took {took:?}");
    // A body or an endless head is refused; the server is still there
    // once the idle ones time out.
    drop(idle);
    harness::wait_for("a scrape to be answered", Duration::from_secs(15), || {
        baton_tests::http::get(&addr, "/metrics", Duration::from_secs(2)).ok()
    });
}

#[test]
fn completions_load_in_bash_and_the_man_page_renders() {
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source <({} completions bash) && complete -p baton",
            bin("baton").display()
        ))
        .output()
        .expect("running bash");
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("_baton baton"));
    for shell in ["zsh", "fish"] {
        let out = std::process::Command::new(bin("baton"))
            .args(["completions", shell])
            .output()
            .expect("baton completions");
        assert!(out.status.success() && out.stdout.len() > 1000, "{shell}");
    }
    let man = std::process::Command::new(bin("baton"))
        .arg("man")
        .output()
        .expect("baton man");
    let page = String::from_utf8_lossy(&man.stdout);
    assert!(
        page.contains(".TH baton 1") && page.contains("reload"),
        "{page}"
    );
}
