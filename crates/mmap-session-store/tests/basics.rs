//! Behaviour of one store in one process (several threads where it matters).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime};

use mmap_session_store::{OpenError, Options, Store, StoreError};

fn later() -> SystemTime {
    SystemTime::now() + Duration::from_secs(3600)
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

fn small() -> Options {
    Options::new().max_sessions(1000).max_file_size(64 << 20)
}

#[test]
fn a_committed_value_is_read_back_by_get_and_by_the_next_lease() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_with(dir.path().join("s"), small()).unwrap();
    assert_eq!(store.get(b"k"), None);
    assert!(!store.contains(b"k"));
    let mut lease = store.lease_blocking(b"k", soon()).unwrap();
    assert_eq!(lease.read(), None);
    assert!(
        !store.contains(b"k"),
        "a leased key without a record has no record"
    );
    lease.commit(b"hello", later()).unwrap();
    assert!(store.contains(b"k"));
    assert_eq!(lease.read().unwrap().value, b"hello");
    drop(lease);
    assert_eq!(store.get(b"k").unwrap().value, b"hello");
    let mut lease = store.lease_blocking(b"k", soon()).unwrap();
    lease.commit(b"world!", later()).unwrap();
    lease.release();
    assert_eq!(store.get(b"k").unwrap().value, b"world!");
    assert_eq!(store.stats().live_records, 1);
    assert!(store.verify().is_clean(), "{:?}", store.verify());
}

#[test]
fn a_second_opener_of_the_same_path_sees_the_same_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let a = Store::open_with(&path, small()).unwrap();
    let b = Store::open_with(&path, small()).unwrap();
    let mut lease = a.lease_blocking(b"k", soon()).unwrap();
    lease.commit(b"v", later()).unwrap();
    assert!(
        b.try_lease(b"k").unwrap().is_none(),
        "the lease excludes the other opener"
    );
    drop(lease);
    assert_eq!(b.get(b"k").unwrap().value, b"v");
    assert!(b.try_lease(b"k").unwrap().is_some());
}

#[test]
fn remove_deletes_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_with(dir.path().join("s"), small()).unwrap();
    let mut lease = store.lease_blocking(b"k", soon()).unwrap();
    lease.commit(b"v", later()).unwrap();
    lease.remove().unwrap();
    assert_eq!(lease.read(), None);
    drop(lease);
    assert_eq!(store.get(b"k"), None);
    assert_eq!(store.stats().live_records, 0);
    assert!(store.verify().is_clean());
}

#[test]
fn expired_records_are_never_returned_and_their_space_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_with(dir.path().join("s"), small()).unwrap();
    let mut lease = store.lease_blocking(b"k", soon()).unwrap();
    lease
        .commit(b"v", SystemTime::now() - Duration::from_millis(1))
        .unwrap();
    assert_eq!(lease.read(), None);
    drop(lease); // the release reclaims the expired record
    assert_eq!(store.get(b"k"), None);
    assert_eq!(store.stats().live_records, 0);
    assert_eq!(store.stats().expired_reclaimed, 1);
}

#[test]
fn a_value_over_the_maximum_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_with(dir.path().join("s"), small().max_value_len(1000)).unwrap();
    let mut lease = store.lease_blocking(b"k", soon()).unwrap();
    lease.commit(b"old", later()).unwrap();
    let err = lease.commit(&[7u8; 1001], later()).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::TooLarge {
                len: 1001,
                max: 1000
            }
        ),
        "{err:?}"
    );
    assert_eq!(lease.read().unwrap().value, b"old");
    lease.commit(&[7u8; 1000], later()).unwrap();
}

#[test]
fn the_default_maximum_value_is_at_least_64_kib() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_with(dir.path().join("s"), Options::new().max_sessions(100)).unwrap();
    let mut lease = store.lease_blocking(b"k", soon()).unwrap();
    let big = vec![0xabu8; 64 << 10];
    lease.commit(&big, later()).unwrap();
    assert_eq!(lease.read().unwrap().value, big);
}

#[test]
fn a_held_lease_makes_others_wait_until_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_with(dir.path().join("s"), small()).unwrap();
    let _held = store.lease_blocking(b"k", soon()).unwrap();
    assert!(store.try_lease(b"k").unwrap().is_none());
    let start = Instant::now();
    let err = store
        .lease_blocking(b"k", Instant::now() + Duration::from_millis(50))
        .unwrap_err();
    assert!(matches!(err, StoreError::LeaseTimeout));
    assert!(start.elapsed() >= Duration::from_millis(50));
    assert!(
        store.try_lease(b"other").unwrap().is_some(),
        "other keys are not affected"
    );
}

