//! The backend on a real local Redis Cluster (3 primaries, started by the test on free ports):
//! the counter app over HTTP with sessions spread over the primaries, busy sessions handed over
//! between two backends through the shard channels, and a primary failed over (`CLUSTER
//! FAILOVER` on its replica) under load, with every acknowledged update checked afterwards.
//!
//! The layer's own route tests run on a cluster too:
//! `MMAP_SESSION_TEST_REDIS=cluster cargo test -p mmap-session --test layer redis::`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{bounded, in_an_hour, request, serve, soon};
use mmap_session::{BackendError, BackendLease as _, SessionBackend as _};
use mmap_session_redis::test_server::RedisServer;
use mmap_session_redis::RedisBackend;

const LIMIT: Duration = Duration::from_secs(180);

/// How many keys `node` holds.
fn keys_on(node: &RedisServer) -> usize {
    let reply = node.raw_node_command("DBSIZE").unwrap();
    String::from_utf8_lossy(&reply)
        .trim()
        .trim_start_matches(':')
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_counter_app_counts_sessions_spread_over_three_primaries() {
    bounded(LIMIT, async {
        let cluster = RedisServer::start_cluster(3, 0).unwrap();
        let backend = RedisBackend::connect(&cluster.url()).await.unwrap();
        let port = serve(backend, Duration::from_secs(5)).await;
        let mut cookies = Vec::new();
        for _ in 0..24 {
            let first = request(port, "/", None).await;
            assert_eq!((first.status, first.body.as_str()), (200, "1"));
            cookies.push(first.cookie.unwrap());
        }
        for round in 2..=3 {
            for cookie in &cookies {
                let reply = request(port, "/", Some(cookie)).await;
                assert_eq!((reply.status, reply.body), (200, round.to_string()));
            }
        }
        let peek = request(port, "/peek", Some(&cookies[0])).await;
        assert_eq!((peek.status, peek.body.as_str()), (200, "3"));
        let holding: Vec<usize> = cluster.nodes().map(keys_on).collect();
        assert!(
            holding.iter().filter(|&&keys| keys > 0).count() >= 2,
            "sessions on one primary only: {holding:?}"
        );
        // One session, 16 requests at once: none lost.
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let cookie = cookies[1].clone();
                tokio::spawn(async move { request(port, "/", Some(&cookie)).await.status })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap(), 200);
        }
        let after = request(port, "/peek", Some(&cookies[1])).await;
        assert_eq!(after.body, "19");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_backends_on_a_cluster_hand_busy_sessions_over_and_lose_nothing() {
    bounded(LIMIT, async {
        let cluster = RedisServer::start_cluster(3, 0).unwrap();
        let backends = [
            RedisBackend::connect(&cluster.url()).await.unwrap(),
            RedisBackend::connect(&cluster.url()).await.unwrap(),
        ];
        let mut tasks = Vec::new();
        for i in 0..48 {
            let backend = backends[i % 2].clone();
            // Three sessions, in (almost surely) different slots.
            let key = format!("session-{}", i % 3);
            tasks.push(tokio::spawn(async move {
                for _ in 0..4 {
                    let mut lease = backend.lease(key.as_bytes(), soon(10_000)).await.unwrap();
                    let n: u64 = match lease.load().await.unwrap() {
                        Some(record) => String::from_utf8(record.value).unwrap().parse().unwrap(),
                        None => 0,
                    };
                    lease
                        .commit_and_release((n + 1).to_string().as_bytes(), in_an_hour())
                        .await
                        .unwrap();
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        for session in 0..3 {
            let key = format!("session-{session}");
            let record = backends[1]
                .get_unleased(key.as_bytes())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(record.value, b"64", "{key}");
        }
    })
    .await;
}

/// What the load of the failover test did.
#[derive(Debug, Default)]
struct Tally {
    acknowledged: AtomicU64,
    unavailable: AtomicU64,
    timed_out: AtomicU64,
    lost_lease: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_failed_over_under_load_loses_no_acknowledged_update() {
    bounded(LIMIT, async {
        let cluster = RedisServer::start_cluster(3, 1).unwrap();
        let backend = RedisBackend::connect(&cluster.url()).await.unwrap();
        let tally = Arc::new(Tally::default());
        let stop = Arc::new(AtomicBool::new(false));
        let sessions = 12;
        // Per session: the count each acknowledged commit wrote, the last one kept.
        let acked: Arc<Vec<AtomicU64>> =
            Arc::new((0..sessions).map(|_| AtomicU64::new(0)).collect());
        let mut workers = Vec::new();
        for session in 0..sessions {
            let backend = backend.clone();
            let (tally, stop, acked) = (Arc::clone(&tally), Arc::clone(&stop), Arc::clone(&acked));
            workers.push(tokio::spawn(async move {
                let key = format!("load-{session}");
                while !stop.load(Ordering::Relaxed) {
                    let attempt = async {
                        let mut lease = backend.lease(key.as_bytes(), soon(2_000)).await?;
                        let n: u64 = match lease.load().await? {
                            Some(record) => {
                                String::from_utf8(record.value).unwrap().parse().unwrap()
                            }
                            None => 0,
                        };
                        lease
                            .commit_and_release((n + 1).to_string().as_bytes(), in_an_hour())
                            .await?;
                        Ok::<_, BackendError>(n + 1)
                    };
                    match attempt.await {
                        Ok(n) => {
                            acked[session].store(n, Ordering::Relaxed);
                            tally.acknowledged.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(BackendError::Unavailable(_)) => {
                            tally.unavailable.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        Err(BackendError::LeaseTimeout) => {
                            tally.timed_out.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(BackendError::LeaseLost) => {
                            tally.lost_lease.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(other) => panic!("unexpected error under failover: {other:?}"),
                    }
                }
            }));
        }
        // Let the load reach every primary, then fail one over to its replica.
        let started = Instant::now();
        while tally.acknowledged.load(Ordering::Relaxed) < 500 {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the load never reached 500 updates"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let before = tally.acknowledged.load(Ordering::Relaxed);
        let replica = cluster
            .nodes()
            .find(|node| {
                String::from_utf8_lossy(&node.raw_node_command("ROLE").unwrap()).contains("slave")
            })
            .unwrap();
        let failover_at = Instant::now();
        let answer = replica.raw_node_command("CLUSTER FAILOVER").unwrap();
        assert_eq!(String::from_utf8_lossy(&answer), "+OK\r\n");
        while !String::from_utf8_lossy(&replica.raw_node_command("ROLE").unwrap())
            .contains("master")
        {
            assert!(
                failover_at.elapsed() < Duration::from_secs(30),
                "no failover within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let promoted_after = failover_at.elapsed();
        // Carry on under load until as many updates again are acknowledged after the failover.
        while tally.acknowledged.load(Ordering::Relaxed) < 2 * before + 500 {
            assert!(
                failover_at.elapsed() < Duration::from_secs(120),
                "the load did not go on after the failover"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.store(true, Ordering::Relaxed);
        for worker in workers {
            worker.await.unwrap();
        }
        // Every acknowledged update is there, on the new topology.
        let mut lost = 0;
        for session in 0..sessions {
            let key = format!("load-{session}");
            let stored: u64 = match backend.get_unleased(key.as_bytes()).await.unwrap() {
                Some(record) => String::from_utf8(record.value).unwrap().parse().unwrap(),
                None => 0,
            };
            let acknowledged = acked[session].load(Ordering::Relaxed);
            assert!(
                stored >= acknowledged,
                "{key}: stored {stored}, acknowledged {acknowledged}"
            );
            lost += acknowledged - stored.min(acknowledged);
        }
        println!(
            "failover under load: {} updates acknowledged in {:?}; replica promoted {:?} after \
             CLUSTER FAILOVER; {} unavailable, {} lease time-outs, {} leases lost; {lost} \
             acknowledged updates lost",
            tally.acknowledged.load(Ordering::Relaxed),
            started.elapsed(),
            promoted_after,
            tally.unavailable.load(Ordering::Relaxed),
            tally.timed_out.load(Ordering::Relaxed),
            tally.lost_lease.load(Ordering::Relaxed),
        );
    })
    .await;
}
