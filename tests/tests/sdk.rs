//! SDK workers (`baton-worker`) under the real `baton`: the `hello` and
//! `ticker` examples. The SDK path is taken (listeners over the channel, no
//! inherited copy left open, `ready()`, `status()`, drain by message);
//! reloads under load lose nothing; a slow request is finished by the
//! generation that started it while reloads go by; a draining generation
//! closes idle keep-alive connections and exits promptly; a timer made with
//! `interval` stops when its generation drains; and the same binaries run
//! standalone from `BATON_LISTEN`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use baton_tests::harness::{bin, process_gone, wait_for, Baton, Load};
use baton_tests::http;
use serde_json::Value;

fn connect(addr: &str) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    stream
}

/// Whether the server end of `client` has been accepted by process `pid`:
/// `/proc/net/tcp` gives the inode of the server's socket of this
/// connection (0 while it waits in the accept queue), and `pid` holds it.
fn accepted_by(pid: i32, client: &TcpStream) -> bool {
    let hex = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => format!(
            "{:08X}:{:04X}",
            u32::from_ne_bytes(v4.ip().octets()),
            v4.port()
        ),
        SocketAddr::V6(_) => panic!("IPv4 only"),
    };
    let local = hex(client.peer_addr().expect("peer address"));
    let remote = hex(client.local_addr().expect("local address"));
    let table = std::fs::read_to_string("/proc/net/tcp").expect("reading /proc/net/tcp");
    let Some(inode) = table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.get(1) == Some(&local.as_str()) && f.get(2) == Some(&remote.as_str()))
            .then(|| f.get(9).map(|s| s.to_string()))?
    }) else {
        return false;
    };
    inode != "0" && socket_inodes(pid).contains_key(&inode)
}

/// Socket inodes held by `pid`, with how many of its descriptors hold each.
fn socket_inodes(pid: i32) -> BTreeMap<String, usize> {
    let mut inodes = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return inodes;
    };
    for entry in dir.flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        if let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|s| s.strip_suffix(']'))
        {
            *inodes.entry(inode.to_owned()).or_default() += 1;
        }
    }
    inodes
}

/// Descriptors of `pid` at 3 and above that are not close-on-exec.
fn inheritable_fds(pid: i32) -> Vec<String> {
    let mut inheritable = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .expect("reading fdinfo")
        .flatten()
    {
        let fd = entry.file_name().to_string_lossy().into_owned();
        if fd.parse::<u32>().is_ok_and(|n| n < 3) {
            continue;
        }
        let info = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            .unwrap_or(0);
        if flags & libc::O_CLOEXEC as u32 == 0 {
            inheritable.push(fd);
        }
    }
    inheritable
}

fn generation_status(baton: &Baton, generation: u64) -> Value {
    let status = baton.status();
    status["generations"]
        .as_array()
        .and_then(|gs| gs.iter().find(|g| g["generation"] == generation).cloned())
        .unwrap_or_else(|| panic!("no generation {generation} in {status}"))
}

fn hello(args: &[&str]) -> Baton {
    Baton::builder()
        .args(["--listen", "http=tcp://127.0.0.1:0"])
        .args(args)
        .worker([bin("hello")])
        .start()
}

#[test]
fn hello_takes_the_sdk_path_and_holds_each_listener_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let baton = Baton::builder()
        .args(["--listen", "http=tcp://127.0.0.1:0"])
        .args(["--listen", "stats=udp://127.0.0.1:0"])
        .option(
            "--listen",
            format!("admin=unix:{}", dir.path().join("admin.sock").display()),
        )
        .worker([bin("hello")])
        .start();
    let addr = baton.address("http");
    for generation in [1, 2] {
        if generation > 1 {
            assert_eq!(baton.reload_ok(), generation);
            baton.wait_settled();
        }
        let g = generation_status(&baton, generation);
        assert_eq!(g["sdk"], true, "the worker spoke the protocol: {g}");
        assert_eq!(g["state"], "serving", "{g}");
        assert_eq!(g["status"], format!("serving http on {addr}"), "{g}");
        let pid = baton.worker_pid(generation).expect("a worker pid");

        let body = http::get_json(&addr, "/", http::TIMEOUT).expect("GET /");
        assert_eq!(body["generation"], generation, "{body}");
        assert_eq!(body["pid"], pid, "{body}");

        // The listeners are the sockets baton and the worker both hold:
        // three, each open once in the worker (the copies inherited at fds
        // 3.. were closed once the same sockets came over the channel).
        let ours = socket_inodes(pid);
        let shared: Vec<(&String, &usize)> = socket_inodes(baton.pid())
            .into_keys()
            .filter_map(|inode| ours.get_key_value(&inode))
            .collect();
        assert_eq!(shared.len(), 3, "shared sockets {shared:?} of {ours:?}");
        for (inode, count) in shared {
            assert_eq!(
                *count, 1,
                "socket {inode} is open {count} times in the worker"
            );
        }
        let inheritable = inheritable_fds(pid);
        assert!(
            inheritable.is_empty(),
            "fds {inheritable:?} of the worker would leak into programs it runs"
        );
    }
}