#[test]
fn a_waiter_is_woken_by_the_release() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_with(dir.path().join("s"), small()).unwrap();
    let held = store.lease_blocking(b"k", soon()).unwrap();
    let waiter = {
        let store = store.clone();
        std::thread::spawn(move || {
            let mut lease = store
                .lease_blocking(b"k", Instant::now() + Duration::from_secs(20))
                .unwrap();
            lease.commit(b"second", later()).unwrap();
        })
    };
    // Wait until the waiter is registered (it counts a lease wait), then release.
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.stats().lease_waits == 0 {
        assert!(Instant::now() < deadline, "waiter never waited");
        std::thread::yield_now();
    }
    drop(held);
    waiter.join().unwrap();
    assert_eq!(store.get(b"k").unwrap().value, b"second");
}

#[test]
fn threads_incrementing_shared_counters_lose_no_update() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_with(dir.path().join("s"), small()).unwrap();
    let threads = 8;
    let rounds = 2000;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let store = store.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                for i in 0..rounds {
                    let key = [((t + i) % 4) as u8];
                    let mut lease = store
                        .lease_blocking(&key, Instant::now() + Duration::from_secs(30))
                        .unwrap();
                    let n = lease
                        .read()
                        .map_or(0, |r| u64::from_le_bytes(r.value.try_into().unwrap()));
                    lease.commit(&(n + 1).to_le_bytes(), later()).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let total: u64 = (0..4u8)
        .map(|k| u64::from_le_bytes(store.get(&[k]).unwrap().value.try_into().unwrap()))
        .sum();
    assert_eq!(total, (threads * rounds) as u64);
    assert!(store.verify().is_clean(), "{:?}", store.verify());
}

#[test]
fn a_lease_held_past_the_timeout_is_taken_over_and_its_commit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let store = Store::open_with(&path, small()).unwrap();
    let impatient =
        Store::open_with(&path, small().lease_timeout(Duration::from_millis(100))).unwrap();
    let mut stale = store.lease_blocking(b"k", soon()).unwrap();
    stale.commit(b"before", later()).unwrap();
    let mut fresh = impatient.lease_blocking(b"k", soon()).unwrap();
    assert!(!stale.is_held());
    assert!(matches!(
        stale.commit(b"late", later()),
        Err(StoreError::LeaseLost)
    ));
    assert!(matches!(stale.remove(), Err(StoreError::LeaseLost)));
    drop(stale); // releasing a lost lease must not free the new holder's lease
    assert!(store.try_lease(b"k").unwrap().is_none());
    assert_eq!(fresh.read().unwrap().value, b"before");
    fresh.commit(b"after", later()).unwrap();
    drop(fresh);
    assert_eq!(store.get(b"k").unwrap().value, b"after");
    assert_eq!(store.stats().takeovers, 1);
    assert!(store.verify().is_clean(), "{:?}", store.verify());
}

#[test]
fn the_file_grows_on_demand_and_starts_small() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let store = Store::open_with(&path, Options::new().max_sessions(1000)).unwrap();
    let start = store.stats().bytes_reserved;
    assert!(start < 4 << 20, "a new store reserves {start} bytes");
    for i in 0..200u32 {
        let mut lease = store.lease_blocking(&i.to_le_bytes(), soon()).unwrap();
        lease.commit(&vec![1u8; 16 << 10], later()).unwrap();
    }
    let grown = store.stats().bytes_reserved;
    assert!(grown > start + (3 << 20), "{grown}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), grown);
    for i in 0..200u32 {
        assert_eq!(store.get(&i.to_le_bytes()).unwrap().value.len(), 16 << 10);
    }
}

#[test]
fn a_full_store_evicts_the_least_recently_used_idle_record_then_reports_full() {
    let dir = tempfile::tempdir().unwrap();
    // One data chunk: 1 MiB of 64 KiB-class blocks holds only a few records.
    let opts = Options::new().max_sessions(64);
    let probe = Store::open_with(dir.path().join("probe"), opts.clone()).unwrap();
    let data_start = probe.stats().bytes_reserved;
    drop(probe);
    let store = Store::open_with(
        dir.path().join("s"),
        opts.max_file_size(data_start + (1 << 20)),
    )
    .unwrap();
    let value = vec![5u8; 60 << 10];
    let mut held = Vec::new();
    let mut i = 0u32;
    // Fill: every record stays leased, so nothing can be evicted.
    loop {
        let mut lease = store.lease_blocking(&i.to_le_bytes(), soon()).unwrap();
        match lease.commit(&value, later()) {
            Ok(()) => held.push(lease),
            Err(StoreError::StoreFull) => break,
            Err(e) => panic!("{e}"),
        }
        i += 1;
    }
    assert!(held.len() >= 10, "{}", held.len());
    // Release them all; touch record 0 again so it is not the least recently used.
    drop(held);
    // Last-used stamps have millisecond resolution: let the clock move on before touching.
    let released = SystemTime::now();
    while SystemTime::now() < released + Duration::from_millis(2) {
        std::thread::yield_now();
    }
    drop(store.lease_blocking(&0u32.to_le_bytes(), soon()).unwrap());
    let mut lease = store.lease_blocking(b"new", soon()).unwrap();
    lease.commit(&value, later()).unwrap();
    drop(lease);
    assert_eq!(store.stats().evictions, 1);
    assert!(
        store.get(&0u32.to_le_bytes()).is_some(),
        "the recently used record stays"
    );
    assert!(store.get(b"new").is_some());
    assert!(store.verify().is_clean(), "{:?}", store.verify());
}

