//! Kept values: state that survives a reload.
//!
//! [`Kept<T>`] is a value a worker asked to keep under a name
//! ([`Worker::keep`](crate::Worker::keep)). The generation before wrote its
//! values into a snapshot when it was frozen; this one reads them back, or
//! starts from `init()`.
//!
//! **Exactness.** A freeze first waits for the work in flight (the
//! [`InFlight`] guards the serving loops hold), then serializes each value
//! under that value's own lock and marks it frozen before letting go of the
//! lock; every write checks the mark under the same lock. So a write either
//! lands before the value is serialized (and is in the snapshot) or after
//! (and is refused: [`Kept::update`] returns [`Frozen`], counted in
//! [`Worker::writes_refused`](crate::Worker::writes_refused)). Nothing is
//! acknowledged that is not handed over. If the successor fails, the worker
//! thaws and takes writes again.
//!
//! **Pre-copy.** Every write also marks its value dirty under the lock; a
//! pre-copy writes every value while the worker serves on and marks each
//! clean as it is written. The freeze that follows writes only the dirty
//! values (`"delta": true`) and sends the pre-copy along, so the accept
//! pause depends on what changed, not on everything kept.
//!
//! **The snapshot** is one JSON document, `{"format": N, "values": {name:
//! value, ...}}` (JSON: readable and migratable; MessagePack and postcard,
//! measured, encode about twice as fast but decode no faster, and with the
//! pre-copy only what changed is encoded inside the accept pause), written
//! straight into a memfd (no copy in between), sealed, and passed to the
//! supervisor, which hands the same memfd to the successor.
//! `format` is the program's own state version
//! ([`Builder::state_format`](crate::Builder::state_format)); a successor with
//! a newer version migrates older snapshots with its hook, and one that
//! cannot read a snapshot rejects it, which fails the reload before cut-over.
//!
//! This module never talks to the supervisor itself: `channel.rs` does.

use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::watch;

use crate::protocol::SNAPSHOT_SEALS;

/// A migration hook: upgrades the values of a snapshot written with state
/// format `from` (older than this program's) in place, or says why it cannot.
pub type Migrate = Arc<dyn Fn(u32, &mut Map<String, Value>) -> Result<(), String> + Send + Sync>;

/// A value kept across reloads. Cheap to clone; every clone is the same
/// value. Reads and writes take a lock: keep the closures short.
///
/// ```no_run
/// # async fn doc(worker: baton_worker::Worker) -> Result<(), baton_worker::Error> {
/// let hits = worker.keep("hits", || 0u64).await?;
/// let now = hits.update(|n| {
///     *n += 1;
///     *n
/// });
/// let seen = hits.get();
/// # Ok(()) }
/// ```
pub struct Kept<T> {
    slot: Arc<Slot<T>>,
    shared: Arc<Shared>,
}

impl<T> Clone for Kept<T> {
    fn clone(&self) -> Self {
        Kept {
            slot: self.slot.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for Kept<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kept")
            .field("name", &self.slot.name)
            .field("value", &*self.slot.read())
            .finish()
    }
}

/// The error of [`Kept::update`] once this generation's values have been
/// handed to the next generation: a write now would not reach it, so it is
/// refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("kept value `{name}` is frozen: this generation's values were handed to the next one, so the write was refused")]
pub struct Frozen {
    /// The value's name.
    pub name: String,
}

/// Work in flight that may write kept values: a freeze waits until every
/// such guard is dropped (up to the freeze grace) before it writes the
/// snapshot, so the writes this work makes are handed over. Made by
/// [`Worker::in_flight`](crate::Worker::in_flight); the SDK's serving holds
/// one per connection already.
#[derive(Debug)]
#[must_use = "the freeze waits only while the guard lives"]
pub struct InFlight {
    shared: Arc<Shared>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.shared.busy.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl<T> Kept<T> {
    /// The kept value's name.
    pub fn name(&self) -> &str {
        &self.slot.name
    }

    /// Reads the value.
    pub fn read<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        f(&self.slot.read())
    }

    /// A copy of the value.
    pub fn get(&self) -> T
    where
        T: Clone,
    {
        self.slot.read().clone()
    }

