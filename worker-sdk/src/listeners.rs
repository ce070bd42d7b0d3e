//! The worker's listeners by name: checking that each descriptor is the
//! kind of socket it was declared as, handing each one out once, and
//! closing the inherited duplicates at fds 3.. once the same sockets have
//! arrived over the worker channel.
//!
//! # O_NONBLOCK
//!
//! A listener is one kernel socket shared by the supervisor and every
//! generation; its `O_NONBLOCK` flag lives on the open file description, so
//! all holders share it too. tokio needs non-blocking sockets, so taking a
//! listener sets `O_NONBLOCK`, for the std variants as well, so that every
//! SDK worker sees the same flag whichever way it takes its sockets. This is
//! what every listenfd-style server does; the supervisor never accepts or
//! reads on a listener, and nothing in this crate ever clears the flag
//! again (a blocking accept in one generation would otherwise hang another
//! generation's event loop).
//!
//! This module never binds, accepts, or closes a descriptor it cannot prove
//! to be a duplicate of one it holds.

use std::collections::HashSet;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Mutex, PoisonError};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{self, sockopt, AddressFamily, SockType, SockaddrLike, SockaddrStorage};
use nix::sys::stat::{fstat, SFlag};

use crate::error::{Error, KindName};
use crate::protocol::{ListenerInfo, ListenerKind};
use crate::sys;

/// One named listener.
#[derive(Debug)]
struct Slot {
    name: String,
    kind: ListenerKind,
    /// `None` once taken.
    fd: Option<OwnedFd>,
}

/// The listeners of this worker, in the supervisor's (or `BATON_LISTEN`'s)
/// order. Each can be taken once.
#[derive(Debug, Default)]
pub(crate) struct Listeners {
    slots: Mutex<Vec<Slot>>,
}

impl Listeners {
    /// A table of already checked descriptors.
    pub(crate) fn new(listeners: Vec<(String, ListenerKind, OwnedFd)>) -> Listeners {
        let slots = listeners
            .into_iter()
            .map(|(name, kind, fd)| Slot {
                name,
                kind,
                fd: Some(fd),
            })
            .collect();
        Listeners {
            slots: Mutex::new(slots),
        }
    }

    /// Every listener, taken or not.
    pub(crate) fn infos(&self) -> Vec<ListenerInfo> {
        let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots
            .iter()
            .map(|s| ListenerInfo {
                name: s.name.clone(),
                kind: s.kind,
            })
            .collect()
    }

    /// Takes listener `name`, which must be of kind `wanted`, and makes it
    /// non-blocking (see the module docs).
    pub(crate) fn take(&self, name: &str, wanted: ListenerKind) -> Result<OwnedFd, Error> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(slot) = slots.iter_mut().find(|s| s.name == name) else {
            let available = match slots.len() {
                0 => "no listeners".to_owned(),
                _ => {
                    let names: Vec<String> =
                        slots.iter().map(|s| format!("`{}`", s.name)).collect();
                    format!("only {}", names.join(", "))
                }
            };
            return Err(Error::NoSuchListener {
                name: name.to_owned(),
                available,
            });
        };
        if slot.kind != wanted {
            return Err(Error::WrongKind {
                name: name.to_owned(),
                kind: KindName(slot.kind),
                wanted: KindName(wanted),
            });
        }
        let fd = slot.fd.take().ok_or_else(|| Error::AlreadyTaken {
            name: name.to_owned(),
        })?;
        set_nonblocking(fd.as_fd()).map_err(|source| Error::Listener {
            name: name.to_owned(),
            what: "making it non-blocking",
            source,
        })?;
        Ok(fd)
    }
}

/// Sets `O_NONBLOCK` (never clears it: see the module docs).
fn set_nonblocking(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    if !flags.contains(OFlag::O_NONBLOCK) {
        fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    }
    Ok(())
}

/// What a descriptor turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    family: Option<AddressFamily>,
    ty: Option<SockType>,
    listening: bool,
}

