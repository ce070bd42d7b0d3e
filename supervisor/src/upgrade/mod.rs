//! Upgrading baton itself in place: the hand-over state, the pre-flight and
//! the exec (issue 11; docs/design.md, "The supervisor itself").
//!
//! The sequence, told once (the loop's side is `supervisor/upgrade.rs`, the
//! start of the new supervisor is `run.rs`):
//!
//! 1. `baton upgrade` (or SIGUSR2) asks the loop for an upgrade. It waits
//!    while a reload or a crash restart runs (a reload asked for meanwhile
//!    waits for it in turn).
//! 2. **Pre-flight** (`preflight.rs`): the new binary runs as a child,
//!    `baton upgrade-check --state-fd 3 -- <baton's own arguments>`, with the
//!    very state it would get ([`state::Handover`], a sealed memfd at fd 3).
//!    Only if it exits 0 and says it accepted the state does the upgrade go
//!    on; otherwise it fails with the child's reason and nothing changes.
//! 3. The control socket stops accepting (clients queue), the connections
//!    already accepted are answered, signals are blocked, and the events
//!    already queued are handled.
//! 4. **Exec** (`exec.rs`): the state is written again (deadlines with the
//!    time they have left now), close-on-exec is cleared on exactly the
//!    descriptors it names, and the main thread calls `execve` with baton's
//!    original arguments and [`state::STATE_FD_ENV`]. Same pid: workers stay
//!    its children. No destructor runs, so the runtime directory and the
//!    control socket's files stay.
//! 5. The new supervisor (`run.rs`) adopts every descriptor, rebuilds the
//!    table, re-arms each deadline, installs its signal handlers and only
//!    then unblocks signals (so a SIGHUP sent during the exec reloads), reaps
//!    the children that exited meanwhile, and answers the waiting clients.
//!
//! This module never decides when to upgrade: the loop does.

pub mod adopt;
pub mod exec;
pub mod preflight;
pub mod state;

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

/// What the host needs to know to upgrade that the loop does not: baton's
/// own command line, where it came from, and the descriptors it holds
/// outside the host.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// baton's arguments as it was started (`argv[0]` first).
    pub argv: Vec<OsString>,
    /// The path baton was started from: SIGUSR2's binary.
    pub default_binary: PathBuf,
    /// The control socket: listener, directory, lock file; and its path.
    pub control: Option<(PathBuf, RawFd, RawFd, RawFd)>,
    /// The `--metrics` listener.
    pub metrics: Option<RawFd>,
}

/// The path this process was started from, resolved now: `argv[0]` made
/// absolute against the working directory, or found in `PATH`. Not
/// `/proc/self/exe`: after a package replaced the file, that names the
/// deleted old binary.
pub fn started_from(argv0: &Path) -> PathBuf {
    let text = argv0.as_os_str().as_encoded_bytes();
    if text.contains(&b'/') {
        return std::path::absolute(argv0).unwrap_or_else(|_| argv0.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(argv0))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| argv0.to_path_buf())
}

/// The binary a client named, made absolute against the client's working
/// directory (the supervisor's may differ).
pub fn client_binary(binary: Option<PathBuf>) -> Option<PathBuf> {
    binary.map(|b| std::path::absolute(&b).unwrap_or(b))
}

/// baton's environment for the new binary (the pre-flight child or the
/// exec), without a hand-over state's descriptor number from before.
fn environment() -> Vec<std::ffi::CString> {
    std::env::vars_os()
        .filter(|(k, _)| k != state::STATE_FD_ENV)
        .filter_map(|(k, v)| {
            let mut kv = k.into_encoded_bytes();
            kv.push(b'=');
            kv.extend(v.into_encoded_bytes());
            std::ffi::CString::new(kv).ok()
        })
        .collect()
}
