//! A reload from its trigger to its outcome.
//!
//! At most one reload is in flight ([`InFlight`]); where it stands is one
//! [`Step`]: building, starting, awaiting the frozen predecessor's snapshot
//! (possibly already ready), or starting with its kept values. Triggers
//! during a reload coalesce into one queued reload with every waiter. The
//! crash restart that may run beside it is `restart.rs`. The old generation
//! is told to drain only here, in `on_ready`, once its successor is ready.

use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::failure::Failure;
use super::restart::Restart;
use super::Supervisor;
use crate::api::{self, ReloadOutcome, Reply};
use crate::build::{self, Build};
use crate::event::Event;
use crate::generations::Phase;
use crate::host::Host;

/// Someone waiting for a reload's outcome (`baton reload --wait`).
pub(super) type Waiter = oneshot::Sender<Reply>;

/// Why a generation is started by a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Purpose {
    /// The first generation: its failure ends `baton run`.
    First,
    /// A reload of a serving generation.
    Reload,
}

/// Where an in-flight reload stands.
#[derive(Debug)]
pub(super) enum Step {
    /// `--build` runs; the generation starts once it exited 0 and its output
    /// ended.
    Building(Build),
    /// The generation runs, is not ready, and has no predecessor frozen for
    /// it.
    Starting,
    /// Generation `from` froze for it at `since` and has not sent its kept
    /// values yet; `ready` if the new one already said ready (it serves once
    /// they are sent).
    AwaitingSnapshot {
        from: u64,
        since: Instant,
        ready: bool,
    },
    /// It has the kept values of `from`, frozen since `since`, and is not
    /// ready yet.
    WithState { from: u64, since: Instant },
}

impl Step {
    /// The step as `status` names it.
    pub(super) fn name(&self) -> api::Step {
        match self {
            Step::Building(_) => api::Step::Building,
            Step::Starting => api::Step::Starting,
            Step::AwaitingSnapshot { ready: false, .. } => api::Step::AwaitingSnapshot,
            Step::AwaitingSnapshot { ready: true, .. } => api::Step::ReadyPending,
            Step::WithState { .. } => api::Step::StartingWithState,
        }
    }

    /// The frozen predecessor: `(from, since, answered)`.
    pub(super) fn frozen(&self) -> Option<(u64, Instant, bool)> {
        match *self {
            Step::AwaitingSnapshot { from, since, .. } => Some((from, since, false)),
            Step::WithState { from, since } => Some((from, since, true)),
            _ => None,
        }
    }
}

/// The reload (or first start) in progress.
#[derive(Debug)]
pub(super) struct InFlight {
    /// The generation it starts (reserved while it builds).
    pub generation: u64,
    pub purpose: Purpose,
    pub started: Instant,
    pub waiters: Vec<Waiter>,
    pub step: Step,
}

/// Everything about reloads the loop keeps.
#[derive(Debug, Default)]
pub(super) struct Reloads {
    pub in_flight: Option<InFlight>,
    /// A reload asked for while another runs: at most one, with every
    /// waiter.
    pub queued: Option<Vec<Waiter>>,
    pub restart: Restart,
    /// How the last reload (or restart) ended.
    pub last: Option<api::LastReload>,
    pub counts: api::ReloadCounts,
    /// The first generation has served.
    pub ever_served: bool,
    /// `--steer`: replaced generations that get no new connections and
    /// have not been told to drain yet: when, and why they were replaced.
    pub graced: std::collections::BTreeMap<u64, (Instant, String)>,
}

impl Reloads {
    /// The in-flight reload's generation, if it is `number`.
    pub(super) fn in_flight_is(&self, number: u64) -> bool {
        self.in_flight
            .as_ref()
            .is_some_and(|f| f.generation == number)
    }

    /// The crash restart's generation, if it is `number`.
    pub(super) fn restarting_is(&self, number: u64) -> bool {
        self.restart.starting.is_some_and(|(r, _)| r == number)
    }
}

