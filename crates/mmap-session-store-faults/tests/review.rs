//! Interleavings found by a hostile review of the crash/stall fixes. Each test forces one
//! interleaving with failpoints in real processes and checks a promise of the store.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use mmap_session_store::Store;
use mmap_session_store_faults::{lease_and_commit, options, serial, stop_once, value, Child};

const LONG: Duration = Duration::from_secs(60);
const SHORT: Duration = Duration::from_millis(200);
const WAIT: Duration = Duration::from_secs(5);

/// Index entries of the tests' files (`options` sizes the index for 256 sessions): one shard.
const ENTRIES: u64 = 1024;

/// Where a key's probe window starts (FORMAT.md, "Index entry").
fn home(key: &str) -> u64 {
    let h = blake3::hash(key.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[8..16]);
    u64::from_le_bytes(b) & (ENTRIES - 1)
}

/// Two distinct keys with the same home position.
fn colliding_keys() -> (String, String) {
    let mut seen = std::collections::HashMap::new();
    for i in 0.. {
        let key = format!("key-{i}");
        if let Some(other) = seen.insert(home(&key), key.clone()) {
            return (other, key);
        }
    }
    unreachable!()
}

/// An inserter claims the state word of an entry it recycles from another key (a key whose
/// record was removed) and stalls before it tags the entry. The other key's next leaser takes
/// the stalled state lease over (past the lease timeout), still sees its own key's tag, and
/// commits. When the inserter goes on it still holds the shard lock (nobody else inserted), so
/// it tags the entry with its own key: the other key's acknowledged commit is hidden under a
/// foreign tag and lost.
#[test]
fn a_stalled_inserter_never_retags_an_entry_leased_by_its_old_key() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let (old_key, new_key) = colliding_keys();
    let store = Store::open_with(&path, options(SHORT)).unwrap();
    // old_key's entry sits at the shared home position, now without a record.
    lease_and_commit(&store, &old_key, &[None], "first", WAIT);
    let mut lease = store
        .lease_blocking(old_key.as_bytes(), std::time::Instant::now() + WAIT)
        .unwrap();
    lease.remove().unwrap();
    drop(lease);

    let mut inserter = Child::open(&path, LONG);
    inserter.arm("index.insert.state_claimed");
    inserter.send(&format!("commit {new_key} mine 3600000"));
    inserter.wait_at("index.insert.state_claimed");

    // old_key's next leaser: waits out the stalled holder, then commits (acknowledged).
    lease_and_commit(&store, &old_key, &[None], "second", WAIT);
    assert_eq!(value(&store, &old_key).as_deref(), Some("second"));

    inserter.resume();
    let answer = inserter.answer();
    assert_eq!(
        value(&store, &old_key).as_deref(),
        Some("second"),
        "old_key's acknowledged commit after the stalled inserter went on (it answered {answer})"
    );
    let report = store.verify();
    assert!(report.is_clean(), "verify: {:?}", report.problems);
    inserter.exit();
}

/// Two processes (here: threads, each with its own open file description) create the same
/// store at once. The second, cleaning up abandoned temporary files, opens the first one's
/// temporary file in the instant before its creator locks it, finds it unlocked and locks it to
/// remove it; the first creator's `try_lock` then fails and its `open` returns an I/O error,
/// although the store is created a moment later and nothing was wrong.
#[test]
fn a_creator_racing_another_creators_cleanup_still_opens() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let (first_at, first_go) = stop_once("open.create.tmp_opened");
    let (second_at, second_go) = stop_once("open.create.abandoned_locked");
    let first = {
        let path = path.clone();
        std::thread::spawn(move || Store::open_with(&path, options(LONG)).map(drop))
    };
    first_at.recv().unwrap();
    let second = {
        let path = path.clone();
        std::thread::spawn(move || Store::open_with(&path, options(LONG)).map(drop))
    };
    second_at.recv().unwrap();
    first_go.send(()).unwrap();
    let first = first.join().unwrap();
    second_go.send(()).unwrap();
    let second = second.join().unwrap();
    fail::remove("open.create.tmp_opened");
    fail::remove("open.create.abandoned_locked");
    assert!(second.is_ok(), "the second creator: {second:?}");
    assert!(first.is_ok(), "the first creator: {first:?}");
}

