//! The lease watchdog against a real redis-server: a live holder keeps its lease past the lease
//! TTL by renewing it (up to the lease time-out), and a holder that was killed frees its session
//! within the TTL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{bounded, in_an_hour, soon};
use mmap_session::{BackendError, BackendLease as _, SessionBackend as _};
use mmap_session_redis::fault_proxy::{Fault, FaultProxy};
use mmap_session_redis::test_server::{script_sha1, RedisServer};
use mmap_session_redis::{RedisBackend, RedisConfig, DEFAULT_LEASE_TTL};

/// Set in the child process: the URL of the server to hold a lease on.
const HOLDER_URL: &str = "MMAP_SESSION_REDIS_HOLDER_URL";

/// How long any one test of this file may take.
const LIMIT: Duration = Duration::from_secs(60);

/// A backend whose leases live `ttl` past their last renewal, renewed for at most `timeout`.
async fn backend(url: String, ttl: Duration, timeout: Duration) -> RedisBackend {
    RedisConfig::new(url)
        .lease_ttl(ttl)
        .lease_timeout(timeout)
        .connect()
        .await
        .unwrap()
}

/// Not a test: the body of the child process of
/// `a_killed_holders_session_is_served_again_within_the_default_lease_ttl`, which re-runs this
/// binary with [`HOLDER_URL`] set. It takes the lease of `k` with the default configuration,
/// commits, says `@held` and holds the lease until it is killed (or, should the test die first,
/// until its standard input closes, so that no orphan outlives the run).
#[test]
fn holder_process_entry() {
    let Ok(url) = std::env::var(HOLDER_URL) else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let backend = RedisBackend::connect(&url).await.unwrap();
        let mut lease = backend.lease(b"k", soon(10_000)).await.unwrap();
        lease
            .commit(b"from the killed holder", in_an_hour())
            .await
            .unwrap();
        println!("@held");
        let _ = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)
        })
        .await;
        drop(lease);
    });
}

#[tokio::test]
async fn a_killed_holders_session_is_served_again_within_the_default_lease_ttl() {
    bounded(LIMIT, async {
        let server = RedisServer::start().unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "holder_process_entry",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(HOLDER_URL, server.url())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let held = tokio::task::spawn_blocking(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .any(|line| line.contains("@held"))
        });
        assert!(
            held.await.unwrap(),
            "the holder process never took the lease"
        );
        // A live holder keeps it: a taker with a deadline past the TTL times out.
        let backend = RedisBackend::connect(&server.url()).await.unwrap();
        let waited = backend
            .lease(b"k", Instant::now() + DEFAULT_LEASE_TTL * 2)
            .await;
        assert!(
            matches!(waited, Err(BackendError::LeaseTimeout)),
            "{waited:?}"
        );

        // Child::kill sends SIGKILL: no release, no more renewals.
        child.kill().unwrap();
        let killed = Instant::now();
        child.wait().unwrap();
        // Served again within the TTL (2 s by default), with a second to spare for the waiter's
        // own round trips on a busy machine.
        let deadline = killed + DEFAULT_LEASE_TTL + Duration::from_secs(1);
        let mut lease = backend.lease(b"k", deadline).await.unwrap();
        // For BENCHMARKS.md (run with --nocapture); the deadline above is the test.
        println!("served again {:?} after the SIGKILL", killed.elapsed());
        assert_eq!(
            lease.load().await.unwrap().unwrap().value,
            b"from the killed holder"
        );
        lease.commit(b"taken over", in_an_hour()).await.unwrap();
        lease.release().await;
    })
    .await;
}

#[tokio::test]
async fn a_live_holder_keeps_its_lease_past_the_ttl_and_saves_its_changes() {
    bounded(LIMIT, async {
        let server = RedisServer::start().unwrap();
        let ttl = Duration::from_millis(300);
        let holder = backend(server.url(), ttl, Duration::from_secs(30)).await;
        let other = backend(server.url(), ttl, Duration::from_secs(30)).await;
        let mut lease = holder.lease(b"k", soon(1000)).await.unwrap();
        // Another request waits three TTLs in vain: the holder is alive and renews.
        let waited = other.lease(b"k", Instant::now() + ttl * 3).await;
        assert!(
            matches!(waited, Err(BackendError::LeaseTimeout)),
            "{waited:?}"
        );
        lease.commit(b"slow but kept", in_an_hour()).await.unwrap();
        lease.release().await;
        assert_eq!(
            other.get_unleased(b"k").await.unwrap().unwrap().value,
            b"slow but kept"
        );
    })
    .await;
}

#[tokio::test]
async fn a_slow_request_that_nobody_contends_with_saves_its_changes() {
    bounded(LIMIT, async {
        let server = RedisServer::start().unwrap();
        let proxy = FaultProxy::start(server.port()).await.unwrap();
        let ttl = Duration::from_millis(300);
        let backend = backend(proxy.url(), ttl, Duration::from_secs(30)).await;
        let renewed = proxy.on_script(Fault::Observe, 6, &script_sha1("renew").unwrap());
        let mut lease = backend.lease(b"k", soon(1000)).await.unwrap();
        // Renewed every 100 ms: after six renewals, twice the TTL has passed since the lease was
        // taken.
        renewed.completed(6).await;
        lease.commit(b"slow", in_an_hour()).await.unwrap();
        lease.release().await;
        assert_eq!(
            backend.get_unleased(b"k").await.unwrap().unwrap().value,
            b"slow"
        );
    })
    .await;
}

#[tokio::test]
async fn a_lease_is_renewed_only_up_to_the_lease_timeout_and_then_writes_nothing() {
    bounded(LIMIT, async {
        let server = RedisServer::start().unwrap();
        let ttl = Duration::from_millis(150);
        let timeout = Duration::from_millis(600);
        let holder = backend(server.url(), ttl, timeout).await;
        let mut lease = holder.lease(b"k", soon(1000)).await.unwrap();
        lease.commit(b"before", in_an_hour()).await.unwrap();
        // The lease ends at the time-out even though its holder is alive; the next taker gets it.
        let mut next = holder.lease(b"k", soon(10_000)).await.unwrap();
        assert!(next.generation() > lease.generation());
        let late = lease.commit(b"too late", in_an_hour()).await;
        assert!(matches!(late, Err(BackendError::LeaseLost)), "{late:?}");
        lease.release().await;
        assert_eq!(next.load().await.unwrap().unwrap().value, b"before");
        next.commit(b"after", in_an_hour()).await.unwrap();
        next.release().await;
    })
    .await;
}
