//! baton under a real systemd: Debian trixie's systemd 257, booted as PID 1
//! in a container by `tests/systemd-rig/` (see `baton_tests::rig`). The units
//! of `examples/systemd/` are installed as the README says, as shipped but
//! for the port, and driven with `systemctl`, `kill` and `journalctl`; the
//! project's load client runs on the host (the container shares its network)
//! and every request it sends is counted. Each test boots its own container
//! and powers it off at its end, passing or failing.
//!
//! These tests run only when asked, with `BATON_SYSTEMD_RIG=1` and as root
//! (`.ci/run` does); otherwise each prints SKIPPED. They never touch the
//! host's own init. The figures they print ("real systemd: ...", shown with
//! `--nocapture`) are the ones the README and issue 9 quote.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use baton_tests::harness::{wait_for, Load};
use baton_tests::http;
use baton_tests::load::{LoadConfig, LoadReport, Target};
use baton_tests::rig::Rig;
use serde_json::Value;

/// `baton status --json`, as a user runs it under the shipped units.
const STATUS: &str = "baton status --json --control /run/myapp/baton.sock";

/// A file of `examples/systemd/`, as shipped.
fn shipped(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/systemd")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// `unit` with its one `from` replaced by `to`: a shipped unit that no
/// longer says `from` exactly once fails the test rather than being run
/// unchanged.
fn substitute(unit: &str, from: &str, to: &str) -> String {
    assert_eq!(
        unit.matches(from).count(),
        1,
        "the shipped unit should say {from:?} once:\n{unit}"
    );
    unit.replace(from, to)
}

/// A port on 127.0.0.1 that nothing listens on (the container shares the
/// host's network).
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
    listener.local_addr().expect("its address").port()
}

/// A port below 1024 that nothing listens on: 80 unless it is taken.
fn free_privileged_port() -> u16 {
    (80..1024)
        .find(|&port| TcpListener::bind(("127.0.0.1", port)).is_ok())
        .expect("a free port below 1024 on 127.0.0.1")
}

/// What the README's install steps put in place before the units: the user
/// `myapp`, `baton` in /usr/local/bin, and myapp itself: `listenfd-axum`
/// (an ordinary axum server with sd-notify) started with the arguments in
/// /etc/myapp/flags, so that a test can make the next version fail to start.
/// Doing it twice changes nothing.
fn prepare(rig: &Rig) {
    rig.run(
        "id myapp >/dev/null 2>&1 \
         || useradd --system --no-create-home --shell /usr/sbin/nologin myapp; \
         ln -sf /opt/baton/baton /usr/local/bin/baton",
    );
    rig.write(
        "/usr/local/bin/myapp",
        "#!/bin/sh\n# myapp for the tests: its next version's arguments are in /etc/myapp/flags\n\
         exec /opt/baton/listenfd-axum $(cat /etc/myapp/flags 2>/dev/null)\n",
        0o755,
    );
    rig.write("/etc/myapp/flags", "", 0o644);
}

/// myapp installed in the container, and how to reach it.
struct App<'r> {
    rig: &'r Rig,
    /// The unit baton runs in.
    unit: &'static str,
    /// myapp's port, on 127.0.0.1 (the host's).
    addr: SocketAddr,
}

