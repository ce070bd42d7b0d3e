//! What handing kept values to the next generation costs, measured two ways
//! in one run (the numbers behind the SDK's choice of sealed memfds):
//!
//! - **accept pause under baton**: the `counter` example keeps N bytes of
//!   ballast and a 1 KiB note; before each reload either the note (1 KiB
//!   written) or the ballast (everything written) is rewritten. Each reload
//!   pre-copies every value while the old generation serves, then freezes
//!   it (it stops accepting), passes what was written since, and the new
//!   one parses it and says ready. baton
//!   reports that gap as `last_reload.accept_pause_ms`: the time no
//!   generation accepted (clients wait in the kernel's queue meanwhile).
//! - **the transport alone**, in this process: the same N bytes through a
//!   sealed memfd passed twice with `SCM_RIGHTS` (worker → supervisor →
//!   worker, as baton does) and read through a mapping (as the SDK does),
//!   through two Unix-socket stream hops (what a relayed stream would cost:
//!   the supervisor copying every byte), and one plain Unix-socket copy.
//!
//! Timings are medians of several rounds, with min and max. This module
//! never asserts a timing: it reports.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};

use crate::harness::{bin, Baton};

/// Median, min and max of some durations, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    /// The median.
    pub median: f64,
    /// The smallest.
    pub min: f64,
    /// The largest.
    pub max: f64,
}

impl Stats {
    /// Summarizes `samples` (milliseconds); `None` if empty.
    pub fn of(mut samples: Vec<f64>) -> Option<Stats> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_by(f64::total_cmp);
        Some(Stats {
            median: samples[samples.len() / 2],
            min: samples[0],
            max: samples[samples.len() - 1],
        })
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:8.2} ({:.2}–{:.2})", self.median, self.min, self.max)
    }
}

/// One size's figures.
#[derive(Debug)]
pub struct Row {
    /// The ballast kept, in bytes.
    pub bytes: usize,
    /// The accept pause of a reload under baton, 1 KiB of the values
    /// written since the last one.
    pub pause: Stats,
    /// The same, every value written since the last reload.
    pub pause_all: Stats,
    /// The memfd transport: write, seal, pass twice, read.
    pub memfd: Stats,
    /// Two stream hops: write, relay, read.
    pub relay: Stats,
    /// One plain Unix-socket copy.
    pub copy: Stats,
}

/// Measures each size over `rounds` reloads and transport rounds.
pub fn measure(sizes: &[usize], rounds: usize) -> Result<Vec<Row>, String> {
    sizes
        .iter()
        .map(|&bytes| {
            let pause =
                Stats::of(accept_pauses(bytes, rounds, "/note", false)?).ok_or("no reloads")?;
            let pause_all =
                Stats::of(accept_pauses(bytes, rounds, "/ballast", true)?).ok_or("no reloads")?;
            let mut memfd = Vec::new();
            let mut relay = Vec::new();
            let mut copy = Vec::new();
            let data = vec![b'x'; bytes];
            for _ in 0..rounds {
                memfd.push(memfd_hops(&data)?);
                relay.push(stream_hops(&data, 2)?);
                copy.push(stream_hops(&data, 1)?);
            }
            Ok(Row {
                bytes,
                pause,
                pause_all,
                memfd: Stats::of(memfd).ok_or("no rounds")?,
                relay: Stats::of(relay).ok_or("no rounds")?,
                copy: Stats::of(copy).ok_or("no rounds")?,
            })
        })
        .collect()
}

/// The table, for people.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "kept bytes | accept pause, 1 KiB written, ms | accept pause, all written, ms | memfd ×2 hops, ms | stream ×2 hops, ms | plain socket copy, ms\n",
    );
    out.push_str("---: | ---: | ---: | ---: | ---: | ---:\n");
    for r in rows {
        out.push_str(&format!(
            "{} | {} | {} | {} | {} | {}\n",
            human(r.bytes),
            r.pause,
            r.pause_all,
            r.memfd,
            r.relay,
            r.copy
        ));
    }
    out
}

