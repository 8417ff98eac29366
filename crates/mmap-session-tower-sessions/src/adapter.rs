//! [`MmapStore`]: the tower-sessions store traits over a [`Store`] file.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use mmap_session_store::{Lease, Store, StoreError};
use tower_sessions_core::session::{Id, Record};
use tower_sessions_core::session_store::{self, ExpiredDeletion, SessionStore};

use crate::error::MmapStoreError;
use crate::lease_layer::{FileKey, Scope};
use crate::record::{decode, encode, key_of, short_hash, store_expiry};

/// How long an operation waits for a session's lease by default. Without a `LeaseLayer` the
/// adapter holds a lease only for the copy of one record in or out (microseconds); inside one, for
/// a whole request, so a wait this long means a queue of slow requests on one session or a stopped
/// process.
const DEFAULT_LEASE_WAIT: Duration = Duration::from_secs(5);

/// The longest wait [`MmapStore::with_lease_wait`] accepts.
const MAX_LEASE_WAIT: Duration = Duration::from_secs(24 * 3600);

/// How many fresh ids [`SessionStore::create`] draws before it gives up. With 128 random bits a
/// second draw is already never needed; the bound only keeps a broken generator from looping
/// forever on the request path.
const MAX_ID_DRAWS: u32 = 32;

/// A tower-sessions store that keeps sessions in a [`Store`] file, shared by every process on the
/// machine that opens the same path.
///
/// Each operation takes the session's busy lease in the file only for the copy of its record
/// (create, save, delete) or not at all (load), so concurrent requests of one session are not
/// serialised: as with every tower-sessions store, the last save of two overlapping requests wins.
/// For sessions that never lose an update, put a [`LeaseLayer`](crate::LeaseLayer) around
/// tower-sessions' layer: inside it, `load` takes the lease and keeps it until the response is
/// ready.
///
/// Runs on tokio, as tower-sessions does: waiting for a busy lease needs a runtime with timers
/// (as `#[tokio::main]` builds), and `delete_expired` uses the blocking pool. Cheap to clone;
/// clones share one mapping.
///
/// # Examples
///
/// ```
/// use mmap_session_tower_sessions::{store::Store, MmapStore};
/// use time::{Duration, OffsetDateTime};
/// use tower_sessions::session::{Id, Record};
/// use tower_sessions::{SessionManagerLayer, SessionStore};
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let store = MmapStore::new(Store::open(dir.path().join("sessions"))?);
///
/// // In an application, the store goes into tower-sessions' layer:
/// let app: axum::Router = axum::Router::new().layer(SessionManagerLayer::new(store.clone()));
///
/// // What the layer does with it:
/// let mut record = Record {
///     id: Id::default(),
///     data: [("user".to_owned(), "ada".into())].into(),
///     expiry_date: OffsetDateTime::now_utc() + Duration::hours(1),
/// };
/// store.create(&mut record).await?;
/// assert_eq!(store.load(&record.id).await?, Some(record.clone()));
/// store.delete(&record.id).await?;
/// assert_eq!(store.load(&record.id).await?, None);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct MmapStore {
    store: Store,
    lease_wait: Duration,
    /// The file's identity, under which a `LeaseLayer` scope keeps its leases.
    file: FileKey,
}

impl MmapStore {
    /// A tower-sessions store over `store`. Every process that serves the same sessions opens the
    /// same path. Use a file of its own: the `mmap-session` layer stores its sessions in another
    /// format, and the two treat each other's records as damaged.
    pub fn new(store: Store) -> Self {
        Self {
            file: FileKey::of(store.path()),
            store,
            lease_wait: DEFAULT_LEASE_WAIT,
        }
    }

    /// How long `create`, `save` and `delete` (and `load` inside a
    /// [`LeaseLayer`](crate::LeaseLayer)) wait for a session's lease held by someone else before
    /// they fail (5 s unless set; a wait longer than a day is cut to a day).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use mmap_session_tower_sessions::{store::Store, MmapStore};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let path = dir.path().join("sessions");
    /// let store = MmapStore::new(Store::open(path)?).with_lease_wait(Duration::from_millis(500));
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_lease_wait(mut self, wait: Duration) -> Self {
        // A deadline is `now + wait`, which must not overflow the clock.
        self.lease_wait = wait.min(MAX_LEASE_WAIT);
        self
    }

    /// The underlying store file (for its statistics, verification or an operator's purge).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Takes the busy lease of `key` for `operation`, waiting without blocking the runtime.
    async fn lease(&self, key: &[u8], operation: &'static str) -> Result<Lease, MmapStoreError> {
        let deadline = Instant::now() + self.lease_wait;
        self.store
            .lease(key, deadline)
            .await
            .map_err(|source| self.failure(key, operation, source))
    }

    fn failure(&self, key: &[u8], operation: &'static str, source: StoreError) -> MmapStoreError {
        let session = short_hash(key);
        match source {
            StoreError::LeaseTimeout => MmapStoreError::LeaseTimeout {
                session,
                operation,
                waited: self.lease_wait,
            },
            StoreError::LeaseLost => MmapStoreError::LeaseLost { session, operation },
            source => MmapStoreError::Store {
                session,
                operation,
                source,
            },
        }
    }

