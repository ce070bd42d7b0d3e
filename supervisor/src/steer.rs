//! `--steer`: every TCP listener as two sockets in one `SO_REUSEPORT`
//! group, and new connections steered to the side of the newest serving
//! generation, so that a replaced generation receives nothing new for
//! `--steer-grace` before it is told to drain.
//!
//! Side A is the listener's own socket ([`Listener::fd`], bound by baton or
//! adopted from systemd); side B is its twin, bound here to the same address
//! (or a second socket systemd passed under the same name) and held, like
//! side A, for baton's whole life. A generation is started on a side no
//! living generation uses, so no two generations ever share an accept queue.
//! Steering is a one-instruction classic BPF program on the group
//! (`SO_ATTACH_REUSEPORT_CBPF`, `ret #index`): it needs no privilege, no
//! sysctl, and never moves a connection that is already queued. The side a
//! generation leaves keeps its queue (nothing is ever closed), so what the
//! old generation had not accepted yet is still there for it during the
//! grace, or for the next generation started on that side.
//!
//! UDP and Unix listeners are not steered: every generation shares them as
//! without `--steer`. This module never closes a socket before baton exits,
//! never accepts on one, and never changes a socket's flags.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use baton_worker::protocol::ListenerKind;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{setsockopt, sockopt::AttachReusePortCbpf};
use socket2::{Domain, SockRef, Socket, Type};

use crate::listener::{Activated, Listener, BACKLOG};
use crate::upgrade::state::CarriedSteer;
use crate::Error;

/// One socket of each steered pair: its index in the reuseport group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// The listener's own socket, first in its group.
    A,
    /// The twin, second in its group.
    B,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }

    /// Its index in the group, which the steering program returns.
    fn index(self) -> u32 {
        match self {
            Side::A => 0,
            Side::B => 1,
        }
    }
}

/// A TCP listener's second socket.
#[derive(Debug)]
struct Twin {
    /// The listener's position in `--listen` order.
    listener: usize,
    /// Side B, held for baton's whole life.
    fd: OwnedFd,
}

/// The steered listeners, and which side each living generation was
/// started on.
#[derive(Debug)]
pub struct Steer {
    twins: Vec<Twin>,
    /// Living generations (started, not yet gone) and their side.
    sides: BTreeMap<u64, Side>,
    /// Where new connections go.
    target: Side,
}

impl Steer {
    /// Makes a twin for every TCP listener (taken from `activated` if
    /// systemd passed a second socket under the listener's name, else bound
    /// here) and steers new connections to side A. Refuses, naming the
    /// listener, a socket without `SO_REUSEPORT` or a twin that cannot join
    /// its group.
    pub fn new(listeners: &[Listener], activated: &mut Activated) -> Result<Steer, Error> {
        let mut twins = Vec::new();
        for (i, l) in listeners.iter().enumerate() {
            if l.kind != ListenerKind::Tcp {
                tracing::info!(
                    "--steer: listener `{}` is not TCP; its generations share one socket, as \
                     without --steer",
                    l.name
                );
                continue;
            }
            let fd = twin(l, activated)?;
            twins.push(Twin { listener: i, fd });
        }
        let mut steer = Steer {
            twins,
            sides: BTreeMap::new(),
            target: Side::A,
        };
        steer.aim(Side::A).map_err(|e| {
            Error::Steer(format!(
                "attaching the steering program to the listeners' SO_REUSEPORT groups: {e}"
            ))
        })?;
        Ok(steer)
    }

