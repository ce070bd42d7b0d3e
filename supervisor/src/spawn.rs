//! Starting one worker: its command line, environment and descriptors.
//!
//! A worker gets the listeners at fds 3.. in the systemd convention
//! (`LISTEN_FDS`, `LISTEN_PID` = its own pid, `LISTEN_FDNAMES`), its own
//! `NOTIFY_SOCKET`, its end of the worker channel (`BATON_CHANNEL_FD`, right
//! after the listeners) and `BATON_GENERATION`. It inherits no other
//! descriptor, and none of the `LISTEN_*`/`NOTIFY_SOCKET` variables baton
//! itself received. The fork and exec live in `sys.rs`; this module prepares
//! what they need and never waits for the worker.

use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use baton_worker::protocol::{CHANNEL_FD_ENV, GENERATION_ENV};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::unistd::Pid;

use crate::listener::Listener;
use crate::sys;
use crate::Error;

/// Variables baton sets for each worker, or must not pass through.
const OWN_VARS: [&str; 6] = [
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    CHANNEL_FD_ENV,
    GENERATION_ENV,
];

/// The worker command, as given after `--`.
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    /// The program, as written.
    pub program: OsString,
    /// Its arguments, the program's name first.
    pub argv: Vec<OsString>,
}

impl WorkerCommand {
    /// Finds the program now (in `PATH` unless it contains a `/`), so a typo
    /// is reported at start-up, not at the first reload.
    pub fn resolve(&self) -> Result<PathBuf, Error> {
        let not_found = |reason: &str| Error::Command {
            command: self.program.to_string_lossy().into_owned(),
            reason: reason.to_owned(),
        };
        let program = Path::new(&self.program);
        if self.program.as_bytes().contains(&b'/') {
            return match std::fs::metadata(program) {
                Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {
                    Ok(program.to_path_buf())
                }
                Ok(m) if m.is_file() => Err(not_found("the file is not executable")),
                Ok(_) => Err(not_found("it is not a file")),
                Err(e) => Err(not_found(&e.to_string())),
            };
        }
        let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| {
                std::fs::metadata(candidate)
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
            .ok_or_else(|| not_found("not found in PATH"))
    }
}

/// A started worker, as the supervisor sees it.
#[derive(Debug)]
pub struct Spawned {
    /// The worker's pid (also its process group).
    pub pid: Pid,
    /// The supervisor's end of the worker channel.
    pub channel: OwnedFd,
    /// The worker's own notify socket.
    pub notify: UnixDatagram,
    /// Where the notify socket lives; removed when the worker is gone.
    pub notify_path: PathBuf,
}

/// Starts generation `generation` of `command` on `listeners`.
///
/// `run_dir` is the supervisor's private directory for notify sockets;
/// `stdin` is an open `/dev/null`.
pub fn spawn(
    command: &WorkerCommand,
    generation: u64,
    listeners: &[Listener],
    run_dir: &Path,
    stdin: BorrowedFd<'_>,
) -> Result<Spawned, Error> {
    let program = command.resolve()?;
    let io = |what: &str, source: std::io::Error| Error::Io {
        context: format!("starting generation {generation}: {what}"),
        source,
    };
    let notify_path = run_dir.join(format!("notify-{generation}.sock"));
    let _ = std::fs::remove_file(&notify_path);
    let notify =
        UnixDatagram::bind(&notify_path).map_err(|e| io("binding its notify socket", e))?;
    notify
        .set_nonblocking(true)
        .map_err(|e| io("configuring its notify socket", e))?;
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )
    .map_err(|e| io("creating its channel", e.into()))?;
    // The worker's end starts blocking, as a fresh socket would; O_NONBLOCK
    // belongs to each end separately.
    nix::fcntl::fcntl(
        &theirs,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
    )
    .map_err(|e| io("configuring its channel", e.into()))?;

    let mut fds: Vec<BorrowedFd<'_>> = listeners.iter().map(|l| l.fd.as_fd()).collect();
    let channel_fd = 3 + fds.len();
    fds.push(theirs.as_fd());

    let names: Vec<&str> = listeners.iter().map(|l| l.name.as_str()).collect();
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| !OWN_VARS.iter().any(|own| OsStr::new(own) == k))
        .filter_map(|(k, v)| {
            let mut kv = k.into_vec();
            kv.push(b'=');
            kv.extend(v.into_vec());
            CString::new(kv).ok()
        })
        .collect();
    let mut set = |k: &str, v: &[u8]| {
        let mut kv = format!("{k}=").into_bytes();
        kv.extend_from_slice(v);
        if let Ok(c) = CString::new(kv) {
            env.push(c);
        }
    };
    set("LISTEN_FDS", listeners.len().to_string().as_bytes());
    set("LISTEN_FDNAMES", names.join(":").as_bytes());
    set("NOTIFY_SOCKET", notify_path.as_os_str().as_bytes());
    set(CHANNEL_FD_ENV, channel_fd.to_string().as_bytes());
    set(GENERATION_ENV, generation.to_string().as_bytes());

    let cstr = |s: &OsStr| {
        CString::new(s.as_bytes()).map_err(|_| Error::Command {
            command: command.program.to_string_lossy().into_owned(),
            reason: "an argument contains a NUL byte".into(),
        })
    };
    let argv = command
        .argv
        .iter()
        .map(|a| cstr(a))
        .collect::<Result<Vec<_>, _>>()?;
    let plan = sys::ExecPlan::new(cstr(program.as_os_str())?, argv, env);
    let pid = sys::spawn(&plan, &fds, stdin).map_err(|f| Error::Spawn {
        command: program.display().to_string(),
        step: f.step,
        source: f.error,
    })?;
    drop(theirs);
    Ok(Spawned {
        pid,
        channel: ours,
        notify,
        notify_path,
    })
}
