//! What crosses an upgrade's exec: the hand-over state, typed and
//! versioned, and its sealed memfd.
//!
//! [`Handover`] describes everything the new supervisor needs to go on
//! where the old one stopped: the generation table (phases, pids, ages,
//! each pending deadline as the time it had left), the kept values, the
//! counters, and the number of every descriptor that crosses the exec
//! (listeners, control socket, each worker's channel and notify socket, the
//! kept snapshot, the clients waiting for the upgrade's answer). It is JSON
//! in a memfd sealed against every change; the memfd's number is in
//! [`STATE_FD_ENV`] (after the exec) or `--state-fd` (in the pre-flight).
//!
//! Versioning: [`STATE_VERSION`] grows when the meaning of a field changes
//! or a field is added that an older baton must not ignore. A newer baton
//! reads every older version (fields added later are `#[serde(default)]`);
//! an older baton refuses a newer version in its pre-flight, so a downgrade
//! is a clear error, never a half-read table. This module never execs and
//! never touches the generation table: it only writes and reads the state.

use std::io::{Read, Seek, Write};
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::api::{LastReload, LastUpgrade, Phase, ReloadCounts, UpgradeCounts};
use crate::event::Timer;
use crate::metrics::Metrics;
use crate::steer::Side;

/// The hand-over format this baton writes, and the newest it reads.
/// Version 2: the kept values may be a pair, a pre-copy and the values
/// written since (`CarriedKept::base`), which a version-1 baton would take
/// for whole values.
pub const STATE_VERSION: u32 = 2;
/// The environment variable that gives the new supervisor its state's fd.
pub const STATE_FD_ENV: &str = "BATON_UPGRADE_STATE_FD";
/// The largest state read (a table of a few thousand generations fits).
const MAX_STATE: u64 = 16 << 20;

/// Everything the new supervisor is handed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Handover {
    /// The format's version ([`STATE_VERSION`] when written by this baton).
    pub version: u32,
    /// The version of the baton that wrote it.
    pub baton_version: String,
    /// `CLOCK_MONOTONIC` when it was written, in nanoseconds: the new
    /// supervisor subtracts the time since from every deadline.
    pub written_at_ns: u64,
    /// The event loop's part.
    pub table: Table,
    /// The operating system's part: which descriptor is what.
    pub host: HostFds,
}

/// The event loop's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Table {
    /// The number the next generation gets.
    pub next_generation: u64,
    /// Every generation, oldest first.
    pub generations: Vec<CarriedGeneration>,
    /// The kept values baton holds (a snapshot or a checkpoint).
    pub kept: Option<CarriedKept>,
    /// Reload counts.
    pub reloads: ReloadCounts,
    /// How the last reload (or restart) ended.
    pub last_reload: Option<LastReload>,
    /// The first generation has served.
    pub ever_served: bool,
    /// A reload was asked for (SIGHUP) while the upgrade ran: it starts
    /// right after.
    #[serde(default)]
    pub reload_queued: bool,
    /// The crash restart's back-off, in milliseconds.
    pub restart_delay_ms: u64,
    /// The metrics' counters.
    pub metrics: Metrics,
    /// Upgrades so far (this one not counted yet).
    #[serde(default)]
    pub upgrades: UpgradeCounts,
    /// How the last upgrade before this one ended.
    #[serde(default)]
    pub last_upgrade: Option<LastUpgrade>,
    /// This upgrade.
    pub upgrade: CarriedUpgrade,
    /// `--steer`: the generations in their grace (no new connections, not
    /// yet told to drain); the grace's time left is their `steer_grace`
    /// timer. Absent without `--steer`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steer_graced: Vec<CarriedGrace>,
}

/// `--steer`: a generation in its grace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedGrace {
    /// The generation.
    pub generation: u64,
    /// How long it had got no new connections, in milliseconds (its
    /// graces end at `--drain-timeout` plus one grace in all).
    pub waited_ms: u64,
    /// Why it was replaced, for its drain message.
    pub why: String,
}

/// `--steer`'s host side: the second sockets and who is on which side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedSteer {
    /// Each TCP listener's second socket: the listener's position in
    /// `--listen` order, and the descriptor.
    pub twins: Vec<(usize, RawFd)>,
    /// Each living generation's side.
    pub sides: Vec<(u64, Side)>,
    /// The side new connections go to (the steering program's target).
    pub target: Side,
}

