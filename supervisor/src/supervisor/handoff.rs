//! Kept values: the freeze, the snapshot, the thaw, and checkpoints.
//!
//! When the in-flight reload's generation asks for its kept values
//! (`TakeState`), the serving generation is told to freeze; its snapshot
//! (a sealed memfd, checked by `state.rs`, never read) goes to the new
//! generation, which serves once ready; if it fails instead, the old one
//! thaws. Without a live predecessor the last checkpoint is sent. Before
//! that, a successor may ask for a **pre-copy** (`Prepare`): the serving
//! generation writes every value while it serves on, the successor reads
//! them, and the freeze's snapshot then holds only the values written
//! since; the two travel on together. A
//! successor never starts from values older than a living serving
//! generation holds: if they cannot be had, the reload fails with why.

use std::time::Instant;

use baton_worker::protocol::{ProtocolError, StateSource, SupervisorMessage, WorkerMessage};

use super::failure::Failure;
use super::reload::Step;
use super::Supervisor;
use crate::event::Timer;
use crate::generations::Phase;
use crate::host::Host;
use crate::state::{self, Snapshot};

impl<H: Host> Supervisor<H> {
    /// A new generation asks for its predecessor's kept values: freeze the
    /// serving generation if it keeps any, else answer from the last
    /// checkpoint.
    pub(super) fn on_take_state(&mut self, number: u64) {
        let step = self
            .reloads
            .in_flight
            .as_ref()
            .filter(|f| f.generation == number)
            .map(|f| &f.step);
        match step {
            // Asked again (an abandoned `keep` future): the snapshot is on
            // its way, or is sent again.
            Some(Step::AwaitingSnapshot { .. }) => return,
            Some(Step::WithState { .. }) => {
                self.send_state(number, StateSource::Snapshot);
                return;
            }
            _ => {}
        }
        let source = self
            .generations
            .iter()
            .filter(|g| g.is(Phase::Serving) && g.speaks_protocol && !g.frozen)
            .map(|g| g.number)
            .max();
        let reloading = matches!(step, Some(Step::Starting)) && self.is(number, Phase::Starting);
        let (Some(from), true) = (source, reloading) else {
            // No live predecessor to freeze (or asked late, or a crash
            // restart): the last checkpoint, or nothing.
            self.send_state(number, StateSource::Checkpoint);
            return;
        };
        // The grace must leave the successor time to get ready before the
        // freeze times out.
        let grace = self.config.freeze_grace.min(self.config.freeze_timeout / 2);
        let freeze = SupervisorMessage::Freeze {
            grace_ms: Some(u64::try_from(grace.as_millis()).unwrap_or(u64::MAX)),
            delta: self.generations.get(number).is_some_and(|g| g.pre_copy),
        };
        match self.host.send(from, &freeze, &[]) {
            Ok(()) => {
                if let Some(g) = self.generations.get_mut(from) {
                    g.frozen = true;
                    tracing::info!(
                        "generation {from} (pid {}) freezes to hand its kept values to \
                         generation {number}",
                        g.pid
                    );
                }
                if let Some(f) = self.reloads.in_flight.as_mut() {
                    f.step = Step::AwaitingSnapshot {
                        from,
                        since: Instant::now(),
                        ready: false,
                    };
                }
                self.arm(number, self.config.freeze_timeout, Timer::FreezeTimeout);
            }
            Err(e) => {
                // Its values are newer than any checkpoint: handing over an
                // older state would lose writes it acknowledged.
                self.fail_starting(
                    number,
                    Failure::KeptValues(format!(
                        "generation {from} serves and keeps values, but asking it to hand them \
                         over failed: {e}"
                    )),
                );
            }
        }
    }

