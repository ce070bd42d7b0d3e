//! `baton`: a supervisor for zero-downtime reloads of any server binary.
//!
//! baton binds the listening sockets once and keeps them for its whole life.
//! On a reload it starts a new generation of the worker on the same sockets,
//! waits until it is ready, and only then tells the old generation to drain.
//!
//! The major components are:
//!
//! * [`run`]: `baton run`: start-up, then the event loop until it is done.
//! * [`supervisor`]: the event loop that owns the generation table and runs
//!   the reload sequence, through a [`host::Host`] (the outside world;
//!   [`host::OsHost`] is the real one, tests use a fake).
//! * [`event`]: everything the loop reacts to; [`api`]: the control
//!   requests and answers, shared with the client.
//! * [`generations`]: the generation table; [`build`]: the `--build` step.
//! * [`listener`]: `--listen` parsing and binding the kept sockets;
//!   [`steer`]: `--steer`, a second socket per TCP listener and which
//!   generation gets new connections.
//! * [`spawn`]: a worker's command line, environment and descriptors;
//!   `sys` holds the fork/exec, the crate's only unsafe code.
//! * [`notify`]: sd_notify, from workers and to systemd.
//! * [`state`]: snapshots of kept values, checked and passed on unread.
//! * [`control`]: the control socket behind `baton reload|status|stop`.
//! * [`watch`]: `--watch`, file changes debounced into reload triggers.
//! * [`cli`]: the command line and the client commands; [`status_text`]
//!   prints `baton status` for a person.
//! * [`upgrade`]: upgrading baton itself in place: the hand-over state,
//!   the pre-flight, the exec; [`run_dir`]: files baton removes when done.
//! * [`logging`]: stderr logs for a terminal or for journald, written by a
//!   thread of their own so that the event loop never waits for stderr.
//!
//! The binary (`main.rs`) only parses arguments and maps errors to exit codes.

pub mod api;
pub mod build;
pub mod cli;
pub mod control;
pub mod event;
pub mod exec_report;
pub mod generations;
pub mod host;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod run;
pub mod run_dir;
pub mod spawn;
pub mod state;
pub mod status_text;
pub mod steer;
pub mod supervisor;
pub(crate) mod sys;
pub mod upgrade;
pub mod watch;

use std::path::PathBuf;

/// Everything that can go wrong in baton, each naming what was being done
/// and to what.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listener could not be bound.
    #[error("binding listener `{name}` on {addr}: {source}")]
    Bind {
        /// The listener's name.
        name: String,
        /// The address asked for.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The command line asks for something baton cannot do.
    #[error("{0}")]
    Usage(String),
    /// A `--listen NAME=systemd` cannot be adopted.
    #[error("{0}")]
    Activation(String),
    /// `--steer` cannot be used with these listeners.
    #[error("--steer: {0}")]
    Steer(String),
    /// `--user`/`--group` cannot be used.
    #[error("{0}")]
    User(String),
    /// `--watch` cannot be set up.
    #[error("{0}")]
    Watch(String),
    /// The worker command cannot be run.
    #[error("worker command `{command}`: {reason}")]
    Command {
        /// The program as given.
        command: String,
        /// Why it cannot run.
        reason: String,
    },
    /// Starting a worker process failed.
    #[error("starting `{command}`: {step}: {source}")]
    Spawn {
        /// The resolved program.
        command: String,
        /// The step that failed.
        step: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The control socket could not be set up or used.
    #[error("control socket {}: {what}: {source}", path.display())]
    Control {
        /// The socket's path.
        path: PathBuf,
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The control socket's path or its directory is not one baton will
    /// use (a symlink, another user's, writable by others, too long).
    #[error("control socket {}: {reason}", path.display())]
    ControlRefused {
        /// The socket's path.
        path: PathBuf,
        /// What is wrong with it, and what to do instead.
        reason: String,
    },
    /// Another baton owns the control socket.
    #[error(
        "control socket {} is in use by a running baton (pid {pid}); stop it, or give this one \
         another --control path",
        path.display()
    )]
    ControlInUse {
        /// The socket's path.
        path: PathBuf,
        /// The other baton's pid, as its lock file says.
        pid: String,
    },
    /// No baton answers on the control socket.
    #[error(
        "no baton is running with control socket {} (start one with `baton run`, or point \
         --control / BATON_CONTROL at its socket)",
        path.display()
    )]
    NotRunning {
        /// The socket's path.
        path: PathBuf,
    },
    /// `--stop-timeout` ran out; the workers left were killed.
    #[error(
        "the stop took longer than --stop-timeout ({}); the workers left were killed",
        humantime::format_duration(*.0)
    )]
    StopTimedOut(std::time::Duration),
    /// The first generation never served, so `baton run` gives up.
    #[error("the first generation did not start: {0}")]
    FirstGeneration(String),
    /// A reload that `baton reload --wait` waited for failed.
    #[error("reload failed: {0}")]
    ReloadFailed(String),
    /// The hand-over state of an upgrade cannot be used.
    #[error("upgrading in place: {0}")]
    Upgrade(String),
    /// An upgrade that `baton upgrade --wait` waited for failed.
    #[error("upgrade failed: {0}")]
    UpgradeFailed(String),
    /// The running baton refused a request.
    #[error("baton refused the request: {0}")]
    Refused(String),
    /// Any other I/O failure, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        source: std::io::Error,
    },
}

impl Error {
    /// The exit status baton ends with for this error: 124 when
    /// `--stop-timeout` ran out (as `timeout(1)` says a command timed out),
    /// 1 for everything else. A clean stop is 0.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::StopTimedOut(_) => 124,
            _ => 1,
        }
    }
}