impl<H: Host> Supervisor<H> {
    /// Starts a reload now, or queues one (coalescing with any queued one).
    pub(super) fn request_reload(&mut self, waiter: Option<Waiter>) {
        if self.stopping {
            if let Some(w) = waiter {
                let _ = w.send(Reply::Refused("baton is stopping".into()));
            }
            return;
        }
        self.reloads
            .queued
            .get_or_insert_with(Vec::new)
            .extend(waiter);
        self.start_queued();
    }

    /// Starts the queued reload if nothing blocks it: no reload in flight
    /// and fewer than `--max-draining` generations draining.
    pub(super) fn start_queued(&mut self) {
        if self.stopping || self.reloads.in_flight.is_some() || self.reloads.queued.is_none() {
            return;
        }
        if self.upgrades.holds_reloads() {
            tracing::info!("reload waits: baton is upgrading itself");
            return;
        }
        let draining = self.generations.numbers_in(Phase::Draining).len();
        if draining >= self.config.max_draining {
            tracing::info!(
                "reload waits: {draining} old generations are still draining \
                 (at most {} at once)",
                self.config.max_draining
            );
            return;
        }
        if self.steer_blocks_reload() {
            return;
        }
        let waiters = self.reloads.queued.take().unwrap_or_default();
        // A triggered reload is a reload (it builds, systemd hears of it)
        // even while a crashed worker waits for its restart or restarts.
        let purpose = if self.reloads.ever_served {
            Purpose::Reload
        } else {
            Purpose::First
        };
        self.begin_reload(purpose, waiters);
    }

    /// Starts a reload (or the first start): the build first if there is
    /// one, then the new generation.
    pub(super) fn begin_reload(&mut self, purpose: Purpose, waiters: Vec<Waiter>) {
        let number = self.next_generation;
        self.next_generation += 1;
        if purpose == Purpose::Reload {
            self.host
                .systemd_reloading(&format!("reloading to generation {number}"));
        }
        let script = self.config.build.clone();
        let step = match &script {
            None => Step::Starting,
            Some(script) => match self.host.spawn_build(number, script) {
                Ok(pid) => {
                    tracing::info!("building: {script} (pid {pid})");
                    Step::Building(Build::new(pid))
                }
                Err(e) => {
                    self.reloads.in_flight = Some(InFlight {
                        generation: number,
                        purpose,
                        started: Instant::now(),
                        waiters,
                        step: Step::Starting,
                    });
                    self.finish_in_flight(
                        number,
                        Err(Failure::Build {
                            script: script.clone(),
                            how: e,
                            took: None,
                            tail: String::new(),
                        }),
                    );
                    return;
                }
            },
        };
        let building = matches!(step, Step::Building(_));
        self.reloads.in_flight = Some(InFlight {
            generation: number,
            purpose,
            started: Instant::now(),
            waiters,
            step,
        });
        if !building {
            self.spawn_generation(number);
        }
    }

    /// The build's output ended.
    pub(super) fn on_build_output(&mut self, number: u64, tail: String) {
        if let Some(build) = self.building(number) {
            build.tail = Some(tail);
            self.finish_build();
        }
    }

    /// The build exited a second ago and something it left holds its
    /// output: go on without the tail.
    pub(super) fn on_build_output_late(&mut self, number: u64) {
        if let Some(build) = self.building(number).filter(|b| b.tail.is_none()) {
            build.tail = Some("(its output is still held open by a process it left behind)".into());
            self.host.abandon_build_output(number);
            self.finish_build();
        }
    }

    /// The in-flight build, if it is generation `number`'s.
    fn building(&mut self, number: u64) -> Option<&mut Build> {
        match self.reloads.in_flight.as_mut() {
            Some(InFlight {
                generation,
                step: Step::Building(build),
                ..
            }) if *generation == number => Some(build),
            _ => None,
        }
    }

