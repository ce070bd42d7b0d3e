//! Operations: hot reload from file changes with a build gate, workers run
//! as another user, and a control socket that refuses other users even when
//! its file mode is loosened.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use baton_tests::harness::{bin, pyworker, wait_for, Baton};

fn generation(baton: &Baton) -> Option<u64> {
    baton.status()["generation"].as_u64()
}

#[test]
fn watched_changes_reload_once_per_burst_and_a_failing_build_keeps_the_old_generation() {
    let baton = Baton::builder();
    let dir = baton.dir().to_path_buf();
    let src = dir.join("src");
    std::fs::create_dir(&src).expect("mkdir src");
    std::fs::write(src.join("config.toml"), "v = 1").expect("write");
    let builds = dir.join("builds.log");
    // The "build": logs each run, fails while a `broken` file exists.
    let build = format!(
        "echo build >> {log}; if [ -e {broken} ]; then echo 'error[E0425]: cannot find value `x`'; exit 1; fi; echo compiled",
        log = builds.display(),
        broken = dir.join("broken").display()
    );
    let baton = baton
        .args(["--listen", "http=tcp://127.0.0.1:0", "--debounce", "200ms"])
        .option("--watch", &src)
        .option("--build", &build)
        .pyworker("")
        .start();
    let build_runs = || {
        std::fs::read_to_string(&builds)
            .unwrap_or_default()
            .lines()
            .count()
    };
    assert_eq!(build_runs(), 1, "the build runs before the first start too");

    // A burst, as from a `git checkout`: many files, one reload.
    for i in 0..30 {
        std::fs::write(src.join(format!("file{i}.rs")), format!("// {i}")).expect("write");
    }
    wait_for("the burst's reload", Duration::from_secs(20), || {
        (generation(&baton) == Some(2)).then_some(())
    });
    baton.wait_settled();
    // An explicit reload now must be generation 3: the burst gave only one.
    assert_eq!(baton.reload_ok(), 3);
    // Generation 3's readiness is logged after every change handled before
    // the explicit reload: wait for it before counting.
    baton.wait_log("files changed");
    let ready = format!(
        "generation 3 (pid {}) is ready",
        baton.worker_pid(3).expect("generation 3 runs")
    );
    let log = baton.wait_log(&ready);
    assert_eq!(log.matches("files changed").count(), 1, "{log}");
    assert_eq!(build_runs(), 3);

    // An editor's save: write a temporary file, rename it over the original.
    let tmp = src.join(".config.toml.tmp");
    std::fs::write(&tmp, "v = 2").expect("write");
    std::fs::rename(&tmp, src.join("config.toml")).expect("rename");
    wait_for("the save's reload", Duration::from_secs(20), || {
        (generation(&baton) == Some(4)).then_some(())
    });

    // Changes in ignored places do nothing; the next real change does.
    std::fs::create_dir_all(src.join("target/debug")).expect("mkdir");
    std::fs::write(src.join("target/debug/app"), "binary").expect("write");
    std::fs::write(src.join("main.rs.swp"), "vim").expect("write");

    // A failing build: the serving generation stays; status says why.
    std::fs::write(dir.join("broken"), "").expect("write");
    std::fs::write(src.join("main.rs"), "fn main() { x }").expect("write");
    let status = wait_for(
        "the failed build in status",
        Duration::from_secs(20),
        || {
            let s = baton.status();
            (s["last_reload"]["ok"] == false).then_some(s)
        },
    );
    assert_eq!(status["generation"], 4, "{status}");
    let error = status["last_reload"]["error"].as_str().expect("an error");
    assert!(error.contains("exited with status 1"), "{error}");
    assert!(
        error.contains("error[E0425]: cannot find value `x`"),
        "the output's tail: {error}"
    );
    // The build's output is logged.
    baton.wait_log("cannot find value");
    let out = baton.cli(&["status"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("FAILED"));
    // `target/` and the swap file triggered nothing: one build per reload.
    assert_eq!(build_runs(), 5);

    // Fixed: the next change reloads.
    std::fs::remove_file(dir.join("broken")).expect("rm");
    std::fs::write(src.join("main.rs"), "fn main() {}").expect("write");
    wait_for("the fixed build's reload", Duration::from_secs(20), || {
        (generation(&baton) == Some(6)).then_some(())
    });
}

#[test]
fn workers_run_as_the_given_user_and_still_reach_their_notify_socket() {
    if !baton_tests::harness::root("--user needs it") {
        return;
    }
    let baton = Baton::builder()
        .args(["--listen", "http=tcp://127.0.0.1:0", "--user", "nobody"])
        // Debian's python, not one under root's home that nobody can run.
        .worker(["/usr/bin/python3", pyworker().to_str().expect("utf-8")])
        .start();
    for generation in [1, 2] {
        if generation == 2 {
            assert_eq!(baton.reload_ok(), 2);
        }
        let pid = baton.worker_pid(generation).expect("worker");
        let proc_status =
            std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
        let uid_line = proc_status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .expect("Uid line");
        assert!(
            uid_line.split_whitespace().skip(1).all(|u| u == "65534"),
            "{uid_line}"
        );
        let groups = proc_status
            .lines()
            .find(|l| l.starts_with("Groups:"))
            .expect("Groups line");
        assert!(!groups.split_whitespace().any(|g| g == "0"), "{groups}");
    }
    // Switching user clears the parent-death signal; baton sets it after
    // the switch, so these workers still die with baton.
    let worker = baton.worker_pid(2).expect("generation 2 runs");
    baton.signal(nix::sys::signal::Signal::SIGKILL);
    wait_for(
        "the nobody worker to die with baton",
        Duration::from_secs(10),
        || baton_tests::harness::process_gone(worker).then_some(()),
    );
}

#[test]
fn an_unknown_user_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(bin("baton"))
        .args(["run", "--control"])
        .arg(dir.path().join("c.sock"))
        .args(["--user", "no-such-user-here", "--", "true"])
        .output()
        .expect("running baton");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--user no-such-user-here: no such user")
            || stderr.contains("need baton to start as root"),
        "{stderr}"
    );
}

