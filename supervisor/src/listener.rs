//! Listeners: parsing `--listen NAME=ADDR` and binding the sockets the
//! supervisor keeps for its whole life.
//!
//! A [`Listener`] owns the supervisor's descriptor of one kernel socket,
//! bound here or adopted from systemd socket activation (`NAME=systemd`).
//! Workers get duplicates; this descriptor is closed only when the supervisor
//! exits, so the socket's accept queue survives every reload, crash and
//! restart of a worker. This module never changes a socket after binding it
//! (in particular never its `O_NONBLOCK` flag, which every holder shares).

use std::fmt;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use baton_worker::listen::{self, ListenAddr};
use baton_worker::protocol::{ListenerInfo, ListenerKind};
use socket2::{Domain, SockAddr, Socket, Type};

use crate::Error;

/// The listen backlog: the kernel caps it at `net.core.somaxconn`. Connections
/// that arrive while no generation accepts (a reload's hand-over, a crash
/// restart) wait here, so it is generous.
pub(crate) const BACKLOG: i32 = 4096;

/// One `--listen NAME=ADDR` as written by the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenSpec {
    /// The name workers see in `LISTEN_FDNAMES`.
    pub name: String,
    /// Where its socket comes from (displayed as the operator wrote it).
    pub addr: ListenSource,
}

/// Where a listener's socket comes from: bound by baton, or adopted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenSource {
    /// An address baton binds, in the syntax workers share
    /// ([`baton_worker::listen::ListenAddr`]).
    Bind(ListenAddr),
    /// `systemd`: adopted from socket activation, by its `FileDescriptorName=`
    Systemd,
}

impl fmt::Display for ListenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenSource::Bind(addr) => addr.fmt(f),
            ListenSource::Systemd => write!(f, "systemd"),
        }
    }
}

impl std::str::FromStr for ListenSpec {
    type Err = String;

    /// Parses `NAME=ADDR`; the error says what is wrong and what is expected.
    fn from_str(spec: &str) -> Result<ListenSpec, String> {
        let (name, addr) = listen::split_spec(spec).map_err(|e| format!("{spec:?}: {e}"))?;
        let addr = if addr == "systemd" {
            ListenSource::Systemd
        } else {
            let addr = listen::parse_addr(addr).map_err(|e| {
                let hint = if e.starts_with("unknown address") {
                    ", or systemd to adopt a socket-activated one"
                } else {
                    ""
                };
                format!("{spec:?}: {e}{hint}")
            })?;
            ListenSource::Bind(addr)
        };
        Ok(ListenSpec {
            name: name.to_owned(),
            addr,
        })
    }
}

/// A bound listener, held by the supervisor for its whole life.
#[derive(Debug)]
pub struct Listener {
    /// The operator's name for it.
    pub name: String,
    /// What was asked for.
    pub spec: ListenSource,
    /// What kind of socket it is.
    pub kind: ListenerKind,
    /// Where it is actually bound (a port-0 request shows its real port).
    pub bound: String,
    /// The supervisor's own descriptor.
    pub fd: OwnedFd,
    /// A socket file this supervisor created and removes when it exits.
    unlink_on_exit: Option<PathBuf>,
}

