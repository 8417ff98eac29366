//! [`LeaseLayer`]: holds each session's busy lease from a request's first access to its response.
//!
//! tower-sessions calls the store without any request context, so the layer gives the request's
//! future a scope (a tokio task-local [`Scope`]). Inside it, [`MmapStore`](crate::MmapStore)'s
//! `load` takes the session's lease and leaves it in the scope; the later `save` and `delete` of
//! the same id write through that lease; the layer releases every lease of the scope when the
//! inner service's future has finished (the response is ready) or is dropped (the request was
//! cancelled).

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use http::{header, HeaderValue, Request, Response, StatusCode};
use mmap_session_store::Lease;
use tower_layer::Layer;
use tower_service::Service;

tokio::task_local! {
    /// The scope of the request being served, if a [`LeaseLayer`] is around it.
    static SCOPE: Arc<Scope>;
}

/// The leases one request holds, and whether one of its store operations found the store
/// unavailable (a lease wait timed out, or the store is full).
#[derive(Debug, Default)]
pub(crate) struct Scope {
    /// Serialises the store operations of the scope that take leases, so that two of them never
    /// wait for one key at once (the second would wait for the first, which it holds).
    gate: tokio::sync::Mutex<()>,
    held: Mutex<Held>,
    unavailable: AtomicBool,
}

#[derive(Debug, Default)]
struct Held {
    /// Set once the request's response is ready or the request was dropped: from then on the
    /// scope keeps no lease, and operations work as without the layer.
    closed: bool,
    leases: Vec<HeldLease>,
}

/// Which store file a lease belongs to: its device and inode, so that two [`Store`]s opened at
/// different paths of one file (a link, a relative path) find each other's leases; its path if
/// the file's metadata could not be read when the store was wrapped.
///
/// [`Store`]: mmap_session_store::Store
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum FileKey {
    Inode { dev: u64, ino: u64 },
    Path(PathBuf),
}

impl FileKey {
    pub(crate) fn of(path: &std::path::Path) -> FileKey {
        use std::os::unix::fs::MetadataExt as _;
        match std::fs::metadata(path) {
            Ok(meta) => FileKey::Inode {
                dev: meta.dev(),
                ino: meta.ino(),
            },
            Err(_) => FileKey::Path(path.to_owned()),
        }
    }
}

#[derive(Debug)]
struct HeldLease {
    file: FileKey,
    key: [u8; 16],
    lease: Lease,
}

impl Scope {
    /// The scope of the current task, if it runs inside a [`LeaseLayer`].
    pub(crate) fn current() -> Option<Arc<Scope>> {
        SCOPE.try_with(Arc::clone).ok()
    }

    /// Waits until no other operation of this scope is taking a lease.
    pub(crate) async fn gate(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.gate.lock().await
    }

    fn held(&self) -> MutexGuard<'_, Held> {
        // A panic while the list was locked leaves it consistent (every change is one push or
        // one drain), so a poisoned lock is still usable.
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the scope has ended (its leases released; no more are kept).
    pub(crate) fn is_closed(&self) -> bool {
        self.held().closed
    }

    /// Runs `f` on the lease of `key` in `file` this scope holds; `None` if it holds none.
    pub(crate) fn with_held<T>(
        &self,
        file: &FileKey,
        key: &[u8; 16],
        f: impl FnOnce(&mut Lease) -> T,
    ) -> Option<T> {
        let mut held = self.held();
        held.leases
            .iter_mut()
            .find(|h| h.key == *key && h.file == *file)
            .map(|h| f(&mut h.lease))
    }

    /// Keeps `lease` until the scope ends. A scope that has already ended releases it at once.
    pub(crate) fn keep(&self, file: &FileKey, key: [u8; 16], lease: Lease) {
        let mut held = self.held();
        if held.closed {
            drop(held);
            lease.release();
            return;
        }
        held.leases.push(HeldLease {
            file: file.clone(),
            key,
            lease,
        });
    }

    /// Notes that an operation failed because the store was unavailable (lease wait timed out,
    /// store full), so that the layer answers `503` instead of tower-sessions' `500`.
    pub(crate) fn mark_unavailable(&self) {
        self.unavailable.store(true, Ordering::Relaxed);
    }

    /// Ends the scope: releases every lease it holds and keeps no more.
    fn close(&self) {
        let leases = {
            let mut held = self.held();
            held.closed = true;
            std::mem::take(&mut held.leases)
        };
        for held in leases {
            held.lease.release();
        }
    }
}

