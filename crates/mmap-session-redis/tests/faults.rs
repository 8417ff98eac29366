//! Network faults between the backend and a real redis-server, injected by a real TCP proxy
//! (`fault_proxy`): a reply lost, a connection cut in the middle of a script, a command held back
//! until the request that sent it has gone. Each test waits for the fault to have happened (the
//! proxy counts what it did) instead of sleeping.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{bounded, in_an_hour, set_up, soon};
use mmap_session::{BackendError, BackendLease as _, SessionBackend as _};
use mmap_session_redis::fault_proxy::Fault;
use mmap_session_redis::test_server::script_sha1;
use mmap_session_redis::RedisBackend;

/// How long any one test of this file may take.
const LIMIT: Duration = Duration::from_secs(60);

fn sha(script: &str) -> String {
    script_sha1(script).expect("a script of the backend")
}

/// The lease of `key` is free: taken at once (well before a lease TTL could run out).
async fn assert_free(backend: &RedisBackend, key: &[u8]) {
    let lease = backend.lease(key, soon(300)).await;
    assert!(lease.is_ok(), "the session was left held: {lease:?}");
    lease.unwrap().release().await;
}

#[tokio::test]
async fn an_acquire_whose_reply_was_lost_is_taken_when_the_client_sends_it_again() {
    bounded(LIMIT, async {
        let (_server, proxy, backend) = set_up(|config| config).await;
        let lost = proxy.on_script(Fault::DropReply, 1, &sha("acquire"));
        // The acquire runs, its reply is lost with the connection, and the client sends it again:
        // the second run must find the lease its own, not held by someone to wait for.
        let mut lease = backend.lease(b"k", soon(3000)).await.unwrap();
        lost.completed(1).await;
        lease.commit(b"v", in_an_hour()).await.unwrap();
        lease.release().await;
        assert_eq!(
            backend.get_unleased(b"k").await.unwrap().unwrap().value,
            b"v"
        );
        assert_free(&backend, b"k").await;
    })
    .await;
}

#[tokio::test]
async fn an_insert_whose_reply_was_lost_is_answered_written_when_the_client_sends_it_again() {
    bounded(LIMIT, async {
        let (_server, proxy, backend) = set_up(|config| config).await;
        // Loaded first, so that the faulty run is the script's and not a NOSCRIPT refusal.
        assert!(backend
            .insert_new(b"other", b"o", in_an_hour(), soon(1000))
            .await
            .unwrap());
        let lost = proxy.on_script(Fault::DropReply, 1, &sha("insert"));
        // The insert writes the record, its reply is lost with the connection, and the client
        // sends it again: the second run finds the bytes of the first and answers "written",
        // not "in use" (which would make the layer draw another id and orphan this record).
        let written = backend
            .insert_new(b"k", b"v", in_an_hour(), soon(3000))
            .await
            .unwrap();
        lost.completed(1).await;
        assert!(written, "the replayed insert said the key was in use");
        assert_eq!(
            backend.get_unleased(b"k").await.unwrap().unwrap().value,
            b"v"
        );
        // The key is in use now: another insert of it writes nothing.
        assert!(!backend
            .insert_new(b"k", b"w", in_an_hour(), soon(1000))
            .await
            .unwrap());
        assert_eq!(
            backend.get_unleased(b"k").await.unwrap().unwrap().value,
            b"v"
        );
        assert_free(&backend, b"k").await;
    })
    .await;
}