    /// After an upgrade's exec: the twins the old supervisor held (by
    /// listener position), each generation's side and the side new
    /// connections go to, as [`Steer::carry`] described them. The steering
    /// program belongs to each group and the group lived on (baton and the
    /// workers held its sockets through the exec), so it is still attached;
    /// it is attached again anyway, which is idempotent, so that a
    /// mismatch cannot survive the upgrade. Refuses a twin of a listener
    /// that is not TCP or not there.
    pub fn adopt(
        twins: Vec<(usize, OwnedFd)>,
        carried: &CarriedSteer,
        listeners: &[Listener],
    ) -> Result<Steer, Error> {
        let mut kept = Vec::new();
        for (listener, fd) in twins {
            match listeners.get(listener) {
                Some(l) if l.kind == ListenerKind::Tcp => kept.push(Twin { listener, fd }),
                Some(l) => {
                    return Err(Error::Steer(format!(
                        "the hand-over state names a second socket for listener `{}`, which \
                         is not TCP",
                        l.name
                    )))
                }
                None => {
                    return Err(Error::Steer(format!(
                        "the hand-over state names a second socket for listener {listener}, \
                         but there are {} listeners",
                        listeners.len()
                    )))
                }
            }
        }
        let mut steer = Steer {
            twins: kept,
            sides: carried.sides.iter().copied().collect(),
            target: carried.target,
        };
        steer.aim(carried.target).map_err(|e| {
            Error::Steer(format!(
                "attaching the steering program again after the upgrade: {e}"
            ))
        })?;
        tracing::info!(
            "--steer: took over {} second socket(s); new connections go to side {:?}",
            steer.twins.len(),
            steer.target
        );
        Ok(steer)
    }

    /// What crosses an upgrade's exec: each twin's descriptor, each living
    /// generation's side, and the side new connections go to.
    pub fn carry(&self) -> CarriedSteer {
        CarriedSteer {
            twins: self
                .twins
                .iter()
                .map(|t| (t.listener, t.fd.as_raw_fd()))
                .collect(),
            sides: self.sides.iter().map(|(n, s)| (*n, *s)).collect(),
            target: self.target,
        }
    }

    /// Chooses the side generation `number` starts on: the side new
    /// connections go to if no living generation uses it (the queue there
    /// waits for someone), else the other side if it is free.
    pub fn assign(&mut self, number: u64) -> Result<Side, String> {
        if let Some(side) = self.sides.get(&number) {
            return Ok(*side);
        }
        let used = |side: Side| self.sides.values().any(|s| *s == side);
        let side = if !used(self.target) {
            self.target
        } else if !used(self.target.other()) {
            self.target.other()
        } else {
            return Err(format!(
                "--steer: both sockets of each listener are in use by generations {}; a \
                 generation can start once one of them has exited",
                self.sides
                    .keys()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(" and ")
            ));
        };
        self.sides.insert(number, side);
        Ok(side)
    }

    /// Generation `number`, about to start, shares generation `with`'s
    /// side: the successor of an SDK worker, whose drain is exact and whose
    /// freeze stops its accepting before its successor is ready (connections
    /// waiting then must be on the successor's socket).
    pub fn share(&mut self, number: u64, with: u64) {
        if let Some(side) = self.sides.get(&with).copied() {
            self.sides.insert(number, side);
        }
    }

    /// The descriptors generation `number` gets, one per listener in
    /// `--listen` order: its side's socket for TCP listeners, the shared one
    /// for others.
    pub fn fds<'a>(&'a self, number: u64, listeners: &'a [Listener]) -> Vec<BorrowedFd<'a>> {
        let side = self.sides.get(&number).copied().unwrap_or(Side::A);
        listeners
            .iter()
            .enumerate()
            .map(
                |(i, l)| match (side, self.twins.iter().find(|t| t.listener == i)) {
                    (Side::B, Some(t)) => t.fd.as_fd(),
                    _ => l.fd.as_fd(),
                },
            )
            .collect()
    }

    /// Sends new connections to generation `number`'s side from now on.
    pub fn steer_to(&mut self, number: u64) {
        let Some(side) = self.sides.get(&number).copied() else {
            return;
        };
        if side == self.target {
            return;
        }
        match self.aim(side) {
            Ok(()) => tracing::info!("new connections go to generation {number}'s sockets"),
            Err(e) => tracing::error!(
                "steering new connections to generation {number}'s sockets: {e}; they keep \
                 going to the other side"
            ),
        }
    }

    /// Whether connections wait in the accept queue of generation
    /// `number`'s side (it has not accepted them yet).
    pub fn queued(&self, number: u64, listeners: &[Listener]) -> bool {
        let Some(side) = self.sides.get(&number).copied() else {
            return false;
        };
        self.side_fds(side, listeners).into_iter().any(readable)
    }