#[test]
fn a_hundred_reloads_of_hello_under_load_lose_nothing() {
    let baton = hello(&[]);
    let load = Load::http(&baton, "http", |c| {
        c.concurrency = 12;
        c.keep_alive_fraction = 0.5;
        // Every 50th request takes 700ms: it starts on one generation and
        // must be finished by it while several reloads go by.
        c.slow_fraction = 0.02;
        c.slow_ms = 700;
    });
    load.wait_ok(50);
    let reloads = 100;
    for i in 1..=reloads {
        assert_eq!(baton.reload_ok(), 1 + i);
        load.wait_ok(10);
    }
    load.wait_ok(50);
    let report = load.finish();
    eprintln!("{report}");
    report.assert_no_failures();
    // Responses finished while draining say `Connection: close`, so clients
    // rarely send a request on a connection about to close (stock servers
    // close idle ones under them: about two retries per reload here).
    assert!(
        report.counts.retried < reloads,
        "{} retries in {reloads} reloads: {report}",
        report.counts.retried
    );
    let served = report.generations.len() as u64;
    assert!(
        served > reloads / 2,
        "only {served} generations served: {report}"
    );
    baton.wait_settled();
    assert_eq!(
        baton.status()["reloads"]["ok"],
        reloads,
        "{}",
        baton.status()
    );
    // Every drain was by message: no SDK worker was signalled or killed.
    // Each of the 100 old generations logs its exit after its drain began
    // and after any kill at its deadline: once all 100 are in, so is that.
    let log = baton.wait_log_count(" of draining", reloads as usize);
    assert!(!log.contains("): sending "), "a drain by signal:\n{log}");
    assert!(
        !log.contains("killing it"),
        "a drain deadline passed:\n{log}"
    );
}

#[test]
fn a_slow_request_is_finished_by_the_generation_that_started_it() {
    let baton = hello(&["--drain-timeout", "60s"]);
    let addr = baton.address("http");
    let pid = baton.worker_pid(1).expect("generation 1");
    let mut slow = connect(&addr);
    wait_for(
        "generation 1 to accept the connection",
        Duration::from_secs(10),
        || accepted_by(pid, &slow).then_some(()),
    );
    http::send_get(&mut slow, "/slow?ms=1500").expect("sending");
    // Three reloads go by while the request is in flight.
    for generation in 2..=4 {
        assert_eq!(baton.reload_ok(), generation);
    }
    let reloaded = Instant::now();
    assert_eq!(
        generation_status(&baton, 1)["state"],
        "draining",
        "generation 1 drains while its request runs"
    );
    let response = http::read_response(&mut slow).expect("the slow response");
    let answered = Instant::now();
    assert_eq!(response.status, 200, "{}", response.headers);
    let body = response.json().expect("a JSON body");
    assert_eq!(body["generation"], 1, "{body}");
    assert_eq!(body["pid"], pid, "{body}");
    assert!(
        response.closes(),
        "a draining generation answers with Connection: close: {}",
        response.headers
    );
    assert!(answered > reloaded);
    // And then it is gone, well before its drain deadline.
    wait_for("generation 1 to exit", Duration::from_secs(10), || {
        process_gone(pid).then_some(())
    });
    let mut rest = Vec::new();
    slow.read_to_end(&mut rest).expect("reading to the end");
    assert!(rest.is_empty(), "nothing after the response: {rest:?}");
}