#[test]
fn the_file_is_created_private() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let _store = Store::open_with(&path, small()).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn a_symlink_at_the_path_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target");
    let _store = Store::open_with(&target, small()).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    assert!(matches!(
        Store::open_with(&link, small()),
        Err(OpenError::Symlink(_))
    ));
    let dangling = dir.path().join("dangling");
    std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
    assert!(matches!(
        Store::open_with(&dangling, small()),
        Err(OpenError::Symlink(_))
    ));
    assert!(
        !dir.path().join("nowhere").exists(),
        "nothing was created through the link"
    );
}

#[test]
fn files_of_another_kind_give_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other");
    std::fs::write(&other, vec![b'x'; 8192]).unwrap();
    assert!(matches!(Store::open(&other), Err(OpenError::NotAStore(_))));

    let path = dir.path().join("s");
    drop(Store::open_with(&path, small()).unwrap());
    let good = std::fs::read(&path).unwrap();

    let mut newer = good.clone();
    newer[8] = 99; // format version
    std::fs::write(&path, &newer).unwrap();
    assert!(matches!(
        Store::open(&path),
        Err(OpenError::UpgradeRequired { found: 99, .. })
    ));

    let mut flipped = good.clone();
    flipped[40] ^= 0x10; // inside the checksummed header
    std::fs::write(&path, &flipped).unwrap();
    assert!(matches!(
        Store::open(&path),
        Err(OpenError::Corrupted { .. })
    ));

    std::fs::write(&path, &good[..100]).unwrap();
    assert!(matches!(
        Store::open(&path),
        Err(OpenError::Corrupted { .. })
    ));

    std::fs::write(&path, &good[..good.len() / 2]).unwrap();
    let err = Store::open(&path).unwrap_err();
    assert!(matches!(err, OpenError::Corrupted { .. }), "{err}");
    assert!(err.to_string().contains("truncated"), "{err}");
}

#[test]
fn many_threads_opening_one_new_path_end_with_one_valid_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = Arc::new(dir.path().join("s"));
    let barrier = Arc::new(Barrier::new(8));
    let handles: Vec<_> = (0..8u8)
        .map(|i| {
            let path = path.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let store = Store::open_with(&*path, small()).unwrap();
                let mut lease = store.lease_blocking(&[i], soon()).unwrap();
                lease.commit(&[i], later()).unwrap();
                store
            })
        })
        .collect();
    let stores: Vec<Store> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for i in 0..8u8 {
        assert_eq!(stores[0].get(&[i]).unwrap().value, [i]);
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "temporary files were left behind");
}

#[test]
fn the_file_never_holds_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let store = Store::open_with(&path, small()).unwrap();
    let key = b"a-very-recognisable-session-identifier";
    let mut lease = store.lease_blocking(key, soon()).unwrap();
    lease.commit(b"v", later()).unwrap();
    drop(lease);
    let bytes = std::fs::read(&path).unwrap();
    assert!(!bytes.windows(key.len()).any(|w| w == key));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_leases_wait_without_blocking_the_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_with(dir.path().join("s"), small()).unwrap();
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut lease = store
                    .lease(b"hot", Instant::now() + Duration::from_secs(30))
                    .await
                    .unwrap();
                let n = lease
                    .read()
                    .map_or(0, |r| u64::from_le_bytes(r.value.try_into().unwrap()));
                // Yield while holding the lease so that others really wait.
                tokio::task::yield_now().await;
                lease.commit(&(n + 1).to_le_bytes(), later()).unwrap();
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let n = u64::from_le_bytes(store.get(b"hot").unwrap().value.try_into().unwrap());
    assert_eq!(n, 64);
}

