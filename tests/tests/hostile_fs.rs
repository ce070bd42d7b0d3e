//! A hostile filesystem around the control socket: baton never follows a
//! symlink it did not create, keeps its socket and lock file only in a
//! directory of its own user that no one else may write, refuses anything
//! else at start with the path and the problem named, refuses a path too
//! long for a Unix socket address, and creates private files whatever the
//! umask. The happy path is checked under load.
//!
//! Tests that need root (planting files as another user, a mount namespace)
//! fail without it under `CI=true` and are skipped loudly elsewhere. Nothing
//! here touches the host's `/tmp` beyond a test's own temporary directory
//! and one uniquely named path that baton must refuse.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use baton_tests::harness::{bin, Baton, Load};

/// The longest control path baton accepts: `sun_path` less its NUL.
const MAX_SOCKET_PATH: usize = 107;

/// Whether a test that needs root may run. Without root it panics under
/// `CI=true` (a skipped test must not pass CI) and otherwise says loudly
/// that it is skipped.
fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test} needs root, and CI=true forbids skipping it"
    );
    eprintln!("\n**** SKIPPED: {test} needs root; run the tests as root to check it ****\n");
    false
}

/// `baton run --control control -- true`, without `BATON_CONTROL`.
fn run_with_control(control: &Path) -> Output {
    Command::new(bin("baton"))
        .arg("run")
        .arg("--control")
        .arg(control)
        .args(["--", "true"])
        .env_remove("BATON_CONTROL")
        .output()
        .expect("running baton")
}