/// Looks at `fd`; `Err` says what it is if it is not a socket at all.
fn shape(fd: BorrowedFd<'_>) -> Result<Shape, String> {
    let stat = fstat(fd).map_err(|e| format!("a descriptor fstat refuses ({e})"))?;
    let file_type = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT;
    if file_type != SFlag::S_IFSOCK {
        let what = match file_type {
            SFlag::S_IFREG => "a regular file",
            SFlag::S_IFDIR => "a directory",
            SFlag::S_IFIFO => "a pipe",
            SFlag::S_IFCHR => "a character device",
            _ => "something else",
        };
        return Err(format!("not a socket but {what}"));
    }
    let ty = socket::getsockopt(&fd, sockopt::SockType).ok();
    let family = socket::getsockname::<SockaddrStorage>(fd.as_raw_fd())
        .ok()
        .and_then(|a| a.family());
    let listening = socket::getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false);
    Ok(Shape {
        family,
        ty,
        listening,
    })
}

fn matches(kind: ListenerKind, s: Shape) -> bool {
    let inet = matches!(s.family, Some(AddressFamily::Inet | AddressFamily::Inet6));
    let unix = s.family == Some(AddressFamily::Unix);
    match kind {
        ListenerKind::Tcp => inet && s.ty == Some(SockType::Stream) && s.listening,
        ListenerKind::Udp => inet && s.ty == Some(SockType::Datagram),
        ListenerKind::Unix => unix && s.ty == Some(SockType::Stream) && s.listening,
        ListenerKind::UnixDgram => unix && s.ty == Some(SockType::Datagram),
    }
}

/// `kind` in words, as the supervisor declares it.
pub(crate) fn expected(kind: ListenerKind) -> &'static str {
    match kind {
        ListenerKind::Tcp => "a listening TCP socket",
        ListenerKind::Udp => "a UDP socket",
        ListenerKind::Unix => "a listening Unix stream socket",
        ListenerKind::UnixDgram => "a Unix datagram socket",
    }
}

fn describe(s: Shape) -> String {
    let family = match s.family {
        Some(AddressFamily::Inet) => "IPv4",
        Some(AddressFamily::Inet6) => "IPv6",
        Some(AddressFamily::Unix) => "Unix",
        Some(_) => "other-family",
        None => "unknown-family",
    };
    let inet = matches!(s.family, Some(AddressFamily::Inet | AddressFamily::Inet6));
    let what = match (inet, s.ty) {
        (true, Some(SockType::Stream)) => format!("{family} TCP"),
        (true, Some(SockType::Datagram)) => format!("{family} UDP"),
        (false, Some(SockType::Stream)) => format!("{family} stream"),
        (false, Some(SockType::Datagram)) => format!("{family} datagram"),
        (_, Some(SockType::SeqPacket)) => format!("{family} seqpacket"),
        (_, Some(SockType::Raw)) => format!("{family} raw"),
        (_, _) => format!("{family} unknown-type"),
    };
    // "a Unix …", "an IPv4 …", "an unknown-family …"
    let article = if what.starts_with("Unix") { "a" } else { "an" };
    match (s.ty, s.listening) {
        (_, true) => format!("a listening {what} socket"),
        (Some(SockType::Stream), false) => {
            format!("{article} {what} socket that is not listening")
        }
        _ => format!("{article} {what} socket"),
    }
}

/// Checks that `fd` is a socket of `kind`; `Err` says what it is instead.
pub(crate) fn check_kind(fd: BorrowedFd<'_>, kind: ListenerKind) -> Result<(), String> {
    let s = shape(fd)?;
    if matches(kind, s) {
        Ok(())
    } else {
        Err(describe(s))
    }
}

/// Checks that `fd` is one end of a Unix `SOCK_SEQPACKET` socket, as the
/// worker channel is.
pub(crate) fn check_channel(fd: BorrowedFd<'_>) -> Result<(), String> {
    let s = shape(fd)?;
    if s.family == Some(AddressFamily::Unix) && s.ty == Some(SockType::SeqPacket) {
        Ok(())
    } else {
        Err(format!(
            "expected a Unix seqpacket socket, found {}",
            describe(s)
        ))
    }
}

