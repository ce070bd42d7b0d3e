//! The exec itself: the hand-over state in a sealed memfd, close-on-exec
//! cleared on exactly the descriptors the state names, and `execve` of the
//! new binary with baton's own arguments.
//!
//! Call it from the main thread (the one that forks workers: their
//! parent-death signal follows the thread that forked them, and `execve`
//! ends every other thread) with signals blocked. It returns only if the
//! exec failed, and then leaves everything as it found it: close-on-exec set
//! again, the memfd closed. This module never decides to upgrade and never
//! blocks signals itself (the caller does, before it drains its queue).

use std::ffi::{CString, OsString};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::state::{Handover, STATE_FD_ENV};

/// Executes `binary` in place of this process with `argv` and the current
/// environment plus [`STATE_FD_ENV`]; returns why it could not.
pub fn exec(binary: &Path, argv: &[OsString], state: &Handover) -> String {
    let memfd = match state.to_memfd() {
        Ok(fd) => fd,
        Err(e) => return format!("writing the hand-over state: {e}"),
    };
    let c = |b: &[u8]| CString::new(b).map_err(|_| "a NUL byte in an argument".to_owned());
    let prepared = (|| -> Result<(CString, Vec<CString>, Vec<CString>), String> {
        let path = c(binary.as_os_str().as_bytes())?;
        let args = argv
            .iter()
            .map(|a| c(a.as_bytes()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut env: Vec<CString> = super::environment();
        env.push(c(
            format!("{STATE_FD_ENV}={}", memfd.as_raw_fd()).as_bytes()
        )?);
        Ok((path, args, env))
    })();
    let (path, args, env) = match prepared {
        Ok(p) => p,
        Err(e) => return e,
    };
    let mut fds = state.fds();
    fds.push(memfd.as_raw_fd());
    let mut cleared = Vec::new();
    for &fd in &fds {
        if let Err(e) = crate::sys::set_cloexec(fd, false) {
            restore(&cleared);
            return format!("clearing close-on-exec on descriptor {fd}: {e}");
        }
        cleared.push(fd);
    }
    // Whatever is still queued for stderr goes out first (briefly: a stalled
    // stderr must not hold up the upgrade).
    crate::logging::flush(std::time::Duration::from_millis(200));
    let error = nix::unistd::execve(&path, &args, &env)
        .err()
        .map_or_else(|| "execve returned".to_owned(), |e| e.to_string());
    restore(&cleared);
    drop(memfd);
    format!("executing {}: {error}", binary.display())
}

/// Sets close-on-exec again after a failed exec.
fn restore(fds: &[RawFd]) {
    for &fd in fds {
        let _ = crate::sys::set_cloexec(fd, true);
    }
}
