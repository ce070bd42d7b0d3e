//! The supervisor's event loop: the one owner of the generation table.
//!
//! Signals, child exits, worker notify sockets, worker channels, the control
//! socket and timers all become [`Event`]s on one queue; [`Supervisor`] reacts
//! to them one at a time, so no lock guards any state. Generation phases are
//! the [`Phase`] enum, and they change only in the `on_*`/`begin_*` methods
//! here.
//!
//! The reload sequence (DESIGN.md, "Generation lifecycle"): a trigger starts
//! generation N+1 beside the serving N; when N+1 is ready, N is told to drain;
//! if N+1 exits, times out or speaks malformed protocol first, it is drained
//! and killed and N serves on untouched. Triggers during a reload coalesce
//! into one queued reload. The old generation is never told to drain before
//! the new one is ready.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_worker::protocol::{
    self, ProtocolError, StateSource, SupervisorMessage, WorkerMessage, PROTOCOL_VERSION,
};
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde_json::{json, Value};
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};

use crate::control::{self, ControlSocket, Request};
use crate::listener::{Activated, ListenSpec, Listener};
use crate::notify::{self, NotifyMessage, Systemd};
use crate::spawn::{Launcher, RunAs, WorkerCommand};
use crate::state::{self, Snapshot};
use crate::watch;
use crate::Error;

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
}

/// Something the loop reacts to. Every source of change sends one of these.
#[derive(Debug)]
pub enum Event {
    /// SIGHUP: reload.
    Reload,
    /// SIGTERM or SIGINT: drain everything and exit (a second one: kill now).
    Signal(Signal),
    /// SIGCHLD: one or more children changed state.
    Child,
    /// A datagram on a worker's notify socket.
    Notify {
        /// The generation whose socket it arrived on.
        generation: u64,
        /// What it said.
        message: NotifyMessage,
    },
    /// A message (or a protocol error) on a worker's channel.
    Channel {
        /// The generation whose channel it arrived on.
        generation: u64,
        /// The message, or why it could not be read.
        message: Result<WorkerMessage, ProtocolError>,
        /// Descriptors that came with it (a snapshot's memfd).
        fds: Vec<OwnedFd>,
    },
    /// A request on the control socket, with where to send the answer.
    Control {
        /// The request.
        request: Request,
        /// Dropping it answers "baton is shutting down".
        reply: oneshot::Sender<Value>,
    },
    /// A deadline of one generation passed.
    Timer {
        /// The generation it belongs to.
        generation: u64,
        /// Which deadline.
        timer: Timer,
    },
    /// Watched files changed (after the debounce).
    FilesChanged {
        /// What changed, deduplicated.
        paths: Vec<PathBuf>,
    },
    /// The `--build` command's output ended (it exited, or closed it).
    BuildOutput {
        /// The generation the build was for.
        generation: u64,
        /// The last lines it printed.
        tail: String,
    },
    /// The build exited a second ago and its output is still open.
    BuildOutputLate {
        /// The generation the build was for.
        generation: u64,
    },
    /// The back-off after a crash is over; `seq` tells stale ones apart.
    RestartDue {
        /// The restart this timer was armed for.
        seq: u64,
    },
}

/// The deadlines a generation can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    /// `--ready-timeout` passed.
    ReadyTimeout,
    /// `--ready after:DUR` passed.
    ReadyAfter,
    /// `--drain-timeout` passed.
    DrainTimeout,
    /// `--freeze-timeout` passed since this generation's predecessor froze.
    FreezeTimeout,
}

/// Where a generation is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Started, not yet ready; the previous generation still serves.
    Starting,
    /// Ready and serving; the newest serving generation is "the" generation.
    Serving,
    /// Told to finish in-flight work and exit; killed at its deadline.
    Draining,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Serving => "serving",
            Phase::Draining => "draining",
        }
    }
}

/// Why a generation was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// The first generation: its failure ends `baton run`.
    First,
    /// A reload of a serving generation.
    Reload,
}

/// One started worker process.
#[derive(Debug)]
struct Generation {
    number: u64,
    pid: Pid,
    phase: Phase,
    started: Instant,
    /// When it became ready, if it did.
    serving_since: Option<Instant>,
    /// When it was told to drain, if it was.
    draining_since: Option<Instant>,
    /// The supervisor's end of the worker channel; the reader task holds a
    /// clone and ends when the socket reports an error or hang-up.
    channel: Arc<AsyncFd<OwnedFd>>,
    /// The worker said `hello`: it drains by message, not by signal.
    speaks_protocol: bool,
    /// Told to freeze for a successor that is not ready yet.
    frozen: bool,
    /// Said ready while its kept values were still on their way: becomes
    /// ready once they have been sent.
    ready_pending: bool,
    /// The last `STATUS=` it reported.
    status: Option<String>,
    /// It was sent kept values (a snapshot or a checkpoint).
    took_state: bool,
    /// Its notify socket's file, removed with the generation.
    _notify_file: crate::spawn::SocketFile,
    /// Why it could not exec, once it has exited.
    report: crate::sys::ExecReport,
    /// Reader tasks, aborted when the generation is gone.
    tasks: Vec<tokio::task::AbortHandle>,
    /// Pending deadlines (ready, freeze, drain): the start-up ones are
    /// aborted once it is ready, all of them once it is gone, so a reload
    /// leaves no sleeping task behind.
    timers: Vec<tokio::task::AbortHandle>,
}

/// The reload (or start, or restart) in progress: building, or its
/// generation starting.
#[derive(Debug)]
struct InFlight {
    generation: u64,
    purpose: Purpose,
    started: Instant,
    waiters: Vec<oneshot::Sender<Value>>,
    /// The `--build` command, while it runs; the generation is started once
    /// it has succeeded.
    build: Option<Build>,
}

/// A running `--build` command. It is over when both its exit and the end of
/// its output have been seen.
#[derive(Debug)]
struct Build {
    pid: Pid,
    /// Why `sh` could not exec, once it has exited.
    report: crate::sys::ExecReport,
    /// The task reading its output; dropped if the output outlives it.
    reader: tokio::task::AbortHandle,
    started: Instant,
    exit: Option<Result<(), String>>,
    tail: Option<String>,
}

/// A freeze in progress: `from` serves, frozen, until `to` is ready (then
/// `from` drains) or fails (then `from` thaws).
#[derive(Debug, Clone, Copy)]
struct Handoff {
    from: u64,
    to: u64,
    /// `to` has been sent its `State`.
    answered: bool,
    /// When `from` was told to freeze: it stopped accepting then.
    since: Instant,
}

