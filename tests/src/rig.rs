//! A real systemd for the tests that need one. `tests/systemd-rig/` boots
//! Debian trixie's systemd (257) as PID 1 in a `systemd-nspawn` container
//! from a rootfs cached under `target/systemd-rig/`; [`Rig`] drives those
//! scripts from a test: it boots one container per test, runs commands
//! inside, and powers the container off when the test ends, passing or
//! failing (its `Drop`, which first prints the container's journal if the
//! test is failing).
//!
//! The container shares the host's network, so a socket unit's
//! `127.0.0.1:PORT` is reachable from the test (and the load client runs on
//! the host), and it sees the workspace's freshly built binaries read-only
//! at `/opt/baton` (the directory of this test build's profile, see
//! [`crate::harness::bin_dir`]: no second build).
//!
//! Booting needs root, the host tools (`systemd-container`, `mmdebstrap`)
//! and, once, a Debian mirror; so it happens only when asked
//! (`BATON_SYSTEMD_RIG=1`), and then any failure to boot fails the test.
//! Tests take turns: one `RIG_HOME`, one container. This module never
//! touches the host's own init, units or network configuration.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

/// The environment variable that asks for the real systemd tests.
pub const ENABLE: &str = "BATON_SYSTEMD_RIG";

/// Tests in one process take turns: the scripts boot one container per
/// `RIG_HOME`.
static TURN: Mutex<()> = Mutex::new(());

/// One booted container; powered off on drop.
pub struct Rig {
    scripts: PathBuf,
    /// The container's PID 1 as the host sees it: `/proc/<leader>/root` is
    /// the container's file system.
    leader: u32,
    /// Held until the container is down (fields drop after `drop`).
    _turn: MutexGuard<'static, ()>,
}

impl Rig {
    /// Boots a container, or says loudly why not and returns `None`: the
    /// tests were not asked for (no `BATON_SYSTEMD_RIG=1`), or, outside CI,
    /// they do not run as root. When asked, a failed boot panics.
    pub fn boot() -> Option<Rig> {
        if std::env::var(ENABLE).map_or(true, |v| v != "1") {
            eprintln!(
                "\n*** SKIPPED: the real-systemd tests boot a container; ask for them with \
                 {ENABLE}=1 (as root; .ci/run does). This test proved nothing. ***\n"
            );
            return None;
        }
        if !crate::harness::root("booting systemd-nspawn") {
            return None;
        }
        // A test that failed while holding the turn poisoned it; its
        // container is down all the same (its Rig dropped).
        let turn = TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd-rig");
        let bind = format!("{}:/opt/baton", crate::harness::bin_dir().display());
        let started = Instant::now();
        let out = Command::new(scripts.join("rig.sh"))
            .env("RIG_BIND_RO", bind)
            .stdin(Stdio::null())
            .output()
            .expect("running tests/systemd-rig/rig.sh");
        let said = String::from_utf8_lossy(&out.stderr).into_owned();
        // rig.sh prints the pid of the container's PID 1, and nothing else.
        // Whatever happened, down.sh cleans up from here (it does nothing
        // when nothing runs).
        let leader = String::from_utf8_lossy(&out.stdout).trim().parse().ok();
        let rig = Rig {
            scripts,
            leader: leader.unwrap_or(0),
            _turn: turn,
        };
        assert!(
            out.status.success() && leader.is_some(),
            "booting systemd in a container failed ({}):\n{said}",
            out.status
        );
        eprintln!(
            "real systemd: booted in {:.1?}: {}",
            started.elapsed(),
            said.lines().last().unwrap_or_default()
        );
        Some(rig)
    }

    /// Runs `sh -c script` inside the container and returns what it did.
    pub fn sh(&self, script: &str) -> Output {
        self.command(script)
            .stdin(Stdio::null())
            .output()
            .expect("running in.sh")
    }

    /// Runs `sh -c script` inside; panics with its output unless it exits
    /// 0. Returns its stdout.
    #[track_caller]
    pub fn run(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "inside the container, `{script}` failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts `sh -c script` inside without waiting for it; its stdout and
    /// stderr are piped.
    pub fn spawn(&self, script: &str) -> Child {
        self.command(script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting in.sh")
    }

    fn command(&self, script: &str) -> Command {
        let mut cmd = Command::new(self.scripts.join("in.sh"));
        cmd.args(["sh", "-c", script]);
        cmd
    }

    /// The host's path of `inside`, a path in the container.
    pub fn path(&self, inside: &str) -> PathBuf {
        let relative = inside.trim_start_matches('/');
        Path::new(&format!("/proc/{}/root", self.leader)).join(relative)
    }

    /// Writes a file inside the container (its parent directories made),
    /// with `mode`.
    pub fn write(&self, inside: &str, contents: &str, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.path(inside);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .unwrap_or_else(|e| panic!("creating {}: {e}", parent.display()));
        }
        std::fs::write(&path, contents)
            .unwrap_or_else(|e| panic!("writing {inside} in the container: {e}"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {inside} in the container: {e}"));
    }

    /// One property of a unit (`systemctl show -P`).
    #[track_caller]
    pub fn show(&self, unit: &str, property: &str) -> String {
        self.run(&format!("systemctl show -P {property} {unit}"))
            .trim()
            .to_owned()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if std::thread::panicking() && self.leader != 0 {
            let journal = self.sh("journalctl --no-pager -o short-monotonic -n 400");
            eprintln!(
                "---- the container's journal (last 400 lines) ----\n{}\
                 --------------------------------------------------",
                String::from_utf8_lossy(&journal.stdout)
            );
        }
        let started = Instant::now();
        match Command::new(self.scripts.join("down.sh"))
            .stdin(Stdio::null())
            .output()
        {
            Ok(out) if out.status.success() => {
                eprintln!("real systemd: powered off in {:.1?}", started.elapsed())
            }
            Ok(out) => eprintln!(
                "tests/systemd-rig/down.sh failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("running tests/systemd-rig/down.sh: {e}"),
        }
    }
}
