//! The control socket's files: where they go, and making them safely.
//!
//! The socket (mode 0600, bound under a temporary name and renamed into
//! place) and its lock file (so two batons never share one) live in a
//! directory that must be baton's user's and writable by no one else (a
//! missing one is created mode 0700). It is opened once, `O_NOFOLLOW`, and
//! every later step (lock file, bind, rename, unlink) goes through that
//! descriptor. A path that does not fit a Unix socket address is refused
//! before anything is created.
//!
//! This module never follows a symlink in the control directory, the
//! directory itself included, and never speaks the control protocol
//! (`control/mod.rs` does).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{open, openat, renameat, AtFlags, Flock, FlockArg, OFlag};
use nix::sys::stat::{
    fchmod, fchmodat, fstat, fstatat, lstat, umask, FchmodatFlags, FileStat, Mode, SFlag,
};
use nix::unistd::{geteuid, mkdir, unlinkat, UnlinkatFlags};

use crate::Error;

/// Where the control socket goes when `--control` and `BATON_CONTROL` are
/// not given: `$RUNTIME_DIRECTORY/baton.sock` (systemd's
/// `RuntimeDirectory=`), else `$XDG_RUNTIME_DIR/baton.sock`, else
/// `/tmp/baton-$UID/baton.sock`.
pub fn default_path() -> PathBuf {
    for var in ["RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"] {
        if let Some(dir) = std::env::var_os(var).filter(|d| !d.is_empty()) {
            // RUNTIME_DIRECTORY may list several directories.
            let first = dir
                .to_string_lossy()
                .split(':')
                .next()
                .unwrap_or_default()
                .to_owned();
            return Path::new(&first).join("baton.sock");
        }
    }
    PathBuf::from(format!("/tmp/baton-{}", geteuid())).join("baton.sock")
}

/// The longest path a Unix socket address can hold: `sun_path` is 108 bytes,
/// the terminating NUL included.
pub const MAX_SOCKET_PATH: usize = 107;

/// How often a lock file that a stopping baton unlinks under us is opened
/// again before giving up.
const LOCK_ATTEMPTS: usize = 8;

/// The control socket's files: the socket and its lock, in a directory that
/// was checked; removed when dropped.
#[derive(Debug)]
pub struct ControlFiles {
    path: PathBuf,
    /// The directory holding the socket and the lock file: every operation
    /// on them goes through this descriptor, never through the path again.
    dir: ControlDir,
    /// The socket's name in `dir`.
    name: OsString,
    /// The lock file's name in `dir` (`<name>.lock`).
    lock_name: OsString,
    /// Held for baton's life; released (after `Drop` unlinks the files) when
    /// the field is dropped.
    _lock: Flock<File>,
}

impl ControlFiles {
    /// Creates the socket at `path`, refusing if a live baton holds it and
    /// replacing what a dead one left.
    ///
    /// Refused at once, with the reason: a path longer than a Unix socket
    /// address holds; a directory that is a symlink, is not baton's user's,
    /// or is writable by its group or others (a missing one is created mode
    /// 0700); a lock file that is a symlink, not a regular file of baton's
    /// user, or has other hard links; something other than a socket at
    /// `path`.
    pub fn create(path: &Path) -> Result<(ControlFiles, UnixListener), Error> {
        check_length(path)?;
        let refuse = |reason: String| Error::ControlRefused {
            path: path.to_path_buf(),
            reason,
        };
        let name = path
            .file_name()
            .ok_or_else(|| refuse("the path names no file".into()))?
            .to_owned();
        let dir_path = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let dir = ControlDir::open(dir_path, &name).map_err(|p| p.into_error(path))?;
        let mut lock_name = name.clone();
        lock_name.push(".lock");
        let lock = dir.lock(&lock_name).map_err(|p| p.into_error(path))?;

        let listener = match place_socket(&dir, &name) {
            Ok(listener) => listener,
            Err(p) => {
                // Still holding the lock: the file is ours to remove.
                let _ = unlinkat(&dir.fd, lock_name.as_os_str(), UnlinkatFlags::NoRemoveDir);
                return Err(p.into_error(path));
            }
        };
        let files = ControlFiles {
            path: path.to_path_buf(),
            dir,
            name,
            lock_name,
            _lock: lock,
        };
        Ok((files, listener))
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory's and the lock file's descriptors, to carry across an
    /// upgrade's exec.
    pub fn fds(&self) -> (std::os::fd::RawFd, std::os::fd::RawFd) {
        (self.dir.fd.as_raw_fd(), self._lock.as_raw_fd())
    }

    /// Takes over the files a supervisor before an upgrade made: its
    /// directory's descriptor and its lock file (the lock goes with the
    /// open file, so taking it again cannot fail while this process holds
    /// it).
    pub fn adopt(path: &Path, dir: OwnedFd, lock: OwnedFd) -> Result<ControlFiles, Error> {
        let name = path.file_name().unwrap_or_default().to_owned();
        let mut lock_name = name.clone();
        lock_name.push(".lock");
        let lock =
            Flock::lock(File::from(lock), FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
                Error::Control {
                    path: path.to_path_buf(),
                    what: "taking over its lock file after an upgrade".into(),
                    source: e.into(),
                }
            })?;
        Ok(ControlFiles {
            path: path.to_path_buf(),
            dir: ControlDir {
                path: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
                fd: dir,
            },
            name,
            lock_name,
            _lock: lock,
        })
    }
}