    /// The serving generation a starting generation `number` takes its
    /// kept values from, if it is the in-flight reload's and one serves.
    fn predecessor_of(&self, number: u64) -> Option<u64> {
        let starting = self
            .reloads
            .in_flight
            .as_ref()
            .is_some_and(|f| f.generation == number && matches!(f.step, Step::Starting))
            && self.is(number, Phase::Starting);
        if !starting {
            return None;
        }
        self.generations
            .iter()
            .filter(|g| g.is(Phase::Serving) && g.speaks_protocol && !g.frozen)
            .map(|g| g.number)
            .max()
    }

    /// A new generation asks for a pre-copy of its predecessor's values:
    /// ask the serving generation, which serves on, or answer that there is
    /// none (then its `TakeState` is answered as without a pre-copy).
    pub(super) fn on_prepare(&mut self, number: u64) {
        let from = self
            .predecessor_of(number)
            .filter(|from| self.generations.get(*from).is_some_and(|g| g.pre_copy));
        if let Some(from) = from {
            let ask = SupervisorMessage::PreCopy {
                for_generation: number,
            };
            match self.host.send(from, &ask, &[]) {
                Ok(()) => {
                    tracing::debug!("generation {from} pre-copies its kept values for {number}");
                    if let Some(g) = self.generations.get_mut(number) {
                        g.awaits_pre_copy = true;
                    }
                    return;
                }
                Err(e) => tracing::warn!("asking generation {from} for a pre-copy: {e}"),
            }
        }
        self.send_no_pre_copy(number);
    }

    /// A serving generation is gone: whoever waits for its pre-copy goes
    /// on without one.
    pub(super) fn pre_copies_lost(&mut self) {
        let waiting: Vec<u64> = self
            .generations
            .iter()
            .filter(|g| g.awaits_pre_copy)
            .map(|g| g.number)
            .collect();
        for number in waiting {
            self.send_no_pre_copy(number);
        }
    }

    /// Tells `number` there is no pre-copy: it goes on with `TakeState`.
    fn send_no_pre_copy(&mut self, number: u64) {
        match self.generations.get_mut(number) {
            Some(g) => g.awaits_pre_copy = false,
            None => return,
        }
        let none = SupervisorMessage::State {
            source: StateSource::PreCopy,
            generation: None,
            bytes: 0,
            base_bytes: None,
        };
        if let Err(e) = self.host.send(number, &none, &[]) {
            self.protocol_error(number, format!("answering its pre-copy request: {e}"));
        }
    }

    /// The serving generation's pre-copy: checked and passed on, not kept
    /// (the freeze's snapshot, which names it, is).
    pub(super) fn on_pre_copied(
        &mut self,
        number: u64,
        to: u64,
        bytes: u64,
        fds: Vec<std::os::fd::OwnedFd>,
    ) {
        if self.predecessor_of(to) != Some(number) {
            tracing::debug!(
                "generation {number} sent a pre-copy for {to}, which no longer needs it"
            );
            return;
        }
        let snapshot = match Snapshot::accept(number, bytes, fds, self.config.max_state) {
            Ok(Some(snapshot)) => snapshot,
            Ok(None) => return self.send_no_pre_copy(to),
            Err(reason) => {
                // The freeze's snapshot will hold everything, and meet the
                // same check there, with the reload's failure if it must.
                tracing::warn!("generation {number}'s pre-copy: {reason}; going on without it");
                return self.send_no_pre_copy(to);
            }
        };
        let state = SupervisorMessage::State {
            source: StateSource::PreCopy,
            generation: Some(number),
            bytes,
            base_bytes: None,
        };
        if let Some(g) = self.generations.get_mut(to) {
            g.awaits_pre_copy = false;
        }
        if let Err(e) = self.host.send(to, &state, &[snapshot.fd()]) {
            self.protocol_error(to, format!("sending its pre-copy: {e}"));
        }
    }

    /// The successor of `from`, while `from` is frozen for it and has not
    /// sent its snapshot.
    fn awaiting_snapshot_of(&self, from: u64) -> Option<u64> {
        let f = self.reloads.in_flight.as_ref()?;
        match f.step {
            Step::AwaitingSnapshot { from: f_from, .. } if f_from == from => Some(f.generation),
            _ => None,
        }
    }