    /// Changes the value, unless this generation's values were already
    /// handed to the next one: then nothing changes, the write is counted
    /// in [`Worker::writes_refused`](crate::Worker::writes_refused), and the
    /// error says so. Answer the request that asked for the write with an
    /// error (with feature `axum`, [`Frozen`] is a response: `503` with
    /// `Retry-After` and `Connection: close`), never with a success: the
    /// write is not in the values the next generation starts with.
    ///
    /// A write can only be refused after a freeze whose grace ran out with
    /// this write's request still running (see the crate docs, "Exact
    /// hand-over"), or on a handler that runs outside the SDK's serving.
    pub fn update<R>(&self, f: impl FnOnce(&mut T) -> R) -> Result<R, Frozen> {
        let mut value = self.slot.write();
        if self.slot.frozen.load(Ordering::SeqCst) {
            self.shared.report_refused_write(&self.slot.name);
            return Err(Frozen {
                name: self.slot.name.clone(),
            });
        }
        self.slot.dirty.store(true, Ordering::Relaxed);
        Ok(f(&mut value))
    }

    /// Replaces the value (see [`update`](Self::update) for when a write is
    /// refused).
    pub fn set(&self, value: T) -> Result<(), Frozen> {
        self.update(|v| *v = value)
    }
}

/// One kept value and its name.
struct Slot<T> {
    name: String,
    value: RwLock<T>,
    /// Set, under `value`'s lock, once the value went into a freeze's
    /// snapshot; cleared by a thaw.
    frozen: AtomicBool,
    /// Set by every write, under `value`'s lock; cleared when the value is
    /// written into a pre-copy (so a freeze sends only what changed since).
    dirty: AtomicBool,
}

impl<T> Slot<T> {
    /// Readers, the snapshot writer included, share the value: a
    /// checkpoint serializing a large value holds up no freeze (which only
    /// needs writers out to mark it) and no reader.
    fn read(&self) -> RwLockReadGuard<'_, T> {
        self.value.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// A writer excludes everyone else.
    fn write(&self) -> RwLockWriteGuard<'_, T> {
        self.value.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What a snapshot is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// A checkpoint: every value; nothing is marked.
    Checkpoint,
    /// A pre-copy, while this generation serves on: every value, each
    /// marked clean under its lock as it is written.
    PreCopy,
    /// A freeze: every value is marked frozen under its lock; with a
    /// pre-copy held, only the values written since it are written.
    Freeze,
    /// A freeze for a successor that cannot read a delta (an older SDK):
    /// every value, each marked frozen.
    FreezeWhole,
}

/// What the snapshot writer needs of a kept value, whatever its type.
trait Erased: Send + Sync {
    fn name(&self) -> &str;
    /// Writes `,"name":value` (no comma when `first`) if `purpose` wants
    /// this value (`delta`: only if written since the pre-copy), and marks
    /// it as `purpose` says, under the same lock. Returns whether it wrote.
    fn write_entry(
        &self,
        out: &mut dyn Write,
        purpose: Purpose,
        delta: bool,
        first: bool,
    ) -> serde_json::Result<bool>;
    fn thaw(&self);
}

impl<T: Serialize + Send + Sync> Erased for Slot<T> {
    fn name(&self) -> &str {
        &self.name
    }

    fn write_entry(
        &self,
        out: &mut dyn Write,
        purpose: Purpose,
        delta: bool,
        first: bool,
    ) -> serde_json::Result<bool> {
        let value = self.read();
        let write = !delta || self.dirty.load(Ordering::SeqCst);
        if write {
            if !first {
                out.write_all(b",").map_err(serde_json::Error::io)?;
            }
            serde_json::to_writer(&mut *out, &self.name)?;
            out.write_all(b":").map_err(serde_json::Error::io)?;
            serde_json::to_writer(&mut *out, &*value)?;
        }
        match purpose {
            Purpose::Checkpoint => {}
            Purpose::PreCopy => self.dirty.store(false, Ordering::SeqCst),
            Purpose::Freeze | Purpose::FreezeWhole => self.frozen.store(true, Ordering::SeqCst),
        }
        Ok(write)
    }

