//! Upgrading baton itself in place (`baton upgrade`, SIGUSR2), with real
//! processes under real load: the same baton pid and the same workers
//! throughout, every request answered, descriptors and memory flat, two
//! binaries in turn; binaries that cannot take over fail with the reason
//! while serving goes on; an upgrade waits for a reload on a slow successor;
//! a SIGHUP and a `baton status` sent during the exec are both served by the
//! new supervisor; kept values and a pending checkpoint cross byte for byte.

use std::path::{Path, PathBuf};
use std::time::Duration;

use baton_tests::harness::{bin, wait_for, Baton, Load};
use baton_tests::http;

fn counter() -> Baton {
    Baton::builder()
        .args(["--listen", "http=tcp://127.0.0.1:0"])
        .worker([bin("counter")])
        .start()
}

/// `baton upgrade --wait` with `args`; the client's output.
fn upgrade(baton: &Baton, args: &[&str]) -> std::process::Output {
    let mut all = vec!["upgrade", "--wait"];
    all.extend_from_slice(args);
    baton.cli(&all)
}

fn upgrade_ok(baton: &Baton, args: &[&str]) {
    let out = upgrade(baton, args);
    assert!(
        out.status.success(),
        "upgrade {args:?} failed: {}\nlog:\n{}",
        String::from_utf8_lossy(&out.stderr),
        baton.log()
    );
}

/// baton's descriptors once a control connection it has just answered is
/// gone (its task may close it a moment after the client read the answer).
fn fds(pid: i32) -> usize {
    baton_tests::bench::procs::settled_fd_count(pid as u32).expect("counting descriptors")
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn exe(pid: i32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).expect("reading /proc/PID/exe")
}

/// Two copies of the built baton, at two different paths.
fn two_binaries(dir: &Path) -> [PathBuf; 2] {
    ["a", "b"].map(|name| {
        let copy = dir.join(format!("baton-{name}"));
        std::fs::copy(bin("baton"), &copy).expect("copying baton");
        copy
    })
}

fn worker_pids(baton: &Baton) -> Vec<i64> {
    baton.status()["generations"]
        .as_array()
        .expect("generations")
        .iter()
        .map(|g| g["pids"][0].as_i64().expect("pid"))
        .collect()
}

#[test]
fn fifty_upgrades_between_two_binaries_under_load_lose_nothing_and_keep_every_pid() {
    let baton = counter();
    let pid = baton.pid();
    let workers = worker_pids(&baton);
    let binaries = two_binaries(baton.dir.path());
    let load = Load::http(&baton, "http", |c| {
        c.concurrency = 8;
        c.keep_alive_fraction = 0.5;
        c.slow_fraction = 0.0;
    });
    load.wait_ok(50);
    let (mut fds_first, mut rss_first) = (0, 0);
    for i in 0..50 {
        let binary = &binaries[i % 2];
        upgrade_ok(&baton, &["--binary", binary.to_str().expect("utf-8")]);
        assert_eq!(exe(pid), *binary, "upgrade {i}");
        let status = baton.status();
        assert_eq!(status["pid"], pid, "the same baton process");
        assert_eq!(status["upgrades"]["ok"], i as u64 + 1);
        assert_eq!(worker_pids(&baton), workers, "no worker restarted");
        if i == 0 {
            (fds_first, rss_first) = (fds(pid), rss_kib(pid));
        }
        load.wait_ok(10);
    }
    load.wait_ok(50);
    let report = load.finish();
    eprintln!("{report}");
    report.assert_no_failures();
    let (fds_last, rss_last) = (fds(pid), rss_kib(pid));
    eprintln!("descriptors {fds_first} -> {fds_last}, RSS {rss_first} -> {rss_last} KiB");
    // A leak would grow with every upgrade (49 more after 49 upgrades); a
    // count may still hold a control connection on its way out (a client's
    // answer is written by a task that closes it a moment later), so the
    // counts of one run differ by one or two.
    assert!(
        fds_last < fds_first + 5,
        "descriptors leak across upgrades: {fds_first} -> {fds_last}"
    );
    assert!(
        rss_last < rss_first * 3 / 2 + 4096,
        "RSS grew from {rss_first} to {rss_last} KiB"
    );
    // Every answered increment is in the count: no reload, no freeze.
    let peek = http::get_json(&baton.address("http"), "/peek", http::TIMEOUT).expect("GET");
    assert_eq!(peek["count"].as_u64(), Some(report.counts.ok), "{peek}");
    assert_eq!(baton.status()["generation"], 1);
    // SIGUSR2 upgrades from the path baton was started from.
    baton.signal(nix::sys::signal::Signal::SIGUSR2);
    wait_for("SIGUSR2's upgrade", Duration::from_secs(20), || {
        (baton.status()["upgrades"]["ok"] == 51).then_some(())
    });
    assert_eq!(exe(pid), bin("baton").canonicalize().expect("path"));
}

