//! Standalone listeners: parsing `BATON_LISTEN` (`NAME=ADDR[,NAME=ADDR...]`)
//! and the defaults a program gives, in the very syntax of baton's
//! `--listen`, and binding them the way baton does (IPv6 only for `[::]`,
//! `SO_REUSEADDR` on TCP, a generous backlog, close-on-exec, stale Unix
//! socket files replaced, live ones refused).
//!
//! The parser is public because it is shared: `baton run --listen` parses
//! with it too (adding only its own `systemd` form), so the two can never
//! disagree on the syntax.
//!
//! Only a worker started without baton binds anything; under baton the
//! supervisor's listeners are the only ones. This module never touches a
//! socket it did not create.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::{fmt, io};

use nix::sys::socket::{
    self, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, UnixAddr,
};

use crate::protocol::ListenerKind;

/// The environment variable a standalone worker reads its listeners from.
pub const LISTEN_ENV: &str = "BATON_LISTEN";

const FORMS: &str = "expected NAME=ADDR with ADDR one of tcp://HOST:PORT, udp://HOST:PORT, \
                     unix:PATH, unix-dgram:PATH";

/// One `NAME=ADDR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenSpec {
    /// The listener's name (letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// Where it binds.
    pub addr: ListenAddr,
}

/// Where a listener binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// `tcp://HOST:PORT`
    Tcp(SocketAddr),
    /// `udp://HOST:PORT`
    Udp(SocketAddr),
    /// `unix:PATH`, a stream socket
    Unix(PathBuf),
    /// `unix-dgram:PATH`
    UnixDgram(PathBuf),
}

impl ListenAddr {
    /// The kind of listener this address makes.
    pub fn kind(&self) -> ListenerKind {
        match self {
            ListenAddr::Tcp(_) => ListenerKind::Tcp,
            ListenAddr::Udp(_) => ListenerKind::Udp,
            ListenAddr::Unix(_) => ListenerKind::Unix,
            ListenAddr::UnixDgram(_) => ListenerKind::UnixDgram,
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "tcp://{a}"),
            ListenAddr::Udp(a) => write!(f, "udp://{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::UnixDgram(p) => write!(f, "unix-dgram:{}", p.display()),
        }
    }
}