    fn thaw(&self) {
        let _value = self.write();
        self.frozen.store(false, Ordering::SeqCst);
    }
}

/// A snapshot written into a sealed memfd.
#[derive(Debug)]
pub(crate) struct Written {
    pub(crate) fd: OwnedFd,
    pub(crate) bytes: u64,
    /// For a freeze after a pre-copy: the pre-copy (this snapshot holds only
    /// the values written since), to send along.
    pub(crate) base: Option<(OwnedFd, u64)>,
}

/// The state of one worker: its kept values, the frozen flag, and the
/// values the previous generation left for it.
pub(crate) struct Shared {
    /// Set by a freeze before any value is serialized; read under each
    /// value's lock.
    frozen: AtomicBool,
    /// Watched by `http::serve_worker`: accept only while not frozen.
    gate: watch::Sender<bool>,
    /// Writes refused because they came after a freeze's snapshot.
    refused_writes: AtomicU64,
    /// Whether the current freeze has logged its first refused write.
    refused_logged: AtomicBool,
    /// Work that a freeze waits for before it writes the snapshot: accept
    /// loops that are accepting, connections, [`InFlight`] guards.
    busy: watch::Sender<usize>,
    /// Every kept value, in the order they were kept.
    registry: Mutex<Vec<Arc<dyn Erased>>>,
    /// Set, under `registry`'s lock, when a freeze's snapshot took the list
    /// of values; cleared by a thaw.
    handed: AtomicBool,
    /// The last pre-copy this generation wrote (its own descriptor of the
    /// sealed memfd, and its size): a freeze then writes only what changed
    /// since and sends it along.
    base: Mutex<Option<(OwnedFd, u64)>>,
    /// Set when this generation started from a snapshot that needed its
    /// pre-copy: `ready` then checkpoints every value once, so baton holds
    /// a whole snapshot again.
    pub(crate) rebase: AtomicBool,
    /// Whether `keep` asks for a pre-copy (`Builder::pre_copy`).
    pub(crate) pre_copy: AtomicBool,
    /// This program's state format.
    pub(crate) format: u32,
    pub(crate) migrate: Option<Migrate>,
    /// The previous generation's values not yet claimed by a `keep`;
    /// `None` until loaded.
    pub(crate) previous: tokio::sync::OnceCell<Mutex<Map<String, Value>>>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("State")
            .field("frozen", &self.frozen.load(Ordering::Relaxed))
            .field(
                "refused_writes",
                &self.refused_writes.load(Ordering::Relaxed),
            )
            .field("busy", &*self.busy.borrow())
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub(crate) fn new(format: u32, migrate: Option<Migrate>) -> Shared {
        Shared {
            frozen: AtomicBool::new(false),
            gate: watch::channel(false).0,
            refused_writes: AtomicU64::new(0),
            refused_logged: AtomicBool::new(false),
            busy: watch::channel(0).0,
            registry: Mutex::new(Vec::new()),
            handed: AtomicBool::new(false),
            base: Mutex::new(None),
            rebase: AtomicBool::new(false),
            pre_copy: AtomicBool::new(true),
            format,
            migrate,
            previous: tokio::sync::OnceCell::new(),
        }
    }

    /// Registers a new kept value; `Err` if the name is taken.
    pub(crate) fn register<T>(self: &Arc<Self>, name: &str, value: T) -> Result<Kept<T>, ()>
    where
        T: Serialize + Send + Sync + 'static,
    {
        let mut registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        if registry.iter().any(|e| e.name() == name) {
            return Err(());
        }
        let slot = Arc::new(Slot {
            name: name.to_owned(),
            value: RwLock::new(value),
            // A value kept after a freeze's snapshot (odd, but possible)
            // is not in it: born frozen.
            frozen: AtomicBool::new(self.handed.load(Ordering::SeqCst)),
            dirty: AtomicBool::new(true),
        });
        registry.push(slot.clone());
        Ok(Kept {
            slot,
            shared: self.clone(),
        })
    }

    fn report_refused_write(&self, name: &str) {
        self.refused_writes.fetch_add(1, Ordering::SeqCst);
        if !self.refused_logged.swap(true, Ordering::SeqCst) {
            tracing::warn!(
                "refused a write to kept value `{name}`: this generation's values were already \
                 handed to the next one (further refused writes are counted, not logged)"
            );
        }
    }

    pub(crate) fn refused_writes(&self) -> u64 {
        self.refused_writes.load(Ordering::SeqCst)
    }

    /// Marks work a freeze must wait for, until the guard is dropped.
    pub(crate) fn in_flight(self: &Arc<Self>) -> InFlight {
        self.busy.send_modify(|n| *n += 1);
        InFlight {
            shared: self.clone(),
        }
    }

    /// How much work is in flight.
    pub(crate) fn busy(&self) -> usize {
        *self.busy.borrow()
    }

    /// Resolves once no work is in flight.
    pub(crate) async fn quiet(&self) {
        let mut rx = self.busy.subscribe();
        // The sender lives in `self`: it cannot be dropped meanwhile.
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    pub(crate) fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::SeqCst)
    }

    pub(crate) fn gate(&self) -> watch::Receiver<bool> {
        self.gate.subscribe()
    }

