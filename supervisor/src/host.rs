//! The seam between the event loop and the outside world.
//!
//! The loop (`supervisor/`) decides; a [`Host`] does: it starts workers and
//! builds, signals and kills processes, reaps them, sends on worker
//! channels, arms timers and talks to systemd. [`OsHost`] is the real one
//! (the same way cloudflare/tableflip puts the operating system behind an
//! `env` struct); the loop's unit tests drive the whole state machine with a
//! fake in milliseconds.
//!
//! The host owns each generation's operating-system side (its channel,
//! notify socket file, reader tasks, exec report), keyed by generation
//! number, and turns what arrives on them into [`Event`]s. It never decides
//! anything about a generation's life.
//!
//! For an upgrade of baton the host also starts the pre-flight child, and
//! execs: it knows which descriptor is what ([`upgrade::state::HostFds`]),
//! and takes them over again in the new supervisor ([`OsHost::adopt_worker`]).

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use baton_worker::protocol::{self, ProtocolError, SupervisorMessage, WorkerMessage};
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::api::{ListenerStatus, Reply};
use crate::event::{Event, Exit};
use crate::exec_report::ExecReport;
use crate::listener::Listener;
use crate::notify::{self, Systemd};
use crate::spawn::{Launcher, SocketFile};
use crate::steer::Steer;
use crate::upgrade::{self, preflight, state::Table};

mod handover;

/// A pending deadline, to cancel it.
pub type TimerId = u64;

