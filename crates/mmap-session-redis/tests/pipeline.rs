//! Hand-overs within a process while the write before is on its way: the next request of the
//! process starts from the record just written without waiting for its round trip, the writes of
//! a run go to Redis one at a time and in order (those queued meanwhile as one), a request answers
//! only once its write or a later one is confirmed, and a write that fails fails every request
//! that started from it. Driven through the fault proxy, which holds a write on its way.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{bounded, in_an_hour, set_up, soon};
use mmap_session::{BackendError, BackendLease as _, SessionBackend as _};
use mmap_session_redis::fault_proxy::{Fault, FaultProxy, RuleHandle};
use mmap_session_redis::test_server::script_sha1;
use mmap_session_redis::RedisBackend;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const LIMIT: Duration = Duration::from_secs(60);

/// Rules that count the commits of each kind (after any rule added before them).
fn count_writes(proxy: &FaultProxy) -> [RuleHandle; 2] {
    ["commit_keep", "commit_release"]
        .map(|name| proxy.on_script(Fault::Observe, usize::MAX, &script_sha1(name).unwrap()))
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
        let n: u64 = match lease.load().await? {
            Some(record) => String::from_utf8(record.value).unwrap().parse().unwrap(),
            None => 0,
        };
        loaded.send(n).unwrap();
        lease
            .commit_and_release((n + 1).to_string().as_bytes(), in_an_hour())
            .await
    })
}

/// Waits for the next value a request loaded, failing the test if none comes in `within`.
async fn next_loaded(loaded: &mut mpsc::UnboundedReceiver<u64>, within: Duration) -> u64 {
    tokio::time::timeout(within, loaded.recv())
        .await
        .expect("no request loaded the session while the write before it was on its way")
        .unwrap()
}

fn value(record: Option<mmap_session::StoredRecord>) -> Vec<u8> {
    record.map(|record| record.value).unwrap_or_default()
}

#[tokio::test(flavor = "current_thread")]
async fn the_next_request_starts_while_the_write_before_it_is_on_its_way() {
    bounded(LIMIT, async {
        let (_server, proxy, backend) = set_up(|config| config).await;
        // The first write of the run is held on its way; every later one passes.
        let hold = proxy.on_script(Fault::Hold, 1, &script_sha1("commit_keep").unwrap());
        let writes = count_writes(&proxy);
        let first = backend.lease(b"k", soon(1000)).await.unwrap();
        let (sender, mut loaded) = mpsc::unbounded_channel();
        // Four more requests of this process, waiting their turns in this order.
        let mut requests = Vec::new();
        for _ in 0..4 {
            requests.push(increment(&backend, b"k", sender.clone()));
            tokio::task::yield_now().await;
        }
        let first = tokio::spawn(first.commit_and_release(b"1", in_an_hour()));
        hold.matched(1).await;
        // While a write is held, each request loads what the one before it wrote.
        for expected in 1..=4 {
            assert_eq!(
                next_loaded(&mut loaded, Duration::from_secs(10)).await,
                expected
            );
        }
        assert!(
            !first.is_finished(),
            "the first request answered before its write was confirmed"
        );
        hold.open();
        first.await.unwrap().unwrap();
        for request in requests {
            request.await.unwrap().unwrap();
        }
        assert_eq!(value(backend.get_unleased(b"k").await.unwrap()), b"5");
        // Five requests, fewer writes: the held one, at most one for the writes queued behind
        // it (the latest holds the others' changes), and the last request's with the release.
        let sent =
            hold.matched_count() + writes.iter().map(RuleHandle::matched_count).sum::<usize>();
        assert!(sent <= 3, "{sent} writes for 5 requests");
        // The run ended with a release: the lease is free.
        let free = backend.lease(b"k", soon(300)).await.unwrap();
        free.release().await;
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_write_that_fails_fails_every_request_that_started_from_it() {
    bounded(LIMIT, async {
        let (server, proxy, backend) = set_up(|config| config).await;
        let start = backend.lease(b"k", soon(1000)).await.unwrap();
        start.commit_and_release(b"10", in_an_hour()).await.unwrap();
        let hold = proxy.on_script(Fault::Hold, 1, &script_sha1("commit_keep").unwrap());
        let first = backend.lease(b"k", soon(1000)).await.unwrap();
        let (sender, mut loaded) = mpsc::unbounded_channel();
        let mut requests = Vec::new();
        for _ in 0..3 {
            requests.push(increment(&backend, b"k", sender.clone()));
            tokio::task::yield_now().await;
        }
        let first = tokio::spawn(first.commit_and_release(b"11", in_an_hour()));
        hold.matched(1).await;
        for expected in 11..=13 {
            assert_eq!(
                next_loaded(&mut loaded, Duration::from_secs(10)).await,
                expected
            );
        }
        // The lease is lost while the write is on its way (as if it had lapsed and been taken).
        let lease_keys = server.raw_command("KEYS *:lease").unwrap();
        let lease_key = String::from_utf8(lease_keys)
            .unwrap()
            .lines()
            .find(|line| line.ends_with(":lease"))
            .expect("the held lease's key")
            .to_owned();
        server.raw_command(&format!("DEL {lease_key}")).unwrap();
        hold.open();
        assert!(matches!(first.await.unwrap(), Err(BackendError::LeaseLost)));
        for request in requests {
            assert!(matches!(
                request.await.unwrap(),
                Err(BackendError::LeaseLost)
            ));
        }
        // Nothing of the run was written, and the session is free at once.
        assert_eq!(value(backend.get_unleased(b"k").await.unwrap()), b"10");
        let free = backend.lease(b"k", soon(300)).await.unwrap();
        free.release().await;
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_request_that_goes_away_while_its_write_is_on_its_way_leaves_the_run_whole() {
    bounded(LIMIT, async {
        let (_server, proxy, backend) = set_up(|config| config).await;
        let hold = proxy.on_script(Fault::Hold, 1, &script_sha1("commit_keep").unwrap());
        let first = backend.lease(b"k", soon(1000)).await.unwrap();
        let (sender, mut loaded) = mpsc::unbounded_channel();
        let mut requests = Vec::new();
        for _ in 0..3 {
            requests.push(increment(&backend, b"k", sender.clone()));
            tokio::task::yield_now().await;
        }
        let first = tokio::spawn(first.commit_and_release(b"1", in_an_hour()));
        hold.matched(1).await;
        for expected in 1..=3 {
            assert_eq!(
                next_loaded(&mut loaded, Duration::from_secs(10)).await,
                expected
            );
        }
        // The first request and the second go away (their clients hung up) while the first
        // write is held and the second's is queued behind it.
        first.abort();
        requests[0].abort();
        tokio::task::yield_now().await;
        hold.open();
        for request in requests.drain(1..) {
            request.await.unwrap().unwrap();
        }
        // Their writes went to Redis all the same (the later requests started from them).
        assert_eq!(value(backend.get_unleased(b"k").await.unwrap()), b"4");
        let free = backend.lease(b"k", soon(300)).await.unwrap();
        free.release().await;
    })
    .await;
}