    /// Freezes: the accept gate closes, and [`snapshot`](Self::snapshot)
    /// with `freeze` marks each value as it writes it.
    pub(crate) fn freeze(&self) {
        self.refused_logged.store(false, Ordering::SeqCst);
        self.frozen.store(true, Ordering::SeqCst);
        self.gate.send_replace(true);
    }

    /// Thaws: the successor failed, this generation's values are live again.
    pub(crate) fn thaw(&self) {
        for value in self.values() {
            value.thaw();
        }
        self.handed.store(false, Ordering::SeqCst);
        self.frozen.store(false, Ordering::SeqCst);
        self.gate.send_replace(false);
    }

    fn values(&self) -> Vec<Arc<dyn Erased>> {
        self.registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Writes the kept values into a new sealed memfd for `purpose`, or
    /// `None` when nothing is kept. Blocking: run it off the async threads
    /// for large values.
    ///
    /// The document is `{"format": N, "values": {name: value, ...}}`, with
    /// `"delta": true` when it holds only the values written since the
    /// pre-copy sent along with it.
    pub(crate) fn snapshot(&self, purpose: Purpose) -> std::io::Result<Option<Written>> {
        let values = {
            let registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
            if matches!(purpose, Purpose::Freeze | Purpose::FreezeWhole) {
                self.handed.store(true, Ordering::SeqCst);
            }
            registry.clone()
        };
        if values.is_empty() {
            return Ok(None);
        }
        let base = match purpose {
            Purpose::Freeze => {
                let base = self.base.lock().unwrap_or_else(PoisonError::into_inner);
                match &*base {
                    Some((fd, bytes)) => Some((fd.try_clone()?, *bytes)),
                    None => None,
                }
            }
            _ => None,
        };
        let delta = base.is_some();
        let fd = nix::sys::memfd::memfd_create(
            c"baton-snapshot",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC | nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING,
        )?;
        let file = File::from(fd);
        {
            let mut out = BufWriter::with_capacity(1 << 16, &file);
            write!(out, "{{\"format\":{},", self.format)?;
            if delta {
                out.write_all(b"\"delta\":true,")?;
            }
            out.write_all(b"\"values\":{")?;
            let mut first = true;
            for value in &values {
                let wrote = value
                    .write_entry(&mut out, purpose, delta, first)
                    .map_err(|e| {
                        std::io::Error::other(format!(
                            "serializing kept value `{}`: {e}",
                            value.name()
                        ))
                    })?;
                first &= !wrote;
            }
            out.write_all(b"}}")?;
            out.flush()?;
        }
        let bytes = file.metadata()?.len();
        let fd = OwnedFd::from(file);
        nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_ADD_SEALS(nix::fcntl::SealFlag::from_bits_truncate(
                SNAPSHOT_SEALS,
            )),
        )?;
        if purpose == Purpose::PreCopy {
            *self.base.lock().unwrap_or_else(PoisonError::into_inner) =
                Some((fd.try_clone()?, bytes));
        }
        Ok(Some(Written { fd, bytes, base }))
    }

    /// Reads a snapshot the supervisor passed (announced as `bytes` long),
    /// migrating older formats; `Err` is the reason to reject it.
    ///
    /// The memfd is checked before anything is allocated or mapped (see
    /// [`checked_len`]): a size that disagrees with the file is refused, so
    /// a wrong or hostile announcement never makes this allocate, map or
    /// parse more than the sealed file really holds.
    #[cfg(test)]
    pub(crate) fn load(&self, fd: OwnedFd, bytes: u64) -> Result<Map<String, Value>, String> {
        self.finish(None, parse(fd, bytes)?)
    }

    /// The values of `top`, over those of the pre-copy `base` when `top`
    /// holds only what was written since; migrated from older formats.
    /// `Err` is the reason to reject them.
    pub(crate) fn finish(&self, base: Option<Doc>, top: Doc) -> Result<Map<String, Value>, String> {
        let (format, mut values) = if top.delta {
            let Some(mut base) = base else {
                return Err(
                    "the snapshot holds only the values written since a pre-copy, and the \
                     pre-copy did not come with it"
                        .to_owned(),
                );
            };
            if base.format != top.format {
                return Err(format!(
                    "the snapshot has state format {} but its pre-copy has {}",
                    top.format, base.format
                ));
            }
            base.values.extend(top.values);
            (top.format, base.values)
        } else {
            (top.format, top.values)
        };
        if format > self.format {
            return Err(format!(
                "the snapshot has state format {}, newer than this program's {} (a newer \
                 version wrote it; roll forward, or teach this one to read it)",
                format, self.format
            ));
        }
        if format < self.format {
            let Some(migrate) = &self.migrate else {
                return Err(format!(
                    "the snapshot has state format {} and this program has {}, but no migration \
                     (Builder::migrate_state)",
                    format, self.format
                ));
            };
            migrate(format, &mut values).map_err(|e| {
                format!(
                    "migrating the snapshot from format {} to {}: {e}",
                    format, self.format
                )
            })?;
        }
        Ok(values)
    }
}

