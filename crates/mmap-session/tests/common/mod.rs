//! Helpers shared by the layer's integration tests.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::{header, Request, Response};
use axum::Router;
use http_body_util::BodyExt as _;
use mmap_session::store::{Lease, Options, Store};
use mmap_session::{BackendError, BackendLease, SessionBackend, SessionId, StoredRecord};
use mmap_session_redis::test_server::RedisServer;
use mmap_session_redis::{RedisBackend, RedisConfig, RedisLease};
use tempfile::TempDir;
use tower::ServiceExt as _;

/// The backends the route tests run on.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    /// The memory-mapped file, in a temporary directory of the test's own.
    File,
    /// Redis: a redis-server of the test's own, on a free port, in a temporary directory.
    Redis,
}

impl Kind {
    /// Fresh, empty storage of this kind with the default limits.
    pub async fn store(self) -> TestStore {
        self.store_with_max_value_len(None).await
    }

    /// Fresh, empty storage of this kind that refuses records over `max` bytes (if given).
    pub async fn store_with_max_value_len(self, max: impl Into<Option<usize>>) -> TestStore {
        let max = max.into();
        match self {
            Kind::File => {
                let dir = tempfile::tempdir().unwrap();
                let mut options = Options::default();
                if let Some(max) = max {
                    options = options.max_value_len(max);
                }
                let store = Store::open_with(dir.path().join("sessions"), options).unwrap();
                TestStore {
                    backend: Backend::File(store),
                    _keep: Arc::new(Keep::Dir(dir)),
                }
            }
            Kind::Redis => {
                let server = RedisServer::start().unwrap();
                let mut config = RedisConfig::new(server.url());
                if let Some(max) = max {
                    config = config.max_value_len(max);
                }
                let backend = config.connect().await.unwrap();
                TestStore {
                    backend: Backend::Redis(backend),
                    _keep: Arc::new(Keep::Server(server)),
                }
            }
        }
    }
}

