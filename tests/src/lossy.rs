//! Servers nobody here wrote whose own graceful shutdown closes connections
//! they accepted but had not read yet (issue 16): Puma 5 (Debian's
//! package, socket-activated with `bind_to_activated_sockets 'only'`),
//! uvicorn (PyPI, `--fd 3`) and stock `axum::serve` graceful shutdown
//! (`listenfd-axum --axum-serve`). [`start`] runs one under baton, with or
//! without `--steer`; [`storm`] reloads it under counted load. The test
//! (`tests/steer.rs`) and the benchmark (`steer-bench`) share them. This
//! module asserts nothing about failures: its callers decide.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::harness::{bin, Baton, Load};
use crate::load::LoadReport;

/// One of the lossy servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// Puma 5 from Debian (`/usr/bin/puma`).
    Puma,
    /// uvicorn from `.ci/run`'s virtualenv.
    Uvicorn,
    /// `listenfd-axum --axum-serve`: stock axum graceful shutdown.
    AxumServe,
}

impl Server {
    /// All three, in table order.
    pub const ALL: [Server; 3] = [Server::Puma, Server::Uvicorn, Server::AxumServe];

    /// Its name in tables.
    pub fn name(self) -> &'static str {
        match self {
            Server::Puma => "Puma 5 (Debian)",
            Server::Uvicorn => "uvicorn --fd 3",
            Server::AxumServe => "axum::serve graceful",
        }
    }

    /// Where its program is, or what is missing and how to get it.
    pub fn program(self) -> Result<PathBuf, String> {
        match self {
            Server::Puma => find("puma", None)
                .ok_or_else(|| "puma (.ci/run installs it; or apt-get install puma)".into()),
            Server::Uvicorn => find("uvicorn", Some(venv("uvicorn")))
                .ok_or_else(|| "uvicorn (.ci/run installs it into target/ci-venv)".into()),
            Server::AxumServe => Ok(bin("listenfd-axum")),
        }
    }
}

/// `target/ci-venv/bin/NAME`.
fn venv(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/ci-venv/bin")
        .join(name)
}

/// `first` if it exists, else `name` in `PATH`.
fn find(name: &str, first: Option<PathBuf>) -> Option<PathBuf> {
    if let Some(p) = first.filter(|p| p.exists()) {
        return Some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.exists())
}

const RACK_APP: &str = r#"
require "json"
run lambda { |env|
  body = JSON.generate({ "generation" => ENV.fetch("BATON_GENERATION", "0").to_i, "pid" => Process.pid })
  [200, { "Content-Type" => "application/json", "Content-Length" => body.bytesize.to_s }, [body]]
}
"#;

const PUMA_CONFIG: &str = "bind_to_activated_sockets 'only'\nthreads 4, 4\nquiet\n";

const ASGI_APP: &str = r#"
import json, os

async def app(scope, receive, send):
    body = json.dumps({
        "generation": int(os.environ.get("BATON_GENERATION", "0")),
        "pid": os.getpid(),
    }).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]})
    await send({"type": "http.response.body", "body": body})
"#;

/// How long Puma and uvicorn (which never notify) are given to start:
/// `--ready after:` this.
pub const READY_AFTER: &str = "after:300ms";

/// `server` under baton on a port-0 TCP listener `http`, with
/// `--steer --steer-grace grace` if `grace` is given.
pub fn start(server: Server, grace: Option<&str>) -> Result<Baton, String> {
    let program = server.program()?;
    let mut builder = Baton::builder().args(["--listen", "http=tcp://127.0.0.1:0"]);
    if let Some(grace) = grace {
        builder = builder.args(["--steer", "--steer-grace", grace]);
    }
    let dir = builder.dir().to_path_buf();
    let write = |name: &str, text: &str| {
        std::fs::write(dir.join(name), text).map_err(|e| format!("writing {name}: {e}"))
    };
    let builder = match server {
        Server::Puma => {
            write("config.ru", RACK_APP)?;
            write("puma.rb", PUMA_CONFIG)?;
            builder.args(["--ready", READY_AFTER]).worker([
                program,
                "-C".into(),
                dir.join("puma.rb"),
                dir.join("config.ru"),
            ])
        }
        Server::Uvicorn => {
            write("app.py", ASGI_APP)?;
            builder.args(["--ready", READY_AFTER]).worker([
                program.into_os_string(),
                "--fd".into(),
                "3".into(),
                "--lifespan".into(),
                "off".into(),
                "--no-access-log".into(),
                "--log-level".into(),
                "warning".into(),
                "--app-dir".into(),
                dir.into_os_string(),
                "app:app".into(),
            ])
        }
        Server::AxumServe => builder.worker([program.into_os_string(), "--axum-serve".into()]),
    };
    Ok(builder.start())
}

/// What a storm measured.
pub struct Storm {
    /// Every request, counted.
    pub report: LoadReport,
    /// Each reload's time, from the request to the new generation serving.
    pub reloads: Vec<Duration>,
}

/// Reloads `baton` `reloads` times under a load of 8 clients, a fraction
/// `keep_alive` of whose requests go on kept-alive connections (the rest
/// each on a fresh one), letting some requests through between reloads.
pub fn storm(baton: &Baton, reloads: u64, keep_alive: f64) -> Storm {
    let load = Load::http(baton, "http", |c| {
        c.concurrency = 8;
        c.keep_alive_fraction = keep_alive;
    });
    load.wait_ok(50);
    let mut times = Vec::new();
    for _ in 0..reloads {
        let started = Instant::now();
        baton.reload_ok();
        times.push(started.elapsed());
        load.wait_ok(20);
    }
    load.wait_ok(50);
    Storm {
        report: load.finish(),
        reloads: times,
    }
}
