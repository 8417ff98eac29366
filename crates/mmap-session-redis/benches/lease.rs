//! Round trips of the Redis backend against a redis-server on loopback (started for the run, on a
//! free port, persistence off).
//!
//! Run with `cargo bench -p mmap-session-redis --bench lease`. Cases, each with 1 KiB values:
//!
//! - `lease_load_commit_release`: take a session's lease (which also reads its record), write a
//!   new record under it and release it: what a request that changes its session costs the
//!   backend (3 round trips).
//! - `lease_load_release`: take the lease, read, release without writing (2 round trips).
//! - `get_unleased`: read the record without the lease (1 round trip).
//!
//! For instruction counts (callgrind), `MMAP_REDIS_BENCH_LOOP=rmw|insert|get` with
//! `MMAP_REDIS_BENCH_OPS=n` runs `n` operations of one kind instead of criterion, on the
//! layer's path: `rmw` takes the lease with the record, commits and releases in one script (a
//! changing request, 2 round trips), `insert` stores a new session (1), `get` reads (1). The
//! client's instructions per operation are the difference between two runs of different `n`
//! divided by the difference of `n` (`bench/callgrind.sh` does it).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};
use mmap_session::{BackendLease as _, SessionBackend as _};
use mmap_session_redis::test_server::RedisServer;
use mmap_session_redis::RedisBackend;

/// The callgrind loop: `ops` operations of `mode`, nothing else measured.
fn run_loop(mode: &str, ops: u64) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let server = RedisServer::start().unwrap();
    let backend: RedisBackend = runtime
        .block_on(RedisBackend::connect(&server.url()))
        .unwrap();
    let value = vec![7u8; 128];
    let expires_at = SystemTime::now() + Duration::from_secs(3600);
    let deadline = || Instant::now() + Duration::from_secs(5);
    runtime.block_on(async {
        // Every script loaded before the counted operations.
        let mut lease = backend.lease(b"warm", deadline()).await.unwrap();
        lease.commit(&value, expires_at).await.unwrap();
        lease.release().await;
        let lease = backend
            .lease_existing(b"warm", deadline())
            .await
            .unwrap()
            .unwrap();
        lease.commit_and_release(&value, expires_at).await.unwrap();
        backend
            .insert_new(b"warm2", &value, expires_at, deadline())
            .await
            .unwrap();
        for n in 0..ops {
            match mode {
                "rmw" => {
                    let mut lease = backend
                        .lease_existing(b"warm", deadline())
                        .await
                        .unwrap()
                        .unwrap();
                    black_box(lease.load().await.unwrap());
                    lease.commit_and_release(&value, expires_at).await.unwrap();
                }
                "insert" => {
                    let key = n.to_le_bytes();
                    assert!(backend
                        .insert_new(&key, &value, expires_at, deadline())
                        .await
                        .unwrap());
                }
                "get" => {
                    black_box(backend.get_unleased(b"warm").await.unwrap());
                }
                other => panic!("unknown MMAP_REDIS_BENCH_LOOP {other}"),
            }
        }
    });
}

fn round_trips(c: &mut Criterion) {
    if let Ok(mode) = std::env::var("MMAP_REDIS_BENCH_LOOP") {
        let ops = std::env::var("MMAP_REDIS_BENCH_OPS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(1000);
        run_loop(&mode, ops);
        std::process::exit(0);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let server = RedisServer::start().unwrap();
    let backend: RedisBackend = runtime
        .block_on(RedisBackend::connect(&server.url()))
        .unwrap();
    let value = vec![7u8; 1024];
    let key = b"0123456789abcdef";
    let expires_at = SystemTime::now() + Duration::from_secs(3600);
    let deadline = || Instant::now() + Duration::from_secs(5);
    runtime.block_on(async {
        let mut lease = backend.lease(key, deadline()).await.unwrap();
        lease.commit(&value, expires_at).await.unwrap();
        lease.release().await;
    });

    let mut group = c.benchmark_group("redis_loopback_1KiB");
    group.bench_function("lease_load_commit_release", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let mut lease = backend.lease(key, deadline()).await.unwrap();
                black_box(lease.load().await.unwrap());
                lease.commit(&value, expires_at).await.unwrap();
                lease.release().await;
            });
        });
    });
    group.bench_function("lease_load_release", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let mut lease = backend.lease(key, deadline()).await.unwrap();
                black_box(lease.load().await.unwrap());
                lease.release().await;
            });
        });
    });
    group.bench_function("get_unleased", |b| {
        b.iter(|| {
            runtime.block_on(async { black_box(backend.get_unleased(key).await.unwrap()) });
        });
    });
    group.finish();
}

criterion_group!(benches, round_trips);
criterion_main!(benches);