/// What a [`TestStore`] keeps alive: the store's directory or the Redis server.
#[derive(Debug)]
enum Keep {
    Dir(#[allow(dead_code)] TempDir),
    Server(#[allow(dead_code)] RedisServer),
}

#[derive(Clone, Debug)]
enum Backend {
    File(Store),
    Redis(RedisBackend),
}

/// Storage of either kind, as the layer sees it, and as a test looks into it.
#[derive(Clone, Debug)]
pub struct TestStore {
    backend: Backend,
    _keep: Arc<Keep>,
}

impl TestStore {
    /// The last committed record of `key` (what a copy of the application would read).
    pub async fn get(&self, key: &[u8]) -> Option<StoredRecord> {
        self.get_unleased(key).await.unwrap()
    }

    /// Takes `key`'s lease, as another request holding the session would.
    pub async fn hold(&self, key: &[u8]) -> TestLease {
        self.lease(key, Instant::now() + std::time::Duration::from_secs(5))
            .await
            .unwrap()
    }
}

/// A lease of a [`TestStore`].
#[derive(Debug)]
pub enum TestLease {
    File(Lease),
    Redis(RedisLease),
}

impl SessionBackend for TestStore {
    type Lease = TestLease;

    async fn lease(&self, key: &[u8], deadline: Instant) -> Result<TestLease, BackendError> {
        Ok(match &self.backend {
            Backend::File(store) => TestLease::File(store.lease(key, deadline).await?),
            Backend::Redis(redis) => TestLease::Redis(redis.lease(key, deadline).await?),
        })
    }

    async fn get_unleased(&self, key: &[u8]) -> Result<Option<StoredRecord>, BackendError> {
        match &self.backend {
            Backend::File(store) => store.get_unleased(key).await,
            Backend::Redis(redis) => redis.get_unleased(key).await,
        }
    }

    async fn exists(&self, key: &[u8]) -> Result<bool, BackendError> {
        match &self.backend {
            Backend::File(store) => SessionBackend::exists(store, key).await,
            Backend::Redis(redis) => redis.exists(key).await,
        }
    }

    async fn lease_existing(
        &self,
        key: &[u8],
        deadline: Instant,
    ) -> Result<Option<TestLease>, BackendError> {
        Ok(match &self.backend {
            Backend::File(store) => SessionBackend::lease_existing(store, key, deadline)
                .await?
                .map(TestLease::File),
            Backend::Redis(redis) => redis
                .lease_existing(key, deadline)
                .await?
                .map(TestLease::Redis),
        })
    }
}

impl BackendLease for TestLease {
    async fn load(&mut self) -> Result<Option<StoredRecord>, BackendError> {
        match self {
            TestLease::File(lease) => BackendLease::load(lease).await,
            TestLease::Redis(lease) => lease.load().await,
        }
    }

    async fn commit(
        &mut self,
        value: &[u8],
        expires_at: std::time::SystemTime,
    ) -> Result<(), BackendError> {
        match self {
            TestLease::File(lease) => BackendLease::commit(lease, value, expires_at).await,
            TestLease::Redis(lease) => lease.commit(value, expires_at).await,
        }
    }

    async fn remove(&mut self) -> Result<(), BackendError> {
        match self {
            TestLease::File(lease) => BackendLease::remove(lease).await,
            TestLease::Redis(lease) => lease.remove().await,
        }
    }

    async fn release(self) {
        match self {
            TestLease::File(lease) => BackendLease::release(lease).await,
            TestLease::Redis(lease) => lease.release().await,
        }
    }
}

/// Sends one request through `app`, with `cookie` (a `name=value` pair) if given.
pub async fn send(app: &Router, method: &str, path: &str, cookie: Option<&str>) -> Response<Body> {
    let mut request = Request::builder().method(method).uri(path);
    if let Some(cookie) = cookie {
        request = request.header(header::COOKIE, cookie);
    }
    app.clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap()
}

/// Sends one request through `app` with a `Cookie` header of these exact bytes (which need not
/// be ASCII, or even UTF-8: browsers send what other cookies of the site hold).
pub async fn send_raw_cookie(
    app: &Router,
    method: &str,
    path: &str,
    cookie: &[u8],
) -> Response<Body> {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(
            header::COOKIE,
            axum::http::HeaderValue::from_bytes(cookie).unwrap(),
        )
        .body(Body::empty())
        .unwrap();
    app.clone().oneshot(request).await.unwrap()
}

/// Sends one request through `app` with a JSON body, and `cookie` if given.
pub async fn send_json(
    app: &Router,
    path: &str,
    cookie: Option<&str>,
    json: String,
) -> Response<Body> {
    let mut request = Request::builder()
        .method("POST")
        .uri(path)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(cookie) = cookie {
        request = request.header(header::COOKIE, cookie);
    }
    app.clone()
        .oneshot(request.body(Body::from(json)).unwrap())
        .await
        .unwrap()
}

pub async fn get(app: &Router, path: &str, cookie: Option<&str>) -> Response<Body> {
    send(app, "GET", path, cookie).await
}

pub async fn text(response: Response<Body>) -> String {
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// All `Set-Cookie` headers of a response.
pub fn set_cookies(response: &Response<Body>) -> Vec<String> {
    response
        .headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|value| value.to_str().unwrap().to_owned())
        .collect()
}

/// The single `Set-Cookie` of a response, parsed.
pub fn the_set_cookie(response: &Response<Body>) -> cookie::Cookie<'static> {
    let all = set_cookies(response);
    assert_eq!(all.len(), 1, "expected exactly one Set-Cookie, got {all:?}");
    cookie::Cookie::parse(all[0].clone()).unwrap()
}

/// The `name=value` pair to send back for a response's `Set-Cookie`.
pub fn cookie_pair(response: &Response<Body>) -> String {
    let cookie = the_set_cookie(response);
    format!("{}={}", cookie.name(), cookie.value())
}

/// The session id a `name=value` pair (signed or not) carries.
pub fn id_of(pair: &str) -> SessionId {
    let (_, value) = pair.split_once('=').unwrap();
    let id_text = value.split('.').next().unwrap();
    SessionId::decode(id_text).unwrap()
}

/// A backend that counts what the layer asks of the store.
#[derive(Clone, Debug)]
pub struct Counting {
    pub store: TestStore,
    pub leases: Arc<AtomicUsize>,
    pub unleased_reads: Arc<AtomicUsize>,
    /// Woken whenever a lease is asked for.
    leasing: Arc<tokio::sync::Notify>,
}

impl Counting {
    pub fn new(store: TestStore) -> Self {
        Self {
            store,
            leases: Arc::default(),
            unleased_reads: Arc::default(),
            leasing: Arc::default(),
        }
    }