#[test]
fn a_draining_generation_closes_idle_connections_and_exits_promptly() {
    let baton = hello(&["--drain-timeout", "60s"]);
    let addr = baton.address("http");
    let pid = baton.worker_pid(1).expect("generation 1");
    // Idle keep-alive connections, each having been served by generation 1.
    let mut idle: Vec<TcpStream> = (0..5).map(|_| connect(&addr)).collect();
    for stream in &mut idle {
        let response = http::get_keep_alive(stream, "/").expect("GET / on an idle connection");
        assert_eq!(response.json().expect("a JSON body")["generation"], 1);
        assert!(!response.closes(), "{}", response.headers);
    }
    // A connection accepted by generation 1 that has not sent its request
    // yet when the drain begins: it is still answered, by generation 1.
    let mut fresh = connect(&addr);
    wait_for(
        "generation 1 to accept the fresh connection",
        Duration::from_secs(10),
        || accepted_by(pid, &fresh).then_some(()),
    );
    let reloaded = Instant::now();
    assert_eq!(baton.reload_ok(), 2);
    wait_for(
        "generation 1 to be told to drain",
        Duration::from_secs(10),
        || {
            baton
                .log()
                .contains("draining: the supervisor asked")
                .then_some(())
        },
    );
    let response = http::get_keep_alive(&mut fresh, "/").expect("GET / on the fresh connection");
    assert_eq!(response.status, 200, "{}", response.headers);
    let body = response.json().expect("a JSON body");
    assert_eq!(body["generation"], 1, "{body}");
    let mut rest = Vec::new();
    fresh
        .read_to_end(&mut rest)
        .expect("then closed, not reset");
    assert!(rest.is_empty(), "{rest:?}");

    for stream in &mut idle {
        let mut rest = Vec::new();
        stream
            .read_to_end(&mut rest)
            .expect("the idle connection is closed, not reset");
        assert!(rest.is_empty(), "{rest:?}");
    }
    wait_for(
        "generation 1 to exit (its drain deadline is 60s away)",
        Duration::from_secs(10),
        || process_gone(pid).then_some(()),
    );
    eprintln!(
        "generation 1 exited {:?} after the reload",
        reloaded.elapsed()
    );
    let drained = format!("generation 1 (pid {pid}) drains (replaced)\n");
    // Drained by message, then exited cleanly.
    baton.wait_log(&drained);
    baton.wait_log(&format!("generation 1 (pid {pid}) exited with status 0"));
}

#[test]
fn a_listener_of_the_wrong_kind_fails_the_start_naming_it() {
    let mut baton = Baton::builder()
        .args(["--listen", "http=udp://127.0.0.1:0"])
        .worker([bin("hello")])
        .spawn();
    let status = baton.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    baton.wait_log("hello: listener `http` is a udp listener, not tcp");
}

/// Runs `program` without baton, with `env`, and returns it with a channel
/// of its stderr lines.
fn standalone(
    program: &str,
    env: &[(&str, &str)],
) -> (std::process::Child, mpsc::Receiver<String>) {
    let mut command = Command::new(bin(program));
    for var in [
        "BATON_CHANNEL_FD",
        "BATON_GENERATION",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "NOTIFY_SOCKET",
        "BATON_LISTEN",
    ] {
        command.env_remove(var);
    }
    let mut child = command
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the worker");
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

/// Waits for a line containing `needle`; returns the text after it.
fn line_after(lines: &mpsc::Receiver<String>, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|e| panic!("no line with {needle:?}: {e}"));
        if let Some((_, after)) = line.split_once(needle) {
            return after.to_owned();
        }
    }
}

fn wait_child(child: &mut std::process::Child) -> std::process::ExitStatus {
    wait_for("the worker to exit", Duration::from_secs(20), || {
        child.try_wait().expect("waiting for the worker")
    })
}

#[test]
fn standalone_hello_binds_baton_listen_and_drains_on_sigterm() {
    let (mut child, lines) = standalone("hello", &[("BATON_LISTEN", "http=tcp://127.0.0.1:0")]);
    let addr = line_after(&lines, "serving http on ");
    let mut idle = connect(&addr);
    let body = http::get_keep_alive(&mut idle, "/")
        .and_then(|response| response.json())
        .expect("GET /");
    assert_eq!(body["generation"], 0, "standalone: {body}");
    assert_eq!(body["pid"], child.id(), "{body}");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("sending SIGTERM");
    line_after(&lines, "draining: SIGTERM");
    let status = wait_child(&mut child);
    assert!(status.success(), "{status}");
    let mut rest = Vec::new();
    idle.read_to_end(&mut rest).expect("closed, not reset");
    assert!(rest.is_empty());

    // A listener of the wrong kind is an error naming it.
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = format!("http=unix:{}", dir.path().join("h.sock").display());
    let (mut child, lines) = standalone("hello", &[("BATON_LISTEN", &spec)]);
    line_after(&lines, "hello: listener `http` is a unix listener, not tcp");
    assert!(!wait_child(&mut child).success());
}