/// A task that queues for a key whose entry an insert of this same process is recycling (the
/// key's record was removed; the insert has leased the entry and not yet re-tagged it) sees the
/// key "held here" and starts no watcher, counting on that holder's release. The insert then
/// publishes its own key and its lease is released as that key's: nobody wakes the queue of
/// the recycled key, and the task waits until its deadline although the key is free.
#[test]
fn a_task_queued_behind_an_insert_recycling_its_entry_is_woken() {
    let _serial = serial();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let (old_key, new_key) = colliding_keys();
    let store = Store::open_with(&path, options(LONG)).unwrap();
    lease_and_commit(&store, &old_key, &[None], "first", WAIT);
    let mut lease = store
        .lease_blocking(old_key.as_bytes(), Instant::now() + WAIT)
        .unwrap();
    lease.remove().unwrap();
    drop(lease);

    let (at, go) = stop_once("index.insert.state_claimed");
    let inserter = {
        let store = store.clone();
        let key = new_key.clone();
        std::thread::spawn(move || {
            let lease = store.lease_blocking(key.as_bytes(), Instant::now() + WAIT)?;
            drop(lease);
            Ok::<(), mmap_session_store::StoreError>(())
        })
    };
    at.recv().unwrap();
    let (queued_tx, queued) = mpsc::channel::<()>();
    let queued_tx = Mutex::new(Some(queued_tx));
    fail::cfg_callback("local.enqueued", move || {
        if let Some(tx) = queued_tx.lock().unwrap().take() {
            let _ = tx.send(());
        }
    })
    .unwrap();
    let waiter = {
        let store = store.clone();
        let key = old_key.clone();
        runtime.spawn(async move {
            store
                .lease(key.as_bytes(), Instant::now() + Duration::from_secs(2))
                .await
                .map(drop)
        })
    };
    queued.recv().unwrap();
    go.send(()).unwrap();
    let inserted = inserter.join().unwrap();
    let result = runtime.block_on(waiter).unwrap();
    fail::remove("index.insert.state_claimed");
    fail::remove("local.enqueued");
    assert!(inserted.is_ok(), "the inserter: {inserted:?}");
    assert!(
        result.is_ok(),
        "the task queued for the free key was not woken: {result:?}"
    );
}

/// A task that queues for a key leased by a holder of its own process starts no watcher: it
/// counts on that holder's release. The holder stalls past the lease timeout; another process
/// takes the lease over, commits and releases, so the key is free. The queued task still waits
/// for the stalled holder of its own process, until its deadline.
#[test]
fn a_task_queued_behind_a_deposed_holder_of_its_process_gets_the_free_key() {
    let _serial = serial();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let store = Store::open_with(&path, options(LONG)).unwrap();
    lease_and_commit(&store, "k", &[None], "a", WAIT);
    let mut other = Child::open(&path, SHORT);
    // The stalled holder: it keeps the lease well past the other process's lease timeout.
    let stalled = store.lease_blocking(b"k", Instant::now() + WAIT).unwrap();

    let (queued_tx, queued) = mpsc::channel::<()>();
    let queued_tx = Mutex::new(Some(queued_tx));
    fail::cfg_callback("local.enqueued", move || {
        if let Some(tx) = queued_tx.lock().unwrap().take() {
            let _ = tx.send(());
        }
    })
    .unwrap();
    let waiter = {
        let store = store.clone();
        runtime.spawn(async move {
            let lease = store
                .lease(b"k", Instant::now() + Duration::from_secs(3))
                .await?;
            Ok::<_, mmap_session_store::StoreError>(lease.read().map(|r| r.value))
        })
    };
    queued.recv().unwrap();
    fail::remove("local.enqueued");
    // The other process takes the lease over, commits, releases: the key is free from here on.
    other.ask("commit k b 3600000", "@ok");
    let result = runtime.block_on(waiter).unwrap();
    drop(stalled);
    assert!(
        matches!(&result, Ok(Some(v)) if v == b"b"),
        "the queued task did not get the free key before its deadline: {result:?}"
    );
    other.exit();
}

