//! The drain signal of one worker: a `tokio::sync::watch` that goes from
//! "serving" to "draining" exactly once, the reason and deadline that came
//! with it, and the `on_drain` hooks.
//!
//! Whoever notices a drain (the channel reader, the signal task) calls
//! [`DrainState::fire`]; everything that waits for one (the `drained()`
//! futures, `interval` timers, `http::serve`) holds a receiver. This module
//! never decides *when* to drain.

use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// Why this worker is draining.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DrainCause {
    /// The supervisor told this generation to drain: a newer one is ready,
    /// this one failed to start, or baton is stopping. It kills the worker
    /// once `timeout` has passed.
    Supervisor {
        /// How long the supervisor waits before it kills the worker.
        timeout: Duration,
    },
    /// The worker channel closed: the supervisor is gone.
    ChannelClosed,
    /// The process received this signal (`SIGTERM` or `SIGINT`).
    Signal(&'static str),
}

impl fmt::Display for DrainCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DrainCause::Supervisor { timeout } => write!(
                f,
                "the supervisor asked (killing in {}ms)",
                timeout.as_millis()
            ),
            DrainCause::ChannelClosed => f.write_str("the worker channel closed"),
            DrainCause::Signal(name) => write!(f, "{name}"),
        }
    }
}

/// A drain that has begun.
#[derive(Debug, Clone)]
pub(crate) struct Draining {
    pub(crate) cause: DrainCause,
    /// When the supervisor kills the worker, if it said.
    pub(crate) deadline: Option<Instant>,
}

type Hook = Box<dyn FnOnce() + Send + 'static>;

#[derive(Default)]
struct Hooks {
    pending: Vec<Hook>,
    /// Set when the drain began and `pending` was taken: later hooks run at
    /// once.
    fired: bool,
}

/// The drain state of one worker.
pub(crate) struct DrainState {
    /// Sent once, by [`fire`](Self::fire); every `drained()` future and
    /// timer holds a receiver. It lives as long as the worker's shared
    /// state, so a receiver sees it closed only when the runtime is gone.
    tx: watch::Sender<Option<Draining>>,
    hooks: Mutex<Hooks>,
}

impl fmt::Debug for DrainState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DrainState")
            .field("draining", &*self.tx.borrow())
            .finish_non_exhaustive()
    }
}

impl DrainState {
    pub(crate) fn new() -> DrainState {
        DrainState {
            tx: watch::channel(None).0,
            hooks: Mutex::default(),
        }
    }

    /// Begins the drain, unless it has begun already: wakes every waiter,
    /// then runs the hooks in the order they were added. Returns whether
    /// this call began it.
    pub(crate) fn fire(&self, cause: DrainCause, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        let began = self.tx.send_if_modified(|state| {
            if state.is_some() {
                return false;
            }
            *state = Some(Draining { cause, deadline });
            true
        });
        if began {
            if let Some(d) = &*self.tx.borrow() {
                tracing::info!("draining: {}", d.cause);
            }
            let pending = {
                let mut hooks = self.hooks.lock().unwrap_or_else(PoisonError::into_inner);
                hooks.fired = true;
                std::mem::take(&mut hooks.pending)
            };
            for hook in pending {
                hook();
            }
        }
        began
    }

    /// Adds a hook; runs it at once if the drain has begun.
    pub(crate) fn on_drain(&self, hook: Hook) {
        let mut hooks = self.hooks.lock().unwrap_or_else(PoisonError::into_inner);
        if hooks.fired {
            drop(hooks);
            hook();
        } else {
            hooks.pending.push(hook);
        }
    }

    /// The drain, if it has begun.
    pub(crate) fn current(&self) -> Option<Draining> {
        self.tx.borrow().clone()
    }

    /// A receiver for the drain.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Option<Draining>> {
        self.tx.subscribe()
    }
}

/// Resolves when the drain has begun (or its sender is gone, which only
/// happens when the runtime shuts down).
pub(crate) async fn wait(mut rx: watch::Receiver<Option<Draining>>) {
    let _ = rx.wait_for(Option::is_some).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn fires_once_and_runs_hooks_in_order_even_late_ones() {
        let state = DrainState::new();
        let log = Arc::new(Mutex::new(Vec::new()));
        for i in 0..3 {
            let log = log.clone();
            state.on_drain(Box::new(move || log.lock().unwrap().push(i)));
        }
        assert!(state.current().is_none());
        assert!(state.fire(DrainCause::ChannelClosed, None));
        assert!(!state.fire(DrainCause::Signal("SIGTERM"), None));
        assert_eq!(state.current().unwrap().cause, DrainCause::ChannelClosed);
        let late = log.clone();
        state.on_drain(Box::new(move || late.lock().unwrap().push(9)));
        assert_eq!(*log.lock().unwrap(), [0, 1, 2, 9]);
    }

    #[test]
    fn the_deadline_follows_the_timeout() {
        let state = DrainState::new();
        let before = Instant::now();
        state.fire(
            DrainCause::Supervisor {
                timeout: Duration::from_secs(30),
            },
            Some(Duration::from_secs(30)),
        );
        let deadline = state.current().unwrap().deadline.unwrap();
        assert!(deadline >= before + Duration::from_secs(30));
        assert!(deadline <= Instant::now() + Duration::from_secs(30));
    }
}
