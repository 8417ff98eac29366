//! One test per defect found by the review of the store's promise: each forces the exact
//! interleaving with failpoints (in this process, or in a `fault-child` process), and checks
//! that no acknowledged commit is lost or hidden.
//!
//! Failpoints are process-wide: a test that configures one stops the first thread of any test
//! that passes it, so every test of this file holds `serial()` first.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use mmap_session_store::{OpenError, Options, Store, StoreError};
use mmap_session_store_faults::{
    later, lease_and_commit, no_child_starts, options, serial, stop_once, value, Child,
};

const LONG: Duration = Duration::from_secs(60);
const SHORT: Duration = Duration::from_millis(200);
const WAIT: Duration = Duration::from_secs(5);

/// Waits until `key`'s record has expired (its expiry is a few milliseconds away).
fn until_expired(store: &Store, key: &str) {
    let start = Instant::now();
    while store.get(key.as_bytes()).is_some() {
        assert!(start.elapsed() < WAIT, "{key} never expired");
        std::thread::yield_now();
    }
}

fn assert_clean_after_solo_reopen(path: &std::path::Path, expect: &[(&str, &str)]) {
    let quiet = no_child_starts();
    let store = Store::open_with(path, options(LONG)).unwrap();
    drop(quiet);
    let report = store.verify();
    assert!(report.is_clean(), "verify: {:?}", report.problems);
    assert_eq!(report.leaked_blocks, 0, "leaked blocks: {report:?}");
    for (k, v) in expect {
        assert_eq!(
            value(&store, k).as_deref(),
            Some(*v),
            "{k} after a solo reopen"
        );
    }
}

/// Defect 1: a process killed between reserving space and publishing the file's new length
/// left the file longer than the header says; a process that opened afterwards used that space
/// without ever publishing it, and processes that had opened before could not see the sessions
/// committed there.
#[test]
fn a_growth_killed_before_publishing_hides_no_session() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let old = Store::open_with(&path, options(LONG)).unwrap();
    let mut child = Child::open(&path, LONG);
    child.arm("grow.reserved");
    child.send("commit grower g 3600000");
    child.wait_at("grow.reserved");
    child.kill();

    let new = Store::open_with(&path, options(LONG)).unwrap();
    lease_and_commit(&new, "by-new", &[None], "n1", WAIT);
    assert_eq!(
        value(&old, "by-new").as_deref(),
        Some("n1"),
        "the old opener"
    );
    lease_and_commit(&old, "by-old", &[None], "o1", WAIT);
    assert_eq!(
        value(&new, "by-old").as_deref(),
        Some("o1"),
        "the new opener"
    );
    assert_eq!(value(&old, "by-new").as_deref(), Some("n1"));
    drop((old, new));
    assert_clean_after_solo_reopen(&path, &[("by-new", "n1"), ("by-old", "o1")]);
}

/// Defect 2: `remove_idle` compare-and-swapped a state word it had read earlier; two commits of
/// the key could bring the same block back (the free list is last in, first out), and the
/// removal then deleted the new, unexpired record.
#[test]
fn removing_an_idle_record_never_deletes_a_later_commit_in_the_same_block() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_with(dir.path().join("store"), options(LONG)).unwrap();
    let mut lease = store.lease_blocking(b"k", Instant::now() + WAIT).unwrap();
    lease
        .commit(b"v0", SystemTime::now() + Duration::from_millis(30))
        .unwrap();
    drop(lease);
    until_expired(&store, "k");

    let (at, go) = stop_once("evict.remove_idle.before_lease");
    let purger = {
        let store = store.clone();
        std::thread::spawn(move || store.purge_expired())
    };
    at.recv().unwrap();
    // Two commits: the first moves the record to another block, the second brings it back.
    lease_and_commit(&store, "k", &[None], "v1", WAIT);
    lease_and_commit(&store, "k", &[Some("v1")], "v2", WAIT);
    go.send(()).unwrap();
    purger.join().unwrap();
    fail::remove("evict.remove_idle.before_lease");
    assert_eq!(value(&store, "k").as_deref(), Some("v2"));
}

