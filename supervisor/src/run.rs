//! `baton run` from start to end: set up, then hand over to the event loop.
//!
//! Start-up in order: check the command line, bind (or adopt) every
//! listener, resolve `--user`, create the control socket, the runtime
//! directory and the launcher, become a child subreaper, unblock and install
//! the signal handlers (before any child exists, so no exit is missed),
//! serve the control socket, start the watcher, and only then start
//! generation 1 and run the loop until it is done. After an upgrade's exec
//! (`upgrade/`) the same steps take over what the state names instead of
//! binding and creating, and the table is rebuilt instead of starting
//! generation 1. When the loop says an upgrade is due, `upgrade_now` quiets
//! the control socket, blocks signals and lets the loop exec. This module
//! never decides anything about a generation: `supervisor/` does.

use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::control::ControlSocket;
use crate::event::Event;
use crate::host::OsHost;
use crate::listener::{Activated, Listener};
use crate::notify::Systemd;
use crate::run_dir::RunDir;
use crate::spawn::{Launcher, RunAs};
use crate::state::Snapshot;
use crate::steer::Steer;
use crate::supervisor::{Config, Outcome, Supervisor};
use crate::upgrade;
use crate::watch;
use crate::Error;

/// Runs `baton run` to the end: binds, starts generation 1, serves events
/// until stopped. Returns an error if the first generation never serves.
/// After an upgrade's exec it takes over instead of binding and starting.
pub async fn run(config: Config) -> Result<(), Error> {
    // Every signal waits until the handlers are in place and every thread
    // baton starts (the watcher's) has inherited this mask: signals are the
    // main thread's alone, so none is caught by a thread and lost across an
    // upgrade's exec. (After an exec they are blocked already.)
    set_signals_blocked(true)?;
    check_names(&config)?;
    let carried = upgrade::adopt::from_env()?;
    let systemd = Systemd::from_env();
    let (listeners, steer, kept, mut control) = match &carried {
        None => {
            let mut activated = Activated::from_env();
            let listeners = bind_listeners(&config, &mut activated)?;
            let steer = match config.steer_grace {
                Some(_) => Some(Steer::new(&listeners, &mut activated)?),
                None => None,
            };
            let kept = adopt_kept(&mut activated, config.max_state);
            let unused = activated.unused();
            if !unused.is_empty() {
                tracing::warn!(
                    "systemd passed sockets no --listen NAME=systemd asks for: {}; closing them",
                    unused.join(", ")
                );
            }
            drop(activated);
            use_fd_store(&systemd, &listeners);
            (
                listeners,
                steer,
                kept,
                ControlSocket::bind(&config.control)?,
            )
        }
        Some(state) => {
            let mut activated = upgrade::adopt::listeners(state, &config.listeners)?;
            let listeners = bind_listeners(&config, &mut activated)?;
            // The twins, sides and target cross the exec; a state without
            // them (no --steer before) gets twins bound now.
            let steer = match (
                config.steer_grace,
                upgrade::adopt::steer(state, &listeners)?,
            ) {
                (Some(_), Some(steer)) => Some(steer),
                (Some(_), None) => Some(Steer::new(&listeners, &mut activated)?),
                (None, _) => None,
            };
            let kept = upgrade::adopt::kept(state, config.max_state)?;
            (listeners, steer, kept, upgrade::adopt::control(state)?)
        }
    };
    let run_as = RunAs::resolve(config.user.as_deref(), config.group.as_deref())?;
    let run_parent = control
        .path()
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."))
        .to_path_buf();
    if let Some(r) = &run_as {
        tracing::info!("workers run as {}", r.describe());
    }
    let (command, drain) = (config.command.clone(), config.drain_signal);
    let launcher = match &carried {
        None => Launcher::new(command, &run_parent, run_as, drain)?,
        Some(state) => {
            let run_dir = RunDir::adopt(state.host.run_dir.clone());
            Launcher::adopt(command, run_dir, run_as, drain)?
        }
    };
    // Orphaned grandchildren of workers are re-parented to us and reaped.
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!("becoming a child subreaper: {e}; orphans of workers go to init");
    }

    let (tx, mut rx) = mpsc::channel(256);
    // The signal table. Registered before any child exists (or, after an
    // upgrade, while signals are still blocked), so no exit is missed.
    let signals: [(SignalKind, fn() -> Event); 6] = [
        (SignalKind::hangup(), || Event::Reload),
        (SignalKind::terminate(), || {
            Event::Signal(nix::sys::signal::Signal::SIGTERM)
        }),
        (SignalKind::interrupt(), || {
            Event::Signal(nix::sys::signal::Signal::SIGINT)
        }),
        (SignalKind::quit(), || {
            Event::Signal(nix::sys::signal::Signal::SIGQUIT)
        }),
        (SignalKind::child(), || Event::Child),
        (SignalKind::user_defined2(), || Event::Upgrade {
            binary: None,
            client: None,
        }),
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
    let _watcher = start_watcher(&config, tx.clone())?;
    for l in &listeners {
        tracing::info!("listener `{}` on {}", l.name, l.bound);
    }
    tracing::info!("control socket {}", control.path().display());

    let metrics = config.metrics;
    let mut host = OsHost::new(launcher, listeners, tx.clone(), systemd).with_steer(steer);
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let default_binary = match &carried {
        Some(state) => state.host.default_binary.clone(),
        None => upgrade::started_from(std::path::Path::new(
            argv.first().map_or("baton".as_ref(), |a| a.as_os_str()),
        )),
    };
    let (c_listener, c_dir, c_lock) = control.fds();
    let mut context = upgrade::Context {
        argv,
        default_binary,
        control: Some((control.path().to_path_buf(), c_listener, c_dir, c_lock)),
        metrics: None,
    };
    if let Some(state) = &carried {
        for (number, fds) in upgrade::adopt::workers(state) {
            let worker = state.host.workers.iter().find(|w| w.generation == number);
            let adopted = match (fds, worker) {
                (Ok((channel, notify)), Some(w)) => host
                    .adopt_worker(number, channel, notify, w)
                    .map_err(|e| e.to_string()),
                (Err(e), _) => Err(e.to_string()),
                (_, None) => Err("not described".into()),
            };
            if let Err(e) = adopted {
                tracing::error!("generation {number}: taking over its sockets: {e}");
            }
        }
    }
    let carried_metrics = match &carried {
        Some(state) => upgrade::adopt::metrics(state)?,
        None => None,
    };
    let metrics_listener = match (carried_metrics, metrics) {
        (Some(l), _) => Some(l),
        (None, Some(addr)) => Some(crate::metrics::bind(addr)?),
        (None, None) => None,
    };
    context.metrics = metrics_listener.as_ref().map(|l| l.as_raw_fd());
    host.upgrade_context(context);
    let mut supervisor = Supervisor::new(config, host);
    if let Some(listener) = metrics_listener {
        let (publish, published) = tokio::sync::watch::channel(Default::default());
        let bound = crate::metrics::serve(listener, published, control.connections())?;
        tracing::info!("metrics on http://{bound}/metrics");
        supervisor.publish_metrics(publish);
    }
    match carried {
        None => {
            supervisor.adopt_kept(kept);
            supervisor.start();
        }
        Some(state) => {
            let clients = upgrade::adopt::clients(&state);
            let gap = upgrade::state::monotonic_ns().saturating_sub(state.written_at_ns);
            let gap = Duration::from_nanos(gap);
            supervisor.import(state.table, gap, kept, clients, state.baton_version);
            supervisor.resume();
        }
    }
    // Only now, with the handlers in place and the table built: whoever
    // started baton may have blocked signals, and an upgrade blocks them
    // across its exec (a SIGHUP sent meanwhile is pending, and reloads now).
    set_signals_blocked(false)?;
    let outcome = loop {
        match supervisor.serve(&mut rx).await {
            Outcome::Upgrade => upgrade_now(&mut supervisor, &mut control, &mut rx, &tx).await?,
            outcome => break outcome,
        }
    };
    control.finish(Duration::from_secs(1)).await;
    match outcome {
        Outcome::Stopped => Ok(()),
        Outcome::StopTimedOut(limit) => Err(Error::StopTimedOut(limit)),
        Outcome::FirstGenerationFailed(reason) => Err(Error::FirstGeneration(reason)),
        Outcome::Upgrade => Ok(()),
    }
}

