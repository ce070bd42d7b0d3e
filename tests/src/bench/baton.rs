//! [`BatonProc`]: one `baton run --listen http=tcp://127.0.0.1:0 -- hello`
//! in a temporary directory of its own (control socket, log), driven over
//! its control socket the way `baton reload --wait` and `baton status` are.
//! Dropping it kills baton (its workers follow through their
//! `PR_SET_PDEATHSIG`); [`BatonProc::stop`] is the orderly way out.
//!
//! Unlike `harness::Baton`, nothing here panics or builds: every problem is
//! an error that carries the end of baton's log.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::procs::{self, Binaries, Proc};

/// How long a control request may take before it is an error.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);

/// A running baton supervising `hello`.
pub struct BatonProc {
    /// Declared before `dir`: the process goes before its directory.
    proc: Proc,
    control: PathBuf,
    log: PathBuf,
    addr: SocketAddr,
    /// Holds the control socket and the log until the bench is done.
    _dir: tempfile::TempDir,
}

/// The answer to one `reload --wait`.
#[derive(Clone, Debug)]
pub struct Reload {
    /// From sending the request to reading the answer.
    pub wall: Duration,
    /// The reload succeeded: the new generation serves.
    pub ok: bool,
    /// baton's reason when it did not.
    pub error: Option<String>,
}

impl BatonProc {
    /// Starts baton with `hello` on a listener at a port of baton's choosing
    /// and waits until generation 1 serves.
    pub fn start(bins: &Binaries) -> Result<BatonProc, String> {
        BatonProc::start_with(bins, &[])
    }

    /// [`BatonProc::start`] with arguments for `hello` (`--tls CERT KEY`).
    pub fn start_with(
        bins: &Binaries,
        hello_args: &[&std::ffi::OsStr],
    ) -> Result<BatonProc, String> {
        let dir = tempfile::Builder::new()
            .prefix("reload-bench-")
            .tempdir()
            .map_err(|e| format!("creating a temporary directory for baton: {e}"))?;
        let control = dir.path().join("baton.sock");
        let log = dir.path().join("baton.log");
        let log_file = File::create(&log)
            .map_err(|e| format!("creating baton's log {}: {e}", log.display()))?;
        let mut cmd = procs::command(&bins.baton, &log_file)?;
        cmd.arg("run")
            .arg("--control")
            .arg(&control)
            .args(["--listen", "http=tcp://127.0.0.1:0", "--"])
            .arg(&bins.hello)
            .args(hello_args);
        let proc = Proc::spawn("baton", &mut cmd, None)?;
        let mut baton = BatonProc {
            proc,
            control,
            log,
            // Replaced below, once baton says where it listens.
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            _dir: dir,
        };
        baton.wait_first()?;
        Ok(baton)
    }

    /// Waits until generation 1 serves and reads the listener's address.
    fn wait_first(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.proc.try_exit()? {
                return Err(self.with_log(format!(
                    "baton exited ({status}) before its first generation served"
                )));
            }
            if UnixStream::connect(&self.control).is_ok() {
                let status = self.status()?;
                if status["generation"].as_u64() == Some(1) {
                    let address = status["listeners"][0]["address"].as_str().ok_or_else(|| {
                        self.with_log(format!("no listener address in status {status}"))
                    })?;
                    self.addr = address
                        .parse()
                        .map_err(|e| self.with_log(format!("listener address {address:?}: {e}")))?;
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(self.with_log("generation 1 not serving after 30s".into()));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// baton's pid.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Sends one control request (a JSON line) and returns the answer.
    pub fn request(&self, request: &str) -> Result<Value, String> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            self.with_log(format!(
                "{what} baton's control socket {}: {e}",
                self.control.display()
            ))
        };
        let mut stream =
            UnixStream::connect(&self.control).map_err(|e| fail("connecting to", &e))?;
        stream
            .set_read_timeout(Some(CONTROL_TIMEOUT))
            .map_err(|e| fail("setting a timeout on", &e))?;
        writeln!(stream, "{request}").map_err(|e| fail("sending a request on", &e))?;
        let mut line = String::new();
        BufReader::new(stream)
            .read_line(&mut line)
            .map_err(|e| fail("reading an answer from", &e))?;
        serde_json::from_str(&line)
            .map_err(|e| self.with_log(format!("baton's control answer {line:?}: {e}")))
    }

    /// `baton status --json`.
    pub fn status(&self) -> Result<Value, String> {
        self.request(r#"{"command":"status"}"#)
    }

    /// `baton reload --wait`, timed from the client's side.
    pub fn reload(&self) -> Result<Reload, String> {
        let started = Instant::now();
        let answer = self.request(r#"{"command":"reload","wait":true}"#)?;
        let wall = started.elapsed();
        let ok = answer["ok"] == Value::Bool(true);
        let error = (!ok).then(|| {
            answer["error"]
                .as_str()
                .map_or_else(|| answer.to_string(), str::to_owned)
        });
        Ok(Reload { wall, ok, error })
    }

    /// Waits until only the serving generation is left (every old one has
    /// drained and exited).
    pub fn wait_settled(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status()?;
            let generations = status["generations"].as_array().map_or(0, Vec::len);
            if generations == 1 && status["reload_queued"] == Value::Bool(false) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.with_log(format!(
                    "old generations still there after {timeout:?}: {status}"
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Stops baton with `SIGTERM` (it drains its workers) and waits for it.
    pub fn stop(mut self) -> Result<(), String> {
        match self.proc.terminate(Duration::from_secs(30)) {
            Ok(status) if status.success() => Ok(()),
            Ok(status) => Err(self.with_log(format!("baton exited with {status} on SIGTERM"))),
            Err(e) => Err(self.with_log(e)),
        }
    }

    /// `message`, followed by the last lines of baton's log.
    pub fn with_log(&self, message: String) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        format!("{message}\n--- end of baton's log ---\n{tail}")
    }
}
