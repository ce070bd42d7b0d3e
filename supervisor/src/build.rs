//! The `--build` step of a reload: its state while it runs, and the task
//! that reads its output.
//!
//! A build is over when both its exit and the end of its output have been
//! seen (its output may end before or after it exits, or, when it leaves a
//! process behind that holds the pipe, not at all: then the loop goes on a
//! second after the exit without it). Its output is echoed to baton's stderr
//! through `logging` (never waiting on it) and its tail kept for the
//! failure's reason. This module never decides what a build's result does
//! to a reload: `supervisor/reload.rs` does.

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use nix::unistd::Pid;
use tokio::sync::mpsc;

use crate::event::{Event, Exit};

/// How much of the build's output `status` and the log keep.
const TAIL_BYTES: usize = 4096;
/// How many lines of it the failure's reason shows.
const TAIL_LINES: usize = 20;
/// How long after the build exits its output may stay open.
pub const OUTPUT_GRACE: Duration = Duration::from_secs(1);

/// A running `--build` command.
#[derive(Debug)]
pub struct Build {
    /// Its process (`sh -c CMD`), also its process group.
    pub pid: Pid,
    /// When it started.
    pub started: Instant,
    /// How it ended, once it has: `Err` says why it failed.
    pub exit: Option<Result<(), String>>,
    /// The end of its output, once the output has ended.
    pub tail: Option<String>,
}

impl Build {
    /// A build just started as `pid`.
    pub fn new(pid: Pid) -> Build {
        Build {
            pid,
            started: Instant::now(),
            exit: None,
            tail: None,
        }
    }

    /// Records how it ended; `exec_failure` is why `sh` could not start.
    pub fn exited(&mut self, exit: Exit, exec_failure: Option<String>) {
        self.exit = Some(match exec_failure {
            Some(why) => Err(format!("could not start: {why}")),
            None if exit.success() => Ok(()),
            None => Err(exit.to_string()),
        });
    }

    /// Both its exit and the end of its output have been seen.
    pub fn is_over(&self) -> bool {
        self.exit.is_some() && self.tail.is_some()
    }
}

/// Echoes the build's output to baton's stderr and reports its tail when it
/// ends.
pub async fn read_output(number: u64, read: OwnedFd, events: mpsc::Sender<Event>) {
    use tokio::io::AsyncReadExt;
    let mut tail: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 8192];
    match tokio::net::unix::pipe::Receiver::from_owned_fd(read) {
        Ok(mut pipe) => loop {
            match pipe.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    crate::logging::echo(&buf[..n]);
                    tail.extend_from_slice(&buf[..n]);
                    if tail.len() > 2 * TAIL_BYTES {
                        tail.drain(..tail.len() - TAIL_BYTES);
                    }
                }
            }
        },
        Err(e) => tracing::warn!("reading the build's output: {e}"),
    }
    let start = tail.len().saturating_sub(TAIL_BYTES);
    let text = String::from_utf8_lossy(&tail[start..]);
    // Keep whole lines, at most the last few.
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n");
    let _ = events
        .send(Event::BuildOutput {
            generation: number,
            tail,
        })
        .await;
}
