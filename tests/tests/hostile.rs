//! baton where production runs it, not where tests are comfortable: workers
//! of another user behind a private control directory, odd umasks, a
//! stranger on a notify socket, a worker killed while a reload builds or
//! starts slowly, baton out of descriptors while a worker checkpoints and
//! while a reload starts, signals ignored and blocked by whoever started
//! baton, a deploy script that repeats `baton stop`. Each runs under load
//! where a connection could be lost, and counts every request.
//!
//! (The control directory's own attacks, planted symlinks and `sun_path`,
//! are `hostile_fs.rs`; a stderr nobody reads is `hostile_stderr.rs`.)

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use baton_tests::harness::{self, bin, pyworker, wait_for, Baton, BatonBuilder, Load};
use baton_tests::http;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The runtime directory (notify sockets) baton made in `dir`.
fn runtime_dir_in(dir: &Path) -> PathBuf {
    std::fs::read_dir(dir)
        .expect("listing the control directory")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("baton-"))
                && p.is_dir()
        })
        .unwrap_or_else(|| panic!("no runtime directory in {}", dir.display()))
}

/// The value of `key` in process `pid`'s environment.
fn environ(pid: i32, key: &str) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|&b| b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")).map(str::to_owned))
}

/// A private directory (0700) inside another private directory (0700),
/// like `$XDG_RUNTIME_DIR` or a unit's `RuntimeDirectoryMode=0700`.
fn private_control(builder: &BatonBuilder) -> PathBuf {
    let outer = builder.dir().join("private");
    let inner = outer.join("run");
    std::fs::create_dir_all(&inner).expect("mkdir");
    for d in [&outer, &inner] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    }
    inner.join("baton.sock")
}

/// Starts baton through `sh` with `umask` set first.
fn with_umask(builder: BatonBuilder, umask: &str) -> BatonBuilder {
    builder.wrap(["sh", "-c", &format!("umask {umask}; exec \"$@\""), "sh"])
}

#[test]
fn workers_of_another_user_reach_their_notify_socket_from_a_private_control_directory() {
    if !harness::root("--user needs it") {
        return;
    }
    for umask in ["000", "077"] {
        let builder = with_umask(Baton::builder(), umask);
        let control = private_control(&builder);
        let baton = builder
            .control(&control)
            .args(["--listen", "http=tcp://127.0.0.1:0", "--user", "nobody"])
            .worker(["/usr/bin/python3", pyworker().to_str().expect("utf-8")])
            .start();
        let load = Load::http(&baton, "http", |c| c.concurrency = 4);
        load.wait_ok(20);
        for generation in 2..=4 {
            assert_eq!(baton.reload_ok(), generation);
            load.wait_ok(20);
        }
        load.finish().assert_no_failures();

        // The notify sockets are not where the worker cannot go (the
        // private control directory), and nothing of baton's is writable by
        // anyone else, whatever the umask.
        let worker = baton.worker_pid(4).expect("generation 4 serves");
        let notify = PathBuf::from(environ(worker, "NOTIFY_SOCKET").expect("NOTIFY_SOCKET"));
        let run_dir = notify.parent().expect("a directory").to_path_buf();
        assert!(!run_dir.starts_with(control.parent().expect("dir")));
        let dir_meta = std::fs::metadata(&run_dir).expect("runtime directory");
        assert_eq!(dir_meta.mode() & 0o7777, 0o711, "umask {umask}");
        assert_eq!(dir_meta.uid(), 0);
        let sock_meta = std::fs::metadata(&notify).expect("notify socket");
        assert_eq!(sock_meta.mode() & 0o777, 0o600, "umask {umask}");
        assert_eq!(sock_meta.uid(), 65534, "owned by the worker's user");
        drop(baton);
    }
}

