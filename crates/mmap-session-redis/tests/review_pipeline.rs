//! A review of pipelined hand-overs (a run's writes sent one at a time by `Chain`, a request
//! answering once its write or a later one is confirmed): faults on the writes of a run (held,
//! replies lost, connections cut, time-outs), the lease lapsing mid-run, requests dropped at their
//! await points, non-final writes and releases on a handed-over lease, two processes with runs on
//! one session, and the bound on a run (`KEEP_RUN`) with another process waiting.
//!
//! The promise under test: a request that answered OK has its changes in Redis, no later write is
//! overwritten by an older one, no session is left stuck, and a failed write is never reported as
//! success.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{bounded, in_an_hour, set_up, soon};
use mmap_session::{BackendError, BackendLease as _, SessionBackend as _};
use mmap_session_redis::fault_proxy::{Fault, FaultProxy, RuleHandle};
use mmap_session_redis::test_server::{script_sha1, RedisServer};
use mmap_session_redis::{RedisBackend, RedisLease};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const LIMIT: Duration = Duration::from_secs(60);

/// The default key prefix of the backend.
const PREFIX: &str = "mmap-session:";

/// The Redis name of the lease of the layer's key `key` (default prefix).
fn lease_key(key: &[u8]) -> String {
    format!("{PREFIX}{{{}}}:lease", blake3::hash(key).to_hex())
}

fn sha(name: &str) -> String {
    script_sha1(name).unwrap()
}

/// A rule on the next `times` runs of the script `name`.
fn on(proxy: &FaultProxy, fault: Fault, times: usize, name: &str) -> RuleHandle {
    proxy.on_script(fault, times, &sha(name))
}

