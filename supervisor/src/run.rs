//! `baton run` from start to end: set up, then hand over to the event loop.
//!
//! Start-up in order: check the command line, bind (or adopt) every
//! listener, resolve `--user`, create the control socket, the runtime
//! directory and the launcher, become a child subreaper, unblock and install
//! the signal handlers (before any child exists, so no exit is missed),
//! serve the control socket, start the watcher, and only then start
//! generation 1 and run the loop until it is done. This module never decides
//! anything about a generation: `supervisor/` does.

use std::os::fd::AsFd;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::control::ControlSocket;
use crate::event::Event;
use crate::host::OsHost;
use crate::listener::{Activated, Listener};
use crate::notify::Systemd;
use crate::spawn::{Launcher, RunAs};
use crate::state::Snapshot;
use crate::steer::Steer;
use crate::supervisor::{Config, Outcome, Supervisor};
use crate::watch;
use crate::Error;

/// Runs `baton run` to the end: binds, starts generation 1, serves events
/// until stopped. Returns an error if the first generation never serves.
pub async fn run(config: Config) -> Result<(), Error> {
    let io = |context: &str, source: std::io::Error| Error::Io {
        context: context.to_owned(),
        source,
    };
    check_names(&config)?;
    let systemd = Systemd::from_env();
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
    let run_as = RunAs::resolve(config.user.as_deref(), config.group.as_deref())?;
    let mut control = ControlSocket::bind(&config.control)?;
    let run_parent = control
        .path()
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."))
        .to_path_buf();
    if let Some(r) = &run_as {
        tracing::info!("workers run as {}", r.describe());
    }
    let launcher = Launcher::new(
        config.command.clone(),
        &run_parent,
        run_as,
        config.drain_signal,
    )?;
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
    // The signal table. Registered before any child exists, so no exit is
    // missed.
    let signals: [(SignalKind, fn() -> Event); 5] = [
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
    let host = OsHost::new(launcher, listeners, tx, systemd).with_steer(steer);
    let mut supervisor = Supervisor::new(config, host);
    supervisor.adopt_kept(kept);
    if let Some(addr) = metrics {
        let (publish, published) = tokio::sync::watch::channel(Default::default());
        let bound = crate::metrics::serve(addr, published, control.connections()).await?;
        tracing::info!("metrics on http://{bound}/metrics");
        supervisor.publish_metrics(publish);
    }
    supervisor.start();
    let outcome = supervisor.serve(rx).await;
    control.finish(Duration::from_secs(1)).await;
    match outcome {
        Outcome::Stopped => Ok(()),
        Outcome::StopTimedOut(limit) => Err(Error::StopTimedOut(limit)),
        Outcome::FirstGenerationFailed(reason) => Err(Error::FirstGeneration(reason)),
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
