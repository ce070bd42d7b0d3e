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
//! This module never touches supervisor state: requests become events.

mod files;

use std::collections::VecDeque;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, Semaphore};

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
    listener: Option<std::os::unix::net::UnixListener>,
}

impl ControlSocket {
    /// Creates the socket at `path`, refusing if a live baton holds it and
    /// replacing what a dead one left (see `files.rs` for what is refused).
    pub fn bind(path: &Path) -> Result<ControlSocket, Error> {
        let (files, listener) = files::ControlFiles::create(path)?;
        Ok(ControlSocket {
            files,
            slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            connections: Arc::default(),
            listener: Some(listener),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        self.files.path()
    }

    /// Serves connections, sending each request to the loop as an event.
    /// Runs until the loop goes away.
    pub fn serve(&mut self, events: mpsc::Sender<Event>) -> Result<(), Error> {
        let path = self.path().to_path_buf();
        let error = |source: io::Error| Error::Control {
            path: path.clone(),
            what: "serving".into(),
            source,
        };
        let std_listener = self
            .listener
            .take()
            .ok_or_else(|| error(io::Error::other("already serving")))?;
        let listener = UnixListener::from_std(std_listener).map_err(error)?;
        tokio::spawn(accept_loop(
            listener,
            self.slots.clone(),
            self.connections.clone(),
            events,
        ));
        Ok(())
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
        let uid = stream.peer_cred().map(|c| c.uid());
        match uid {
            Ok(uid) if uid == 0 || uid == me => {}
            Ok(uid) => {
                tracing::warn!("control socket: refused a connection from uid {uid}");
                let answer = Reply::Refused(format!("uid {uid} may not control this baton"));
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
            let _ = reply(&mut stream, &Reply::Refused(message)).await;
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
        let answer = if events
            .send(Event::Control { request, reply: tx })
            .await
            .is_err()
        {
            Reply::Refused("baton is shutting down".into())
        } else {
            rx.await
                .unwrap_or_else(|_| Reply::Refused("baton is shutting down".into()))
        };
        let _ = reply(&mut stream, &answer).await;
        drop(slot);
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