/// Reads a snapshot the supervisor passed (announced as `bytes` long).
///
/// The memfd is checked before anything is allocated or mapped (see
/// [`checked_len`]): a size that disagrees with the file is refused, so a
/// wrong or hostile announcement never makes this allocate, map or parse
/// more than the sealed file really holds.
pub(crate) fn parse(fd: OwnedFd, bytes: u64) -> Result<Doc, String> {
    let len = checked_len(&fd, bytes)?;
    // Parsed straight from a read-only mapping of the sealed memfd: the
    // bytes the old generation wrote are read once, never copied.
    match crate::sys::Mapped::sealed(&fd, len) {
        Ok(mapped) => serde_json::from_slice(mapped.bytes()),
        Err(e) => {
            tracing::debug!("mapping the snapshot: {e}; reading it instead");
            // `len` is the sealed file's own size, checked above.
            let mut buf = vec![0u8; len];
            // Positioned reads: the descriptor's offset is shared with
            // every other holder of this memfd.
            File::from(fd)
                .read_exact_at(&mut buf, 0)
                .map_err(|e| format!("reading the snapshot: {e}"))?;
            serde_json::from_slice(&buf)
        }
    }
    .map_err(|e| format!("parsing the snapshot: {e}"))
}

/// The memfd's identity (device and inode): the same memfd passed on by
/// the supervisor has the same one.
pub(crate) fn identity(fd: &OwnedFd) -> Option<(u64, u64)> {
    let stat = nix::sys::stat::fstat(fd).ok()?;
    Some((stat.st_dev, stat.st_ino))
}

/// The seals without which a snapshot's size could change after it was
/// checked (`F_SEAL_SEAL` adds nothing to that: seals are never removed).
const SIZE_AND_CONTENT_SEALS: libc::c_int =
    libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;

/// Checks a snapshot memfd against the size the supervisor announced, before
/// a byte of it is allocated, mapped or parsed: it must be sealed against
/// writing, growing and shrinking (so what is checked stays true), and its
/// real size (`fstat`) must be exactly `bytes`. Returns that size.
fn checked_len(fd: &OwnedFd, bytes: u64) -> Result<usize, String> {
    let seals = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GET_SEALS)
        .map_err(|e| format!("checking the snapshot's seals: not a sealable memfd ({e})"))?;
    if seals & SIZE_AND_CONTENT_SEALS != SIZE_AND_CONTENT_SEALS {
        return Err(
            "checking the snapshot's seals: the memfd is not sealed against writing, growing \
             and shrinking"
                .to_owned(),
        );
    }
    let size = nix::sys::stat::fstat(fd)
        .map_err(|e| format!("checking the snapshot's size: fstat: {e}"))?
        .st_size;
    if u64::try_from(size).ok() != Some(bytes) {
        return Err(format!(
            "checking the snapshot's size: the supervisor announced {bytes} bytes but the memfd \
             holds {size}"
        ));
    }
    usize::try_from(bytes).map_err(|_| {
        format!("checking the snapshot's size: {bytes} bytes do not fit in this process's memory")
    })
}

/// A snapshot document as written by [`Shared::snapshot`].
#[derive(Debug, serde::Deserialize)]
pub(crate) struct Doc {
    format: u32,
    /// It holds only the values written since a pre-copy.
    #[serde(default)]
    delta: bool,
    values: Map<String, Value>,
}

/// Takes `name` out of the previous generation's values and decodes it.
pub(crate) fn claim<T: DeserializeOwned>(
    previous: &Mutex<Map<String, Value>>,
    name: &str,
) -> Result<Option<T>, String> {
    let value = previous
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(name);
    match value {
        None => Ok(None),
        Some(v) => serde_json::from_value(v).map(Some).map_err(|e| {
            format!(
                "kept value `{name}` does not read as {}: {e}",
                std::any::type_name::<T>()
            )
        }),
    }
}

#[cfg(test)]
mod tests;
