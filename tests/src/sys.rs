//! The test crate's only unsafe code: owning a descriptor that arrived with
//! `SCM_RIGHTS`, mapping a sealed snapshot memfd, and what a child the
//! benchmark starts does between `fork` and `exec`: it asks for `SIGKILL`
//! when the bench dies (`PR_SET_PDEATHSIG`, so a killed bench leaves no
//! server behind) and, for the hold-the-socket strategy, places the bench's
//! listener at fd 3 the way `systemfd` does. It never sets environment
//! variables after the fork (not async-signal-safe): `LISTEN_PID` comes from
//! a shell shim (`bench::procs::hold_shim`). `PR_SET_PDEATHSIG` fires when
//! the *thread* that forked exits, so the bench starts every process from
//! its main thread.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

/// Takes ownership of `fd`, which the kernel just installed in this process
/// as part of a received message.
pub fn own(fd: RawFd) -> OwnedFd {
    // SAFETY: the kernel installed this descriptor for us in the message we
    // just received; nothing else in the process knows its number.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Maps the first `len` bytes of a sealed memfd read-only, as the SDK reads
/// snapshots, and returns their sum (touching every byte). `len` > 0.
pub fn map_and_sum(fd: &OwnedFd, len: usize) -> std::io::Result<u64> {
    let length =
        std::num::NonZeroUsize::new(len).ok_or_else(|| std::io::Error::other("nothing to map"))?;
    // SAFETY: a fresh read-only private mapping the kernel places; the memfd
    // is sealed against writes and shrinking, so the bytes stay valid, and
    // it is unmapped below before anything else could use it.
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
    // SAFETY: `ptr` maps `len` readable bytes until the munmap below.
    let bytes = unsafe { std::slice::from_raw_parts(ptr.as_ptr().cast::<u8>(), len) };
    let sum = bytes.iter().map(|&b| u64::from(b)).sum();
    // SAFETY: unmaps exactly the range mapped above; `bytes` is not used
    // after this.
    unsafe { nix::sys::mman::munmap(ptr, len) }?;
    Ok(sum)
}

/// Starts `cmd`; in the child, before exec, asks for `SIGKILL` when the
/// bench dies and, with `fd3`, places a duplicate of that descriptor at fd 3
/// without close-on-exec. `fd3` is borrowed for the whole spawn, so it stays
/// open until the child has its own copy.
pub fn spawn(cmd: &mut Command, fd3: Option<BorrowedFd<'_>>) -> io::Result<Child> {
    let parent = std::process::id() as libc::pid_t;
    let fd3 = fd3.map(|fd| fd.as_raw_fd());
    let child_setup = move || -> io::Result<()> {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // The bench may have died between fork and prctl.
        // SAFETY: getppid cannot fail.
        if unsafe { libc::getppid() } != parent {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        if let Some(fd) = fd3 {
            if fd == 3 {
                // dup2(3, 3) would leave close-on-exec set: clear it.
                // SAFETY: fcntl on a descriptor number this child holds.
                if unsafe { libc::fcntl(3, libc::F_SETFD, 0) } == -1 {
                    return Err(io::Error::last_os_error());
                }
            // SAFETY: dup2 on descriptor numbers; the new fd 3 has no
            // close-on-exec, the original keeps its own.
            } else if unsafe { libc::dup2(fd, 3) } == -1 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: `child_setup` runs in the child between fork and exec and
    // calls only async-signal-safe functions (prctl, getppid, dup2, fcntl)
    // on integers captured before the fork; it allocates nothing (its errors
    // come from `last_os_error`/`from_raw_os_error`, which do not allocate).
    unsafe {
        cmd.pre_exec(child_setup);
    }
    cmd.spawn()
}
