//! The new supervisor's first steps after an upgrade's exec: finding the
//! hand-over state and taking over every descriptor it names.
//!
//! [`from_env`] reads the state whose memfd [`STATE_FD_ENV`] names (and
//! removes the variable, so no worker inherits it); the other functions
//! turn the descriptor numbers into owned descriptors of the right kind
//! (each checked to be open, and close-on-exec again). `run.rs` calls them
//! in its start-up order. This module never binds or creates anything: a
//! descriptor that is not there is an error, not a reason to start afresh.

use std::os::fd::OwnedFd;

use super::state::{CarriedKept, Handover, STATE_FD_ENV};
use crate::control::ControlSocket;
use crate::listener::{self, Activated, ListenSource, ListenSpec};
use crate::state::Snapshot;
use crate::steer::Steer;
use crate::Error;

fn fail(what: String) -> Error {
    Error::Upgrade(what)
}

fn own(fd: i32, what: &str) -> Result<OwnedFd, Error> {
    crate::sys::adopt_carried(fd).map_err(|e| fail(format!("taking over {what} (fd {fd}): {e}")))
}

/// The hand-over state, if this process is a supervisor just executed by
/// an upgrade.
pub fn from_env() -> Result<Option<Handover>, Error> {
    let Some(value) = std::env::var_os(STATE_FD_ENV) else {
        return Ok(None);
    };
    // Still single-threaded: nobody reads the environment meanwhile.
    std::env::remove_var(STATE_FD_ENV);
    let fd: i32 = value
        .to_str()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| fail(format!("{STATE_FD_ENV} is {value:?}, not a descriptor")))?;
    let memfd = own(fd, "the hand-over state")?;
    Handover::read(&memfd)
        .map(Some)
        .map_err(|e| fail(format!("reading the hand-over state: {e}")))
}

/// The listeners, ready for [`crate::listener::Listener::bind`] to adopt by
/// name (each still checked against its `--listen`).
pub fn listeners(state: &Handover, specs: &[ListenSpec]) -> Result<Activated, Error> {
    let mut fds = Vec::new();
    for (name, fd) in &state.host.listeners {
        let owned = own(*fd, &format!("listener `{name}`"))?;
        let systemd = specs
            .iter()
            .any(|s| &s.name == name && s.addr == ListenSource::Systemd);
        let key = if systemd {
            name.clone()
        } else {
            listener::store_name(name)
        };
        fds.push((key, owned));
    }
    Ok(Activated::carried(fds))
}

/// The control socket, still listening: clients that queued during the
/// exec are answered now.
pub fn control(state: &Handover) -> Result<ControlSocket, Error> {
    let c = &state.host.control;
    ControlSocket::adopt(
        &c.path,
        own(c.listener, "the control socket")?,
        own(c.dir, "the control directory")?,
        own(c.lock, "the control lock file")?,
    )
}

/// `--steer`'s second sockets, sides and target, if the old supervisor
/// steered; `None` if it did not (then `run.rs` binds them afresh).
pub fn steer(state: &Handover, listeners: &[listener::Listener]) -> Result<Option<Steer>, Error> {
    let Some(carried) = &state.host.steer else {
        return Ok(None);
    };
    let mut twins = Vec::new();
    for (i, fd) in &carried.twins {
        twins.push((
            *i,
            own(*fd, &format!("listener {i}'s second socket (--steer)"))?,
        ));
    }
    Steer::adopt(twins, carried, listeners).map(Some)
}

/// The `--metrics` listener, if there was one.
pub fn metrics(state: &Handover) -> Result<Option<std::net::TcpListener>, Error> {
    state
        .host
        .metrics
        .map(|fd| own(fd, "the --metrics listener").map(std::net::TcpListener::from))
        .transpose()
}

/// A generation's channel and notify socket, or why they cannot be had.
pub type WorkerFds = Result<(OwnedFd, OwnedFd), Error>;

/// Each generation's channel and notify socket, by generation.
pub fn workers(state: &Handover) -> Vec<(u64, WorkerFds)> {
    state
        .host
        .workers
        .iter()
        .map(|w| {
            let what = |s: &str| format!("generation {}'s {s}", w.generation);
            let fds = own(w.channel, &what("channel"))
                .and_then(|c| Ok((c, own(w.notify, &what("notify socket"))?)));
            (w.generation, fds)
        })
        .collect()
}

/// The kept values, checked again as any snapshot is.
pub fn kept(state: &Handover, max_state: u64) -> Result<Option<Snapshot>, Error> {
    state
        .table
        .kept
        .as_ref()
        .map(|k| snapshot(k, max_state))
        .transpose()
        .map(Option::flatten)
}

/// One carried snapshot, with its pre-copy if it has one.
fn snapshot(k: &CarriedKept, max_state: u64) -> Result<Option<Snapshot>, Error> {
    let mut fds = vec![own(k.fd, "the kept values")?];
    if let Some(base) = &k.base {
        fds.push(own(base.fd, "the kept values' pre-copy")?);
    }
    let base_bytes = k.base.as_ref().map(|b| b.bytes);
    Snapshot::accept_chain(k.generation, k.bytes, base_bytes, fds, max_state)
        .map_err(|e| fail(format!("the kept values: {e}")))
}

/// The connections of clients waiting for the upgrade's answer.
pub fn clients(state: &Handover) -> Vec<OwnedFd> {
    state
        .table
        .upgrade
        .clients
        .iter()
        .filter_map(|fd| own(*fd, "a waiting client's connection").ok())
        .collect()
}