/// How many scripts Redis ran (`INFO commandstats`).
fn evalsha_calls(server: &RedisServer) -> u64 {
    let info = server.raw_command("INFO commandstats").unwrap();
    String::from_utf8_lossy(&info)
        .lines()
        .find_map(|line| line.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// Waits until Redis ran a script since it had run `before`.
async fn ran_since(server: &RedisServer, before: u64) {
    while evalsha_calls(server) == before {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What `key` holds in Redis, as text ("" when absent); tried again while the backend
/// reconnects (after a fault cut its connections).
async fn stored(backend: &RedisBackend, key: &[u8]) -> String {
    let record = loop {
        match backend.get_unleased(key).await {
            Err(BackendError::Unavailable(_)) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => break other.unwrap(),
        }
    };
    String::from_utf8(record.map(|record| record.value).unwrap_or_default()).unwrap()
}

/// The counter under `lease` (0 when absent).
async fn load(lease: &mut RedisLease) -> u64 {
    match lease.load().await.unwrap() {
        Some(record) => String::from_utf8(record.value).unwrap().parse().unwrap(),
        None => 0,
    }
}

/// A request that increments the counter in `key`: takes the lease (waiting its turn), sends
/// the value it loaded on `loaded`, and writes the next one.
fn increment(
    backend: &RedisBackend,
    key: &'static [u8],
    loaded: mpsc::UnboundedSender<u64>,
) -> JoinHandle<Result<(), BackendError>> {
    let backend = backend.clone();
    tokio::spawn(async move {
        let mut lease = backend.lease(key, soon(30_000)).await?;
        let n = load(&mut lease).await;
        let _ = loaded.send(n);
        lease
            .commit_and_release((n + 1).to_string().as_bytes(), in_an_hour())
            .await
    })
}

/// A request that takes the lease of `key` (waiting its turn) and gives it to the test.
fn take(backend: &RedisBackend, key: &'static [u8]) -> JoinHandle<RedisLease> {
    let backend = backend.clone();
    tokio::spawn(async move { backend.lease(key, soon(30_000)).await.unwrap() })
}

/// Waits for the next value a request loaded.
async fn next_loaded(loaded: &mut mpsc::UnboundedReceiver<u64>) -> u64 {
    tokio::time::timeout(Duration::from_secs(10), loaded.recv())
        .await
        .expect("no request loaded the session in time")
        .unwrap()
}

/// Lets the tasks spawned so far run up to their first wait (their turns are taken in order).
async fn settle() {
    for _ in 0..3 {
        tokio::task::yield_now().await;
    }
}

/// Takes the lease of `key` within `within` (tried again while the backend reconnects).
async fn lease_within(backend: &RedisBackend, key: &[u8], within: u64) -> RedisLease {
    let deadline = soon(within);
    loop {
        match backend.lease(key, deadline).await {
            Err(BackendError::Unavailable(_)) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other.expect("the session was left held"),
        }
    }
}

/// The session is free: a lease is taken at once.
async fn assert_free(backend: &RedisBackend, key: &[u8]) {
    lease_within(backend, key, 1_000).await.release().await;
}

/// Write W3 (started by R3) is confirmed; the run's next write, W5 (ending it, with W4 in it),
/// then fails. R3's changes are in Redis, so R3 is answered OK: the outcome recorded for its
/// write decides, not the failure of a later write (it was once answered an error).
#[tokio::test(flavor = "current_thread")]
async fn a_confirmed_write_is_not_reported_failed_because_a_later_one_failed() {
    bounded(LIMIT, async {
        let (server, proxy, backend) = set_up(|config| config).await;
        let holds: Vec<RuleHandle> = (0..2)
            .map(|_| on(&proxy, Fault::Hold, 1, "commit_keep"))
            .chain([on(&proxy, Fault::Hold, 1, "commit_release")])
            .collect();
        let r1 = backend.lease(b"k", soon(1_000)).await.unwrap();
        let (sender, mut loaded) = mpsc::unbounded_channel();
        let r2 = increment(&backend, b"k", sender.clone());
        settle().await;
        let r3 = increment(&backend, b"k", sender.clone());
        settle().await;
        let r4 = take(&backend, b"k");
        settle().await;
        let r5 = increment(&backend, b"k", sender.clone());
        settle().await;
        let r1 = tokio::spawn(r1.commit_and_release(b"1", in_an_hour()));
        // W1 held; R2 and R3 queue W2 then W3 (which replaces it), R4 holds the lease.
        holds[0].matched(1).await;
        assert_eq!(next_loaded(&mut loaded).await, 1);
        assert_eq!(next_loaded(&mut loaded).await, 2);
        let mut r4 = r4.await.unwrap();
        assert_eq!(load(&mut r4).await, 3);
        holds[0].open();
        r1.await.unwrap().unwrap();
        // W3 goes next (it replaced W2), held.
        holds[1].matched(1).await;
        let r4 = tokio::spawn(r4.commit_and_release(b"4", in_an_hour()));
        // R4 queued W4 and handed over to R5, which ends the run behind it.
        assert_eq!(next_loaded(&mut loaded).await, 4);
        holds[1].open();
        r2.await.unwrap().unwrap();
        // W3 is confirmed; R5's end sends its own write in place of W4, with the release (held);
        // the lease is lost meanwhile.
        holds[2].matched(1).await;
        server
            .raw_command(&format!("DEL {}", lease_key(b"k")))
            .unwrap();
        holds[2].open();
        assert!(r4.await.unwrap().is_err());
        assert!(r5.await.unwrap().is_err());
        assert_eq!(stored(&backend, b"k").await, "3", "W3 was written");
        let r3 = r3.await.unwrap();
        assert!(
            r3.is_ok(),
            "R3's write is in Redis (confirmed), yet R3 answered {r3:?}"
        );
    })
    .await;
}

/// A write held past the command time-out fails the run; the session goes to another process,
/// which writes; then the held write reaches Redis: it must write nothing.
#[tokio::test(flavor = "current_thread")]
async fn a_timed_out_write_that_lands_late_overwrites_nothing() {
    bounded(LIMIT, async {
        let (server, proxy, backend) =
            set_up(|config| config.command_timeout(Duration::from_millis(400))).await;
        let other = RedisBackend::connect(&server.url()).await.unwrap();
        let hold = on(&proxy, Fault::Hold, 1, "commit_keep");
        let r1 = backend.lease(b"k", soon(1_000)).await.unwrap();
        let (sender, mut loaded) = mpsc::unbounded_channel();
        let r2 = increment(&backend, b"k", sender.clone());
        settle().await;
        let r3 = increment(&backend, b"k", sender.clone());
        settle().await;
        let r1 = tokio::spawn(r1.commit_and_release(b"1", in_an_hour()));
        hold.matched(1).await;
        assert_eq!(next_loaded(&mut loaded).await, 1);
        assert_eq!(next_loaded(&mut loaded).await, 2);
        // W1 times out: every request of the run fails.
        assert!(r1.await.unwrap().is_err());
        assert!(r2.await.unwrap().is_err());
        assert!(r3.await.unwrap().is_err());
        // Another process takes the session and writes.
        let mut lease = other.lease(b"k", soon(10_000)).await.unwrap();
        assert_eq!(
            load(&mut lease).await,
            0,
            "nothing of the failed run was written"
        );
        lease
            .commit_and_release(b"100", in_an_hour())
            .await
            .unwrap();
        // The held write reaches Redis now (the client may have closed its connection: the
        // proxy forwards it all the same).
        let before = evalsha_calls(&server);
        hold.open();
        ran_since(&server, before).await;
        assert_eq!(stored(&backend, b"k").await, "100");
        assert_free(&backend, b"k").await;
        assert_free(&other, b"k").await;
    })
    .await;
}

/// Replies lost (the script ran, the connection cut before its answer) and connections cut with
/// a write in flight, on the writes of a run and on its end: each is sent again, in order, and
/// every request answers OK with its increment in Redis.
#[tokio::test(flavor = "current_thread")]
async fn writes_of_a_run_whose_replies_are_lost_are_sent_again_in_order() {
    bounded(LIMIT, async {
        let (_server, proxy, backend) = set_up(|config| config).await;
        let hold = on(&proxy, Fault::Hold, 1, "commit_keep");
        let dropped = on(&proxy, Fault::DropReply, 1, "commit_keep");
        // One clean send between the faults: two breaks in a row under one write (the writes of a
        // run go out as one when they queue behind a held one) may exhaust its sends.
        let _clean = on(&proxy, Fault::Observe, 1, "commit_keep");
        let cut = on(&proxy, Fault::CutAfter, 1, "commit_keep");
        let end = on(&proxy, Fault::DropReply, 1, "commit_release");
        let r1 = backend.lease(b"k", soon(1_000)).await.unwrap();
        let (sender, mut loaded) = mpsc::unbounded_channel();
        let mut requests = Vec::new();
        for _ in 0..3 {
            requests.push(increment(&backend, b"k", sender.clone()));
            settle().await;
        }
        let r1 = tokio::spawn(r1.commit_and_release(b"1", in_an_hour()));
        hold.matched(1).await;
        for expected in 1..=3 {
            assert_eq!(next_loaded(&mut loaded).await, expected);
        }
        // Three more arrive while W1 is held: a second run segment behind it.
        let r4 = take(&backend, b"k");
        settle().await;
        for _ in 0..3 {
            requests.push(increment(&backend, b"k", sender.clone()));
            settle().await;
        }
        hold.open();
        r1.await.unwrap().unwrap();
        let mut r4 = r4.await.unwrap();
        assert_eq!(load(&mut r4).await, 4);
        r4.commit_and_release(b"5", in_an_hour()).await.unwrap();
        for expected in 5..=7 {
            assert_eq!(next_loaded(&mut loaded).await, expected);
        }
        for request in requests {
            request.await.unwrap().unwrap();
        }
        assert_eq!(stored(&backend, b"k").await, "8");
        assert!(dropped.matched_count() + cut.matched_count() + end.matched_count() >= 2);
        assert_free(&backend, b"k").await;
    })
    .await;
}

/// Every connection cut while a write of a run is held (the held command never reaches Redis):
/// whatever the requests answer, each one that answered OK has its increment in Redis, and the
/// session is not left stuck.
#[tokio::test(flavor = "current_thread")]
async fn connections_cut_under_a_held_write_lose_no_answered_update() {
    bounded(LIMIT, async {
        let (_server, proxy, backend) = set_up(|config| config).await;
        let hold = on(&proxy, Fault::Hold, 1, "commit_keep");
        let r1 = backend.lease(b"k", soon(1_000)).await.unwrap();
        let (sender, mut loaded) = mpsc::unbounded_channel();
        let mut requests = Vec::new();
        for _ in 0..3 {
            requests.push(increment(&backend, b"k", sender.clone()));
            settle().await;
        }
        let r1 = tokio::spawn(r1.commit_and_release(b"1", in_an_hour()));
        hold.matched(1).await;
        for expected in 1..=3 {
            assert_eq!(next_loaded(&mut loaded).await, expected);
        }
        proxy.cut_all();
        hold.open();
        let mut answers = vec![r1.await.unwrap()];
        for request in requests {
            answers.push(request.await.unwrap());
        }
        // Request i wrote i + 1 (the first wrote 1).
        let highest_ok = answers
            .iter()
            .enumerate()
            .filter(|(_, answer)| answer.is_ok())
            .map(|(i, _)| i as u64 + 1)
            .max()
            .unwrap_or(0);
        // The session comes free (by a release, or by its TTL if none got through).
        lease_within(&backend, b"k", 10_000).await.release().await;
        let now: u64 = stored(&backend, b"k").await.parse().unwrap_or(0);
        assert!(
            now >= highest_ok,
            "a request that wrote {highest_ok} answered OK, Redis holds {now} ({answers:?})"
        );
    })
    .await;
}

/// The lease lapses (its key deleted) while a write of the run is held; another process takes
/// the session and writes: the run fails as a whole, nothing of it overwrites the other process's
/// write, and the session is free afterwards.
#[tokio::test(flavor = "current_thread")]
async fn a_lease_lost_mid_run_fails_the_run_and_keeps_the_other_process_write() {
    bounded(LIMIT, async {
        let (server, proxy, backend) = set_up(|config| config).await;
        let other = RedisBackend::connect(&server.url()).await.unwrap();
        let hold = on(&proxy, Fault::Hold, 1, "commit_keep");
        let r1 = backend.lease(b"k", soon(1_000)).await.unwrap();
        let (sender, mut loaded) = mpsc::unbounded_channel();
        let r2 = increment(&backend, b"k", sender.clone());
        settle().await;
        let r3 = take(&backend, b"k");
        settle().await;
        let r1 = tokio::spawn(r1.commit_and_release(b"1", in_an_hour()));
        hold.matched(1).await;
        assert_eq!(next_loaded(&mut loaded).await, 1);
        let mut r3 = r3.await.unwrap();
        assert_eq!(load(&mut r3).await, 2);
        server
            .raw_command(&format!("DEL {}", lease_key(b"k")))
            .unwrap();
        let mut lease = other.lease(b"k", soon(5_000)).await.unwrap();
        assert_eq!(load(&mut lease).await, 0);
        lease
            .commit_and_release(b"100", in_an_hour())
            .await
            .unwrap();
        hold.open();
        assert!(matches!(r1.await.unwrap(), Err(BackendError::LeaseLost)));
        assert!(matches!(r2.await.unwrap(), Err(BackendError::LeaseLost)));
        // The holder of the failed run: a non-final write, then its end, both fail.
        assert!(r3.commit(b"3", in_an_hour()).await.is_err());
        assert!(r3.commit_and_release(b"3", in_an_hour()).await.is_err());
        assert_eq!(stored(&backend, b"k").await, "100");
        assert_free(&backend, b"k").await;
        assert_free(&other, b"k").await;
    })
    .await;
}

/// A short lease TTL while a write of the run is held for several TTLs: the holder's watchdog
/// keeps the lease (another process cannot take it), and the run succeeds.
#[tokio::test(flavor = "current_thread")]
async fn a_held_write_does_not_let_a_short_lease_lapse_under_its_holder() {
    bounded(LIMIT, async {
        let (server, proxy, backend) =
            set_up(|config| config.lease_ttl(Duration::from_millis(90))).await;
        let other = RedisBackend::connect(&server.url()).await.unwrap();
        let hold = on(&proxy, Fault::Hold, 1, "commit_keep");
        let r1 = backend.lease(b"k", soon(1_000)).await.unwrap();
        let r2 = take(&backend, b"k");
        settle().await;
        let r1 = tokio::spawn(r1.commit_and_release(b"1", in_an_hour()));
        hold.matched(1).await;
        let mut r2 = r2.await.unwrap();
        assert_eq!(load(&mut r2).await, 1);
        // Several lease TTLs pass with the write held: the other process cannot get in.
        let kept = other.lease(b"k", soon(400)).await;
        assert!(
            matches!(kept, Err(BackendError::LeaseTimeout)),
            "the lease lapsed under its holder: {kept:?}"
        );
        hold.open();
        r1.await.unwrap().unwrap();
        r2.commit_and_release(b"2", in_an_hour()).await.unwrap();
        assert_eq!(stored(&backend, b"k").await, "2");
        assert_free(&other, b"k").await;
    })
    .await;
}

/// A handed-over holder that releases without changes while W1 is on its way and W2 is queued:
/// the release waits for them and sends W2 (with it), and the earlier requests answer OK only
/// once their writes are confirmed.
#[tokio::test(flavor = "current_thread")]
async fn a_release_without_changes_sends_the_pending_write_before_it() {
    bounded(LIMIT, async {
        let (_server, proxy, backend) = set_up(|config| config).await;
        let hold = on(&proxy, Fault::Hold, 1, "commit_keep");
        let r1 = backend.lease(b"k", soon(1_000)).await.unwrap();
        let (sender, mut loaded) = mpsc::unbounded_channel();
        let r2 = increment(&backend, b"k", sender.clone());
        settle().await;
        let r3 = take(&backend, b"k");
        settle().await;
        let r1 = tokio::spawn(r1.commit_and_release(b"1", in_an_hour()));
        hold.matched(1).await;
        assert_eq!(next_loaded(&mut loaded).await, 1);
        let mut r3 = r3.await.unwrap();
        assert_eq!(load(&mut r3).await, 2);
        let r3 = tokio::spawn(r3.release());
        settle().await;
        assert!(!r1.is_finished() && !r2.is_finished() && !r3.is_finished());
        assert_eq!(stored(&backend, b"k").await, "", "nothing written yet");
        hold.open();
        r1.await.unwrap().unwrap();
        r2.await.unwrap().unwrap();
        r3.await.unwrap();
        assert_eq!(stored(&backend, b"k").await, "2");
        assert_free(&backend, b"k").await;
    })
    .await;
}

/// Non-final writes on a handed-over lease (commit, remove, commit), then its end (a removal with
/// the release, or a commit): each goes after the write before it, and the last one stands.
#[tokio::test(flavor = "current_thread")]
async fn non_final_writes_on_a_handed_over_lease_go_in_order() {
    bounded(LIMIT, async {
        let (_server, proxy, backend) = set_up(|config| config).await;
        for end_with_removal in [true, false] {
            let hold = on(&proxy, Fault::Hold, 1, "commit_keep");
            let r1 = backend.lease(b"k", soon(1_000)).await.unwrap();
            let r2 = take(&backend, b"k");
            settle().await;
            let r1 = tokio::spawn(r1.commit_and_release(b"1", in_an_hour()));
            hold.matched(1).await;
            let mut r2 = r2.await.unwrap();
            assert_eq!(load(&mut r2).await, 1);
            let r2 = tokio::spawn(async move {
                r2.commit(b"2", in_an_hour()).await?;
                assert_eq!(load(&mut r2).await, 2);
                r2.remove().await?;
                assert_eq!(load(&mut r2).await, 0);
                r2.commit(b"3", in_an_hour()).await?;
                if end_with_removal {
                    r2.remove_and_release().await
                } else {
                    r2.commit_and_release(b"4", in_an_hour()).await
                }
            });
            settle().await;
            assert!(!r1.is_finished() && !r2.is_finished());
            hold.open();
            r1.await.unwrap().unwrap();
            r2.await.unwrap().unwrap();
            let expected = if end_with_removal { "" } else { "4" };
            assert_eq!(stored(&backend, b"k").await, expected);
            assert_free(&backend, b"k").await;
        }
    })
    .await;
}

/// A removal with the release by a handed-over holder while the write before it is on its way,
/// and one that replaces a queued write: the record is gone in the end, and the earlier requests
/// answer OK (their writes were made, then removed).
#[tokio::test(flavor = "current_thread")]
async fn a_removal_ending_a_run_comes_after_the_writes_before_it() {
    bounded(LIMIT, async {
        let (_server, proxy, backend) = set_up(|config| config).await;
        let hold = on(&proxy, Fault::Hold, 1, "commit_keep");
        let r1 = backend.lease(b"k", soon(1_000)).await.unwrap();
        let (sender, mut loaded) = mpsc::unbounded_channel();
        let r2 = increment(&backend, b"k", sender.clone());
        settle().await;
        let r3 = take(&backend, b"k");
        settle().await;
        let r1 = tokio::spawn(r1.commit_and_release(b"1", in_an_hour()));
        hold.matched(1).await;
        assert_eq!(next_loaded(&mut loaded).await, 1);
        let r3 = r3.await.unwrap();
        let r3 = tokio::spawn(r3.remove_and_release());
        settle().await;
        hold.open();
        r1.await.unwrap().unwrap();
        r2.await.unwrap().unwrap();
        r3.await.unwrap().unwrap();
        assert_eq!(stored(&backend, b"k").await, "");
        assert_free(&backend, b"k").await;
    })
    .await;
}

/// Requests dropped at their await points while W1 is held: a waiter that was handed the lease
/// (dropped before using it), a waiter still waiting its turn, and the last holder while it ends
/// the run. The writes already made by others go to Redis, the last holder's own write too (it is
/// sent by a task of its own), and the request after them starts from them.
#[tokio::test(flavor = "current_thread")]
async fn requests_dropped_at_each_await_point_leave_the_run_whole() {
    bounded(LIMIT, async {
        let (_server, proxy, backend) = set_up(|config| config).await;
        let hold = on(&proxy, Fault::Hold, 1, "commit_keep");
        let r1 = backend.lease(b"k", soon(1_000)).await.unwrap();
        let (sender, mut loaded) = mpsc::unbounded_channel();
        // R2 takes the lease and never uses it; R3 is dropped while waiting its turn; R4 counts.
        let r2 = take(&backend, b"k");
        settle().await;
        let r3 = increment(&backend, b"k", sender.clone());
        settle().await;
        let r4 = increment(&backend, b"k", sender.clone());
        settle().await;
        r3.abort();
        settle().await;
        let r1 = tokio::spawn(r1.commit_and_release(b"1", in_an_hour()));
        hold.matched(1).await;
        let mut r2 = r2.await.unwrap();
        assert_eq!(load(&mut r2).await, 1);
        drop(r2);
        settle().await;
        assert!(!r1.is_finished());
        hold.open();
        r1.await.unwrap().unwrap();
        // R4 starts from W1 (taken from Redis once R2's release went after W1).
        assert_eq!(next_loaded(&mut loaded).await, 1);
        r4.await.unwrap().unwrap();
        assert_eq!(stored(&backend, b"k").await, "2");

        // The last holder is dropped while it ends the run behind a held write.
        let hold = on(&proxy, Fault::Hold, 1, "commit_keep");
        let r1 = backend.lease(b"k", soon(1_000)).await.unwrap();
        let r2 = take(&backend, b"k");
        settle().await;
        let r1 = tokio::spawn(r1.commit_and_release(b"3", in_an_hour()));
        hold.matched(1).await;
        let mut r2 = r2.await.unwrap();
        assert_eq!(load(&mut r2).await, 3);
        let r2 = tokio::spawn(r2.commit_and_release(b"4", in_an_hour()));
        settle().await;
        r2.abort();
        assert!(r2.await.unwrap_err().is_cancelled());
        hold.open();
        r1.await.unwrap().unwrap();
        // Its write goes with the release all the same (whether it answered does not matter:
        // nobody was told it failed or succeeded), and the session comes free.
        assert_free(&backend, b"k").await;
        assert_eq!(stored(&backend, b"k").await, "4");
    })
    .await;
}

/// A request with the lease, whose handler needs a while: loads the list of ids in `key`,
/// appends its own, writes it back.
fn append(
    backend: &RedisBackend,
    key: &'static [u8],
    id: String,
) -> JoinHandle<(String, Result<(), BackendError>)> {
    let backend = backend.clone();
    tokio::spawn(async move {
        let result = async {
            let mut lease = backend.lease(key, soon(30_000)).await?;
            let mut list = match lease.load().await? {
                Some(record) => String::from_utf8(record.value).unwrap(),
                None => String::new(),
            };
            tokio::task::yield_now().await;
            list.push_str(&id);
            list.push(',');
            lease
                .commit_and_release(list.as_bytes(), in_an_hour())
                .await
        }
        .await;
        (id, result)
    })
}

/// A rule on every `nth` run of the script `name` (at most three times).
fn every(proxy: &FaultProxy, fault: Fault, nth: usize, name: &str) -> RuleHandle {
    let sha = sha(name).into_bytes();
    let seen = AtomicUsize::new(0);
    proxy.add_rule(fault, 3, move |command| {
        matches!(command, [evalsha, s, ..]
            if evalsha.eq_ignore_ascii_case(b"EVALSHA") && s.eq_ignore_ascii_case(&sha))
            && seen.fetch_add(1, Ordering::SeqCst) % nth == nth - 1
    })
}

/// Two processes, each with 45 requests at once on one session (runs longer than `KEEP_RUN`, so
/// the bound hands the session to the other process), with lost replies and cut connections on
/// one of them: every request that answered OK has its id in the final record, no id is there
/// twice, and nobody waits past the lease wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_with_runs_lose_no_answered_update() {
    bounded(LIMIT, async {
        let (server, proxy, first) = set_up(|config| config).await;
        let second_proxy = FaultProxy::start(server.port()).await.unwrap();
        let second = RedisBackend::connect(&second_proxy.url()).await.unwrap();
        // A fault on every few writes (never on two sends of one write in a row).
        let _faults = [
            every(&proxy, Fault::DropReply, 7, "commit_keep"),
            every(&proxy, Fault::CutAfter, 11, "commit_keep"),
            every(&proxy, Fault::DropReply, 5, "commit_release"),
            every(&second_proxy, Fault::DropReply, 7, "commit_keep"),
        ];
        let mut requests = Vec::new();
        for i in 0..45 {
            requests.push(append(&first, b"k", format!("a{i}")));
            requests.push(append(&second, b"k", format!("b{i}")));
        }
        let mut ok = Vec::new();
        let mut failed = Vec::new();
        for request in requests {
            let (id, result) = request.await.unwrap();
            match result {
                Ok(()) => ok.push(id),
                Err(error) => failed.push((id, error)),
            }
        }
        let list = stored(&first, b"k").await;
        let ids: Vec<&str> = list.split(',').filter(|id| !id.is_empty()).collect();
        let unique: HashSet<&str> = ids.iter().copied().collect();
        assert_eq!(unique.len(), ids.len(), "an id written twice: {list}");
        let lost: Vec<&String> = ok
            .iter()
            .filter(|id| !unique.contains(id.as_str()))
            .collect();
        assert!(lost.is_empty(), "answered OK, not in Redis: {lost:?}");
        assert!(
            failed.is_empty(),
            "requests failed under replayable faults: {failed:?}"
        );
        assert_free(&first, b"k").await;
        assert_free(&second, b"k").await;
    })
    .await;
}

/// A run reaching `KEEP_RUN` hand-overs with a request of another process waiting: the 33rd
/// request's write releases the lease to it (the other process comes in after exactly 33
/// increments), and the rest of the first process's requests follow; every request answers OK.
#[tokio::test(flavor = "current_thread")]
async fn the_keep_run_bound_lets_the_waiting_process_in_after_33_writes() {
    bounded(LIMIT, async {
        let (server, proxy, backend) = set_up(|config| config).await;
        let other_proxy = FaultProxy::start(server.port()).await.unwrap();
        let other = RedisBackend::connect(&other_proxy.url()).await.unwrap();
        let hold = on(&proxy, Fault::Hold, 1, "commit_keep");
        let r1 = backend.lease(b"k", soon(1_000)).await.unwrap();
        let (sender, mut loaded) = mpsc::unbounded_channel();
        let mut requests = Vec::new();
        for _ in 0..39 {
            requests.push(increment(&backend, b"k", sender.clone()));
            settle().await;
        }
        let r1 = tokio::spawn(r1.commit_and_release(b"1", in_an_hour()));
        hold.matched(1).await;
        // 32 hand-overs at once while W1 is held; the 33rd holder waits for its own write.
        for expected in 1..=32 {
            assert_eq!(next_loaded(&mut loaded).await, expected);
        }
        let tries = other_proxy.on_script(Fault::Observe, usize::MAX, &sha("acquire"));
        let waiter = tokio::spawn(async move {
            let mut lease = other.lease(b"k", soon(20_000)).await.unwrap();
            let n = load(&mut lease).await;
            lease
                .commit_and_release((n + 1).to_string().as_bytes(), in_an_hour())
                .await
                .unwrap();
            n
        });
        // Found held, subscribed, found held again: queued in Redis.
        tries.completed(2).await;
        hold.open();
        r1.await.unwrap().unwrap();
        assert_eq!(
            waiter.await.unwrap(),
            33,
            "the other process came in after 33"
        );
        for request in requests {
            request.await.unwrap().unwrap();
        }
        assert_eq!(stored(&backend, b"k").await, "41");
        assert_free(&backend, b"k").await;
    })
    .await;
}