#[test]
fn binaries_that_cannot_take_over_fail_with_the_reason_while_serving_goes_on() {
    let baton = counter();
    let workers = worker_pids(&baton);
    let not_baton = bin("load");
    let load = Load::http(&baton, "http", |c| c.concurrency = 4);
    load.wait_ok(20);
    let cases = [
        ("/bin/false", "exited with status 1"),
        ("/nonexistent/baton", "No such file"),
        ("/bin/true", "without accepting the state"),
        (not_baton.to_str().expect("utf-8"), "pre-flight refused"),
    ];
    for (i, (binary, reason)) in cases.iter().enumerate() {
        let out = upgrade(&baton, &["--binary", binary]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{binary} was accepted");
        assert!(stderr.contains(reason), "{binary}: {stderr}");
        let status = baton.status();
        assert_eq!(status["upgrades"]["failed"], i as u64 + 1);
        assert_eq!(status["last_upgrade"]["ok"], false);
        assert_eq!(worker_pids(&baton), workers);
        load.wait_ok(10);
    }
    baton.wait_log("upgrade to /bin/false failed");
    let report = load.finish();
    report.assert_no_failures();
    // And a real one still works afterwards.
    upgrade_ok(&baton, &[]);
}

#[test]
fn an_upgrade_waits_for_a_reload_on_a_slow_successor() {
    let mut baton = Baton::builder()
        .args(["--listen", "http=tcp://127.0.0.1:0"])
        .pyworker("")
        .start();
    let pid = baton.pid();
    baton.set_flags("--ready-delay 1500");
    let load = Load::http(&baton, "http", |c| c.concurrency = 4);
    load.wait_ok(10);
    let reload = baton.cli_spawn(&["reload", "--wait"]);
    wait_for("the reload to start", Duration::from_secs(10), || {
        baton.status()["reloading"].is_object().then_some(())
    });
    let upgrading = baton.cli_spawn(&["upgrade", "--wait"]);
    let status = wait_for("the upgrade to queue", Duration::from_secs(10), || {
        let s = baton.status();
        s["upgrading"].is_object().then_some(s)
    });
    assert_eq!(status["upgrading"]["step"], "queued", "{status}");
    assert!(status["reloading"].is_object(), "{status}");
    let reloaded = reload.wait_with_output().expect("reload client");
    assert!(reloaded.status.success(), "{reloaded:?}");
    let upgraded = upgrading.wait_with_output().expect("upgrade client");
    assert!(
        upgraded.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&upgraded.stderr),
        baton.log()
    );
    baton.wait_serving(2);
    let status = baton.status();
    assert_eq!(
        (status["pid"].as_i64(), status["upgrades"]["ok"].as_u64()),
        (Some(pid as i64), Some(1))
    );
    load.finish().assert_no_failures();
}

#[test]
fn a_sighup_and_a_status_sent_during_the_exec_are_served_by_the_new_baton() {
    // A "new binary" that takes half a second to become baton (it keeps
    // the signal mask and the descriptors): the pre-flight and the exec
    // both pass through it.
    let mut baton = Baton::builder()
        .args(["--listen", "http=tcp://127.0.0.1:0"])
        .env("SLOW_EXEC_MS", "500")
        .env("SLOW_EXEC_TARGET", bin("baton"))
        .worker([bin("counter")])
        .start();
    let pid = baton.pid();
    let slow = bin("slow_exec");
    let load = Load::http(&baton, "http", |c| c.concurrency = 4);
    load.wait_ok(10);
    let upgrading = baton.cli_spawn(&[
        "upgrade",
        "--wait",
        "--binary",
        slow.to_str().expect("utf-8"),
    ]);
    // Logged with signals already blocked, just before the exec.
    baton.wait_log("in place");
    baton.signal(nix::sys::signal::Signal::SIGHUP);
    let status = baton.cli(&["status", "--json"]);
    assert!(status.status.success(), "{status:?}");
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("json");
    assert_eq!(status["pid"], pid);
    assert_eq!(
        status["upgrades"]["ok"], 1,
        "answered by the new baton: {status}"
    );
    let upgraded = upgrading.wait_with_output().expect("upgrade client");
    assert!(upgraded.status.success(), "{upgraded:?}");
    // The SIGHUP was not lost: it reloads.
    baton.wait_serving(2);
    load.finish().assert_no_failures();
}

/// The bytes of the kept-values memfd baton holds, if it holds one.
fn kept_bytes(pid: i32) -> Option<Vec<u8>> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("fds");
    let memfds: Vec<PathBuf> = dir
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            std::fs::read_link(p).is_ok_and(|l| l.to_string_lossy().contains("baton-snapshot"))
        })
        .collect();
    assert!(memfds.len() <= 1, "one kept snapshot at most: {memfds:?}");
    memfds.first().and_then(|m| std::fs::read(m).ok())
}

#[test]
fn kept_values_and_a_pending_checkpoint_cross_byte_for_byte() {
    let mut baton = counter();
    let pid = baton.pid();
    let addr = baton.address("http");
    for _ in 0..25 {
        http::get_json(&addr, "/", http::TIMEOUT).expect("GET");
    }
    let worker = wait_for("a checkpoint of 25", Duration::from_secs(10), || {
        let peek = http::get_json(&addr, "/peek", http::TIMEOUT).expect("GET");
        (peek["checkpointed"] == 25).then(|| peek["pid"].as_i64().expect("pid") as i32)
    });
    // The worker has sent it; baton holds it a moment later.
    let before = wait_for(
        "baton to hold the checkpoint of 25",
        Duration::from_secs(10),
        || kept_bytes(pid).filter(|b| String::from_utf8_lossy(b).contains("25")),
    );
    upgrade_ok(&baton, &[]);
    upgrade_ok(&baton, &[]);
    assert_eq!(
        kept_bytes(pid),
        Some(before.clone()),
        "the kept values changed across the upgrade"
    );
    assert_eq!(baton.status()["kept"]["bytes"], before.len() as u64);
    // The checkpoint is what a crash restart starts from.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(worker),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9");
    baton.wait_serving(2);
    let peek = http::get_json(&addr, "/peek", http::TIMEOUT).expect("GET");
    assert_eq!(peek["count"], 25, "{peek}");
}
