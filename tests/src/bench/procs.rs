//! Processes the bench starts, and what it reads about them: finding the
//! `baton` and `hello` binaries, [`Proc`] (a child that is killed when its
//! guard drops, even on an error or a panic), the environment every worker
//! starts from, the hold-the-socket shim, a minimal HTTP probe, and RSS and
//! descriptor counts from `/proc`.
//!
//! Where no event announces what the bench waits for (a port that starts
//! accepting, a child that exits), it polls with a short sleep and a
//! deadline; nothing here sleeps to "let things settle".

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How often exit and connect polls look again.
const POLL: Duration = Duration::from_micros(250);

/// The binaries under test, found next to the bench's own executable.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// The supervisor.
    pub baton: PathBuf,
    /// The SDK `hello` example.
    pub hello: PathBuf,
}

impl Binaries {
    /// Finds `baton` and `hello` in the directory of the running executable
    /// (`target/release/` for `cargo run --release`).
    pub fn locate() -> Result<Binaries, String> {
        let exe = std::env::current_exe()
            .map_err(|e| format!("finding the bench's own executable: {e}"))?;
        let dir = exe
            .parent()
            .ok_or_else(|| format!("the bench executable {} has no directory", exe.display()))?;
        let find = |name: &str| {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(format!(
                    "`{name}` not found at {}: build everything first with \
                     `cargo build --release --workspace`",
                    path.display()
                ))
            }
        };
        Ok(Binaries {
            baton: find("baton")?,
            hello: find("hello")?,
        })
    }
}

/// A started child process. Dropping it kills the child with `SIGKILL`
/// and reaps it, unless it has already exited and been reaped.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    exit: Option<ExitStatus>,
}

