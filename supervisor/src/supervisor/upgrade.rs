//! An upgrade of baton itself, as the loop sees it: asked for, queued
//! behind a reload or a crash restart, checked by the pre-flight child,
//! then executed by `run.rs` once the control socket is quiet; and, in the
//! new supervisor, the table rebuilt from the hand-over state.
//!
//! At most one upgrade is pending; a second request for the same binary
//! waits for the same outcome, one for another binary is refused. While the
//! pre-flight runs, reloads wait (SIGHUP, `baton reload`); a reload someone
//! waits for goes first and the upgrade runs its pre-flight again after it,
//! a reload nobody waits for is carried across the exec and starts right
//! after. Every deadline crosses with the time it had left. The sequence as
//! a whole is told in `upgrade/mod.rs`.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::Supervisor;
use crate::api::{LastUpgrade, Reply, Upgrading};
use crate::event::Event;
use crate::generations::{Generation, Phase};
use crate::host::Host;
use crate::state::Snapshot;
use crate::upgrade::preflight;
use crate::upgrade::state::{
    CarriedGeneration, CarriedGrace, CarriedKept, CarriedTimer, CarriedUpgrade, Table,
};

/// This baton's version.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Upgrades: the pending one, and the results so far.
#[derive(Debug, Default)]
pub(super) struct Upgrades {
    pub pending: Option<Pending>,
    pub counts: crate::api::UpgradeCounts,
    pub last: Option<LastUpgrade>,
    /// Tells the current pre-flight's timer from stale ones.
    seq: u64,
}

/// The upgrade asked for and not over yet.
#[derive(Debug)]
pub(super) struct Pending {
    binary: PathBuf,
    /// Connections of `upgrade --wait` clients.
    clients: Vec<OwnedFd>,
    started: Instant,
    step: UpgradeStep,
}

/// Where the pending upgrade stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpgradeStep {
    /// Waits for a reload or a crash restart to end.
    Queued,
    /// The pre-flight child `pid` checks the state.
    Preflight { pid: nix::unistd::Pid },
    /// The pre-flight passed: `run.rs` execs once the control socket is quiet.
    Exec,
}

#[cfg(test)]
impl Pending {
    /// A pending upgrade of `binary` with no clients, for tests.
    pub(super) fn for_tests(binary: PathBuf) -> Pending {
        Pending {
            binary,
            clients: Vec::new(),
            started: Instant::now(),
            step: UpgradeStep::Queued,
        }
    }
}

impl Upgrades {
    /// A reload must wait: the pre-flight runs, or the exec is due.
    pub(super) fn holds_reloads(&self) -> bool {
        self.pending
            .as_ref()
            .is_some_and(|p| p.step != UpgradeStep::Queued)
    }
}

impl<H: Host> Supervisor<H> {
    /// `baton upgrade` or SIGUSR2.
    pub(super) fn request_upgrade(&mut self, binary: Option<PathBuf>, client: Option<OwnedFd>) {
        let binary = binary.unwrap_or_else(|| self.host.default_binary());
        if self.stopping {
            self.refuse_client(client, "baton is stopping");
            return;
        }
        match &mut self.upgrades.pending {
            Some(p) if p.binary == binary => {
                tracing::info!(
                    "upgrade to {} asked again: it is on its way",
                    binary.display()
                );
                p.clients.extend(client);
            }
            Some(p) => {
                let why = format!(
                    "an upgrade to {} is in progress; ask again once it is over",
                    p.binary.display()
                );
                self.refuse_client(client, &why);
            }
            None => {
                tracing::info!("upgrade of baton to {} requested", binary.display());
                self.upgrades.pending = Some(Pending {
                    binary,
                    clients: client.into_iter().collect(),
                    started: Instant::now(),
                    step: UpgradeStep::Queued,
                });
            }
        }
        self.advance_upgrade();
    }

    fn refuse_client(&mut self, client: Option<OwnedFd>, why: &str) {
        tracing::warn!("upgrade refused: {why}");
        if let Some(client) = client {
            self.host.answer(client, Reply::Refused(why.to_owned()));
        }
    }

