//! Kept state as the supervisor sees it: sealed snapshot memfds it checks,
//! keeps and passes on, never reads.
//!
//! A snapshot arrives from a worker (`Frozen` on a freeze, or `Checkpoint`)
//! with its descriptor. [`Snapshot::accept`] checks what the worker claims:
//! one memfd, sealed against every change ([`SNAPSHOT_SEALS`]), exactly
//! `bytes` long, within `--max-state`. The supervisor then holds that one
//! descriptor and hands the same one to the next generation: the bytes are
//! written once by the old worker and read once by the new one.
//!
//! This module never looks inside a snapshot: its format belongs to the SDK.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use baton_worker::protocol::SNAPSHOT_SEALS;

/// The name baton keeps its latest snapshot under in systemd's file
/// descriptor store.
pub const STORE_NAME: &str = "baton-kept";

/// A checked, immutable snapshot of one generation's kept values.
#[derive(Debug)]
pub struct Snapshot {
    fd: OwnedFd,
    /// Its size in bytes.
    pub bytes: u64,
    /// The generation that wrote it.
    pub generation: u64,
    /// For the snapshot of a freeze that followed a pre-copy: the
    /// pre-copy, which holds every value this snapshot does not (this one
    /// holds only those written since).
    pub base: Option<Box<Snapshot>>,
}

impl Snapshot {
    /// Checks a snapshot generation `generation` sent: `Ok(None)` for an
    /// empty one (no descriptor, 0 bytes), or why it cannot be used.
    pub fn accept(
        generation: u64,
        bytes: u64,
        mut fds: Vec<OwnedFd>,
        max_state: u64,
    ) -> Result<Option<Snapshot>, String> {
        if fds.len() > 1 {
            return Err(format!(
                "a snapshot came with {} descriptors, not one",
                fds.len()
            ));
        }
        let Some(fd) = fds.pop() else {
            return match bytes {
                0 => Ok(None),
                n => Err(format!("a snapshot of {n} bytes came without its memfd")),
            };
        };
        if bytes > max_state {
            return Err(format!(
                "its snapshot is {} but --max-state is {}",
                size(bytes),
                size(max_state)
            ));
        }
        let seals = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GET_SEALS)
            .map_err(|e| format!("its snapshot is not a sealable memfd ({e})"))?;
        if seals & SNAPSHOT_SEALS != SNAPSHOT_SEALS {
            return Err(
                "its snapshot memfd is not sealed against writes, growing and shrinking".into(),
            );
        }
        let stat = nix::sys::stat::fstat(&fd).map_err(|e| format!("its snapshot: fstat: {e}"))?;
        if stat.st_size as u64 != bytes {
            return Err(format!(
                "its snapshot claims {bytes} bytes but the memfd holds {}",
                stat.st_size
            ));
        }
        Ok(Some(Snapshot {
            fd,
            bytes,
            generation,
            base: None,
        }))
    }

    /// [`accept`](Self::accept) for a freeze's snapshot: with `base_bytes`,
    /// the first descriptor holds the values written since a pre-copy and
    /// the second the pre-copy itself, and both together must fit in
    /// `max_state`.
    pub fn accept_chain(
        generation: u64,
        bytes: u64,
        base_bytes: Option<u64>,
        mut fds: Vec<OwnedFd>,
        max_state: u64,
    ) -> Result<Option<Snapshot>, String> {
        let Some(base_bytes) = base_bytes else {
            return Snapshot::accept(generation, bytes, fds, max_state);
        };
        if fds.len() != 2 {
            return Err(format!(
                "a snapshot with a pre-copy came with {} descriptors, not two",
                fds.len()
            ));
        }
        let total = bytes.saturating_add(base_bytes);
        if total > max_state {
            return Err(format!(
                "its snapshot and pre-copy are {} but --max-state is {}",
                size(total),
                size(max_state)
            ));
        }
        let base = fds.pop().map(|fd| vec![fd]).unwrap_or_default();
        let base = Snapshot::accept(generation, base_bytes, base, max_state)
            .map_err(|e| format!("pre-copy: {e}"))?
            .ok_or("a snapshot named an empty pre-copy")?;
        let top = Snapshot::accept(generation, bytes, fds, max_state)?
            .ok_or("a snapshot with a pre-copy came without its own memfd")?;
        Ok(Some(Snapshot {
            base: Some(Box::new(base)),
            ..top
        }))
    }

    /// The bytes it holds, its pre-copy included.
    pub fn total_bytes(&self) -> u64 {
        self.bytes + self.base.as_ref().map_or(0, |b| b.bytes)
    }

    /// The descriptor, to pass on with `SCM_RIGHTS` (the kernel duplicates it).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A size for people: `1.5 MiB`.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["bytes", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn memfd(content: &[u8], seal: bool) -> OwnedFd {
        let fd = nix::sys::memfd::memfd_create(
            c"test",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC | nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING,
        )
        .expect("memfd");
        let mut file = std::fs::File::from(fd);
        file.write_all(content).expect("write");
        let fd = OwnedFd::from(file);
        if seal {
            nix::fcntl::fcntl(
                &fd,
                nix::fcntl::FcntlArg::F_ADD_SEALS(nix::fcntl::SealFlag::from_bits_truncate(
                    SNAPSHOT_SEALS,
                )),
            )
            .expect("seal");
        }
        fd
    }

    #[test]
    fn accepts_a_sealed_memfd_of_the_claimed_size() {
        let s = Snapshot::accept(3, 5, vec![memfd(b"hello", true)], 100)
            .expect("valid")
            .expect("not empty");
        assert_eq!((s.bytes, s.generation), (5, 3));
        assert!(Snapshot::accept(3, 0, vec![], 100)
            .expect("empty")
            .is_none());
    }

    #[test]
    fn refuses_what_it_cannot_trust() {
        let err = |r: Result<Option<Snapshot>, String>| r.expect_err("must be refused");
        assert!(
            err(Snapshot::accept(1, 5, vec![memfd(b"hello", false)], 100)).contains("not sealed")
        );
        assert!(err(Snapshot::accept(1, 9, vec![memfd(b"hello", true)], 100)).contains("claims 9"));
        assert!(err(Snapshot::accept(1, 5, vec![memfd(b"hello", true)], 4)).contains("--max-state"));
        assert!(err(Snapshot::accept(1, 5, vec![], 100)).contains("without its memfd"));
        let pipe = nix::unistd::pipe().expect("pipe").0;
        assert!(err(Snapshot::accept(1, 0, vec![pipe], 100)).contains("not a sealable memfd"));
    }

    #[test]
    fn sizes_print_for_people() {
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(12), "12 bytes");
    }
}
