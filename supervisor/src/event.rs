//! Everything the event loop reacts to, and the data events carry.
//!
//! Sources of change (signals, the reaper, notify sockets, worker channels,
//! the control socket, the file watcher, timers) each send an [`Event`] on
//! the loop's queue; the loop in `supervisor/` handles one at a time. This
//! module knows neither the loop nor the sources: it imports nothing of
//! theirs, so no source depends on the loop that consumes it.

use std::fmt;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use baton_worker::protocol::{ProtocolError, WorkerMessage};
use nix::sys::signal::Signal;
use tokio::sync::oneshot;

use crate::api::{Reply, Request};

/// Something the loop reacts to. Every source of change sends one of these.
#[derive(Debug)]
pub enum Event {
    /// SIGHUP: reload.
    Reload,
    /// SIGTERM or SIGINT: drain everything and exit (a second one: kill
    /// now). SIGQUIT: kill everything now and exit.
    Signal(Signal),
    /// SIGCHLD: one or more children changed state.
    Child,
    /// A datagram on a worker's notify socket.
    Notify {
        /// The generation whose socket it arrived on.
        generation: u64,
        /// What it said.
        message: NotifyMessage,
    },
    /// A message (or a protocol error) on a worker's channel.
    Channel {
        /// The generation whose channel it arrived on.
        generation: u64,
        /// The message, or why it could not be read.
        message: Result<WorkerMessage, ProtocolError>,
        /// Descriptors that came with it (a snapshot's memfd).
        fds: Vec<OwnedFd>,
    },
    /// A request on the control socket, with where to send the answer.
    Control {
        /// The request.
        request: Request,
        /// Dropping it answers "baton is shutting down".
        reply: oneshot::Sender<Reply>,
    },
    /// A deadline of one generation passed.
    Timer {
        /// The generation it belongs to.
        generation: u64,
        /// Which deadline.
        timer: Timer,
    },
    /// Watched files changed (after the debounce).
    FilesChanged {
        /// What changed, deduplicated.
        paths: Vec<PathBuf>,
    },
    /// The `--build` command's output ended (it exited, or closed it).
    BuildOutput {
        /// The generation the build was for.
        generation: u64,
        /// The last lines it printed.
        tail: String,
    },
    /// The build exited a second ago and its output is still open.
    BuildOutputLate {
        /// The generation the build was for.
        generation: u64,
    },
    /// `--stop-timeout` passed since the stop began.
    StopTimeout,
    /// SIGUSR2 or `baton upgrade`: re-execute baton in place.
    Upgrade {
        /// The binary (`None`: the path baton was started from).
        binary: Option<PathBuf>,
        /// The connection of a client waiting for the outcome
        /// (`upgrade --wait`): answered by whichever supervisor runs at the
        /// end, the new one after an exec.
        client: Option<OwnedFd>,
    },
    /// The upgrade's pre-flight took too long; `seq` tells stale ones apart.
    PreflightTimeout {
        /// The pre-flight this timer was armed for.
        seq: u64,
    },
    /// The back-off after a crash is over; `seq` tells stale ones apart.
    RestartDue {
        /// The restart this timer was armed for.
        seq: u64,
    },
}

/// The deadlines a generation can have (they cross an upgrade by name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Timer {
    /// `--ready-timeout` passed.
    ReadyTimeout,
    /// `--ready after:DUR` passed.
    ReadyAfter,
    /// `--drain-timeout` passed.
    DrainTimeout,
    /// `--freeze-timeout` passed since this generation's predecessor froze.
    FreezeTimeout,
    /// `--steer-grace` passed since new connections went elsewhere.
    SteerGrace,
}

/// How a child process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this status.
    Code(i32),
    /// A signal killed it.
    Signal(Signal),
}

impl Exit {
    /// Exited with status 0.
    pub fn success(self) -> bool {
        self == Exit::Code(0)
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(code) => write!(f, "exited with status {code}"),
            Exit::Signal(signal) => write!(f, "was killed by {signal}"),
        }
    }
}

/// What one notify datagram said, as far as baton cares.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NotifyMessage {
    /// `READY=1`
    pub ready: bool,
    /// `STOPPING=1`: logged, never forwarded.
    pub stopping: bool,
    /// `STATUS=...`
    pub status: Option<String>,
    /// `ERRNO=...`
    pub errno: Option<String>,
}

impl NotifyMessage {
    /// Parses the newline-separated `KEY=VALUE` assignments of one datagram.
    pub fn parse(datagram: &[u8]) -> NotifyMessage {
        let mut msg = NotifyMessage::default();
        for line in String::from_utf8_lossy(datagram).lines() {
            match line.split_once('=') {
                Some(("READY", "1")) => msg.ready = true,
                Some(("STOPPING", "1")) => msg.stopping = true,
                Some(("STATUS", text)) => msg.status = Some(text.to_owned()),
                Some(("ERRNO", n)) => msg.errno = Some(n.to_owned()),
                _ => {}
            }
        }
        msg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_assignments_baton_acts_on() {
        let m = NotifyMessage::parse(b"READY=1\nSTATUS=serving 3 clients\nMAINPID=9\n");
        assert!(m.ready);
        assert_eq!(m.status.as_deref(), Some("serving 3 clients"));
        assert!(!m.stopping);
        let m = NotifyMessage::parse(b"READY=0\nSTOPPING=1");
        assert!(!m.ready);
        assert!(m.stopping);
        assert_eq!(
            NotifyMessage::parse(b"\xff\xfe garbage"),
            NotifyMessage::default()
        );
    }
}