/// Splits `NAME=ADDR` and checks the name (it travels in
/// `LISTEN_FDNAMES`, so no `:`); the error says what is wrong.
///
/// ```
/// let (name, addr) = baton_worker::listen::split_spec("http=tcp://127.0.0.1:8080").unwrap();
/// assert_eq!((name, addr), ("http", "tcp://127.0.0.1:8080"));
/// assert!(baton_worker::listen::split_spec("a:b=unix:/x").is_err());
/// ```
pub fn split_spec(spec: &str) -> Result<(&str, &str), String> {
    let (name, addr) = spec
        .split_once('=')
        .ok_or_else(|| format!("missing `=`; {FORMS}"))?;
    if name.is_empty() {
        return Err(format!("the name is empty; {FORMS}"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(format!(
            "the name {name:?} may contain only letters, digits, `-`, `_` and `.` \
             (it travels in LISTEN_FDNAMES)"
        ));
    }
    Ok((name, addr))
}

/// Parses one `NAME=ADDR`; the error says what is wrong and what is
/// expected (the entry itself is named by the caller).
pub fn parse_spec(spec: &str) -> Result<ListenSpec, String> {
    let (name, addr) = split_spec(spec)?;
    let addr = parse_addr(addr)?;
    Ok(ListenSpec {
        name: name.to_owned(),
        addr,
    })
}

/// Parses an ADDR as `baton run --listen` does: `tcp://HOST:PORT` (HOST an
/// IP address, IPv6 in brackets), `udp://HOST:PORT`, `unix:PATH`,
/// `unix-dgram:PATH`.
///
/// ```
/// use baton_worker::listen::{parse_addr, ListenAddr};
/// assert_eq!(
///     parse_addr("tcp://[::1]:80"),
///     Ok(ListenAddr::Tcp("[::1]:80".parse().unwrap()))
/// );
/// assert!(parse_addr("tcp://localhost:80").unwrap_err().contains("not an IP address"));
/// ```
pub fn parse_addr(addr: &str) -> Result<ListenAddr, String> {
    if let Some(rest) = addr.strip_prefix("tcp://") {
        Ok(ListenAddr::Tcp(parse_host_port(rest)?))
    } else if let Some(rest) = addr.strip_prefix("udp://") {
        Ok(ListenAddr::Udp(parse_host_port(rest)?))
    } else if let Some(path) = addr.strip_prefix("unix-dgram:") {
        Ok(ListenAddr::UnixDgram(parse_path(path)?))
    } else if let Some(path) = addr.strip_prefix("unix:") {
        Ok(ListenAddr::Unix(parse_path(path)?))
    } else {
        Err(format!("unknown address {addr:?}; {FORMS}"))
    }
}

/// Parses `NAME=ADDR[,NAME=ADDR...]`. Blank entries (a trailing comma,
/// spaces) are skipped; a name given twice is an error. Returns each entry
/// with its text, or the failing entry with the reason.
pub(crate) fn parse_list(list: &str) -> Result<Vec<ListenSpec>, (String, String)> {
    let mut specs: Vec<ListenSpec> = Vec::new();
    for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let spec = parse_spec(entry).map_err(|reason| (entry.to_owned(), reason))?;
        if specs.iter().any(|s| s.name == spec.name) {
            return Err((
                entry.to_owned(),
                format!("the name `{}` is given twice", spec.name),
            ));
        }
        specs.push(spec);
    }
    Ok(specs)
}

fn parse_host_port(s: &str) -> Result<SocketAddr, String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} has no `:PORT`"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("port {port:?} is not a number from 0 to 65535"))?;
    let ip: IpAddr = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse()
            .map_err(|_| format!("{v6:?} is not an IPv6 address"))?
    } else {
        host.parse().map_err(|_| {
            format!(
                "{host:?} is not an IP address (write 127.0.0.1, 0.0.0.0, or an IPv6 address \
                 in brackets like [::1])"
            )
        })?
    };
    Ok(SocketAddr::new(ip, port))
}

fn parse_path(path: &str) -> Result<PathBuf, String> {
    if path.is_empty() {
        return Err("the socket path is empty".into());
    }
    // sun_path holds 108 bytes including the terminating NUL.
    if path.len() > 107 {
        return Err(format!(
            "the socket path is {} bytes long; Unix sockets allow at most 107",
            path.len()
        ));
    }
    Ok(PathBuf::from(path))
}

/// Binds `addr` as baton would; the socket is close-on-exec and blocking
/// (the listener table makes it non-blocking when it is taken).
pub(crate) fn bind(addr: &ListenAddr) -> io::Result<OwnedFd> {
    match addr {
        ListenAddr::Tcp(a) => bind_inet(*a, SockType::Stream),
        ListenAddr::Udp(a) => bind_inet(*a, SockType::Datagram),
        ListenAddr::Unix(p) => bind_unix(p, SockType::Stream),
        ListenAddr::UnixDgram(p) => bind_unix(p, SockType::Datagram),
    }
}

fn bind_inet(addr: SocketAddr, ty: SockType) -> io::Result<OwnedFd> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket::socket(family, ty, SockFlag::SOCK_CLOEXEC, None)?;
    if addr.is_ipv6() {
        // `[::]` means IPv6 only, as in baton and nginx.
        socket::setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    if ty == SockType::Stream {
        socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    }
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    if ty == SockType::Stream {
        socket::listen(&fd, Backlog::MAXCONN)?;
    }
    Ok(fd)
}

fn bind_unix(path: &Path, ty: SockType) -> io::Result<OwnedFd> {
    remove_stale_socket(path, ty)?;
    let fd = socket::socket(AddressFamily::Unix, ty, SockFlag::SOCK_CLOEXEC, None)?;
    socket::bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    if ty == SockType::Stream {
        socket::listen(&fd, Backlog::MAXCONN)?;
    }
    Ok(fd)
}