/// Closes the inherited duplicates of `received` among the descriptor
/// numbers `candidates` (fds 3..3+LISTEN_FDS): each number that holds the
/// very same socket (same device and inode) as one of `received`, and is
/// neither `keep` (the channel) nor one of `received` itself. Anything else
/// at those numbers (a file the program opened after closing an inherited
/// descriptor, another socket) is left alone. Returns the numbers closed.
pub(crate) fn close_inherited_duplicates(
    candidates: std::ops::Range<RawFd>,
    keep: RawFd,
    received: &[BorrowedFd<'_>],
) -> Vec<RawFd> {
    let held: HashSet<RawFd> = received.iter().map(AsRawFd::as_raw_fd).collect();
    let ids: HashSet<(u64, u64)> = received
        .iter()
        .filter_map(|fd| sys::stat_raw(fd.as_raw_fd()).ok())
        .filter(|s| s.is_socket)
        .map(|s| s.id)
        .collect();
    let mut closed = Vec::new();
    for fd in candidates {
        if fd == keep || held.contains(&fd) {
            continue;
        }
        match sys::stat_raw(fd) {
            Ok(s) if s.is_socket && ids.contains(&s.id) => {
                sys::close_inherited(fd);
                closed.push(fd);
            }
            _ => {}
        }
    }
    closed
}

/// What kind of listener `fd` is, if it is one baton's kinds.
fn kind_of(fd: BorrowedFd<'_>) -> Result<ListenerKind, String> {
    [
        ListenerKind::Tcp,
        ListenerKind::Udp,
        ListenerKind::Unix,
        ListenerKind::UnixDgram,
    ]
    .into_iter()
    .find(|&kind| check_kind(fd, kind).is_ok())
    .ok_or_else(|| match shape(fd) {
        Ok(s) => describe(s),
        Err(e) => e,
    })
}

/// Takes the sockets passed by socket activation without baton (systemd,
/// `systemfd`): `LISTEN_FDS` descriptors at 3.., named by `LISTEN_FDNAMES`,
/// if `LISTEN_PID` is this process. None otherwise.
pub(crate) fn take_activated() -> Result<Vec<(String, ListenerKind, OwnedFd)>, Error> {
    let env = |key: &str| std::env::var(key).ok().filter(|v| !v.is_empty());
    let (Some(pid), Some(count)) = (env("LISTEN_PID"), env("LISTEN_FDS")) else {
        return Ok(Vec::new());
    };
    if pid != std::process::id().to_string() {
        return Ok(Vec::new());
    }
    // The descriptors can be owned once per process.
    static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if TAKEN.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return Ok(Vec::new());
    }
    let bad = |reason: String| Error::Activation { reason };
    let count: usize = count
        .parse()
        .map_err(|_| bad(format!("LISTEN_FDS is {count:?}, not a number")))?;
    let names: Vec<String> = env("LISTEN_FDNAMES")
        .map(|n| n.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    let mut taken = Vec::new();
    for i in 0..count {
        let raw = 3 + i as std::os::fd::RawFd;
        let fd = crate::sys::take_activated(raw)
            .map_err(|e| bad(format!("descriptor {raw} (LISTEN_FDS={count}): {e}")))?;
        let name = names.get(i).cloned().unwrap_or_else(|| {
            // systemfd and plain `LISTEN_FDS=1` setups give no names: the
            // first socket answers to "http" as well as to its number.
            if i == 0 {
                "http".to_owned()
            } else {
                format!("fd{raw}")
            }
        });
        let kind = kind_of(fd.as_fd()).map_err(|found| {
            bad(format!(
                "descriptor {raw} (`{name}`) is {found}, not a listener"
            ))
        })?;
        taken.push((name, kind, fd));
    }
    Ok(taken)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, SockFlag};
    use std::net::{TcpListener, TcpStream, UdpSocket};
    use std::os::unix::net::{UnixDatagram, UnixListener};

    fn temp_path(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("baton-worker-fds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        path
    }

    #[test]
    fn every_kind_is_recognised_and_mismatches_say_what_arrived() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp6 = TcpListener::bind("[::1]:0").ok();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let unix = UnixListener::bind(temp_path("l.sock")).unwrap();
        let dgram = UnixDatagram::bind(temp_path("d.sock")).unwrap();
        let connected = TcpStream::connect(tcp.local_addr().unwrap()).unwrap();
        let (seq, _seq2) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();

        assert_eq!(check_kind(tcp.as_fd(), ListenerKind::Tcp), Ok(()));
        if let Some(tcp6) = &tcp6 {
            assert_eq!(check_kind(tcp6.as_fd(), ListenerKind::Tcp), Ok(()));
        }
        assert_eq!(check_kind(udp.as_fd(), ListenerKind::Udp), Ok(()));
        assert_eq!(check_kind(unix.as_fd(), ListenerKind::Unix), Ok(()));
        assert_eq!(check_kind(dgram.as_fd(), ListenerKind::UnixDgram), Ok(()));

        let found = |fd: BorrowedFd<'_>, kind| check_kind(fd, kind).expect_err("mismatch");
        assert_eq!(found(udp.as_fd(), ListenerKind::Tcp), "an IPv4 UDP socket");
        assert_eq!(
            found(connected.as_fd(), ListenerKind::Tcp),
            "an IPv4 TCP socket that is not listening"
        );
        assert_eq!(
            found(tcp.as_fd(), ListenerKind::Unix),
            "a listening IPv4 TCP socket"
        );
        assert_eq!(
            found(dgram.as_fd(), ListenerKind::Udp),
            "a Unix datagram socket"
        );
        assert_eq!(
            found(seq.as_fd(), ListenerKind::Unix),
            "a Unix seqpacket socket"
        );
        assert_eq!(
            found(file.as_fd(), ListenerKind::Tcp),
            "not a socket but a character device"
        );
        assert_eq!(check_channel(seq.as_fd()), Ok(()));
        assert!(check_channel(unix.as_fd()).is_err());
    }

    #[test]
    fn listeners_are_taken_once_by_kind_and_made_non_blocking() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let table = Listeners::new(vec![
            ("http".into(), ListenerKind::Tcp, tcp.into()),
            ("dns".into(), ListenerKind::Udp, udp.into()),
        ]);
        let err = table.take("nope", ListenerKind::Tcp).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no listener named `nope` (this worker has only `http`, `dns`)"
        );
        let err = table.take("dns", ListenerKind::Tcp).unwrap_err();
        assert_eq!(err.to_string(), "listener `dns` is a udp listener, not tcp");
        let fd = table.take("http", ListenerKind::Tcp).expect("take");
        let flags = OFlag::from_bits_retain(fcntl(fd.as_fd(), FcntlArg::F_GETFL).unwrap());
        assert!(flags.contains(OFlag::O_NONBLOCK));
        let err = table.take("http", ListenerKind::Tcp).unwrap_err();
        assert!(err.to_string().contains("already taken"), "{err}");
        assert_eq!(table.infos().len(), 2, "taken listeners are still listed");
        let empty = Listeners::default();
        let err = empty.take("http", ListenerKind::Tcp).unwrap_err();
        assert!(err.to_string().contains("no listeners"), "{err}");
    }

    #[test]
    fn only_inherited_duplicates_of_received_sockets_are_closed() {
        // Received over the channel: a listener; inherited copies of it sit
        // at high numbers standing in for fds 3.. .
        let received = TcpListener::bind("127.0.0.1:0").unwrap();
        let other_socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        // Above what other tests in this process open, below the usual
        // 1024 descriptor limit.
        let base = 600;
        let dup = sys::dup_at_least(received.as_fd(), base);
        let stranger = sys::dup_at_least(other_socket.as_fd(), dup + 1);
        let a_file = sys::dup_at_least(file.as_fd(), stranger + 1);
        let channel = sys::dup_at_least(received.as_fd(), a_file + 1);
        let closed = close_inherited_duplicates(dup..channel + 2, channel, &[received.as_fd()]);
        assert_eq!(closed, [dup]);
        assert!(sys::stat_raw(dup).is_err(), "the duplicate is closed");
        for kept in [stranger, a_file, channel] {
            assert!(sys::stat_raw(kept).is_ok(), "fd {kept} must stay open");
            sys::close_inherited(kept);
        }
        // The received descriptor itself is never closed, even in range.
        let own = received.as_raw_fd();
        assert!(close_inherited_duplicates(own..own + 1, -1, &[received.as_fd()]).is_empty());
        assert!(sys::stat_raw(own).is_ok());
    }
}