impl Proc {
    /// Starts `cmd` as `name` (for messages), with fd 3 set up as
    /// `crate::sys::spawn` describes.
    pub fn spawn(
        name: &str,
        cmd: &mut Command,
        fd3: Option<BorrowedFd<'_>>,
    ) -> Result<Proc, String> {
        let child = crate::sys::spawn(cmd, fd3)
            .map_err(|e| format!("starting {name} ({:?}): {e}", cmd.get_program()))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            exit: None,
        })
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The name messages use.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The exit status, if the child has exited (reaping it).
    pub fn try_exit(&mut self) -> Result<Option<ExitStatus>, String> {
        if self.exit.is_none() {
            self.exit = self
                .child
                .try_wait()
                .map_err(|e| format!("waiting for {} (pid {}): {e}", self.name, self.pid()))?;
        }
        Ok(self.exit)
    }

    /// Sends `signal` unless the child has been reaped already.
    pub fn signal(&mut self, signal: Signal) -> Result<(), String> {
        if self.exit.is_some() {
            return Ok(());
        }
        kill(Pid::from_raw(self.pid() as i32), signal).map_err(|e| {
            format!(
                "sending {signal} to {} (pid {}): {e}",
                self.name,
                self.pid()
            )
        })
    }

    /// Waits at most `timeout` for the child to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(POLL);
        }
    }

    /// `SIGTERM`, then waits for the exit; after `timeout`, `SIGKILL` and an
    /// error saying so.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        self.signal(Signal::SIGTERM)?;
        if let Some(status) = self.wait_exit(timeout)? {
            return Ok(status);
        }
        self.kill();
        Err(format!(
            "{} (pid {}) was still running {timeout:?} after SIGTERM; killed it",
            self.name,
            self.pid()
        ))
    }

    /// `SIGKILL` and reap, ignoring errors (the child may be gone).
    fn kill(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            self.exit = self.child.wait().ok();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Variables the bench's own environment may carry that would change how a
/// worker or baton starts; every command the bench runs starts without them.
const WORKER_ENV: [&str; 8] = [
    "BATON_CHANNEL_FD",
    "BATON_GENERATION",
    "BATON_LISTEN",
    "BATON_CONTROL",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
];

/// A command for `program` with the worker variables removed, stdin from
/// `/dev/null` and stdout and stderr appended to `log`.
pub fn command(program: &Path, log: &File) -> Result<Command, String> {
    let mut cmd = Command::new(program);
    for key in WORKER_ENV {
        cmd.env_remove(key);
    }
    let out = log
        .try_clone()
        .map_err(|e| format!("duplicating the log file for {}: {e}", program.display()))?;
    let err = log
        .try_clone()
        .map_err(|e| format!("duplicating the log file for {}: {e}", program.display()))?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    Ok(cmd)
}

/// `hello` standalone, binding `http` on `127.0.0.1:port` itself.
pub fn hello_standalone(bins: &Binaries, log: &File, port: u16) -> Result<Command, String> {
    let mut cmd = command(&bins.hello, log)?;
    cmd.env("BATON_LISTEN", format!("http=tcp://127.0.0.1:{port}"));
    Ok(cmd)
}

/// `hello` started the way `systemfd` starts a child: the listener at fd 3
/// (the caller passes it to [`Proc::spawn`]), `LISTEN_FDS=1`,
/// `LISTEN_FDNAMES=http`, and `LISTEN_PID` set to the child's own pid by a
/// `sh` shim that sets it and execs `hello` (the pid is known only after the
/// fork, where setting a variable is not safe). `BATON_LISTEN` names port 0
/// so that a `hello` that ignores `LISTEN_FDS` binds a port nobody uses
/// rather than its default.
pub fn hello_hold(bins: &Binaries, log: &File) -> Result<Command, String> {
    let mut cmd = command(Path::new("sh"), log)?;
    cmd.arg("-c")
        .arg(r#"LISTEN_PID=$$ exec "$0" "$@""#)
        .arg(&bins.hello)
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "http")
        .env("BATON_LISTEN", "http=tcp://127.0.0.1:0");
    Ok(cmd)
}

/// A free TCP port on 127.0.0.1: bound at port 0, read, released. Another
/// process could take it before the bench's child binds it; on loopback,
/// for a bench, that race is accepted.
pub fn reserve_port() -> Result<u16, String> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| format!("binding 127.0.0.1:0 to reserve a port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("reading the reserved port: {e}"))
}

/// Polls `GET /` on `addr` until it succeeds or `timeout` passes; while
/// `proc` is given, fails at once if that process exits.
pub fn wait_http(
    addr: SocketAddr,
    timeout: Duration,
    mut proc: Option<&mut Proc>,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let left = left.clamp(Duration::from_millis(1), timeout);
        let last = match crate::http::get(&addr.to_string(), "/", left) {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        if let Some(proc) = proc.as_deref_mut() {
            if let Some(status) = proc.try_exit()? {
                return Err(format!(
                    "{} exited ({status}) before serving on {addr}",
                    proc.name()
                ));
            }
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "nothing served GET / on {addr} within {timeout:?}: {last}"
            ));
        }
        std::thread::sleep(POLL);
    }
}

/// Resident set size of `pid` in KiB (`VmRSS` in `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> Result<u64, String> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no VmRSS line in {path}"))
}

/// CPU time `pid` has used, user and system (`/proc/PID/stat`), with the
/// 10ms resolution of its clock ticks (`USER_HZ`, 100 on Linux).
pub fn cpu_time(pid: u32) -> Result<Duration, String> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
    // The fields after the parenthesised command name start at field 3
    // (state); utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    match (ticks(11), ticks(12)) {
        (Some(user), Some(system)) => Ok(Duration::from_millis((user + system) * 10)),
        _ => Err(format!("no utime and stime in {path}: {stat:?}")),
    }
}

/// Open descriptors of `pid` once transient ones are gone: the fewest of
/// five counts 1ms apart. A control connection the bench has just closed
/// can stay open in baton for a moment, until its task sees the hang-up.
pub fn settled_fd_count(pid: u32) -> Result<usize, String> {
    let mut fewest = fd_count(pid)?;
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(1));
        fewest = fewest.min(fd_count(pid)?);
    }
    Ok(fewest)
}

/// Open descriptors of `pid` (entries of `/proc/PID/fd`).
pub fn fd_count(pid: u32) -> Result<usize, String> {
    let path = format!("/proc/{pid}/fd");
    std::fs::read_dir(&path)
        .map(Iterator::count)
        .map_err(|e| format!("listing {path}: {e}"))
}
