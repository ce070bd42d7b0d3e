//! Kept values' tests: snapshots round-trip sealed, freezes refuse later
//! writes and wait for the work in flight, a pre-copy and its delta read
//! whole, formats migrate, and forged memfds are refused with a reason.

use super::*;

#[test]
fn a_snapshot_round_trips_and_is_sealed() {
    let shared = Arc::new(Shared::new(1, None));
    let count = shared.register("count", 41u64).expect("new name");
    shared
        .register("names", vec!["a".to_owned()])
        .expect("new name");
    assert!(shared.register("count", 0u64).is_err(), "duplicate name");
    count.update(|c| *c += 1).expect("not frozen");
    let Written { fd, bytes, .. } = shared
        .snapshot(Purpose::Checkpoint)
        .expect("snapshot")
        .expect("not empty");
    let seals = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GET_SEALS).expect("seals");
    assert_eq!(seals & SNAPSHOT_SEALS, SNAPSHOT_SEALS);
    let next = Shared::new(1, None);
    let values = Mutex::new(next.load(fd, bytes).expect("loads"));
    assert_eq!(claim::<u64>(&values, "count"), Ok(Some(42)));
    assert_eq!(
        claim::<Vec<String>>(&values, "names"),
        Ok(Some(vec!["a".to_owned()]))
    );
    assert_eq!(claim::<u64>(&values, "absent"), Ok(None));
}

#[test]
fn writes_after_a_freezes_snapshot_are_refused_and_a_thaw_takes_them_again() {
    let shared = Arc::new(Shared::new(1, None));
    let count = shared.register("count", 0u64).expect("new name");
    count.update(|c| *c += 1).expect("not frozen");
    shared.freeze();
    // Frozen, but the snapshot is not written yet: carried over.
    count.update(|c| *c += 1).expect("before the snapshot");
    let Written { fd, bytes, .. } = shared
        .snapshot(Purpose::Freeze)
        .expect("snapshot")
        .expect("not empty");
    let err = count.update(|c| *c += 1).expect_err("after the snapshot");
    assert_eq!(err.name, "count");
    assert_eq!(shared.refused_writes(), 1);
    assert_eq!(count.get(), 2, "a refused write changes nothing");
    let late = shared.register("late", 0u64).expect("new name");
    assert!(late.set(1).is_err(), "kept after the snapshot: not in it");
    let values = Mutex::new(Shared::new(1, None).load(fd, bytes).expect("loads"));
    assert_eq!(claim::<u64>(&values, "count"), Ok(Some(2)));
    shared.thaw();
    assert_eq!(
        count.update(|c| {
            *c += 1;
            *c
        }),
        Ok(3)
    );
}

#[test]
fn a_freeze_after_a_pre_copy_writes_only_what_changed_and_reads_whole() {
    let shared = Arc::new(Shared::new(1, None));
    let count = shared.register("count", 1u64).expect("new name");
    shared
        .register("ballast", "x".repeat(1000))
        .expect("new name");
    let pre = shared
        .snapshot(Purpose::PreCopy)
        .expect("pre-copy")
        .expect("not empty");
    assert!(pre.base.is_none());
    count.update(|c| *c += 1).expect("not frozen");
    shared.freeze();
    let top = shared
        .snapshot(Purpose::Freeze)
        .expect("snapshot")
        .expect("not empty");
    let (base_fd, base_bytes) = top.base.expect("the pre-copy goes along");
    assert_eq!(base_bytes, pre.bytes);
    assert_eq!(identity(&base_fd), identity(&pre.fd), "the very same memfd");
    assert!(top.bytes < 64, "only the count: {} bytes", top.bytes);
    assert!(count.update(|c| *c += 1).is_err(), "frozen, every value");
    let next = Shared::new(1, None);
    let delta = parse(top.fd.try_clone().expect("dup"), top.bytes).expect("parses");
    let err = next.finish(None, delta).expect_err("no pre-copy");
    assert!(err.contains("the pre-copy did not come with it"), "{err}");
    let base = parse(base_fd, base_bytes).expect("parses");
    let delta = parse(top.fd, top.bytes).expect("parses");
    let values = Mutex::new(next.finish(Some(base), delta).expect("whole"));
    assert_eq!(claim::<u64>(&values, "count"), Ok(Some(2)));
    assert_eq!(
        claim::<String>(&values, "ballast"),
        Ok(Some("x".repeat(1000)))
    );
}