#[tokio::test]
async fn an_acquire_cut_off_mid_script_is_taken_when_the_client_sends_it_again() {
    bounded(LIMIT, async {
        let (_server, proxy, backend) = set_up(|config| config).await;
        let cut = proxy.on_script(Fault::CutAfter, 1, &sha("acquire"));
        let mut lease = backend.lease(b"k", soon(3000)).await.unwrap();
        cut.completed(1).await;
        lease.commit(b"v", in_an_hour()).await.unwrap();
        lease.release().await;
        assert_free(&backend, b"k").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_delayed_past_the_release_of_its_cancelled_request_leaves_no_lease() {
    bounded(LIMIT, async {
        let (_server, proxy, backend) = set_up(|config| config).await;
        let held = proxy.on_script(Fault::Hold, 1, &sha("acquire"));
        let released = proxy.on_script(Fault::Observe, 1, &sha("release"));
        let taker = tokio::spawn({
            let backend = backend.clone();
            async move { backend.lease(b"k", soon(30_000)).await.map(drop) }
        });
        // The acquire is on its way (held by the proxy) when its request goes away.
        held.matched(1).await;
        taker.abort();
        assert!(taker.await.unwrap_err().is_cancelled());
        // The request's release, sent on another connection, runs first ...
        released.completed(1).await;
        // ... and then the acquire.
        held.open();
        held.completed(1).await;
        assert_free(&backend, b"k").await;
    })
    .await;
}

#[tokio::test]
async fn a_release_whose_reply_was_lost_still_frees_the_lease() {
    bounded(LIMIT, async {
        let (_server, proxy, backend) = set_up(|config| config).await;
        let lost = proxy.on_script(Fault::DropReply, 1, &sha("release"));
        let mut lease = backend.lease(b"k", soon(1000)).await.unwrap();
        lease.commit(b"v", in_an_hour()).await.unwrap();
        lease.release().await;
        lost.completed(1).await;
        assert_free(&backend, b"k").await;
        assert_eq!(
            backend.get_unleased(b"k").await.unwrap().unwrap().value,
            b"v"
        );
    })
    .await;
}

#[tokio::test]
async fn a_commit_cut_off_mid_script_is_written_once_and_the_lease_kept() {
    bounded(LIMIT, async {
        let (_server, proxy, backend) = set_up(|config| config).await;
        let cut = proxy.on_script(Fault::CutAfter, 1, &sha("commit"));
        let mut lease = backend.lease(b"k", soon(1000)).await.unwrap();
        lease.commit(b"v", in_an_hour()).await.unwrap();
        cut.completed(1).await;
        // Still the holder: a second taker waits.
        let other = backend.lease(b"k", soon(100)).await;
        assert!(
            matches!(other, Err(BackendError::LeaseTimeout)),
            "{other:?}"
        );
        lease.commit(b"v2", in_an_hour()).await.unwrap();
        lease.release().await;
        assert_eq!(
            backend.get_unleased(b"k").await.unwrap().unwrap().value,
            b"v2"
        );
    })
    .await;
}

#[tokio::test]
async fn a_commit_and_release_whose_reply_was_lost_is_answered_done_when_sent_again() {
    bounded(LIMIT, async {
        let (_server, proxy, backend) = set_up(|config| config).await;
        let lost = proxy.on_script(Fault::DropReply, 1, &sha("commit_release"));
        let lease = backend.lease(b"k", soon(1000)).await.unwrap();
        // It runs (writes and releases), its reply is lost, and it is sent again: the second run
        // finds the lease gone but released by this token, and answers "done", not "lost".
        lease.commit_and_release(b"v", in_an_hour()).await.unwrap();
        lost.completed(1).await;
        assert_eq!(
            backend.get_unleased(b"k").await.unwrap().unwrap().value,
            b"v"
        );
        assert_free(&backend, b"k").await;
    })
    .await;
}

#[tokio::test]
async fn a_commit_and_release_cut_off_before_it_ran_is_sent_again_and_done() {
    bounded(LIMIT, async {
        let (_server, proxy, backend) = set_up(|config| config).await;
        let cut = proxy.on_script(Fault::CutBefore, 1, &sha("commit_release"));
        let lease = backend.lease(b"k", soon(1000)).await.unwrap();
        lease.commit_and_release(b"v", in_an_hour()).await.unwrap();
        cut.completed(1).await;
        assert_eq!(
            backend.get_unleased(b"k").await.unwrap().unwrap().value,
            b"v"
        );
        assert_free(&backend, b"k").await;
    })
    .await;
}