/// Sends `message` to the datagram socket at `path` as user `uid`, from a
/// Python of Debian's (one another user can run); the outcome as Python
/// printed it: `sent`, or `refused ERRNO`.
fn send_as(uid: u32, path: &str, message: &str) -> String {
    let out = std::process::Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .args(["--clear-groups", "/usr/bin/python3", "-c"])
        .arg(
            "import socket,sys\n\
             s=socket.socket(socket.AF_UNIX,socket.SOCK_DGRAM)\n\
             try:\n  s.sendto(sys.argv[2].encode(),sys.argv[1]); print('sent')\n\
             except OSError as e: print('refused', e.errno)\n",
        )
        .args([path, message])
        .output()
        .expect("running setpriv");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn no_other_user_can_make_a_starting_generation_ready() {
    if !harness::root("acting as other users needs it") {
        return;
    }
    // umask 000: the notify socket must still be the worker's alone.
    let baton = with_umask(Baton::builder(), "000")
        .args(["--listen", "http=tcp://127.0.0.1:0", "--user", "nobody"])
        .args(["--ready-timeout", "60s"])
        .worker([
            "/bin/sh".to_owned(),
            "-c".to_owned(),
            format!(
                "exec /usr/bin/python3 {} $(cat {}/flags 2>/dev/null)",
                pyworker().display(),
                "$BATON_TEST_DIR"
            ),
        ]);
    let dir = baton.dir().to_path_buf();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut baton = baton.env("BATON_TEST_DIR", &dir).spawn();
    baton.wait_serving(1);
    let load = Load::http(&baton, "http", |c| c.concurrency = 2);
    std::fs::write(dir.join("flags"), "--never-ready").expect("flags");
    std::fs::set_permissions(dir.join("flags"), std::fs::Permissions::from_mode(0o644))
        .expect("chmod");
    let answer = baton.request(r#"{"command":"reload"}"#);
    assert_eq!(answer["ok"], true, "{answer}");
    let pid = wait_for("generation 2 to start", Duration::from_secs(10), || {
        baton.worker_pid(2)
    });
    let notify = wait_for("its NOTIFY_SOCKET", Duration::from_secs(10), || {
        environ(pid, "NOTIFY_SOCKET")
    });
    // A stranger (uid 65533) says READY=1.
    let said = send_as(65533, &notify, "READY=1");
    assert!(
        said.starts_with("refused"),
        "the stranger could send: {said}"
    );
    // A message of the worker's own user after it, as a barrier: once it is
    // seen, anything the stranger got through would have been too.
    assert_eq!(send_as(65534, &notify, "STATUS=barrier"), "sent");
    wait_for("the barrier", Duration::from_secs(10), || {
        let status = baton.status();
        let g2 = status["generations"]
            .as_array()?
            .iter()
            .find(|g| g["generation"] == 2)?
            .clone();
        (g2["status"] == "barrier").then_some(g2)
    });
    let status = baton.status();
    assert_eq!(status["generation"], 1, "{status}");
    let g2 = &status["generations"].as_array().expect("generations")[1];
    assert_eq!(g2["state"], "starting", "{status}");
    // The worker's own user may.
    assert_eq!(send_as(65534, &notify, "READY=1"), "sent");
    baton.wait_serving(2);
    load.finish().assert_no_failures();
}

/// Kills generation `generation`'s worker with SIGKILL and waits until it is
/// gone. What it had accepted dies with it (no supervisor can save that);
/// what arrives from then on must be served.
fn kill_and_reap(baton: &Baton, generation: u64) {
    let pid = baton.worker_pid(generation).expect("the generation runs");
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill");
    wait_for(
        "the killed worker to be gone",
        Duration::from_secs(10),
        || harness::process_gone(pid).then_some(()),
    );
}

/// A `--build` that returns at once the first time and, from then on, waits
/// until the test creates `go` in `dir`.
fn gated_build(dir: &Path) -> String {
    format!(
        "if [ -f {d}/built ]; then while [ ! -f {d}/go ]; do sleep 0.02; done; rm {d}/go; fi; \
         touch {d}/built",
        d = dir.display()
    )
}

#[test]
fn a_serving_worker_killed_while_a_reload_builds_is_restarted_at_once() {
    let builder = Baton::builder();
    let build = gated_build(builder.dir());
    let dir = builder.dir().to_path_buf();
    let baton = builder
        .args(["--listen", "http=tcp://127.0.0.1:0", "--build", &build])
        .pyworker("")
        .start();
    let addr = baton.address("http");
    // The reload builds (until `go`), generation 2 is reserved for it.
    assert_eq!(baton.request(r#"{"command":"reload"}"#)["ok"], true);
    wait_for("the build to run", Duration::from_secs(10), || {
        (baton.status()["reloading"]["step"] == "building").then_some(())
    });
    kill_and_reap(&baton, 1);
    // Served again within a worker's start-up, while the build still runs:
    // every request from now on is answered.
    let load = Load::http(&baton, "http", |c| {
        c.concurrency = 4;
        c.timeout = Duration::from_secs(5);
    });
    let body = http::get(&addr, "/", Duration::from_secs(5)).expect("served after the crash");
    assert!(body.contains("\"generation\": 3"), "{body}");
    load.wait_ok(20);
    assert_eq!(baton.status()["reloading"]["step"], "building");
    // The build ends; the reload's generation replaces the restarted one.
    std::fs::write(dir.join("go"), "").expect("go");
    wait_for("generation 2 to serve", Duration::from_secs(20), || {
        let s = baton.status();
        (s["generation"] == 2 && s["reloading"].is_null()).then_some(())
    });
    baton.wait_settled();
    load.wait_ok(20);
    load.finish().assert_no_failures();
    assert_eq!(
        http::get_json(&addr, "/", http::TIMEOUT).expect("GET")["generation"],
        2
    );
}

#[test]
fn a_serving_worker_killed_while_a_slow_successor_starts_is_restarted_at_once() {
    let mut baton = Baton::builder()
        .args([
            "--listen",
            "http=tcp://127.0.0.1:0",
            "--ready-timeout",
            "60s",
        ])
        .pyworker("")
        .start();
    let addr = baton.address("http");
    baton.set_flags("--ready-delay 60000");
    assert_eq!(baton.request(r#"{"command":"reload"}"#)["ok"], true);
    let slow = wait_for("generation 2 to exec", Duration::from_secs(10), || {
        let pid = baton.worker_pid(2)?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        String::from_utf8_lossy(&cmdline)
            .contains("--ready-delay")
            .then_some(pid)
    });
    // The restart reads its flags anew: it starts fast.
    baton.set_flags("");
    kill_and_reap(&baton, 1);
    let load = Load::http(&baton, "http", |c| {
        c.concurrency = 4;
        c.timeout = Duration::from_secs(5);
    });
    let body = http::get(&addr, "/", Duration::from_secs(5)).expect("served after the crash");
    assert!(body.contains("\"generation\": 3"), "{body}");
    baton.wait_serving(3);
    load.wait_ok(20);
    // The slow successor is still starting beside it.
    assert_eq!(baton.worker_pid(2), Some(slow));
    load.finish().assert_no_failures();
}

/// The lowest descriptor number process `pid` does not use.
fn lowest_free_fd(pid: i32) -> u64 {
    let used: std::collections::BTreeSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (0..)
        .find(|n| !used.contains(n))
        .expect("a free descriptor")
}

fn prlimit_nofile(pid: i32, soft: &str) {
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={soft}:"))
        .status()
        .expect("running prlimit (util-linux)");
    assert!(status.success(), "prlimit --nofile={soft}");
}

fn soft_nofile(pid: i32) -> String {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .expect("the soft limit")
        .to_owned()
}

#[test]
fn running_out_of_descriptors_costs_no_channel_and_no_kept_value() {
    let baton = Baton::builder()
        .args(["--listen", "http=tcp://127.0.0.1:0"])
        .flagged(bin("counter").to_str().expect("utf-8"), "")
        .start();
    let addr = baton.address("http");
    for _ in 0..18 {
        http::get_json(&addr, "/", http::TIMEOUT).expect("GET");
    }
    wait_for("a checkpoint of 18", Duration::from_secs(10), || {
        (http::get_json(&addr, "/peek", http::TIMEOUT).expect("GET")["checkpointed"] == 18)
            .then_some(())
    });
    // baton can open nothing more: the next checkpoint's memfd cannot be
    // received.
    let pid = baton.pid();
    let soft = soft_nofile(pid);
    prlimit_nofile(pid, &lowest_free_fd(pid).to_string());
    for _ in 0..13 {
        http::get_json(&addr, "/", http::TIMEOUT).expect("GET");
    }
    wait_for(
        "the worker to checkpoint 31",
        Duration::from_secs(10),
        || {
            (http::get_json(&addr, "/peek", http::TIMEOUT).expect("GET")["checkpointed"] == 31)
                .then_some(())
        },
    );
    // Enough time for baton to have received (and lost) it: its log says so.
    wait_for(
        "baton to report the lost descriptors",
        Duration::from_secs(10),
        || baton.log().contains("out of descriptors").then_some(()),
    );
    prlimit_nofile(pid, &soft);
    // The serving generation still speaks: the reload takes its real values.
    assert_eq!(baton.reload_ok(), 2);
    let peek = http::get_json(&addr, "/peek", http::TIMEOUT).expect("GET");
    assert_eq!(peek["generation"], 2, "{peek}");
    assert_eq!(peek["count"], 31, "{peek}\nlog:\n{}", baton.log());
}

#[test]
fn a_reload_that_runs_out_of_descriptors_fails_cleanly_and_the_next_one_works() {
    let baton = Baton::builder()
        .args(["--listen", "http=tcp://127.0.0.1:0"])
        .pyworker("")
        .start();
    let load = Load::http(&baton, "http", |c| c.concurrency = 4);
    load.wait_ok(20);
    let pid = baton.pid();
    let soft = soft_nofile(pid);
    // The request's own connection is the last descriptor baton may open.
    prlimit_nofile(pid, &(lowest_free_fd(pid) + 1).to_string());
    let answer = baton.reload();
    assert_eq!(answer["ok"], false, "{answer}");
    let error = answer["error"].as_str().unwrap_or_default();
    assert!(error.contains("Too many open files"), "{error}");
    load.wait_ok(20);
    prlimit_nofile(pid, &soft);
    assert_eq!(baton.reload_ok(), 3);
    load.wait_ok(20);
    baton.wait_settled();
    load.finish().assert_no_failures();
    // No socket file of the failed start is left behind.
    let run_dir = runtime_dir_in(baton.dir.path());
    let left: Vec<_> = std::fs::read_dir(&run_dir)
        .expect("runtime directory")
        .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
        .collect();
    assert_eq!(left, ["notify-3.sock"], "in {}", run_dir.display());
}

#[test]
fn a_worker_that_cannot_be_executed_fails_its_reload_with_the_reason_and_leaves_no_file() {
    let builder = Baton::builder();
    let program = builder.dir().join("server");
    std::fs::write(
        &program,
        format!("#!/bin/sh\nexec python3 {}\n", pyworker().display()),
    )
    .expect("write");
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let baton = builder
        .args(["--listen", "http=tcp://127.0.0.1:0"])
        .worker([&program])
        .start();
    let load = Load::http(&baton, "http", |c| c.concurrency = 4);
    load.wait_ok(20);
    std::fs::remove_file(&program).expect("rm");
    let answer = baton.reload();
    assert_eq!(answer["ok"], false, "{answer}");
    let error = answer["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("exec") && error.contains("No such file"),
        "{error}"
    );
    load.wait_ok(20);
    baton.wait_settled();
    load.finish().assert_no_failures();
    let run_dir = runtime_dir_in(baton.dir.path());
    let left: Vec<_> = std::fs::read_dir(&run_dir)
        .expect("runtime directory")
        .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
        .collect();
    assert_eq!(left, ["notify-1.sock"]);
    let dir_mode = std::fs::metadata(&run_dir).expect("dir").mode() & 0o7777;
    assert_eq!(dir_mode, 0o700);
}

/// What `/proc/PID/status` says of `field` (a hex signal mask).
fn signal_mask(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or_else(|| panic!("no {field} in {status}"))
}

#[test]
fn signals_ignored_or_blocked_by_whoever_started_baton_reach_neither_baton_nor_workers() {
    // Started the way a careless init script or `nohup` would: HUP, QUIT,
    // USR1 ignored, TERM and USR2 blocked.
    let starter = "import os,signal,sys\n\
                   for s in (signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1):\n\
                   \x20   signal.signal(s, signal.SIG_IGN)\n\
                   signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR2})\n\
                   os.execv(sys.argv[1], sys.argv[1:])\n";
    let builder = Baton::builder().wrap(["python3", "-c", starter]);
    let report = builder.dir().join("signals");
    // The worker writes down what it started with, then becomes the Python
    // worker. (A shell would not do: dash blocks every signal while it waits
    // for a command.)
    let script = "import os,sys\n\
                  status = open('/proc/self/status').read()\n\
                  open(sys.argv[1] + '.' + os.environ['BATON_GENERATION'], 'w').write(status)\n\
                  os.execv('/usr/bin/python3', ['python3', sys.argv[2]])\n";
    let mut baton = builder
        .args(["--listen", "http=tcp://127.0.0.1:0"])
        .worker([
            // Not a pyenv shim: bash ignores signals of glibc's own.
            "/usr/bin/python3".as_ref(),
            "-c".as_ref(),
            script.as_ref(),
            report.as_os_str(),
            pyworker().as_os_str(),
        ])
        .start();
    let load = Load::http(&baton, "http", |c| c.concurrency = 4);
    load.wait_ok(20);
    // SIGHUP reloads although it was ignored when baton started.
    baton.signal(Signal::SIGHUP);
    baton.wait_serving(2);
    load.wait_ok(20);
    for generation in [1, 2] {
        let status = std::fs::read_to_string(format!("{}.{generation}", report.display()))
            .expect("the worker's signal report");
        // Python itself ignores SIGPIPE and SIGXFSZ; nothing else may be.
        let own = (1 << (libc::SIGPIPE - 1)) | (1 << (libc::SIGXFSZ - 1));
        assert_eq!(signal_mask(&status, "SigIgn") & !own, 0, "{status}");
        assert_eq!(signal_mask(&status, "SigBlk"), 0, "{status}");
    }
    let report = load.finish();
    report.assert_no_failures();
    // SIGTERM stops it although it was blocked when baton started.
    baton.signal(Signal::SIGTERM);
    assert!(baton.wait_exit(Duration::from_secs(20)).success());
}

#[test]
fn a_repeated_stop_lets_in_flight_requests_finish_and_only_stop_now_kills() {
    for now in [false, true] {
        let mut baton = Baton::builder()
            .args([
                "--listen",
                "http=tcp://127.0.0.1:0",
                "--drain-timeout",
                "30s",
            ])
            .pyworker("")
            .start();
        let addr = baton.address("http");
        let slow = http::in_flight(&addr, "/slow?ms=3000", Duration::from_secs(20));
        // A request on a later connection answered means the slow one, queued
        // first, was accepted.
        wait_for("the worker to answer", Duration::from_secs(10), || {
            http::get(&addr, "/", Duration::from_secs(5)).ok()
        });
        let started = Instant::now();
        let first = baton.cli_spawn(&["stop"]);
        wait_for("baton to stop accepting", Duration::from_secs(10), || {
            (baton.status()["stopping"] == true).then_some(())
        });
        let second = if now {
            baton.cli(&["stop", "--now"])
        } else {
            baton.cli(&["stop"])
        };
        assert!(second.status.success(), "{second:?}");
        let first = first.wait_with_output().expect("the first stop");
        assert!(first.status.success(), "{first:?}");
        let answered = slow.join().expect("the slow request's thread");
        if now {
            assert!(answered.is_err(), "stop --now let it finish: {answered:?}");
            assert!(started.elapsed() < Duration::from_millis(2900));
        } else {
            assert!(answered.is_ok(), "a repeated stop cut it: {answered:?}");
        }
        assert!(baton.wait_exit(Duration::from_secs(20)).success());
    }
}

#[test]
fn duplicate_listener_names_and_a_group_without_a_user_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |args: &[&str]| {
        std::process::Command::new(bin("baton"))
            .args(["run", "--control"])
            .arg(dir.path().join("c.sock"))
            .args(args)
            .args(["--", "true"])
            .output()
            .expect("running baton")
    };
    let out = run(&[
        "--listen",
        "http=tcp://127.0.0.1:0",
        "--listen",
        "http=tcp://127.0.0.1:0",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the name `http` is given twice"),
        "{stderr}"
    );
    let out = run(&["--listen", "http=tcp://127.0.0.1:0", "--group", "nogroup"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--user"), "{stderr}");
}

#[test]
fn a_control_directory_too_deep_for_the_notify_sockets_is_refused_at_start() {
    let top = tempfile::tempdir().expect("tempdir");
    // The control socket's own path fits in a socket address; the notify
    // sockets baton puts beside it would not.
    let mut dir = top.path().to_path_buf();
    while dir.as_os_str().len() < 80 {
        dir.push("deeper");
    }
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let control = dir.join("b.sock");
    assert!(control.as_os_str().len() <= 107);
    let out = std::process::Command::new(bin("baton"))
        .args(["run", "--listen", "http=tcp://127.0.0.1:0", "--control"])
        .arg(&control)
        .args(["--", "python3"])
        .arg(pyworker())
        .output()
        .expect("running baton");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("notify sockets") && stderr.contains("at most 107 bytes"),
        "{stderr}"
    );
}

#[test]
fn under_any_umask_the_runtime_directory_and_notify_sockets_are_private() {
    for umask in ["000", "077"] {
        let baton = with_umask(Baton::builder(), umask)
            .args(["--listen", "http=tcp://127.0.0.1:0"])
            .pyworker("")
            .start();
        let load = Load::http(&baton, "http", |c| c.concurrency = 4);
        load.wait_ok(20);
        assert_eq!(baton.reload_ok(), 2);
        load.wait_ok(20);
        load.finish().assert_no_failures();
        let run_dir = runtime_dir_in(baton.dir.path());
        let mode = std::fs::metadata(&run_dir).expect("dir").mode() & 0o7777;
        assert_eq!(mode, 0o700, "umask {umask}");
        let worker = baton.worker_pid(2).expect("generation 2 serves");
        let notify = environ(worker, "NOTIFY_SOCKET").expect("NOTIFY_SOCKET");
        assert!(notify.starts_with(run_dir.to_str().expect("utf-8")));
        let mode = std::fs::metadata(&notify).expect("socket").mode() & 0o777;
        assert_eq!(mode, 0o600, "umask {umask}");
    }
}

#[test]
fn with_a_low_descriptor_limit_reloads_under_load_lose_nothing_and_leak_nothing() {
    // 32 descriptors: baton itself needs about 17, each generation 2 more.
    let baton = Baton::builder()
        .wrap(["prlimit", "--nofile=32:32", "--"])
        .args(["--listen", "http=tcp://127.0.0.1:0"])
        .pyworker("")
        .start();
    let load = Load::http(&baton, "http", |c| c.concurrency = 4);
    load.wait_ok(20);
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", baton.pid()))
            .expect("/proc/PID/fd")
            .count()
    };
    baton.wait_settled();
    let before = fds();
    for generation in 2..=21 {
        assert_eq!(baton.reload_ok(), generation);
        baton.wait_settled();
        load.wait_ok(10);
    }
    // A control connection of the harness may still be closing at either
    // count; a leak per reload would show twenty times over.
    wait_for(
        "baton's descriptors back to before",
        Duration::from_secs(10),
        || (fds() <= before).then_some(()),
    );
    load.finish().assert_no_failures();
}

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .count()
}

#[test]
fn a_snapshot_lost_to_the_descriptor_limit_fails_the_reload_and_the_old_generation_keeps_its_values(
) {
    let mut baton = Baton::builder()
        .args(["--listen", "http=tcp://127.0.0.1:0"])
        .flagged(bin("counter").to_str().expect("utf-8"), "")
        .start();
    let addr = baton.address("http");
    for _ in 0..25 {
        http::get_json(&addr, "/", http::TIMEOUT).expect("GET");
    }
    // From here on no control connection: nothing of baton's opens or
    // closes but what the reload does.
    let pid = baton.pid();
    let before = fd_count(pid);
    let soft = soft_nofile(pid);
    baton.set_flags("--keep-delay 3000");
    baton.signal(Signal::SIGHUP);
    let successor = wait_for("generation 2 to run", Duration::from_secs(10), || {
        harness::children(pid).into_iter().find(|&c| {
            std::fs::read(format!("/proc/{c}/cmdline"))
                .is_ok_and(|cmd| String::from_utf8_lossy(&cmd).contains("--keep-delay"))
        })
    });
    // Its start left four descriptors open in baton (the notify socket and
    // the duplicate an upgrade would carry, the channel, the exec report)
    // and closed the rest: now baton can open none.
    wait_for(
        "the start's own descriptors to close",
        Duration::from_secs(10),
        || (fd_count(pid) == before + 4).then_some(()),
    );
    prlimit_nofile(pid, &lowest_free_fd(pid).to_string());
    // Generation 2 asks for the count; generation 1 freezes and sends it;
    // baton cannot receive the memfd. The reload fails, 1 thaws.
    wait_for(
        "generation 2 to be stopped",
        Duration::from_secs(20),
        || harness::process_gone(successor).then_some(()),
    );
    prlimit_nofile(pid, &soft);
    let log = baton.wait_log("snapshot did not reach baton");
    assert!(log.contains("out of descriptors"), "{log}");
    assert!(log.contains("thaws and serves on"), "{log}");
    let peek = http::get_json(&addr, "/peek", http::TIMEOUT).expect("GET");
    assert_eq!(peek["generation"], 1, "{peek}");
    assert_eq!(peek["count"], 25, "{peek}");
    http::get_json(&addr, "/", http::TIMEOUT).expect("GET");
    baton.set_flags("");
    assert_eq!(baton.reload_ok(), 3);
    let peek = http::get_json(&addr, "/peek", http::TIMEOUT).expect("GET");
    assert_eq!(peek["count"], 26, "{peek}");
    baton.wait_serving(3);
}

#[test]
fn with_user_and_a_control_directory_others_may_pass_the_notify_sockets_stay_beside_it() {
    if !harness::root("--user needs it") {
        return;
    }
    // As a unit's RuntimeDirectoryMode=0711 makes it: systemd removes the
    // directory, and with it the notify sockets, when the unit stops.
    let builder = Baton::builder();
    let run = builder.dir().join("run");
    std::fs::create_dir(&run).expect("mkdir");
    for d in [builder.dir(), run.as_path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711)).expect("chmod");
    }
    let baton = builder
        .control(run.join("baton.sock"))
        .args(["--listen", "http=tcp://127.0.0.1:0", "--user", "nobody"])
        .worker(["/usr/bin/python3", pyworker().to_str().expect("utf-8")])
        .start();
    let load = Load::http(&baton, "http", |c| c.concurrency = 4);
    load.wait_ok(20);
    assert_eq!(baton.reload_ok(), 2);
    load.wait_ok(20);
    load.finish().assert_no_failures();
    let worker = baton.worker_pid(2).expect("generation 2 serves");
    let notify = PathBuf::from(environ(worker, "NOTIFY_SOCKET").expect("NOTIFY_SOCKET"));
    assert!(notify.starts_with(&run), "{}", notify.display());
    let mode = std::fs::metadata(notify.parent().expect("dir"))
        .expect("runtime directory")
        .mode();
    assert_eq!(mode & 0o7777, 0o711);
}
