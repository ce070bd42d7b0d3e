//! The control socket: how `baton reload`, `baton status` and `baton stop`
//! reach a running supervisor.
//!
//! One request per connection: a JSON object on one line
//! (`{"command":"reload","wait":true}`, `{"command":"status"}`,
//! `{"command":"stop"}`), answered by one JSON line with `"ok"` and either the
//! result or `"error"`. The socket is created mode 0600 under a temporary name
//! and renamed into place, guarded by a lock file so two batons never share
//! one; every peer's uid is checked with `SO_PEERCRED` (root or baton's own),
//! requests are bounded in size and time, and connections in number (the
//! oldest silent one makes room for a new one), so garbage or a crowd of
//! idle clients never stops baton or its answers.
//!
//! This module never touches supervisor state: requests become events.

use std::collections::VecDeque;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::supervisor::Event;
use crate::Error;

/// The longest request line accepted.
const MAX_REQUEST: u64 = 4096;
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How many requests are answered at once; more are refused.
const MAX_CONNECTIONS: usize = 64;
/// How many connections may be sending their request at once; past this the
/// oldest is dropped.
const MAX_PENDING: usize = 128;

/// A request on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    /// Start a reload; with `wait`, answer once it has succeeded or failed.
    Reload {
        /// Answer only when the reload is over.
        #[serde(default)]
        wait: bool,
    },
    /// Describe the generations and the last reload.
    Status,
    /// Drain every generation and exit; answered when done. Repeating it
    /// waits for the same drain; only `now` kills.
    Stop {
        /// Kill every worker now instead of letting them drain.
        #[serde(default)]
        now: bool,
    },
}

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
    PathBuf::from(format!("/tmp/baton-{}", nix::unistd::geteuid())).join("baton.sock")
}

/// The bound control socket; removes its files when dropped.
#[derive(Debug)]
pub struct ControlSocket {
    path: PathBuf,
    /// One permit per connection being served; `finish` takes them all.
    slots: Arc<Semaphore>,
    listener: Option<std::os::unix::net::UnixListener>,
    _lock: nix::fcntl::Flock<std::fs::File>,
    lock_path: PathBuf,
}

impl ControlSocket {
    /// Creates the socket at `path`, refusing if a live baton holds it and
    /// replacing what a dead one left.
    pub fn bind(path: &Path) -> Result<ControlSocket, Error> {
        let err = |what: &str, source: io::Error| Error::Control {
            path: path.to_path_buf(),
            what: what.to_owned(),
            source,
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        prepare_dir(&dir).map_err(|e| err("preparing its directory", e))?;
        let mut lock_name = path.as_os_str().to_owned();
        lock_name.push(".lock");
        let lock_path = PathBuf::from(lock_name);
        let lock_file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| err("opening its lock file", e))?;
        let mut lock =
            match nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(lock) => lock,
                Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                    let mut pid = String::new();
                    let _ = std::io::Read::read_to_string(&mut file, &mut pid);
                    return Err(Error::ControlInUse {
                        path: path.to_path_buf(),
                        pid: pid.trim().to_owned(),
                    });
                }
                Err((_, e)) => return Err(err("locking its lock file", e.into())),
            };
        use std::io::{Seek, Write};
        let _ = lock.set_len(0);
        let _ = lock.seek(std::io::SeekFrom::Start(0));
        let _ = write!(lock, "{}", std::process::id());

        // Bind under a temporary name with a umask that leaves no window in
        // which the socket is reachable by others, then rename into place:
        // a stale socket of a dead baton is replaced atomically.
        let tmp = dir.join(format!(".baton-control.{}.tmp", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
        let bound = std::os::unix::net::UnixListener::bind(&tmp);
        nix::sys::stat::umask(old);
        let listener = bound.map_err(|e| err("binding", e))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                err("moving into place", e)
            })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| err("configuring", e))?;
        Ok(ControlSocket {
            path: path.to_path_buf(),
            slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            listener: Some(listener),
            _lock: lock,
            lock_path,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves connections, sending each request to the loop as an event.
    /// Runs until the loop goes away.
    pub fn serve(&mut self, events: mpsc::Sender<Event>) -> Result<(), Error> {
        let std_listener = self.listener.take().ok_or_else(|| Error::Control {
            path: self.path.clone(),
            what: "serving".into(),
            source: io::Error::other("already serving"),
        })?;
        let listener = UnixListener::from_std(std_listener).map_err(|e| Error::Control {
            path: self.path.clone(),
            what: "serving".into(),
            source: e,
        })?;
        tokio::spawn(accept_loop(listener, self.slots.clone(), events));
        Ok(())
    }

    /// Lets connections that are writing their answer (say, to `baton stop`)
    /// finish, for at most `limit`, before the runtime goes away.
    pub async fn finish(&self, limit: Duration) {
        let all = MAX_CONNECTIONS as u32;
        let _ = tokio::time::timeout(limit, self.slots.acquire_many(all)).await;
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(&self.lock_path);
    }
}

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};

/// Creates `dir` mode 0700 if missing; refuses one that others could write.
fn prepare_dir(dir: &Path) -> io::Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::metadata(dir)?;
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::geteuid().as_raw();
    // A world-writable sticky directory such as /tmp is fine: nobody else can
    // rename or remove our files in it.
    let sticky = meta.mode() & 0o1000 != 0;
    if meta.uid() != me && meta.uid() != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} belongs to uid {}, not to this user (uid {me})",
                dir.display(),
                meta.uid()
            ),
        ));
    }
    if meta.mode() & 0o022 != 0 && !sticky {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is writable by other users; use a private directory",
                dir.display()
            ),
        ));
    }
    Ok(())
}

