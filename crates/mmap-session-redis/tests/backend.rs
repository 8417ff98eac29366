//! The backend against a real redis-server (started per test, on a free port, in its own
//! directory): the lease contract of `mmap_session::SessionBackend`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::time::{Duration, Instant, SystemTime};

use mmap_session::{BackendError, BackendLease as _, SessionBackend as _};
use mmap_session_redis::test_server::RedisServer;
use mmap_session_redis::{RedisBackend, RedisConfig, RedisError};

async fn bounded<F: Future>(body: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), body)
        .await
        .expect("the test did not finish within 60 s")
}

fn soon(ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(ms)
}

fn in_an_hour() -> SystemTime {
    SystemTime::now() + Duration::from_secs(3600)
}

async fn backend(server: &RedisServer) -> RedisBackend {
    RedisBackend::connect(&server.url()).await.unwrap()
}

/// A server of the test's own, and a backend on it with the defaults.
async fn start() -> (RedisServer, RedisBackend) {
    let server = RedisServer::start().unwrap();
    let backend = backend(&server).await;
    (server, backend)
}

#[tokio::test]
async fn a_committed_record_is_read_back_with_and_without_the_lease() {
    bounded(async {
        let (_server, backend) = start().await;
        assert!(!backend.exists(b"k").await.unwrap());
        let mut lease = backend.lease(b"k", soon(1000)).await.unwrap();
        assert_eq!(lease.load().await.unwrap(), None);
        let expires_at = in_an_hour();
        lease.commit(b"v1", expires_at).await.unwrap();
        assert_eq!(lease.load().await.unwrap().unwrap().value, b"v1");
        lease.release().await;

        assert!(backend.exists(b"k").await.unwrap());
        let record = backend.get_unleased(b"k").await.unwrap().unwrap();
        assert_eq!(record.value, b"v1");
        assert_eq!(
            record.expires_at, expires_at,
            "the expiry comes back exactly"
        );
        let mut lease = backend.lease(b"k", soon(1000)).await.unwrap();
        assert_eq!(lease.load().await.unwrap().unwrap().value, b"v1");
        lease.remove().await.unwrap();
        lease.release().await;
        assert_eq!(backend.get_unleased(b"k").await.unwrap(), None);
        assert!(!backend.exists(b"k").await.unwrap());
    })
    .await;
}

#[tokio::test]
async fn a_held_lease_times_out_a_second_taker_but_not_an_unleased_read() {
    bounded(async {
        let (_server, backend) = start().await;
        let mut held = backend.lease(b"k", soon(1000)).await.unwrap();
        held.commit(b"v", in_an_hour()).await.unwrap();
        let other = backend.lease(b"k", soon(100)).await;
        assert!(
            matches!(other, Err(BackendError::LeaseTimeout)),
            "{other:?}"
        );
        assert_eq!(
            backend.get_unleased(b"k").await.unwrap().unwrap().value,
            b"v"
        );
        assert!(backend.exists(b"k").await.unwrap());
        held.release().await;
    })
    .await;
}

