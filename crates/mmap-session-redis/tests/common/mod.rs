//! Helpers shared by the integration tests: an app served over real HTTP, and a small client.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code, unreachable_pub)]

use std::future::Future;
use std::time::{Duration, Instant, SystemTime};

use axum::routing::get;
use axum::Router;
use mmap_session::{BackendLease as _, SessionBackend as _};
use mmap_session::{ReadOnlySession, Session, SessionError, SessionLayer};
use mmap_session_redis::fault_proxy::FaultProxy;
use mmap_session_redis::test_server::RedisServer;
use mmap_session_redis::{RedisBackend, RedisConfig};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// Runs `body`, failing the test if it takes longer than `limit`.
pub async fn bounded<F: Future>(limit: Duration, body: F) -> F::Output {
    tokio::time::timeout(limit, body)
        .await
        .unwrap_or_else(|_| panic!("the test did not finish within {limit:?}"))
}

/// A deadline `ms` milliseconds from now.
pub fn soon(ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(ms)
}

/// An expiry an hour from now.
pub fn in_an_hour() -> SystemTime {
    SystemTime::now() + Duration::from_secs(3600)
}

async fn count(session: Session) -> Result<String, SessionError> {
    let n: u64 = session.get("n").await?.unwrap_or(0) + 1;
    session.insert("n", n).await?;
    Ok(n.to_string())
}

async fn peek(session: ReadOnlySession) -> String {
    let n: u64 = session.get("n").ok().flatten().unwrap_or(0);
    n.to_string()
}

/// The counter app (`/` counts, `/peek` reads without the lease) on a free port, with its
/// sessions on `backend` and the layer's `lease_wait`.
pub async fn serve(backend: RedisBackend, lease_wait: Duration) -> u16 {
    let app = Router::new()
        .route("/", get(count))
        .route("/peek", get(peek))
        .layer(SessionLayer::new(backend).lease_wait(lease_wait));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

/// A response: its status, its body and the session cookie it set, if any.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub cookie: Option<String>,
}

/// One `GET path` over a fresh connection, with `cookie` if given.
pub async fn request(port: u16, path: &str, cookie: Option<&str>) -> Reply {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let cookie = cookie.map_or(String::new(), |cookie| format!("Cookie: {cookie}\r\n"));
    let text = format!("GET {path} HTTP/1.1\r\nHost: test\r\n{cookie}Connection: close\r\n\r\n");
    stream.write_all(text.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap();
    let cookie = head.lines().find_map(|line| {
        let value = line.strip_prefix("set-cookie: ")?;
        Some(value.split(';').next()?.to_owned())
    });
    Reply {
        status,
        body: body.to_owned(),
        cookie,
    }
}

/// Runs every script the tests act on once (a first `EVALSHA` is answered `NOSCRIPT` and sent
/// again, which a rule would count twice): commit, remove and release on a lone lease, then a
/// run of two (acquire, commit-and-keep, commit-and-release).
pub async fn warm_up(backend: &RedisBackend) {
    let mut lease = backend.lease(b"warm-up", soon(5_000)).await.unwrap();
    lease.commit(b"0", in_an_hour()).await.unwrap();
    lease.remove().await.unwrap();
    lease.release().await;
    let first = backend.lease(b"warm-up", soon(5_000)).await.unwrap();
    let second = {
        let backend = backend.clone();
        tokio::spawn(async move {
            let lease = backend.lease(b"warm-up", soon(5_000)).await.unwrap();
            lease.commit_and_release(b"2", in_an_hour()).await.unwrap();
        })
    };
    tokio::task::yield_now().await;
    first.commit_and_release(b"1", in_an_hour()).await.unwrap();
    second.await.unwrap();
}

/// A fresh server, a proxy in front of it and a backend through the proxy, configured by
/// `config`, with the scripts loaded.
pub async fn set_up(
    config: impl FnOnce(RedisConfig) -> RedisConfig,
) -> (RedisServer, FaultProxy, RedisBackend) {
    let server = RedisServer::start().unwrap();
    let proxy = FaultProxy::start(server.port()).await.unwrap();
    let backend = config(RedisConfig::new(proxy.url()))
        .connect()
        .await
        .unwrap();
    warm_up(&backend).await;
    (server, proxy, backend)
}