/// How the last reload ended, for `status` and `reload --wait`.
#[derive(Debug, Clone)]
struct ReloadResult {
    generation: u64,
    ok: bool,
    error: Option<String>,
    ms: u64,
    /// For a hand-over of kept values: how long no generation accepted,
    /// from the freeze of the old one to the new one's readiness.
    pause_ms: Option<f64>,
}

/// The state the event loop owns.
struct Supervisor {
    config: Config,
    listeners: Vec<Listener>,
    launcher: Launcher,
    /// The loop's own sender, cloned into every task it starts.
    events: mpsc::Sender<Event>,
    systemd: Systemd,
    generations: BTreeMap<u64, Generation>,
    next_generation: u64,
    in_flight: Option<InFlight>,
    /// A reload asked for while another runs: at most one, with every waiter.
    queued: Option<Vec<oneshot::Sender<Value>>>,
    last_reload: Option<ReloadResult>,
    reloads_ok: u64,
    reloads_failed: u64,
    restart_delay: Duration,
    restart_seq: u64,
    /// A restart's back-off timer runs (the one numbered `restart_seq`).
    restart_armed: bool,
    /// The generation started to replace a crashed serving one, while it
    /// starts. It starts beside any reload in progress: a reload may build
    /// for minutes, and nothing accepts meanwhile.
    restarting: Option<(u64, Instant)>,
    stopping: bool,
    /// Answered once everything has exited.
    stop_waiters: Vec<oneshot::Sender<Value>>,
    /// Set when the first generation failed: `run` returns it.
    fatal: Option<String>,
    /// Set once the first generation served; systemd's first READY=1.
    ever_served: bool,
    /// The freeze in progress, if any.
    handoff: Option<Handoff>,
    /// The latest kept values: a frozen snapshot or a checkpoint. A crash
    /// restart starts from it.
    kept: Option<Snapshot>,
}

/// Smallest and largest delay before restarting a crashed worker.
const RESTART_MIN: Duration = Duration::from_millis(100);
const RESTART_MAX: Duration = Duration::from_secs(10);
/// A worker that served this long before crashing restarts without delay
/// growth: its crash is news, not a loop.
const HEALTHY_FOR: Duration = Duration::from_secs(10);

/// Runs `baton run` to the end: binds, starts generation 1, serves events
/// until stopped. Returns an error if the first generation never serves.
pub async fn run(config: Config) -> Result<(), Error> {
    for (i, spec) in config.listeners.iter().enumerate() {
        if config.listeners[..i].iter().any(|s| s.name == spec.name) {
            return Err(Error::Usage(format!(
                "--listen {}={}: the name `{}` is given twice; workers find listeners by \
                 name, so each needs its own",
                spec.name, spec.addr, spec.name
            )));
        }
    }
    let mut activated = Activated::from_env();
    let listeners = config
        .listeners
        .iter()
        .map(|spec| Listener::bind(spec, &mut activated))
        .collect::<Result<Vec<_>, _>>()?;
    let unused = activated.unused();
    if !unused.is_empty() {
        tracing::warn!(
            "systemd passed sockets no --listen NAME=systemd asks for: {}; closing them",
            unused.join(", ")
        );
    }
    drop(activated);
    let run_as = RunAs::resolve(config.user.as_deref(), config.group.as_deref())?;
    let mut control = ControlSocket::bind(&config.control)?;
    let io = |context: &str, source: std::io::Error| Error::Io {
        context: context.to_owned(),
        source,
    };
    let run_parent = control
        .path()
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."))
        .to_path_buf();
    if let Some(r) = &run_as {
        tracing::info!("workers run as {}", r.describe());
    }
    let launcher = Launcher::new(config.command.clone(), &run_parent, run_as)?;
    // Orphaned grandchildren of workers are re-parented to us and reaped.
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!("becoming a child subreaper: {e}; orphans of workers go to init");
    }

    let (tx, rx) = mpsc::channel(256);
    // Whoever started baton may have blocked signals (an ignored one is
    // replaced by the handlers below); baton must hear them all.
    nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    )
    .map_err(|e| io("unblocking signals", e.into()))?;
    // Signals are registered before any child exists, so no exit is missed.
    let signals: [(SignalKind, fn() -> Event); 4] = [
        (SignalKind::hangup(), || Event::Reload),
        (SignalKind::terminate(), || Event::Signal(Signal::SIGTERM)),
        (SignalKind::interrupt(), || Event::Signal(Signal::SIGINT)),
        (SignalKind::child(), || Event::Child),
    ];
    for (kind, event) in signals {
        let mut stream = signal(kind).map_err(|e| io("installing signal handlers", e))?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if tx.send(event()).await.is_err() {
                    return;
                }
            }
        });
    }
    control.serve(tx.clone())?;
    let _watcher = if config.watch.is_empty() {
        None
    } else {
        let w = watch::start(&config.watch, config.debounce, tx.clone())?;
        tracing::info!(
            "watching {} (reload after {} of quiet)",
            config
                .watch
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            humantime::format_duration(config.debounce)
        );
        Some(w)
    };
    for l in &listeners {
        tracing::info!("listener `{}` on {}", l.name, l.bound);
    }
    tracing::info!("control socket {}", control.path().display());

    let mut supervisor = Supervisor {
        config,
        listeners,
        launcher,
        events: tx,
        systemd: Systemd::from_env(),
        generations: BTreeMap::new(),
        next_generation: 1,
        in_flight: None,
        queued: None,
        last_reload: None,
        reloads_ok: 0,
        reloads_failed: 0,
        restart_delay: RESTART_MIN,
        restart_seq: 0,
        restart_armed: false,
        restarting: None,
        stopping: false,
        stop_waiters: Vec::new(),
        fatal: None,
        ever_served: false,
        handoff: None,
        kept: None,
    };
    supervisor.begin_reload(Purpose::First, Vec::new());
    let result = supervisor.serve(rx).await;
    control.finish(Duration::from_secs(1)).await;
    result
}

