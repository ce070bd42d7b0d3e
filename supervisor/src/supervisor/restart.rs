//! Crash restarts: a serving generation that dies is replaced after a
//! back-off (100ms, doubling up to 10s; reset after a healthy run), beside
//! any reload in flight: a reload may build for minutes, and nothing
//! accepts meanwhile. Whichever of the two is ready first serves; a restart
//! that serves after the reload's generation took kept values sends that
//! reload round again, since those values are now older than the served
//! ones.

use std::time::{Duration, Instant};

use super::failure::Failure;
use super::Supervisor;
use crate::event::Event;
use crate::host::Host;

/// Smallest and largest delay before restarting a crashed worker.
const RESTART_MIN: Duration = Duration::from_millis(100);
const RESTART_MAX: Duration = Duration::from_secs(10);
/// A worker that served this long before crashing restarts without delay
/// growth: its crash is news, not a loop.
const HEALTHY_FOR: Duration = Duration::from_secs(10);

/// Crash restarts: the back-off, and the replacement while it starts.
#[derive(Debug)]
pub(super) struct Restart {
    pub delay: Duration,
    /// Tells a current back-off timer from stale ones.
    pub seq: u64,
    /// The timer numbered `seq` runs.
    pub armed: bool,
    /// The replacement, while it starts: it starts beside any reload in
    /// flight (a reload may build for minutes, and nothing accepts
    /// meanwhile).
    pub starting: Option<(u64, Instant)>,
}

impl Default for Restart {
    fn default() -> Restart {
        Restart {
            delay: RESTART_MIN,
            seq: 0,
            armed: false,
            starting: None,
        }
    }
}

impl<H: Host> Supervisor<H> {
    /// The back-off after a crash is over.
    pub(super) fn on_restart_due(&mut self, seq: u64) {
        if seq != self.reloads.restart.seq {
            return;
        }
        self.reloads.restart.armed = false;
        if self.stopping
            || self.reloads.restart.starting.is_some()
            || self.generations.serving().is_some()
        {
            return;
        }
        // It reruns what served, without building.
        let number = self.next_generation;
        self.next_generation += 1;
        match self.host.spawn_worker(number) {
            Ok(pid) => {
                self.metrics.worker_restarts += 1;
                self.add_generation(number, pid);
                self.reloads.restart.starting = Some((number, Instant::now()));
            }
            Err(reason) => {
                tracing::error!("restarting the worker as generation {number}: {reason}");
                self.schedule_restart();
            }
        }
    }

    /// The crash restart `number` serves. A reload in progress whose
    /// generation already took kept values took values older than the ones
    /// this generation serves from now on: it starts over.
    pub(super) fn on_restarted(&mut self, number: u64) {
        let Some((_, started)) = self.reloads.restart.starting.take() else {
            return;
        };
        self.record(number, None, started, Ok(()));
        self.host
            .systemd(&format!("READY=1\nSTATUS=serving generation {number}"));
        let stale = self.reloads.in_flight.as_ref().and_then(|f| {
            self.generations
                .get(f.generation)
                .filter(|g| g.took_state)
                .map(|g| g.number)
        });
        if let Some(reload) = stale {
            let waiters = self
                .reloads
                .in_flight
                .as_mut()
                .map(|f| std::mem::take(&mut f.waiters))
                .unwrap_or_default();
            self.reloads
                .queued
                .get_or_insert_with(Vec::new)
                .extend(waiters);
            self.fail_starting(reload, Failure::Overtaken { by: number });
        }
        self.start_queued();
    }

    /// The crash restart `number` failed to start: try again after the
    /// back-off.
    pub(super) fn restart_failed(&mut self, number: u64, reason: Failure) {
        let Some((_, started)) = self.reloads.restart.starting.take_if(|(r, _)| *r == number)
        else {
            return;
        };
        tracing::error!("generation {number} failed: {reason}");
        self.record(number, None, started, Err(&reason.to_string()));
        self.host.systemd(&format!(
            "READY=1\nSTATUS=generation {number} failed to start"
        ));
        self.schedule_restart();
        self.start_queued();
    }

    /// With no generation serving, start one after the back-off, beside any
    /// reload in progress.
    pub(super) fn schedule_restart(&mut self) {
        let restart = &mut self.reloads.restart;
        if self.stopping
            || restart.armed
            || restart.starting.is_some()
            || self.generations.serving().is_some()
        {
            return;
        }
        restart.armed = true;
        restart.seq += 1;
        // Each restart in a row waits twice as long as the one before.
        let delay = restart.delay;
        restart.delay = (delay * 2).min(RESTART_MAX);
        let seq = restart.seq;
        tracing::info!(
            "restarting the worker in {}",
            humantime::format_duration(delay)
        );
        self.host.arm(delay, Event::RestartDue { seq });
    }

    /// A serving worker crashed after serving `served`: a healthy run
    /// resets the back-off.
    pub(super) fn crashed_after(&mut self, served: Duration) {
        if served >= HEALTHY_FOR {
            self.reloads.restart.delay = RESTART_MIN;
        }
        self.schedule_restart();
    }
}
