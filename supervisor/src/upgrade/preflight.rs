//! The pre-flight: the new binary checks the state it would get before
//! baton executes it.
//!
//! The old supervisor starts `BINARY upgrade-check --state-fd 3 -- ARGS`
//! (ARGS: its own arguments after `argv[0]`) with the state's sealed memfd
//! at fd 3, `/dev/null` on stdin and stdout/stderr on a pipe ([`spawn`]);
//! the loop's reaper sees it exit, and [`verdict`] reads what it said. The
//! new binary's side is [`check`]: it reads the state (refusing a newer
//! version), parses ARGS as `baton run` would, checks that the listeners
//! match, and prints [`ACK`] with its version. Anything else (a missing
//! file, `/bin/false`, `/bin/true`, a crash, a refusal) fails the upgrade
//! with the reason. This module never execs baton itself.

use std::ffi::{CString, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::unistd::Pid;

use super::state::Handover;
use crate::event::Exit;
use crate::exec_report::ExecReport;

/// The line a baton that accepts the state prints, followed by its version.
pub const ACK: &str = "baton-upgrade-check: accepted, version ";
/// How long the pre-flight may take.
pub const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The most of the child's output kept for the reason.
const MAX_OUTPUT: usize = 16 * 1024;

/// A running pre-flight child.
#[derive(Debug)]
pub struct Child {
    /// Its pid (reaped by the loop's reaper).
    pub pid: Pid,
    /// Why it could not exec, readable once it exited.
    pub report: ExecReport,
    /// The read end of its stdout and stderr (non-blocking).
    pub output: OwnedFd,
}

/// Starts the pre-flight of `binary` on `state`; `args` are baton's own
/// arguments after `argv[0]`.
pub fn spawn(binary: &Path, args: &[OsString], state: &OwnedFd) -> Result<Child, String> {
    let c = |b: &[u8]| CString::new(b).map_err(|_| "a NUL byte in an argument".to_owned());
    let path = c(binary.as_os_str().as_bytes())?;
    let mut argv = vec![
        path.clone(),
        c(b"upgrade-check")?,
        c(b"--state-fd")?,
        c(b"3")?,
        c(b"--")?,
    ];
    for a in args {
        argv.push(c(a.as_bytes())?);
    }
    let env: Vec<CString> = super::environment();
    let (read, write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
            .map_err(|e| format!("creating a pipe for it: {e}"))?;
    // The child's end blocks, as a fresh pipe would.
    nix::fcntl::fcntl(
        &write,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
    )
    .map_err(|e| format!("configuring its pipe: {e}"))?;
    let dev_null: OwnedFd = std::fs::File::open("/dev/null")
        .map_err(|e| format!("opening /dev/null: {e}"))?
        .into();
    let plan = crate::sys::ExecPlan::new(vec![path], argv, env);
    let (pid, report) = crate::sys::spawn(
        &plan,
        &[state.as_fd()],
        dev_null.as_fd(),
        Some(write.as_fd()),
    )
    .map_err(|f| format!("{}: {}", f.step, f.error))?;
    Ok(Child {
        pid,
        report,
        output: read,
    })
}

/// What the child printed (as much as its pipe holds; it has exited).
pub fn output(child: &Child) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while out.len() < MAX_OUTPUT {
        match nix::unistd::read(&child.output, &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The pre-flight's result: the new baton's version, or why it refused.
pub fn verdict(exit: Exit, exec_failure: Option<String>, output: &str) -> Result<String, String> {
    if let Some(why) = exec_failure {
        return Err(format!("it cannot be executed: {why}"));
    }
    let said = || {
        let text: Vec<&str> = output
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let tail = text[text.len().saturating_sub(3)..].join(" / ");
        match tail.chars().count() {
            0 => String::new(),
            n if n > 400 => format!(": {}…", tail.chars().take(400).collect::<String>()),
            _ => format!(": {tail}"),
        }
    };
    let version = output
        .lines()
        .find_map(|l| l.trim().strip_prefix(ACK))
        .map(str::to_owned);
    match (exit, version) {
        (Exit::Code(0), Some(version)) => Ok(version),
        (Exit::Code(0), None) => Err(format!(
            "it exited 0 without accepting the state: not a baton that can take over{}",
            said()
        )),
        (exit, _) => Err(format!("its check of the state {exit}{}", said())),
    }
}

/// `baton upgrade-check`, the new binary's side: reads the state at
/// `state_fd`, parses `args` as `baton run` arguments, checks they agree,
/// and returns the line to print.
pub fn check(state_fd: i32, args: &[OsString]) -> Result<String, String> {
    let fd =
        crate::sys::adopt_carried(state_fd).map_err(|e| format!("--state-fd {state_fd}: {e}"))?;
    let state = Handover::read(&fd)?;
    let argv = std::iter::once(OsString::from("baton")).chain(args.iter().cloned());
    let cli = <crate::cli::Cli as clap::Parser>::try_parse_from(argv)
        .map_err(|e| format!("baton's arguments do not parse: {e}"))?;
    let crate::cli::Command::Run(run) = cli.command else {
        return Err("baton's arguments are not `baton run`".into());
    };
    let asked: Vec<&str> = run.listen.iter().map(|l| l.name.as_str()).collect();
    let carried: Vec<&str> = state
        .host
        .listeners
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    if asked != carried {
        return Err(format!(
            "the state carries listeners [{}] but the arguments ask for [{}]",
            carried.join(", "),
            asked.join(", ")
        ));
    }
    Ok(format!(
        "{ACK}{} (state version {} of baton {}, {} generation(s))",
        env!("CARGO_PKG_VERSION"),
        state.version,
        state.baton_version,
        state.table.generations.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_acknowledged_exit_0_passes() {
        let ok = format!("{ACK}0.2.0 (state version 1)\n");
        assert_eq!(
            verdict(Exit::Code(0), None, &ok),
            Ok("0.2.0 (state version 1)".into())
        );
        let err = |r: Result<String, String>| r.expect_err("must fail");
        assert!(err(verdict(Exit::Code(0), None, "")).contains("without accepting"));
        assert!(err(verdict(Exit::Code(1), None, "")).contains("exited with status 1"));
        let refused = verdict(Exit::Code(1), None, "baton: the state is version 9, newer");
        assert!(err(refused).contains("version 9"));
        let missing = verdict(
            Exit::Code(127),
            Some("exec: No such file or directory".into()),
            "",
        );
        assert!(err(missing).contains("No such file"));
        let crash = verdict(Exit::Signal(nix::sys::signal::Signal::SIGSEGV), None, "");
        assert!(err(crash).contains("SIGSEGV"));
    }
}