/// What the event loop asks of the outside world.
pub trait Host {
    /// Starts generation `number`'s worker; what arrives on its notify
    /// socket and channel becomes events.
    fn spawn_worker(&mut self, number: u64) -> Result<Pid, String>;
    /// Starts `--build` for generation `number`; the end of its output
    /// becomes [`Event::BuildOutput`].
    fn spawn_build(&mut self, number: u64, script: &str) -> Result<Pid, String>;
    /// Why child `pid` could not exec, if it could not; ask once it exited.
    fn exec_failure(&mut self, pid: Pid) -> Option<String>;
    /// Generation `number` is gone: stop reading its sockets, remove its
    /// files.
    fn forget(&mut self, number: u64);
    /// Stops reading the output of generation `number`'s build.
    fn abandon_build_output(&mut self, number: u64);
    /// Sends `message` (with `fds`) on generation `number`'s channel.
    fn send(
        &mut self,
        number: u64,
        message: &SupervisorMessage,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ProtocolError>;
    /// Sends generation `number` its welcome: the listeners, by name.
    fn welcome(&mut self, number: u64) -> Result<(), ProtocolError>;
    /// Sends `signal` to process `pid`.
    fn signal(&mut self, pid: Pid, signal: Signal) -> Result<(), nix::Error>;
    /// SIGKILLs process `pid` and its process group.
    fn kill(&mut self, pid: Pid);
    /// Every child that has exited since the last call.
    fn reap(&mut self) -> Vec<(Pid, Exit)>;
    /// Sends `event` to the loop after `delay`.
    fn arm(&mut self, delay: Duration, event: Event) -> TimerId;
    /// Cancels a deadline (one that already fired is ignored).
    fn cancel(&mut self, timer: TimerId);
    /// baton's own message to systemd (a no-op without `NOTIFY_SOCKET`).
    fn systemd(&mut self, message: &str);
    /// `RELOADING=1` with its `MONOTONIC_USEC=`, and `STATUS=status`.
    fn systemd_reloading(&mut self, status: &str);
    /// Keeps the latest kept values in systemd's file descriptor store
    /// (`None`: there are none), so that a crash of baton loses none.
    fn store_kept(&mut self, snapshot: Option<BorrowedFd<'_>>);
    /// The listeners, for `status`.
    fn listeners(&self) -> Vec<ListenerStatus>;
    /// `--steer`: new connections go to generation `number`'s sockets from
    /// now on (`steer.rs`).
    fn steer_to(&mut self, _number: u64) {}
    /// `--steer`: generation `number`, about to start, shares generation
    /// `with`'s sockets.
    fn steer_share(&mut self, _number: u64, _with: u64) {}
    /// `--steer`: whether connections wait in generation `number`'s own
    /// accept queues, not accepted yet.
    fn steered_queue(&self, _number: u64) -> bool {
        false
    }
    /// The binary an upgrade runs when none is named: the path baton was
    /// started from.
    fn default_binary(&self) -> PathBuf;
    /// Starts an upgrade's pre-flight: `binary` checks the state it would
    /// get (`table` and the host's descriptors).
    fn spawn_preflight(&mut self, binary: &Path, table: &Table) -> Result<Pid, String>;
    /// What pre-flight child `pid` said: the new baton's version, or why it
    /// refused. Ask once it exited.
    fn preflight_verdict(&mut self, pid: Pid, exit: Exit) -> Result<String, String>;
    /// Executes `binary` in place with `table`: returns only if that failed,
    /// with why.
    fn exec(&mut self, binary: &Path, table: Table) -> String;
    /// Answers a client the loop kept (`upgrade --wait`).
    fn answer(&mut self, client: OwnedFd, reply: Reply);
}

/// One generation's operating-system side.
struct Worker {
    channel: Arc<AsyncFd<OwnedFd>>,
    /// The notify socket (its reader has a duplicate), to carry across an
    /// upgrade.
    notify: OwnedFd,
    notify_uid: u32,
    /// Reader tasks, aborted when the generation is gone.
    tasks: Vec<AbortHandle>,
    /// Removed from disk when dropped.
    notify_file: SocketFile,
}

/// The real host: processes, sockets, tokio timers, systemd.
pub struct OsHost {
    launcher: Launcher,
    listeners: Vec<Listener>,
    /// The loop's sender, cloned into every task started here.
    events: mpsc::Sender<Event>,
    systemd: Systemd,
    workers: HashMap<u64, Worker>,
    /// Exec reports of children still running (workers and builds).
    reports: HashMap<Pid, ExecReport>,
    /// The task reading a build's output, by generation.
    build_output: HashMap<u64, AbortHandle>,
    timers: HashMap<TimerId, AbortHandle>,
    next_timer: TimerId,
    /// `--steer`: each TCP listener's second socket, and each living
    /// generation's side (`None`: every generation shares the listeners).
    steer: Option<Steer>,
    /// What an upgrade needs beyond the host's own descriptors.
    upgrade: upgrade::Context,
    /// Pre-flight children still running.
    preflights: HashMap<Pid, preflight::Child>,
}

impl OsHost {
    /// A host starting workers with `launcher` on `listeners`, sending
    /// events to `events`.
    pub fn new(
        launcher: Launcher,
        listeners: Vec<Listener>,
        events: mpsc::Sender<Event>,
        systemd: Systemd,
    ) -> OsHost {
        OsHost {
            launcher,
            listeners,
            events,
            systemd,
            workers: HashMap::new(),
            reports: HashMap::new(),
            build_output: HashMap::new(),
            timers: HashMap::new(),
            next_timer: 0,
            steer: None,
            upgrade: upgrade::Context::default(),
            preflights: HashMap::new(),
        }
    }

    /// Reads generation `number`'s notify socket and channel into events.
    fn watch(
        &mut self,
        number: u64,
        channel: Arc<AsyncFd<OwnedFd>>,
        notify: OwnedFd,
        socket: std::os::unix::net::UnixDatagram,
        notify_uid: u32,
        notify_file: SocketFile,
    ) {
        let events = self.events.clone();
        let tasks = vec![
            tokio::spawn(notify::read_worker_notify(
                number,
                socket,
                notify_uid,
                events.clone(),
            ))
            .abort_handle(),
            tokio::spawn(read_channel(number, channel.clone(), events)).abort_handle(),
        ];
        let worker = Worker {
            channel,
            notify,
            notify_uid,
            tasks,
            notify_file,
        };
        self.workers.insert(number, worker);
    }

    /// Steers new connections between generations (`--steer`).
    pub fn with_steer(mut self, steer: Option<Steer>) -> OsHost {
        self.steer = steer;
        self
    }

    /// Generation `number`'s descriptors of the listeners, in order.
    fn listener_fds(&self, number: u64) -> Vec<BorrowedFd<'_>> {
        match &self.steer {
            Some(steer) => steer.fds(number, &self.listeners),
            None => self.listeners.iter().map(|l| l.fd.as_fd()).collect(),
        }
    }
}

impl Host for OsHost {
    fn spawn_worker(&mut self, number: u64) -> Result<Pid, String> {
        if let Some(steer) = &mut self.steer {
            steer.assign(number)?;
        }
        let names = self.listeners.iter().map(|l| l.name.as_str());
        let named: Vec<_> = names.zip(self.listener_fds(number)).collect();
        let spawned = self.launcher.worker(number, &named);
        drop(named);
        let spawned = match spawned {
            Ok(spawned) => spawned,
            Err(e) => {
                if let Some(steer) = &mut self.steer {
                    steer.forget(number, &self.listeners);
                }
                return Err(format!("{e:#}"));
            }
        };
        let channel = match crate::sys::async_fd(spawned.channel) {
            Ok(fd) => Arc::new(fd),
            Err(e) => {
                // Without a channel we cannot watch it; stop it again (the
                // reaper collects it: it is nobody's generation).
                let _ = killpg(spawned.pid, Signal::SIGKILL);
                return Err(format!("watching its channel: {e}"));
            }
        };
        let notify = match spawned.notify.try_clone() {
            Ok(socket) => OwnedFd::from(socket),
            Err(e) => {
                let _ = killpg(spawned.pid, Signal::SIGKILL);
                return Err(format!("keeping its notify socket: {e}"));
            }
        };
        self.reports.insert(spawned.pid, spawned.report);
        self.watch(
            number,
            channel,
            notify,
            spawned.notify,
            spawned.notify_uid,
            spawned.notify_file,
        );
        Ok(spawned.pid)
    }