    /// The build process exited.
    pub(super) fn on_build_exit(&mut self, exit: crate::event::Exit) {
        let Some(f) = self.reloads.in_flight.as_mut() else {
            return;
        };
        let number = f.generation;
        let Step::Building(build) = &mut f.step else {
            return;
        };
        let failure = self.host.exec_failure(build.pid);
        build.exited(exit, failure);
        // Whatever the build left running would hold its output open.
        self.host.kill(build.pid);
        // Something it left in another process group still could: give the
        // output a moment to end, then go on without its tail.
        self.host.arm(
            build::OUTPUT_GRACE,
            Event::BuildOutputLate { generation: number },
        );
        self.finish_build();
    }

    /// Once the build has exited and its output ended: start the generation
    /// if it succeeded, else fail the reload with the output's tail.
    fn finish_build(&mut self) {
        let Some(f) = self.reloads.in_flight.as_mut() else {
            return;
        };
        let number = f.generation;
        let over = matches!(&f.step, Step::Building(b) if b.is_over());
        if !over {
            return;
        }
        let Step::Building(build) = std::mem::replace(&mut f.step, Step::Starting) else {
            return;
        };
        let took = build.started.elapsed();
        let script = self.config.build.clone().unwrap_or_default();
        match (build.exit, build.tail) {
            (Some(Ok(())), _) => {
                tracing::info!(
                    "build succeeded in {}",
                    humantime::format_duration(Duration::from_millis(took.as_millis() as u64))
                );
                self.spawn_generation(number);
            }
            (Some(Err(how)), tail) => {
                self.metrics.build_failures += 1;
                let failure = Failure::Build {
                    script,
                    how,
                    took: Some(took),
                    tail: tail.unwrap_or_default(),
                };
                self.finish_in_flight(number, Err(failure));
            }
            (None, _) => {}
        }
    }

    /// Starts generation `number`, the in-flight reload's.
    fn spawn_generation(&mut self, number: u64) {
        if !self.reloads.in_flight_is(number) {
            return;
        }
        self.steer_before_spawn(number);
        match self.host.spawn_worker(number) {
            Ok(pid) => self.add_generation(number, pid),
            Err(reason) => self.finish_in_flight(number, Err(Failure::Spawn(reason))),
        }
    }

    /// The starting generation is ready: it serves, and only now are the
    /// generations it replaces told to drain.
    pub(super) fn on_ready(&mut self, number: u64, how: &str) {
        if !self.is(number, Phase::Starting) {
            return;
        }
        if let Some(InFlight {
            generation,
            step: Step::AwaitingSnapshot { ready, .. },
            ..
        }) = self.reloads.in_flight.as_mut()
        {
            if *generation == number {
                // Draining the frozen generation now would lose its values.
                *ready = true;
                return;
            }
        }
        let restart = self.reloads.restarting_is(number);
        if restart && self.generations.serving().is_some() {
            // A reload served first: this restart is not needed.
            self.reloads.restart.starting = None;
            self.retire(number, "a reload replaced the crashed worker first");
            return;
        }
        let Some(g) = self.generations.get_mut(number) else {
            return;
        };
        g.phase = Phase::Serving;
        g.serving_since = Some(Instant::now());
        let timers = std::mem::take(&mut g.timers);
        tracing::info!("generation {number} (pid {}) is ready ({how})", g.pid);
        for timer in timers {
            self.host.cancel(timer.id);
        }
        if self.config.steer_grace.is_some() {
            self.host.steer_to(number);
        }
        for old in self.generations.numbers_in(Phase::Serving) {
            if old != number {
                self.retire(old, "replaced");
            }
        }
        if restart {
            self.on_restarted(number);
            return;
        }
        if let Some((r, _)) = self.reloads.restart.starting.take() {
            // A crash restart still starting beside this reload.
            self.retire(r, &format!("generation {number} serves first"));
        }
        let pause = self
            .reloads
            .in_flight
            .as_ref()
            .filter(|f| f.generation == number)
            .and_then(|f| f.step.frozen())
            .map(|(_, since, _)| since.elapsed());
        self.finish_in_flight(number, Ok(()));
        if let (Some(pause), Some(r)) = (pause, self.reloads.last.as_mut()) {
            r.accept_pause_ms = Some(pause.as_secs_f64() * 1000.0);
            self.metrics.last_accept_pause = Some(pause.as_secs_f64());
        }
    }

