//! The test harness: runs the real `baton` binary and real workers, each test
//! in its own temporary directory, and talks to baton over its real control
//! socket.
//!
//! [`Baton`] is one running supervisor. Dropping it kills baton with SIGKILL
//! (its workers follow through `PR_SET_PDEATHSIG`) and, if the test is
//! failing, prints baton's log so the failure explains itself. Waiting is
//! always for an event with a deadline: a reload's answer, a status change,
//! a process exit. This module never sleeps to "let things settle".

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Whether a test's prerequisite is present. When it is not: under CI
/// (`CI=true`) the test fails, naming what is missing, because a test that
/// skips proves nothing; elsewhere it prints a loud SKIPPED line and the
/// caller returns.
pub fn prerequisite(what: &str, present: bool) -> bool {
    if present {
        return true;
    }
    let under_ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(
        !under_ci,
        "missing prerequisite under CI=true: {what} (.ci/run installs what the tests need)"
    );
    eprintln!("\n*** SKIPPED: {what} is missing; this test proved nothing ***\n");
    false
}

/// Whether the tests run as root; under CI they must (see [`prerequisite`]).
pub fn root(why: &str) -> bool {
    prerequisite(&format!("root ({why})"), nix::unistd::geteuid().is_root())
}

/// The Python worker used as "a plain worker in another language".
pub fn pyworker() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("workers/pyworker.py")
}

/// The Node worker (`server.listen({fd: 3})`), or `None` (after a loud
/// SKIPPED, or a failure under CI) when `node` is missing.
pub fn nodeworker() -> Option<Vec<String>> {
    let present = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    prerequisite("node (Debian's nodejs)", present).then(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("workers/nodeworker.js");
        vec!["node".to_owned(), script.display().to_string()]
    })
}

/// The directory holding the workspace's binaries for this build profile,
/// built once per test process so `cargo test` alone is enough.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // A test binary lives in target/<profile>/deps/, a bench binary in
        // target/<profile>/.
        let exe = std::env::current_exe().expect("the test binary has a path");
        let mut dir = exe
            .parent()
            .expect("the test binary lives in target/<profile>")
            .to_path_buf();
        if dir.file_name().is_some_and(|n| n == "deps") {
            dir.pop();
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        // The whole workspace, as `cargo test --workspace` builds it: the same
        // feature set, so this is a no-op after it rather than a rebuild.
        build.args(["build", "--quiet", "--workspace", "--bins"]);
        if dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        let status = build
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("running cargo build for the binaries under test");
        assert!(status.success(), "building baton and the examples failed");
        dir
    })
}

/// The path of a workspace binary (`baton`, or an example).
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// Polls `check` until it returns `Some`, or panics naming `what` at the
/// deadline. For conditions that no event announces (a status field).
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether process `pid` is gone (or a zombie nobody has reaped yet).
pub fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

/// Receives one datagram on `socket` with the descriptors it carries (as
/// systemd's notify socket does; `FDSTORE=1` sends some).
pub fn recv_with_fds(
    socket: &std::os::unix::net::UnixDatagram,
) -> std::io::Result<(String, Vec<std::os::fd::OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::AsRawFd;
    let mut buf = vec![0u8; 16 * 1024];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 8]);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            fds.extend(raw.into_iter().map(crate::sys::own));
        }
    }
    let len = msg.bytes;
    Ok((String::from_utf8_lossy(&buf[..len]).into_owned(), fds))
}