/// One chunk holds three live sessions of a large size class; the two other chunks are wholly
/// free (their medium-sized sessions were removed). A fourth large session needs a block: the
/// allocator evicts a live, unexpired session of its class before it gives back a wholly free
/// chunk, so an acknowledged session is lost while the file has two free mebibytes.
#[test]
fn a_live_session_is_not_evicted_while_a_wholly_free_chunk_exists() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let store = Store::open_with(&path, options(LONG)).unwrap();
    let commit = |key: &str, len: usize| {
        let mut lease = store
            .lease_blocking(key.as_bytes(), Instant::now() + WAIT)
            .unwrap();
        lease
            .commit(&vec![b'x'; len], mmap_session_store_faults::later())
            .unwrap();
    };
    for i in 0..3 {
        commit(&format!("large-{i}"), 300 << 10);
    }
    // Nine medium sessions fill a chunk: two chunks of them, and the file is at its largest.
    let medium = 18;
    for i in 0..medium {
        commit(&format!("medium-{i}"), 100 << 10);
    }
    assert_eq!(store.stats().evictions, 0, "the store filled up early");
    let evictions_before = store.stats().evictions;
    for i in 0..medium {
        let mut lease = store
            .lease_blocking(format!("medium-{i}").as_bytes(), Instant::now() + WAIT)
            .unwrap();
        lease.remove().unwrap();
    }
    for i in 0..3 {
        assert!(
            store.get(format!("large-{i}").as_bytes()).is_some(),
            "large-{i} before"
        );
    }
    commit("large-3", 300 << 10);
    let lost: Vec<_> = (0..3)
        .filter(|i| store.get(format!("large-{i}").as_bytes()).is_none())
        .collect();
    assert!(
        lost.is_empty(),
        "live large sessions {lost:?} evicted (evictions {} -> {}) while chunks were wholly free",
        evictions_before,
        store.stats().evictions
    );
}

/// Three chunks of medium sessions (nine a chunk): the second chunk's sessions and four of the
/// first's are removed. A process writing a value of a class that has no chunk gives chunks
/// back: it pops every free medium block (the wholly free chunk's and the four others) and,
/// stopped there, holds them. A commit of a medium session meanwhile found the free list empty
/// and no unclaimed chunk, and evicted a live, unexpired session although thirteen blocks of
/// its class were free. Now it sees the give-back's mark: it waits a moment for the blocks, and
/// while the giver stays stopped the store is full for it (`StoreFull`, a 503), which loses no
/// session; once the giver goes on, the commit succeeds.
#[test]
fn a_commit_during_a_give_back_evicts_no_live_session() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let store = Store::open_with(&path, options(LONG)).unwrap();
    let medium = vec![b'm'; 100 << 10];
    let commit = |key: &str| {
        let mut lease = store
            .lease_blocking(key.as_bytes(), Instant::now() + WAIT)
            .unwrap();
        lease
            .commit(&medium, mmap_session_store_faults::later())
            .unwrap();
    };
    for i in 0..27 {
        commit(&format!("medium-{i}"));
    }
    assert_eq!(store.stats().evictions, 0, "the store filled up early");
    for i in (0..4).chain(9..18) {
        let mut lease = store
            .lease_blocking(format!("medium-{i}").as_bytes(), Instant::now() + WAIT)
            .unwrap();
        lease.remove().unwrap();
    }
    let live: Vec<String> = (4..9)
        .chain(18..27)
        .map(|i| format!("medium-{i}"))
        .collect();

    let mut giver = Child::open(&path, LONG);
    giver.arm("alloc.unclaim.popped");
    giver.send(&format!("rmw large v1 {}", 300 << 10));
    giver.wait_at("alloc.unclaim.popped");
    let mut lease = store
        .lease_blocking(b"newcomer", Instant::now() + WAIT)
        .unwrap();
    match lease.commit(&medium, mmap_session_store_faults::later()) {
        Ok(()) | Err(mmap_session_store::StoreError::StoreFull) => {}
        Err(e) => panic!("the newcomer: {e}"),
    }
    drop(lease);
    giver.resume();
    let answer = giver.answer();
    assert!(answer.starts_with("@ok"), "the giver: {answer}");
    commit("newcomer");
    let lost: Vec<&String> = live
        .iter()
        .filter(|k| store.get(k.as_bytes()).is_none())
        .collect();
    assert!(
        lost.is_empty(),
        "live sessions {lost:?} evicted (evictions: {}) while blocks of their class were free",
        store.stats().evictions
    );
    giver.exit();
}

