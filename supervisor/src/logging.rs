//! Logging to stderr, shaped for where it lands, without ever waiting for it.
//!
//! Under systemd (`JOURNAL_STREAM` set, so stderr is the journal) each line
//! starts with a syslog priority prefix (`<3>` error … `<7>` debug), which
//! journald turns into the entry's priority, and carries no timestamp of its
//! own (the journal has one). In a terminal: time, level, colours.
//! `BATON_LOG` filters (`debug`, `baton=trace`, …); the default is `info`.
//!
//! stderr can stop draining (a stalled journald, a terminal on scroll-lock,
//! a pipe nobody reads), and the event loop must not stop with it. So log
//! lines, the echoed `--build` output and the final error line only go into a
//! queue holding at most [`QUEUE_LIMIT`] bytes; one thread, `baton-stderr`,
//! owns stderr and does the blocking writes. When the queue is full, output
//! is dropped and counted, and the count is written as a warning where the
//! gap is, once output flows again. Nothing here blocks its caller except
//! [`flush`], which waits a bounded time, at exit. Before [`init`], output is
//! discarded.

use std::cell::Cell;
use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::OnceLock;
use std::time::Duration;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// How many bytes may wait for stderr; output past that is dropped. A
/// megabyte is thousands of log lines: a stall of seconds loses nothing.
pub const QUEUE_LIMIT: usize = 1 << 20;

/// What the `baton-stderr` thread is sent. The channel is unbounded so that
/// a drop count or a flush is never refused; [`QUEUED`] bounds the output.
enum Message {
    /// Bytes to write: one log line, or a chunk of the build's output.
    Output { kind: Kind, bytes: Vec<u8> },
    /// This much was dropped here: say so, as a warning.
    Dropped { lines: u64, bytes: u64 },
    /// Everything before has been written (or failed): answer.
    Flush(SyncSender<()>),
}

/// What dropped output is counted as.
#[derive(Clone, Copy)]
enum Kind {
    /// A log line (or the final error line), counted in lines.
    Line,
    /// The build's output, counted in bytes (it is not split into lines).
    Build,
}