/// Asks a ticker on a Unix connection.
fn ask(stream: &mut BufReader<UnixStream>) -> Value {
    stream.get_mut().write_all(b"?\n").expect("asking ticker");
    let mut line = String::new();
    stream
        .read_line(&mut line)
        .expect("reading ticker's answer");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("answer {line:?}: {e}"))
}

fn ticker_connection(path: &std::path::Path) -> BufReader<UnixStream> {
    let stream = UnixStream::connect(path).expect("connecting to ticker");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    BufReader::new(stream)
}

#[test]
fn a_timer_stops_when_its_generation_drains() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ticks.sock");
    let baton = Baton::builder()
        .option("--listen", format!("ticks=unix:{}", path.display()))
        .args(["--drain-timeout", "60s"])
        .worker([
            bin("ticker").into_os_string(),
            "--period".into(),
            "20".into(),
        ])
        .start();
    let mut old = ticker_connection(&path);
    let first = ask(&mut old);
    assert_eq!(first["generation"], 1, "{first}");
    assert_eq!(first["draining"], false, "{first}");
    let pid = first["pid"].as_i64().expect("pid") as i32;
    wait_for("generation 1 to tick", Duration::from_secs(10), || {
        (ask(&mut old)["ticks"].as_u64() >= Some(3)).then_some(())
    });
    wait_for(
        "generation 1's tick count in baton status",
        Duration::from_secs(10),
        || {
            let status = generation_status(&baton, 1)["status"].clone();
            status.as_str()?.ends_with(" ticks").then_some(())
        },
    );

    assert_eq!(baton.reload_ok(), 2);
    wait_for("generation 1 to drain", Duration::from_secs(10), || {
        (ask(&mut old)["draining"] == true).then_some(())
    });
    // Measure time by generation 2's own timer: ten of its ticks.
    let gen2_ticks = || {
        let answer = ask(&mut ticker_connection(&path));
        assert_eq!(answer["generation"], 2, "{answer}");
        answer["ticks"].as_u64().expect("ticks")
    };
    let before = ask(&mut old)["ticks"].clone();
    let start = gen2_ticks();
    wait_for(
        "generation 2 to tick ten times",
        Duration::from_secs(10),
        || (gen2_ticks() >= start + 10).then_some(()),
    );
    let after = ask(&mut old);
    assert_eq!(after["generation"], 1, "{after}");
    assert_eq!(
        after["ticks"], before,
        "generation 1's timer went on ticking after its drain: {after}"
    );
    wait_for(
        "generation 2's tick count in baton status",
        Duration::from_secs(10),
        || {
            let status = generation_status(&baton, 2)["status"].clone();
            status.as_str()?.ends_with(" ticks").then_some(())
        },
    );

    // Generation 1 exits once its last client hangs up.
    drop(old);
    wait_for("generation 1 to exit", Duration::from_secs(10), || {
        process_gone(pid).then_some(())
    });
}

#[test]
fn ticker_answers_on_udp_across_a_reload() {
    let baton = Baton::builder()
        .args(["--listen", "ticks=udp://127.0.0.1:0"])
        .worker([
            bin("ticker").into_os_string(),
            "--period".into(),
            "20".into(),
        ])
        .start();
    let addr = baton.address("ticks");
    let client = UdpSocket::bind("127.0.0.1:0").expect("udp client");
    client
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("read timeout");
    let answer = |client: &UdpSocket| -> Option<Value> {
        client.send_to(b"?", &addr).expect("udp send");
        let mut buf = [0u8; 512];
        let (n, _) = client.recv_from(&mut buf).ok()?;
        serde_json::from_slice(&buf[..n]).ok()
    };
    let first = wait_for("generation 1 to answer", Duration::from_secs(10), || {
        answer(&client)
    });
    assert_eq!(first["generation"], 1, "{first}");
    assert_eq!(baton.reload_ok(), 2);
    baton.wait_settled();
    // A new client, so no late answer of generation 1 is read here.
    let client = UdpSocket::bind("127.0.0.1:0").expect("udp client");
    client
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("read timeout");
    let mut seen = BTreeSet::new();
    for _ in 0..5 {
        let a = wait_for("an answer", Duration::from_secs(10), || answer(&client));
        seen.insert(a["generation"].as_u64().expect("generation"));
    }
    assert_eq!(seen, BTreeSet::from([2]), "only generation 2 is left");
}
