//! sd_notify in both directions.
//!
//! Inbound: each worker gets its own `NOTIFY_SOCKET`, a datagram socket of the
//! supervisor's, so a message is attributed to its generation by the socket it
//! arrives on, whichever process of that generation sent it (a shell script's
//! `systemd-notify` has a pid of its own). [`read_worker_notify`] turns each
//! datagram into an event for the supervisor's loop and closes every
//! descriptor that comes with it at once (`systemd-notify` sends `BARRIER=1`
//! with a pipe and waits until the receiver closes it). A datagram counts
//! only if the kernel says it came from the worker's user or root
//! (`SO_PASSCRED`): no other local user can make a generation ready, whatever
//! the socket file's mode.
//!
//! Outbound: [`Systemd`] sends the supervisor's own `READY=1`, `RELOADING=1`,
//! `STATUS=`, `STOPPING=1` to the `NOTIFY_SOCKET` baton itself was started
//! with. A worker's messages are never forwarded there.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram as StdDatagram;
use std::time::Duration;

use nix::sys::socket::{self, ControlMessageOwned, MsgFlags};
use tokio::io::Interest;
use tokio::net::UnixDatagram;
use tokio::sync::mpsc;

use crate::event::{Event, NotifyMessage};

/// The largest notify datagram read; systemd allows more, but no state we act
/// on is near this size. Longer datagrams are cut, never misread as others.
const MAX_DATAGRAM: usize = 16 * 1024;

/// Reads generation `generation`'s notify socket until the loop goes away;
/// only datagrams sent by `uid` or root count.
pub async fn read_worker_notify(
    generation: u64,
    socket: StdDatagram,
    uid: u32,
    events: mpsc::Sender<Event>,
) {
    let socket = match UnixDatagram::from_std(socket) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("generation {generation}: watching its notify socket: {e}");
            return;
        }
    };
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let fd = socket.as_fd().as_raw_fd();
        let got = socket
            .async_io(Interest::READABLE, || recv_closing_fds(fd, &mut buf))
            .await;
        match got {
            Ok((len, truncated, sender)) => {
                if sender != Some(uid) && sender != Some(0) {
                    let who = sender.map_or("an unknown sender".to_owned(), |u| format!("uid {u}"));
                    tracing::warn!(
                        "generation {generation}: ignored a notify message from {who} (only uid \
                         {uid} and root may send)"
                    );
                    continue;
                }
                if truncated {
                    tracing::warn!(
                        "generation {generation}: ignored a notify message longer than \
                         {MAX_DATAGRAM} bytes"
                    );
                    continue;
                }
                let message = NotifyMessage::parse(&buf[..len]);
                if events
                    .send(Event::Notify {
                        generation,
                        message,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => {
                // ENOMEM, ENOBUFS and their kin pass; the socket stays ours.
                tracing::warn!("generation {generation}: reading its notify socket: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Receives one datagram; closes any descriptors that came with it.
/// Returns its length, whether it was cut, and the sender's uid.
fn recv_closing_fds(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, bool, Option<u32>)> {
    let mut cmsg = nix::cmsg_space!([RawFd; 16], libc::ucred);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = socket::recvmsg::<()>(
        fd,
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
    )?;
    let mut sender = None;
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            match c {
                // Dropped at once: that close is what `BARRIER=1` waits for.
                ControlMessageOwned::ScmRights(fds) => drop(crate::sys::own_received(&fds)),
                ControlMessageOwned::ScmCredentials(creds) => sender = Some(creds.uid()),
                _ => {}
            }
        }
    }
    Ok((msg.bytes, msg.flags.contains(MsgFlags::MSG_TRUNC), sender))
}

/// The supervisor's own line to systemd, if it was started with a
/// `NOTIFY_SOCKET`.
#[derive(Debug)]
pub struct Systemd {
    target: Option<(StdDatagram, std::os::unix::net::SocketAddr)>,
    /// `NOTIFY_SOCKET` as given, for messages that carry descriptors.
    raw: Vec<u8>,
    /// systemd's file descriptor store takes this many (`$FDSTORE`, systemd
    /// 254+, set when the unit has `FileDescriptorStoreMax=`); 0: none.
    fd_store: usize,
}

impl Systemd {
    /// Reads `NOTIFY_SOCKET` (a path, or `@name` for an abstract socket).
    /// Without it, every send is a no-op.
    pub fn from_env() -> Systemd {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let addr = notify_addr(path.as_encoded_bytes()).ok()?;
            let socket = StdDatagram::unbound().ok()?;
            socket
                .set_write_timeout(Some(Duration::from_secs(1)))
                .ok()?;
            Some((socket, addr))
        });
        let raw = std::env::var_os("NOTIFY_SOCKET")
            .map(|p| p.as_encoded_bytes().to_vec())
            .unwrap_or_default();
        let fd_store = match &target {
            Some(_) => std::env::var("FDSTORE")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0),
            None => 0,
        };
        Systemd {
            target,
            raw,
            fd_store,
        }
    }

    /// How many descriptors systemd's store keeps for baton (0: no store).
    pub fn fd_store(&self) -> usize {
        self.fd_store
    }

    /// Keeps `fd` in systemd's file descriptor store under `name`, in place
    /// of what was stored under it (`None`: removes it). A no-op without a
    /// store. What is stored comes back in `LISTEN_FDS` when systemd starts
    /// baton again after a crash.
    pub fn store(&self, name: &str, fd: Option<std::os::fd::BorrowedFd<'_>>) {
        if self.fd_store == 0 {
            return;
        }
        self.send(&format!("FDSTOREREMOVE=1\nFDNAME={name}"));
        let Some(fd) = fd else {
            return;
        };
        let message = format!("FDSTORE=1\nFDNAME={name}");
        if let Err(e) = self.send_fds(message.as_bytes(), &[fd.as_raw_fd()]) {
            tracing::warn!("storing `{name}` in systemd's file descriptor store: {e}");
        }
    }

    /// Sends one message with descriptors attached.
    fn send_fds(&self, message: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let Some((socket, _)) = &self.target else {
            return Ok(());
        };
        let addr = match self.raw.strip_prefix(b"@") {
            Some(name) => socket::UnixAddr::new_abstract(name)?,
            None => socket::UnixAddr::new(std::ffi::OsStr::from_bytes(&self.raw))?,
        };
        let iov = [io::IoSlice::new(message)];
        let rights = [socket::ControlMessage::ScmRights(fds)];
        socket::sendmsg(
            socket.as_raw_fd(),
            &iov,
            &rights,
            MsgFlags::MSG_NOSIGNAL,
            Some(&addr),
        )?;
        Ok(())
    }

    /// Sends one message (newline-separated assignments); failures are
    /// logged, never fatal: systemd being slow must not stop a reload.
    pub fn send(&self, message: &str) {
        if let Some((socket, addr)) = &self.target {
            if let Err(e) = socket.send_to_addr(message.as_bytes(), addr) {
                tracing::warn!("telling systemd {message:?}: {e}");
            }
        }
    }

    /// `RELOADING=1` with the `MONOTONIC_USEC=` systemd requires beside it.
    pub fn reloading(&self, status: &str) {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
            .unwrap_or(0);
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={now}\nSTATUS={status}"
        ));
    }
}

fn notify_addr(path: &[u8]) -> io::Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    match path.strip_prefix(b"@") {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name),
        None => std::os::unix::net::SocketAddr::from_pathname(std::path::Path::new(
            std::ffi::OsStr::from_bytes(path),
        )),
    }
}

use std::os::unix::ffi::OsStrExt;