/// Runs baton with `control`, which it must refuse at start with every one
/// of `needles` in its message; returns the message.
fn refused(control: &Path, needles: &[&str]) -> String {
    let out = run_with_control(control);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "baton accepted {}: {stderr}",
        control.display()
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{stderr:?} lacks {needle:?}");
    }
    stderr
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("examining {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// A directory `name` in `parent` with exactly `mode` (whatever the umask).
fn dir_with_mode(parent: &Path, name: &str, mode: u32) -> PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir(&dir).expect("creating a directory");
    set_mode(&dir, mode);
    dir
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("listing a directory")
        .map(|e| {
            e.expect("a directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// Run by `unshare -m sh -c`, with baton's path as `$1`: a tmpfs on /tmp
/// (private to this mount namespace), the links planted as nobody, baton
/// started with its default control path.
const PLANTED_LINKS: &str = r#"
set -u
# baton may live under /tmp (a clone there), which the tmpfs hides: keep it
# open and run it through /proc.
exec 9< "$1" || { echo "setup: opening baton failed"; exit 89; }
baton=/proc/self/fd/9
mount -t tmpfs -o mode=1777 baton-hostile-fs /tmp || { echo "setup: mounting a tmpfs on /tmp failed"; exit 90; }
# fs.protected_symlinks is global, not per namespace: set to 0 only if it is
# not already, and put back on every way out.
old=$(cat /proc/sys/fs/protected_symlinks) || { echo "setup: reading fs.protected_symlinks failed"; exit 91; }
restore() { [ "$old" = 0 ] || echo "$old" > /proc/sys/fs/protected_symlinks; }
trap restore EXIT
trap 'exit 130' HUP INT PIPE TERM
if [ "$old" != 0 ]; then
    echo 0 > /proc/sys/fs/protected_symlinks || { echo "setup: setting fs.protected_symlinks=0 failed"; exit 92; }
fi
printf 'root-owned victim\n' > /tmp/victim
nobody="setpriv --reuid=65534 --regid=65534 --clear-groups"
$nobody ln -s /tmp /tmp/baton-0 && $nobody ln -s /tmp/victim /tmp/baton.sock.lock \
    || { echo "setup: planting the links as nobody failed"; exit 93; }
err=$(env -u XDG_RUNTIME_DIR -u RUNTIME_DIRECTORY -u BATON_CONTROL timeout 20 "$baton" run -- true 2>&1 >/dev/null)
rc=$?
restore
trap - EXIT
echo "exit=$rc"
echo "victim=$(cat /tmp/victim)"
echo "tmp=$(ls -A /tmp | tr '\n' ' ')"
echo "stderr=$err"
"#;

/// The attack from issue 8: with `fs.protected_symlinks=0`, nobody plants
/// `/tmp/baton-0 -> /tmp` and `/tmp/baton.sock.lock -> /tmp/victim`; root's
/// baton with the default control path must refuse `/tmp/baton-0` and never
/// write the victim (the old code overwrote it with its pid).
///
/// Runs in a private mount namespace with a tmpfs on /tmp, so the host's
/// /tmp is untouched. `fs.protected_symlinks` is a global sysctl: the script
/// sets it to 0 only if it is not 0 already, and restores it as soon as
/// baton has exited, or on any earlier way out (an error, HUP, INT, PIPE,
/// TERM).
#[test]
fn a_planted_symlink_at_the_default_control_path_is_refused_and_its_target_untouched() {
    if !root_or_skip("the planted-symlink test") {
        return;
    }
    assert!(nix::unistd::geteuid().is_root());
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", PLANTED_LINKS, "sh"])
        .arg(bin("baton"))
        .output()
        .expect("running unshare");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the namespace script failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {stdout}"))
            .to_owned()
    };
    let stderr = stdout
        .split_once("stderr=")
        .map(|(_, rest)| rest.to_owned())
        .unwrap_or_default();
    let exit: i32 = field("exit=").parse().expect("an exit code");
    assert!(exit != 0 && exit != 124, "baton exited {exit}: {stdout}");
    assert!(
        stderr.contains("/tmp/baton-0 is a symbolic link; baton will not follow it"),
        "{stdout}"
    );
    assert!(!stderr.contains("panicked"), "{stdout}");
    assert_eq!(field("victim="), "root-owned victim", "{stdout}");
    assert_eq!(
        field("tmp=").trim(),
        "baton-0 baton.sock.lock victim",
        "baton created nothing in /tmp: {stdout}"
    );
}

#[test]
fn a_control_directory_of_another_user_is_refused() {
    if !root_or_skip("the other-owner test") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let theirs = dir_with_mode(tmp.path(), "theirs", 0o700);
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).expect("chown");
    refused(
        &theirs.join("c.sock"),
        &[&format!(
            "{} belongs to uid 65534, not to baton (uid 0)",
            theirs.display()
        )],
    );
    assert!(names(&theirs).is_empty(), "baton created nothing in it");
}

#[test]
fn a_control_directory_writable_by_its_group_or_others_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for (name, mode, who) in [
        ("group", 0o770, "its group"),
        ("others", 0o703, "others"),
        ("both", 0o777, "its group and others"),
    ] {
        let dir = dir_with_mode(tmp.path(), name, mode);
        refused(
            &dir.join("c.sock"),
            &[
                &format!("{} is writable by {who};", dir.display()),
                "private directory",
            ],
        );
        assert!(names(&dir).is_empty(), "baton created nothing in {name}");
    }
}

#[test]
fn a_shared_sticky_directory_given_directly_is_refused_with_a_private_one_suggested() {
    let me = nix::unistd::geteuid();
    // A sticky world-writable directory of our own, like /tmp.
    let tmp = tempfile::tempdir().expect("tempdir");
    let shared = dir_with_mode(tmp.path(), "shared", 0o1777);
    refused(
        &shared.join("c.sock"),
        &[
            &format!("{} is writable by its group and others", shared.display()),
            &format!(
                "give --control a path such as {}",
                shared.join(format!("baton-{me}/c.sock")).display()
            ),
        ],
    );
    assert!(names(&shared).is_empty(), "baton created nothing in it");

    // And /tmp itself (root's: for anyone else it is another user's).
    let direct = PathBuf::from(format!("/tmp/baton-hostile-fs-{}.sock", std::process::id()));
    let stderr = refused(&direct, &["/tmp "]);
    if me.is_root() {
        assert!(
            stderr.contains("/tmp is writable by its group and others")
                && stderr.contains(&format!(
                    "such as /tmp/baton-0/baton-hostile-fs-{}.sock",
                    std::process::id()
                )),
            "{stderr}"
        );
    }
    let mut lock = direct.clone().into_os_string();
    lock.push(".lock");
    assert!(!direct.exists() && !Path::new(&lock).exists());
}

#[test]
fn a_symlinked_or_hard_linked_lock_file_in_a_good_directory_is_refused_and_its_target_untouched() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, "victim\n").expect("writing the victim");
    let dir = dir_with_mode(tmp.path(), "ctl", 0o700);
    let lock = dir.join("c.sock.lock");

    std::os::unix::fs::symlink(&victim, &lock).expect("planting a symlink");
    refused(
        &dir.join("c.sock"),
        &[&format!(
            "{} is a symbolic link; baton will not follow it",
            lock.display()
        )],
    );
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "victim\n"
    );
    assert_eq!(names(&dir), ["c.sock.lock"], "nothing else created");

    std::fs::remove_file(&lock).expect("rm");
    std::fs::hard_link(&victim, &lock).expect("planting a hard link");
    refused(
        &dir.join("c.sock"),
        &[&format!(
            "{} has 2 hard links; baton writes only a file of its own",
            lock.display()
        )],
    );
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "victim\n"
    );
}