    /// The frozen generation's snapshot: check it, keep it, pass it on.
    pub(super) fn on_frozen(
        &mut self,
        number: u64,
        bytes: u64,
        base_bytes: Option<u64>,
        fds: Vec<std::os::fd::OwnedFd>,
    ) {
        let Some(to) = self.awaiting_snapshot_of(number) else {
            tracing::warn!("generation {number} sent a snapshot nobody asked for; ignored");
            return;
        };
        match Snapshot::accept_chain(number, bytes, base_bytes, fds, self.config.max_state) {
            Ok(snapshot) => {
                match base_bytes {
                    Some(base) => tracing::info!(
                        "generation {number} froze; {} of kept values written since its \
                         pre-copy ({}) go to generation {to}",
                        state::size(bytes),
                        state::size(base)
                    ),
                    None => tracing::info!(
                        "generation {number} froze; {} of kept values go to generation {to}",
                        state::size(bytes)
                    ),
                }
                self.set_kept(snapshot);
                let mut ready = false;
                if let Some(f) = self.reloads.in_flight.as_mut() {
                    if let Step::AwaitingSnapshot {
                        from,
                        since,
                        ready: r,
                    } = f.step
                    {
                        ready = r;
                        f.step = Step::WithState { from, since };
                    }
                }
                self.send_state(to, StateSource::Snapshot);
                if ready {
                    self.on_ready(to, "ready, after its kept values arrived");
                }
            }
            Err(reason) => {
                self.fail_starting(
                    to,
                    Failure::KeptValues(format!("generation {number}'s snapshot: {reason}")),
                );
            }
        }
    }

    /// The frozen generation could not write its values.
    pub(super) fn on_freeze_failed(&mut self, number: u64, reason: String) {
        let to = self
            .reloads
            .in_flight
            .as_ref()
            .filter(|f| f.step.frozen().is_some_and(|(from, _, _)| from == number))
            .map(|f| f.generation);
        if let Some(to) = to {
            self.fail_starting(
                to,
                Failure::KeptValues(format!(
                    "generation {number} could not save its kept values: {reason}"
                )),
            );
        }
    }

    /// A generation refused the kept values it was given.
    pub(super) fn on_rejected(&mut self, number: u64, reason: String) {
        let Some(g) = self.generations.get(number) else {
            return;
        };
        if g.phase != Phase::Starting {
            tracing::warn!(
                "generation {number} (pid {}) rejected kept values after it was ready: {reason}",
                g.pid
            );
            return;
        }
        let from = self
            .reloads
            .in_flight
            .as_ref()
            .filter(|f| f.generation == number)
            .and_then(|f| f.step.frozen())
            .map(|(from, _, _)| format!("of generation {from}"))
            .unwrap_or_else(|| "it was given".to_owned());
        self.fail_starting(
            number,
            Failure::KeptValues(format!("rejected the kept values {from}: {reason}")),
        );
    }

    /// A checkpoint: kept for a crash restart, if it is not older than what
    /// is kept and comes from a generation that still owns its values.
    pub(super) fn on_checkpoint(
        &mut self,
        number: u64,
        bytes: u64,
        fds: Vec<std::os::fd::OwnedFd>,
    ) {
        let Some(g) = self.generations.get(number) else {
            return;
        };
        let owns = !g.frozen && g.phase == Phase::Serving;
        let newer = self.kept.as_ref().is_none_or(|k| k.generation <= number);
        if !(owns && newer) {
            tracing::debug!("generation {number}: ignored a checkpoint (its values moved on)");
            return;
        }
        match Snapshot::accept(number, bytes, fds, self.config.max_state) {
            Ok(snapshot) => {
                tracing::debug!("generation {number} checkpointed {}", state::size(bytes));
                self.set_kept(snapshot);
            }
            Err(reason) => tracing::warn!("generation {number}: refused a checkpoint: {reason}"),
        }
    }