    /// Nothing is starting and no reload waits: the table is what it will
    /// be until the next trigger.
    fn settled(&self) -> bool {
        !self.stopping
            && self.reloads.in_flight.is_none()
            && self.reloads.restart.starting.is_none()
            && !self.reloads.restart.armed
            && self.generations.serving().is_some()
            && self.generations.numbers_in(Phase::Starting).is_empty()
            && self.generations.iter().all(|g| !g.frozen)
    }

    /// Starts the queued upgrade's pre-flight once nothing else runs.
    pub(super) fn advance_upgrade(&mut self) {
        let queued = self
            .upgrades
            .pending
            .as_ref()
            .is_some_and(|p| p.step == UpgradeStep::Queued);
        if !queued || !self.settled() || self.reloads.queued.is_some() {
            return;
        }
        let Some(mut pending) = self.upgrades.pending.take() else {
            return;
        };
        let table = self.export(&pending);
        match self.host.spawn_preflight(&pending.binary, &table) {
            Ok(pid) => {
                tracing::info!(
                    "upgrade: {} checks the state it would get (pid {pid})",
                    pending.binary.display()
                );
                pending.step = UpgradeStep::Preflight { pid };
                self.upgrades.seq += 1;
                let seq = self.upgrades.seq;
                self.host
                    .arm(preflight::TIMEOUT, Event::PreflightTimeout { seq });
                self.upgrades.pending = Some(pending);
            }
            Err(why) => {
                self.upgrades.pending = Some(pending);
                self.fail_upgrade(format!("starting its pre-flight: {why}"));
            }
        }
    }

    /// Child `pid` exited: if it is the pre-flight, its verdict. Returns
    /// whether it was.
    pub(super) fn on_preflight_exit(
        &mut self,
        pid: nix::unistd::Pid,
        exit: crate::event::Exit,
    ) -> bool {
        let Some(p) = self.upgrades.pending.as_mut() else {
            return false;
        };
        if p.step != (UpgradeStep::Preflight { pid }) {
            return false;
        }
        match self.host.preflight_verdict(pid, exit) {
            Ok(version) => {
                tracing::info!(
                    "upgrade: the new baton accepts the state ({version}); executing it"
                );
                p.step = UpgradeStep::Exec;
            }
            Err(why) => self.fail_upgrade(format!("the pre-flight refused: {why}")),
        }
        true
    }

    /// The pre-flight took too long.
    pub(super) fn on_preflight_timeout(&mut self, seq: u64) {
        let Some(UpgradeStep::Preflight { pid }) = self.upgrades.pending.as_ref().map(|p| p.step)
        else {
            return;
        };
        if seq != self.upgrades.seq {
            return;
        }
        self.host.kill(pid);
        let said = self
            .host
            .preflight_verdict(
                pid,
                crate::event::Exit::Signal(nix::sys::signal::Signal::SIGKILL),
            )
            .err()
            .unwrap_or_default();
        self.fail_upgrade(format!(
            "the pre-flight did not finish within {}s and was killed ({said})",
            preflight::TIMEOUT.as_secs()
        ));
    }

    /// Whether the loop should return for `run.rs` to exec.
    pub(super) fn upgrade_due(&self) -> bool {
        self.upgrades
            .pending
            .as_ref()
            .is_some_and(|p| p.step == UpgradeStep::Exec)
    }

    /// Executes the pending upgrade if it still may (nothing started
    /// meanwhile, nobody waits for a reload): returns only if it did not,
    /// having put it back in the queue or failed it.
    pub fn exec_upgrade(&mut self) {
        if !self.upgrade_due() {
            return;
        }
        if self.stopping {
            self.fail_upgrade("baton is stopping".into());
            return;
        }
        let reload_waiters = self.reloads.queued.as_ref().is_some_and(|w| !w.is_empty());
        if !self.settled() || reload_waiters {
            tracing::info!("upgrade waits: a reload or a restart goes first");
            if let Some(p) = self.upgrades.pending.as_mut() {
                p.step = UpgradeStep::Queued;
            }
            self.start_queued();
            return;
        }
        let Some(pending) = self.upgrades.pending.as_ref() else {
            return;
        };
        let binary = pending.binary.clone();
        let table = self.export(pending);
        tracing::info!("upgrade: executing {} in place", binary.display());
        self.host
            .systemd(&format!("STATUS=upgrading baton to {}", binary.display()));
        let why = self.host.exec(&binary, table);
        self.fail_upgrade(why);
    }