/// One generation, as it crosses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CarriedGeneration {
    /// Its number.
    pub number: u64,
    /// Its worker's pid.
    pub pid: i32,
    /// Where it is in its life.
    pub phase: Phase,
    /// How long ago it started, in milliseconds.
    pub age_ms: u64,
    /// How long it has served, if it became ready.
    pub serving_ms: Option<u64>,
    /// How long it has drained, if it was told to.
    pub draining_ms: Option<u64>,
    /// It speaks the worker protocol.
    pub speaks_protocol: bool,
    /// It is frozen for a successor.
    pub frozen: bool,
    /// It was sent kept values.
    pub took_state: bool,
    /// It is writing a pre-copy of its kept values for a successor.
    #[serde(default)]
    pub pre_copy: bool,
    /// It asked for its predecessor's pre-copy and waits for it.
    #[serde(default)]
    pub awaits_pre_copy: bool,
    /// The last `STATUS=` it reported.
    pub status: Option<String>,
    /// Its pending deadlines, each with the time it had left.
    pub timers: Vec<CarriedTimer>,
}

/// A pending deadline and the time it had left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedTimer {
    /// Which deadline.
    pub timer: Timer,
    /// Milliseconds left when the state was written.
    pub remaining_ms: u64,
}

/// The kept values baton holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedKept {
    /// The generation that wrote them.
    pub generation: u64,
    /// Their size.
    pub bytes: u64,
    /// The sealed memfd's descriptor.
    pub fd: RawFd,
    /// For the snapshot of a freeze that followed a pre-copy: the pre-copy,
    /// holding every value this one does not (version 2).
    #[serde(default)]
    pub base: Option<Box<CarriedKept>>,
}

impl CarriedKept {
    /// Its descriptors: its own, then its base's.
    pub fn fds(&self) -> Vec<RawFd> {
        let mut fds = vec![self.fd];
        fds.extend(self.base.iter().flat_map(|b| b.fds()));
        fds
    }
}

/// The upgrade in progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CarriedUpgrade {
    /// The binary being executed.
    pub to: PathBuf,
    /// How long the upgrade had run when the state was written, in ms.
    pub elapsed_ms: u64,
    /// Connections of `baton upgrade --wait` clients, answered by the new
    /// supervisor.
    pub clients: Vec<RawFd>,
}

/// The operating system's side: each descriptor that crosses, by role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFds {
    /// The listeners, in `--listen` order: name and descriptor.
    pub listeners: Vec<(String, RawFd)>,
    /// Each generation's channel and notify socket.
    pub workers: Vec<CarriedWorker>,
    /// The runtime directory holding the notify sockets (kept, not made anew).
    pub run_dir: PathBuf,
    /// The control socket.
    pub control: CarriedControl,
    /// The `--metrics` listener.
    pub metrics: Option<RawFd>,
    /// The path baton was started from: where SIGUSR2 upgrades from.
    pub default_binary: PathBuf,
    /// `--steer`'s second sockets and sides. Absent without `--steer`, so
    /// a state without it is byte for byte what a baton before `--steer`
    /// wrote (no version bump: an older baton can only meet this field
    /// under `--steer`, which its pre-flight refuses as an argument).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steer: Option<CarriedSteer>,
}

/// One generation's descriptors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedWorker {
    /// The generation.
    pub generation: u64,
    /// The supervisor's end of its channel.
    pub channel: RawFd,
    /// Its notify socket.
    pub notify: RawFd,
    /// The notify socket's file.
    pub notify_path: PathBuf,
    /// The uid whose datagrams count on it.
    pub notify_uid: u32,
}

/// The control socket's descriptors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedControl {
    /// Its path.
    pub path: PathBuf,
    /// The listening socket.
    pub listener: RawFd,
    /// Its directory, opened `O_NOFOLLOW`.
    pub dir: RawFd,
    /// The lock file (its `flock` goes with the open file).
    pub lock: RawFd,
}