    async fn create_record(&self, record: &mut Record) -> Result<(), MmapStoreError> {
        // The value does not hold the id, so one encoding serves every id drawn.
        let value = encode(record).map_err(|source| MmapStoreError::Encode {
            session: short_hash(&key_of(&record.id)),
            source,
        })?;
        let expires_at = store_expiry(record.expiry_date);
        for _ in 0..MAX_ID_DRAWS {
            let key = key_of(&record.id);
            // Absent-then-commit under the lease: another process creating the same id waits
            // for us and then finds our record.
            let mut lease = self.lease(&key, "create").await?;
            if lease.read().is_none() {
                lease
                    .commit(&value, expires_at)
                    .map_err(|source| self.failure(&key, "create", source))?;
                lease.release();
                return Ok(());
            }
            lease.release();
            tracing::warn!(
                session = %short_hash(&key),
                "a new session drew the id of an existing one; drawing another"
            );
            record.id = Id::default();
        }
        Err(MmapStoreError::NoFreeId(MAX_ID_DRAWS))
    }

    async fn save_record(&self, record: &Record) -> Result<(), MmapStoreError> {
        let key = key_of(&record.id);
        let value = encode(record).map_err(|source| MmapStoreError::Encode {
            session: short_hash(&key),
            source,
        })?;
        let mut lease = self.lease(&key, "save").await?;
        // tower-sessions saves only sessions it loaded; one gone since was deleted (logout,
        // `cycle_id`, `flush` in a concurrent request), expired or evicted, and must not come
        // back.
        if lease.read().is_none() {
            lease.release();
            tracing::debug!(
                session = %short_hash(&key),
                "not saved: the session was deleted, expired or evicted since it was loaded"
            );
            return Ok(());
        }
        lease
            .commit(&value, store_expiry(record.expiry_date))
            .map_err(|source| self.failure(&key, "save", source))?;
        lease.release();
        Ok(())
    }

    fn load_record(&self, id: &Id) -> Option<Record> {
        let key = key_of(id);
        let stored = self.store.get(&key)?;
        self.record_from(id, &key, &stored.value)
    }

    /// The record of session `id` from its stored value; `None` if it has expired by its own
    /// date or is not a tower-sessions record (logged).
    fn record_from(&self, id: &Id, key: &[u8], value: &[u8]) -> Option<Record> {
        match decode(*id, value) {
            // The store's expiry has millisecond resolution; the record's own is exact.
            Ok(record) if record.expiry_date > time::OffsetDateTime::now_utc() => Some(record),
            Ok(_) => None,
            Err(reason) => {
                tracing::warn!(
                    session = %short_hash(key),
                    %reason,
                    "a stored session is not a tower-sessions record; treating it as absent"
                );
                None
            }
        }
    }

    /// `load` inside a [`LeaseLayer`](crate::LeaseLayer) scope: reads the session under its
    /// lease and keeps the lease in the scope until the response is ready.
    async fn load_leased(&self, scope: &Scope, id: &Id) -> Result<Option<Record>, MmapStoreError> {
        let key = key_of(id);
        let file = &self.file;
        let _gate = scope.gate().await;
        // Loaded again in the same request (`Session::load`): read under the lease we hold.
        if let Some(value) = scope.with_held(file, &key, |lease| lease.read()) {
            return Ok(value.and_then(|stored| self.record_from(id, &key, &stored.value)));
        }
        if scope.is_closed() {
            return Ok(self.load_record(id));
        }
        // An id the store does not hold (an old or forged cookie) costs no lease.
        let deadline = Instant::now() + self.lease_wait;
        let Some(lease) = self
            .store
            .lease_existing(&key, deadline)
            .await
            .map_err(|source| self.failure(&key, "load", source))?
        else {
            return Ok(None);
        };
        let record = lease
            .read()
            .and_then(|stored| self.record_from(id, &key, &stored.value));
        if record.is_some() {
            scope.keep(file, key, lease);
        } else {
            // Gone while we waited, or expired or damaged: tower-sessions starts a new session
            // under a fresh id, which needs no lease from us.
            lease.release();
        }
        Ok(record)
    }

    /// `save` inside a scope: through the lease the scope holds for the session, if it holds one.
    async fn save_leased(&self, scope: &Scope, record: &Record) -> Result<(), MmapStoreError> {
        let key = key_of(&record.id);
        let _gate = scope.gate().await;
        let held = scope.with_held(&self.file, &key, |lease| {
            // Only a holder that lost the lease to a take-over can find the record gone.
            if lease.read().is_none() {
                tracing::debug!(
                    session = %short_hash(&key),
                    "not saved: the session was deleted, expired or evicted since it was loaded"
                );
                return Ok(());
            }
            let value = encode(record).map_err(|source| MmapStoreError::Encode {
                session: short_hash(&key),
                source,
            })?;
            lease
                .commit(&value, store_expiry(record.expiry_date))
                .map_err(|source| self.failure(&key, "save", source))
        });
        match held {
            Some(result) => result,
            None => self.save_record(record).await,
        }
    }