#[test]
fn a_file_at_the_control_path_that_is_not_a_socket_is_never_replaced() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    std::fs::write(&data, "precious\n").expect("writing a file");
    refused(
        &data,
        &[&format!(
            "{} exists and is not a socket; baton replaces only a socket a dead baton left",
            data.display()
        )],
    );
    assert_eq!(std::fs::read_to_string(&data).expect("data"), "precious\n");
    assert_eq!(names(tmp.path()), ["data"], "no lock file left behind");
}

/// `dir/c…c.sock`, padded to exactly `len` bytes.
fn path_of_length(dir: &Path, len: usize) -> PathBuf {
    let base = dir.as_os_str().len() + "/".len() + ".sock".len();
    assert!(len > base, "the temporary directory's path is too long");
    dir.join(format!("{}.sock", "c".repeat(len - base)))
}

#[test]
fn a_control_path_that_just_fits_works_and_one_byte_more_is_refused() {
    let builder = Baton::builder();
    let fits = path_of_length(builder.dir(), MAX_SOCKET_PATH);
    let baton = builder
        .control(&fits)
        .args(["--listen", "http=tcp://127.0.0.1:0"])
        .pyworker("")
        .start();
    let out = baton.cli(&["status"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("generation 1 serving"),
        "{out:?}"
    );

    let tmp = tempfile::tempdir().expect("tempdir");
    let long = path_of_length(tmp.path(), MAX_SOCKET_PATH + 1);
    let limit = format!(
        "the path is {} bytes; a Unix socket path is at most {MAX_SOCKET_PATH}",
        MAX_SOCKET_PATH + 1
    );
    refused(&long, &[&limit]);
    assert!(names(tmp.path()).is_empty(), "nothing created");
    // The client says the same instead of failing to connect.
    let out = Command::new(bin("baton"))
        .args(["status", "--control"])
        .arg(&long)
        .output()
        .expect("running the client");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&limit), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn under_any_umask_the_control_files_are_private_and_status_works() {
    for umask in ["000", "077"] {
        let builder = Baton::builder();
        let dir = builder.dir().join("ctl");
        let control = dir.join("baton.sock");
        let baton = builder
            .wrap(["sh", "-c", &format!("umask {umask}; exec \"$@\""), "sh"])
            .control(&control)
            .args(["--listen", "http=tcp://127.0.0.1:0"])
            .pyworker("")
            .start();
        assert_eq!(mode(&dir), 0o700, "umask {umask}: the directory baton made");
        assert_eq!(mode(&baton.control), 0o600, "umask {umask}: the socket");
        assert_eq!(
            mode(&dir.join("baton.sock.lock")),
            0o600,
            "umask {umask}: the lock file"
        );
        let owner = std::fs::metadata(&dir).expect("stat").uid();
        assert_eq!(owner, nix::unistd::geteuid().as_raw());
        let out = Command::new("sh")
            .args(["-c", "umask 077; exec \"$@\"", "sh"])
            .arg(bin("baton"))
            .args(["status", "--control"])
            .arg(&control)
            .output()
            .expect("running the client");
        assert!(out.status.success(), "umask {umask}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("generation 1 serving"),
            "{out:?}"
        );
    }
}

#[test]
fn reloads_under_load_with_a_private_control_directory_lose_nothing() {
    let builder = Baton::builder();
    let parent = dir_with_mode(builder.dir(), "run", 0o700);
    let dir = dir_with_mode(&parent, "ctl", 0o700);
    let baton = builder
        .control(dir.join("baton.sock"))
        .args(["--listen", "http=tcp://127.0.0.1:0"])
        .pyworker("")
        .start();
    let load = Load::http(&baton, "http", |c| {
        c.concurrency = 8;
        c.keep_alive_fraction = 0.5;
    });
    load.wait_ok(50);
    for generation in 2..=4 {
        assert_eq!(baton.reload_ok(), generation);
        load.wait_ok(20);
    }
    let report = load.finish();
    eprintln!("{report}");
    report.assert_no_failures();
    assert_eq!(report.counts.ok, report.counts.total(), "{report}");
    assert!(report.generations.len() >= 2, "{report}");
    let out = baton.cli(&["status"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("generation 4 serving"),
        "{out:?}"
    );
    baton.wait_settled();
}
