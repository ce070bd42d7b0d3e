//! The supervisor's event loop: the one owner of the generation table.
//!
//! Signals, child exits, worker notify sockets, worker channels, the control
//! socket and timers all become [`Event`]s on one queue; [`Supervisor`]
//! reacts to them one at a time, so no lock guards any state. It decides;
//! its [`Host`] does (starts, signals, sends, arms timers), so the whole
//! machine runs in unit tests with a fake host (`tests.rs`).
//!
//! One room per concern: `reload.rs` is the reload (and crash restart) from
//! trigger to outcome, with where it stands as one `Step`; `restart.rs` is
//! the crash restart beside it; `handoff.rs` is
//! kept values (freeze, snapshot, thaw, checkpoints); `lifecycle.rs` is
//! drains, stops, exits and deadlines; `messages.rs` is what workers say;
//! `upgrade.rs` is an upgrade of baton itself (the table exported to, and
//! rebuilt from, the hand-over state).
//! Generation phases change only in those `impl Supervisor` blocks.
//!
//! The reload sequence (docs/design.md, "Generation lifecycle"): a trigger starts
//! generation N+1 beside the serving N; when N+1 is ready, N is told to
//! drain; if N+1 exits, times out or speaks malformed protocol first, it is
//! drained and killed and N serves on untouched. The old generation is never
//! told to drain before the new one is ready.

mod failure;
mod handoff;
mod lifecycle;
mod messages;
mod reload;
mod restart;
mod steer;
#[cfg(test)]
mod tests;
mod upgrade;

use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::{mpsc, oneshot, watch};

use crate::api::{self, Reply, Request};
use crate::event::Event;
use crate::generations::{Generation, Generations, Phase};
use crate::host::Host;
use crate::listener::ListenSpec;
use crate::metrics::Metrics;
use crate::spawn::WorkerCommand;
use crate::state::Snapshot;

use reload::Reloads;
use upgrade::Upgrades;

/// How a plain worker (one that does not notify) is judged ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// `READY=1` on `NOTIFY_SOCKET`, or the SDK's `ready()`.
    Notify,
    /// Also ready once alive for this long, whichever comes first.
    After(Duration),
}

/// Everything `baton run` was told.
#[derive(Debug, Clone)]
pub struct Config {
    /// The listeners, in `--listen` order.
    pub listeners: Vec<ListenSpec>,
    /// The worker command.
    pub command: WorkerCommand,
    /// The control socket's path.
    pub control: PathBuf,
    /// How long a new generation may take to become ready.
    pub ready_timeout: Duration,
    /// How readiness is judged.
    pub readiness: Readiness,
    /// The signal that makes a plain worker drain.
    pub drain_signal: Signal,
    /// How long a draining generation may take before SIGKILL.
    pub drain_timeout: Duration,
    /// How many old generations may drain at once; further reloads wait.
    pub max_draining: usize,
    /// Paths whose changes trigger a reload (`--watch`).
    pub watch: Vec<PathBuf>,
    /// Quiet time that ends a burst of file changes (`--debounce`).
    pub debounce: Duration,
    /// A shell command run before every reload; if it fails, no reload.
    pub build: Option<String>,
    /// `--user`: run workers (and the build) as this user.
    pub user: Option<String>,
    /// `--group`: run workers (and the build) with this group.
    pub group: Option<String>,
    /// `--max-state`: the largest snapshot of kept values accepted, in bytes.
    pub max_state: u64,
    /// `--freeze-timeout`: how long a generation may stay frozen for a
    /// successor that is not ready yet (nobody accepts meanwhile).
    pub freeze_timeout: Duration,
    /// `--freeze-grace`: how long a frozen generation waits for its
    /// requests in flight before it writes its snapshot.
    pub freeze_grace: Duration,
    /// `--stop-timeout`: how long a whole stop may take before every worker
    /// left is killed.
    pub stop_timeout: Option<Duration>,
    /// `--metrics`: where to serve Prometheus metrics.
    pub metrics: Option<std::net::SocketAddr>,
    /// `--steer-grace` with `--steer` (`None`: no steering): how long a
    /// replaced generation gets no new connections before it is told to
    /// drain.
    pub steer_grace: Option<Duration>,
}

/// How the loop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stopped, every worker drained (or killed on request).
    Stopped,
    /// `--stop-timeout` ran out and the workers left were killed.
    StopTimedOut(Duration),
    /// The first generation never served.
    FirstGenerationFailed(String),
    /// An upgrade's pre-flight passed: the caller quiets the control
    /// socket, then calls [`Supervisor::exec_upgrade`] and serves again if
    /// that returns.
    Upgrade,
}