impl Supervisor {
    async fn serve(&mut self, mut rx: mpsc::Receiver<Event>) -> Result<(), Error> {
        while !(self.stopping && self.generations.is_empty()) {
            // The loop holds a sender itself, so the queue never closes.
            let Some(event) = rx.recv().await else { break };
            self.handle(event);
        }
        let answer = json!({ "ok": true, "stopped": true });
        for waiter in self.stop_waiters.drain(..) {
            let _ = waiter.send(answer.clone());
        }
        match self.fatal.take() {
            Some(reason) => Err(Error::FirstGeneration(reason)),
            None => {
                tracing::info!("every generation has exited; baton stops");
                Ok(())
            }
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Reload => {
                tracing::info!("SIGHUP: reloading");
                self.request_reload(None);
            }
            Event::Signal(signal) if self.stopping => {
                tracing::warn!("{signal} while stopping: killing every generation now");
                self.kill_all();
            }
            Event::Signal(signal) => {
                tracing::info!("{signal}: stopping");
                self.begin_stop();
            }
            Event::Child => self.reap(),
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
            Event::BuildOutputLate { generation } => {
                if let Some(build) = self
                    .in_flight
                    .as_mut()
                    .filter(|f| f.generation == generation)
                    .and_then(|f| f.build.as_mut())
                    .filter(|b| b.tail.is_none())
                {
                    build.reader.abort();
                    build.tail =
                        Some("(its output is still held open by a process it left behind)".into());
                    self.finish_build();
                }
            }
            Event::BuildOutput { generation, tail } => {
                if let Some(build) = self
                    .in_flight
                    .as_mut()
                    .filter(|f| f.generation == generation)
                    .and_then(|f| f.build.as_mut())
                {
                    build.tail = Some(tail);
                    self.finish_build();
                }
            }
            Event::RestartDue { seq } if seq == self.restart_seq => {
                self.restart_armed = false;
                if !self.stopping
                    && self.restarting.is_none()
                    && self.serving_generation().is_none()
                {
                    self.start_restart();
                }
            }
            Event::RestartDue { .. } => {}
        }
    }

    // ---- triggers -------------------------------------------------------