    /// Generation `number` is gone: its side is free. Says so if
    /// connections are left in its queue (they wait for the next generation
    /// started there).
    pub fn forget(&mut self, number: u64, listeners: &[Listener]) {
        let Some(side) = self.sides.remove(&number) else {
            return;
        };
        if side != self.target && self.side_fds(side, listeners).into_iter().any(readable) {
            tracing::warn!(
                "--steer: generation {number} exited with connections left in its accept \
                 queue; they wait for the next generation started on its sockets (raise \
                 --steer-grace if this recurs)"
            );
        }
    }

    /// The steered sockets of `side`.
    fn side_fds<'a>(&'a self, side: Side, listeners: &'a [Listener]) -> Vec<BorrowedFd<'a>> {
        self.twins
            .iter()
            .filter_map(|t| match side {
                Side::A => listeners.get(t.listener).map(|l| l.fd.as_fd()),
                Side::B => Some(t.fd.as_fd()),
            })
            .collect()
    }

    /// Attaches `ret #side` to every steered group.
    fn aim(&mut self, side: Side) -> nix::Result<()> {
        for t in &self.twins {
            let mut program = [libc::sock_filter {
                code: (libc::BPF_RET | libc::BPF_K) as u16,
                jt: 0,
                jf: 0,
                k: side.index(),
            }];
            let fprog = libc::sock_fprog {
                len: program.len() as u16,
                filter: program.as_mut_ptr(),
            };
            // The program belongs to the group; attaching it through either
            // member replaces it for both.
            setsockopt(&t.fd, AttachReusePortCbpf, &fprog)?;
        }
        self.target = side;
        Ok(())
    }
}

/// Whether a listening socket has connections waiting to be accepted.
fn readable(fd: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    nix::poll::poll(&mut fds, PollTimeout::ZERO).is_ok_and(|n| n > 0)
}

/// Side B of TCP listener `l`: a second socket systemd passed under its
/// name, or one bound here to its address.
fn twin(l: &Listener, activated: &mut Activated) -> Result<OwnedFd, Error> {
    let own = SockRef::from(&l.fd);
    let err = |what: String| Error::Steer(format!("listener `{}` ({}): {what}", l.name, l.bound));
    let io = |what: &str, e: std::io::Error| err(format!("{what}: {e}"));
    if !own
        .reuse_port()
        .map_err(|e| io("reading SO_REUSEPORT", e))?
    {
        return Err(err(if l.bound_by_baton() {
            "it was not bound with SO_REUSEPORT".into()
        } else {
            "the socket systemd passed has no SO_REUSEPORT: set ReusePort=yes in its .socket \
             unit (--steer puts a second socket beside it)"
                .into()
        }));
    }
    let addr: SocketAddr = own
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .ok_or_else(|| err("its address cannot be read".into()))?;
    if let Some(fd) = activated.take_stored(&l.name) {
        let socket = Socket::from(fd);
        let same = socket.local_addr().ok().and_then(|a| a.as_socket()) == Some(addr);
        let listening = socket.is_listener().unwrap_or(false);
        if !same || !listening || !socket.reuse_port().unwrap_or(false) {
            return Err(err(format!(
                "systemd passed a second socket named `{}`, which --steer takes as its twin, \
                 but it is not a listening socket on {addr} with ReusePort=yes",
                l.name
            )));
        }
        tracing::info!(
            "--steer: listener `{}`: its second socket is the one systemd passed under that name",
            l.name
        );
        return Ok(socket.into());
    }
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)
        .map_err(|e| io("creating its second socket", e))?;
    let setup = || -> std::io::Result<()> {
        if addr.is_ipv6() {
            socket.set_only_v6(own.only_v6()?)?;
        }
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.bind(&addr.into())?;
        socket.listen(BACKLOG)
    };
    match setup() {
        Ok(()) => {
            tracing::info!(
                "--steer: listener `{}`: bound its second socket on {addr}",
                l.name
            );
            Ok(socket.into())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(err(format!(
            "binding its second socket: {e}: a SO_REUSEPORT group takes only sockets created \
             by one uid, so run baton as the user that created the first socket (systemd: \
             root), or have systemd pass a second socket under the name `{}` (a second \
             .socket unit with the same ListenStream=, ReusePort=yes and \
             FileDescriptorName={})",
            l.name, l.name
        ))),
        Err(e) => Err(io("binding its second socket", e)),
    }
}