/// The state the event loop owns.
pub struct Supervisor<H: Host> {
    config: Config,
    host: H,
    generations: Generations,
    next_generation: u64,
    /// The reload in progress, the queued one, the crash restart, results.
    reloads: Reloads,
    stopping: bool,
    /// Answered once everything has exited.
    stop_waiters: Vec<oneshot::Sender<Reply>>,
    /// Set when the first generation failed: `serve` returns it.
    fatal: Option<String>,
    /// The latest kept values: a frozen snapshot or a checkpoint. A crash
    /// restart starts from it.
    kept: Option<Snapshot>,
    /// What `--metrics` shows; published after every event.
    metrics: Metrics,
    /// Where the metrics go (`None`: nobody asked for them).
    publish: Option<watch::Sender<Metrics>>,
    /// `--stop-timeout` ran out.
    stop_timed_out: bool,
    /// Upgrades of baton itself.
    upgrades: Upgrades,
}

impl<H: Host> Supervisor<H> {
    /// A supervisor with no generation yet; [`Supervisor::start`] starts
    /// the first.
    pub fn new(config: Config, host: H) -> Supervisor<H> {
        Supervisor {
            config,
            host,
            generations: Generations::default(),
            next_generation: 1,
            reloads: Reloads::default(),
            stopping: false,
            stop_waiters: Vec::new(),
            fatal: None,
            kept: None,
            metrics: Metrics::default(),
            publish: None,
            stop_timed_out: false,
            upgrades: Upgrades::default(),
        }
    }

    /// Starts from kept values a crashed baton left (systemd's store): the
    /// first generation gets them, as a crash restart would.
    pub fn adopt_kept(&mut self, kept: Option<Snapshot>) {
        if kept.is_some() {
            self.kept = kept;
        }
    }

    /// Publishes the metrics to `publish` after every event.
    pub fn publish_metrics(&mut self, publish: watch::Sender<Metrics>) {
        self.publish = Some(publish);
        self.publish();
    }

    /// Sends the current metrics to whoever serves them.
    fn publish(&mut self) {
        let Some(publish) = &self.publish else {
            return;
        };
        let m = &mut self.metrics;
        m.serving_generation = self.generations.serving();
        m.workers = [Phase::Starting, Phase::Serving, Phase::Draining]
            .map(|p| self.generations.numbers_in(p).len() as u64);
        m.kept_bytes = self.kept.as_ref().map(|k| k.bytes);
        m.stopping = self.stopping;
        publish.send_if_modified(|old| {
            let changed = *old != *m;
            if changed {
                old.clone_from(m);
            }
            changed
        });
    }

    /// Starts the first generation.
    pub fn start(&mut self) {
        self.begin_reload(reload::Purpose::First, Vec::new());
    }

    /// Whether everything has exited after a stop: the loop is over.
    pub fn is_done(&self) -> bool {
        self.stopping && self.generations.is_empty()
    }

    /// Handles events until every generation has exited after a stop, or
    /// an upgrade is due ([`Outcome::Upgrade`]: call `serve` again after).
    pub async fn serve(&mut self, events: &mut mpsc::Receiver<Event>) -> Outcome {
        while !self.is_done() {
            if self.upgrade_due() {
                return Outcome::Upgrade;
            }
            // The host holds a sender itself, so the queue never closes.
            let Some(event) = events.recv().await else {
                break;
            };
            self.handle(event);
        }
        self.finish()
    }

    /// Answers the stop's waiters, and says how the loop ended.
    fn finish(&mut self) -> Outcome {
        for waiter in self.stop_waiters.drain(..) {
            let _ = waiter.send(Reply::Stopped);
        }
        match (self.fatal.take(), self.config.stop_timeout) {
            (Some(reason), _) => Outcome::FirstGenerationFailed(reason),
            (None, Some(limit)) if self.stop_timed_out => Outcome::StopTimedOut(limit),
            (None, _) => {
                tracing::info!("every generation has exited; baton stops");
                Outcome::Stopped
            }
        }
    }

    /// Reacts to one event.
    pub fn handle(&mut self, event: Event) {
        self.react(event);
        self.advance_upgrade();
        self.publish();
    }