impl Handover {
    /// Every descriptor number the state names, to clear close-on-exec on
    /// (and, after the exec, to check that none is named twice).
    pub fn fds(&self) -> Vec<RawFd> {
        let h = &self.host;
        let mut fds: Vec<RawFd> = h.listeners.iter().map(|(_, fd)| *fd).collect();
        for w in &h.workers {
            fds.extend([w.channel, w.notify]);
        }
        fds.extend([h.control.listener, h.control.dir, h.control.lock]);
        fds.extend(h.metrics);
        fds.extend(self.table.kept.iter().flat_map(CarriedKept::fds));
        fds.extend(&self.table.upgrade.clients);
        if let Some(steer) = &h.steer {
            fds.extend(steer.twins.iter().map(|(_, fd)| *fd));
        }
        fds
    }

    /// Checks what JSON alone cannot: no descriptor below 3 or named twice,
    /// each worker's generation in the table.
    pub fn check(&self) -> Result<(), String> {
        let mut fds = self.fds();
        fds.sort_unstable();
        if let Some(fd) = fds.iter().find(|fd| **fd < 3) {
            return Err(format!("it names descriptor {fd}, below 3"));
        }
        if let Some(w) = fds.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!("it names descriptor {} twice", w[0]));
        }
        if let Some((listener, _)) = self
            .host
            .steer
            .iter()
            .flat_map(|s| &s.twins)
            .find(|(l, _)| *l >= self.host.listeners.len())
        {
            return Err(format!(
                "a second socket of listener {listener}, but it carries {} listener(s)",
                self.host.listeners.len()
            ));
        }
        let known = |n: u64| self.table.generations.iter().any(|g| g.number == n);
        if let Some(w) = self.host.workers.iter().find(|w| !known(w.generation)) {
            return Err(format!(
                "descriptors of generation {}, which is not in its table",
                w.generation
            ));
        }
        Ok(())
    }

    /// Writes the state into a new memfd sealed against every change.
    pub fn to_memfd(&self) -> std::io::Result<OwnedFd> {
        use nix::sys::memfd::{memfd_create, MFdFlags};
        let fd = memfd_create(
            c"baton-upgrade-state",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )?;
        let mut file = std::fs::File::from(fd);
        serde_json::to_writer(&mut file, self)?;
        file.flush()?;
        let fd = OwnedFd::from(file);
        let seals = nix::fcntl::SealFlag::from_bits_truncate(
            baton_worker::protocol::SNAPSHOT_SEALS | libc::F_SEAL_SEAL,
        );
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_ADD_SEALS(seals))?;
        Ok(fd)
    }

    /// Reads a state from `fd` (from its start), checking its version
    /// before anything else: a newer one is refused with what to do.
    pub fn read(fd: impl AsFd) -> Result<Handover, String> {
        let fd = fd.as_fd().try_clone_to_owned().map_err(|e| e.to_string())?;
        let mut file = std::fs::File::from(fd);
        file.rewind()
            .map_err(|e| format!("rewinding the state: {e}"))?;
        let mut text = String::new();
        file.take(MAX_STATE + 1)
            .read_to_string(&mut text)
            .map_err(|e| format!("reading the state: {e}"))?;
        if text.len() as u64 > MAX_STATE {
            return Err(format!("the state is larger than {MAX_STATE} bytes"));
        }
        Handover::parse(&text)
    }

    /// Parses a state, version first.
    pub fn parse(text: &str) -> Result<Handover, String> {
        #[derive(Deserialize)]
        struct Head {
            version: u32,
            #[serde(default)]
            baton_version: String,
        }
        let head: Head = serde_json::from_str(text)
            .map_err(|e| format!("the state is not a baton hand-over state: {e}"))?;
        if head.version > STATE_VERSION {
            return Err(format!(
                "the state is version {} (written by baton {}), newer than the version {} this \
                 baton {} reads: a downgrade across hand-over versions needs a restart",
                head.version,
                head.baton_version,
                STATE_VERSION,
                env!("CARGO_PKG_VERSION")
            ));
        }
        let state: Handover =
            serde_json::from_str(text).map_err(|e| format!("reading the state: {e}"))?;
        state
            .check()
            .map_err(|e| format!("the state is unusable: {e}"))?;
        Ok(state)
    }
}

/// `CLOCK_MONOTONIC` now, in nanoseconds (it runs on across an exec).
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}