fn human(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 20 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

/// Reloads `counter --ballast bytes` `rounds` times, each time after a
/// `GET write` (`/note`: 1 KiB of the values written; `/ballast`: all of
/// them), once baton has settled (the previous generation gone); each
/// reload's accept pause as baton measured it. `all_dirty`: without a
/// pre-copy, so every value is written and read inside the pause, as when
/// everything was written between the pre-copy and the freeze.
fn accept_pauses(
    bytes: usize,
    rounds: usize,
    write: &str,
    all_dirty: bool,
) -> Result<Vec<f64>, String> {
    let counter = bin("counter");
    let baton = Baton::builder()
        .args(["--listen", "http=tcp://127.0.0.1:0", "--max-state", "1GiB"])
        .worker(
            [
                counter.as_os_str().to_owned(),
                "--ballast".into(),
                bytes.to_string().into(),
            ]
            .into_iter()
            .chain(all_dirty.then(|| "--no-pre-copy".into())),
        )
        .start();
    let addr = baton.address("http");
    let mut pauses = Vec::new();
    for _ in 0..rounds {
        baton.wait_settled();
        crate::http::get_json(&addr, write, crate::http::TIMEOUT)
            .map_err(|e| format!("writing before a reload: {e}"))?;
        let answer = baton.reload();
        if answer["ok"] != true {
            return Err(format!("reload with {bytes} bytes kept failed: {answer}"));
        }
        let status = baton.status();
        let pause = status["last_reload"]["accept_pause_ms"]
            .as_f64()
            .ok_or_else(|| format!("no accept pause in {status}"))?;
        pauses.push(pause);
    }
    Ok(pauses)
}

/// Writes `data` into a sealed memfd, passes it over two socket hops, reads
/// it back with a positioned read: milliseconds.
fn memfd_hops(data: &[u8]) -> Result<f64, String> {
    let err = |what: &str, e: &dyn std::fmt::Display| format!("memfd transport: {what}: {e}");
    let (a_out, a_in) = UnixStream::pair().map_err(|e| err("socketpair", &e))?;
    let (b_out, b_in) = UnixStream::pair().map_err(|e| err("socketpair", &e))?;
    let start = Instant::now();
    let fd = nix::sys::memfd::memfd_create(
        c"bench",
        nix::sys::memfd::MFdFlags::MFD_CLOEXEC | nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING,
    )
    .map_err(|e| err("memfd_create", &e))?;
    let mut file = std::fs::File::from(fd);
    file.write_all(data).map_err(|e| err("write", &e))?;
    let fd = OwnedFd::from(file);
    nix::fcntl::fcntl(
        &fd,
        nix::fcntl::FcntlArg::F_ADD_SEALS(nix::fcntl::SealFlag::from_bits_truncate(
            baton_worker::protocol::SNAPSHOT_SEALS,
        )),
    )
    .map_err(|e| err("seal", &e))?;
    send_fd(a_out.as_raw_fd(), fd.as_raw_fd()).map_err(|e| err("send", &e))?;
    drop(fd);
    let relayed = recv_fd(a_in.as_raw_fd()).map_err(|e| err("receive", &e))?;
    send_fd(b_out.as_raw_fd(), relayed.as_raw_fd()).map_err(|e| err("send", &e))?;
    drop(relayed);
    let fd = recv_fd(b_in.as_raw_fd()).map_err(|e| err("receive", &e))?;
    // Read as the SDK reads a snapshot: mapped, not copied.
    let sum = crate::sys::map_and_sum(&fd, data.len()).map_err(|e| err("map", &e))?;
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    if sum != data.iter().map(|&b| u64::from(b)).sum::<u64>() {
        return Err("memfd transport: the bytes changed on the way".into());
    }
    Ok(ms)
}

fn send_fd(socket: RawFd, fd: RawFd) -> nix::Result<usize> {
    let fds = [fd];
    socket::sendmsg::<()>(
        socket,
        &[IoSlice::new(b"s")],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
}

fn recv_fd(socket: RawFd) -> Result<OwnedFd, String> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let msg = socket::recvmsg::<()>(
        socket,
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| e.to_string())?;
    for c in msg.cmsgs().map_err(|e| e.to_string())? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(&fd) = fds.first() {
                return Ok(crate::sys::own(fd));
            }
        }
    }
    Err("no descriptor arrived".into())
}

/// Sends `data` through `hops` Unix stream sockets in a row (a thread per
/// relay), reading it all at the end: milliseconds.
fn stream_hops(data: &[u8], hops: usize) -> Result<f64, String> {
    let err = |e: std::io::Error| format!("stream transport: {e}");
    let payload = data.to_vec();
    let start = Instant::now();
    let (mut first, mut next_in) = UnixStream::pair().map_err(err)?;
    let mut relays = Vec::new();
    for _ in 1..hops {
        let (mut out, into) = UnixStream::pair().map_err(err)?;
        let mut from = next_in;
        relays.push(std::thread::spawn(move || {
            std::io::copy(&mut from, &mut out)
        }));
        next_in = into;
    }
    let writer = std::thread::spawn(move || {
        let written = first.write_all(&payload);
        drop(first);
        written
    });
    // Read into a buffer that already has its pages, as a long-lived
    // reader's would: the comparison is of transports, not of page faults.
    let mut back = vec![1u8; data.len()];
    back.clear();
    next_in.read_to_end(&mut back).map_err(err)?;
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    writer
        .join()
        .map_err(|_| "stream transport: the writer panicked".to_owned())?
        .map_err(err)?;
    for r in relays {
        r.join()
            .map_err(|_| "stream transport: a relay panicked".to_owned())?
            .map_err(err)?;
    }
    if back.len() != data.len() {
        return Err("stream transport: bytes went missing".into());
    }
    Ok(ms)
}