    /// Gives up the pending upgrade (baton stops): its pre-flight child, if
    /// one runs, is killed.
    pub(super) fn abandon_upgrade(&mut self, why: &str) {
        let Some(step) = self.upgrades.pending.as_ref().map(|p| p.step) else {
            return;
        };
        if let UpgradeStep::Preflight { pid } = step {
            self.host.kill(pid);
            let killed = crate::event::Exit::Signal(nix::sys::signal::Signal::SIGKILL);
            let _ = self.host.preflight_verdict(pid, killed);
        }
        self.fail_upgrade(why.to_owned());
    }

    /// The pending upgrade failed: count it, say why, answer its clients,
    /// and let waiting reloads go.
    fn fail_upgrade(&mut self, why: String) {
        let Some(p) = self.upgrades.pending.take() else {
            return;
        };
        tracing::error!(
            "upgrade to {} failed: {why}; baton runs on",
            p.binary.display()
        );
        self.upgrades.counts.failed += 1;
        self.metrics.upgrades_failed += 1;
        let outcome = LastUpgrade {
            ok: false,
            error: Some(why),
            ms: p.started.elapsed().as_millis() as u64,
            from: VERSION.into(),
            to: VERSION.into(),
            binary: p.binary.display().to_string(),
        };
        self.upgrades.last = Some(outcome.clone());
        for client in p.clients {
            self.host.answer(client, Reply::Upgrade(outcome.clone()));
        }
        if let Some(s) = self.generations.serving() {
            self.host.systemd(&format!("STATUS=serving generation {s}"));
        }
        self.start_queued();
    }

    /// The upgrade in progress, for `status`.
    pub(super) fn upgrading(&self) -> Option<Upgrading> {
        self.upgrades.pending.as_ref().map(|p| Upgrading {
            step: match p.step {
                UpgradeStep::Queued => "queued",
                UpgradeStep::Preflight { .. } => "preflight",
                UpgradeStep::Exec => "exec",
            }
            .into(),
            binary: p.binary.display().to_string(),
            ms: p.started.elapsed().as_millis() as u64,
        })
    }

    /// The loop's part of the hand-over state, as of now.
    pub(super) fn export(&self, pending: &Pending) -> Table {
        let now = Instant::now();
        let ms = |d: Duration| d.as_millis() as u64;
        let since = |t: Option<Instant>| t.map(|t| ms(now.saturating_duration_since(t)));
        let generations = self
            .generations
            .iter()
            .map(|g| CarriedGeneration {
                number: g.number,
                pid: g.pid.as_raw(),
                phase: g.phase,
                age_ms: ms(now.saturating_duration_since(g.started)),
                serving_ms: since(g.serving_since),
                draining_ms: since(g.draining_since),
                speaks_protocol: g.speaks_protocol,
                frozen: g.frozen,
                took_state: g.took_state,
                pre_copy: g.pre_copy,
                awaits_pre_copy: g.awaits_pre_copy,
                status: g.status.clone(),
                timers: g
                    .timers
                    .iter()
                    .map(|d| CarriedTimer {
                        timer: d.timer,
                        remaining_ms: ms(d.at.saturating_duration_since(now)),
                    })
                    .collect(),
            })
            .collect();
        Table {
            next_generation: self.next_generation,
            generations,
            kept: self.kept.as_ref().map(carried_kept),
            reloads: self.reloads.counts,
            last_reload: self.reloads.last.clone(),
            ever_served: self.reloads.ever_served,
            reload_queued: self.reloads.queued.is_some(),
            restart_delay_ms: ms(self.reloads.restart.delay),
            metrics: self.metrics.clone(),
            upgrades: self.upgrades.counts,
            last_upgrade: self.upgrades.last.clone(),
            upgrade: CarriedUpgrade {
                to: pending.binary.clone(),
                elapsed_ms: ms(pending.started.elapsed()),
                clients: pending.clients.iter().map(|c| c.as_raw_fd()).collect(),
            },
            steer_graced: self
                .reloads
                .graced
                .iter()
                .map(|(n, (since, why))| CarriedGrace {
                    generation: *n,
                    waited_ms: ms(now.saturating_duration_since(*since)),
                    why: why.clone(),
                })
                .collect(),
        }
    }

