//! The control socket: how `baton reload`, `baton status` and `baton stop`
//! reach a running supervisor.
//!
//! One request per connection: a JSON object on one line
//! (`{"command":"reload","wait":true}`, `{"command":"status"}`,
//! `{"command":"stop"}`), answered by one JSON line with `"ok"` and either the
//! result or `"error"`; both are the types of `api.rs`. Every peer's uid is
//! checked with `SO_PEERCRED` (root or baton's own), requests are bounded in
//! size and time, and connections in number (the oldest silent one makes
//! room for a new one), so garbage or a crowd of idle clients never stops
//! baton or its answers. The socket's files are `files.rs`'s.
//!
//! During an upgrade of baton the socket stops accepting ([`ControlSocket::pause`])
//! while it stays open: new clients wait in its accept queue for the new
//! supervisor, and [`ControlSocket::idle`] waits until every connection
//! already accepted has been answered. A `baton upgrade --wait` client's
//! connection is handed to the loop (in [`Event::Upgrade`]) so that the new
//! supervisor answers it.
//!
//! This module never touches supervisor state: requests become events.

mod files;

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};
use tokio::task::AbortHandle;

pub use files::{default_path, MAX_SOCKET_PATH};

use crate::api::{Reply, Request};
use crate::event::Event;
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

/// The bound control socket; removes its files when dropped.
#[derive(Debug)]
pub struct ControlSocket {
    files: files::ControlFiles,
    /// One permit per connection being served; `finish` takes them all.
    slots: Arc<Semaphore>,
    /// Connections accepted so far (for `--metrics`).
    connections: Arc<AtomicU64>,
    /// The listening socket, kept for life (the accept loop has a
    /// duplicate, so pausing it closes nothing).
    listener: std::os::unix::net::UnixListener,
    /// The accept loop, while it runs.
    accepting: Option<AbortHandle>,
    /// Connections accepted and not answered yet.
    busy: Arc<Busy>,
}

/// Counts connections accepted and not yet answered (or handed to the
/// loop), and wakes whoever waits for none to be left.
#[derive(Debug, Default)]
struct Busy {
    count: AtomicUsize,
    none_left: Notify,
}

/// One connection in [`Busy`]; dropping it counts it out.
struct BusyGuard(Arc<Busy>);

impl Busy {
    fn enter(self: &Arc<Busy>) -> BusyGuard {
        self.count.fetch_add(1, Ordering::SeqCst);
        BusyGuard(self.clone())
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.none_left.notify_waiters();
        }
    }
}

impl ControlSocket {
    /// Creates the socket at `path`, refusing if a live baton holds it and
    /// replacing what a dead one left (see `files.rs` for what is refused).
    pub fn bind(path: &Path) -> Result<ControlSocket, Error> {
        let (files, listener) = files::ControlFiles::create(path)?;
        Ok(ControlSocket::new(files, listener))
    }

    fn new(files: files::ControlFiles, listener: std::os::unix::net::UnixListener) -> Self {
        ControlSocket {
            files,
            slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            connections: Arc::default(),
            listener,
            accepting: None,
            busy: Arc::default(),
        }
    }

    /// Takes over the socket a supervisor before an upgrade bound: its
    /// listening socket, directory and lock file.
    pub fn adopt(
        path: &Path,
        listener: OwnedFd,
        dir: OwnedFd,
        lock: OwnedFd,
    ) -> Result<ControlSocket, Error> {
        let files = files::ControlFiles::adopt(path, dir, lock)?;
        Ok(ControlSocket::new(files, listener.into()))
    }

    /// The listening socket's, the directory's and the lock file's
    /// descriptors, to carry across an upgrade's exec.
    pub fn fds(&self) -> (RawFd, RawFd, RawFd) {
        let (dir, lock) = self.files.fds();
        (self.listener.as_raw_fd(), dir, lock)
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        self.files.path()
    }

    /// Serves connections, sending each request to the loop as an event.
    /// Runs until the loop goes away or [`ControlSocket::pause`].
    pub fn serve(&mut self, events: mpsc::Sender<Event>) -> Result<(), Error> {
        let error = |source: io::Error| Error::Control {
            path: self.path().to_path_buf(),
            what: "serving".into(),
            source,
        };
        let listener = self.listener.try_clone().map_err(error)?;
        let listener = UnixListener::from_std(listener).map_err(error)?;
        let task = tokio::spawn(accept_loop(
            listener,
            self.slots.clone(),
            self.connections.clone(),
            self.busy.clone(),
            events,
        ));
        self.accepting = Some(task.abort_handle());
        Ok(())
    }

    /// Stops accepting: new clients wait in the socket's queue.
    pub fn pause(&mut self) {
        if let Some(task) = self.accepting.take() {
            task.abort();
        }
    }