    /// Records how a reload (or restart) ended, for `status`.
    pub(super) fn record(
        &mut self,
        number: u64,
        purpose: Option<Purpose>,
        started: Instant,
        result: Result<(), &String>,
    ) {
        if purpose != Some(Purpose::First) || result.is_err() {
            self.reloads.last = Some(api::LastReload {
                generation: number,
                ok: result.is_ok(),
                error: result.err().cloned(),
                ms: started.elapsed().as_millis() as u64,
                accept_pause_ms: None,
            });
        }
    }

    /// Ends the in-flight start of generation `number`: records the result,
    /// answers its waiters, and moves on (queued reload, restart, or exit).
    pub(super) fn finish_in_flight(&mut self, number: u64, result: Result<(), Failure>) {
        let Some(in_flight) = self.reloads.in_flight.take_if(|f| f.generation == number) else {
            return;
        };
        let result = result.map_err(|failure| failure.to_string());
        if let Step::Building(build) = &in_flight.step {
            // Stopped mid-build: the build goes, with whatever it started.
            self.host.kill(build.pid);
            self.host.abandon_build_output(number);
        }
        let ms = in_flight.started.elapsed().as_millis() as u64;
        let reload = in_flight.purpose == Purpose::Reload;
        if reload {
            self.metrics
                .reload(result.is_ok(), in_flight.started.elapsed());
        }
        match &result {
            Ok(()) => {
                self.reloads.ever_served = true;
                self.reloads.counts.ok += u64::from(reload);
            }
            Err(reason) => {
                self.reloads.counts.failed += u64::from(reload);
                tracing::error!("generation {number} failed: {reason}");
                if let Some((from, _, _)) = in_flight.step.frozen() {
                    self.thaw(from);
                }
            }
        }
        self.record(
            number,
            Some(in_flight.purpose),
            in_flight.started,
            result.as_ref().map(|_| ()),
        );
        let outcome = ReloadOutcome {
            ok: result.is_ok(),
            generation: number,
            ms,
            error: result.as_ref().err().cloned(),
        };
        for waiter in in_flight.waiters {
            let _ = waiter.send(Reply::Reload(outcome.clone()));
        }
        let status = match (&result, self.generations.serving()) {
            (Ok(()), _) => format!("serving generation {number}"),
            (Err(_), Some(s)) => {
                format!("serving generation {s}; generation {number} failed to start")
            }
            (Err(_), None) => format!("generation {number} failed to start"),
        };
        // READY=1 after every reload, success or failure (systemd waits for
        // it); never for a first start that failed.
        if reload || result.is_ok() {
            self.host.systemd(&format!("READY=1\nSTATUS={status}"));
        }
        match (result, in_flight.purpose) {
            (Ok(()), _) => {}
            // Stopped while starting: that is the stop, not a failure.
            (Err(_), Purpose::First) if self.stopping => return,
            (Err(reason), Purpose::First) => {
                self.fatal = Some(format!("generation {number}: {reason}"));
                self.begin_stop();
                return;
            }
            (Err(_), Purpose::Reload) => self.schedule_restart(),
        }
        self.start_queued();
    }

    /// A starting generation failed: stop it (it may have accepted
    /// connections already, so drain first), and report why.
    pub(super) fn fail_starting(&mut self, number: u64, reason: Failure) {
        self.begin_drain(number, "failed to start");
        self.start_failed(number, reason);
    }

    /// A starting generation failed (it is draining or gone).
    pub(super) fn start_failed(&mut self, number: u64, reason: Failure) {
        if self.reloads.restarting_is(number) {
            self.restart_failed(number, reason);
        } else {
            self.finish_in_flight(number, Err(reason));
        }
    }
}
