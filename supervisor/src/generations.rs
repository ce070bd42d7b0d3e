//! The generation table: every started worker the supervisor still has, and
//! where each is in its life.
//!
//! A [`Generation`] is plain data about one worker: its pid, [`Phase`],
//! times, what it said about itself, and the ids of its pending deadlines.
//! The operating system's side of it (its channel, notify socket, reader
//! tasks, exec report) belongs to the host (`host.rs`), keyed by the same
//! number. [`Generations`] answers the loop's questions about the table
//! ("which generation serves?", "how many drain?"). Phases change only in
//! the loop (`supervisor/`); this module never does I/O.

use std::collections::BTreeMap;
use std::time::Instant;

use nix::unistd::Pid;

use crate::event::Timer;
use crate::host::TimerId;

/// Where a generation is in its life (part of the control API, which shows
/// it).
pub use crate::api::Phase;

/// One started worker process.
#[derive(Debug)]
pub struct Generation {
    /// Its number: 1, 2, 3 … in order of start.
    pub number: u64,
    /// Its worker's pid (also its process group).
    pub pid: Pid,
    /// Where it is in its life.
    pub phase: Phase,
    /// When it was started.
    pub started: Instant,
    /// When it became ready, if it did.
    pub serving_since: Option<Instant>,
    /// When it was told to drain, if it was.
    pub draining_since: Option<Instant>,
    /// The worker said `hello`: it drains by message, not by signal, and
    /// keeps values a successor asks for.
    pub speaks_protocol: bool,
    /// Told to freeze for a successor that is not ready yet.
    pub frozen: bool,
    /// It was sent kept values (a snapshot or a checkpoint).
    pub took_state: bool,
    /// The last `STATUS=` it reported.
    pub status: Option<String>,
    /// Pending deadlines (ready, freeze, drain): the start-up ones are
    /// cancelled once it is ready, all of them once it is gone.
    pub timers: Vec<Deadline>,
}

/// A pending deadline of a generation: what it is and when it falls (an
/// upgrade of baton re-arms it with the time it had left).
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    /// The host's id, to cancel it.
    pub id: TimerId,
    /// Which deadline.
    pub timer: Timer,
    /// When it falls.
    pub at: Instant,
}

impl Generation {
    /// A generation whose worker `pid` has just been started.
    pub fn starting(number: u64, pid: Pid) -> Generation {
        Generation {
            number,
            pid,
            phase: Phase::Starting,
            started: Instant::now(),
            serving_since: None,
            draining_since: None,
            speaks_protocol: false,
            frozen: false,
            took_state: false,
            status: None,
            timers: Vec::new(),
        }
    }

    /// Whether it is in `phase`.
    pub fn is(&self, phase: Phase) -> bool {
        self.phase == phase
    }
}

/// Every generation the supervisor still has, by number.
#[derive(Debug, Default)]
pub struct Generations {
    table: BTreeMap<u64, Generation>,
}

impl Generations {
    /// Adds a generation.
    pub fn insert(&mut self, generation: Generation) {
        self.table.insert(generation.number, generation);
    }

    /// Removes generation `number` (it has exited).
    pub fn remove(&mut self, number: u64) -> Option<Generation> {
        self.table.remove(&number)
    }

    /// Generation `number`.
    pub fn get(&self, number: u64) -> Option<&Generation> {
        self.table.get(&number)
    }

    /// Generation `number`, to change.
    pub fn get_mut(&mut self, number: u64) -> Option<&mut Generation> {
        self.table.get_mut(&number)
    }

    /// Whether generation `number` exists and is in `phase`.
    pub fn is(&self, number: u64, phase: Phase) -> bool {
        self.get(number).is_some_and(|g| g.is(phase))
    }

    /// The generation whose worker is `pid`.
    pub fn by_pid(&self, pid: Pid) -> Option<u64> {
        self.table.values().find(|g| g.pid == pid).map(|g| g.number)
    }

    /// The serving generation: the newest, while two serve.
    pub fn serving(&self) -> Option<u64> {
        self.numbers_in(Phase::Serving).last().copied()
    }

    /// The numbers of the generations in `phase`, oldest first.
    pub fn numbers_in(&self, phase: Phase) -> Vec<u64> {
        self.table
            .values()
            .filter(|g| g.is(phase))
            .map(|g| g.number)
            .collect()
    }

    /// Every generation's number, oldest first.
    pub fn numbers(&self) -> Vec<u64> {
        self.table.keys().copied().collect()
    }

    /// Every generation, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Generation> {
        self.table.values()
    }

    /// Whether no generation is left.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}