    fn on_control(&mut self, request: Request, reply: oneshot::Sender<Value>) {
        match request {
            Request::Status => {
                let _ = reply.send(self.status());
            }
            Request::Reload { wait } => {
                tracing::info!("reload requested on the control socket");
                if wait {
                    self.request_reload(Some(reply));
                } else if self.stopping {
                    let _ = reply.send(control::error("baton is stopping"));
                } else {
                    self.request_reload(None);
                    let _ = reply.send(json!({ "ok": true, "queued": true }));
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
        }
    }

    /// Starts a reload now, or queues one (coalescing with any queued one).
    fn request_reload(&mut self, waiter: Option<oneshot::Sender<Value>>) {
        if self.stopping {
            if let Some(w) = waiter {
                let _ = w.send(control::error("baton is stopping"));
            }
            return;
        }
        let queued = self.queued.get_or_insert_with(Vec::new);
        queued.extend(waiter);
        self.start_queued();
    }

    /// Starts the queued reload if nothing blocks it: no generation starting
    /// and fewer than `--max-draining` draining.
    fn start_queued(&mut self) {
        if self.stopping || self.in_flight.is_some() || self.queued.is_none() {
            return;
        }
        let draining = self
            .generations
            .values()
            .filter(|g| g.phase == Phase::Draining)
            .count();
        if draining >= self.config.max_draining {
            tracing::info!(
                "reload waits: {draining} old generations are still draining \
                 (at most {} at once)",
                self.config.max_draining
            );
            return;
        }
        let waiters = self.queued.take().unwrap_or_default();
        // A triggered reload is a reload (it builds, systemd hears of it)
        // even while a crashed worker waits for its restart or restarts.
        let purpose = if self.ever_served {
            Purpose::Reload
        } else {
            Purpose::First
        };
        self.begin_reload(purpose, waiters);
    }

    // ---- starting -------------------------------------------------------

    /// Starts a reload (or the first start): the build first if there is
    /// one, then the new generation.
    fn begin_reload(&mut self, purpose: Purpose, waiters: Vec<oneshot::Sender<Value>>) {
        let number = self.next_generation;
        self.next_generation += 1;
        if purpose == Purpose::Reload {
            self.systemd
                .reloading(&format!("reloading to generation {number}"));
        }
        self.in_flight = Some(InFlight {
            generation: number,
            purpose,
            started: Instant::now(),
            waiters,
            build: None,
        });
        match self.config.build.clone() {
            Some(script) => self.start_build(number, &script),
            None => self.spawn_generation(number),
        }
    }

    /// Runs `--build` for generation `number`, its output to a pipe whose
    /// reader keeps the tail and echoes it to baton's stderr.
    fn start_build(&mut self, number: u64, script: &str) {
        let pipe = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| format!("creating a pipe for the build: {e}"));
        let started = pipe.and_then(|(read, write)| {
            let pid = self
                .launcher
                .build(script, write.as_fd())
                .map_err(|e| e.to_string())?;
            drop(write);
            Ok((pid, read))
        });
        match started {
            Ok(((pid, report), read)) => {
                tracing::info!("building: {script} (pid {pid})");
                let reader = tokio::spawn(read_build_output(number, read, self.events.clone()))
                    .abort_handle();
                if let Some(f) = self.in_flight.as_mut() {
                    f.build = Some(Build {
                        pid,
                        report,
                        reader,
                        started: Instant::now(),
                        exit: None,
                        tail: None,
                    });
                }
            }
            Err(e) => self.finish_in_flight(number, Err(format!("build `{script}`: {e}"))),
        }
    }

    /// Once the build has exited and its output ended: start the generation
    /// if it succeeded, else fail the reload with the output's tail.
    fn finish_build(&mut self) {
        let Some(f) = self.in_flight.as_mut() else {
            return;
        };
        let done = f
            .build
            .as_ref()
            .is_some_and(|b| b.exit.is_some() && b.tail.is_some());
        if !done {
            return;
        }
        let number = f.generation;
        let Some(Build {
            exit: Some(exit),
            tail: Some(tail),
            started,
            ..
        }) = f.build.take()
        else {
            return;
        };
        let took =
            humantime::format_duration(Duration::from_millis(started.elapsed().as_millis() as u64));
        let script = self.config.build.clone().unwrap_or_default();
        match exit {
            Ok(()) => {
                tracing::info!("build succeeded in {took}");
                self.spawn_generation(number);
            }
            Err(how) => {
                let reason =
                    format!("build `{script}` {how} after {took}; its output ends:\n{tail}");
                self.finish_in_flight(number, Err(reason));
            }
        }
    }

    /// Starts generation `number`, the in-flight reload's.
    fn spawn_generation(&mut self, number: u64) {
        if self.in_flight.as_ref().map(|f| f.generation) != Some(number) {
            return;
        }
        if let Err(reason) = self.spawn(number) {
            self.finish_in_flight(number, Err(reason));
        }
    }

    /// Starts a generation to replace the serving one that crashed, without
    /// building: it reruns what served.
    fn start_restart(&mut self) {
        let number = self.next_generation;
        self.next_generation += 1;
        match self.spawn(number) {
            Ok(()) => self.restarting = Some((number, Instant::now())),
            Err(reason) => {
                tracing::error!("restarting the worker as generation {number}: {reason}");
                self.schedule_restart();
            }
        }
    }

    /// Starts generation `number`'s worker and puts it in the table,
    /// starting, with its deadlines armed.
    fn spawn(&mut self, number: u64) -> Result<(), String> {
        let started = Instant::now();
        let spawned = self
            .launcher
            .worker(number, &self.listeners)
            .map_err(|e| format!("{e:#}"))?;
        let channel = match crate::sys::async_fd(spawned.channel) {
            Ok(fd) => Arc::new(fd),
            Err(e) => {
                // Without a channel we cannot watch it; stop it again (the
                // reaper collects it: it is nobody's generation).
                let _ = killpg(spawned.pid, Signal::SIGKILL);
                return Err(format!("watching its channel: {e}"));
            }
        };
        tracing::info!(
            "generation {number} started (pid {}): {}",
            spawned.pid,
            self.config.command.program.to_string_lossy()
        );
        let tasks = vec![
            tokio::spawn(notify::read_worker_notify(
                number,
                spawned.notify,
                spawned.notify_uid,
                self.events.clone(),
            ))
            .abort_handle(),
            tokio::spawn(read_channel(number, channel.clone(), self.events.clone())).abort_handle(),
        ];
        self.generations.insert(
            number,
            Generation {
                number,
                pid: spawned.pid,
                phase: Phase::Starting,
                started,
                serving_since: None,
                draining_since: None,
                channel,
                speaks_protocol: false,
                frozen: false,
                ready_pending: false,
                status: None,
                took_state: false,
                _notify_file: spawned.notify_file,
                report: spawned.report,
                tasks,
                timers: Vec::new(),
            },
        );
        self.arm(number, self.config.ready_timeout, Timer::ReadyTimeout);
        if let Readiness::After(d) = self.config.readiness {
            self.arm(number, d, Timer::ReadyAfter);
        }
        Ok(())
    }

    /// The starting generation is ready: it serves, and only now are the
    /// generations it replaces told to drain.
    fn on_ready(&mut self, number: u64, how: &str) {
        let restart = self.restarting.is_some_and(|(r, _)| r == number);
        let serving = self.serving_generation();
        let Some(g) = self.generations.get_mut(&number) else {
            return;
        };
        if g.phase != Phase::Starting {
            return;
        }
        if self.handoff.is_some_and(|h| h.to == number && !h.answered) {
            // Draining the frozen generation now would lose its values.
            g.ready_pending = true;
            return;
        }
        if restart && serving.is_some() {
            // A reload served first: this restart is not needed.
            self.restarting = None;
            self.begin_drain(number, "a reload replaced the crashed worker first");
            return;
        }
        g.phase = Phase::Serving;
        g.serving_since = Some(Instant::now());
        for timer in g.timers.drain(..) {
            timer.abort();
        }
        tracing::info!("generation {number} (pid {}) is ready ({how})", g.pid);
        let old: Vec<u64> = self
            .generations
            .values()
            .filter(|g| g.phase == Phase::Serving && g.number != number)
            .map(|g| g.number)
            .collect();
        for n in old {
            self.begin_drain(n, "replaced");
        }
        if restart {
            self.on_restarted(number);
            return;
        }
        if let Some((r, _)) = self.restarting.take() {
            // A crash restart still starting beside this reload.
            self.begin_drain(r, &format!("generation {number} serves first"));
        }
        let mut pause = None;
        if let Some(h) = self.handoff.take_if(|h| h.to == number) {
            // The frozen generation was just told to drain: done.
            pause = Some(h.since.elapsed());
        }
        self.finish_in_flight(number, Ok(()));
        if let (Some(pause), Some(r)) = (pause, self.last_reload.as_mut()) {
            r.pause_ms = Some(pause.as_secs_f64() * 1000.0);
        }
    }

    /// The crash restart `number` serves. A reload in progress whose
    /// generation already took kept values took values older than the ones
    /// this generation serves from now on: it starts over.
    fn on_restarted(&mut self, number: u64) {
        let Some((_, started)) = self.restarting.take() else {
            return;
        };
        self.record(number, None, started, Ok(()));
        self.systemd
            .send(&format!("READY=1\nSTATUS=serving generation {number}"));
        let stale = self.in_flight.as_ref().and_then(|f| {
            self.generations
                .get(&f.generation)
                .filter(|g| g.took_state)
                .map(|g| g.number)
        });
        if let Some(reload) = stale {
            let waiters = self
                .in_flight
                .as_mut()
                .map(|f| std::mem::take(&mut f.waiters))
                .unwrap_or_default();
            self.queued.get_or_insert_with(Vec::new).extend(waiters);
            self.fail_starting(
                reload,
                format!(
                    "generation {number} restarted after a crash while it started, and serves \
                     newer kept values than the ones it took; reloading again"
                ),
            );
        }
        self.start_queued();
    }

    /// Records how a reload (or restart) ended, for `status`.
    fn record(
        &mut self,
        number: u64,
        purpose: Option<Purpose>,
        started: Instant,
        result: Result<(), &String>,
    ) {
        let ms = started.elapsed().as_millis() as u64;
        if purpose != Some(Purpose::First) || result.is_err() {
            self.last_reload = Some(ReloadResult {
                generation: number,
                ok: result.is_ok(),
                error: result.err().cloned(),
                ms,
                pause_ms: None,
            });
        }
    }

    /// The crash restart `number` failed to start: try again after the
    /// back-off.
    fn restart_failed(&mut self, number: u64, reason: String) {
        let Some((_, started)) = self.restarting.take_if(|(r, _)| *r == number) else {
            return;
        };
        tracing::error!("generation {number} failed: {reason}");
        self.record(number, None, started, Err(&reason));
        self.thaw_for(number);
        self.systemd.send(&format!(
            "READY=1\nSTATUS=generation {number} failed to start"
        ));
        self.schedule_restart();
        self.start_queued();
    }

    /// Ends the in-flight start of generation `number`: records the result,
    /// answers its waiters, and moves on (queued reload, restart, or exit).
    fn finish_in_flight(&mut self, number: u64, result: Result<(), String>) {
        let Some(mut in_flight) = self.in_flight.take_if(|f| f.generation == number) else {
            return;
        };
        if let Some(build) = in_flight.build.take() {
            // Stopped mid-build: the build goes, with whatever it started.
            let _ = killpg(build.pid, Signal::SIGKILL);
        }
        let ms = in_flight.started.elapsed().as_millis() as u64;
        let answer = match &result {
            Ok(()) => {
                self.ever_served = true;
                self.reloads_ok += u64::from(in_flight.purpose == Purpose::Reload);
                json!({ "ok": true, "generation": number, "ms": ms })
            }
            Err(reason) => {
                self.reloads_failed += u64::from(in_flight.purpose == Purpose::Reload);
                tracing::error!("generation {number} failed: {reason}");
                self.thaw_for(number);
                json!({ "ok": false, "generation": number, "ms": ms, "error": reason })
            }
        };
        self.record(
            number,
            Some(in_flight.purpose),
            in_flight.started,
            result.as_ref().map(|_| ()),
        );
        for waiter in in_flight.waiters {
            let _ = waiter.send(answer.clone());
        }
        let serving = self.serving_generation();
        let status = match (&result, serving) {
            (Ok(()), _) => format!("serving generation {number}"),
            (Err(_), Some(s)) => {
                format!("serving generation {s}; generation {number} failed to start")
            }
            (Err(_), None) => format!("generation {number} failed to start"),
        };
        // READY=1 after every reload, success or failure (systemd waits for
        // it); never for a first start that failed.
        if in_flight.purpose != Purpose::First || result.is_ok() {
            self.systemd.send(&format!("READY=1\nSTATUS={status}"));
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
    fn fail_starting(&mut self, number: u64, reason: String) {
        self.begin_drain(number, "failed to start");
        self.start_failed(number, reason);
    }

    /// A starting generation failed (it is draining or gone).
    fn start_failed(&mut self, number: u64, reason: String) {
        if self.restarting.is_some_and(|(r, _)| r == number) {
            self.restart_failed(number, reason);
        } else {
            self.finish_in_flight(number, Err(reason));
        }
    }

    /// With no generation serving, start one after the back-off, beside any
    /// reload in progress.
    fn schedule_restart(&mut self) {
        if self.stopping
            || self.restart_armed
            || self.restarting.is_some()
            || self.serving_generation().is_some()
        {
            return;
        }
        self.restart_armed = true;
        self.restart_seq += 1;
        // Each restart in a row waits twice as long as the one before.
        let delay = self.restart_delay;
        self.restart_delay = (delay * 2).min(RESTART_MAX);
        tracing::info!(
            "restarting the worker in {}",
            humantime::format_duration(delay)
        );
        self.after(
            delay,
            Event::RestartDue {
                seq: self.restart_seq,
            },
        );
    }

    // ---- draining and exits ---------------------------------------------

    /// Tells generation `number` to drain and arms its kill deadline.
    fn begin_drain(&mut self, number: u64, why: &str) {
        let Some(g) = self.generations.get_mut(&number) else {
            return;
        };
        if g.phase == Phase::Draining {
            return;
        }
        g.phase = Phase::Draining;
        g.draining_since = Some(Instant::now());
        let timeout = self.config.drain_timeout;
        let by_message = g.speaks_protocol
            && protocol::send(
                g.channel.get_ref().as_fd(),
                &SupervisorMessage::Drain {
                    timeout_ms: timeout.as_millis() as u64,
                },
                &[],
            )
            .is_ok();
        if by_message {
            tracing::info!("generation {number} (pid {}) drains ({why})", g.pid);
        } else {
            tracing::info!(
                "generation {number} (pid {}) drains ({why}): sending {}",
                g.pid,
                self.config.drain_signal
            );
            if let Err(e) = kill(g.pid, self.config.drain_signal) {
                tracing::warn!("signalling generation {number} (pid {}): {e}", g.pid);
            }
        }
        self.arm(number, timeout, Timer::DrainTimeout);
    }

    /// Kills every generation now (`stop --now`, a second SIGTERM/SIGINT).
    fn kill_all(&mut self) {
        for g in self.generations.values() {
            let _ = killpg(g.pid, Signal::SIGKILL);
            let _ = kill(g.pid, Signal::SIGKILL);
        }
    }

    /// Drains every generation and exits once all are gone; idempotent.
    fn begin_stop(&mut self) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        self.restarting = None;
        tracing::info!("stopping: draining every generation");
        self.systemd.send("STOPPING=1");
        if let Some(number) = self.in_flight.as_ref().map(|f| f.generation) {
            self.begin_drain(number, "baton is stopping");
            self.finish_in_flight(number, Err("baton is stopping".into()));
        }
        for waiter in self.queued.take().unwrap_or_default() {
            let _ = waiter.send(control::error("baton is stopping"));
        }
        let numbers: Vec<u64> = self.generations.keys().copied().collect();
        for n in numbers {
            self.begin_drain(n, "baton is stopping");
        }
    }

    /// Reaps every exited child (SIGCHLDs merge, so loop until none is left).
    fn reap(&mut self) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => {
                    self.on_exit(pid, format!("exited with status {code}"));
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    self.on_exit(pid, format!("was killed by {sig}"));
                }
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => return,
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    tracing::error!("reaping children: {e}");
                    return;
                }
            }
        }
    }

    fn on_exit(&mut self, pid: Pid, how: String) {
        if let Some(build) = self
            .in_flight
            .as_mut()
            .and_then(|f| f.build.as_mut())
            .filter(|b| b.pid == pid)
        {
            build.exit = Some(match build.report.failure() {
                Some(f) => Err(format!("could not start: {}: {}", f.step, f.error)),
                None if how == "exited with status 0" => Ok(()),
                None => Err(how),
            });
            // Whatever the build left running would hold its output open.
            let _ = killpg(pid, Signal::SIGKILL);
            // Something it left in another process group still could: give
            // the output a second to end, then go on without its tail.
            if let Some(generation) = self.in_flight.as_ref().map(|f| f.generation) {
                self.after(
                    Duration::from_secs(1),
                    Event::BuildOutputLate { generation },
                );
            }
            self.finish_build();
            return;
        }
        let Some(number) = self
            .generations
            .values()
            .find(|g| g.pid == pid)
            .map(|g| g.number)
        else {
            tracing::debug!("reaped pid {pid} (not a worker: an orphan re-parented to baton)");
            return;
        };
        let Some(g) = self.generations.remove(&number) else {
            return;
        };
        for task in g.tasks.iter().chain(&g.timers) {
            task.abort();
        }
        if let Some(h) = self.handoff.filter(|h| h.from == number && !h.answered) {
            // The frozen generation died before handing over: its successor
            // gets what was kept before (its last checkpoint, if any).
            tracing::warn!(
                "generation {number} exited while frozen; generation {} gets the last checkpoint",
                h.to
            );
            self.handoff = None;
            self.send_state(h.to, StateSource::Checkpoint);
            self.ready_if_pending(h.to);
        }
        // Whatever the worker left in its process group goes with it.
        let _ = killpg(g.pid, Signal::SIGKILL);
        match g.phase {
            Phase::Starting => {
                let reason = match g.report.failure() {
                    Some(f) => format!(
                        "starting `{}`: {}: {}",
                        self.config.command.program.to_string_lossy(),
                        f.step,
                        f.error
                    ),
                    None => format!("{how} before it was ready"),
                };
                self.start_failed(number, reason);
            }
            Phase::Serving => {
                tracing::error!("generation {number} (pid {pid}) {how} while serving");
                let served = g.serving_since.map(|t| t.elapsed()).unwrap_or_default();
                if served >= HEALTHY_FOR {
                    self.restart_delay = RESTART_MIN;
                }
                self.schedule_restart();
            }
            Phase::Draining => {
                tracing::info!(
                    "generation {number} (pid {pid}) {how} after {} of draining",
                    humantime::format_duration(Duration::from_millis(
                        g.draining_since
                            .map_or(0, |t| t.elapsed().as_millis() as u64)
                    ))
                );
            }
        }
        self.start_queued();
    }

    // ---- worker messages ------------------------------------------------

    fn on_notify(&mut self, number: u64, message: NotifyMessage) {
        let Some(g) = self.generations.get_mut(&number) else {
            return;
        };
        if let Some(status) = message.status {
            g.status = Some(status);
        }
        if message.stopping {
            // Never forwarded: STOPPING=1 to systemd would stop the unit.
            tracing::info!("generation {number} (pid {}) says it is stopping", g.pid);
        }
        if let Some(errno) = message.errno {
            tracing::warn!("generation {number} (pid {}) reports ERRNO={errno}", g.pid);
        }
        if message.ready {
            self.on_ready(number, "READY=1");
        }
    }

    fn on_channel(
        &mut self,
        number: u64,
        message: Result<WorkerMessage, ProtocolError>,
        fds: Vec<OwnedFd>,
    ) {
        let Some(g) = self.generations.get_mut(&number) else {
            return;
        };
        if let Ok(m) = &message {
            let carries_fds = matches!(
                m,
                WorkerMessage::Frozen { .. } | WorkerMessage::Checkpoint { .. }
            );
            if !carries_fds && !fds.is_empty() {
                self.protocol_error(number, format!("sent descriptors with {m:?}"));
                return;
            }
        }
        match message {
            Ok(WorkerMessage::Hello { protocol, pid }) => {
                if g.speaks_protocol {
                    // A second welcome would hand it every listener again.
                    self.protocol_error(number, "said hello twice".into());
                    return;
                }
                if protocol != PROTOCOL_VERSION {
                    let reason = format!(
                        "speaks worker protocol version {protocol}; this baton speaks \
                         {PROTOCOL_VERSION} (update baton or baton-worker)"
                    );
                    self.protocol_error(number, reason);
                    return;
                }
                g.speaks_protocol = true;
                tracing::debug!("generation {number} (pid {pid}) speaks the worker protocol");
                let welcome = SupervisorMessage::Welcome {
                    protocol: PROTOCOL_VERSION,
                    generation: number,
                    listeners: self.listeners.iter().map(Listener::info).collect(),
                };
                let fds: Vec<_> = self.listeners.iter().map(|l| l.fd.as_fd()).collect();
                if let Err(e) = protocol::send(g.channel.get_ref().as_fd(), &welcome, &fds) {
                    self.protocol_error(number, format!("sending its listeners: {e}"));
                }
            }
            Ok(WorkerMessage::Ready) => self.on_ready(number, "ready()"),
            Ok(WorkerMessage::Status { text }) => g.status = Some(text),
            Ok(WorkerMessage::TakeState) => self.on_take_state(number),
            Ok(WorkerMessage::Frozen { bytes }) => self.on_frozen(number, bytes, fds),
            Ok(WorkerMessage::FreezeFailed { reason }) => {
                if let Some(h) = self.handoff.filter(|h| h.from == number) {
                    self.fail_starting(
                        h.to,
                        format!("generation {number} could not save its kept values: {reason}"),
                    );
                }
            }
            Ok(WorkerMessage::Rejected { reason }) if g.phase != Phase::Starting => {
                tracing::warn!(
                    "generation {number} (pid {}) rejected kept values after it was ready: {reason}",
                    g.pid
                );
            }
            Ok(WorkerMessage::Rejected { reason }) => {
                let from = self
                    .handoff
                    .filter(|h| h.to == number)
                    .map(|h| format!("of generation {}", h.from))
                    .unwrap_or_else(|| "it was given".to_owned());
                self.fail_starting(number, format!("rejected the kept values {from}: {reason}"));
            }
            Ok(WorkerMessage::Checkpoint { bytes }) => self.on_checkpoint(number, bytes, fds),
            // A plain worker's copy closes when it exits; the exit is reaped.
            Err(ProtocolError::Closed) => {}
            Err(e) if e.is_transient() => self.on_lost(number, e),
            Err(e) => self.protocol_error(number, format!("{e}")),
        }
    }

    /// baton itself could not take in a message whole (out of descriptors,
    /// say): not the worker's fault, and its channel stays. A snapshot that
    /// lost its memfd fails the reload it was for (the frozen generation
    /// thaws with its values); a lost checkpoint waits for the next one.
    fn on_lost(&mut self, number: u64, e: ProtocolError) {
        match e.lost_message::<WorkerMessage>() {
            Some(WorkerMessage::Frozen { .. }) => {
                match self.handoff.filter(|h| h.from == number && !h.answered) {
                    Some(h) => self.fail_starting(
                        h.to,
                        format!("generation {number}'s snapshot did not reach baton: {e}"),
                    ),
                    None => tracing::warn!("generation {number}: {e}"),
                }
            }
            Some(WorkerMessage::Checkpoint { .. }) => {
                tracing::warn!("generation {number}: {e}; its next checkpoint replaces it");
            }
            _ => tracing::warn!("generation {number}: {e}"),
        }
    }

    /// A new generation asks for its predecessor's kept values: freeze the
    /// serving generation if it keeps any, else answer from the last
    /// checkpoint.
    fn on_take_state(&mut self, number: u64) {
        if let Some(h) = self.handoff.filter(|h| h.to == number) {
            // Asked again (an abandoned `keep` future): the snapshot is on
            // its way, or is sent again.
            if h.answered {
                self.send_state(number, StateSource::Snapshot);
            }
            return;
        }
        let starting = self
            .generations
            .get(&number)
            .is_some_and(|g| g.phase == Phase::Starting);
        let source = self
            .generations
            .values()
            .filter(|g| g.phase == Phase::Serving && g.speaks_protocol && !g.frozen)
            .map(|g| g.number)
            .max();
        let (Some(from), true, None) = (source, starting, self.handoff) else {
            // No live predecessor to freeze (or asked late): the last
            // checkpoint, or nothing.
            self.send_state(number, StateSource::Checkpoint);
            return;
        };
        let Some(g) = self.generations.get_mut(&from) else {
            return;
        };
        match protocol::send(g.channel.get_ref().as_fd(), &SupervisorMessage::Freeze, &[]) {
            Ok(()) => {
                g.frozen = true;
                tracing::info!(
                    "generation {from} (pid {}) freezes to hand its kept values to generation \
                     {number}",
                    g.pid
                );
                self.handoff = Some(Handoff {
                    from,
                    to: number,
                    answered: false,
                    since: Instant::now(),
                });
                self.arm(number, self.config.freeze_timeout, Timer::FreezeTimeout);
            }
            Err(e) => {
                // Its values are newer than any checkpoint: handing over an
                // older state would lose writes it acknowledged.
                self.fail_starting(
                    number,
                    format!(
                        "generation {from} serves and keeps values, but asking it to hand them \
                         over failed: {e}"
                    ),
                );
            }
        }
    }

    /// The frozen generation's snapshot: check it, keep it, pass it on.
    fn on_frozen(&mut self, number: u64, bytes: u64, fds: Vec<OwnedFd>) {
        let Some(h) = self.handoff.filter(|h| h.from == number && !h.answered) else {
            tracing::warn!("generation {number} sent a snapshot nobody asked for; ignored");
            return;
        };
        match Snapshot::accept(number, bytes, fds, self.config.max_state) {
            Ok(snapshot) => {
                tracing::info!(
                    "generation {number} froze; {} of kept values go to generation {}",
                    state::size(bytes),
                    h.to
                );
                self.kept = snapshot;
                if let Some(h) = self.handoff.as_mut() {
                    h.answered = true;
                }
                self.send_state(h.to, StateSource::Snapshot);
                self.ready_if_pending(h.to);
            }
            Err(reason) => {
                self.fail_starting(h.to, format!("generation {number}'s snapshot: {reason}"));
            }
        }
    }

    /// A checkpoint: kept for a crash restart, if it is not older than what
    /// is kept and comes from a generation that still owns its values.
    fn on_checkpoint(&mut self, number: u64, bytes: u64, fds: Vec<OwnedFd>) {
        let Some(g) = self.generations.get(&number) else {
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
                self.kept = snapshot;
            }
            Err(reason) => tracing::warn!("generation {number}: refused a checkpoint: {reason}"),
        }
    }

    /// Generation `number` said ready while waiting for its kept values,
    /// which have now been sent.
    fn ready_if_pending(&mut self, number: u64) {
        let pending = self
            .generations
            .get_mut(&number)
            .is_some_and(|g| std::mem::take(&mut g.ready_pending));
        if pending {
            self.on_ready(number, "ready, after its kept values arrived");
        }
    }

    /// Answers generation `number`'s `TakeState` with what is kept.
    fn send_state(&mut self, number: u64, source: StateSource) {
        let Some(g) = self.generations.get(&number) else {
            return;
        };
        let (message, fds) = match &self.kept {
            Some(k) => (
                SupervisorMessage::State {
                    source,
                    generation: Some(k.generation),
                    bytes: k.bytes,
                },
                vec![k.fd()],
            ),
            None => (
                SupervisorMessage::State {
                    source: StateSource::None,
                    generation: None,
                    bytes: 0,
                },
                Vec::new(),
            ),
        };
        match protocol::send(g.channel.get_ref().as_fd(), &message, &fds) {
            Ok(()) => {
                if let Some(g) = self.generations.get_mut(&number) {
                    g.took_state = true;
                }
            }
            Err(e) => self.protocol_error(number, format!("sending its kept values: {e}")),
        }
    }

    /// Generation `number` failed; if a generation froze for it, it thaws
    /// and accepts again with its values as they were.
    fn thaw_for(&mut self, number: u64) {
        let Some(h) = self.handoff.take_if(|h| h.to == number) else {
            return;
        };
        let Some(g) = self.generations.get_mut(&h.from) else {
            return;
        };
        g.frozen = false;
        if g.phase != Phase::Serving {
            return;
        }
        match protocol::send(g.channel.get_ref().as_fd(), &SupervisorMessage::Thaw, &[]) {
            Ok(()) => tracing::info!("generation {} (pid {}) thaws and serves on", h.from, g.pid),
            Err(e) => {
                // Still frozen, it accepts nothing: replace it.
                tracing::error!("telling generation {} to thaw: {e}; replacing it", h.from);
                self.begin_drain(h.from, "could not thaw");
                self.schedule_restart();
            }
        }
    }

    /// Malformed data fails a starting generation. A serving one keeps
    /// serving and keeps its channel: the bad message is dropped (packets
    /// keep their boundaries), and its kept values are still asked for.
    fn protocol_error(&mut self, number: u64, reason: String) {
        let Some(g) = self.generations.get(&number) else {
            return;
        };
        if g.phase == Phase::Starting {
            self.fail_starting(number, reason);
        } else {
            tracing::error!("generation {number} (pid {}): {reason}; ignored", g.pid);
        }
    }

    fn on_timer(&mut self, number: u64, timer: Timer) {
        let Some(g) = self.generations.get(&number) else {
            return;
        };
        match (timer, g.phase) {
            (Timer::ReadyTimeout, Phase::Starting) => {
                let reason = format!(
                    "not ready within {} (--ready-timeout): a plain worker must send READY=1 \
                     to $NOTIFY_SOCKET (sd_notify), or be run with --ready after:DURATION; an \
                     SDK worker must call ready()",
                    humantime::format_duration(self.config.ready_timeout)
                );
                self.fail_starting(number, reason);
            }
            (Timer::FreezeTimeout, Phase::Starting)
                if self.handoff.is_some_and(|h| h.to == number) =>
            {
                let reason = format!(
                    "not ready within {} of freezing its predecessor (--freeze-timeout), \
                     while no generation accepted; call keep() after slow initialisation",
                    humantime::format_duration(self.config.freeze_timeout)
                );
                self.fail_starting(number, reason);
            }
            (Timer::ReadyAfter, Phase::Starting) => {
                let after = match self.config.readiness {
                    Readiness::After(d) => humantime::format_duration(d).to_string(),
                    Readiness::Notify => String::new(),
                };
                self.on_ready(number, &format!("alive for {after}"));
            }
            (Timer::DrainTimeout, Phase::Draining) => {
                tracing::warn!(
                    "generation {number} (pid {}) still running {} after it was told to \
                     drain: killing it",
                    g.pid,
                    humantime::format_duration(self.config.drain_timeout)
                );
                let _ = killpg(g.pid, Signal::SIGKILL);
                let _ = kill(g.pid, Signal::SIGKILL);
            }
            _ => {}
        }
    }

    // ---- helpers --------------------------------------------------------

    /// Sends `event` to the loop after `delay`.
    fn after(&self, delay: Duration, event: Event) -> tokio::task::AbortHandle {
        let events = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = events.send(event).await;
        })
        .abort_handle()
    }

    /// Arms deadline `timer` of generation `number`, owned by it.
    fn arm(&mut self, number: u64, delay: Duration, timer: Timer) {
        let handle = self.after(
            delay,
            Event::Timer {
                generation: number,
                timer,
            },
        );
        match self.generations.get_mut(&number) {
            Some(g) => g.timers.push(handle),
            None => handle.abort(),
        }
    }

    fn serving_generation(&self) -> Option<u64> {
        self.generations
            .values()
            .filter(|g| g.phase == Phase::Serving)
            .map(|g| g.number)
            .max()
    }

    fn status(&self) -> Value {
        let generations: Vec<Value> = self
            .generations
            .values()
            .map(|g| {
                json!({
                    "generation": g.number,
                    "state": g.phase.name(),
                    "pids": [g.pid.as_raw()],
                    "age_ms": g.started.elapsed().as_millis() as u64,
                    "sdk": g.speaks_protocol,
                    "frozen": g.frozen,
                    "status": g.status,
                })
            })
            .collect();
        let listeners: Vec<Value> = self
            .listeners
            .iter()
            .map(|l| json!({ "name": l.name, "address": l.bound }))
            .collect();
        let last_reload = self.last_reload.as_ref().map(|r| {
            json!({
                "generation": r.generation,
                "ok": r.ok,
                "error": r.error,
                "ms": r.ms,
                "accept_pause_ms": r.pause_ms,
            })
        });
        json!({
            "ok": true,
            "pid": std::process::id(),
            "generation": self.serving_generation(),
            "generations": generations,
            "last_reload": last_reload,
            "reloads": { "ok": self.reloads_ok, "failed": self.reloads_failed },
            "reload_queued": self.queued.is_some(),
            "reloading": self.in_flight.as_ref().map(|f| json!({
                "generation": f.generation,
                "step": if f.build.is_some() { "building" } else { "starting" },
                "ms": f.started.elapsed().as_millis() as u64,
            })),
            "restarting": self.restarting.map(|(number, started)| json!({
                "generation": number,
                "ms": started.elapsed().as_millis() as u64,
            })),
            "stopping": self.stopping,
            "listeners": listeners,
            "kept": self.kept.as_ref().map(|k| json!({
                "generation": k.generation,
                "bytes": k.bytes,
            })),
        })
    }
}