    /// baton itself could not take in a message whole (out of descriptors,
    /// say): not the worker's fault, and its channel stays. A snapshot that
    /// lost its memfd fails the reload it was for (the frozen generation
    /// thaws with its values); a lost checkpoint waits for the next one; a
    /// lost pre-copy leaves its successor to take the whole snapshot.
    pub(super) fn on_lost(&mut self, number: u64, e: ProtocolError) {
        match e.lost_message::<WorkerMessage>() {
            Some(WorkerMessage::Frozen { .. }) => match self.awaiting_snapshot_of(number) {
                Some(to) => self.fail_starting(
                    to,
                    Failure::KeptValues(format!(
                        "generation {number}'s snapshot did not reach baton: {e}"
                    )),
                ),
                None => tracing::warn!("generation {number}: {e}"),
            },
            Some(WorkerMessage::Checkpoint { .. }) => {
                tracing::warn!("generation {number}: {e}; its next checkpoint replaces it");
            }
            // The freeze's snapshot will hold everything: the successor
            // goes on without a pre-copy.
            Some(WorkerMessage::PreCopied { for_generation, .. }) => {
                tracing::warn!("generation {number}: {e}; {for_generation} goes on without it");
                if self.predecessor_of(for_generation) == Some(number) {
                    self.send_no_pre_copy(for_generation);
                }
            }
            _ => tracing::warn!("generation {number}: {e}"),
        }
    }

    /// Holds `snapshot` as the latest kept values, in systemd's store too
    /// unless it needs its pre-copy (the store holds one descriptor: it
    /// keeps the last whole one until the successor's first checkpoint,
    /// which the SDK sends once it is ready).
    fn set_kept(&mut self, snapshot: Option<Snapshot>) {
        if snapshot.as_ref().is_none_or(|s| s.base.is_none()) {
            self.host.store_kept(snapshot.as_ref().map(Snapshot::fd));
        }
        self.kept = snapshot;
    }

    /// Answers generation `number`'s `TakeState` with what is kept.
    pub(super) fn send_state(&mut self, number: u64, source: StateSource) {
        if self.generations.get(number).is_none() {
            return;
        }
        let (message, fds) = match &self.kept {
            Some(k) => (
                SupervisorMessage::State {
                    source,
                    generation: Some(k.generation),
                    bytes: k.bytes,
                    base_bytes: k.base.as_ref().map(|b| b.bytes),
                },
                std::iter::once(k.fd())
                    .chain(k.base.as_ref().map(|b| b.fd()))
                    .collect(),
            ),
            None => (
                SupervisorMessage::State {
                    source: StateSource::None,
                    generation: None,
                    bytes: 0,
                    base_bytes: None,
                },
                Vec::new(),
            ),
        };
        match self.host.send(number, &message, &fds) {
            Ok(()) => {
                if let Some(g) = self.generations.get_mut(number) {
                    g.took_state = true;
                }
            }
            Err(e) => self.protocol_error(number, format!("sending its kept values: {e}")),
        }
    }

    /// The successor of `from` failed: `from` thaws and accepts again with
    /// its values as they were.
    pub(super) fn thaw(&mut self, from: u64) {
        let Some(g) = self.generations.get_mut(from) else {
            return;
        };
        g.frozen = false;
        if g.phase != Phase::Serving {
            return;
        }
        let pid = g.pid;
        match self.host.send(from, &SupervisorMessage::Thaw, &[]) {
            Ok(()) => tracing::info!("generation {from} (pid {pid}) thaws and serves on"),
            Err(e) => {
                // Still frozen, it accepts nothing: replace it.
                tracing::error!("telling generation {from} to thaw: {e}; replacing it");
                self.begin_drain(from, "could not thaw");
                self.schedule_restart();
            }
        }
    }
}
