//! Why a generation failed to start, as a type: each reason the loop can
//! give, with what it needs to say so. Its text is what `reload --wait`,
//! `status` and the log show; the loop never builds a failure's text by
//! hand elsewhere.

use std::fmt;
use std::time::Duration;

use crate::event::Exit;

/// Why a starting generation (of a reload, the first start, or a crash
/// restart) failed.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Failure {
    /// The worker could not be started at all (a socket, a descriptor).
    Spawn(String),
    /// The worker process could not exec its program.
    Exec {
        /// The program, as given.
        program: String,
        /// The failed step and its error.
        why: String,
    },
    /// It exited before it was ready.
    Exited(Exit),
    /// `--ready-timeout` passed.
    NotReady(Duration),
    /// `--freeze-timeout` passed while its predecessor was frozen for it.
    FrozeTooLong(Duration),
    /// `--build` failed (or could not run).
    Build {
        /// The build command.
        script: String,
        /// How it ended.
        how: String,
        /// How long it ran, if it ran.
        took: Option<Duration>,
        /// The end of its output.
        tail: String,
    },
    /// It broke the worker protocol.
    Protocol(String),
    /// Its kept values could not be handed to it.
    KeptValues(String),
    /// A crash restart began serving newer kept values than it took.
    Overtaken {
        /// The restarted generation.
        by: u64,
    },
    /// baton is stopping.
    Stopping,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Spawn(why) | Failure::Protocol(why) | Failure::KeptValues(why) => {
                f.write_str(why)
            }
            Failure::Exec { program, why } => write!(f, "starting `{program}`: {why}"),
            Failure::Exited(exit) => write!(f, "{exit} before it was ready"),
            Failure::NotReady(timeout) => write!(
                f,
                "not ready within {} (--ready-timeout): a plain worker must send READY=1 to \
                 $NOTIFY_SOCKET (sd_notify), or be run with --ready after:DURATION; an SDK \
                 worker must call ready()",
                humantime::format_duration(*timeout)
            ),
            Failure::FrozeTooLong(timeout) => write!(
                f,
                "not ready within {} of freezing its predecessor (--freeze-timeout), while no \
                 generation accepted; call keep() after slow initialisation",
                humantime::format_duration(*timeout)
            ),
            Failure::Build {
                script,
                how,
                took: None,
                ..
            } => write!(f, "build `{script}`: {how}"),
            Failure::Build {
                script,
                how,
                took: Some(took),
                tail,
            } => write!(
                f,
                "build `{script}` {how} after {}; its output ends:\n{tail}",
                humantime::format_duration(Duration::from_millis(took.as_millis() as u64))
            ),
            Failure::Overtaken { by } => write!(
                f,
                "generation {by} restarted after a crash while it started, and serves newer \
                 kept values than the ones it took; reloading again"
            ),
            Failure::Stopping => f.write_str("baton is stopping"),
        }
    }
}