/// The children of process `pid`, from `/proc`.
pub fn children(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// One running `baton run`.
pub struct Baton {
    /// The test's own temporary directory (control socket, logs, files).
    pub dir: tempfile::TempDir,
    /// The control socket.
    pub control: PathBuf,
    child: Child,
    log: PathBuf,
    exit: Option<ExitStatus>,
}

/// How to start a baton.
pub struct BatonBuilder {
    dir: tempfile::TempDir,
    options: Vec<OsString>,
    command: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    control: Option<PathBuf>,
    wrap: Vec<OsString>,
    stderr: Option<Stdio>,
}

impl BatonBuilder {
    /// Puts the control socket at `path` instead of in the test's directory.
    pub fn control(mut self, path: impl Into<PathBuf>) -> Self {
        self.control = Some(path.into());
        self
    }

    /// Adds `baton run` options.
    pub fn args<I, S>(mut self, options: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.options.extend(options.into_iter().map(Into::into));
        self
    }

    /// Adds one `baton run` option with its value.
    pub fn option(mut self, flag: &str, value: impl Into<OsString>) -> Self {
        self.options.push(flag.into());
        self.options.push(value.into());
        self
    }

    /// Starts baton through `wrapper` (like `systemd-socket-activate -l ...`),
    /// which must exec baton in the end.
    pub fn wrap<I, S>(mut self, wrapper: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.wrap = wrapper.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the worker command.
    pub fn worker<I, S>(mut self, command: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.command = command.into_iter().map(Into::into).collect();
        self
    }

    /// The Python worker, reading extra flags from `<dir>/flags` at each
    /// start, so a test can make the next generation misbehave.
    pub fn pyworker(self, flags: &str) -> Self {
        let python = format!("python3 {}", pyworker().display());
        self.flagged(&python, flags)
    }

    /// Runs `command` (a shell word list) with the extra arguments in
    /// `<dir>/flags`, read again at each start: write that file (see
    /// [`Baton::set_flags`]) to change what the next generation does.
    pub fn flagged(self, command: &str, flags: &str) -> Self {
        let flags_file = self.dir.path().join("flags");
        std::fs::write(&flags_file, flags).expect("writing the worker flags file");
        let script = format!("exec {command} $(cat {})", flags_file.display());
        self.worker(["sh", "-c", &script])
    }

    /// Sets an environment variable for baton (and so its workers).
    pub fn env(mut self, key: &str, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Gives baton this stderr instead of the log file (stdout still goes
    /// there); [`Baton::log`] then shows only stdout.
    pub fn stderr(mut self, stderr: impl Into<Stdio>) -> Self {
        self.stderr = Some(stderr.into());
        self
    }

    /// The temporary directory this baton will use.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts baton; does not wait for the first generation.
    pub fn spawn(self) -> Baton {
        let control = self
            .control
            .unwrap_or_else(|| self.dir.path().join("baton.sock"));
        let log = self.dir.path().join("baton.log");
        let log_file = std::fs::File::create(&log).expect("creating the log file");
        let stderr = match self.stderr {
            Some(stderr) => stderr,
            None => log_file.try_clone().expect("dup of the log file").into(),
        };
        let mut cmd = match self.wrap.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(bin("baton"));
                cmd
            }
            None => Command::new(bin("baton")),
        };
        // `BATON_TEST_STEER=DUR` runs every baton with `--steer --steer-grace
        // DUR`: the whole suite with the mode on.
        let steer = std::env::var("BATON_TEST_STEER")
            .ok()
            .filter(|_| !self.options.iter().any(|o| o == "--steer"))
            .map(|grace| ["--steer".to_owned(), "--steer-grace".to_owned(), grace]);
        cmd.arg("run")
            .arg("--control")
            .arg(&control)
            .args(steer.iter().flatten())
            .args(&self.options)
            .arg("--")
            .args(&self.command)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .env("BATON_LOG", "debug")
            .envs(self.env)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(stderr);
        let child = cmd.spawn().expect("starting baton");
        Baton {
            dir: self.dir,
            control,
            child,
            log,
            exit: None,
        }
    }

    /// Starts baton and waits until its first generation serves.
    pub fn start(self) -> Baton {
        let mut baton = self.spawn();
        baton.wait_serving(1);
        baton
    }
}

impl Baton {
    /// A builder with a fresh temporary directory.
    pub fn builder() -> BatonBuilder {
        BatonBuilder {
            dir: tempfile::Builder::new()
                .prefix("baton-test-")
                .tempdir()
                .expect("creating a temporary directory"),
            options: Vec::new(),
            command: Vec::new(),
            env: Vec::new(),
            control: None,
            wrap: Vec::new(),
            stderr: None,
        }
    }

    /// Sets the extra arguments of the next generation (see
    /// [`BatonBuilder::flagged`]).
    pub fn set_flags(&self, flags: &str) {
        std::fs::write(self.dir.path().join("flags"), flags).expect("writing worker flags");
    }

    /// baton's pid.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Everything baton logged so far. baton's lines reach the log through
    /// its writer thread, a moment after the event they describe: to check
    /// that something was logged, wait for it with [`Baton::wait_log`].
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until baton's log contains `needle` and returns the whole log;
    /// panics with the log if it does not within 10s.
    ///
    /// To check that something is *absent*, first wait for a line baton logs
    /// after the event in question (its lines are written in order), then
    /// look in the log this returns.
    pub fn wait_log(&self, needle: &str) -> String {
        self.wait_log_count(needle, 1)
    }

    /// Waits until baton's log contains `needle` at least `n` times (not
    /// overlapping) and returns the whole log; panics with the log if it
    /// does not within 10s.
    pub fn wait_log_count(&self, needle: &str, n: usize) -> String {
        let timeout = Duration::from_secs(10);
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            let found = log.matches(needle).count();
            if found >= n {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {needle:?} {n} times in baton's log \
                 (found {found})\nlog:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends one control request and returns the answer.
    pub fn request(&self, request: &str) -> Value {
        let mut stream = UnixStream::connect(&self.control).unwrap_or_else(|e| {
            panic!(
                "connecting to {}: {e}\nbaton log:\n{}",
                self.control.display(),
                self.log()
            )
        });
        writeln!(stream, "{request}").expect("sending a control request");
        let mut line = String::new();
        BufReader::new(stream)
            .read_line(&mut line)
            .expect("reading a control answer");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad control answer {line:?}: {e}"))
    }

    /// `baton status --json`, over the socket.
    pub fn status(&self) -> Value {
        self.request(r#"{"command":"status"}"#)
    }

    /// `baton reload --wait`, over the socket: the reload's outcome.
    pub fn reload(&self) -> Value {
        self.request(r#"{"command":"reload","wait":true}"#)
    }

    /// A reload that must succeed; returns the new generation.
    pub fn reload_ok(&self) -> u64 {
        let answer = self.reload();
        assert_eq!(
            answer["ok"],
            Value::Bool(true),
            "reload failed: {answer}\nbaton log:\n{}",
            self.log()
        );
        answer["generation"].as_u64().expect("generation number")
    }

    /// Runs the `baton` client binary against this baton.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin("baton"))
            .args(args)
            .arg("--control")
            .arg(&self.control)
            .output()
            .expect("running the baton client")
    }

    /// Starts the `baton` client binary against this baton without waiting
    /// for it (for commands that wait, like `stop`).
    pub fn cli_spawn(&self, args: &[&str]) -> Child {
        Command::new(bin("baton"))
            .args(args)
            .arg("--control")
            .arg(&self.control)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the baton client")
    }

    /// The bound address of listener `name` (port 0 resolved).
    pub fn address(&self, name: &str) -> String {
        let status = self.status();
        status["listeners"]
            .as_array()
            .and_then(|ls| ls.iter().find(|l| l["name"] == name))
            .and_then(|l| l["address"].as_str())
            .unwrap_or_else(|| panic!("no listener {name} in {status}"))
            .to_owned()
    }

    /// The pid of generation `generation`'s worker, if it is alive.
    pub fn worker_pid(&self, generation: u64) -> Option<i32> {
        self.status()["generations"]
            .as_array()?
            .iter()
            .find(|g| g["generation"] == generation)
            .and_then(|g| g["pids"][0].as_i64())
            .map(|p| p as i32)
    }

    /// Waits until generation `generation` serves; panics with the log if
    /// baton exits first.
    pub fn wait_serving(&mut self, generation: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.try_exit() {
                panic!(
                    "baton exited ({status}) before generation {generation} served\nlog:\n{}",
                    self.log()
                );
            }
            if UnixStream::connect(&self.control).is_ok()
                && self.status()["generation"].as_u64() == Some(generation)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "generation {generation} not serving after 30s\nlog:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until only the serving generation is left (old ones drained).
    pub fn wait_settled(&self) {
        wait_for("old generations to exit", Duration::from_secs(30), || {
            let s = self.status();
            let all = s["generations"].as_array().map_or(0, Vec::len);
            (all == 1 && s["reload_queued"] == false && s["generation"].is_u64()).then_some(())
        });
    }

    /// Sends `signal` to baton itself.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal)
            .expect("signalling baton");
    }

    /// baton's exit status, if it has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().expect("waiting for baton");
        }
        self.exit
    }

    /// Waits for baton to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        wait_for("baton to exit", timeout, || self.try_exit())
    }
}

impl Drop for Baton {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- baton log ----\n{}\n-------------------", self.log());
        }
    }
}

