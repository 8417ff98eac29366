//! Redis going away under the real layer, served over real HTTP: a server that refuses
//! connections, one that stops answering, one that restarts empty. Requests that need the session
//! get a `503` before the layer's `lease_wait` has passed (not a hang, not a `500`), and the same
//! backend serves again once Redis is back, without a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{bounded, Reply};
use mmap_session_redis::fault_proxy::{FaultProxy, Mode};
use mmap_session_redis::test_server::RedisServer;
use mmap_session_redis::RedisConfig;

/// How long the layer lets a request wait for a session's lease.
const LEASE_WAIT: Duration = Duration::from_secs(2);
/// "At once": a request that finds no connection to Redis up is answered well within this.
const FAST: Duration = Duration::from_millis(500);
/// How long Redis may take to be usable again after it is back (the client reconnects at most a
/// second apart).
const RECOVERY: Duration = Duration::from_secs(15);

/// The counter app on a free port, its sessions in Redis through `proxy`.
async fn serve(proxy: &FaultProxy) -> u16 {
    let backend = RedisConfig::new(proxy.url()).connect().await.unwrap();
    common::serve(backend, LEASE_WAIT).await
}

async fn request(port: u16, cookie: Option<&str>) -> Reply {
    common::request(port, "/", cookie).await
}

/// A request that needs the session while Redis is away: a 503, answered within `within`.
async fn assert_503_within(within: Duration, port: u16, cookie: &str) {
    let reply = tokio::time::timeout(within, request(port, Some(cookie)))
        .await
        .unwrap_or_else(|_| panic!("no answer within {within:?}"));
    assert_eq!(reply.status, 503, "{reply:?}");
}

/// Requests until one succeeds (Redis is back and the client reconnected), within `RECOVERY`.
async fn until_served(port: u16, cookie: Option<&str>) -> Reply {
    let deadline = Instant::now() + RECOVERY;
    loop {
        let reply = request(port, cookie).await;
        if reply.status == 200 {
            return reply;
        }
        assert_eq!(reply.status, 503, "{reply:?}");
        assert!(
            Instant::now() < deadline,
            "not served again within {RECOVERY:?}"
        );
        // Redis is reconnected to in the background; ask again shortly.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_refuses_connections_gives_fast_503s_and_the_backend_recovers() {
    bounded(Duration::from_secs(90), async {
        let server = RedisServer::start().unwrap();
        let proxy = FaultProxy::start(server.port()).await.unwrap();
        let port = serve(&proxy).await;
        let first = request(port, None).await;
        assert_eq!((first.status, first.body.as_str()), (200, "1"));
        let cookie = first.cookie.unwrap();

        proxy.set_mode(Mode::Refuse);
        assert_503_within(FAST, port, &cookie).await;
        assert_503_within(FAST, port, &cookie).await;

        proxy.set_mode(Mode::Forward);
        let back = until_served(port, Some(&cookie)).await;
        assert_eq!(back.body, "2", "the session survived: {back:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_stops_answering_gives_503s_within_lease_wait_and_the_backend_recovers() {
    bounded(Duration::from_secs(90), async {
        let server = RedisServer::start().unwrap();
        let proxy = FaultProxy::start(server.port()).await.unwrap();
        let port = serve(&proxy).await;
        let first = request(port, None).await;
        let cookie = first.cookie.unwrap();

        proxy.set_mode(Mode::Blackhole);
        // Nothing tells the client that the server is gone: the acquire waits for its answer up
        // to the layer's deadline, and no longer.
        assert_503_within(LEASE_WAIT + FAST, port, &cookie).await;

        proxy.set_mode(Mode::Forward);
        let back = until_served(port, Some(&cookie)).await;
        assert_eq!(back.body, "2", "the session survived: {back:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_gives_fast_503s_and_the_backend_serves_the_new_server() {
    bounded(Duration::from_secs(90), async {
        let server = RedisServer::start().unwrap();
        let proxy = FaultProxy::start(server.port()).await.unwrap();
        let port = serve(&proxy).await;
        let first = request(port, None).await;
        let cookie = first.cookie.unwrap();

        // The server goes down: connections break, new ones are refused.
        drop(server);
        proxy.set_mode(Mode::Refuse);
        assert_503_within(FAST, port, &cookie).await;

        // A new server (persistence off: empty, without the backend's scripts) takes its place.
        let restarted = RedisServer::start().unwrap();
        proxy.set_upstream(restarted.port());
        proxy.set_mode(Mode::Forward);
        // The old session is gone with the old server's memory: a new one starts, and counts on.
        let fresh = until_served(port, Some(&cookie)).await;
        assert_eq!(fresh.body, "1", "{fresh:?}");
        let cookie = fresh.cookie.unwrap();
        let next = request(port, Some(&cookie)).await;
        assert_eq!((next.status, next.body.as_str()), (200, "2"), "{next:?}");
    })
    .await;
}
