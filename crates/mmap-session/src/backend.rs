//! The layer's view of storage: a small trait, implemented here for the memory-mapped store.
//!
//! The layer needs five things from storage: take a session's busy lease (waiting up to a deadline),
//! read the record under it, overwrite or remove the record under it, give the lease back, and read
//! the last committed record without any lease (the read-only path). [`SessionBackend`] and
//! [`BackendLease`] say exactly that, so another backend (say, Redis for sessions spread over several
//! machines) can be added without touching the layer.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use mmap_session_store::{Durability, Lease, Store, StoreError};

/// A stored session record: the encoded session and its absolute expiry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRecord {
    /// The bytes the layer committed.
    pub value: Vec<u8>,
    /// When the record stops existing.
    pub expires_at: SystemTime,
}

/// Why a backend operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The lease was still held by someone else when the wait deadline passed.
    #[error("timed out waiting for the session's lease")]
    LeaseTimeout,
    /// The lease was taken over (it was held too long); nothing was written.
    #[error("the session's lease was lost before the write; nothing was written")]
    LeaseLost,
    /// The store has no room and nothing could be evicted.
    #[error("the session store is full")]
    StoreFull,
    /// The record is larger than the backend accepts.
    #[error("the session record has {len} bytes; the store accepts at most {max}")]
    TooLarge {
        /// Size of the record in bytes.
        len: usize,
        /// The backend's limit.
        max: usize,
    },
    /// The storage cannot be reached now (its server is down, restarting or cut off); the same
    /// operation may succeed once it is back. The layer answers `503`.
    #[error("the session store is unavailable: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// An I/O error in the backend.
    #[error("session store I/O error")]
    Io(#[source] std::io::Error),
    /// Any other backend failure.
    #[error("session backend error")]
    Other(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl From<StoreError> for BackendError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::LeaseTimeout => BackendError::LeaseTimeout,
            StoreError::LeaseLost => BackendError::LeaseLost,
            StoreError::StoreFull => BackendError::StoreFull,
            StoreError::TooLarge { len, max } => BackendError::TooLarge { len, max },
            StoreError::Io(error) => BackendError::Io(error),
            other => BackendError::Other(Box::new(other)),
        }
    }
}

/// Storage for sessions, keyed by opaque bytes (the layer uses [`SessionId::as_bytes`]).
///
/// [`SessionId::as_bytes`]: crate::SessionId::as_bytes
///
/// # Contract
///
/// - At most one [`BackendLease`] per key exists at a time, across every process that shares the
///   storage; [`SessionBackend::lease`] waits (asynchronously, without blocking the runtime) until it
///   can take it or `deadline` passes, and then fails with [`BackendError::LeaseTimeout`].
/// - A key may be leased whether or not a record exists for it.
/// - Expired records are never returned.
/// - [`SessionBackend::get_unleased`] neither waits for nor takes the lease and returns the last
///   committed record.
pub trait SessionBackend: Send + Sync + 'static {
    /// The busy lease on one key.
    type Lease: BackendLease;

    /// Takes the busy lease on `key`, waiting until `deadline` at most.
    fn lease(
        &self,
        key: &[u8],
        deadline: Instant,
    ) -> impl Future<Output = Result<Self::Lease, BackendError>> + Send;

    /// Reads the last committed record of `key` without the lease.
    fn get_unleased(
        &self,
        key: &[u8],
    ) -> impl Future<Output = Result<Option<StoredRecord>, BackendError>> + Send;

    /// Whether `key` has a live record, without the lease (the layer asks before leasing the id
    /// of a cookie, so that unknown ids never take a lease). The default reads the record;
    /// backends can answer more cheaply.
    fn exists(&self, key: &[u8]) -> impl Future<Output = Result<bool, BackendError>> + Send {
        let read = self.get_unleased(key);
        async move { Ok(read.await?.is_some()) }
    }

    /// Takes the busy lease on `key` as [`SessionBackend::lease`] does, but only if `key` has a
    /// live record ([`SessionBackend::exists`]); `None`, without any lease, if it has none. The
    /// layer leases a cookie's id this way. The default asks `exists`, then leases; backends can
    /// do both in one step.
    fn lease_existing(
        &self,
        key: &[u8],
        deadline: Instant,
    ) -> impl Future<Output = Result<Option<Self::Lease>, BackendError>> + Send {
        async move {
            if !self.exists(key).await? {
                return Ok(None);
            }
            self.lease(key, deadline).await.map(Some)
        }
    }

    /// Stores `value` under `key` as a new record if `key` is free; `Ok(false)`, with nothing
    /// written, if it is in use (it has a live record, or a lease that someone else holds).
    /// The layer saves a new session this way, drawing another id on `false`.
    ///
    /// A backend that may run one call twice (a network client sending a command again after
    /// its reply was lost) answers `true` when the first run wrote and nobody used the key since,
    /// and never writes a record back that was removed meanwhile (it may then answer `false`).
    ///
    /// The default takes the lease (waiting until `deadline` at most), reads the record and
    /// commits under it. A networked backend overrides it to do the check and the write in one
    /// round trip, answering `false` at once where the default would wait for the lease.
    fn insert_new(
        &self,
        key: &[u8],
        value: &[u8],
        expires_at: SystemTime,
        deadline: Instant,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send {
        insert_under_lease(self, key, value, expires_at, deadline)
    }
}