/// A load running on its own runtime while the test thread drives baton.
pub struct Load {
    runtime: tokio::runtime::Runtime,
    handle: Option<crate::load::LoadHandle>,
}

impl Load {
    /// Starts `config` on two runtime threads of its own.
    pub fn start(config: crate::load::LoadConfig) -> Load {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("building the load runtime");
        let handle = runtime.block_on(async { crate::load::spawn(config) });
        Load {
            runtime,
            handle: Some(handle),
        }
    }

    /// A load of HTTP requests at baton's listener `name`.
    pub fn http(
        baton: &Baton,
        name: &str,
        configure: impl FnOnce(&mut crate::load::LoadConfig),
    ) -> Load {
        let addr = baton.address(name).parse().expect("a TCP listener address");
        let mut config = crate::load::LoadConfig::new(crate::load::Target::Tcp(addr));
        configure(&mut config);
        Load::start(config)
    }

    /// The report so far.
    pub fn report(&self) -> crate::load::LoadReport {
        self.handle.as_ref().expect("load running").report()
    }

    /// Waits until `n` more requests have completed successfully.
    pub fn wait_ok(&self, n: u64) {
        let handle = self.handle.as_ref().expect("load running");
        let target = handle.report().counts.ok + n;
        self.runtime
            .block_on(handle.wait_until(Duration::from_secs(30), |r| r.counts.ok >= target))
            .unwrap_or_else(|e| panic!("waiting for {n} successful requests: {e}"));
    }

    /// Stops starting requests and returns at once; [`Load::finish`] then
    /// waits for the ones in flight.
    pub fn stop_starting(&self) {
        self.handle.as_ref().expect("load running").stop_starting();
    }

    /// Stops the load, lets requests in flight finish, returns the report.
    pub fn finish(mut self) -> crate::load::LoadReport {
        let handle = self.handle.take().expect("load running");
        self.runtime.block_on(handle.stop())
    }
}
