//! `--steer` in the loop: a replaced generation gets no new connections for
//! `--steer-grace`, then its drain signal.
//!
//! When a generation is ready, the host steers new connections to its
//! sockets (`steer.rs` at the crate root) and every generation it replaces
//! is *retired*: it is draining from then on (it serves no new
//! connections), but is told so only once the grace has passed and its own
//! accept queue is empty, so that it has read every connection it
//! accepted by the time its own shutdown begins. Without `--steer` a
//! retired generation is told at once. This room never signals a
//! generation except through `send_drain`.

use std::time::{Duration, Instant};

use super::Supervisor;
use crate::event::Timer;
use crate::generations::Phase;
use crate::host::Host;

impl<H: Host> Supervisor<H> {
    /// The serving generation, if it speaks the worker protocol: its
    /// drain is exact (it answers what it accepted, and a freeze stops its
    /// accepting before its successor is ready), so its successor shares its
    /// sockets and it is not steered away from.
    fn serving_sdk(&self) -> Option<u64> {
        let serving = self.generations.serving()?;
        let g = self.generations.get(serving)?;
        g.speaks_protocol.then_some(serving)
    }

    /// Before generation `number` starts: under `--steer`, the successor of
    /// an SDK worker shares its sockets.
    pub(super) fn steer_before_spawn(&mut self, number: u64) {
        if let (Some(_), Some(serving)) = (self.config.steer_grace, self.serving_sdk()) {
            self.host.steer_share(number, serving);
        }
    }

    /// Whether a reload must wait: under `--steer` both sockets of each
    /// listener are in use by the generations alive (unless the serving
    /// one's successor will share its sockets).
    pub(super) fn steer_blocks_reload(&self) -> bool {
        let alive = self.generations.numbers();
        if self.config.steer_grace.is_none() || alive.len() < 2 || self.serving_sdk().is_some() {
            return false;
        }
        let alive: Vec<String> = alive.iter().map(u64::to_string).collect();
        tracing::info!(
            "reload waits: --steer gives each listener two sockets, and generations {} use \
             them until one exits",
            alive.join(" and ")
        );
        true
    }

    /// Generation `number` is replaced: under `--steer` it drains after the
    /// grace (an SDK worker, whose drain is exact, at once), else now.
    pub(super) fn retire(&mut self, number: u64, why: &str) {
        let Some(grace) = self.config.steer_grace else {
            self.begin_drain(number, why);
            return;
        };
        let Some(g) = self.generations.get_mut(number) else {
            return;
        };
        if g.phase == Phase::Draining {
            return;
        }
        if g.speaks_protocol {
            self.begin_drain(number, why);
            return;
        }
        g.phase = Phase::Draining;
        g.draining_since = Some(Instant::now());
        let pid = g.pid;
        tracing::info!(
            "generation {number} (pid {pid}) gets no new connections ({why}); it is told to \
             drain in {}",
            humantime::format_duration(grace)
        );
        let generations = &self.generations;
        self.reloads
            .graced
            .retain(|n, _| generations.get(*n).is_some());
        self.reloads
            .graced
            .insert(number, (Instant::now(), why.to_owned()));
        self.arm(number, grace, Timer::SteerGrace);
    }

    /// The grace of retired generation `number` has passed: it is told to
    /// drain if its own accept queue is empty; else it gets another grace
    /// (for at most `--drain-timeout` in all), so that it had a whole grace
    /// to read the last connection it accepted.
    pub(super) fn on_steer_grace(&mut self, number: u64) {
        let Some(waited) = self.reloads.graced.get(&number).map(|(t, _)| t.elapsed()) else {
            return;
        };
        let grace = self.config.steer_grace.unwrap_or_default();
        let limit = self.config.drain_timeout + grace;
        if self.host.steered_queue(number) && waited < limit {
            // It has not accepted everything yet: once it has, it gets a
            // whole grace again to read what it accepted.
            self.arm(number, grace, Timer::SteerGrace);
            return;
        }
        let Some((_, why)) = self.reloads.graced.remove(&number) else {
            return;
        };
        tracing::debug!(
            "generation {number} got no new connections for {}",
            humantime::format_duration(Duration::from_millis(waited.as_millis() as u64))
        );
        self.send_drain(number, &why);
    }

    /// Tells every retired generation still in its grace to drain now.
    pub(super) fn end_steer_graces(&mut self, why: &str) {
        let graced = std::mem::take(&mut self.reloads.graced);
        for number in graced.into_keys() {
            if self.generations.get(number).is_some() {
                self.send_drain(number, why);
            }
        }
    }
}
