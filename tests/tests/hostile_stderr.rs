//! A stderr nobody reads (a stalled journald, a terminal on scroll-lock, a
//! pipe whose reader went to sleep): baton still reloads, answers `status`
//! and stops on SIGTERM, drops the output it cannot write, and says how much
//! once stderr drains. These tests never read baton's log file: its stderr
//! is a FIFO the test holds.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use baton_tests::harness::{bin, Baton, Load};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use nix::sys::stat::Mode;
use serde_json::Value;

/// Two megabytes: far more than a pipe's 64 KiB and baton's 1 MiB queue.
const BUILD_OUTPUT: &str = "2000000";

/// How long `status` may take while stderr is blocked.
const STATUS_DEADLINE: Duration = Duration::from_secs(5);

/// A control request whose answer must come within `timeout`: a wedged
/// event loop makes it fail instead of hanging the test.
fn request_within(control: &Path, request: &str, timeout: Duration) -> Result<Value, String> {
    let started = Instant::now();
    let stream = UnixStream::connect(control).map_err(|e| format!("connecting: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("setting timeouts: {e}"))?;
    writeln!(&stream, "{request}").map_err(|e| format!("sending {request}: {e}"))?;
    let mut line = String::new();
    match BufReader::new(&stream).read_line(&mut line) {
        Ok(_) => serde_json::from_str(&line).map_err(|e| format!("bad answer {line:?}: {e}")),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Err(format!(
            "no answer to {request} within {timeout:?} (asked {:?} ago)",
            started.elapsed()
        )),
        Err(e) => Err(format!("reading the answer to {request}: {e}")),
    }
}

/// A reload that must succeed within a deadline; returns the new generation.
fn reload_within(baton: &Baton, timeout: Duration) -> u64 {
    let request = r#"{"command":"reload","wait":true}"#;
    let answer = request_within(&baton.control, request, timeout)
        .unwrap_or_else(|e| panic!("reload while stderr is blocked: {e}"));
    assert_eq!(answer["ok"], Value::Bool(true), "reload failed: {answer}");
    answer["generation"].as_u64().expect("generation number")
}

/// A `status` answered within [`STATUS_DEADLINE`], naming a serving
/// generation.
fn status_within(control: &Path) -> Result<(), String> {
    let status = request_within(control, r#"{"command":"status"}"#, STATUS_DEADLINE)?;
    match status["generation"].as_u64() {
        Some(_) => Ok(()),
        None => Err(format!("status without a serving generation: {status}")),
    }
}

/// Asks `status` at once and then every 50 ms until told to stop; ends at
/// the first failure.
struct StatusProbe {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<Result<(), String>>,
}

impl StatusProbe {
    fn start(control: PathBuf) -> StatusProbe {
        let (stop, stopped) = mpsc::channel();
        let thread = std::thread::spawn(move || loop {
            status_within(&control)?;
            match stopped.recv_timeout(Duration::from_millis(50)) {
                Err(RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
        });
        StatusProbe { stop, thread }
    }

    /// Stops the probe; panics if a `status` was late or failed.
    fn finish(self) {
        let _ = self.stop.send(());
        self.thread
            .join()
            .expect("the status probe does not panic")
            .unwrap_or_else(|e| panic!("status while stderr is blocked: {e}"));
    }
}

/// Reads what is in the FIFO (non-blocking) until `done` accepts everything
/// read so far, or panics at the deadline.
fn read_until(
    fifo: &mut File,
    timeout: Duration,
    what: &str,
    done: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match fifo.read(&mut buf) {
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                let text = String::from_utf8_lossy(&seen).into_owned();
                if done(&text) {
                    return text;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                assert!(
                    !left.is_zero(),
                    "timed out after {timeout:?} waiting for {what} on baton's stderr; \
                     the last lines read:\n{}",
                    last_lines(&text, 20)
                );
                let millis = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
                let mut fds = [PollFd::new(fifo.as_fd(), PollFlags::POLLIN)];
                if let Err(e) = poll(&mut fds, PollTimeout::from(millis)) {
                    assert_eq!(e, Errno::EINTR, "polling the FIFO: {e}");
                }
            }
            Err(e) => panic!("reading the FIFO: {e}"),
        }
    }
}

/// The last `n` lines of `text`, the build's filler shortened.
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<String> = text
        .lines()
        .map(|l| l.trim_start_matches('x'))
        .map(|l| l.chars().take(300).collect())
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[test]
fn a_blocked_stderr_stops_no_reload_no_status_and_no_shutdown() {
    let count = reload_and_stop_with_a_blocked_stderr(false);
    assert!(
        count.contains(" WARN "),
        "a warning like the others: {count}"
    );
}

#[test]
fn under_journald_the_drop_count_is_a_warning_line_of_its_own() {
    let count = reload_and_stop_with_a_blocked_stderr(true);
    assert!(count.starts_with("<4>"), "the journal's warning: {count}");
}

/// Reloads and stops baton while its stderr is a FIFO nobody reads, except
/// once, in between, to see the count of what was dropped: returns that
/// line. `journald`: as if stderr were the journal (`JOURNAL_STREAM`).
fn reload_and_stop_with_a_blocked_stderr(journald: bool) -> String {
    let mut builder = Baton::builder();
    if journald {
        builder = builder.env("JOURNAL_STREAM", "8:12345");
    }
    let dir = builder.dir().to_path_buf();
    let fifo_path = dir.join("stderr");
    nix::unistd::mkfifo(&fifo_path, Mode::S_IRUSR | Mode::S_IWUSR).expect("mkfifo");
    // The test's end: a reader that does not read (O_RDWR, so opening
    // does not wait for a writer); O_NONBLOCK for the reads at the end.
    let mut fifo = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo_path)
        .expect("opening the FIFO for the test");
    // baton's end: a separate open file description, so blocking writes.
    let stderr = OpenOptions::new()
        .write(true)
        .open(&fifo_path)
        .expect("opening the FIFO for baton");
    // The build prints as many bytes as the file `build-bytes` says: none
    // for the first start, megabytes for the reloads.
    let build_bytes = dir.join("build-bytes");
    std::fs::write(&build_bytes, "0").expect("writing build-bytes");
    let build = format!(
        "head -c $(cat {}) /dev/zero | tr '\\0' x",
        build_bytes.display()
    );
    let mut baton = builder
        .args(["--listen", "http=tcp://127.0.0.1:0"])
        .option("--build", build)
        .worker([bin("listenfd-axum")])
        .env("BATON_LOG", "debug")
        .stderr(stderr)
        .start();
    let load = Load::http(&baton, "http", |c| {
        c.concurrency = 4;
    });
    load.wait_ok(20);

    // Every build now writes megabytes to a stderr nobody reads.
    std::fs::write(&build_bytes, BUILD_OUTPUT).expect("writing build-bytes");
    let probe = StatusProbe::start(baton.control.clone());
    for expected in 2..=4 {
        assert_eq!(reload_within(&baton, Duration::from_secs(30)), expected);
        status_within(&baton.control).unwrap_or_else(|e| panic!("after a reload: {e}"));
    }
    load.wait_ok(20);
    probe.finish();
    let report = load.finish();
    report.assert_no_failures();

    // Once stderr drains, baton says how much it dropped.
    let text = read_until(
        &mut fifo,
        Duration::from_secs(30),
        "the count of dropped output",
        |text| text.contains("dropped while stderr was blocked"),
    );
    let count = text
        .lines()
        .find(|l| l.contains("dropped while stderr was blocked"))
        .expect("the count line was seen")
        .to_owned();
    // Build output cut short does not swallow the start of the line.
    assert!(!count.starts_with('x'), "a line of its own: {count}");
    assert!(
        count.contains("bytes of build output"),
        "the build's output was dropped: {count}"
    );

    // Blocked again (megabytes more, and the test stops reading): the next
    // reload and SIGTERM's drain go through all the same.
    let probe = StatusProbe::start(baton.control.clone());
    assert_eq!(reload_within(&baton, Duration::from_secs(30)), 5);
    status_within(&baton.control).unwrap_or_else(|e| panic!("after a reload: {e}"));
    probe.finish();
    baton.signal(Signal::SIGTERM);
    // The drain, then at most 2 s for stderr, then baton exits anyway.
    let status = baton.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "baton exited with {status}");
    count
}
