//! Starting one worker: its command line, environment and descriptors.
//!
//! A worker gets the listeners at fds 3.. in the systemd convention
//! (`LISTEN_FDS`, `LISTEN_PID` = its own pid, `LISTEN_FDNAMES`), its own
//! `NOTIFY_SOCKET`, its end of the worker channel (`BATON_CHANNEL_FD`, right
//! after the listeners) and `BATON_GENERATION`. It inherits no other
//! descriptor, and none of the `LISTEN_*`/`NOTIFY_SOCKET` variables baton
//! itself received. With `--user`/`--group` it runs as that user, with its
//! supplementary groups, and `USER`, `LOGNAME`, `HOME` set for it. The
//! `--build` command is started here too (same user, output to a pipe).
//! The fork and exec live in `sys.rs`; this module prepares what they need
//! and never waits for a child: the supervisor's reaper does.
//!
//! The notify sockets live in baton's runtime directory: a private directory
//! (mode 0700) beside the control socket, or, when workers run as another
//! user, under `/run` (mode 0711: the worker may pass through, not list or
//! write), because the control socket's directory is private to baton. Each
//! socket is mode 0600, owned by its worker's user, whatever the umask, and
//! its file is removed with the generation (or at once, if the start fails).

use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::chown;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use baton_worker::protocol::{CHANNEL_FD_ENV, GENERATION_ENV};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::unistd::Pid;

use crate::run_dir::RunDir;
pub use crate::run_dir::SocketFile;
use crate::sys::{self, Credentials};
use crate::Error;

/// The file name of generation `generation`'s notify socket.
fn notify_name(generation: u64) -> String {
    format!("notify-{generation}.sock")
}

/// Whether a user other than the owner may pass through `dir` and every
/// directory above it.
fn others_may_pass(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(dir) = std::fs::canonicalize(dir) else {
        return false;
    };
    dir.ancestors()
        .all(|d| std::fs::metadata(d).is_ok_and(|m| m.mode() & 0o001 != 0))
}

/// Where the runtime directory goes when workers run as another user and
/// the control socket's directory is closed to them.
const SHARED_RUN: &str = "/run";

/// Checks that [`SHARED_RUN`] is a real directory only root may write.
fn check_shared_run() -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let problem = match std::fs::symlink_metadata(SHARED_RUN) {
        Err(e) => e.to_string(),
        Ok(m) if !m.is_dir() => "it is not a directory".into(),
        Ok(m) if m.uid() != 0 => format!("it belongs to uid {}, not root", m.uid()),
        Ok(m) if m.mode() & 0o022 != 0 => "others may write to it".into(),
        Ok(_) => return Ok(()),
    };
    Err(format!(
        "--user: the workers' notify sockets go in a directory under {SHARED_RUN}, which \
         cannot be used: {problem}"
    ))
}