    fn spawn_build(&mut self, number: u64, script: &str) -> Result<Pid, String> {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| format!("creating a pipe for the build: {e}"))?;
        let (pid, report) = self
            .launcher
            .build(script, write.as_fd())
            .map_err(|e| e.to_string())?;
        drop(write);
        let reader = tokio::spawn(crate::build::read_output(number, read, self.events.clone()));
        self.build_output.insert(number, reader.abort_handle());
        self.reports.insert(pid, report);
        Ok(pid)
    }

    fn exec_failure(&mut self, pid: Pid) -> Option<String> {
        let failure = self.reports.remove(&pid)?.failure()?;
        Some(format!("{}: {}", failure.step, failure.error))
    }

    fn forget(&mut self, number: u64) {
        if let Some(worker) = self.workers.remove(&number) {
            for task in worker.tasks {
                task.abort();
            }
        }
        if let Some(steer) = &mut self.steer {
            steer.forget(number, &self.listeners);
        }
    }

    fn abandon_build_output(&mut self, number: u64) {
        if let Some(reader) = self.build_output.remove(&number) {
            reader.abort();
        }
    }

    fn send(
        &mut self,
        number: u64,
        message: &SupervisorMessage,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ProtocolError> {
        let worker = self.workers.get(&number).ok_or(ProtocolError::Closed)?;
        protocol::send(worker.channel.get_ref().as_fd(), message, fds)
    }

    fn welcome(&mut self, number: u64) -> Result<(), ProtocolError> {
        let welcome = SupervisorMessage::Welcome {
            protocol: protocol::PROTOCOL_VERSION,
            generation: number,
            listeners: self.listeners.iter().map(Listener::info).collect(),
        };
        let worker = self.workers.get(&number).ok_or(ProtocolError::Closed)?;
        let fds = self.listener_fds(number);
        protocol::send(worker.channel.get_ref().as_fd(), &welcome, &fds)
    }

    fn signal(&mut self, pid: Pid, signal: Signal) -> Result<(), nix::Error> {
        kill(pid, signal)
    }

    fn kill(&mut self, pid: Pid) {
        let _ = killpg(pid, Signal::SIGKILL);
        let _ = kill(pid, Signal::SIGKILL);
    }

    fn reap(&mut self) -> Vec<(Pid, Exit)> {
        // SIGCHLDs merge: loop until no exited child is left.
        let mut exited = Vec::new();
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => exited.push((pid, Exit::Code(code))),
                Ok(WaitStatus::Signaled(pid, sig, _)) => exited.push((pid, Exit::Signal(sig))),
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => return exited,
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    tracing::error!("reaping children: {e}");
                    return exited;
                }
            }
        }
    }

    fn arm(&mut self, delay: Duration, event: Event) -> TimerId {
        self.timers.retain(|_, t| !t.is_finished());
        let events = self.events.clone();
        let task = tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = events.send(event).await;
        });
        self.next_timer += 1;
        self.timers.insert(self.next_timer, task.abort_handle());
        self.next_timer
    }

    fn cancel(&mut self, timer: TimerId) {
        if let Some(task) = self.timers.remove(&timer) {
            task.abort();
        }
    }

    fn systemd(&mut self, message: &str) {
        self.systemd.send(message);
    }

    fn systemd_reloading(&mut self, status: &str) {
        self.systemd.reloading(status);
    }

    fn store_kept(&mut self, snapshot: Option<BorrowedFd<'_>>) {
        self.systemd.store(crate::state::STORE_NAME, snapshot);
    }

    fn listeners(&self) -> Vec<ListenerStatus> {
        self.listeners
            .iter()
            .map(|l| ListenerStatus {
                name: l.name.clone(),
                address: l.bound.to_string(),
            })
            .collect()
    }

    fn steer_to(&mut self, number: u64) {
        if let Some(steer) = &mut self.steer {
            steer.steer_to(number);
        }
    }

    fn steer_share(&mut self, number: u64, with: u64) {
        if let Some(steer) = &mut self.steer {
            steer.share(number, with);
        }
    }

    fn steered_queue(&self, number: u64) -> bool {
        self.steer
            .as_ref()
            .is_some_and(|s| s.queued(number, &self.listeners))
    }

    fn default_binary(&self) -> PathBuf {
        self.upgrade.default_binary.clone()
    }

    fn spawn_preflight(&mut self, binary: &Path, table: &Table) -> Result<Pid, String> {
        let state = self.handover(table.clone());
        let memfd = state
            .to_memfd()
            .map_err(|e| format!("writing the hand-over state: {e}"))?;
        let args = self.upgrade.argv.get(1..).unwrap_or_default();
        let child = preflight::spawn(binary, args, &memfd)?;
        let pid = child.pid;
        self.preflights.insert(pid, child);
        Ok(pid)
    }

    fn preflight_verdict(&mut self, pid: Pid, exit: Exit) -> Result<String, String> {
        let child = self
            .preflights
            .remove(&pid)
            .ok_or_else(|| "its pre-flight child is unknown".to_owned())?;
        let failure = child
            .report
            .failure()
            .map(|f| format!("{}: {}", f.step, f.error));
        preflight::verdict(exit, failure, &preflight::output(&child))
    }

    fn exec(&mut self, binary: &Path, table: Table) -> String {
        let state = self.handover(table);
        upgrade::exec::exec(binary, &self.upgrade.argv, &state)
    }

    fn answer(&mut self, client: OwnedFd, reply: Reply) {
        crate::control::answer(client, reply);
    }
}

/// Reads generation `number`'s channel until it is gone (the worker hung up,
/// or the socket failed for good). Any other error is reported and reading
/// goes on: a malformed or cut packet is gone (packets keep their
/// boundaries), and a failure of baton's own (out of descriptors, out of
/// memory) passes; neither may cost the channel.
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
        let gone = message.as_ref().err().is_some_and(ProtocolError::is_fatal);
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
        if sent.is_err() || gone {
            return;
        }
        if backoff {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