#[tokio::test]
async fn a_waiter_in_another_process_gets_the_lease_when_it_is_released() {
    bounded(async {
        let server = RedisServer::start().unwrap();
        // Two backends, two pools and subscriptions: like two processes.
        let first = backend(&server).await;
        let second = backend(&server).await;
        let mut held = first.lease(b"k", soon(1000)).await.unwrap();
        let waiter = tokio::spawn(async move {
            let mut lease = second.lease(b"k", soon(20_000)).await?;
            let seen = lease.load().await?.map(|record| record.value);
            lease.release().await;
            Ok::<_, BackendError>(seen)
        });
        held.commit(b"from the first", in_an_hour()).await.unwrap();
        held.release().await;
        let seen = waiter.await.unwrap().unwrap();
        assert_eq!(seen.as_deref(), Some(&b"from the first"[..]));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_read_modify_writes_through_two_backends_lose_nothing() {
    bounded(async {
        let server = RedisServer::start().unwrap();
        let backends = [backend(&server).await, backend(&server).await];
        let mut tasks = Vec::new();
        for i in 0..40 {
            let backend = backends[i % 2].clone();
            tasks.push(tokio::spawn(async move {
                let mut lease = backend.lease(b"n", soon(30_000)).await.unwrap();
                let n: u64 = match lease.load().await.unwrap() {
                    Some(record) => String::from_utf8(record.value).unwrap().parse().unwrap(),
                    None => 0,
                };
                tokio::task::yield_now().await;
                lease
                    .commit((n + 1).to_string().as_bytes(), in_an_hour())
                    .await
                    .unwrap();
                lease.release().await;
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let record = backends[0].get_unleased(b"n").await.unwrap().unwrap();
        assert_eq!(record.value, b"40");
    })
    .await;
}

#[tokio::test]
async fn a_dropped_lease_is_released() {
    bounded(async {
        let (_server, backend) = start().await;
        let lease = backend.lease(b"k", soon(1000)).await.unwrap();
        drop(lease);
        // The release runs as a task; the next taker waits for it, well within the deadline.
        let again = backend.lease(b"k", soon(10_000)).await.unwrap();
        again.release().await;
    })
    .await;
}

#[tokio::test]
async fn a_holder_whose_lease_expired_and_was_taken_over_writes_nothing() {
    bounded(async {
        let server = RedisServer::start().unwrap();
        let backend = RedisConfig::new(server.url())
            .lease_timeout(Duration::from_millis(200))
            .connect()
            .await
            .unwrap();
        let mut late = backend.lease(b"k", soon(1000)).await.unwrap();
        late.commit(b"first", in_an_hour()).await.unwrap();
        // The next taker waits for the lease to expire, and then takes it.
        let mut next = backend.lease(b"k", soon(10_000)).await.unwrap();
        assert!(
            next.generation() > late.generation(),
            "generations increase"
        );
        next.commit(b"second", in_an_hour()).await.unwrap();

        let commit = late.commit(b"late write", in_an_hour()).await;
        assert!(matches!(commit, Err(BackendError::LeaseLost)), "{commit:?}");
        let remove = late.remove().await;
        assert!(matches!(remove, Err(BackendError::LeaseLost)), "{remove:?}");
        late.release().await;
        assert_eq!(
            backend.get_unleased(b"k").await.unwrap().unwrap().value,
            b"second"
        );
        // The late holder's release did not free the new holder's lease.
        let third = backend.lease(b"k", soon(50)).await;
        assert!(
            matches!(third, Err(BackendError::LeaseTimeout)),
            "{third:?}"
        );
        next.release().await;
    })
    .await;
}

#[tokio::test]
async fn an_expired_record_is_never_returned_and_a_past_expiry_writes_nothing() {
    bounded(async {
        let (_server, backend) = start().await;
        let mut lease = backend.lease(b"short", soon(1000)).await.unwrap();
        lease
            .commit(b"v", SystemTime::now() + Duration::from_millis(150))
            .await
            .unwrap();
        lease.release().await;
        // Let the expiry pass (a deadline, not a condition to poll for).
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(backend.get_unleased(b"short").await.unwrap(), None);
        let mut lease = backend.lease(b"short", soon(1000)).await.unwrap();
        assert_eq!(lease.load().await.unwrap(), None);

        // A commit whose expiry has passed removes the record instead of writing it.
        lease.commit(b"alive", in_an_hour()).await.unwrap();
        lease
            .commit(b"dead", SystemTime::now() - Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(lease.load().await.unwrap(), None);
        lease.release().await;
        assert!(!backend.exists(b"short").await.unwrap());
    })
    .await;
}

#[tokio::test]
async fn a_record_over_the_max_size_is_refused_and_nothing_is_written() {
    bounded(async {
        let server = RedisServer::start().unwrap();
        let backend = RedisConfig::new(server.url())
            .max_value_len(100)
            .connect()
            .await
            .unwrap();
        let mut lease = backend.lease(b"k", soon(1000)).await.unwrap();
        lease.commit(&[1; 100], in_an_hour()).await.unwrap();
        let error = lease.commit(&[2; 101], in_an_hour()).await.unwrap_err();
        assert!(
            matches!(error, BackendError::TooLarge { len: 101, max: 100 }),
            "{error:?}"
        );
        lease.release().await;
        assert_eq!(
            backend.get_unleased(b"k").await.unwrap().unwrap().value,
            [1; 100]
        );
    })
    .await;
}

#[tokio::test]
async fn key_prefixes_keep_applications_apart() {
    bounded(async {
        let server = RedisServer::start().unwrap();
        let a = RedisConfig::new(server.url())
            .key_prefix("a:")
            .connect()
            .await
            .unwrap();
        let b = RedisConfig::new(server.url())
            .key_prefix("b:")
            .connect()
            .await
            .unwrap();
        let mut lease = a.lease(b"k", soon(1000)).await.unwrap();
        lease.commit(b"a's", in_an_hour()).await.unwrap();
        // b's lease on the same key is another lease.
        let other = b.lease(b"k", soon(1000)).await.unwrap();
        assert_eq!(b.get_unleased(b"k").await.unwrap(), None);
        other.release().await;
        lease.release().await;
        assert_eq!(a.key_prefix(), "a:");
    })
    .await;
}

#[tokio::test]
async fn redis_holds_only_hashes_of_the_keys() {
    bounded(async {
        let (server, backend) = start().await;
        let key = b"SECRET-SESSION-ID";
        let mut lease = backend.lease(key, soon(1000)).await.unwrap();
        lease.commit(b"data", in_an_hour()).await.unwrap();
        let keys = server.raw_command("KEYS *").unwrap();
        let keys = String::from_utf8_lossy(&keys);
        assert!(keys.contains("mmap-session:{"), "{keys}");
        assert!(!keys.contains("SECRET"), "{keys}");
        let hash = blake3::hash(key).to_hex();
        assert!(keys.contains(hash.as_str()), "{keys}");
        // While held, the lease holds a token and a generation, not the key.
        let lease_value = server
            .raw_command(&format!("GET mmap-session:{{{hash}}}:lease"))
            .unwrap();
        assert!(!String::from_utf8_lossy(&lease_value).contains("SECRET"));
        lease.release().await;
    })
    .await;
}

#[tokio::test]
async fn connection_failures_are_errors_not_panics() {
    bounded(async {
        // Nothing listens on the port of a stopped server.
        let server = RedisServer::start().unwrap();
        let url = server.url();
        let backend = RedisConfig::new(url.clone())
            .command_timeout(Duration::from_millis(500))
            .connect()
            .await
            .unwrap();
        drop(server);

        // Unavailable: the layer answers 503.
        let read = backend.get_unleased(b"k").await;
        assert!(
            matches!(read, Err(BackendError::Unavailable(_))),
            "{read:?}"
        );
        let lease = backend.lease(b"k", soon(1000)).await;
        assert!(
            matches!(lease, Err(BackendError::Unavailable(_))),
            "{lease:?}"
        );
        let message = lease.unwrap_err();
        let cause = std::error::Error::source(&message).unwrap().to_string();
        assert!(cause.contains("acquire lease"), "{cause}");

        let connect = RedisConfig::new(url)
            .command_timeout(Duration::from_millis(500))
            .connect()
            .await;
        assert!(
            matches!(connect, Err(RedisError::Connect { .. })),
            "{connect:?}"
        );
        let invalid = RedisBackend::connect("not a url").await;
        assert!(
            matches!(invalid, Err(RedisError::InvalidUrl { .. })),
            "{invalid:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn lease_existing_takes_no_lease_for_a_session_without_a_record() {
    bounded(async {
        let (_server, backend) = start().await;
        assert!(backend
            .lease_existing(b"k", soon(1000))
            .await
            .unwrap()
            .is_none());
        // Nothing was left held: a plain lease is had at once.
        let mut lease = backend.lease(b"k", soon(100)).await.unwrap();
        lease.commit(b"v", in_an_hour()).await.unwrap();

        // While held, lease_existing waits for it like lease does.
        let other = backend.lease_existing(b"k", soon(100)).await;
        assert!(
            matches!(other, Err(BackendError::LeaseTimeout)),
            "{other:?}"
        );
        lease.release().await;
        let mut lease = backend
            .lease_existing(b"k", soon(1000))
            .await
            .unwrap()
            .expect("the record exists");
        assert_eq!(lease.load().await.unwrap().unwrap().value, b"v");
        lease.remove().await.unwrap();
        lease.release().await;
        assert!(backend
            .lease_existing(b"k", soon(1000))
            .await
            .unwrap()
            .is_none());
    })
    .await;
}