/// Variables baton sets for each worker, or must not pass through.
const OWN_VARS: [&str; 7] = [
    "FDSTORE",
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

impl WorkerCommand {
    /// The paths the child tries to exec, in order, found without touching
    /// the file system (the event loop must not wait on a slow disk): the
    /// program itself if it contains a `/`, else each `PATH` entry with it.
    fn candidates(&self) -> Result<Vec<CString>, Error> {
        let bad = || Error::Command {
            command: self.program.to_string_lossy().into_owned(),
            reason: "the name contains a NUL byte".into(),
        };
        let program = Path::new(&self.program);
        if self.program.as_bytes().contains(&b'/') {
            return Ok(vec![
                CString::new(self.program.as_bytes()).map_err(|_| bad())?
            ]);
        }
        let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
        std::env::split_paths(&path)
            .map(|dir| {
                CString::new(dir.join(program).into_os_string().into_vec()).map_err(|_| bad())
            })
            .collect()
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
    /// The notify socket's file; removed when this is dropped.
    pub notify_file: SocketFile,
    /// The uid whose datagrams the notify socket accepts (besides root's).
    pub notify_uid: u32,
    /// Why the child could not exec, readable once it has exited.
    pub report: crate::exec_report::ExecReport,
}

/// The user workers run as (`--user`, `--group`), resolved at start-up.
#[derive(Debug, Clone)]
pub struct RunAs {
    credentials: Credentials,
    /// `USER`, `LOGNAME`, `HOME` for the worker, when a user was given.
    env: Vec<(String, OsString)>,
}

impl RunAs {
    /// Resolves `--user` and `--group`; `None` when neither is given.
    /// Refuses unless baton runs as root, and names what it cannot find.
    pub fn resolve(user: Option<&str>, group: Option<&str>) -> Result<Option<RunAs>, Error> {
        use nix::unistd::{Group, User};
        if user.is_none() && group.is_none() {
            return Ok(None);
        }
        let bad = |reason: String| Error::User(reason);
        if !nix::unistd::geteuid().is_root() {
            return Err(bad(format!(
                "--user and --group need baton to start as root (it runs as uid {})",
                nix::unistd::geteuid()
            )));
        }
        let group = match group {
            None => None,
            Some(name) => Some(match name.parse::<u32>() {
                Ok(gid) => nix::unistd::Gid::from_raw(gid),
                Err(_) => {
                    Group::from_name(name)
                        .map_err(|e| bad(format!("--group {name}: looking it up: {e}")))?
                        .ok_or_else(|| bad(format!("--group {name}: no such group")))?
                        .gid
                }
            }),
        };
        let Some(name) = user else {
            let gid = group.unwrap_or_else(nix::unistd::getgid);
            return Ok(Some(RunAs {
                credentials: Credentials {
                    uid: nix::unistd::getuid().as_raw(),
                    gid: gid.as_raw(),
                    groups: vec![gid.as_raw()],
                },
                env: Vec::new(),
            }));
        };
        let found = match name.parse::<u32>() {
            Ok(uid) => User::from_uid(nix::unistd::Uid::from_raw(uid)),
            Err(_) => User::from_name(name),
        }
        .map_err(|e| bad(format!("--user {name}: looking it up: {e}")))?
        .ok_or_else(|| bad(format!("--user {name}: no such user")))?;
        let gid = group.unwrap_or(found.gid);
        let cname = CString::new(found.name.clone())
            .map_err(|_| bad(format!("--user {name}: the name contains a NUL byte")))?;
        let groups = nix::unistd::getgrouplist(&cname, gid)
            .map_err(|e| bad(format!("--user {name}: listing its groups: {e}")))?;
        Ok(Some(RunAs {
            credentials: Credentials {
                uid: found.uid.as_raw(),
                gid: gid.as_raw(),
                groups: groups.iter().map(|g| g.as_raw()).collect(),
            },
            env: vec![
                ("USER".into(), found.name.clone().into()),
                ("LOGNAME".into(), found.name.into()),
                ("HOME".into(), found.dir.into_os_string()),
            ],
        }))
    }

    /// Who, for the log.
    pub fn describe(&self) -> String {
        format!("uid {} gid {}", self.credentials.uid, self.credentials.gid)
    }
}

/// What every start shares: the worker command, the runtime directory for
/// notify sockets, `/dev/null` for stdin, and the user to run as.
#[derive(Debug)]
pub struct Launcher {
    /// The worker command.
    pub command: WorkerCommand,
    run_dir: RunDir,
    dev_null: OwnedFd,
    run_as: Option<RunAs>,
    /// What a worker gets when baton dies: its drain signal, so that it
    /// finishes what it has (a crashed baton's workers drain; systemd's
    /// restarted baton serves meanwhile).
    death_signal: nix::sys::signal::Signal,
}

impl Launcher {
    /// Creates the runtime directory (under `parent`, the control socket's
    /// private directory, or under `/run` for workers of another user) and
    /// opens `/dev/null`.
    pub fn new(
        command: WorkerCommand,
        parent: &Path,
        run_as: Option<RunAs>,
        death_signal: nix::sys::signal::Signal,
    ) -> Result<Launcher, Error> {
        let io = |context: String, source: std::io::Error| Error::Io { context, source };
        command.resolve()?;
        // Workers of another user must reach their notify socket: they get
        // a directory they may pass through (not list or write) beside the
        // control socket if every directory above lets others pass (a unit's
        // `RuntimeDirectoryMode=0711`: systemd removes it at stop), else
        // under /run, which only root writes.
        let (parent, mode) = match &run_as {
            None => (parent, 0o700),
            Some(_) if others_may_pass(parent) => (parent, 0o711),
            Some(_) => {
                check_shared_run().map_err(Error::User)?;
                (Path::new(SHARED_RUN), 0o711)
            }
        };
        let run_dir = tempfile::Builder::new()
            .prefix("baton-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(parent)
            .map_err(|e| {
                io(
                    format!("creating baton's runtime directory in {}", parent.display()),
                    e,
                )
            })?;
        // Exactly this mode, whatever the umask took away or left.
        std::fs::set_permissions(run_dir.path(), std::fs::Permissions::from_mode(mode)).map_err(
            |e| {
                io(
                    format!("setting the mode of {}", run_dir.path().display()),
                    e,
                )
            },
        )?;
        // The longest notify socket path there will be must fit in a Unix
        // socket address; say so now, not when generation 1 starts.
        let longest = run_dir.path().join(notify_name(u64::MAX));
        let len = longest.as_os_str().len();
        if len > crate::control::MAX_SOCKET_PATH {
            return Err(Error::Usage(format!(
                "the workers' notify sockets would be {} ({len} bytes); a Unix socket path is \
                 at most {} bytes: give --control a shorter path",
                longest.display(),
                crate::control::MAX_SOCKET_PATH
            )));
        }
        Launcher::adopt(command, RunDir::adopt(run_dir.keep()), run_as, death_signal)
    }

    /// A launcher on a runtime directory that already exists (the one the
    /// supervisor before an upgrade made).
    pub fn adopt(
        command: WorkerCommand,
        run_dir: RunDir,
        run_as: Option<RunAs>,
        death_signal: nix::sys::signal::Signal,
    ) -> Result<Launcher, Error> {
        let dev_null: OwnedFd = std::fs::File::open("/dev/null")
            .map_err(|source| Error::Io {
                context: "opening /dev/null".into(),
                source,
            })?
            .into();
        Ok(Launcher {
            command,
            run_dir,
            dev_null,
            run_as,
            death_signal,
        })
    }

    /// The directory holding the notify sockets.
    pub fn run_dir(&self) -> &Path {
        self.run_dir.path()
    }

    /// Starts generation `generation` on listeners `named`: (name, socket).
    pub fn worker(&self, generation: u64, named: &[(&str, BorrowedFd)]) -> Result<Spawned, Error> {
        let candidates = self.command.candidates()?;
        let io = |what: &str, source: std::io::Error| Error::Io {
            context: format!("starting generation {generation}: {what}"),
            source,
        };
        let notify_path = self.run_dir.path().join(notify_name(generation));
        let _ = std::fs::remove_file(&notify_path);
        let notify =
            UnixDatagram::bind(&notify_path).map_err(|e| io("binding its notify socket", e))?;
        // From here on, any failure removes the file again.
        let notify_file = SocketFile::adopt(notify_path);
        let notify_uid = self
            .run_as
            .as_ref()
            .map_or_else(|| nix::unistd::geteuid().as_raw(), |r| r.credentials.uid);
        // Only the worker's user (and root) may send: the file's mode and
        // owner say so to the kernel, and the sender's credentials, checked
        // on every datagram, say so again (`notify.rs`).
        std::fs::set_permissions(notify_file.path(), std::fs::Permissions::from_mode(0o600))
            .map_err(|e| io("setting its notify socket's mode", e))?;
        if let Some(run_as) = &self.run_as {
            let c = &run_as.credentials;
            chown(notify_file.path(), Some(c.uid), Some(c.gid))
                .map_err(|e| io("giving its notify socket to the worker's user", e))?;
        }
        nix::sys::socket::setsockopt(&notify, nix::sys::socket::sockopt::PassCred, &true)
            .map_err(|e| io("asking for its notify senders' credentials", e.into()))?;
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

        let mut fds: Vec<BorrowedFd<'_>> = named.iter().map(|(_, fd)| *fd).collect();
        let channel_fd = 3 + fds.len();
        fds.push(theirs.as_fd());

        let names: Vec<&str> = named.iter().map(|(n, _)| *n).collect();
        let mut env = self.base_env();
        let mut set = |k: &str, v: &[u8]| {
            let mut kv = format!("{k}=").into_bytes();
            kv.extend_from_slice(v);
            if let Ok(c) = CString::new(kv) {
                env.push(c);
            }
        };
        set("LISTEN_FDS", named.len().to_string().as_bytes());
        set("LISTEN_FDNAMES", names.join(":").as_bytes());
        set("NOTIFY_SOCKET", notify_file.path().as_os_str().as_bytes());
        set(CHANNEL_FD_ENV, channel_fd.to_string().as_bytes());
        set(GENERATION_ENV, generation.to_string().as_bytes());

        let argv = self
            .command
            .argv
            .iter()
            .map(|a| self.cstr(a))
            .collect::<Result<Vec<_>, _>>()?;
        let plan = sys::ExecPlan::new(candidates, argv, env)
            .with_listen_pid()
            .with_death_signal(self.death_signal)
            .with_credentials(self.run_as.as_ref().map(|r| r.credentials.clone()));
        let (pid, report) =
            sys::spawn(&plan, &fds, self.dev_null.as_fd(), None).map_err(|f| Error::Spawn {
                command: self.command.program.to_string_lossy().into_owned(),
                step: f.step,
                source: f.error,
            })?;
        drop(theirs);
        Ok(Spawned {
            pid,
            channel: ours,
            notify,
            notify_file,
            notify_uid,
            report,
        })
    }

    /// Starts `sh -c SCRIPT` (the `--build` command) with stdout and stderr
    /// on `output`, as the workers' user, with no listener and no
    /// `LISTEN_*`.
    pub fn build(
        &self,
        script: &str,
        output: BorrowedFd<'_>,
    ) -> Result<(Pid, crate::exec_report::ExecReport), Error> {
        let err = |reason: &str| Error::Command {
            command: script.to_owned(),
            reason: reason.to_owned(),
        };
        let sh = CString::new("/bin/sh").map_err(|_| err("bad shell path"))?;
        let argv = vec![
            sh.clone(),
            CString::new("-c").map_err(|_| err("bad argument"))?,
            CString::new(script).map_err(|_| err("the command contains a NUL byte"))?,
        ];
        let plan = sys::ExecPlan::new(vec![sh], argv, self.base_env())
            .with_credentials(self.run_as.as_ref().map(|r| r.credentials.clone()));
        sys::spawn(&plan, &[], self.dev_null.as_fd(), Some(output)).map_err(|f| Error::Spawn {
            command: format!("/bin/sh -c {script:?}"),
            step: f.step,
            source: f.error,
        })
    }

    /// baton's environment without the variables it sets itself, plus the
    /// user's `USER`, `LOGNAME` and `HOME` under `--user`.
    fn base_env(&self) -> Vec<CString> {
        let user_vars: &[(String, OsString)] = self.run_as.as_ref().map_or(&[], |r| &r.env);
        let overridden = |k: &OsStr| {
            OWN_VARS.iter().any(|own| OsStr::new(own) == k)
                || user_vars.iter().any(|(u, _)| OsStr::new(u) == k)
        };
        std::env::vars_os()
            .filter(|(k, _)| !overridden(k))
            .chain(
                user_vars
                    .iter()
                    .map(|(k, v)| (OsString::from(k), v.clone())),
            )
            .filter_map(|(k, v)| {
                let mut kv = k.into_vec();
                kv.push(b'=');
                kv.extend(v.into_vec());
                CString::new(kv).ok()
            })
            .collect()
    }

    fn cstr(&self, s: &OsStr) -> Result<CString, Error> {
        CString::new(s.as_bytes()).map_err(|_| Error::Command {
            command: self.command.program.to_string_lossy().into_owned(),
            reason: "an argument contains a NUL byte".into(),
        })
    }
}