#[tokio::test]
async fn a_freeze_waits_for_the_work_in_flight() {
    let shared = Arc::new(Shared::new(1, None));
    let guard = shared.in_flight();
    let second = shared.in_flight();
    assert_eq!(shared.busy(), 2);
    drop(second);
    let quiet = tokio::spawn({
        let shared = shared.clone();
        async move { shared.quiet().await }
    });
    tokio::task::yield_now().await;
    assert!(!quiet.is_finished());
    drop(guard);
    tokio::time::timeout(std::time::Duration::from_secs(10), quiet)
        .await
        .expect("quiet once the guard is gone")
        .expect("join");
    assert_eq!(shared.busy(), 0);
}

#[test]
fn formats_are_migrated_or_refused() {
    let old = Arc::new(Shared::new(1, None));
    old.register("count", 7u64).expect("new name");
    let Written { fd, bytes, .. } = old
        .snapshot(Purpose::Checkpoint)
        .expect("snapshot")
        .expect("not empty");
    let dup = |fd: &OwnedFd| fd.try_clone().expect("dup");

    let without_hook = Shared::new(2, None);
    let err = without_hook
        .load(dup(&fd), bytes)
        .expect_err("no migration");
    assert!(err.contains("no migration"), "{err}");

    let migrate: Migrate = Arc::new(|from, values| {
        assert_eq!(from, 1);
        let n = values
            .remove("count")
            .and_then(|v| v.as_u64())
            .ok_or("no count")?;
        values.insert("total".into(), Value::from(n * 10));
        Ok(())
    });
    let newer = Shared::new(2, Some(migrate));
    let values = Mutex::new(newer.load(dup(&fd), bytes).expect("migrates"));
    assert_eq!(claim::<u64>(&values, "total"), Ok(Some(70)));

    let older = Shared::new(0, None);
    let err = older.load(dup(&fd), bytes).expect_err("newer format");
    assert!(err.contains("newer than this program's 0"), "{err}");

    let values = Mutex::new(Shared::new(1, None).load(fd, bytes).expect("loads"));
    let err = claim::<String>(&values, "count").expect_err("wrong type");
    assert!(err.contains("does not read as"), "{err}");
}

/// A memfd holding `content`, sealed against every change or not at
/// all: a snapshot as a buggy or hostile peer might hand one over.
fn forged(content: &[u8], sealed: bool) -> OwnedFd {
    use nix::sys::memfd::{memfd_create, MFdFlags};
    let fd = memfd_create(
        c"forged-snapshot",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .expect("memfd_create");
    let file = File::from(fd);
    file.write_all_at(content, 0).expect("write");
    let fd = OwnedFd::from(file);
    if sealed {
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

const DOC: &[u8] = br#"{"format":1,"values":{"count":5}}"#;

#[test]
fn an_honest_forged_snapshot_loads() {
    let values = Shared::new(1, None)
        .load(forged(DOC, true), DOC.len() as u64)
        .expect("loads");
    assert_eq!(values.get("count"), Some(&Value::from(5)));
}

#[test]
fn an_announced_size_larger_than_the_memfd_is_refused_without_allocating_it() {
    let len = DOC.len();
    for claimed in [len as u64 + 1, 1 << 40, isize::MAX as u64, u64::MAX] {
        let err = Shared::new(1, None)
            .load(forged(DOC, true), claimed)
            .expect_err("a size larger than the file");
        assert_eq!(
            err,
            format!(
                "checking the snapshot's size: the supervisor announced {claimed} bytes but \
                 the memfd holds {len}"
            )
        );
    }
}

#[test]
fn a_memfd_larger_than_announced_is_refused_not_read_in_part() {
    // The first `DOC.len()` bytes are a valid snapshot: reading only
    // the announced prefix would accept it.
    let mut content = DOC.to_vec();
    content.extend_from_slice(b"  trailing bytes nobody announced");
    let err = Shared::new(1, None)
        .load(forged(&content, true), DOC.len() as u64)
        .expect_err("a file larger than announced");
    assert_eq!(
        err,
        format!(
            "checking the snapshot's size: the supervisor announced {} bytes but the memfd \
             holds {}",
            DOC.len(),
            content.len()
        )
    );
}

#[test]
fn an_unsealed_memfd_is_refused() {
    let err = Shared::new(1, None)
        .load(forged(DOC, false), DOC.len() as u64)
        .expect_err("unsealed");
    assert!(
        err.contains("not sealed against writing, growing and shrinking"),
        "{err}"
    );
}

#[test]
fn a_descriptor_that_is_not_a_memfd_is_refused() {
    let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
    let err = Shared::new(1, None)
        .load(OwnedFd::from(a), 10)
        .expect_err("a socket");
    assert!(
        err.starts_with("checking the snapshot's seals: not a sealable memfd"),
        "{err}"
    );
}

#[test]
fn an_empty_snapshot_is_an_error_not_a_panic() {
    let err = Shared::new(1, None)
        .load(forged(b"", true), 0)
        .expect_err("empty");
    assert!(err.starts_with("parsing the snapshot: "), "{err}");
}