/// Defect 3: an inserter that tagged a new entry and stalled past the lease timeout lost its
/// shard lock and the entry's lease to a successor, which committed; when the stalled inserter
/// went on it vacated the entry's tag anyway, orphaning the successor's acknowledged record.
#[test]
fn a_deposed_inserter_never_vacates_its_successors_entry() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    // One shard (256 sessions -> 1024 entries), so both keys need the same shard lock.
    let slow = Store::open_with(&path, options(LONG)).unwrap();
    let successor = Store::open_with(&path, options(SHORT)).unwrap();

    let (at, go) = stop_once("index.insert.tagged");
    let inserter = std::thread::spawn(move || {
        let mut lease = slow.lease_blocking(b"k", Instant::now() + WAIT)?;
        let read = lease.read().map(|r| String::from_utf8(r.value).unwrap());
        let value = format!("slow-after-{}", read.as_deref().unwrap_or("nothing"));
        lease.commit(value.as_bytes(), later()).map(|()| value)
    });
    at.recv().unwrap();
    // Takes the shard lock over (held past the lease timeout), then the entry's lease.
    lease_and_commit(&successor, "other", &[None], "o", WAIT);
    lease_and_commit(&successor, "k", &[None], "b", WAIT);
    go.send(()).unwrap();
    let slow_result = inserter.join().unwrap();
    fail::remove("index.insert.tagged");

    // The stalled inserter either lost its lease (and wrote nothing) or went on after the
    // successor, in which case it must have read the successor's value.
    let expected = match slow_result {
        Err(StoreError::LeaseLost) => "b".to_owned(),
        Ok(v) => v,
        Err(e) => panic!("the stalled inserter failed with {e}"),
    };
    assert!(expected == "b" || expected == "slow-after-b", "{expected}");
    assert_eq!(value(&successor, "k"), Some(expected.clone()));
    let report = successor.verify();
    assert!(report.is_clean(), "verify: {:?}", report.problems);
    drop(successor);
    assert_clean_after_solo_reopen(&path, &[("k", &expected), ("other", "o")]);
}

/// Defect 4: a task that queued for a key while an internal holder of this process (the
/// expiry sweep, eviction, purge, an insert's clean-up) held it was never woken, because
/// those release the word directly; it waited until its deadline for a free session.
#[test]
fn a_queued_task_is_woken_when_an_internal_holder_releases() {
    let _serial = serial();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(queued_task_is_woken());
}

async fn queued_task_is_woken() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_with(dir.path().join("store"), options(LONG)).unwrap();
    let mut lease = store.lease_blocking(b"k", Instant::now() + WAIT).unwrap();
    lease
        .commit(b"v0", SystemTime::now() + Duration::from_millis(30))
        .unwrap();
    drop(lease);
    until_expired(&store, "k");

    let (at, go) = stop_once("evict.remove_idle.leased");
    let (queued_tx, queued) = mpsc::channel::<()>();
    let queued_tx = Mutex::new(Some(queued_tx));
    fail::cfg_callback("local.enqueued", move || {
        if let Some(tx) = queued_tx.lock().unwrap().take() {
            let _ = tx.send(());
        }
    })
    .unwrap();
    let purger = {
        let store = store.clone();
        std::thread::spawn(move || store.purge_expired())
    };
    at.recv().unwrap();
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move { store.lease(b"k", Instant::now() + WAIT).await.map(drop) })
    };
    tokio::task::spawn_blocking(move || queued.recv().unwrap())
        .await
        .unwrap();
    go.send(()).unwrap();
    purger.join().unwrap();
    let result = waiter.await.unwrap();
    fail::remove("evict.remove_idle.leased");
    fail::remove("local.enqueued");
    assert!(result.is_ok(), "the queued task was not woken: {result:?}");
}

/// Defect 5: chunks never changed size class, so once every chunk was claimed a value of a new
/// size class was refused even by an empty store, after purges and after a solo reopen.
#[test]
fn an_emptied_store_takes_a_value_of_a_new_size_class() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    // Room for three data chunks; values of 300 KiB fill them (three blocks per chunk).
    let opts = || {
        Options::new()
            .max_sessions(256)
            .max_file_size(4 << 20)
            .max_value_len(512 << 10)
    };
    let store = Store::open_with(&path, opts()).unwrap();
    let big = vec![b'x'; 300 << 10];
    // Commit until the store is full: the commit that had to evict a record to find room.
    let mut stored = 0;
    while store.stats().evictions == 0 {
        assert!(stored < 100, "the store never filled up");
        let mut lease = store
            .lease_blocking(format!("big-{stored}").as_bytes(), Instant::now() + WAIT)
            .unwrap();
        lease.commit(&big, later()).unwrap();
        stored += 1;
    }
    assert!(stored >= 3, "stored {stored}");
    for i in 0..stored + 1 {
        let mut lease = store
            .lease_blocking(format!("big-{i}").as_bytes(), Instant::now() + WAIT)
            .unwrap();
        lease.remove().unwrap();
    }
    let small = vec![b's'; 100 << 10];
    let mut lease = store
        .lease_blocking(b"small", Instant::now() + WAIT)
        .unwrap();
    lease
        .commit(&small, later())
        .expect("an empty store refused a value of a new size class");
    lease.remove().unwrap();
    drop(lease);
    drop(store);

    // And after a solo reopen, from a store whose chunks are all claimed and empty.
    let store = Store::open_with(&path, opts()).unwrap();
    let mut lease = store
        .lease_blocking(b"small2", Instant::now() + WAIT)
        .unwrap();
    lease
        .commit(&vec![b't'; 50 << 10], later())
        .expect("an empty store refused a value of a new size class after a reopen");
}