/// Removes a socket file left by a process that is gone, so `cargo run`
/// works twice in a row; refuses to touch a live socket or a file that is
/// not a socket.
fn remove_stale_socket(path: &Path, ty: SockType) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket",
        ));
    }
    let probe = if ty == SockType::Stream {
        UnixStream::connect(path).map(drop)
    } else {
        UnixDatagram::unbound().and_then(|s| s.connect(path))
    };
    match probe {
        Ok(()) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another process is listening on this socket",
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn parses_every_form_of_address() {
        let one = |s: &str| parse_spec(s).unwrap_or_else(|e| panic!("{s}: {e}")).addr;
        assert_eq!(
            one("http=tcp://127.0.0.1:8080"),
            ListenAddr::Tcp("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            one("v6=tcp://[::1]:0"),
            ListenAddr::Tcp("[::1]:0".parse().unwrap())
        );
        assert_eq!(
            one("dns=udp://0.0.0.0:53"),
            ListenAddr::Udp("0.0.0.0:53".parse().unwrap())
        );
        assert_eq!(
            one("s=unix:/run/x.sock"),
            ListenAddr::Unix("/run/x.sock".into())
        );
        assert_eq!(
            one("d=unix-dgram:/run/d.sock"),
            ListenAddr::UnixDgram("/run/d.sock".into())
        );
    }

    #[test]
    fn parses_a_list_skipping_blanks() {
        let specs = parse_list(" http=tcp://127.0.0.1:0 , admin=unix:/tmp/a.sock,").unwrap();
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["http", "admin"]);
        assert_eq!(specs[1].addr.kind(), ListenerKind::Unix);
        assert!(parse_list("").unwrap().is_empty());
    }

    #[test]
    fn errors_name_the_entry_and_what_is_wrong() {
        for (bad, entry, needle) in [
            ("http", "http", "missing `=`"),
            ("=tcp://1.2.3.4:1", "=tcp://1.2.3.4:1", "name is empty"),
            (
                "a:b=tcp://1.2.3.4:1",
                "a:b=tcp://1.2.3.4:1",
                "may contain only",
            ),
            (
                "ok=udp://[::]:1,http=tcp://localhost:80",
                "http=tcp://localhost:80",
                "not an IP address",
            ),
            ("http=tcp://1.2.3.4", "http=tcp://1.2.3.4", "no `:PORT`"),
            (
                "http=tcp://1.2.3.4:99999",
                "http=tcp://1.2.3.4:99999",
                "port \"99999\"",
            ),
            ("http=tcp://[zz]:1", "http=tcp://[zz]:1", "not an IPv6"),
            (
                "http=sctp://1.2.3.4:1",
                "http=sctp://1.2.3.4:1",
                "unknown address",
            ),
            ("http=unix:", "http=unix:", "path is empty"),
            ("a=unix:/x,a=unix:/y", "a=unix:/y", "given twice"),
        ] {
            let (got_entry, reason) = parse_list(bad).expect_err(bad);
            assert_eq!(got_entry, entry, "{bad}");
            assert!(reason.contains(needle), "{bad}: {reason}");
        }
    }

    #[test]
    fn binds_tcp_udp_and_unix_sockets() {
        let dir = std::env::temp_dir().join(format!("baton-worker-listen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let stream = dir.join("s.sock");
        let dgram = dir.join("d.sock");
        for addr in [
            ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()),
            ListenAddr::Udp("127.0.0.1:0".parse().unwrap()),
            ListenAddr::Unix(stream.clone()),
            ListenAddr::UnixDgram(dgram.clone()),
        ] {
            let fd = bind(&addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
            crate::listeners::check_kind(fd.as_fd(), addr.kind())
                .unwrap_or_else(|found| panic!("{addr}: {found}"));
        }
        // The stream socket's file is stale now (its socket is closed):
        // binding again replaces it.
        bind(&ListenAddr::Unix(stream.clone())).expect("rebinding over a stale socket file");
        // A live socket is refused.
        let live = bind(&ListenAddr::Unix(stream.clone())).expect("bind");
        let err = bind(&ListenAddr::Unix(stream.clone())).expect_err("live socket");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        drop(live);
        // A file that is not a socket is never removed.
        let plain = dir.join("plain");
        std::fs::write(&plain, "x").unwrap();
        let err = bind(&ListenAddr::Unix(plain.clone())).expect_err("plain file");
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
        assert!(plain.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