impl Drop for ControlFiles {
    fn drop(&mut self) {
        // Still holding the lock: no other baton can have taken the names.
        let _ = unlinkat(
            &self.dir.fd,
            self.name.as_os_str(),
            UnlinkatFlags::NoRemoveDir,
        );
        let _ = unlinkat(
            &self.dir.fd,
            self.lock_name.as_os_str(),
            UnlinkatFlags::NoRemoveDir,
        );
    }
}

/// Refuses a control path that does not fit in a Unix socket address.
pub fn check_length(path: &Path) -> Result<(), Error> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(Error::ControlRefused {
            path: path.to_path_buf(),
            reason: format!(
                "the path is {len} bytes; a Unix socket path is at most {MAX_SOCKET_PATH}"
            ),
        });
    }
    Ok(())
}

/// Binds the socket in `dir` under a temporary name and renames it to
/// `name`, replacing only a socket a dead baton left there.
fn place_socket(dir: &ControlDir, name: &OsStr) -> Result<UnixListener, Problem> {
    let shown = dir.path.join(name);
    // Only a socket (a dead baton's) is replaced: `--control` aimed at some
    // other file must not clobber it.
    match fstatat(&dir.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) if file_type(&st) != SFlag::S_IFSOCK => {
            return Err(Problem::Refused(format!(
                "{} exists and is not a socket; baton replaces only a socket a dead baton left",
                shown.display()
            )))
        }
        Ok(_) | Err(Errno::ENOENT) => {}
        Err(e) => return Err(Problem::io(format!("examining {}", shown.display()), e)),
    }

    // Bound under a temporary name, then renamed into place: a stale socket
    // of a dead baton is replaced atomically. The bind goes through
    // /proc/self/fd/<dir>: it lands in the very directory that was opened
    // and checked, whatever happens to the path meanwhile, and its length
    // never depends on the control path's.
    let tmp = format!(".baton-control.{}.tmp", std::process::id());
    let _ = unlinkat(&dir.fd, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
    let via_fd = format!("/proc/self/fd/{}/{tmp}", dir.fd.as_raw_fd());
    // With this umask the socket is born 0600: no window in which others
    // may connect.
    let old = umask(Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(&via_fd);
    umask(old);
    let listener = bound.map_err(|e| Problem::Io(format!("binding it as {via_fd}"), e))?;
    let placed = listener
        .set_nonblocking(true)
        .map_err(|e| Problem::Io("configuring it".into(), e))
        .and_then(|()| dir.seal_socket(&tmp))
        .and_then(|()| {
            renameat(&dir.fd, tmp.as_str(), &dir.fd, name)
                .map_err(|e| Problem::io(format!("renaming it into place in {}", dir.shown()), e))
        });
    if let Err(p) = placed {
        let _ = unlinkat(&dir.fd, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
        return Err(p);
    }
    Ok(listener)
}

/// Why a step of creating the socket failed, before it is tied to the
/// socket's path.
enum Problem {
    /// Baton will not use what it found; the reason says why.
    Refused(String),
    /// A system call failed while doing the named thing.
    Io(String, io::Error),
    /// A live baton holds the lock; its pid, as the lock file says.
    InUse(String),
}

impl Problem {
    fn io(what: String, e: Errno) -> Problem {
        Problem::Io(what, e.into())
    }

    fn into_error(self, path: &Path) -> Error {
        match self {
            Problem::Refused(reason) => Error::ControlRefused {
                path: path.to_path_buf(),
                reason,
            },
            Problem::Io(what, source) => Error::Control {
                path: path.to_path_buf(),
                what,
                source,
            },
            Problem::InUse(pid) => Error::ControlInUse {
                path: path.to_path_buf(),
                pid,
            },
        }
    }
}

/// The control directory, opened without following a symlink and checked to
/// be baton's alone: owned by its euid, writable by no one else.
#[derive(Debug)]
struct ControlDir {
    /// The path it was opened by, for messages only.
    path: PathBuf,
    fd: OwnedFd,
}

impl ControlDir {
    /// Creates `path` mode 0700 if missing (`mkdir` never follows a symlink
    /// in its place), opens it `O_NOFOLLOW` and checks it through the
    /// descriptor. `socket` is the socket's name, for the advice.
    fn open(path: &Path, socket: &OsStr) -> Result<ControlDir, Problem> {
        let me = geteuid().as_raw();
        let created = match mkdir(path, Mode::S_IRWXU) {
            Ok(()) => true,
            Err(Errno::EEXIST) => false,
            Err(e) => {
                let what = format!("creating its directory {}", path.display());
                return Err(Problem::Io(what, e.into()));
            }
        };
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = match open(path, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(e @ (Errno::ELOOP | Errno::ENOTDIR)) => {
                let link = lstat(path).is_ok_and(|st| file_type(&st) == SFlag::S_IFLNK);
                return Err(if link {
                    Problem::Refused(format!(
                        "{} is a symbolic link; baton will not follow it",
                        path.display()
                    ))
                } else {
                    let what = format!("opening its directory {}", path.display());
                    Problem::Io(what, e.into())
                });
            }
            Err(e) => {
                let what = format!("opening its directory {}", path.display());
                return Err(Problem::Io(what, e.into()));
            }
        };
        let dir = ControlDir {
            path: path.to_path_buf(),
            fd,
        };
        let st = fstat(&dir.fd)
            .map_err(|e| Problem::io(format!("examining its directory {}", dir.shown()), e))?;
        if st.st_uid != me {
            return Err(Problem::Refused(format!(
                "{} belongs to uid {}, not to baton (uid {me}); give --control a path in a \
                 directory of uid {me} that no one else may write",
                path.display(),
                st.st_uid,
            )));
        }
        if created {
            // The umask may have taken bits from the owner; 0700 exactly.
            fchmod(&dir.fd, Mode::S_IRWXU).map_err(|e| {
                let what = format!("setting the mode of its directory {} to 0700", dir.shown());
                Problem::io(what, e)
            })?;
        } else if let Some(who) = writable_by(st.st_mode) {
            let advice = if st.st_mode & libc::S_ISVTX != 0 {
                // A shared directory like /tmp: a private one inside it.
                let private = path.join(format!("baton-{me}")).join(socket);
                format!(
                    "baton keeps its control socket only in a private directory: give --control \
                     a path such as {} (baton creates that directory, mode 0700)",
                    private.display()
                )
            } else {
                "baton keeps its control socket only in a private directory: remove that \
                 permission, or give --control a path in another directory"
                    .to_owned()
            };
            return Err(Problem::Refused(format!(
                "{} is writable by {who}; {advice}",
                path.display()
            )));
        }
        Ok(dir)
    }

    /// Opens (creating it mode 0600) and locks the lock file `name`, and
    /// writes baton's pid into it.
    fn lock(&self, name: &OsStr) -> Result<Flock<File>, Problem> {
        let me = geteuid().as_raw();
        let shown = self.path.join(name);
        let refuse = |problem: String| Problem::Refused(format!("{} {problem}", shown.display()));
        let io =
            |what: &str, e: Errno| Problem::Io(format!("{what} {}", shown.display()), e.into());
        // O_NONBLOCK: a FIFO or device planted in its place never blocks
        // the open (it is then refused as not a regular file).
        let flags = OFlag::O_RDWR
            | OFlag::O_CREAT
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_CLOEXEC;
        for _ in 0..LOCK_ATTEMPTS {
            let fd = match openat(&self.fd, name, flags, Mode::S_IRUSR | Mode::S_IWUSR) {
                Ok(fd) => fd,
                Err(Errno::ELOOP) => {
                    return Err(refuse(
                        "is a symbolic link; baton will not follow it".into(),
                    ))
                }
                Err(e) => return Err(io("opening its lock file", e)),
            };
            let st = fstat(&fd).map_err(|e| io("examining its lock file", e))?;
            if file_type(&st) != SFlag::S_IFREG {
                return Err(refuse("is not a regular file".into()));
            }
            if st.st_uid != me {
                return Err(refuse(format!(
                    "belongs to uid {}, not to baton (uid {me})",
                    st.st_uid
                )));
            }
            if st.st_nlink != 1 {
                return Err(refuse(format!(
                    "has {} hard links; baton writes only a file of its own",
                    st.st_nlink
                )));
            }
            let lock = match Flock::lock(File::from(fd), FlockArg::LockExclusiveNonblock) {
                Ok(lock) => lock,
                Err((mut file, Errno::EWOULDBLOCK)) => {
                    let mut pid = String::new();
                    let _ = file.read_to_string(&mut pid);
                    return Err(Problem::InUse(pid.trim().to_owned()));
                }
                Err((_, e)) => return Err(io("locking its lock file", e)),
            };
            // A baton that was stopping may have unlinked the file between
            // our open and our lock: the lock counts only while the name
            // still refers to the file locked.
            match fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(now) if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino) => {}
                Ok(_) | Err(Errno::ENOENT) => continue,
                Err(e) => return Err(io("examining its lock file", e)),
            }
            fchmod(&*lock, Mode::S_IRUSR | Mode::S_IWUSR)
                .map_err(|e| io("setting the mode of its lock file", e))?;
            lock.set_len(0)
                .and_then(|()| lock.write_all_at(std::process::id().to_string().as_bytes(), 0))
                .map_err(|e| {
                    Problem::Io(format!("writing baton's pid to {}", shown.display()), e)
                })?;
            return Ok(lock);
        }
        Err(Problem::Io(
            format!("locking its lock file {}", shown.display()),
            io::Error::other("it was replaced again and again"),
        ))
    }

    /// Makes the freshly bound socket `name` mode 0600 and checks that it
    /// is: a default ACL on the directory can override the umask.
    fn seal_socket(&self, name: &str) -> Result<(), Problem> {
        let owner_rw = Mode::S_IRUSR | Mode::S_IWUSR;
        // Without fchmodat2 (Linux 6.6) an old libc refuses NoFollowSymlink
        // outright; the check below still holds.
        match fchmodat(&self.fd, name, owner_rw, FchmodatFlags::NoFollowSymlink) {
            Ok(()) | Err(Errno::EOPNOTSUPP) => {}
            Err(e) => {
                let what = format!("setting the mode of its socket in {} to 0600", self.shown());
                return Err(Problem::io(what, e));
            }
        }
        let st = fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| Problem::io(format!("examining its socket in {}", self.shown()), e))?;
        if file_type(&st) != SFlag::S_IFSOCK || st.st_mode & 0o077 != 0 {
            return Err(Problem::Refused(format!(
                "the socket bound in {} has mode {:o}, not 0600",
                self.path.display(),
                st.st_mode & 0o7777
            )));
        }
        Ok(())
    }

    /// The directory's path, for messages.
    fn shown(&self) -> std::path::Display<'_> {
        self.path.display()
    }
}

/// Who, besides the owner, may write a file of mode `mode`.
fn writable_by(mode: libc::mode_t) -> Option<&'static str> {
    match (mode & 0o020 != 0, mode & 0o002 != 0) {
        (true, true) => Some("its group and others"),
        (true, false) => Some("its group"),
        (false, true) => Some("others"),
        (false, false) => None,
    }
}

fn file_type(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}