impl Listener {
    /// Binds `spec` (or adopts it from `activated`), with a clear error
    /// naming the listener and the address; a TCP socket with `SO_REUSEPORT`
    /// if `reuse_port` (`--steer` puts a second socket beside it).
    pub fn bind(
        spec: &ListenSpec,
        activated: &mut Activated,
        reuse_port: bool,
    ) -> Result<Listener, Error> {
        let bind_err = |source: std::io::Error| Error::Bind {
            name: spec.name.clone(),
            addr: spec.addr.to_string(),
            source,
        };
        let stored = activated.take_stored(&store_name(&spec.name));
        let (socket, kind, unlink) = match (&spec.addr, stored) {
            // A crashed baton left it in systemd's store: the same socket,
            // with its queue, if it is still what `--listen` asks for.
            (ListenSource::Bind(addr), Some(fd)) => {
                let socket = Socket::from(fd);
                let kind = kind_of(&socket).map_err(|reason| {
                    Error::Activation(format!(
                        "the socket systemd's store kept as `{}` {reason}",
                        spec.name
                    ))
                })?;
                let same = match (addr, socket.local_addr().ok()) {
                    (ListenAddr::Tcp(a) | ListenAddr::Udp(a), Some(local)) => {
                        local.as_socket().is_some_and(|l| a.port() == 0 || l == *a)
                    }
                    (ListenAddr::Unix(p) | ListenAddr::UnixDgram(p), Some(local)) => {
                        local.as_pathname() == Some(p.as_path())
                    }
                    _ => false,
                };
                if !same {
                    return Err(Error::Activation(format!(
                        "--listen {}={addr}: the socket systemd's store kept under that name \
                         is bound elsewhere; stop the unit (which empties the store) to bind anew",
                        spec.name
                    )));
                }
                let unlink = match addr {
                    ListenAddr::Unix(p) | ListenAddr::UnixDgram(p) => Some(p.clone()),
                    _ => None,
                };
                (socket, kind, unlink)
            }
            (ListenSource::Bind(ListenAddr::Tcp(addr)), None) => (
                bind_inet(*addr, Type::STREAM, reuse_port).map_err(bind_err)?,
                ListenerKind::Tcp,
                None,
            ),
            (ListenSource::Bind(ListenAddr::Udp(addr)), None) => (
                bind_inet(*addr, Type::DGRAM, false).map_err(bind_err)?,
                ListenerKind::Udp,
                None,
            ),
            (ListenSource::Bind(ListenAddr::Unix(path)), None) => (
                bind_unix(path, Type::STREAM).map_err(bind_err)?,
                ListenerKind::Unix,
                Some(path.clone()),
            ),
            (ListenSource::Bind(ListenAddr::UnixDgram(path)), None) => (
                bind_unix(path, Type::DGRAM).map_err(bind_err)?,
                ListenerKind::UnixDgram,
                Some(path.clone()),
            ),
            (ListenSource::Systemd, _) => {
                let socket = activated.take(&spec.name)?;
                let kind = kind_of(&socket).map_err(|reason| {
                    Error::Activation(format!(
                        "the socket systemd passed as `{}` {reason}",
                        spec.name
                    ))
                })?;
                (socket, kind, None)
            }
        };
        let local = socket.local_addr().ok();
        let bound = match (local.as_ref().and_then(|a| a.as_socket()), &spec.addr) {
            (Some(addr), ListenSource::Systemd) => format!("{addr} (from systemd)"),
            (Some(addr), _) => addr.to_string(),
            (None, ListenSource::Systemd) => {
                let path = local
                    .as_ref()
                    .and_then(|a| a.as_pathname().map(Path::to_path_buf));
                match path {
                    Some(p) => format!("{} (from systemd)", p.display()),
                    None => "systemd".to_owned(),
                }
            }
            (None, other) => other.to_string(),
        };
        Ok(Listener {
            name: spec.name.clone(),
            spec: spec.addr.clone(),
            kind,
            bound,
            fd: socket.into(),
            unlink_on_exit: unlink,
        })
    }

    /// Whether baton bound it (so only baton holds it, and a crash of
    /// baton would close it unless systemd's store keeps it).
    pub fn bound_by_baton(&self) -> bool {
        !matches!(self.spec, ListenSource::Systemd)
    }

    /// The name it is kept under in systemd's file descriptor store.
    pub fn store_name(&self) -> String {
        store_name(&self.name)
    }