async fn accept_loop(listener: UnixListener, slots: Arc<Semaphore>, events: mpsc::Sender<Event>) {
    let me = nix::unistd::geteuid().as_raw();
    // Connections still sending their request. When there are too many, the
    // oldest is dropped: a crowd of idle clients churns through here while a
    // real client, which sends its request at once, is answered.
    let mut pending: VecDeque<tokio::task::AbortHandle> = VecDeque::new();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // EMFILE and friends: say so, then keep serving.
                tracing::warn!("control socket: accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if events.is_closed() {
            return;
        }
        let uid = stream.peer_cred().map(|c| c.uid());
        match uid {
            Ok(uid) if uid == 0 || uid == me => {}
            Ok(uid) => {
                tracing::warn!("control socket: refused a connection from uid {uid}");
                let answer = error(&format!("uid {uid} may not control this baton"));
                tokio::spawn(async move {
                    let mut stream = stream;
                    let _ = reply(&mut stream, &answer).await;
                });
                continue;
            }
            Err(e) => {
                tracing::warn!("control socket: reading the peer's credentials: {e}");
                continue;
            }
        }
        pending.retain(|task| !task.is_finished());
        if pending.len() >= MAX_PENDING {
            if let Some(oldest) = pending.pop_front() {
                oldest.abort();
            }
        }
        let reader = tokio::spawn(read_request(stream, slots.clone(), events.clone()));
        pending.push_back(reader.abort_handle());
    }
}

/// Reads one request (bounded in size and time), then hands it to a task of
/// its own that holds one of the answer slots until it has answered.
async fn read_request(mut stream: UnixStream, slots: Arc<Semaphore>, events: mpsc::Sender<Event>) {
    let mut line = String::new();
    let read = {
        let mut reader = BufReader::new((&mut stream).take(MAX_REQUEST + 1));
        tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await
    };
    let request = match read {
        Err(_) => Err("no request within 5s".to_owned()),
        Ok(Err(e)) => Err(format!("reading the request: {e}")),
        Ok(Ok(n)) if n as u64 > MAX_REQUEST => {
            Err(format!("request longer than {MAX_REQUEST} bytes"))
        }
        Ok(Ok(_)) => serde_json::from_str::<Request>(line.trim()).map_err(|e| {
            format!(
                "malformed request {:?}: {e}",
                line.trim().chars().take(60).collect::<String>()
            )
        }),
    };
    let request = match request {
        Ok(request) => request,
        Err(message) => {
            let _ = reply(&mut stream, &error(&message)).await;
            return;
        }
    };
    // Answers that wait (a reload's outcome, a stop) hold a slot; a status
    // is answered at once and needs none, so waiters never crowd it out.
    let waits = matches!(
        request,
        Request::Reload { wait: true } | Request::Stop { .. }
    );
    let slot = if waits {
        match slots.try_acquire_owned() {
            Ok(slot) => Some(slot),
            Err(_) => {
                let message = "too many control requests at once; try again";
                let _ = reply(&mut stream, &error(message)).await;
                return;
            }
        }
    } else {
        None
    };
    // Not aborted with the readers: a `reload --wait` may take a while.
    tokio::spawn(async move {
        let (tx, rx) = oneshot::channel();
        let answer = if events
            .send(Event::Control { request, reply: tx })
            .await
            .is_err()
        {
            error("baton is shutting down")
        } else {
            rx.await.unwrap_or_else(|_| error("baton is shutting down"))
        };
        let _ = reply(&mut stream, &answer).await;
        drop(slot);
    });
}

/// An error answer.
pub fn error(message: &str) -> Value {
    json!({ "ok": false, "error": message })
}

async fn reply(stream: &mut UnixStream, value: &Value) -> io::Result<()> {
    let mut line = value.to_string();
    line.push('\n');
    tokio::time::timeout(REQUEST_TIMEOUT, stream.write_all(line.as_bytes()))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "client is not reading"))??;
    stream.shutdown().await
}

/// Sends `request` to the baton at `path` and returns its answer (client
/// side, for `baton reload|status|stop`).
pub async fn request(path: &Path, request: &Request) -> Result<Value, Error> {
    let err = |what: &str, source: io::Error| Error::Control {
        path: path.to_path_buf(),
        what: what.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => Error::NotRunning {
                path: path.to_path_buf(),
            },
            _ => err("connecting", e),
        })?;
    let mut line = serde_json::to_string(request).map_err(|e| err("encoding", e.into()))?;
    line.push('\n');
    // baton may answer (a refusal) and close before reading the request:
    // then the answer is what counts, not the failed write.
    let sent = stream.write_all(line.as_bytes()).await;
    let mut answer = String::new();
    let read = BufReader::new(stream).read_line(&mut answer).await;
    match (sent, read) {
        (_, Ok(n)) if n > 0 => {}
        (Err(e), _) => return Err(err("sending the request", e)),
        (Ok(()), Err(e)) => return Err(err("reading the answer", e)),
        (Ok(()), Ok(_)) => {
            return Err(err(
                "reading the answer",
                io::Error::new(io::ErrorKind::UnexpectedEof, "baton closed the connection"),
            ))
        }
    }
    serde_json::from_str(&answer).map_err(|e| err("reading the answer", e.into()))
}