/// Reads generation `number`'s channel until it is gone (the worker hung up,
/// or the socket failed for good). Any other error is reported and reading
/// goes on: a malformed or cut packet is gone
/// (packets keep their boundaries), and a failure of baton's own (out of
/// descriptors, out of memory) passes; neither may cost the channel.
async fn read_channel(number: u64, channel: Arc<AsyncFd<OwnedFd>>, events: mpsc::Sender<Event>) {
    loop {
        let mut guard = match channel.readable().await {
            Ok(guard) => guard,
            Err(e) => {
                let _ = events
                    .send(Event::Channel {
                        generation: number,
                        message: Err(ProtocolError::Io(e)),
                        fds: Vec::new(),
                    })
                    .await;
                return;
            }
        };
        let (message, fds) = match protocol::recv::<WorkerMessage>(channel.get_ref().as_fd()) {
            Err(e) if e.is_would_block() => {
                guard.clear_ready();
                continue;
            }
            Ok((message, fds)) => (Ok(message), fds),
            Err(e) => (Err(e), Vec::new()),
        };
        let closed = message.as_ref().err().is_some_and(ProtocolError::is_fatal);
        // A passing failure of the socket call itself consumed no packet:
        // retrying at once would spin.
        let backoff = matches!(message, Err(ProtocolError::Io(_)));
        let sent = events
            .send(Event::Channel {
                generation: number,
                message,
                fds,
            })
            .await;
        if sent.is_err() || closed {
            return;
        }
        if backoff {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// How much of the build's output `status` and the log keep.
const BUILD_TAIL: usize = 4096;

/// Echoes the build's output to baton's stderr and reports its tail when it
/// ends.
async fn read_build_output(number: u64, read: OwnedFd, events: mpsc::Sender<Event>) {
    use tokio::io::AsyncReadExt;
    let mut tail: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 8192];
    match tokio::net::unix::pipe::Receiver::from_owned_fd(read) {
        Ok(mut pipe) => loop {
            match pipe.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    crate::logging::echo(&buf[..n]);
                    tail.extend_from_slice(&buf[..n]);
                    if tail.len() > 2 * BUILD_TAIL {
                        tail.drain(..tail.len() - BUILD_TAIL);
                    }
                }
            }
        },
        Err(e) => tracing::warn!("reading the build's output: {e}"),
    }
    let start = tail.len().saturating_sub(BUILD_TAIL);
    let text = String::from_utf8_lossy(&tail[start..]);
    // Keep whole lines, at most the last 20.
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(20)..].join("\n");
    let _ = events
        .send(Event::BuildOutput {
            generation: number,
            tail,
        })
        .await;
}
