//! The only place in `baton-worker` that turns raw descriptor numbers into
//! owned ones. Everything else handles `OwnedFd`/`BorrowedFd`.
//!
//! It never creates, duplicates or closes descriptors on its own.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Takes ownership of descriptors the kernel just installed in this process
/// through `SCM_RIGHTS`.
pub(crate) fn own_received(fds: &[RawFd]) -> Vec<OwnedFd> {
    fds.iter()
        // SAFETY: the kernel installed these descriptors in this process as
        // part of the message we just received; nothing else refers to them,
        // so this is their one and only owner.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect()
}