/// [`SessionBackend::insert_new`] by the default way: under the key's lease, if it holds no
/// record.
async fn insert_under_lease<B: SessionBackend + ?Sized>(
    backend: &B,
    key: &[u8],
    value: &[u8],
    expires_at: SystemTime,
    deadline: Instant,
) -> Result<bool, BackendError> {
    let mut lease = backend.lease(key, deadline).await?;
    match lease.load().await {
        Ok(None) => {}
        Ok(Some(_)) => {
            lease.release().await;
            return Ok(false);
        }
        Err(error) => {
            lease.release().await;
            return Err(error);
        }
    }
    lease.commit_and_release(value, expires_at).await?;
    Ok(true)
}

/// A held busy lease on one key.
///
/// # Contract
///
/// Dropping the lease releases it without changing the record, like [`BackendLease::release`]: the
/// layer relies on this when a handler panics or a response future is dropped. Writes are fenced: once
/// the lease has been taken over by someone else, [`BackendLease::commit`] and
/// [`BackendLease::remove`] fail with [`BackendError::LeaseLost`] and write nothing.
pub trait BackendLease: Send + 'static {
    /// The record under the lease, copied out; `None` if absent or expired.
    fn load(&mut self) -> impl Future<Output = Result<Option<StoredRecord>, BackendError>> + Send;

    /// Replaces the record (crash-atomically: old or new, never between).
    fn commit(
        &mut self,
        value: &[u8],
        expires_at: SystemTime,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Deletes the record.
    fn remove(&mut self) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Gives the lease back; the next waiter gets it at once.
    fn release(self) -> impl Future<Output = ()> + Send;

    /// [`BackendLease::commit`], then [`BackendLease::release`] whatever the commit's outcome. The
    /// layer ends a changing request with it; a networked backend overrides it to do both in one
    /// round trip.
    fn commit_and_release(
        mut self,
        value: &[u8],
        expires_at: SystemTime,
    ) -> impl Future<Output = Result<(), BackendError>> + Send
    where
        Self: Sized,
    {
        async move {
            let result = self.commit(value, expires_at).await;
            self.release().await;
            result
        }
    }

    /// [`BackendLease::remove`], then [`BackendLease::release`] whatever the removal's outcome; like
    /// [`BackendLease::commit_and_release`].
    fn remove_and_release(mut self) -> impl Future<Output = Result<(), BackendError>> + Send
    where
        Self: Sized,
    {
        async move {
            let result = self.remove().await;
            self.release().await;
            result
        }
    }
}

impl SessionBackend for Store {
    type Lease = Lease;

    async fn lease(&self, key: &[u8], deadline: Instant) -> Result<Lease, BackendError> {
        Ok(Store::lease(self, key, deadline).await?)
    }

    async fn exists(&self, key: &[u8]) -> Result<bool, BackendError> {
        Ok(Store::contains(self, key))
    }

    async fn lease_existing(
        &self,
        key: &[u8],
        deadline: Instant,
    ) -> Result<Option<Lease>, BackendError> {
        Ok(Store::lease_existing(self, key, deadline).await?)
    }