#[test]
fn the_control_socket_refuses_other_users_even_at_mode_0666() {
    if !baton_tests::harness::root("acting as another user needs it") {
        return;
    }
    let baton = Baton::builder()
        .args(["--listen", "http=tcp://127.0.0.1:0"])
        .pyworker("")
        .start();
    let mode = std::fs::metadata(&baton.control)
        .expect("control socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "created 0600");
    // Someone loosens the file mode and the directory.
    std::fs::set_permissions(&baton.control, std::fs::Permissions::from_mode(0o666))
        .expect("chmod");
    std::fs::set_permissions(baton.dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    use std::os::unix::process::CommandExt;
    let out = std::process::Command::new(bin("baton"))
        .args(["reload", "--control"])
        .arg(&baton.control)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("running the client as nobody");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("uid 65534 may not control this baton"),
        "{stderr}"
    );
    assert_eq!(baton.status()["generation"], 1, "nothing was reloaded");
}

#[test]
fn hundreds_of_idle_control_connections_do_not_stop_status() {
    let baton = Baton::builder()
        .args(["--listen", "http=tcp://127.0.0.1:0"])
        .pyworker("")
        .start();
    let idle: Vec<_> = (0..300)
        .filter_map(|_| std::os::unix::net::UnixStream::connect(&baton.control).ok())
        .collect();
    assert!(idle.len() >= 100, "could open {} connections", idle.len());
    // Over the limit, connections get an answer at once; status still works.
    assert_eq!(baton.status()["generation"], 1);
    assert_eq!(baton.reload_ok(), 2);
    drop(idle);
}

#[test]
fn random_garbage_on_the_control_socket_never_stops_baton() {
    use std::io::{Read, Write};
    let baton = Baton::builder()
        .args(["--listen", "http=tcp://127.0.0.1:0"])
        .pyworker("")
        .start();
    // A fixed-seed xorshift: the same 300 payloads every run.
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let fragments: [&[u8]; 6] = [
        b"{\"command\":",
        b"\"reload\"",
        b"{\"command\":\"status\",\"wait\":[1,2,{}]}",
        b"\xff\xfe\x00",
        b"\n",
        b"}}}}",
    ];
    for round in 0..300 {
        let mut payload = Vec::new();
        let len = (next() % 6000) as usize;
        while payload.len() < len {
            if next() % 3 == 0 {
                payload.extend_from_slice(fragments[(next() % 6) as usize]);
            } else {
                payload.push(next() as u8);
            }
        }
        let mut s = std::os::unix::net::UnixStream::connect(&baton.control)
            .unwrap_or_else(|e| panic!("round {round}: connecting: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        // Writes may fail once baton has answered and closed: that is fine.
        let _ = s.write_all(&payload);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        // Either an error answer, a status (valid JSON can occur), or a
        // connection closed mid-request; never a hang, never a dead baton.
        assert!(
            answer.is_empty() || answer.starts_with('{'),
            "round {round}: {answer}"
        );
    }
    let status = baton.status();
    assert_eq!(status["generation"], 1, "{status}");
    assert_eq!(baton.reload_ok(), 2);
}
