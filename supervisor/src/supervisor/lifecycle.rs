//! The end of a generation's life: drains, stops, exits and deadlines.
//!
//! A generation drains by message (SDK workers) or by `--drain-signal`, and
//! is killed at `--drain-timeout`. A stop drains every generation; a second
//! signal, or `stop --now`, kills. An exit removes the generation from the
//! table and tells whoever depended on it: the reload it was starting, the
//! successor it was frozen for, the restart back-off if it served.

use std::time::Duration;

use baton_worker::protocol::{StateSource, SupervisorMessage};
use nix::unistd::Pid;

use super::failure::Failure;
use super::reload::Step;
use super::Supervisor;
use crate::event::{Exit, Timer};
use crate::generations::Phase;
use crate::host::Host;

impl<H: Host> Supervisor<H> {
    /// Tells generation `number` to drain and arms its kill deadline.
    pub(super) fn begin_drain(&mut self, number: u64, why: &str) {
        let Some(g) = self.generations.get_mut(number) else {
            return;
        };
        if g.phase == Phase::Draining {
            return;
        }
        g.phase = Phase::Draining;
        g.draining_since = Some(std::time::Instant::now());
        self.send_drain(number, why);
    }

    /// Sends draining generation `number` its drain message or signal now,
    /// and arms its kill deadline.
    pub(super) fn send_drain(&mut self, number: u64, why: &str) {
        let timeout = self.config.drain_timeout;
        let Some(g) = self.generations.get(number) else {
            return;
        };
        let (pid, by_message) = (g.pid, g.speaks_protocol);
        let drain = SupervisorMessage::Drain {
            timeout_ms: timeout.as_millis() as u64,
        };
        if by_message && self.host.send(number, &drain, &[]).is_ok() {
            tracing::info!("generation {number} (pid {pid}) drains ({why})");
        } else {
            let signal = self.config.drain_signal;
            tracing::info!("generation {number} (pid {pid}) drains ({why}): sending {signal}");
            if let Err(e) = self.host.signal(pid, signal) {
                tracing::warn!("signalling generation {number} (pid {pid}): {e}");
            }
        }
        self.arm(number, timeout, Timer::DrainTimeout);
    }

    /// Kills every generation now (`stop --now`, a second SIGTERM/SIGINT).
    pub(super) fn kill_all(&mut self) {
        let pids: Vec<Pid> = self.generations.iter().map(|g| g.pid).collect();
        for pid in pids {
            self.host.kill(pid);
        }
    }