    /// Waits until every connection accepted so far has been answered (or
    /// handed to the loop), for at most `limit`.
    pub async fn idle(&self, limit: Duration) {
        let wait = async {
            loop {
                let notified = self.busy.none_left.notified();
                if self.busy.count.load(Ordering::SeqCst) == 0 {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(limit, wait).await;
    }

    /// How many connections were accepted so far, counted as they come.
    pub fn connections(&self) -> Arc<AtomicU64> {
        self.connections.clone()
    }

    /// Lets connections that are writing their answer (say, to `baton stop`)
    /// finish, for at most `limit`, before the runtime goes away.
    pub async fn finish(&self, limit: Duration) {
        let all = MAX_CONNECTIONS as u32;
        let _ = tokio::time::timeout(limit, self.slots.acquire_many(all)).await;
    }
}

async fn accept_loop(
    listener: UnixListener,
    slots: Arc<Semaphore>,
    connections: Arc<AtomicU64>,
    busy: Arc<Busy>,
    events: mpsc::Sender<Event>,
) {
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
        connections.fetch_add(1, Ordering::Relaxed);
        let guard = busy.enter();
        let uid = stream.peer_cred().map(|c| c.uid());
        match uid {
            Ok(uid) if uid == 0 || uid == me => {}
            Ok(uid) => {
                tracing::warn!("control socket: refused a connection from uid {uid}");
                let answer = Reply::Refused(format!("uid {uid} may not control this baton"));
                tokio::spawn(async move {
                    let mut stream = stream;
                    let _ = reply(&mut stream, &answer).await;
                    drop(guard);
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
        let reader = tokio::spawn(read_request(stream, slots.clone(), events.clone(), guard));
        pending.push_back(reader.abort_handle());
    }
}

/// Reads one request (bounded in size and time), then hands it to a task of
/// its own that holds one of the answer slots until it has answered.
async fn read_request(
    mut stream: UnixStream,
    slots: Arc<Semaphore>,
    events: mpsc::Sender<Event>,
    guard: BusyGuard,
) {
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
            let _ = reply(&mut stream, &Reply::Refused(message)).await;
            return;
        }
    };
    if let Request::Upgrade { wait: true, binary } = request {
        // The loop keeps the connection and answers it when the upgrade is
        // over: this supervisor, or the new one after the exec.
        let client = stream
            .into_std()
            .and_then(|s| s.set_nonblocking(false).map(|()| OwnedFd::from(s)));
        match client {
            Ok(client) => {
                let upgrade = Event::Upgrade {
                    binary,
                    client: Some(client),
                };
                let _ = events.send(upgrade).await;
            }
            Err(e) => tracing::warn!("control socket: keeping an upgrade's client: {e}"),
        }
        drop(guard);
        return;
    }
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
                let _ = reply(&mut stream, &Reply::Refused(message.into())).await;
                return;
            }
        }
    } else {
        None
    };
    // Not aborted with the readers: a `reload --wait` may take a while.
    tokio::spawn(async move {
        let (tx, rx) = oneshot::channel();
        let sent = events.send(Event::Control { request, reply: tx }).await;
        // A waiting request does not hold up an upgrade: it is in the loop's
        // hands (which lets it go first, or answers it).
        let guard = (!waits).then_some(guard);
        let answer = match sent {
            Err(_) => Reply::Refused("baton is shutting down".into()),
            Ok(()) => rx
                .await
                .unwrap_or_else(|_| Reply::Refused("baton is shutting down".into())),
        };
        let _ = reply(&mut stream, &answer).await;
        drop(slot);
        drop(guard);
    });
}

/// Answers `answer` on a client's connection that the loop kept (an
/// `upgrade --wait`), in a task of its own.
pub fn answer(client: OwnedFd, answer: Reply) {
    tokio::spawn(async move {
        let std = std::os::unix::net::UnixStream::from(client);
        if std.set_nonblocking(true).is_err() {
            return;
        }
        if let Ok(mut stream) = UnixStream::from_std(std) {
            let _ = reply(&mut stream, &answer).await;
        }
    });
}

async fn reply(stream: &mut UnixStream, answer: &Reply) -> io::Result<()> {
    let mut line = answer.to_json();
    line.push('\n');
    tokio::time::timeout(REQUEST_TIMEOUT, stream.write_all(line.as_bytes()))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "client is not reading"))??;
    stream.shutdown().await
}

/// Sends `request` to the baton at `path` and returns its answer (client
/// side, for `baton reload|status|stop`).
pub async fn request(path: &Path, request: &Request) -> Result<Reply, Error> {
    files::check_length(path)?;
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
    Reply::parse(request, answer.trim()).map_err(|e| err("reading the answer", e.into()))
}