    async fn get_unleased(&self, key: &[u8]) -> Result<Option<StoredRecord>, BackendError> {
        Ok(Store::get(self, key).map(|record| StoredRecord {
            value: record.value,
            expires_at: record.expires_at,
        }))
    }
}

impl BackendLease for Lease {
    async fn load(&mut self) -> Result<Option<StoredRecord>, BackendError> {
        Ok(self.read().map(|record| StoredRecord {
            value: record.value,
            expires_at: record.expires_at,
        }))
    }

    async fn commit(&mut self, value: &[u8], expires_at: SystemTime) -> Result<(), BackendError> {
        Ok(Lease::commit(self, value, expires_at)?)
    }

    async fn remove(&mut self) -> Result<(), BackendError> {
        Ok(Lease::remove(self)?)
    }

    async fn release(self) {
        Lease::release(self);
    }
}

/// The layer's handle on its backend. The memory-mapped [`Store`] is called directly: its
/// lease operations are synchronous, so going through [`DynBackend`] would only box a future
/// and a lease per operation. Any other backend goes through [`DynBackend`].
#[derive(Clone)]
pub(crate) enum LayerBackend {
    File(Store),
    Other(Arc<dyn DynBackend>),
}

impl LayerBackend {
    pub(crate) fn new<B: SessionBackend>(backend: B) -> Self {
        match (&backend as &dyn Any).downcast_ref::<Store>() {
            // A clone shares the mapping; `backend` itself is dropped.
            Some(store) => Self::File(store.clone()),
            None => Self::Other(Arc::new(backend)),
        }
    }

    /// [`SessionBackend::lease`].
    pub(crate) async fn lease(
        &self,
        key: &[u8],
        deadline: Instant,
    ) -> Result<LayerLease, BackendError> {
        match self {
            Self::File(store) => Ok(LayerLease::file(store, store.lease(key, deadline).await?)),
            Self::Other(backend) => Ok(LayerLease::Other(backend.lease_dyn(key, deadline).await?)),
        }
    }

    /// [`SessionBackend::lease_existing`].
    pub(crate) async fn lease_existing(
        &self,
        key: &[u8],
        deadline: Instant,
    ) -> Result<Option<LayerLease>, BackendError> {
        match self {
            Self::File(store) => Ok(store
                .lease_existing(key, deadline)
                .await?
                .map(|lease| LayerLease::file(store, lease))),
            Self::Other(backend) => Ok(backend
                .lease_existing_dyn(key, deadline)
                .await?
                .map(LayerLease::Other)),
        }
    }

    /// [`SessionBackend::insert_new`]. The file store does it under its lease, through
    /// [`LayerLease`], so that a store that syncs each commit does so on the blocking pool.
    pub(crate) async fn insert_new(
        &self,
        key: &[u8],
        value: &[u8],
        expires_at: SystemTime,
        deadline: Instant,
    ) -> Result<bool, BackendError> {
        match self {
            Self::File(store) => insert_under_lease(store, key, value, expires_at, deadline).await,
            Self::Other(backend) => {
                backend
                    .insert_new_dyn(key, value, expires_at, deadline)
                    .await
            }
        }
    }

    /// [`SessionBackend::get_unleased`].
    pub(crate) async fn get_unleased(
        &self,
        key: &[u8],
    ) -> Result<Option<StoredRecord>, BackendError> {
        match self {
            Self::File(store) => SessionBackend::get_unleased(store, key).await,
            Self::Other(backend) => backend.get_unleased_dyn(key).await,
        }
    }
}

/// A lease taken through a [`LayerBackend`].
pub(crate) enum LayerLease {
    File(Lease),
    /// A lease of a store that forces each commit to the disk ([`Durability::OnCommit`]): its
    /// writes wait for the disk, so they run on tokio's blocking pool, never on a runtime
    /// worker. `None` only while a write has it.
    FileSynced(Option<Lease>),
    Other(Box<dyn DynLease>),
}

