//! Helpers shared by the layer's integration tests.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::{header, Request, Response};
use axum::Router;
use http_body_util::BodyExt as _;
use mmap_session::store::{Lease, Store};
use mmap_session::{BackendError, SessionBackend, SessionId, StoredRecord};
use tempfile::TempDir;
use tower::ServiceExt as _;

/// A store in its own temporary directory (kept alive by the returned `TempDir`).
pub fn temp_store() -> (TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("sessions")).unwrap();
    (dir, store)
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
    pub store: Store,
    pub leases: Arc<AtomicUsize>,
    pub unleased_reads: Arc<AtomicUsize>,
}

impl Counting {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            leases: Arc::default(),
            unleased_reads: Arc::default(),
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
    type Lease = Lease;

    async fn lease(&self, key: &[u8], deadline: Instant) -> Result<Lease, BackendError> {
        self.leases.fetch_add(1, Ordering::SeqCst);
        SessionBackend::lease(&self.store, key, deadline).await
    }

    async fn get_unleased(&self, key: &[u8]) -> Result<Option<StoredRecord>, BackendError> {
        self.unleased_reads.fetch_add(1, Ordering::SeqCst);
        SessionBackend::get_unleased(&self.store, key).await
    }
}

/// A backend that can be told to fail the removal of one key, and remembers which keys it committed.
#[derive(Clone, Debug)]
pub struct Faulty {
    pub store: Store,
    pub fail_remove_of: Arc<std::sync::Mutex<Option<Vec<u8>>>>,
    pub committed: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
}

impl Faulty {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            fail_remove_of: Arc::default(),
            committed: Arc::default(),
        }
    }
}

#[derive(Debug)]
pub struct FaultyLease {
    key: Vec<u8>,
    lease: Lease,
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

impl mmap_session::BackendLease for FaultyLease {
    async fn load(&mut self) -> Result<Option<StoredRecord>, BackendError> {
        mmap_session::BackendLease::load(&mut self.lease).await
    }

    async fn commit(
        &mut self,
        value: &[u8],
        expires_at: std::time::SystemTime,
    ) -> Result<(), BackendError> {
        mmap_session::BackendLease::commit(&mut self.lease, value, expires_at).await?;
        self.backend
            .committed
            .lock()
            .unwrap()
            .push(self.key.clone());
        Ok(())
    }

    async fn remove(&mut self) -> Result<(), BackendError> {
        if self.backend.fail_remove_of.lock().unwrap().as_deref() == Some(&self.key[..]) {
            return Err(BackendError::Io(std::io::Error::other("injected failure")));
        }
        mmap_session::BackendLease::remove(&mut self.lease).await
    }

    async fn release(self) {
        mmap_session::BackendLease::release(self.lease).await;
    }
}