    /// How the worker protocol describes this listener.
    pub fn info(&self) -> ListenerInfo {
        ListenerInfo {
            name: self.name.clone(),
            kind: self.kind,
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

/// What kind of listener an adopted socket is, or why it cannot be one.
fn kind_of(socket: &Socket) -> Result<ListenerKind, String> {
    let what = |e: std::io::Error| format!("cannot be inspected: {e}");
    let domain = socket.domain().map_err(what)?;
    let ty = socket.r#type().map_err(what)?;
    let kind = match (domain, ty) {
        (Domain::IPV4 | Domain::IPV6, Type::STREAM) => ListenerKind::Tcp,
        (Domain::IPV4 | Domain::IPV6, Type::DGRAM) => ListenerKind::Udp,
        (Domain::UNIX, Type::STREAM) => ListenerKind::Unix,
        (Domain::UNIX, Type::DGRAM) => ListenerKind::UnixDgram,
        (domain, ty) => {
            return Err(format!(
                "is a {domain:?} {ty:?} socket; baton hands over TCP, UDP, Unix stream and \
                 Unix datagram sockets"
            ))
        }
    };
    if ty == Type::STREAM && !socket.is_listener().map_err(what)? {
        return Err(
            "is a stream socket that is not listening (use ListenStream=, \
                    not Accept=yes)"
                .into(),
        );
    }
    Ok(kind)
}

/// The sockets systemd passed to baton (`LISTEN_FDS`), waiting to be adopted
/// by name. Whatever is not adopted is closed when this is dropped.
#[derive(Debug, Default)]
pub struct Activated {
    /// `LISTEN_FDNAMES` with each descriptor; `None` once adopted.
    fds: Vec<(String, Option<OwnedFd>)>,
    /// Why there are none, for the error message.
    absent: Option<String>,
}

impl Activated {
    /// Takes over the sockets systemd passed, if `LISTEN_PID` names this
    /// process, and removes `LISTEN_*` from the environment so nothing
    /// started later mistakes them for its own.
    pub fn from_env() -> Activated {
        let pid = std::env::var("LISTEN_PID").ok();
        let count = std::env::var("LISTEN_FDS").ok();
        let names = std::env::var("LISTEN_FDNAMES").ok();
        for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            // baton is still single-threaded here: no one reads the
            // environment concurrently.
            std::env::remove_var(var);
        }
        let me = std::process::id().to_string();
        let absent = |why: String| Activated {
            fds: Vec::new(),
            absent: Some(why),
        };
        let Some(count) = count else {
            return absent("baton was not socket-activated (LISTEN_FDS is not set)".into());
        };
        match pid {
            Some(pid) if pid == me => {}
            Some(pid) => {
                return absent(format!(
                    "LISTEN_PID is {pid}, not baton's pid {me}: the sockets were meant for \
                     another process"
                ))
            }
            None => return absent("LISTEN_FDS is set but LISTEN_PID is not".into()),
        }
        let Ok(count) = count.parse::<usize>() else {
            return absent(format!("LISTEN_FDS is {count:?}, not a number"));
        };
        let names: Vec<String> = match names {
            Some(n) => n.split(':').map(str::to_owned).collect(),
            None => Vec::new(),
        };
        let fds = crate::sys::adopt_activated(count)
            .into_iter()
            .enumerate()
            .map(|(i, fd)| {
                let name = names.get(i).cloned().unwrap_or_else(|| "unknown".into());
                (name, Some(fd))
            })
            .collect();
        Activated { fds, absent: None }
    }

    /// The listeners a supervisor before an upgrade held, by the names
    /// [`Listener::bind`] looks for: `NAME` for `NAME=systemd`, the store
    /// name for the ones baton bound.
    pub fn carried(fds: Vec<(String, OwnedFd)>) -> Activated {
        let fds = fds.into_iter().map(|(n, fd)| (n, Some(fd))).collect();
        Activated { fds, absent: None }
    }

    /// Takes the socket systemd passed under `name`.
    fn take(&mut self, name: &str) -> Result<Socket, Error> {
        if let Some(why) = &self.absent {
            return Err(Error::Activation(format!("--listen {name}=systemd: {why}")));
        }
        let known: Vec<&str> = self.fds.iter().map(|(n, _)| n.as_str()).collect();
        let known = known.join(", ");
        let slot = self
            .fds
            .iter_mut()
            .find(|(n, fd)| n == name && fd.is_some());
        match slot.and_then(|(_, fd)| fd.take()) {
            Some(fd) => Ok(Socket::from(fd)),
            None => Err(Error::Activation(format!(
                "--listen {name}=systemd: systemd passed no socket named `{name}` \
                 (LISTEN_FDNAMES has: {known}); set FileDescriptorName={name} in the .socket unit"
            ))),
        }
    }

    /// Takes the descriptor passed under `name`, if one was (descriptors
    /// baton left in systemd's store before a crash come back this way).
    pub fn take_stored(&mut self, name: &str) -> Option<OwnedFd> {
        self.fds
            .iter_mut()
            .find(|(n, fd)| n == name && fd.is_some())
            .and_then(|(_, fd)| fd.take())
    }

    /// Names of passed sockets nobody adopted (they are closed).
    pub fn unused(&self) -> Vec<String> {
        self.fds
            .iter()
            .filter(|(_, fd)| fd.is_some())
            .map(|(n, _)| n.clone())
            .collect()
    }
}

/// The name listener `name` is kept under in systemd's store.
pub fn store_name(name: &str) -> String {
    format!("baton-listen-{name}")
}

fn bind_inet(addr: SocketAddr, ty: Type, reuse_port: bool) -> std::io::Result<Socket> {
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
    if reuse_port {
        socket.set_reuse_port(true)?;
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
            ListenSource::Bind(ListenAddr::Tcp("127.0.0.1:8080".parse().unwrap()))
        );
        assert_eq!(
            parse("v6=tcp://[::1]:0").unwrap().addr,
            ListenSource::Bind(ListenAddr::Tcp("[::1]:0".parse().unwrap()))
        );
        assert_eq!(
            parse("dns=udp://0.0.0.0:53").unwrap().addr,
            ListenSource::Bind(ListenAddr::Udp("0.0.0.0:53".parse().unwrap()))
        );
        assert_eq!(
            parse("s=unix:/run/x.sock").unwrap().addr,
            ListenSource::Bind(ListenAddr::Unix("/run/x.sock".into()))
        );
        assert_eq!(
            parse("d=unix-dgram:/run/d.sock").unwrap().addr,
            ListenSource::Bind(ListenAddr::UnixDgram("/run/d.sock".into()))
        );
        assert_eq!(parse("web=systemd").unwrap().addr, ListenSource::Systemd);
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