    /// `delete` inside a scope: through the lease the scope holds for the session (kept until
    /// the response is ready), if it holds one.
    async fn delete_leased(&self, scope: &Scope, id: &Id) -> Result<(), MmapStoreError> {
        let key = key_of(id);
        let _gate = scope.gate().await;
        let held = scope.with_held(&self.file, &key, |lease| {
            lease
                .remove()
                .map_err(|source| self.failure(&key, "delete", source))
        });
        match held {
            Some(result) => result,
            None => self.delete_record(id).await,
        }
    }

    async fn delete_record(&self, id: &Id) -> Result<(), MmapStoreError> {
        let key = key_of(id);
        // tower-sessions deletes on `flush` without loading first, so the id may come from any
        // cookie: one the store does not hold costs no shard lock and no lease.
        if !self.store.contains(&key) {
            return Ok(());
        }
        let mut lease = self.lease(&key, "delete").await?;
        lease
            .remove()
            .map_err(|source| self.failure(&key, "delete", source))?;
        lease.release();
        Ok(())
    }
}

/// Tells the request's scope, if any, that the store was unavailable, so that the
/// [`LeaseLayer`](crate::LeaseLayer) answers `503`.
fn noted<T>(scope: Option<&Scope>, result: Result<T, MmapStoreError>) -> Result<T, MmapStoreError> {
    if let (Some(scope), Err(error)) = (scope, &result) {
        if error.is_unavailable() {
            scope.mark_unavailable();
        }
    }
    result
}

#[async_trait]
impl SessionStore for MmapStore {
    /// Stores a new session. If its id is already taken (tower-sessions issue #180), draws fresh
    /// ids until one is free and updates `record.id`; the check and the write happen under the
    /// id's lease, so two processes never both create the same id.
    async fn create(&self, record: &mut Record) -> session_store::Result<()> {
        let scope = Scope::current();
        Ok(noted(scope.as_deref(), self.create_record(record).await)?)
    }

    /// Replaces a session's record under its lease. A session that was deleted, has expired or
    /// was evicted since it was loaded is not written back. Inside a
    /// [`LeaseLayer`](crate::LeaseLayer), writes through the lease held since the load.
    async fn save(&self, record: &Record) -> session_store::Result<()> {
        let scope = Scope::current();
        let result = match &scope {
            Some(scope) => self.save_leased(scope, record).await,
            None => self.save_record(record).await,
        };
        Ok(noted(scope.as_deref(), result)?)
    }

    /// Reads a session without taking its lease. Expired, missing and damaged records are all
    /// `None`; a damaged one is logged (by the short hash of its id) as a warning. Inside a
    /// [`LeaseLayer`](crate::LeaseLayer), waits for the session's lease and keeps it until the
    /// response is ready.
    async fn load(&self, id: &Id) -> session_store::Result<Option<Record>> {
        let scope = Scope::current();
        let result = match &scope {
            Some(scope) => self.load_leased(scope, id).await,
            None => Ok(self.load_record(id)),
        };
        Ok(noted(scope.as_deref(), result)?)
    }

    /// Removes a session under its lease. Removing a missing session succeeds. Inside a
    /// [`LeaseLayer`](crate::LeaseLayer), removes through the lease held since the load.
    async fn delete(&self, id: &Id) -> session_store::Result<()> {
        let scope = Scope::current();
        let result = match &scope {
            Some(scope) => self.delete_leased(scope, id).await,
            None => self.delete_record(id).await,
        };
        Ok(noted(scope.as_deref(), result)?)
    }
}

#[async_trait]
impl ExpiredDeletion for MmapStore {
    /// Removes every expired record of the file, on tokio's blocking pool (it walks the whole
    /// index). The store also reclaims expired records on its own, a few at each write, so this
    /// is only needed to free their space sooner.
    async fn delete_expired(&self) -> session_store::Result<()> {
        let store = self.store.clone();
        let removed = tokio::task::spawn_blocking(move || store.purge_expired())
            .await
            .map_err(MmapStoreError::Purge)?;
        tracing::debug!(removed, "expired sessions purged");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[tokio::test]
    async fn an_endless_lease_wait_is_cut_to_a_day_and_operations_still_work() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_with(
            dir.path().join("sessions"),
            mmap_session_store::Options::new().max_sessions(64),
        )
        .unwrap();
        let store = MmapStore::new(store).with_lease_wait(Duration::MAX);
        assert_eq!(store.lease_wait, MAX_LEASE_WAIT);
        let mut record = Record {
            id: Id::default(),
            data: Default::default(),
            expiry_date: time::OffsetDateTime::now_utc() + time::Duration::hours(1),
        };
        store.create(&mut record).await.unwrap();
        store.delete(&record.id).await.unwrap();
    }
}