/// Closes the scope when dropped: when the response is ready, and also when the request's future
/// is dropped before (a client that went away), so a lease is never kept past its request.
struct CloseOnDrop(Arc<Scope>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// A tower layer, placed around tower-sessions' `SessionManagerLayer` over
/// [`MmapStore`](crate::MmapStore), that serialises the concurrent requests of one session: the
/// session's busy lease is held from the request's first access to the session until its response
/// is ready, so a second request of the session (in this process or another) waits at its first
/// access and sees the first one's changes. No update is lost.
///
/// ```
/// use mmap_session_tower_sessions::{store::Store, LeaseLayer, MmapStore};
/// use tower_sessions::SessionManagerLayer;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("sessions");
/// let store = MmapStore::new(Store::open(path)?);
/// let app: axum::Router = axum::Router::new()
///     // .route(...)
///     .layer(SessionManagerLayer::new(store))
///     .layer(LeaseLayer::new()); // outside tower-sessions' layer
/// # Ok(())
/// # }
/// ```
///
/// What it does, request by request:
///
/// - **No store access, no cost in the store**: a request that does not touch its session, or has
///   no session cookie, takes no lease. A new session is created under its own (fresh) id, which
///   nobody else can be using.
/// - **First access** (`SessionStore::load`): waits for the session's lease, at most
///   [`MmapStore::with_lease_wait`](crate::MmapStore::with_lease_wait) (5 s), then reads the
///   session under it and keeps the lease. An id the store does not hold takes no lease.
/// - **Response ready** (`save`, `delete`, including those of `cycle_id` and `flush`): written
///   through the held lease, then the layer releases it. A request dropped before its response
///   (the client went away) releases it too.
/// - **Waited too long**: an operation whose lease wait timed out, or that found the store full,
///   fails; tower-sessions (or the handler) turns that into a `500`, which this layer answers as
///   `503 Service Unavailable` with `Retry-After: 1`.
/// - **Stalled holder**: a request that keeps a session longer than the store's lease timeout
///   (`Options::lease_timeout`, 30 s) while another request waits loses the lease to it; its own
///   save is then refused ([`MmapStoreError::LeaseLost`](crate::MmapStoreError::LeaseLost)) and
///   it answers `500`, so it cannot overwrite the newer state.
///
/// Tasks spawned by a handler run outside the request's scope: their store operations take and
/// release leases as without this layer. A spawned task that only reads the session never waits.
/// One that saves or deletes the session waits until the request has released its lease, so a
/// handler must not await such a task, or it waits out the lease wait and the operation fails
/// (a lease-wait error the handler sees; the layer does not turn it into a `503`);
/// wrap the task's future in [`in_request_scope`] to let it use the request's lease. And the
/// first access should happen in the request itself (or in a task wrapped so), since a session
/// first loaded outside the scope is not leased.
///
/// The layer must be outside `SessionManagerLayer`: inside it, the scope would end before
/// tower-sessions saves. And requests of one session are serialised only among the processes
/// that all use it.
#[derive(Clone, Copy, Debug, Default)]
pub struct LeaseLayer {
    _private: (),
}

impl LeaseLayer {
    /// The layer. It works with every [`MmapStore`](crate::MmapStore) used inside it (several
    /// `SessionManagerLayer`s, several files).
    pub fn new() -> Self {
        Self::default()
    }
}

impl<S> Layer<S> for LeaseLayer {
    type Service = LeaseService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LeaseService { inner }
    }
}

/// The service [`LeaseLayer`] wraps around the application.
#[derive(Clone, Debug)]
pub struct LeaseService<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for LeaseService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResBody>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // Inside another LeaseLayer: its scope already covers this request.
        if Scope::current().is_some() {
            return Box::pin(self.inner.call(request));
        }
        let scope = Arc::new(Scope::default());
        let future = SCOPE.sync_scope(Arc::clone(&scope), || self.inner.call(request));
        Box::pin(async move {
            let closer = CloseOnDrop(Arc::clone(&scope));
            let result = SCOPE.scope(Arc::clone(&scope), future).await;
            drop(closer);
            let mut response = result?;
            if response.status() == StatusCode::INTERNAL_SERVER_ERROR
                && scope.unavailable.load(Ordering::Relaxed)
            {
                *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Ok(response)
        })
    }
}

/// Runs `future` in the scope of the current request (see [`LeaseLayer`]), so that the session
/// operations of a task spawned by a handler use the leases the request holds instead of waiting
/// for them:
///
/// ```no_run
/// # async fn handler(session: tower_sessions::Session) {
/// let task = tokio::spawn(mmap_session_tower_sessions::in_request_scope(async move {
///     session.insert("seen", true).await?;
///     session.save().await
/// }));
/// let _ = task.await;
/// # }
/// ```
///
/// Outside a [`LeaseLayer`], the future runs as it is. Once the request's response is ready, the
/// scope keeps no lease: a task that outlives its request works as without the layer.
pub fn in_request_scope<F: Future>(future: F) -> impl Future<Output = F::Output> {
    let scope = Scope::current();
    async move {
        match scope {
            Some(scope) => SCOPE.scope(scope, future).await,
            None => future.await,
        }
    }
}