/// Runs a write of a [`LayerLease::FileSynced`] lease on the blocking pool. If the caller stops
/// waiting, the write still completes there, and the lease is released when it is dropped.
async fn on_blocking_pool<R: Send + 'static>(
    lease: Lease,
    write: impl FnOnce(&mut Lease) -> R + Send + 'static,
) -> Result<(Lease, R), BackendError> {
    tokio::task::spawn_blocking(move || {
        let mut lease = lease;
        let result = write(&mut lease);
        (lease, result)
    })
    .await
    .map_err(|error| BackendError::Other(Box::new(error)))
}

impl LayerLease {
    fn file(store: &Store, lease: Lease) -> Self {
        if store.durability() == Durability::OnCommit {
            Self::FileSynced(Some(lease))
        } else {
            Self::File(lease)
        }
    }

    /// Takes a [`LayerLease::FileSynced`] lease out for a write.
    fn take_synced(slot: &mut Option<Lease>) -> Result<Lease, BackendError> {
        // Only a write that was cancelled midway leaves the slot empty; its lease went with it.
        slot.take().ok_or(BackendError::LeaseLost)
    }

    /// [`BackendLease::load`].
    pub(crate) async fn load(&mut self) -> Result<Option<StoredRecord>, BackendError> {
        match self {
            Self::File(lease) => BackendLease::load(lease).await,
            Self::FileSynced(Some(lease)) => BackendLease::load(lease).await,
            Self::FileSynced(None) => Err(BackendError::LeaseLost),
            Self::Other(lease) => lease.load_dyn().await,
        }
    }

    /// [`BackendLease::commit`].
    pub(crate) async fn commit(
        &mut self,
        value: &[u8],
        expires_at: SystemTime,
    ) -> Result<(), BackendError> {
        match self {
            Self::File(lease) => Ok(lease.commit(value, expires_at)?),
            Self::FileSynced(slot) => {
                let value = value.to_vec();
                let (lease, result) = on_blocking_pool(Self::take_synced(slot)?, move |lease| {
                    lease.commit(&value, expires_at)
                })
                .await?;
                *slot = Some(lease);
                Ok(result?)
            }
            Self::Other(lease) => lease.commit_dyn(value, expires_at).await,
        }
    }

    /// [`BackendLease::remove`].
    pub(crate) async fn remove(&mut self) -> Result<(), BackendError> {
        match self {
            Self::File(lease) => Ok(lease.remove()?),
            Self::FileSynced(slot) => {
                let (lease, result) =
                    on_blocking_pool(Self::take_synced(slot)?, |lease| lease.remove()).await?;
                *slot = Some(lease);
                Ok(result?)
            }
            Self::Other(lease) => lease.remove_dyn().await,
        }
    }

    /// [`BackendLease::release`].
    pub(crate) async fn release(self) {
        match self {
            Self::File(lease) | Self::FileSynced(Some(lease)) => lease.release(),
            Self::FileSynced(None) => {}
            Self::Other(lease) => lease.release_dyn().await,
        }
    }

    /// [`BackendLease::commit_and_release`].
    pub(crate) async fn commit_and_release(
        self,
        value: &[u8],
        expires_at: SystemTime,
    ) -> Result<(), BackendError> {
        match self {
            Self::File(mut lease) => {
                let result = lease.commit(value, expires_at);
                lease.release();
                Ok(result?)
            }
            Self::FileSynced(mut slot) => {
                let value = value.to_vec();
                let (lease, result) =
                    on_blocking_pool(Self::take_synced(&mut slot)?, move |lease| {
                        lease.commit(&value, expires_at)
                    })
                    .await?;
                lease.release();
                Ok(result?)
            }
            Self::Other(lease) => lease.commit_and_release_dyn(value, expires_at).await,
        }
    }

    /// [`BackendLease::remove_and_release`].
    pub(crate) async fn remove_and_release(self) -> Result<(), BackendError> {
        match self {
            Self::File(mut lease) => {
                let result = lease.remove();
                lease.release();
                Ok(result?)
            }
            Self::FileSynced(mut slot) => {
                let (lease, result) =
                    on_blocking_pool(Self::take_synced(&mut slot)?, |lease| lease.remove()).await?;
                lease.release();
                Ok(result?)
            }
            Self::Other(lease) => lease.remove_and_release_dyn().await,
        }
    }
}