/// The pre-flight passed: quiet the control socket (new clients wait in
/// its queue; those accepted are answered), block signals, handle what is
/// already queued, and exec. Returns only if the upgrade did not happen,
/// with everything as it was.
async fn upgrade_now(
    supervisor: &mut Supervisor<OsHost>,
    control: &mut ControlSocket,
    rx: &mut mpsc::Receiver<Event>,
    tx: &mpsc::Sender<Event>,
) -> Result<(), Error> {
    control.pause();
    {
        let idle = control.idle(CONTROL_QUIET);
        tokio::pin!(idle);
        loop {
            tokio::select! {
                biased;
                () = &mut idle => break,
                Some(event) = rx.recv() => supervisor.handle(event),
            }
        }
    }
    set_signals_blocked(true)?;
    // Signals caught before the block reach the queue on the next turns.
    for _ in 0..3 {
        tokio::task::yield_now().await;
    }
    while let Ok(event) = rx.try_recv() {
        supervisor.handle(event);
    }
    supervisor.exec_upgrade();
    // Still here: it failed or waits; serve on.
    set_signals_blocked(false)?;
    control.serve(tx.clone())
}

/// How long an upgrade waits for the control connections already accepted
/// to be answered before it execs.
const CONTROL_QUIET: Duration = Duration::from_secs(1);