/// As `a_stalled_inserter_never_retags_an_entry_leased_by_its_old_key`, but the stalled
/// inserter's shard lock is taken over too (another key is inserted meanwhile): when it goes on
/// it claims the entry, finds itself deposed and "undoes" its claim by vacating the entry, so
/// the old key's acknowledged record is left under a vacated tag, which no lookup matches.
#[test]
fn a_deposed_inserter_never_vacates_an_entry_leased_by_its_old_key() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let (old_key, new_key) = colliding_keys();
    let store = Store::open_with(&path, options(SHORT)).unwrap();
    lease_and_commit(&store, &old_key, &[None], "first", WAIT);
    let mut lease = store
        .lease_blocking(old_key.as_bytes(), Instant::now() + WAIT)
        .unwrap();
    lease.remove().unwrap();
    drop(lease);

    let mut inserter = Child::open(&path, LONG);
    inserter.arm("index.insert.state_claimed");
    inserter.send(&format!("commit {new_key} mine 3600000"));
    inserter.wait_at("index.insert.state_claimed");

    // The old key's next leaser takes the stalled entry lease over and commits; another key's
    // insert takes the stalled shard lock over.
    lease_and_commit(&store, &old_key, &[None], "second", WAIT);
    lease_and_commit(&store, "another", &[None], "x", WAIT);
    assert_eq!(value(&store, &old_key).as_deref(), Some("second"));

    inserter.resume();
    let answer = inserter.answer();
    assert_eq!(
        value(&store, &old_key).as_deref(),
        Some("second"),
        "old_key's acknowledged commit after the deposed inserter went on (it answered {answer}); \
         verify: {:?}",
        store.verify().problems
    );
    inserter.exit();
}

/// A process died holding two sessions. A new process takes its slot and, stopped in the middle
/// of releasing the dead process's leases (one released, one not), holds the slot's lock: the
/// dead holder of the other session now looks alive to everyone, and a waiter times out at its
/// deadline instead of taking the lease over within milliseconds ("whatever the lease timeout
/// says", as `Options::lease_timeout` promises for a holder whose process died).
#[test]
fn a_dead_holders_lease_is_taken_over_while_its_slot_is_being_reclaimed() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let store = Store::open_with(&path, options(LONG)).unwrap();
    lease_and_commit(&store, "k1", &[None], "a1", WAIT);
    lease_and_commit(&store, "k2", &[None], "a2", WAIT);
    let mut holder = Child::open(&path, LONG);
    holder.ask("hold k1", "@held");
    holder.ask("hold k2", "@held");
    holder.kill();

    // The lowest free slot is the dead holder's: this process takes it and stops after
    // releasing the first of its two leases.
    let mut reclaimer = Child::spawn();
    reclaimer.arm("open.reclaim_slot.released");
    reclaimer.send(&format!("open {} {}", path.display(), LONG.as_millis()));
    reclaimer.wait_at("open.reclaim_slot.released");

    let deadline = Duration::from_secs(3);
    let results: Vec<_> = ["k1", "k2"]
        .iter()
        .map(|k| {
            store
                .lease_blocking(k.as_bytes(), Instant::now() + deadline)
                .map(|lease| lease.read().map(|r| r.value))
        })
        .collect();
    reclaimer.resume();
    reclaimer.expect("@ok");
    reclaimer.exit();
    assert!(
        results.iter().all(Result::is_ok),
        "leases of a dead holder while its slot is reclaimed: {results:?}"
    );
}
