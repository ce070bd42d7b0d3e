//! A child's exec report: how a worker or build that could not exec says
//! which step failed and why.
//!
//! Between fork and exec the child (`sys.rs`) writes a `Step` and its
//! errno to a close-on-exec pipe, then exits; a child that execs closes the
//! pipe empty. [`ExecReport`] reads that once the child has exited, so the
//! event loop never waits for it. This module never forks or execs.

use std::io;
use std::os::fd::OwnedFd;

/// Why the child could not exec: which step, and its errno.
#[derive(Debug)]
pub struct SpawnFailure {
    /// The step that failed, for the error message: `Step::describe`'s
    /// text, or `UNKNOWN_STEP` for a report that names no step.
    pub step: &'static str,
    /// The error of that step.
    pub error: io::Error,
}

/// The steps of starting a worker that can fail. A child that fails reports
/// the step as its `u32` value on the exec-report pipe; [`ExecReport`]
/// decodes it with [`Step::from_report`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Step {
    /// `fork`, or the pipe for the exec report, in the supervisor.
    Fork = 0,
    /// Placing the listeners at 3.., stdin, and stdout/stderr.
    ArrangeDescriptors = 1,
    /// `PR_SET_PDEATHSIG`.
    ParentDeathSignal = 2,
    /// `execve` of every candidate path.
    Exec = 3,
    /// The supervisor died before the parent-death signal was set.
    SupervisorGone = 4,
    /// `setgroups`/`setgid`/`setuid` for `--user`/`--group`.
    SwitchUser = 5,
}

impl Step {
    /// Every step, to decode a report.
    const ALL: [Step; 6] = [
        Step::Fork,
        Step::ArrangeDescriptors,
        Step::ParentDeathSignal,
        Step::Exec,
        Step::SupervisorGone,
        Step::SwitchUser,
    ];

    /// What the step was doing, for the error message.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Step::Fork => "fork",
            Step::ArrangeDescriptors => "arranging descriptors",
            Step::ParentDeathSignal => "setting the parent-death signal",
            Step::Exec => "exec",
            Step::SupervisorGone => "the supervisor is gone",
            Step::SwitchUser => "switching user",
        }
    }

    /// The step a child reported, if the value names one.
    pub(crate) fn from_report(value: u32) -> Option<Step> {
        Step::ALL.into_iter().find(|&step| step as u32 == value)
    }
}

/// What an exec report names when its step is none of [`Step`]'s (a child
/// that wrote something else on the pipe): said as such, never guessed.
const UNKNOWN_STEP: &str = "an unknown step of starting the worker";

/// The read end of a child's exec report: empty once the child has exec'd,
/// eight bytes (step, errno) if it failed before. Read it after the child
/// exited, never before (the supervisor never waits for a child).
#[derive(Debug)]
pub struct ExecReport(OwnedFd);

impl ExecReport {
    /// The report arriving on `read`, the pipe's read end.
    pub(crate) fn new(read: OwnedFd) -> ExecReport {
        ExecReport(read)
    }

    /// Why the child could not exec, if it could not. Call once the child
    /// has exited: its report is complete then, so this never blocks.
    pub fn failure(&self) -> Option<SpawnFailure> {
        let mut report = [0u8; 8];
        match nix::unistd::read(&self.0, &mut report) {
            Ok(8) => {
                let step = u32::from_ne_bytes([report[0], report[1], report[2], report[3]]);
                let errno = i32::from_ne_bytes([report[4], report[5], report[6], report[7]]);
                Some(SpawnFailure {
                    step: Step::from_report(step).map_or(UNKNOWN_STEP, Step::describe),
                    error: io::Error::from_raw_os_error(errno),
                })
            }
            // Exec'd (the pipe closed empty), or still running.
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An exec report as a child would write it: `step`, then `errno`.
    fn report(step: u32, errno: i32) -> ExecReport {
        let (read, write) = nix::unistd::pipe().expect("pipe");
        let mut bytes = step.to_ne_bytes().to_vec();
        bytes.extend_from_slice(&errno.to_ne_bytes());
        nix::unistd::write(&write, &bytes).expect("writing the report");
        ExecReport(read)
    }

    #[test]
    fn every_step_decodes_to_itself() {
        for step in Step::ALL {
            assert_eq!(Step::from_report(step as u32), Some(step));
        }
        let failure = report(Step::SwitchUser as u32, libc::EPERM)
            .failure()
            .expect("a failure");
        assert_eq!(failure.step, "switching user");
        assert_eq!(failure.error.raw_os_error(), Some(libc::EPERM));
    }

    #[test]
    fn an_unknown_step_is_reported_as_unknown() {
        for value in [6, 99, u32::MAX] {
            assert_eq!(Step::from_report(value), None);
            let failure = report(value, libc::ENOENT).failure().expect("a failure");
            assert_eq!(failure.step, UNKNOWN_STEP);
        }
    }

    #[test]
    fn an_empty_report_is_no_failure() {
        let (read, write) = nix::unistd::pipe().expect("pipe");
        drop(write);
        assert!(ExecReport(read).failure().is_none());
    }
}
