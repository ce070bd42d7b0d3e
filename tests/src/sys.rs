//! The test crate's only unsafe code: owning a descriptor that arrived with
//! `SCM_RIGHTS`. Nothing else here touches raw descriptor numbers.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

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