impl<'r> App<'r> {
    /// myapp.socket and myapp.service, installed and started as the README
    /// says: `systemctl enable --now myapp.socket myapp.service`.
    fn socket_activated(rig: &'r Rig) -> App<'r> {
        prepare(rig);
        let port = free_port();
        let socket = substitute(
            &shipped("myapp.socket"),
            "ListenStream=0.0.0.0:80",
            &format!("ListenStream=127.0.0.1:{port}"),
        );
        rig.write("/etc/systemd/system/myapp.socket", &socket, 0o644);
        rig.write(
            "/etc/systemd/system/myapp.service",
            &shipped("myapp.service"),
            0o644,
        );
        rig.run("systemctl daemon-reload && systemctl enable --now myapp.socket myapp.service");
        App {
            rig,
            unit: "myapp.service",
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    /// myapp-root.service, where baton binds a privileged port itself as
    /// root and runs myapp as the user myapp.
    fn binding_as_root(rig: &'r Rig) -> App<'r> {
        prepare(rig);
        let port = free_privileged_port();
        let unit = substitute(
            &shipped("myapp-root.service"),
            "http=tcp://0.0.0.0:80",
            &format!("http=tcp://127.0.0.1:{port}"),
        );
        rig.write("/etc/systemd/system/myapp-root.service", &unit, 0o644);
        rig.run("systemctl daemon-reload && systemctl enable --now myapp-root.service");
        App {
            rig,
            unit: "myapp-root.service",
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    /// `baton status --json`, run inside right now.
    fn status(&self) -> Value {
        parse_json(&self.rig.run(STATUS))
    }

    /// `GET /`: the serving worker's generation and pid.
    fn get(&self) -> Value {
        http::get_json(&self.addr.to_string(), "/", http::TIMEOUT)
            .unwrap_or_else(|e| panic!("myapp does not answer: {e}"))
    }

    /// Waits until `GET /` is answered by generation `generation`. Right
    /// after a reload the old worker may still take a connection or two:
    /// it stops accepting when its drain signal is handled, a moment after
    /// baton sent it.
    fn wait_answered_by(&self, generation: u64) {
        wait_for(
            &format!("generation {generation} to answer"),
            Duration::from_secs(10),
            || (self.get()["generation"] == generation).then_some(()),
        );
    }

    /// The pid (in the container) of the worker that answers `GET /`.
    fn worker_pid(&self) -> u64 {
        self.get()["pid"].as_u64().expect("a pid in the answer")
    }

    /// baton's pid in the container: the unit's main pid.
    fn main_pid(&self) -> String {
        self.rig.show(self.unit, "MainPID")
    }

    /// The unit's journal, messages only.
    fn journal(&self) -> String {
        self.rig
            .run(&format!("journalctl -u {} -o cat --no-pager", self.unit))
    }

    /// The arguments myapp's next start gets.
    fn set_flags(&self, flags: &str) {
        self.rig.write("/etc/myapp/flags", flags, 0o644);
    }

    /// Adds a drop-in to the service and reloads systemd's configuration.
    fn drop_in(&self, name: &str, contents: &str) {
        self.rig.write(
            &format!("/etc/systemd/system/{}.d/{name}.conf", self.unit),
            contents,
            0o644,
        );
        self.rig.run("systemctl daemon-reload");
    }

    /// A load at myapp from the host, started and seen to succeed.
    fn load(&self, configure: impl FnOnce(&mut LoadConfig)) -> Load {
        let mut config = LoadConfig::new(Target::Tcp(self.addr));
        configure(&mut config);
        let load = Load::start(config);
        load.wait_ok(100);
        load
    }

    /// A `GET /slow?ms=` that myapp's worker has accepted: it was sent on a
    /// connection made before a later one was answered, and one worker
    /// accepts in the order connections arrived. The thread gives its answer.
    fn slow_request(&self, ms: u64) -> JoinHandle<Result<Value, String>> {
        let mut stream = TcpStream::connect(self.addr).expect("connecting to myapp");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("a read timeout");
        http::send_get(&mut stream, &format!("/slow?ms={ms}")).expect("sending GET /slow");
        let addr = self.addr.to_string();
        wait_for(
            "a later connection answered",
            Duration::from_secs(10),
            || http::get(&addr, "/", Duration::from_secs(5)).ok(),
        );
        std::thread::spawn(move || {
            let response = http::read_response(&mut stream)?;
            match response.status {
                200 => response.json(),
                other => Err(format!("status {other}: {}", response.body)),
            }
        })
    }

    /// How long after `since` myapp was answered by a worker other than
    /// `old` (a new baton's), asking again and again; every request must be
    /// answered (a refused connection fails the test).
    fn serving_again(&self, old: u64, since: Instant) -> Duration {
        let deadline = since + Duration::from_secs(30);
        loop {
            assert!(
                Instant::now() < deadline,
                "myapp not served by a new worker within 30s"
            );
            let answer = http::get_json(&self.addr.to_string(), "/", http::TIMEOUT)
                .unwrap_or_else(|e| panic!("a request while systemd restarts baton: {e}"));
            if answer["pid"].as_u64() != Some(old) {
                return since.elapsed();
            }
        }
    }
}

fn parse_json(text: &str) -> Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The highest generation `status` knows of: serving, draining, starting
/// or being started by a reload.
fn newest_generation(status: &Value) -> u64 {
    let listed = status["generations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|g| g["generation"].as_u64());
    let reloading = status["reloading"]["generation"].as_u64();
    listed
        .chain(reloading)
        .chain(status["generation"].as_u64())
        .max()
        .unwrap_or(0)
}

/// Milliseconds, for the figures printed.
fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// `min / median / max` of some durations, in ms.
fn spread(mut times: Vec<Duration>) -> String {
    times.sort();
    match (times.first(), times.get(times.len() / 2), times.last()) {
        (Some(min), Some(median), Some(max)) => {
            format!("{} / {} / {} ms", ms(*min), ms(*median), ms(*max))
        }
        _ => "none".into(),
    }
}

fn print_load(what: &str, report: &LoadReport) {
    eprintln!(
        "real systemd: {what}: {} requests, {} failed, {} retried on a closed keep-alive \
         connection; generations {:?}",
        report.counts.total(),
        report.counts.failed(),
        report.counts.retried,
        report.generations.keys().collect::<Vec<_>>()
    );
}

#[test]
fn the_shipped_units_verify_clean_and_serve_on_the_socket_as_an_unprivileged_user() {
    let Some(rig) = Rig::boot() else { return };
    prepare(&rig);
    // As shipped, not even the port changed.
    for unit in ["myapp.socket", "myapp.service", "myapp-root.service"] {
        rig.write(
            &format!("/etc/systemd/system/{unit}"),
            &shipped(unit),
            0o644,
        );
    }
    let verify = rig.sh("systemd-analyze verify /etc/systemd/system/myapp.socket \
         /etc/systemd/system/myapp.service /etc/systemd/system/myapp-root.service");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(
        verify.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {}\n{said}",
        verify.status
    );
    rig.run("rm /etc/systemd/system/myapp-root.service");

    let app = App::socket_activated(&rig);
    let status = rig.run("systemctl status myapp.service --no-pager");
    eprintln!("real systemd: after `systemctl enable --now`:\n{status}");
    assert!(status.contains("Active: active (running)"), "{status}");
    assert!(status.contains("TriggeredBy: ● myapp.socket"), "{status}");
    assert!(
        status.contains("Status: \"serving generation 1\""),
        "{status}"
    );
    // baton and its worker run as myapp; the socket is systemd's.
    let worker = app.worker_pid();
    let users = rig.run(&format!("ps -o user= -p {} -p {worker}", app.main_pid()));
    assert_eq!(
        users.split_whitespace().collect::<Vec<_>>(),
        ["myapp", "myapp"],
        "{users}"
    );
    let text = rig.run("baton status --control /run/myapp/baton.sock");
    eprintln!("real systemd: `baton status`:\n{text}");
    assert!(text.contains("(from systemd)"), "{text}");

    let started = Instant::now();
    rig.run("systemctl reload myapp");
    eprintln!(
        "real systemd: `systemctl reload myapp` took {} ms",
        ms(started.elapsed())
    );
    assert_eq!(app.status()["generation"], 2);
    app.wait_answered_by(2);
    let journal = app.journal();
    eprintln!("real systemd: the journal:\n{journal}");
    assert!(
        journal.contains("listener `http` on 127.0.0.1:"),
        "{journal}"
    );
    assert!(journal.contains("(from systemd)"), "{journal}");
}

#[test]
fn systemctl_reload_under_load_loses_nothing_and_returns_once_the_new_generation_serves() {
    let Some(rig) = Rig::boot() else { return };
    let app = App::socket_activated(&rig);
    let load = app.load(|c| {
        c.slow_fraction = 0.05;
        c.slow_ms = 300;
    });
    let mut took = Vec::new();
    for generation in 2..=11u64 {
        let started = Instant::now();
        // `baton status` right after `systemctl reload` returns, in the same
        // shell.
        let status = parse_json(&rig.run(&format!("systemctl reload myapp && {STATUS}")));
        took.push(started.elapsed());
        assert_eq!(status["generation"], generation, "{status}");
        assert_eq!(status["last_reload"]["ok"], true, "{status}");
        assert_eq!(status["last_reload"]["generation"], generation, "{status}");
        assert!(status["reloading"].is_null(), "{status}");
        let serving: Vec<&Value> = status["generations"]
            .as_array()
            .expect("generations")
            .iter()
            .filter(|g| g["state"] == "serving")
            .collect();
        assert!(
            serving.len() == 1 && serving[0]["generation"] == generation,
            "{status}"
        );
        load.wait_ok(100);
    }
    let report = load.finish();
    print_load("10 `systemctl reload`s under load", &report);
    eprintln!(
        "real systemd: `systemctl reload` (min / median / max): {}",
        spread(took)
    );
    report.assert_no_failures();
    for generation in 1..=11 {
        assert!(
            report.generations.contains_key(&generation),
            "generation {generation} served nothing: {report}"
        );
    }
}

#[test]
fn systemctl_reload_racing_a_sighup_storm_returns_only_after_a_reload_it_asked_for() {
    let Some(rig) = Rig::boot() else { return };
    let app = App::socket_activated(&rig);
    let load = app.load(|c| {
        c.slow_fraction = 0.05;
        c.slow_ms = 100;
    });
    let mut raced = 0;
    let mut took = Vec::new();
    // The shipped unit, then Type=notify-reload (systemd sends SIGHUP and
    // waits for a RELOADING=1 dated after it).
    for variant in ["shipped", "notify-reload"] {
        if variant == "notify-reload" {
            app.drop_in(
                "notify-reload",
                "[Service]\nType=notify-reload\nExecReload=\n",
            );
            rig.run("systemctl restart myapp.service");
        }
        // SIGHUPs every 20 ms until /run/storm-stop appears.
        let storm = rig.spawn(
            "P=$(systemctl show -P MainPID myapp); rm -f /run/storm-stop; \
             while [ ! -e /run/storm-stop ]; do kill -HUP $P || exit 1; sleep 0.02; done",
        );
        for _ in 0..8 {
            let started = Instant::now();
            let out = rig.run(&format!("{STATUS} && systemctl reload myapp && {STATUS}"));
            took.push(started.elapsed());
            let mut lines = out.lines();
            let before = parse_json(lines.next().expect("status before"));
            let after = parse_json(lines.next().expect("status after"));
            if !before["reloading"].is_null() || before["reload_queued"] == true {
                raced += 1;
            }
            // Every generation known before the call had started before
            // it: the one serving when it returns came after.
            let newest = newest_generation(&before);
            assert!(
                after["generation"].as_u64() > Some(newest),
                "{variant}: `systemctl reload` returned with generation {} serving, \
                 but generation {newest} already existed before it was called\n\
                 before: {before}\nafter: {after}",
                after["generation"]
            );
        }
        rig.write("/run/storm-stop", "", 0o644);
        let storm = storm.wait_with_output().expect("the storm");
        assert!(
            storm.status.success(),
            "the SIGHUP storm: {}",
            String::from_utf8_lossy(&storm.stderr)
        );
        assert_eq!(rig.show("myapp.service", "ActiveState"), "active");
        assert_eq!(rig.show("myapp.service", "SubState"), "running");
    }
    let report = load.finish();
    print_load("SIGHUP storms racing 16 `systemctl reload`s", &report);
    let status = app.status();
    eprintln!(
        "real systemd: the storms made {} reloads; {raced} of 16 `systemctl reload`s \
         started while one ran or was queued; each took (min / median / max) {}",
        status["reloads"]["ok"],
        spread(took)
    );
    report.assert_no_failures();
    assert!(
        raced > 0,
        "no `systemctl reload` raced a reload in progress"
    );
    assert!(
        !app.journal().contains("Reload failed"),
        "{}",
        app.journal()
    );
}

#[test]
fn a_new_version_that_fails_leaves_the_old_one_serving_and_systemctl_reload_fails() {
    let Some(rig) = Rig::boot() else { return };
    let app = App::socket_activated(&rig);
    let load = app.load(|_| {});
    app.set_flags("--no-such-flag");
    let started = Instant::now();
    let reload = rig.sh("systemctl reload myapp");
    let took = started.elapsed();
    let said = String::from_utf8_lossy(&reload.stderr).into_owned();
    eprintln!(
        "real systemd: a failing version: `systemctl reload myapp` exited {:?} after {} ms:\n{said}",
        reload.status.code(),
        ms(took)
    );
    assert_eq!(reload.status.code(), Some(1), "{said}");
    assert!(said.contains("Job for myapp.service failed"), "{said}");
    let status = rig.run("systemctl status myapp.service --no-pager");
    eprintln!("real systemd: `systemctl status myapp` after it:\n{status}");
    assert!(status.contains("Active: active (running)"), "{status}");
    assert!(
        status.contains("Status: \"serving generation 1; generation 2 failed to start\""),
        "{status}"
    );
    assert!(
        status.contains(
            "ExecReload=/usr/local/bin/baton reload --wait (code=exited, status=1/FAILURE)"
        ),
        "{status}"
    );
    let baton = app.status();
    assert_eq!(baton["generation"], 1, "{baton}");
    assert_eq!(baton["last_reload"]["ok"], false, "{baton}");
    assert_eq!(app.get()["generation"], 1);
    let journal = app.journal();
    assert!(
        journal.contains("baton: reload failed: exited with status 1 before it was ready"),
        "{journal}"
    );
    assert!(
        journal.contains("Reload failed for myapp.service"),
        "{journal}"
    );

    // The next version is good again.
    app.set_flags("");
    let status = parse_json(&rig.run(&format!("systemctl reload myapp && {STATUS}")));
    assert_eq!(status["generation"], 3, "{status}");
    app.wait_answered_by(3);
    load.wait_ok(100);

    // Under Type=notify-reload, systemd 257 takes baton's READY=1 after the
    // failed reload as success: the caller is not told.
    app.drop_in(
        "notify-reload",
        "[Service]\nType=notify-reload\nExecReload=\n",
    );
    rig.run("systemctl restart myapp.service");
    app.set_flags("--no-such-flag");
    let reload = rig.sh("systemctl reload myapp");
    let status = rig.run("systemctl status myapp.service --no-pager");
    eprintln!(
        "real systemd: the same under Type=notify-reload: `systemctl reload` exited {:?}",
        reload.status.code()
    );
    assert_eq!(reload.status.code(), Some(0));
    assert!(
        status.contains("Status: \"serving generation 1; generation 2 failed to start\""),
        "{status}"
    );

    let report = load.finish();
    print_load("two failed reloads and a good one", &report);
    report.assert_no_failures();
}

#[test]
fn systemctl_stop_under_load_finishes_what_is_in_flight_and_exits_0_without_sigkill() {
    let Some(rig) = Rig::boot() else { return };
    let app = App::socket_activated(&rig);
    let load = app.load(|c| {
        c.slow_fraction = 0.2;
        c.slow_ms = 500;
    });
    load.wait_ok(500);
    let slow = app.slow_request(2000);
    // Every request started before the stop must be answered; none starts
    // after it (nothing would serve it once the socket is gone).
    load.stop_starting();
    let started = Instant::now();
    rig.run("systemctl stop myapp.socket myapp.service");
    let took = started.elapsed();
    let report = load.finish();
    let slow = slow.join().expect("the slow request's thread");
    print_load("`systemctl stop` under load", &report);
    eprintln!(
        "real systemd: `systemctl stop` with a 2000 ms request in flight took {} ms",
        ms(took)
    );
    report.assert_no_failures();
    let slow = slow.unwrap_or_else(|e| panic!("the slow request was cut: {e}"));
    assert_eq!(slow["generation"], 1);
    assert_eq!(rig.show("myapp.service", "ActiveState"), "inactive");
    assert_eq!(rig.show("myapp.service", "Result"), "success");
    assert_eq!(rig.show("myapp.service", "ExecMainStatus"), "0");
    let journal = app.journal();
    assert!(
        journal.contains("every generation has exited; baton stops"),
        "{journal}"
    );
    assert!(
        !journal.contains("SIGKILL") && !journal.contains("9/KILL"),
        "{journal}"
    );
}

#[test]
fn systemctl_restart_under_load_refuses_nothing_and_lets_in_flight_requests_finish() {
    let Some(rig) = Rig::boot() else { return };
    let app = App::socket_activated(&rig);
    let load = app.load(|c| {
        c.slow_fraction = 0.05;
        c.slow_ms = 300;
    });
    let mut restarts = Vec::new();
    let mut serving = Vec::new();
    for _ in 0..3 {
        let old_main = app.main_pid();
        let old_worker = app.worker_pid();
        let slow = app.slow_request(1000);
        let started = Instant::now();
        let restart = rig.spawn("systemctl restart myapp.service");
        serving.push(app.serving_again(old_worker, started));
        let restart = restart.wait_with_output().expect("systemctl restart");
        restarts.push(started.elapsed());
        assert!(
            restart.status.success(),
            "{}",
            String::from_utf8_lossy(&restart.stderr)
        );
        assert_ne!(app.main_pid(), old_main);
        let slow = slow.join().expect("the slow request's thread");
        slow.unwrap_or_else(|e| panic!("the slow request was cut by the restart: {e}"));
        load.wait_ok(100);
    }
    let report = load.finish();
    print_load("3 `systemctl restart`s under load", &report);
    eprintln!(
        "real systemd: `systemctl restart` with a 1000 ms request in flight took {}; \
         a new baton's worker answered after {}",
        spread(restarts),
        spread(serving)
    );
    report.assert_no_failures();
    let journal = app.journal();
    assert!(!journal.contains("SIGKILL"), "{journal}");
}

#[test]
fn kill_9_of_baton_refuses_nothing_and_its_workers_finish_their_requests() {
    let Some(rig) = Rig::boot() else { return };
    let app = App::socket_activated(&rig);
    let load = app.load(|c| {
        c.slow_fraction = 0.05;
        c.slow_ms = 300;
    });
    let mut recovered = Vec::new();
    for round in 1..=3 {
        let old_worker = app.worker_pid();
        let restarts: u64 = rig
            .show("myapp.service", "NRestarts")
            .parse()
            .expect("a count");
        let slow = app.slow_request(1000);
        let started = Instant::now();
        rig.run("kill -9 $(systemctl show -P MainPID myapp.service)");
        recovered.push(app.serving_again(old_worker, started));
        let slow = slow.join().expect("the slow request's thread");
        slow.unwrap_or_else(|e| panic!("a request in flight died with baton: {e}"));
        // The orphaned worker drained and exited by itself.
        wait_for("the old worker to exit", Duration::from_secs(10), || {
            (!rig.sh(&format!("kill -0 {old_worker}")).status.success()).then_some(())
        });
        assert_eq!(
            rig.show("myapp.service", "NRestarts"),
            (restarts + 1).to_string(),
            "round {round}: systemd restarted baton once"
        );
        // The start rate limit (5 in 10 s) is not what this test is about.
        rig.run("systemctl reset-failed myapp.service");
        load.wait_ok(100);
    }
    let report = load.finish();
    print_load("3 `kill -9`s of baton under load", &report);
    eprintln!(
        "real systemd: after `kill -9` of baton a new baton's worker answered after {}",
        spread(recovered)
    );
    report.assert_no_failures();
    let journal = app.journal();
    assert!(!journal.contains("SIGKILL"), "{journal}");
    assert!(
        journal.contains("Found left-over process"),
        "systemd should have noticed the draining worker: {journal}"
    );

    // What KillMode=mixed (the unit before) does instead: the worker is
    // killed with baton, and its request in flight with it.
    app.drop_in("killmode", "[Service]\nKillMode=mixed\n");
    let slow = app.slow_request(1000);
    rig.run("kill -9 $(systemctl show -P MainPID myapp.service)");
    let cut = slow.join().expect("the slow request's thread");
    assert!(cut.is_err(), "KillMode=mixed let it finish: {cut:?}");
    let journal = app.journal();
    assert!(
        journal.contains("(listenfd-axum) with signal SIGKILL"),
        "{journal}"
    );
    eprintln!("real systemd: under KillMode=mixed the request in flight died: {cut:?}");
}

#[test]
fn journald_shows_batons_errors_and_warnings_at_their_priority_without_a_second_timestamp() {
    let Some(rig) = Rig::boot() else { return };
    let app = App::socket_activated(&rig);
    // An error: a new version that fails.
    app.set_flags("--no-such-flag");
    assert!(!rig.sh("systemctl reload myapp").status.success());
    app.set_flags("");
    // A warning: a second SIGTERM while baton drains a slow request.
    let main = app.main_pid();
    let slow = app.slow_request(5000);
    let stop = rig.spawn("systemctl stop myapp.service");
    wait_for("baton to start stopping", Duration::from_secs(10), || {
        app.journal()
            .contains("stopping: draining every generation")
            .then_some(())
    });
    rig.run(&format!("kill -TERM {main}"));
    let stop = stop.wait_with_output().expect("systemctl stop");
    assert!(stop.status.success());
    assert!(slow.join().expect("the slow request's thread").is_err());

    let warnings = rig.run("journalctl -u myapp.service -p warning -o cat --no-pager");
    eprintln!("real systemd: `journalctl -u myapp -p warning`:\n{warnings}");
    assert!(
        warnings.contains("generation 2 failed: exited with status 1 before it was ready"),
        "{warnings}"
    );
    assert!(
        warnings.contains("SIGTERM while stopping: killing every generation now"),
        "{warnings}"
    );
    assert!(!warnings.contains("is ready (READY=1)"), "{warnings}");

    // Every line baton wrote, with its priority: the level is in PRIORITY,
    // the time is the journal's; the message carries neither.
    let entries = rig.run(&format!(
        "journalctl -u myapp.service _PID={main} -o json --no-pager"
    ));
    let mut seen = [0; 8];
    for line in entries.lines() {
        let entry = parse_json(line);
        let message = entry["MESSAGE"].as_str().unwrap_or_default();
        let priority: usize = entry["PRIORITY"]
            .as_str()
            .and_then(|p| p.parse().ok())
            .expect("a PRIORITY");
        seen[priority] += 1;
        let starts_with_time =
            message.len() > 4 && message[..4].bytes().all(|b| b.is_ascii_digit());
        assert!(
            !starts_with_time
                && !message.starts_with('<')
                && !message.contains('\u{1b}')
                && !["INFO", "WARN", "ERROR", "DEBUG"]
                    .iter()
                    .any(|level| message.trim_start().starts_with(level)),
            "a second timestamp, level or colour in {message:?}"
        );
        let expected = if message.contains(" failed: ") {
            3
        } else if message.contains("while stopping") {
            4
        } else {
            6
        };
        assert_eq!(priority, expected, "{message:?}");
    }
    eprintln!(
        "real systemd: baton's journal lines by priority: {} error, {} warning, {} info",
        seen[3], seen[4], seen[6]
    );
    assert!(seen[3] >= 1 && seen[4] >= 1 && seen[6] >= 5, "{seen:?}");
}

#[test]
fn a_root_service_binds_a_privileged_port_itself_and_runs_its_workers_as_another_user() {
    let Some(rig) = Rig::boot() else { return };
    let app = App::binding_as_root(&rig);
    let worker = app.worker_pid();
    let users = rig.run(&format!("ps -o user= -p {} -p {worker}", app.main_pid()));
    assert_eq!(
        users.split_whitespace().collect::<Vec<_>>(),
        ["root", "myapp"],
        "{users}"
    );
    let load = app.load(|c| {
        c.slow_fraction = 0.05;
        c.slow_ms = 300;
    });
    for generation in 2..=4u64 {
        let status = parse_json(&rig.run(&format!("systemctl reload myapp-root && {STATUS}")));
        assert_eq!(status["generation"], generation, "{status}");
        load.wait_ok(100);
    }
    let report = load.finish();
    print_load(
        &format!("3 reloads of myapp-root on port {}", app.addr.port()),
        &report,
    );
    report.assert_no_failures();

    // Without a socket unit the port is baton's, but baton keeps it in
    // systemd's file descriptor store: while systemd restarts a killed
    // baton, connections wait in the very same queue.
    let journal = app.journal();
    assert!(
        journal.contains("file descriptor store (up to 16) keeps 1 listener(s)"),
        "{journal}"
    );
    let load = app.load(|_| {});
    let old_worker = app.worker_pid();
    let slow = app.slow_request(1000);
    let started = Instant::now();
    rig.run("kill -9 $(systemctl show -P MainPID myapp-root.service)");
    let recovered = wait_for("a new baton's worker", Duration::from_secs(30), || {
        http::get_json(&app.addr.to_string(), "/", Duration::from_secs(5))
            .ok()
            .filter(|answer| answer["pid"].as_u64() != Some(old_worker))
            .map(|_| started.elapsed())
    });
    let slow = slow.join().expect("the slow request's thread");
    load.wait_ok(100);
    let report = load.finish();
    print_load(
        "`kill -9` of a root baton that keeps its port in the fd store",
        &report,
    );
    eprintln!(
        "real systemd: after `kill -9` of the root baton, a new worker answered after {} ms",
        ms(recovered)
    );
    slow.unwrap_or_else(|e| panic!("a request in flight died with baton: {e}"));
    report.assert_no_failures();

    rig.run("systemctl stop myapp-root.service");
    assert_eq!(rig.show("myapp-root.service", "Result"), "success");
    let journal = app.journal();
    assert!(!journal.contains("SIGKILL"), "{journal}");
    assert!(!journal.contains("EPERM"), "{journal}");
}

#[test]
fn kept_values_survive_kill_9_of_baton_through_systemds_file_descriptor_store() {
    let Some(rig) = Rig::boot() else { return };
    let app = App::socket_activated(&rig);
    // The next version of myapp keeps a count (the SDK's `counter`).
    rig.write(
        "/usr/local/bin/myapp",
        "#!/bin/sh\nexec /opt/baton/counter\n",
        0o755,
    );
    rig.run("systemctl reload myapp");
    app.wait_answered_by(2);
    let addr = app.addr.to_string();
    for _ in 0..25 {
        http::get_json(&addr, "/", http::TIMEOUT).expect("an increment");
    }
    // (The old worker may have taken one of them just after the reload.)
    let count = http::get_json(&addr, "/peek", http::TIMEOUT).expect("/peek")["count"].clone();
    assert!(count.as_u64() > Some(20), "{count}");
    // The counter checkpoints within a second; baton stores each checkpoint.
    wait_for("the count's checkpoint", Duration::from_secs(10), || {
        let peek = http::get_json(&addr, "/peek", http::TIMEOUT).ok()?;
        (peek["checkpointed"] == count).then_some(())
    });
    let stored = rig.run("systemd-analyze fdstore myapp.service");
    assert!(stored.contains("baton-kept"), "{stored}");
    let old = app.worker_pid();
    let started = Instant::now();
    rig.run("kill -9 $(systemctl show -P MainPID myapp.service)");
    let took = app.serving_again(old, started);
    // A new baton, from generation 1 again, and the count where the
    // checkpoint left it, plus the one increment that found the new worker.
    let peek = http::get_json(&addr, "/peek", http::TIMEOUT).expect("/peek");
    let expected = count.as_u64().map(|n| n + 1);
    assert_eq!(
        peek["count"].as_u64(),
        expected,
        "{peek}\n{}",
        app.journal()
    );
    assert_eq!(peek["generation"], 1, "{peek}");
    let journal = app.journal();
    assert!(journal.contains("systemd's store kept"), "{journal}");
    eprintln!(
        "real systemd: after `kill -9` of baton, a new baton served the kept count of {count} \
         after {} ms",
        ms(took)
    );
}

#[test]
fn baton_upgrade_keeps_the_main_pid_and_the_workers_and_serves_under_load() {
    let Some(rig) = Rig::boot() else { return };
    let app = App::socket_activated(&rig);
    let main_pid = app.main_pid();
    let worker = app.worker_pid();
    let load = app.load(|c| {
        c.slow_fraction = 0.05;
        c.slow_ms = 300;
    });
    let mut took = Vec::new();
    for i in 1..=5u64 {
        let started = Instant::now();
        let said = rig.run("baton upgrade --wait --control /run/myapp/baton.sock");
        took.push(started.elapsed());
        assert!(said.contains("runs in place"), "{said}");
        assert_eq!(app.main_pid(), main_pid, "systemd's MAINPID changed");
        let status = app.status();
        assert_eq!(status["upgrades"]["ok"], i, "{status}");
        load.wait_ok(100);
    }
    // SIGUSR2 to the main process, the systemd way.
    rig.run("systemctl kill --kill-whom=main -s USR2 myapp.service");
    wait_for("SIGUSR2's upgrade", Duration::from_secs(20), || {
        (app.status()["upgrades"]["ok"] == 6).then_some(())
    });
    load.wait_ok(100);
    // Still one unit, never restarted, the same worker serving.
    assert_eq!(app.main_pid(), main_pid);
    assert_eq!(rig.show("myapp.service", "NRestarts"), "0");
    assert_eq!(rig.show("myapp.service", "ActiveState"), "active");
    assert_eq!(app.worker_pid(), worker);
    // A reload after the upgrades still works and is told to systemd.
    rig.run("systemctl reload myapp");
    app.wait_answered_by(2);
    let report = load.finish();
    print_load(
        "6 upgrades of baton in place and a reload under load",
        &report,
    );
    eprintln!(
        "real systemd: `baton upgrade --wait` (min / median / max): {}",
        spread(took)
    );
    report.assert_no_failures();
    assert!(app.journal().contains("upgraded in place"));
}