/// Defect 6: the temporary file of a creation was named after the pid and a counter that
/// starts at 0 in every process, and opened with `create_new`: a creator killed mid-creation
/// blocked every later creator with the same pid (pid 1 on every container restart).
#[test]
fn a_creator_killed_mid_creation_blocks_no_later_creator() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    for nonce in 0..4 {
        let stale = dir
            .path()
            .join(format!(".store.{}.{nonce:x}.creating", std::process::id()));
        std::fs::write(&stale, b"left by a creator that was killed").unwrap();
    }
    let store = Store::open(&path).expect("a stale temporary file blocked creation");
    drop(store);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().ends_with(".creating"))
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}

/// Defect 7: a zero lease timeout let a second holder take a live lease at once.
#[test]
fn a_zero_lease_timeout_is_refused() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let result = Store::open_with(
        dir.path().join("store"),
        Options::new().lease_timeout(Duration::ZERO),
    );
    assert!(
        matches!(result, Err(OpenError::InvalidOptions(_))),
        "{result:?}"
    );
}

/// `get` gave up after four reads that a concurrent commit overtook and answered `None` for a
/// key that had a record all along.
#[test]
fn get_reads_on_while_commits_move_the_record() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let store = Store::open_with(&path, options(LONG)).unwrap();
    let writer = Store::open_with(&path, options(LONG)).unwrap();
    lease_and_commit(&writer, "k", &[None], "v0", WAIT);
    let moves = Arc::new(AtomicU32::new(0));
    let busy = Arc::new(AtomicBool::new(false));
    {
        let moves = moves.clone();
        fail::cfg_callback("store.get.copied", move || {
            // Eight commits overtake the reader, one after each of its copies.
            if busy.swap(true, Ordering::SeqCst) {
                return;
            }
            let n = moves.fetch_add(1, Ordering::SeqCst);
            if n < 8 {
                let mut lease = writer.lease_blocking(b"k", Instant::now() + WAIT).unwrap();
                lease
                    .commit(format!("v{}", n + 1).as_bytes(), later())
                    .unwrap();
            }
            busy.store(false, Ordering::SeqCst);
        })
        .unwrap();
    }
    let read = value(&store, "k");
    fail::remove("store.get.copied");
    assert!(read.is_some(), "get answered None for a key with a record");
}

/// A child forked after the store was opened shares its parent's registration (liveness lock,
/// token sequence): its leases would look alive while the parent lives and its tokens would
/// be the parent's. It is refused with a clear error instead.
#[test]
fn a_forked_child_is_told_to_open_the_store_again() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let store = Store::open_with(&path, options(LONG)).unwrap();
    lease_and_commit(&store, "k", &[None], "v0", WAIT);
    let mut child = Child::open(&path, LONG);
    child.send("fork-lease k");
    let answer = child.expect("@forked");
    let result = answer.trim_start_matches("@forked ");
    assert!(
        result.contains("open it again in the child"),
        "the forked child was let in: {result}"
    );
    child.expect("@ok");
    child.ask("commit k v1 3600000", "@ok");
    child.exit();
    assert_eq!(value(&store, "k").as_deref(), Some("v1"));
}

/// Lease tokens carry a 22-bit sequence per process slot. A slot's new owner that issued more
/// than 2^22 tokens made every token of the slot look recent, so a lease left by the slot's
/// dead previous owner was taken for a live holder's: a 30 s stall instead of a take-over.
#[test]
fn a_dead_predecessors_lease_is_taken_over_at_once_after_many_tokens() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let waiter = Store::open_with(&path, options(LONG)).unwrap();
    lease_and_commit(&waiter, "k", &[None], "v0", WAIT);
    let mut child = Child::open(&path, LONG);
    child.ask("hold k", "@held");
    child.kill();
    // The dead child's slot is the lowest free one: this open takes it over.
    let successor = Store::open_with(&path, options(LONG)).unwrap();
    successor.burn_lease_tokens(1 << 22);
    lease_and_commit(&waiter, "k", &[Some("v0")], "v1", Duration::from_secs(3));
    drop(successor);
}