#[test]
fn the_default_store_holds_a_million_1_kib_sessions_without_evicting() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("s")).unwrap();
    let value = vec![0x42u8; 1024];
    let n = 1_000_000u32;
    for i in 0..n {
        let mut lease = store.try_lease(&i.to_le_bytes()).unwrap().unwrap();
        lease.commit(&value, later()).unwrap();
    }
    let stats = store.stats();
    assert_eq!(stats.live_records, n as u64);
    assert_eq!(stats.evictions, 0);
    for i in (0..n).step_by(997) {
        assert_eq!(store.get(&i.to_le_bytes()).unwrap().value, value);
    }
    eprintln!(
        "1M sessions of 1 KiB: {} MiB reserved, {} bytes per session",
        stats.bytes_reserved >> 20,
        stats.bytes_reserved / n as u64
    );
}

#[test]
fn a_store_of_a_thousand_sessions_stays_small_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let store = Store::open(&path).unwrap();
    for i in 0..1000u32 {
        let mut lease = store.try_lease(&i.to_le_bytes()).unwrap().unwrap();
        lease.commit(&[1u8; 1024], later()).unwrap();
    }
    let reserved = store.stats().bytes_reserved;
    // The index for a million sessions (32 MiB) is reserved up front; data grows in 4 MiB steps.
    assert!(
        reserved <= 40 << 20,
        "{reserved} bytes reserved for 1,000 sessions"
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len(), reserved);
}

#[test]
fn entries_list_records_by_hash_with_their_lease_holder() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_with(dir.path().join("s"), small()).unwrap();
    for key in [&b"first-key"[..], b"second-key", b"third-key"] {
        let mut lease = store.lease_blocking(key, soon()).unwrap();
        lease.commit(&[9u8; 100], later()).unwrap();
    }
    let held = store.lease_blocking(b"second-key", soon()).unwrap();
    let entries = store.entries();
    assert_eq!(entries.len(), 3);
    assert!(entries
        .iter()
        .all(|e| e.value_len == 100 && e.key_hash.len() == 8));
    let holders: Vec<_> = entries.iter().filter_map(|e| e.lease.clone()).collect();
    assert_eq!(holders.len(), 1);
    assert!(holders[0].alive);
    assert_eq!(holders[0].pid, u64::from(std::process::id()));
    let listed = format!("{entries:?}");
    assert!(
        !listed.contains("-key"),
        "keys must never be listed: {listed}"
    );
    drop(held);
}

#[test]
fn purge_expired_removes_expired_idle_records_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_with(dir.path().join("s"), small()).unwrap();
    let soon_expired = SystemTime::now() + Duration::from_millis(500);
    for i in 0..10u8 {
        let mut lease = store.lease_blocking(&[i], soon()).unwrap();
        lease
            .commit(&[i], if i < 4 { later() } else { soon_expired })
            .unwrap();
    }
    let held = store.lease_blocking(&[9u8], soon()).unwrap();
    while SystemTime::now() <= soon_expired + Duration::from_millis(1) {
        std::thread::yield_now();
    }
    assert_eq!(store.purge_expired(), 5, "six expired, one of them leased");
    assert_eq!(store.entries().len(), 5);
    assert_eq!(store.get(&[5u8]), None);
    assert!(store.get(&[0u8]).is_some());
    drop(held); // its expired record is reclaimed on release
    assert_eq!(store.entries().len(), 4);
    assert_eq!(store.stats().expired_reclaimed, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_existing_leases_only_keys_with_a_live_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_with(dir.path().join("s"), small()).unwrap();
    assert!(store
        .lease_existing(b"nobody", soon())
        .await
        .unwrap()
        .is_none());

    let mut lease = store.lease(b"someone", soon()).await.unwrap();
    lease.commit(b"v1", later()).unwrap();
    lease.release();
    let held = store.lease_existing(b"someone", soon()).await.unwrap();
    let mut held = held.expect("a live record is leased");
    assert_eq!(held.read().unwrap().value, b"v1");
    // While it is held, another caller waits for it like `lease` does.
    let quick = Instant::now() + Duration::from_millis(50);
    assert!(matches!(
        store.lease_existing(b"someone", quick).await,
        Err(StoreError::LeaseTimeout)
    ));
    held.remove().unwrap();
    held.release();
    assert!(store
        .lease_existing(b"someone", soon())
        .await
        .unwrap()
        .is_none());

    let mut lease = store.lease(b"brief", soon()).await.unwrap();
    lease
        .commit(b"v", SystemTime::now() - Duration::from_secs(1))
        .unwrap();
    lease.release();
    assert!(store
        .lease_existing(b"brief", soon())
        .await
        .unwrap()
        .is_none());
}