    /// In the new supervisor: rebuilds the table from `table`, `gap` after
    /// it was written (every deadline is re-armed with what it had left
    /// minus the gap), with the kept values and the waiting clients already
    /// taken over; counts the upgrade and answers its clients.
    pub fn import(
        &mut self,
        table: Table,
        gap: Duration,
        kept: Option<Snapshot>,
        clients: Vec<OwnedFd>,
        from: String,
    ) {
        let now = Instant::now();
        let ago = |ms: u64| {
            now.checked_sub(Duration::from_millis(ms) + gap)
                .unwrap_or(now)
        };
        self.next_generation = table.next_generation;
        for c in &table.generations {
            let mut g = Generation::starting(c.number, nix::unistd::Pid::from_raw(c.pid));
            g.phase = c.phase;
            g.started = ago(c.age_ms);
            g.serving_since = c.serving_ms.map(ago);
            g.draining_since = c.draining_ms.map(ago);
            g.speaks_protocol = c.speaks_protocol;
            g.frozen = c.frozen;
            g.took_state = c.took_state;
            g.pre_copy = c.pre_copy;
            g.awaits_pre_copy = c.awaits_pre_copy;
            g.status = c.status.clone();
            self.generations.insert(g);
            for t in &c.timers {
                let left = Duration::from_millis(t.remaining_ms).saturating_sub(gap);
                self.arm(c.number, left, t.timer);
            }
        }
        for g in &table.steer_graced {
            let why = g.why.clone();
            self.reloads
                .graced
                .insert(g.generation, (ago(g.waited_ms), why));
        }
        self.kept = kept;
        self.reloads.counts = table.reloads;
        self.reloads.last = table.last_reload;
        self.reloads.ever_served = table.ever_served;
        self.reloads.restart.delay = Duration::from_millis(table.restart_delay_ms);
        if table.reload_queued {
            self.reloads.queued = Some(Vec::new());
        }
        self.metrics = table.metrics;
        self.upgrades.counts = table.upgrades;
        self.upgrades.counts.ok += 1;
        self.metrics.upgrades_ok += 1;
        let outcome = LastUpgrade {
            ok: true,
            error: None,
            ms: table.upgrade.elapsed_ms + gap.as_millis() as u64,
            from,
            to: VERSION.into(),
            binary: table.upgrade.to.display().to_string(),
        };
        tracing::info!(
            "upgraded in place from baton {} to {} in {}ms: {} generation(s) adopted",
            outcome.from,
            outcome.to,
            outcome.ms,
            table.generations.len()
        );
        self.upgrades.last = Some(outcome.clone());
        for client in clients {
            self.host.answer(client, Reply::Upgrade(outcome.clone()));
        }
        if let Some(s) = self.generations.serving() {
            self.host.systemd(&format!("STATUS=serving generation {s}"));
        }
    }

    /// In the new supervisor, once the table is back: the children that
    /// exited during the exec are reaped, and a reload asked for during it
    /// starts.
    pub fn resume(&mut self) {
        self.handle(Event::Child);
        self.start_queued();
        self.publish();
    }
}

/// The kept values as they cross: each memfd by number, a pre-copy's base
/// with it.
fn carried_kept(snapshot: &Snapshot) -> CarriedKept {
    CarriedKept {
        generation: snapshot.generation,
        bytes: snapshot.bytes,
        fd: snapshot.fd().as_raw_fd(),
        base: snapshot.base.as_deref().map(carried_kept).map(Box::new),
    }
}