/// A boxed, sendable future.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// [`SessionBackend`] with its types erased, so that `Session` and the layer are not generic.
pub(crate) trait DynBackend: Send + Sync + 'static {
    fn lease_dyn<'a>(
        &'a self,
        key: &'a [u8],
        deadline: Instant,
    ) -> BoxFuture<'a, Result<Box<dyn DynLease>, BackendError>>;

    fn get_unleased_dyn<'a>(
        &'a self,
        key: &'a [u8],
    ) -> BoxFuture<'a, Result<Option<StoredRecord>, BackendError>>;

    fn lease_existing_dyn<'a>(
        &'a self,
        key: &'a [u8],
        deadline: Instant,
    ) -> BoxFuture<'a, Result<Option<Box<dyn DynLease>>, BackendError>>;

    fn insert_new_dyn<'a>(
        &'a self,
        key: &'a [u8],
        value: &'a [u8],
        expires_at: SystemTime,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<bool, BackendError>>;
}

impl<B: SessionBackend> DynBackend for B {
    fn lease_dyn<'a>(
        &'a self,
        key: &'a [u8],
        deadline: Instant,
    ) -> BoxFuture<'a, Result<Box<dyn DynLease>, BackendError>> {
        Box::pin(async move {
            let lease = SessionBackend::lease(self, key, deadline).await?;
            Ok(Box::new(lease) as Box<dyn DynLease>)
        })
    }

    fn get_unleased_dyn<'a>(
        &'a self,
        key: &'a [u8],
    ) -> BoxFuture<'a, Result<Option<StoredRecord>, BackendError>> {
        Box::pin(SessionBackend::get_unleased(self, key))
    }

    fn lease_existing_dyn<'a>(
        &'a self,
        key: &'a [u8],
        deadline: Instant,
    ) -> BoxFuture<'a, Result<Option<Box<dyn DynLease>>, BackendError>> {
        Box::pin(async move {
            let lease = SessionBackend::lease_existing(self, key, deadline).await?;
            Ok(lease.map(|lease| Box::new(lease) as Box<dyn DynLease>))
        })
    }

    fn insert_new_dyn<'a>(
        &'a self,
        key: &'a [u8],
        value: &'a [u8],
        expires_at: SystemTime,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<bool, BackendError>> {
        Box::pin(SessionBackend::insert_new(
            self, key, value, expires_at, deadline,
        ))
    }
}

/// [`BackendLease`] with its type erased.
pub(crate) trait DynLease: Send + 'static {
    fn load_dyn(&mut self) -> BoxFuture<'_, Result<Option<StoredRecord>, BackendError>>;
    fn commit_dyn<'a>(
        &'a mut self,
        value: &'a [u8],
        expires_at: SystemTime,
    ) -> BoxFuture<'a, Result<(), BackendError>>;
    fn remove_dyn(&mut self) -> BoxFuture<'_, Result<(), BackendError>>;
    fn release_dyn(self: Box<Self>) -> BoxFuture<'static, ()>;
    fn commit_and_release_dyn<'a>(
        self: Box<Self>,
        value: &'a [u8],
        expires_at: SystemTime,
    ) -> BoxFuture<'a, Result<(), BackendError>>;
    fn remove_and_release_dyn(self: Box<Self>) -> BoxFuture<'static, Result<(), BackendError>>;
}

impl<L: BackendLease> DynLease for L {
    fn load_dyn(&mut self) -> BoxFuture<'_, Result<Option<StoredRecord>, BackendError>> {
        Box::pin(BackendLease::load(self))
    }

    fn commit_dyn<'a>(
        &'a mut self,
        value: &'a [u8],
        expires_at: SystemTime,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(BackendLease::commit(self, value, expires_at))
    }

    fn remove_dyn(&mut self) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(BackendLease::remove(self))
    }

    fn release_dyn(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(BackendLease::release(*self))
    }

    fn commit_and_release_dyn<'a>(
        self: Box<Self>,
        value: &'a [u8],
        expires_at: SystemTime,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(BackendLease::commit_and_release(*self, value, expires_at))
    }

    fn remove_and_release_dyn(self: Box<Self>) -> BoxFuture<'static, Result<(), BackendError>> {
        Box::pin(BackendLease::remove_and_release(*self))
    }
}