/// The way to the `baton-stderr` thread, which runs for baton's life: this
/// sender is never dropped. Set once, by [`init`].
static WRITER: OnceLock<Sender<Message>> = OnceLock::new();
/// Bytes sent to the `baton-stderr` thread and not yet written.
static QUEUED: AtomicUsize = AtomicUsize::new(0);
/// Log lines dropped since the count was last taken.
static DROPPED_LINES: AtomicU64 = AtomicU64::new(0);
/// Bytes of build output dropped since the count was last taken.
static DROPPED_BYTES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Set on the `baton-stderr` thread, whose own log line (the drop
    /// count) goes straight to stderr: that thread may wait for it.
    static ON_WRITER_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Starts the `baton-stderr` thread and installs the global subscriber.
/// Call once, first thing.
pub fn init() -> io::Result<()> {
    let (sender, receiver) = mpsc::channel();
    std::thread::Builder::new()
        .name("baton-stderr".into())
        .spawn(move || {
            // Signals are the main thread's: a signal this thread took would
            // wait for a runtime that is about to exec during an upgrade.
            let _ = nix::sys::signal::sigprocmask(
                nix::sys::signal::SigmaskHow::SIG_BLOCK,
                Some(&nix::sys::signal::SigSet::all()),
                None,
            );
            write_out(receiver)
        })?;
    // A second call's thread ends at once: its sender is dropped here.
    let _ = WRITER.set(sender);
    let filter = EnvFilter::try_from_env("BATON_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LogLine)
        .with_target(false);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.with_ansi(false).event_format(Journald).init();
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    Ok(())
}

/// Queues a chunk of the `--build` command's output for stderr, as it is.
/// Never waits: if the queue is full, the bytes are dropped and counted.
pub fn echo(bytes: &[u8]) {
    queue(Kind::Build, bytes);
}

/// Queues one line for stderr (a newline is added), outside `tracing`: for
/// `main`'s final error line. Never waits, like [`echo`].
pub fn line(text: &str) {
    queue(Kind::Line, format!("{text}\n").as_bytes());
}

/// Waits until everything queued so far is written, or `timeout` passed;
/// returns whether it was written. For the end of `main`: baton exits
/// anyway after that, whatever stderr does.
pub fn flush(timeout: Duration) -> bool {
    let Some(writer) = WRITER.get() else {
        return true;
    };
    let (done, written) = mpsc::sync_channel(1);
    writer.send(Message::Flush(done)).is_ok() && written.recv_timeout(timeout).is_ok()
}

/// Hands `bytes` to the `baton-stderr` thread unless the queue would then
/// hold more than [`QUEUE_LIMIT`] bytes; then counts them as dropped.
fn queue(kind: Kind, bytes: &[u8]) {
    let Some(writer) = WRITER.get() else {
        return;
    };
    let len = bytes.len();
    if QUEUED.fetch_add(len, Relaxed) + len > QUEUE_LIMIT {
        QUEUED.fetch_sub(len, Relaxed);
        count_dropped(kind, len);
        return;
    }
    // There is room again: the gap's count goes first, where the gap is.
    send_drop_count(writer);
    let bytes = bytes.to_vec();
    if writer.send(Message::Output { kind, bytes }).is_err() {
        QUEUED.fetch_sub(len, Relaxed);
        count_dropped(kind, len);
    }
}

/// Sends what was dropped since the last count, if anything was.
fn send_drop_count(writer: &Sender<Message>) {
    if DROPPED_LINES.load(Relaxed) == 0 && DROPPED_BYTES.load(Relaxed) == 0 {
        return;
    }
    let lines = DROPPED_LINES.swap(0, Relaxed);
    let bytes = DROPPED_BYTES.swap(0, Relaxed);
    if lines == 0 && bytes == 0 {
        // Another thread sent this count.
        return;
    }
    // The receiver lives for baton's life; nothing to do if it did not.
    let _ = writer.send(Message::Dropped { lines, bytes });
}

fn count_dropped(kind: Kind, len: usize) {
    match kind {
        Kind::Line => DROPPED_LINES.fetch_add(1, Relaxed),
        Kind::Build => DROPPED_BYTES.fetch_add(len as u64, Relaxed),
    };
}

/// The `baton-stderr` thread: the only writer of stderr, and the only
/// code that waits for it.
fn write_out(messages: Receiver<Message>) {
    ON_WRITER_THREAD.set(true);
    // Whether the last bytes written left a line open (build output cut by
    // a drop): the drop count must start a line of its own, or journald
    // would not see its priority.
    let mut mid_line = false;
    for message in messages {
        match message {
            Message::Output { kind, bytes } => {
                let written = io::stderr().write_all(&bytes);
                QUEUED.fetch_sub(bytes.len(), Relaxed);
                match written {
                    Ok(()) => mid_line = bytes.last() != Some(&b'\n'),
                    Err(_) => count_dropped(kind, bytes.len()),
                }
            }
            Message::Dropped { lines, bytes } => report(lines, bytes, &mut mid_line),
            Message::Flush(done) => {
                report_caught_up(&mut mid_line);
                // The flusher may have given up waiting.
                let _ = done.send(());
            }
        }
        report_caught_up(&mut mid_line);
    }
}

/// Once nothing waits, reports drops no later output has carried (the
/// loop may have gone quiet after them).
fn report_caught_up(mid_line: &mut bool) {
    if QUEUED.load(Relaxed) == 0 {
        let lines = DROPPED_LINES.swap(0, Relaxed);
        let bytes = DROPPED_BYTES.swap(0, Relaxed);
        report(lines, bytes, mid_line);
    }
}

/// Writes the drop count, as a warning, on the `baton-stderr` thread.
fn report(lines: u64, bytes: u64, mid_line: &mut bool) {
    if lines == 0 && bytes == 0 {
        return;
    }
    if std::mem::take(mid_line) {
        let _ = io::stderr().write_all(b"\n");
    }
    tracing::warn!("{}", DropCount { lines, bytes });
}

/// "3 log lines and 120000 bytes of build output dropped while stderr was
/// blocked".
struct DropCount {
    lines: u64,
    bytes: u64,
}

impl fmt::Display for DropCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let DropCount { lines, bytes } = *self;
        let s = if lines == 1 { "" } else { "s" };
        match (lines, bytes) {
            (lines, 0) => write!(f, "{lines} log line{s}")?,
            (0, bytes) => write!(f, "{bytes} bytes of build output")?,
            (lines, bytes) => write!(f, "{lines} log line{s} and {bytes} bytes of build output")?,
        }
        write!(f, " dropped while stderr was blocked")
    }
}

/// `tracing`'s writer: it writes each formatted event with one `write`.
struct LogLine;

impl Write for LogLine {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if ON_WRITER_THREAD.get() {
            io::stderr().write_all(buf)?;
        } else {
            queue(Kind::Line, buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `<priority>message`, one line per event, for journald.
struct Journald;

impl<S, N> FormatEvent<S, N> for Journald
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let priority = match *event.metadata().level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            Level::DEBUG | Level::TRACE => 7,
        };
        write!(writer, "<{priority}>")?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// What goes before baton's final error line: the journal's error priority
/// under systemd, nothing in a terminal.
pub fn error_prefix() -> &'static str {
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        "<3>"
    } else {
        ""
    }
}
