//! The only place in `baton-worker` that turns raw descriptor numbers into
//! owned ones, or looks at a descriptor it does not own. Everything else
//! handles `OwnedFd`/`BorrowedFd`.
//!
//! It also registers the worker channel with tokio's reactor. It takes
//! ownership of exactly three kinds of descriptor: those the kernel
//! just installed through `SCM_RIGHTS`, the worker channel named by
//! `BATON_CHANNEL_FD`, and the inherited duplicates of listeners that
//! [`close_inherited`] closes. It never creates or duplicates descriptors.

use std::io;
use std::mem::MaybeUninit;
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

/// Registers our end of the worker channel with the tokio reactor (of the
/// runtime the caller has entered).
pub(crate) fn async_fd(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open,
    // refers to the same socket and is not reused for as long as it is
    // registered.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(Into::into)
}

/// What `fstat` says about a descriptor number this crate does not own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawStat {
    /// The device and inode: equal for two descriptors of the same socket.
    pub(crate) id: (u64, u64),
    /// Whether it is a socket.
    pub(crate) is_socket: bool,
}

/// `fstat` on a bare descriptor number; `EBADF` if nothing is open there.
pub(crate) fn stat_raw(fd: RawFd) -> io::Result<RawStat> {
    let mut stat = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat only writes into the buffer we pass, which is large
    // enough for a `struct stat`; any integer is a valid argument (a closed
    // number fails with EBADF).
    let rc = unsafe { libc::fstat(fd, stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstat returned 0, so it filled the whole buffer.
    let stat = unsafe { stat.assume_init() };
    Ok(RawStat {
        id: (stat.st_dev, stat.st_ino),
        is_socket: stat.st_mode & libc::S_IFMT == libc::S_IFSOCK,
    })
}

/// Takes ownership of the worker channel, descriptor `fd`, named by
/// `BATON_CHANNEL_FD`. Fails if nothing is open there.
///
/// The caller makes sure this happens at most once per process (see
/// `worker::CHANNEL_TAKEN`).
pub(crate) fn take_channel(fd: RawFd) -> io::Result<OwnedFd> {
    stat_raw(fd)?;
    // SAFETY: the supervisor placed the channel at this number for this
    // process (the environment says so, and LISTEN_PID was checked); it is
    // open (fstat succeeded), and the one-start-per-process guard makes this
    // its only owner in the process.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Takes ownership of descriptor `fd`, passed by socket activation
/// (`LISTEN_PID` named this process), and makes it close-on-exec.
pub(crate) fn take_activated(fd: RawFd) -> io::Result<OwnedFd> {
    stat_raw(fd)?;
    // SAFETY: the socket-activation protocol gave this number to this process
    // (LISTEN_PID matched, the caller checked); it is open (fstat succeeded)
    // and nothing else in the process has taken it: `start` runs once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    nix::fcntl::fcntl(
        &owned,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )?;
    Ok(owned)
}

/// Closes descriptor `fd`, an inherited duplicate of a listener this
/// process already holds through the worker channel.
pub(crate) fn close_inherited(fd: RawFd) {
    // SAFETY: the caller checked that `fd` is an inherited copy (in
    // 3..3+LISTEN_FDS, LISTEN_PID ours) of a socket we hold another
    // descriptor of; the supervisor placed it for this process, and
    // `baton_worker::start` documents that it owns these copies, so nothing
    // else in the process refers to it. Dropping the `OwnedFd` closes it.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
}

/// Test support: a duplicate of `fd` at the lowest free number at or above
/// `min`, as a bare number (as an inherited descriptor would be).
#[cfg(test)]
pub(crate) fn dup_at_least(fd: std::os::fd::BorrowedFd<'_>, min: RawFd) -> RawFd {
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(min)).expect("F_DUPFD_CLOEXEC")
}

/// A read-only mapping of a sealed snapshot memfd: its bytes without a copy.
pub(crate) struct Mapped {
    ptr: std::ptr::NonNull<std::ffi::c_void>,
    len: usize,
}

impl Mapped {
    /// Maps the first `len` bytes of `fd`, which must be sealed against
    /// writing and shrinking (checked here), so the mapping can neither
    /// change under us nor fault past its end.
    pub(crate) fn sealed(fd: &OwnedFd, len: usize) -> io::Result<Mapped> {
        use nix::fcntl::{fcntl, FcntlArg};
        let seals = fcntl(fd, FcntlArg::F_GET_SEALS)?;
        let needed = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK;
        if seals & needed != needed {
            return Err(io::Error::other("the snapshot memfd is not sealed"));
        }
        let size = nix::sys::stat::fstat(fd)?.st_size;
        if u64::try_from(size).ok() != Some(len as u64) {
            return Err(io::Error::other(format!(
                "the snapshot memfd holds {size} bytes, not {len}"
            )));
        }
        let Some(length) = std::num::NonZeroUsize::new(len) else {
            return Err(io::Error::other("an empty snapshot cannot be mapped"));
        };
        // SAFETY: a fresh read-only private mapping of a file we hold; the
        // kernel picks the address. The seals checked above forbid writes and
        // truncation by anyone, so the bytes stay valid and unchanged while
        // mapped; `Drop` unmaps exactly this range.
        let ptr = unsafe {
            nix::sys::mman::mmap(
                None,
                length,
                nix::sys::mman::ProtFlags::PROT_READ,
                nix::sys::mman::MapFlags::MAP_PRIVATE,
                fd,
                0,
            )
        }?;
        Ok(Mapped { ptr, len })
    }

    /// The mapped bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` readable bytes that nobody can change
        // (sealed) until `self` is dropped.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<u8>(), self.len) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: unmaps the range `sealed` mapped, once; no slice from
        // `bytes` outlives `self`.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr, self.len) };
    }
}

// SAFETY: the mapping is read-only and immutable (sealed): sharing or moving
// it across threads cannot race.
unsafe impl Send for Mapped {}
