//! Listeners: parsing `--listen NAME=ADDR` and binding the sockets the
//! supervisor keeps for its whole life.
//!
//! A [`Listener`] owns the supervisor's descriptor of one kernel socket.
//! Workers get duplicates; this descriptor is closed only when the supervisor
//! exits, so the socket's accept queue survives every reload, crash and
//! restart of a worker. This module never changes a socket after binding it
//! (in particular never its `O_NONBLOCK` flag, which every holder shares).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use baton_worker::protocol::{ListenerInfo, ListenerKind};
use socket2::{Domain, SockAddr, Socket, Type};

use crate::Error;

/// The listen backlog: the kernel caps it at `net.core.somaxconn`. Connections
/// that arrive while no generation accepts (a reload's hand-over, a crash
/// restart) wait here, so it is generous.
const BACKLOG: i32 = 4096;

/// One `--listen NAME=ADDR` as written by the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenSpec {
    /// The name workers see in `LISTEN_FDNAMES`.
    pub name: String,
    /// Where to bind.
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
    fn kind(&self) -> ListenerKind {
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

impl std::str::FromStr for ListenSpec {
    type Err = String;

    /// Parses `NAME=ADDR`; the error says what is wrong and what is expected.
    fn from_str(spec: &str) -> Result<ListenSpec, String> {
        const FORMS: &str = "expected NAME=ADDR with ADDR one of tcp://HOST:PORT, \
                             udp://HOST:PORT, unix:PATH, unix-dgram:PATH";
        let (name, addr) = spec
            .split_once('=')
            .ok_or_else(|| format!("{spec:?}: missing `=`; {FORMS}"))?;
        if name.is_empty() {
            return Err(format!("{spec:?}: the name is empty; {FORMS}"));
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(format!(
                "{spec:?}: the name {name:?} may contain only letters, digits, `-`, `_` and `.` \
                 (it travels in LISTEN_FDNAMES)"
            ));
        }
        let addr = if let Some(rest) = addr.strip_prefix("tcp://") {
            ListenAddr::Tcp(parse_host_port(rest).map_err(|e| format!("{spec:?}: {e}"))?)
        } else if let Some(rest) = addr.strip_prefix("udp://") {
            ListenAddr::Udp(parse_host_port(rest).map_err(|e| format!("{spec:?}: {e}"))?)
        } else if let Some(path) = addr.strip_prefix("unix-dgram:") {
            ListenAddr::UnixDgram(parse_path(path).map_err(|e| format!("{spec:?}: {e}"))?)
        } else if let Some(path) = addr.strip_prefix("unix:") {
            ListenAddr::Unix(parse_path(path).map_err(|e| format!("{spec:?}: {e}"))?)
        } else {
            return Err(format!("{spec:?}: unknown address {addr:?}; {FORMS}"));
        };
        Ok(ListenSpec {
            name: name.to_owned(),
            addr,
        })
    }
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

/// A bound listener, held by the supervisor for its whole life.
#[derive(Debug)]
pub struct Listener {
    /// The operator's name for it.
    pub name: String,
    /// What was asked for.
    pub spec: ListenAddr,
    /// Where it is actually bound (a port-0 request shows its real port).
    pub bound: String,
    /// The supervisor's own descriptor.
    pub fd: OwnedFd,
    /// A socket file this supervisor created and removes when it exits.
    unlink_on_exit: Option<PathBuf>,
}

impl Listener {
    /// Binds `spec`, with a clear error naming the listener and the address.
    pub fn bind(spec: &ListenSpec) -> Result<Listener, Error> {
        let bind_err = |source: std::io::Error| Error::Bind {
            name: spec.name.clone(),
            addr: spec.addr.to_string(),
            source,
        };
        let (socket, unlink) = match &spec.addr {
            ListenAddr::Tcp(addr) => (bind_inet(*addr, Type::STREAM).map_err(bind_err)?, None),
            ListenAddr::Udp(addr) => (bind_inet(*addr, Type::DGRAM).map_err(bind_err)?, None),
            ListenAddr::Unix(path) => (
                bind_unix(path, Type::STREAM).map_err(bind_err)?,
                Some(path.clone()),
            ),
            ListenAddr::UnixDgram(path) => (
                bind_unix(path, Type::DGRAM).map_err(bind_err)?,
                Some(path.clone()),
            ),
        };
        let bound = match (
            &spec.addr,
            socket.local_addr().ok().and_then(|a| a.as_socket()),
        ) {
            (ListenAddr::Tcp(_) | ListenAddr::Udp(_), Some(addr)) => addr.to_string(),
            (other, _) => other.to_string(),
        };
        Ok(Listener {
            name: spec.name.clone(),
            spec: spec.addr.clone(),
            bound,
            fd: socket.into(),
            unlink_on_exit: unlink,
        })
    }

    /// How the worker protocol describes this listener.
    pub fn info(&self) -> ListenerInfo {
        ListenerInfo {
            name: self.name.clone(),
            kind: self.spec.kind(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(path) = &self.unlink_on_exit {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn bind_inet(addr: SocketAddr, ty: Type) -> std::io::Result<Socket> {
    // socket2 creates the socket close-on-exec; workers get dups placed by
    // `sys::spawn`.
    let socket = Socket::new(Domain::for_address(addr), ty, None)?;
    if addr.is_ipv6() {
        // `[::]` means IPv6 only, as in nginx; list `0.0.0.0` too for both.
        socket.set_only_v6(true)?;
    }
    if ty == Type::STREAM {
        socket.set_reuse_address(true)?;
    }
    socket.bind(&addr.into())?;
    if ty == Type::STREAM {
        socket.listen(BACKLOG)?;
    }
    Ok(socket)
}

fn bind_unix(path: &Path, ty: Type) -> std::io::Result<Socket> {
    remove_stale_socket(path, ty)?;
    let socket = Socket::new(Domain::UNIX, ty, None)?;
    socket.bind(&SockAddr::unix(path)?)?;
    if ty == Type::STREAM {
        socket.listen(BACKLOG)?;
    }
    Ok(socket)
}

/// Removes a socket file left by a process that is gone; refuses to touch a
/// live socket or a file that is not a socket.
fn remove_stale_socket(path: &Path, ty: Type) -> std::io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket",
        ));
    }
    let probe = Socket::new(Domain::UNIX, ty, None)?;
    match probe.connect(&SockAddr::unix(path)?) {
        Ok(()) => Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "another process is listening on this socket",
        )),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ListenSpec, String> {
        s.parse()
    }

    #[test]
    fn parses_every_form() {
        assert_eq!(
            parse("http=tcp://127.0.0.1:8080").unwrap().addr,
            ListenAddr::Tcp("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            parse("v6=tcp://[::1]:0").unwrap().addr,
            ListenAddr::Tcp("[::1]:0".parse().unwrap())
        );
        assert_eq!(
            parse("dns=udp://0.0.0.0:53").unwrap().addr,
            ListenAddr::Udp("0.0.0.0:53".parse().unwrap())
        );
        assert_eq!(
            parse("s=unix:/run/x.sock").unwrap().addr,
            ListenAddr::Unix("/run/x.sock".into())
        );
        assert_eq!(
            parse("d=unix-dgram:/run/d.sock").unwrap().addr,
            ListenAddr::UnixDgram("/run/d.sock".into())
        );
    }

    #[test]
    fn errors_name_what_is_wrong() {
        for (bad, needle) in [
            ("http", "missing `=`"),
            ("=tcp://1.2.3.4:1", "name is empty"),
            ("a:b=tcp://1.2.3.4:1", "may contain only"),
            ("http=tcp://localhost:80", "not an IP address"),
            ("http=tcp://1.2.3.4", "no `:PORT`"),
            ("http=tcp://1.2.3.4:99999", "port \"99999\""),
            ("http=tcp://[zz]:1", "not an IPv6"),
            ("http=sctp://1.2.3.4:1", "unknown address"),
            ("http=unix:", "path is empty"),
        ] {
            let err = parse(bad).expect_err(bad);
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }
}