    fn react(&mut self, event: Event) {
        match event {
            Event::Reload => {
                tracing::info!("SIGHUP: reloading");
                self.request_reload(None);
            }
            Event::Signal(Signal::SIGQUIT) => {
                tracing::warn!("SIGQUIT: killing every generation now");
                self.begin_stop();
                self.kill_all();
            }
            Event::Signal(signal) if self.stopping => {
                tracing::warn!("{signal} while stopping: killing every generation now");
                self.kill_all();
            }
            Event::Signal(signal) => {
                tracing::info!("{signal}: stopping");
                self.begin_stop();
            }
            Event::Child => {
                for (pid, exit) in self.host.reap() {
                    self.on_exit(pid, exit);
                }
            }
            Event::Notify {
                generation,
                message,
            } => self.on_notify(generation, message),
            Event::Channel {
                generation,
                message,
                fds,
            } => self.on_channel(generation, message, fds),
            Event::Control { request, reply } => self.on_control(request, reply),
            Event::Timer { generation, timer } => self.on_timer(generation, timer),
            Event::FilesChanged { paths } => {
                let mut names: Vec<String> = paths
                    .iter()
                    .take(3)
                    .map(|p| p.display().to_string())
                    .collect();
                if paths.len() > 3 {
                    names.push(format!("and {} more", paths.len() - 3));
                }
                tracing::info!("files changed ({}): reloading", names.join(", "));
                self.request_reload(None);
            }
            Event::BuildOutput { generation, tail } => self.on_build_output(generation, tail),
            Event::BuildOutputLate { generation } => self.on_build_output_late(generation),
            Event::RestartDue { seq } => self.on_restart_due(seq),
            Event::Upgrade { binary, client } => self.request_upgrade(binary, client),
            Event::PreflightTimeout { seq } => self.on_preflight_timeout(seq),
            Event::StopTimeout => self.on_stop_timeout(),
        }
    }

    fn on_control(&mut self, request: Request, reply: oneshot::Sender<Reply>) {
        match request {
            Request::Status => {
                let _ = reply.send(Reply::Status(Box::new(self.status())));
            }
            Request::Reload { wait } => {
                tracing::info!("reload requested on the control socket");
                if self.stopping {
                    let _ = reply.send(Reply::Refused("baton is stopping".into()));
                } else if wait {
                    self.request_reload(Some(reply));
                } else {
                    self.request_reload(None);
                    let _ = reply.send(Reply::Queued);
                }
            }
            Request::Stop { now } => {
                tracing::info!(
                    "stop{} requested on the control socket",
                    if now { " --now" } else { "" }
                );
                self.stop_waiters.push(reply);
                self.begin_stop();
                if now {
                    self.kill_all();
                }
            }
            Request::Upgrade { binary, .. } => {
                if self.stopping {
                    let _ = reply.send(Reply::Refused("baton is stopping".into()));
                } else {
                    self.request_upgrade(binary, None);
                    let _ = reply.send(Reply::Queued);
                }
            }
        }
    }

    /// What `baton status` shows.
    pub fn status(&self) -> api::Status {
        let generations = self
            .generations
            .iter()
            .map(|g| api::GenerationStatus {
                generation: g.number,
                state: g.phase,
                pids: vec![g.pid.as_raw()],
                age_ms: g.started.elapsed().as_millis() as u64,
                sdk: g.speaks_protocol,
                frozen: g.frozen,
                status: g.status.clone(),
            })
            .collect();
        api::Status {
            pid: std::process::id(),
            generation: self.generations.serving(),
            generations,
            last_reload: self.reloads.last.clone(),
            reloads: self.reloads.counts,
            reload_queued: self.reloads.queued.is_some(),
            reloading: self.reloads.in_flight.as_ref().map(|f| api::Reloading {
                generation: f.generation,
                step: f.step.name(),
                ms: f.started.elapsed().as_millis() as u64,
            }),
            restarting: self
                .reloads
                .restart
                .starting
                .map(|(number, started)| api::Restarting {
                    generation: number,
                    ms: started.elapsed().as_millis() as u64,
                }),
            stopping: self.stopping,
            listeners: self.host.listeners(),
            kept: self.kept.as_ref().map(|k| api::KeptStatus {
                generation: k.generation,
                bytes: k.bytes,
            }),
            version: env!("CARGO_PKG_VERSION").into(),
            upgrades: self.upgrades.counts,
            last_upgrade: self.upgrades.last.clone(),
            upgrading: self.upgrading(),
        }
    }

    /// Generation `number` of worker `pid` has started: it is in the table,
    /// starting, with its start-up deadlines armed.
    fn add_generation(&mut self, number: u64, pid: nix::unistd::Pid) {
        tracing::info!(
            "generation {number} started (pid {pid}): {}",
            self.config.command.program.to_string_lossy()
        );
        self.generations.insert(Generation::starting(number, pid));
        self.arm(
            number,
            self.config.ready_timeout,
            crate::event::Timer::ReadyTimeout,
        );
        if let Readiness::After(d) = self.config.readiness {
            self.arm(number, d, crate::event::Timer::ReadyAfter);
        }
    }

    /// Arms deadline `timer` of generation `number`, owned by it.
    fn arm(&mut self, number: u64, delay: Duration, timer: crate::event::Timer) {
        let id = self.host.arm(
            delay,
            Event::Timer {
                generation: number,
                timer,
            },
        );
        match self.generations.get_mut(number) {
            Some(g) => g.timers.push(crate::generations::Deadline {
                id,
                timer,
                at: std::time::Instant::now() + delay,
            }),
            None => self.host.cancel(id),
        }
    }

    /// Whether generation `number` is in `phase`.
    fn is(&self, number: u64, phase: Phase) -> bool {
        self.generations.is(number, phase)
    }
}
