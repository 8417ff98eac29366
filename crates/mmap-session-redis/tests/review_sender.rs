//! A review of the task that sends a run's queued writes (`Chain::queue` starts it when none runs,
//! it loops over `Chain::next_to_send` under the run's sending lock, and requests wait for their
//! write's outcome with `Chain::settled`): concurrent requests of two processes on a
//! multi-thread runtime, mid-request writes queued on a run, requests dropped mid-run, and the
//! sender task dropped with the runtime it was spawned on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{bounded, in_an_hour, soon};
use mmap_session::{BackendError, BackendLease as _, SessionBackend as _};
use mmap_session_redis::test_server::RedisServer;
use mmap_session_redis::{RedisBackend, RedisLease};
use tokio::sync::oneshot;

const LIMIT: Duration = Duration::from_secs(120);

/// How long one request may take at most, its wait for the lease included.
const REQUEST_BOUND: Duration = Duration::from_secs(30);

/// The counter under `lease` (0 when absent).
/// Waits until `done` says so (checked every millisecond, for 10 s at most): an ordering of
/// requests the test needs, waited for rather than slept for.
async fn until(what: &str, done: impl Fn() -> bool) {
    let limit = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(
            tokio::time::Instant::now() < limit,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn load(lease: &mut RedisLease) -> u64 {
    match lease.load().await.unwrap() {
        Some(record) => String::from_utf8(record.value).unwrap().parse().unwrap(),
        None => 0,
    }
}

/// What `key` holds in Redis, as a counter (0 when absent).
async fn stored(backend: &RedisBackend, key: &[u8]) -> u64 {
    backend
        .get_unleased(key)
        .await
        .unwrap()
        .map_or(0, |record| {
            String::from_utf8(record.value).unwrap().parse().unwrap()
        })
}

/// One counting request, shaped by `shape` (0: load and commit-and-release; 1: a mid-request
/// commit of the next value first; 2: two mid-request commits, the first of a wrong value the
/// second corrects): the value it loaded, and whether every write of it answered OK.
async fn count_once(backend: &RedisBackend, key: &'static [u8], shape: usize) -> (u64, bool) {
    let mut lease = backend.lease(key, soon(25_000)).await.unwrap();
    let n = load(&mut lease).await;
    let next = (n + 1).to_string();
    let mut ok = true;
    if shape >= 2 {
        ok &= lease.commit(b"999999", in_an_hour()).await.is_ok();
        tokio::task::yield_now().await;
    }
    if shape >= 1 {
        ok &= lease.commit(next.as_bytes(), in_an_hour()).await.is_ok();
        tokio::task::yield_now().await;
    }
    ok &= lease
        .commit_and_release(next.as_bytes(), in_an_hour())
        .await
        .is_ok();
    (n, ok)
}

/// Many requests of two processes on one session, on two worker threads: runs of hand-overs in
/// each process (past `KEEP_RUN`, with the other process waiting), mid-request writes queued on
/// the runs, every request bounded. Every request answers OK, no two load the same value, and
/// the counter ends at the number of requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_count_exactly_on_two_threads() {
    bounded(LIMIT, async {
        let server = RedisServer::start().unwrap();
        let backends = [
            RedisBackend::connect(&server.url()).await.unwrap(),
            RedisBackend::connect(&server.url()).await.unwrap(),
        ];
        const PER_BACKEND: usize = 80;
        let mut tasks = Vec::new();
        for i in 0..PER_BACKEND * 2 {
            let backend = backends[i % 2].clone();
            tasks.push(tokio::spawn(async move {
                tokio::time::timeout(REQUEST_BOUND, count_once(&backend, b"k", i % 3))
                    .await
                    .unwrap_or_else(|_| panic!("request {i} did not finish in time"))
            }));
        }
        let mut seen = HashSet::new();
        let mut oks = 0;
        for task in tasks {
            let (n, ok) = task.await.unwrap();
            assert!(ok, "a request failed although nothing went wrong");
            assert!(
                seen.insert(n),
                "two requests loaded {n}: an update was lost"
            );
            oks += 1;
        }
        assert_eq!(stored(&backends[0], b"k").await, oks);
        // Nothing is left held.
        for backend in &backends {
            backend
                .lease(b"k", soon(1_000))
                .await
                .expect("the session was left held")
                .release()
                .await;
        }
    })
    .await;
}

/// As above, with some requests dropped at a random point (a short time-out around the whole
/// request): no request that answered OK lost its update, every request ends in time, and the
/// session is free at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_dropped_mid_run_leave_nothing_stuck_on_two_threads() {
    bounded(LIMIT, async {
        let server = RedisServer::start().unwrap();
        let backends = [
            RedisBackend::connect(&server.url()).await.unwrap(),
            RedisBackend::connect(&server.url()).await.unwrap(),
        ];
        let answered = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..120_usize {
            let backend = backends[i % 2].clone();
            let answered = Arc::clone(&answered);
            tasks.push(tokio::spawn(async move {
                // Every fifth request is dropped after a few milliseconds, wherever it is.
                let bound = if i % 5 == 4 {
                    Duration::from_millis(1 + (i as u64 * 7) % 13)
                } else {
                    REQUEST_BOUND
                };
                let request = async {
                    let mut lease = backend.lease(b"k", soon(25_000)).await?;
                    let n = load(&mut lease).await;
                    if i % 3 == 1 {
                        lease
                            .commit((n + 1).to_string().as_bytes(), in_an_hour())
                            .await?;
                    }
                    lease
                        .commit_and_release((n + 1).to_string().as_bytes(), in_an_hour())
                        .await?;
                    Ok::<u64, BackendError>(n)
                };
                match tokio::time::timeout(bound, request).await {
                    Ok(Ok(n)) => answered.lock().unwrap().push(n),
                    Ok(Err(error)) => {
                        // A request of a run that a dropped one ended may fail; it must not hang.
                        eprintln!("request {i}: {error}");
                    }
                    Err(_) => assert!(i % 5 == 4, "request {i} did not finish in time"),
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let answered = answered.lock().unwrap().clone();
        let distinct: HashSet<u64> = answered.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            answered.len(),
            "two OK requests loaded one value"
        );
        let last = stored(&backends[0], b"k").await;
        assert!(
            last >= answered.len() as u64,
            "the counter {last} is below the {} OK answers",
            answered.len()
        );
        for backend in &backends {
            let lease =
                tokio::time::timeout(Duration::from_secs(15), backend.lease(b"k", soon(10_000)))
                    .await
                    .expect("the session was left held")
                    .expect("the session was left held");
            lease.release().await;
        }
    })
    .await;
}

/// The task that sends a run's writes is spawned on the runtime of the request whose write found
/// none running. If that runtime shuts down before the task is first polled, the task's future
/// is dropped unresumed. When its `Unfinished` guard was created inside the future, it never
/// existed then, so the run was not failed, and `State::sender` stayed `true` with no task: a
/// later request of the run, on another runtime, queued a write, was told a sender runs (it did
/// not start one) and waited in `settled` for ever.
///
/// Interleaving: R1 (test runtime) hands over to R2 (runtime A, in a thread of its own); R1's
/// sender sends W1 and ends. R3 (test runtime) waits. R2 commits and hands over: W2 is queued
/// (`queue` says start), the sender is spawned on A, and the lease goes to R3; R2's future is
/// dropped before A runs anything else and A is dropped (its unpolled tasks with it). R3 then
/// commits mid-request: W3 replaces W2, `queue` says a sender runs, and nobody ever sends it.
///
/// The guard is now made before the spawn and moved into the task, so dropping the unresumed
/// future drops it too and fails the run: R3 gets an error instead of waiting for ever.
#[tokio::test(flavor = "current_thread")]
async fn a_sender_dropped_unpolled_with_its_runtime_does_not_strand_the_run() {
    bounded(LIMIT, async {
        let server = RedisServer::start().unwrap();
        let backend = RedisBackend::connect(&server.url()).await.unwrap();
        let r1 = backend.lease(b"k", soon(5_000)).await.unwrap();

        let (got_tx, got_rx) = oneshot::channel::<()>();
        let (go_tx, go_rx) = oneshot::channel::<()>();
        let (done_tx, done_rx) = oneshot::channel::<()>();
        let thread = {
            let backend = backend.clone();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let r2 = backend.lease(b"k", soon(10_000)).await.unwrap();
                    got_tx.send(()).unwrap();
                    go_rx.await.unwrap();
                    // One poll: W2 queued (its sender spawned here), the lease handed to R3; then
                    // the request goes away before this runtime runs the sender.
                    let mut commit = std::pin::pin!(r2.commit_and_release(b"2", in_an_hour()));
                    tokio::select! {
                        biased;
                        _ = &mut commit => panic!("R2 answered before its write was sent"),
                        () = std::future::ready(()) => {}
                    }
                });
                drop(runtime);
                done_tx.send(()).unwrap();
            })
        };
        until("R2 waits for its turn behind R1", || {
            backend.requests_waiting_for_turn(b"k") == 1
        })
        .await;
        r1.commit_and_release(b"1", in_an_hour()).await.unwrap();
        got_rx.await.unwrap();
        until(
            "R1's sender has sent W1 and ended (nothing more queued)",
            || backend.write_senders_running() == 0,
        )
        .await;
        let r3 = {
            let backend = backend.clone();
            tokio::spawn(async move { backend.lease(b"k", soon(10_000)).await.unwrap() })
        };
        until("R3 waits for its turn behind R2", || {
            backend.requests_waiting_for_turn(b"k") == 1
        })
        .await;
        go_tx.send(()).unwrap();
        done_rx.await.unwrap();
        thread.join().unwrap();
        let mut r3 = r3.await.unwrap();
        // The run failed when the unpolled sender was dropped: if that came before R3's turn, R3
        // was not handed the lease with W2 in it but took it from Redis, which holds W1.
        let loaded = load(&mut r3).await;
        assert!(loaded == 1 || loaded == 2, "R3 loaded {loaded}");
        let commit = tokio::time::timeout(Duration::from_secs(5), r3.commit(b"3", in_an_hour()))
            .await
            .expect("R3's mid-request write was never sent: it waits in `settled` forever");
        // Either outcome is fine (W2's request went away); not answering is not.
        drop(commit);
        r3.commit_and_release(b"4", in_an_hour()).await.ok();
    })
    .await;
}