    /// Returns once `n` leases in all have been asked for (the last of them may still be
    /// waiting for the lease).
    pub async fn leases_asked(&self, n: usize) {
        loop {
            let asked = self.leasing.notified();
            tokio::pin!(asked);
            asked.as_mut().enable();
            if self.leases() >= n {
                return;
            }
            asked.await;
        }
    }

    pub fn leases(&self) -> usize {
        self.leases.load(Ordering::SeqCst)
    }

    pub fn unleased_reads(&self) -> usize {
        self.unleased_reads.load(Ordering::SeqCst)
    }
}

impl SessionBackend for Counting {
    type Lease = TestLease;

    async fn lease(&self, key: &[u8], deadline: Instant) -> Result<TestLease, BackendError> {
        self.leases.fetch_add(1, Ordering::SeqCst);
        self.leasing.notify_waiters();
        SessionBackend::lease(&self.store, key, deadline).await
    }

    async fn get_unleased(&self, key: &[u8]) -> Result<Option<StoredRecord>, BackendError> {
        self.unleased_reads.fetch_add(1, Ordering::SeqCst);
        SessionBackend::get_unleased(&self.store, key).await
    }
}

/// A backend that can be told to fail every write (removal or commit) to one key, and remembers
/// which keys it committed.
#[derive(Clone, Debug)]
pub struct Faulty {
    pub store: TestStore,
    pub fail_writes_to: Arc<std::sync::Mutex<Option<Vec<u8>>>>,
    pub committed: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
}

impl Faulty {
    pub fn new(store: TestStore) -> Self {
        Self {
            store,
            fail_writes_to: Arc::default(),
            committed: Arc::default(),
        }
    }
}

#[derive(Debug)]
pub struct FaultyLease {
    key: Vec<u8>,
    lease: TestLease,
    backend: Faulty,
}

impl SessionBackend for Faulty {
    type Lease = FaultyLease;

    async fn lease(&self, key: &[u8], deadline: Instant) -> Result<FaultyLease, BackendError> {
        let lease = SessionBackend::lease(&self.store, key, deadline).await?;
        Ok(FaultyLease {
            key: key.to_vec(),
            lease,
            backend: self.clone(),
        })
    }

    async fn get_unleased(&self, key: &[u8]) -> Result<Option<StoredRecord>, BackendError> {
        SessionBackend::get_unleased(&self.store, key).await
    }
}

impl FaultyLease {
    fn fail_if_told(&self) -> Result<(), BackendError> {
        if self.backend.fail_writes_to.lock().unwrap().as_deref() == Some(&self.key[..]) {
            return Err(BackendError::Io(std::io::Error::other("injected failure")));
        }
        Ok(())
    }
}

impl mmap_session::BackendLease for FaultyLease {
    async fn load(&mut self) -> Result<Option<StoredRecord>, BackendError> {
        mmap_session::BackendLease::load(&mut self.lease).await
    }

    async fn commit(
        &mut self,
        value: &[u8],
        expires_at: std::time::SystemTime,
    ) -> Result<(), BackendError> {
        self.fail_if_told()?;
        mmap_session::BackendLease::commit(&mut self.lease, value, expires_at).await?;
        self.backend
            .committed
            .lock()
            .unwrap()
            .push(self.key.clone());
        Ok(())
    }

    async fn remove(&mut self) -> Result<(), BackendError> {
        self.fail_if_told()?;
        mmap_session::BackendLease::remove(&mut self.lease).await
    }

    async fn release(self) {
        mmap_session::BackendLease::release(self.lease).await;
    }
}