/// Blocks or unblocks every signal for this thread (the only one that
/// matters: tokio's signal handling runs here, and an exec keeps the mask).
fn set_signals_blocked(blocked: bool) -> Result<(), Error> {
    use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow};
    let set = if blocked {
        SigSet::all()
    } else {
        SigSet::empty()
    };
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&set), None).map_err(|e| Error::Io {
        context: "setting the signal mask".into(),
        source: e.into(),
    })
}

fn io(context: &str, source: std::io::Error) -> Error {
    Error::Io {
        context: context.to_owned(),
        source,
    }
}

/// Refuses a listener name given twice: workers find listeners by name.
fn check_names(config: &Config) -> Result<(), Error> {
    for (i, spec) in config.listeners.iter().enumerate() {
        if config.listeners[..i].iter().any(|s| s.name == spec.name) {
            return Err(Error::Usage(format!(
                "--listen {}={}: the name `{}` is given twice; workers find listeners by \
                 name, so each needs its own",
                spec.name, spec.addr, spec.name
            )));
        }
    }
    Ok(())
}

/// Binds every `--listen`, or adopts it from systemd (socket activation,
/// or the store a crashed baton left it in).
fn bind_listeners(config: &Config, activated: &mut Activated) -> Result<Vec<Listener>, Error> {
    config
        .listeners
        .iter()
        .map(|spec| Listener::bind(spec, activated, config.steer_grace.is_some()))
        .collect()
}

/// The kept values a crashed baton left in systemd's store, if any.
fn adopt_kept(activated: &mut Activated, max_state: u64) -> Option<Snapshot> {
    let fd = activated.take_stored(crate::state::STORE_NAME)?;
    let bytes = nix::sys::stat::fstat(&fd).map_or(0, |st| st.st_size as u64);
    match Snapshot::accept(0, bytes, vec![fd], max_state) {
        Ok(kept) => {
            tracing::info!(
                "systemd's store kept {} of kept values from before baton restarted",
                crate::state::size(bytes)
            );
            kept
        }
        Err(reason) => {
            tracing::warn!("systemd's store kept values baton cannot use: {reason}");
            None
        }
    }
}

/// Puts the listeners baton bound itself in systemd's file descriptor
/// store, so that a crash of baton closes none of them; says whether there
/// is a store.
fn use_fd_store(systemd: &Systemd, listeners: &[Listener]) {
    let own: Vec<&Listener> = listeners.iter().filter(|l| l.bound_by_baton()).collect();
    match systemd.fd_store() {
        0 if std::env::var_os("NOTIFY_SOCKET").is_some() => tracing::info!(
            "systemd's file descriptor store is not in use (FileDescriptorStoreMax= is 0 or \
             systemd is older than 254): a crash of baton loses its own listeners' queues and \
             the kept values since"
        ),
        0 => {}
        max if own.len() + 1 > max => tracing::warn!(
            "systemd's file descriptor store takes {max} descriptors; baton needs {} (its \
             listeners and the kept values): raise FileDescriptorStoreMax=",
            own.len() + 1
        ),
        max => {
            for l in &own {
                systemd.store(&l.store_name(), Some(l.fd.as_fd()));
            }
            tracing::info!(
                "systemd's file descriptor store (up to {max}) keeps {} listener(s) and the kept \
                 values across a crash of baton",
                own.len()
            );
        }
    }
}

/// Starts `--watch`, if asked for.
fn start_watcher(
    config: &Config,
    events: mpsc::Sender<Event>,
) -> Result<Option<watch::Watcher>, Error> {
    if config.watch.is_empty() {
        return Ok(None);
    }
    let watcher = watch::start(&config.watch, config.debounce, events)?;
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
    Ok(Some(watcher))
}