    /// Drains every generation and exits once all are gone; idempotent.
    pub(super) fn begin_stop(&mut self) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        self.reloads.restart.starting = None;
        tracing::info!("stopping: draining every generation");
        if let Some(limit) = self.config.stop_timeout {
            self.host.arm(limit, crate::event::Event::StopTimeout);
        }
        self.host.systemd("STOPPING=1");
        self.abandon_upgrade("baton is stopping");
        if let Some(number) = self.reloads.in_flight.as_ref().map(|f| f.generation) {
            self.begin_drain(number, "baton is stopping");
            self.finish_in_flight(number, Err(Failure::Stopping));
        }
        for waiter in self.reloads.queued.take().unwrap_or_default() {
            let _ = waiter.send(crate::api::Reply::Refused("baton is stopping".into()));
        }
        for n in self.generations.numbers() {
            self.begin_drain(n, "baton is stopping");
        }
        self.end_steer_graces("baton is stopping");
    }

    /// `--stop-timeout` ran out: whatever still runs is killed, and baton
    /// says so in its exit status.
    pub(super) fn on_stop_timeout(&mut self) {
        if self.is_done() {
            return;
        }
        let left = self.generations.numbers().len();
        tracing::error!(
            "the stop took longer than --stop-timeout: killing the {left} generations left"
        );
        self.stop_timed_out = true;
        self.kill_all();
    }

    /// Child `pid` exited: the build, a generation's worker, or an orphan
    /// of a worker re-parented to baton.
    pub(super) fn on_exit(&mut self, pid: Pid, exit: Exit) {
        if self.on_preflight_exit(pid, exit) {
            return;
        }
        let is_build = matches!(
            self.reloads.in_flight.as_ref().map(|f| &f.step),
            Some(Step::Building(b)) if b.pid == pid
        );
        if is_build {
            self.on_build_exit(exit);
            return;
        }
        let Some(number) = self.generations.by_pid(pid) else {
            tracing::debug!("reaped pid {pid} (not a worker: an orphan re-parented to baton)");
            return;
        };
        let Some(g) = self.generations.remove(number) else {
            return;
        };
        for timer in &g.timers {
            self.host.cancel(timer.id);
        }
        self.host.forget(number);
        let exec_failure = self.host.exec_failure(pid);
        let frozen_for = self.reloads.in_flight.as_ref().and_then(|f| match f.step {
            Step::AwaitingSnapshot { from, .. } if from == number => Some(f.generation),
            _ => None,
        });
        if let Some(to) = frozen_for {
            // The frozen generation died before handing over: its successor
            // gets what was kept before (its last checkpoint, if any).
            tracing::warn!(
                "generation {number} exited while frozen; generation {to} gets the last checkpoint"
            );
            let ready = self.reloads.in_flight.as_mut().is_some_and(|f| {
                let ready = matches!(f.step, Step::AwaitingSnapshot { ready: true, .. });
                f.step = Step::Starting;
                ready
            });
            self.send_state(to, StateSource::Checkpoint);
            if ready {
                self.on_ready(to, "ready, after its kept values arrived");
            }
        }
        if g.phase == Phase::Serving {
            // It may have owed a successor a pre-copy.
            self.pre_copies_lost();
        }
        // Whatever the worker left in its process group goes with it.
        self.host.kill(pid);
        match g.phase {
            Phase::Starting => {
                let reason = match exec_failure {
                    Some(why) => Failure::Exec {
                        program: self.config.command.program.to_string_lossy().into_owned(),
                        why,
                    },
                    None => Failure::Exited(exit),
                };
                self.start_failed(number, reason);
            }
            Phase::Serving => {
                tracing::error!("generation {number} (pid {pid}) {exit} while serving");
                let served = g.serving_since.map(|t| t.elapsed()).unwrap_or_default();
                self.crashed_after(served);
            }
            Phase::Draining => {
                let drained = g
                    .draining_since
                    .map_or(0, |t| t.elapsed().as_millis() as u64);
                tracing::info!(
                    "generation {number} (pid {pid}) {exit} after {} of draining",
                    humantime::format_duration(Duration::from_millis(drained))
                );
            }
        }
        self.start_queued();
    }

    /// A deadline of generation `number` passed.
    pub(super) fn on_timer(&mut self, number: u64, timer: Timer) {
        let Some(g) = self.generations.get(number) else {
            return;
        };
        let (pid, phase) = (g.pid, g.phase);
        let frozen_for_it = self
            .reloads
            .in_flight
            .as_ref()
            .is_some_and(|f| f.generation == number && f.step.frozen().is_some());
        match (timer, phase) {
            (Timer::ReadyTimeout, Phase::Starting) => {
                self.fail_starting(number, Failure::NotReady(self.config.ready_timeout));
            }
            (Timer::FreezeTimeout, Phase::Starting) if frozen_for_it => {
                self.fail_starting(number, Failure::FrozeTooLong(self.config.freeze_timeout));
            }
            (Timer::ReadyAfter, Phase::Starting) => {
                let after = match self.config.readiness {
                    super::Readiness::After(d) => humantime::format_duration(d).to_string(),
                    super::Readiness::Notify => String::new(),
                };
                self.on_ready(number, &format!("alive for {after}"));
            }
            (Timer::SteerGrace, Phase::Draining) => self.on_steer_grace(number),
            (Timer::DrainTimeout, Phase::Draining) => {
                tracing::warn!(
                    "generation {number} (pid {pid}) still running {} after it was told to \
                     drain: killing it",
                    humantime::format_duration(self.config.drain_timeout)
                );
                self.host.kill(pid);
            }
            _ => {}
        }
    }
}
