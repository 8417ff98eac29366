//! The [`Session`] handle: lazy loading under the store's busy lease, and the operations handlers use.

use std::fmt;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::backend::{BackendError, LayerBackend, LayerLease};
use crate::config::{Config, Expiry};
use crate::cookies;
use crate::envelope;
use crate::error::SessionError;
use crate::id::{LogName, SessionId};
use crate::read_only::ReadOnlySession;

/// What the layer shares with every request: the backend and the configuration.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) backend: LayerBackend,
    pub(crate) config: Config,
    /// What follows `name=value` in every session cookie, formatted once; `None` if the cookie
    /// configuration cannot be written as a header.
    pub(crate) cookie_tail: std::sync::OnceLock<Option<String>>,
}

impl Shared {
    /// The attributes of the session cookie (see [`cookies::attribute_tail`]).
    pub(crate) fn cookie_tail(&self) -> Option<&str> {
        self.cookie_tail
            .get_or_init(|| cookies::attribute_tail(&self.config))
            .as_deref()
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The session of the current request.
///
/// Take it as an extractor in any handler behind a [`SessionLayer`](crate::SessionLayer). It is a
/// cheap clone around an `Arc`; every clone is the same session.
///
/// Nothing happens until the first call that needs the data ([`get`](Session::get),
/// [`insert`](Session::insert), ...): that call takes the session's busy lease in the store (waiting up
/// to [`lease_wait`](crate::SessionLayer::lease_wait) for another request of the same session to
/// finish), copies the record out and decodes it. The lease is held until the response is ready, so two
/// requests of one session, in one process or in several, never lose each other's changes. A handler
/// that never touches the session costs nothing: no store access, no lease, no cookie.
///
/// To read without waiting for (or holding) the lease, use [`Session::read_only`] or the
/// [`ReadOnlySession`] extractor.
///
/// # Examples
///
/// ```
/// use mmap_session::{Session, SessionError};
///
/// async fn visit(session: Session) -> Result<String, SessionError> {
///     let visits: u64 = session.get("visits").await?.unwrap_or(0) + 1;
///     session.insert("visits", visits).await?;
///     Ok(format!("visit number {visits}"))
/// }
/// ```
#[derive(Clone)]
pub struct Session {
    inner: Arc<SessionInner>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id())
            .finish_non_exhaustive()
    }
}

pub(crate) struct SessionInner {
    pub(crate) shared: Arc<Shared>,
    /// The verified id from the request's cookie; not yet known to exist in the store.
    pub(crate) cookie_id: Option<SessionId>,
    // tokio's mutex: the first access holds it across the wait for the store's lease, so that a second
    // access from the same handler waits for that one load instead of leasing again.
    pub(crate) state: tokio::sync::Mutex<State>,
    // std's mutex: `Session::id` is synchronous and this lock is never held across an await.
    id: std::sync::Mutex<Option<SessionId>>,
}

pub(crate) enum State {
    /// Nobody has touched the session yet.
    Unloaded,
    /// Loaded (and, for an existing session, leased).
    Loaded(Box<Loaded>),
    /// Loading failed; every later access gets the same error, and the layer answers with it.
    Failed(SessionError),
    /// The response has been produced (or abandoned); the lease is gone.
    Finished,
}

/// The record this request found for the client's id, with the lease that guards it.
pub(crate) struct Found {
    pub(crate) id: SessionId,
    pub(crate) lease: LayerLease,
    /// The stored bytes, kept to refresh an unchanged session's expiry without re-encoding it.
    pub(crate) raw: Vec<u8>,
    pub(crate) expires_at: SystemTime,
}

pub(crate) struct Loaded {
    /// The client's existing session, if there was one. When `found.id != id`, the session has been
    /// cycled or flushed and the found record must go.
    pub(crate) found: Option<Found>,
    /// The id the session will be saved under.
    pub(crate) id: SessionId,
    pub(crate) data: Map<String, Value>,
    /// This session's own expiry, overriding the layer's.
    pub(crate) expiry: Option<Expiry>,
    /// Data or expiry differ from the record (or the id was cycled).
    pub(crate) modified: bool,
    /// [`Session::set_expiry`] changed the expiry: recompute it and resend the cookie.
    pub(crate) expiry_changed: bool,
    /// The encoded length of `data` and `expiry`, kept up to date change by change so that an insert
    /// costs the size of its value, not of the whole session. Exact for records this layer wrote;
    /// only an estimate for others, which is why a change is refused only after an exact count
    /// (and the save checks the real encoding again).
    pub(crate) size: usize,
}

impl Loaded {
    fn new_session(id: SessionId) -> Self {
        Self {
            found: None,
            id,
            data: Map::new(),
            expiry: None,
            modified: false,
            expiry_changed: false,
            size: envelope::EMPTY_LEN,
        }
    }

    /// Counts the encoded session exactly and refuses it if it is too large.
    fn check_size(&mut self, config: &Config) -> Result<(), SessionError> {
        let len =
            envelope::encoded_len(&self.data, self.expiry).map_err(SessionError::from_serde)?;
        if len > config.max_size {
            tracing::warn!(
                session = %self.id.short_hash(),
                len,
                max = config.max_size,
                "refused a change that would make the session too large"
            );
            return Err(SessionError::TooLarge {
                len,
                max: config.max_size,
            });
        }
        self.size = len;
        Ok(())
    }
}

/// A deadline `wait` from now (far in the future if that overflows).
pub(crate) fn deadline_after(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(wait)
        .or_else(|| now.checked_add(Duration::from_secs(24 * 60 * 60)))
        .unwrap_or(now)
}

pub(crate) fn fresh_id() -> Result<SessionId, SessionError> {
    SessionId::generate().map_err(|error| {
        tracing::error!(%error, "the operating system's random source failed");
        SessionError::Random
    })
}

/// Logs a backend failure (with the session's short hash, never the id) and converts it.
pub(crate) fn backend_failure(session: LogName, what: &str, error: BackendError) -> SessionError {
    match &error {
        BackendError::LeaseTimeout => {
            tracing::warn!(session = %session, "{what}: timed out waiting for the session's lease");
        }
        other => tracing::error!(session = %session, error = %other, "{what}"),
    }
    SessionError::from_backend(error)
}

impl SessionInner {
    /// Loads the client's session under its lease, or starts a new one with a fresh id.
    async fn load(&self) -> Result<Loaded, SessionError> {
        if let Some(client_id) = self.cookie_id {
            if let Some(loaded) = self.load_existing(client_id).await? {
                return Ok(loaded);
            }
        }
        // The client's id, if any, is never adopted: a new session always gets a fresh one.
        Ok(Loaded::new_session(fresh_id()?))
    }

    async fn load_existing(&self, id: SessionId) -> Result<Option<Loaded>, SessionError> {
        let backend = &self.shared.backend;
        let hash = id.log_name();
        // A cookie that names no live session takes no lease at all.
        let deadline = deadline_after(self.shared.config.lease_wait);
        let lease = backend
            .lease_existing(id.as_bytes(), deadline)
            .await
            .map_err(|error| backend_failure(hash, "taking the session's lease failed", error))?;
        let Some(mut lease) = lease else {
            tracing::debug!(session = %hash, "the cookie names no live session; starting a new one");
            return Ok(None);
        };
        let record = match lease.load().await {
            Ok(record) => record,
            Err(error) => {
                lease.release().await;
                return Err(backend_failure(hash, "loading the session failed", error));
            }
        };
        let now = SystemTime::now();
        let Some(record) = record.filter(|record| record.expires_at > now) else {
            lease.release().await;
            tracing::debug!(session = %hash, "the session ended while waiting for its lease; starting a new one");
            return Ok(None);
        };
        match envelope::decode(&record.value) {
            Ok(decoded) => {
                let size = record.value.len();
                tracing::trace!(session = %hash, len = size, "session loaded");
                Ok(Some(Loaded {
                    found: Some(Found {
                        id,
                        lease,
                        raw: record.value,
                        expires_at: record.expires_at,
                    }),
                    id,
                    data: decoded.data,
                    expiry: decoded.expiry,
                    modified: false,
                    expiry_changed: false,
                    size,
                }))
            }
            Err(error) => {
                lease.release().await;
                tracing::warn!(
                    session = %hash,
                    category = ?error.classify(),
                    "a stored session does not decode; starting a new one"
                );
                Ok(None)
            }
        }
    }

    /// Locks the session's state; most accesses find it free, and `try_lock` is cheaper than
    /// going through the lock's future.
    pub(crate) async fn lock_state(&self) -> tokio::sync::MutexGuard<'_, State> {
        match self.state.try_lock() {
            Ok(state) => state,
            Err(_) => self.state.lock().await,
        }
    }

    fn set_id(&self, id: Option<SessionId>) {
        *self.id.lock().unwrap_or_else(PoisonError::into_inner) = id;
    }

    /// If the handler never touched the session, marks it finished and returns true.
    pub(crate) fn finish_if_untouched(&self) -> bool {
        match self.state.try_lock() {
            Ok(mut state) if matches!(*state, State::Unloaded) => {
                *state = State::Finished;
                true
            }
            _ => false,
        }
    }

    /// Ends the session without saving: the response future was dropped (client gone, panic).
    /// Dropping the lease releases it without a change.
    pub(crate) fn abandon(&self) {
        if let Ok(mut state) = self.state.try_lock() {
            let previous = std::mem::replace(&mut *state, State::Finished);
            drop(state);
            if let State::Loaded(loaded) = &previous {
                tracing::debug!(
                    session = %loaded.id.short_hash(),
                    "request abandoned before its response: the session is released unsaved"
                );
            }
            drop(previous);
        }
    }
}

/// Held by the response future: when it is dropped early, the session is abandoned and its lease
/// released, whoever else still holds a clone of the [`Session`].
pub(crate) struct RequestGuard(pub(crate) Arc<SessionInner>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.abandon();
    }
}

impl Session {
    pub(crate) fn new(shared: Arc<Shared>, cookie_id: Option<SessionId>) -> Self {
        Self {
            inner: Arc::new(SessionInner {
                shared,
                cookie_id,
                state: tokio::sync::Mutex::new(State::Unloaded),
                id: std::sync::Mutex::new(None),
            }),
        }
    }

    pub(crate) fn guard(&self) -> RequestGuard {
        RequestGuard(Arc::clone(&self.inner))
    }

    /// Runs `f` on the loaded session, loading it first if this is the first access.
    async fn with_loaded<R>(
        &self,
        f: impl FnOnce(&mut Loaded, &Config) -> Result<R, SessionError>,
    ) -> Result<R, SessionError> {
        let mut state = self.inner.lock_state().await;
        if matches!(*state, State::Unloaded) {
            *state = match self.inner.load().await {
                Ok(loaded) => State::Loaded(Box::new(loaded)),
                Err(error) => State::Failed(error),
            };
        }
        match &mut *state {
            State::Loaded(loaded) => {
                let result = f(loaded, &self.inner.shared.config);
                self.inner.set_id(Some(loaded.id));
                result
            }
            State::Failed(error) => Err(error.clone()),
            State::Finished | State::Unloaded => Err(SessionError::Finished),
        }
    }

    /// The id this session will be saved under, once the session has been accessed; `None` before.
    ///
    /// For a new session this is the fresh id the cookie will carry. The id is a credential: log
    /// [`SessionId::short_hash`], never the id.
    pub fn id(&self) -> Option<SessionId> {
        *self.inner.id.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The value under `key`, decoded as `T`; `None` if there is none.
    ///
    /// # Errors
    ///
    /// [`SessionError::Serde`] if the value does not decode as `T`; load errors (see [`SessionError`]).
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, SessionError> {
        // Decoded from the stored value in place, without copying it first.
        self.with_loaded(|loaded, _| {
            loaded
                .data
                .get(key)
                .map(T::deserialize)
                .transpose()
                .map_err(SessionError::from_serde)
        })
        .await
    }

    /// The JSON value under `key`.
    ///
    /// # Errors
    ///
    /// Load errors (see [`SessionError`]).
    pub async fn get_value(&self, key: &str) -> Result<Option<Value>, SessionError> {
        self.with_loaded(|loaded, _| Ok(loaded.data.get(key).cloned()))
            .await
    }

    /// Stores `value` under `key`.
    ///
    /// # Errors
    ///
    /// [`SessionError::TooLarge`] if the session would exceed
    /// [`max_session_size`](crate::SessionLayer::max_session_size) (the session is left as it was);
    /// [`SessionError::Serde`] if `value` does not serialize; load errors.
    pub async fn insert<T: Serialize>(
        &self,
        key: impl AsRef<str> + Into<String>,
        value: T,
    ) -> Result<(), SessionError> {
        let value = serde_json::to_value(value).map_err(SessionError::from_serde)?;
        self.insert_value(key, value).await.map(drop)
    }

    /// Stores a JSON value under `key` and returns the previous one.
    ///
    /// # Errors
    ///
    /// As [`Session::insert`].
    pub async fn insert_value(
        &self,
        key: impl AsRef<str> + Into<String>,
        value: Value,
    ) -> Result<Option<Value>, SessionError> {
        self.with_loaded(move |loaded, config| {
            let name = key.as_ref();
            let estimate = match loaded.data.get(name) {
                Some(previous) if *previous == value => return Ok(Some(value)),
                Some(previous) => loaded
                    .size
                    .saturating_sub(envelope::entry_len(name, previous)),
                // A new entry, and a comma if it is not the only one.
                None => loaded
                    .size
                    .saturating_add(usize::from(!loaded.data.is_empty())),
            }
            .saturating_add(envelope::entry_len(name, &value));
            if estimate <= config.max_size {
                loaded.size = estimate;
                loaded.modified = true;
                // An existing key keeps its `String`: only a new key is allocated.
                return Ok(match loaded.data.get_mut(name) {
                    Some(slot) => Some(std::mem::replace(slot, value)),
                    None => loaded.data.insert(key.into(), value),
                });
            }
            // Maybe too large: count exactly, and put the old value back if it is.
            let key: String = key.into();
            let previous = loaded.data.insert(key.clone(), value);
            if let Err(error) = loaded.check_size(config) {
                match previous {
                    Some(previous) => loaded.data.insert(key, previous),
                    None => loaded.data.remove(&key),
                };
                return Err(error);
            }
            loaded.modified = true;
            Ok(previous)
        })
        .await
    }

    /// Removes `key` and returns its value decoded as `T`.
    ///
    /// # Errors
    ///
    /// [`SessionError::Serde`] if the removed value does not decode as `T` (it is removed all the
    /// same); load errors.
    pub async fn remove<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, SessionError> {
        match self.remove_value(key).await? {
            Some(value) => serde_json::from_value(value)
                .map(Some)
                .map_err(SessionError::from_serde),
            None => Ok(None),
        }
    }

    /// Removes `key` and returns its JSON value.
    ///
    /// # Errors
    ///
    /// Load errors (see [`SessionError`]).
    pub async fn remove_value(&self, key: &str) -> Result<Option<Value>, SessionError> {
        self.with_loaded(|loaded, _| {
            let removed = loaded.data.remove(key);
            if let Some(value) = &removed {
                loaded.size = loaded
                    .size
                    .saturating_sub(envelope::entry_len(key, value))
                    .saturating_sub(usize::from(!loaded.data.is_empty()));
                loaded.modified = true;
            }
            Ok(removed)
        })
        .await
    }

    /// Removes every key. An emptied session is deleted from the store when the response is ready,
    /// and its cookie is expired.
    ///
    /// # Errors
    ///
    /// Load errors (see [`SessionError`]).
    pub async fn clear(&self) -> Result<(), SessionError> {
        self.with_loaded(|loaded, _| {
            if !loaded.data.is_empty() {
                loaded.data.clear();
                loaded.size =
                    envelope::EMPTY_LEN.saturating_add(envelope::expiry_len(loaded.expiry));
                loaded.modified = true;
            }
            Ok(())
        })
        .await
    }

    /// True if the session holds no key.
    ///
    /// # Errors
    ///
    /// Load errors (see [`SessionError`]).
    pub async fn is_empty(&self) -> Result<bool, SessionError> {
        self.with_loaded(|loaded, _| Ok(loaded.data.is_empty()))
            .await
    }

    /// True if this request changed the session (data, expiry or id), so it will be written when
    /// the response is ready.
    ///
    /// # Errors
    ///
    /// Load errors (see [`SessionError`]).
    pub async fn is_modified(&self) -> Result<bool, SessionError> {
        self.with_loaded(|loaded, _| {
            let moved = loaded
                .found
                .as_ref()
                .is_some_and(|found| found.id != loaded.id);
            Ok(loaded.modified || moved)
        })
        .await
    }

    /// Ends the session (for logout): when the response is ready, the record is deleted and the cookie
    /// expired.
    ///
    /// The handle goes on as a new, empty session with a fresh id: anything inserted after `flush`
    /// (a "signed out" message, say) is saved under that new id, never under the old one. A request
    /// that still holds the old cookie later finds no record and starts afresh, so a flushed session
    /// never comes back.
    ///
    /// # Errors
    ///
    /// Load errors (see [`SessionError`]).
    pub async fn flush(&self) -> Result<(), SessionError> {
        let new_id = fresh_id()?;
        self.with_loaded(move |loaded, _| {
            loaded.data.clear();
            loaded.expiry = None;
            loaded.size = envelope::EMPTY_LEN;
            loaded.modified = false;
            loaded.expiry_changed = false;
            loaded.id = new_id;
            Ok(())
        })
        .await
    }

    /// Gives the session a new id and keeps its data (call it at login, against session fixation).
    ///
    /// When the response is ready, the layer leases the new id, commits the data there, then removes
    /// the old record, and sends the new cookie. If any step fails, the old record is kept intact, the
    /// new one is removed again, and the client gets an error response: the session is never lost.
    ///
    /// # Errors
    ///
    /// Load errors (see [`SessionError`]).
    pub async fn cycle_id(&self) -> Result<(), SessionError> {
        let new_id = fresh_id()?;
        self.with_loaded(move |loaded, _| {
            loaded.id = new_id;
            loaded.modified = true;
            Ok(())
        })
        .await
    }

    /// This session's expiry: its own if set with [`Session::set_expiry`], else the layer's.
    ///
    /// # Errors
    ///
    /// Load errors (see [`SessionError`]).
    pub async fn expiry(&self) -> Result<Expiry, SessionError> {
        self.with_loaded(|loaded, config| Ok(loaded.expiry.unwrap_or(config.expiry)))
            .await
    }

    /// Gives this session its own expiry (`None`: back to the layer's). It is stored with the session,
    /// and the cookie is re-sent to match.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use mmap_session::{Expiry, Session, SessionError};
    ///
    /// // "Remember me": a month of inactivity instead of the layer's default.
    /// async fn remember_me(session: Session) -> Result<(), SessionError> {
    ///     let month = Duration::from_secs(30 * 24 * 60 * 60);
    ///     session.set_expiry(Some(Expiry::OnInactivity(month))).await
    /// }
    /// ```
    ///
    /// # Errors
    ///
    /// Load errors (see [`SessionError`]).
    pub async fn set_expiry(&self, expiry: Option<Expiry>) -> Result<(), SessionError> {
        self.with_loaded(move |loaded, _| {
            if loaded.expiry != expiry {
                loaded.size = loaded
                    .size
                    .saturating_sub(envelope::expiry_len(loaded.expiry))
                    .saturating_add(envelope::expiry_len(expiry));
                loaded.expiry = expiry;
                loaded.modified = true;
                loaded.expiry_changed = true;
            }
            Ok(())
        })
        .await
    }

    /// The whole session decoded as one `T` (for sessions kept as one serde struct); `None` if the
    /// session is empty. See also [`TypedSession`](crate::TypedSession).
    ///
    /// # Errors
    ///
    /// [`SessionError::Serde`] if the session does not decode as `T`; load errors.
    pub async fn data<T: DeserializeOwned>(&self) -> Result<Option<T>, SessionError> {
        let map = self
            .with_loaded(|loaded, _| Ok(loaded.data.clone()))
            .await?;
        if map.is_empty() {
            return Ok(None);
        }
        serde_json::from_value(Value::Object(map))
            .map(Some)
            .map_err(SessionError::from_serde)
    }

    /// Replaces the whole session with `value`, which must serialize to a JSON object (a struct or a
    /// map). A value that serializes to an empty object empties the session (which deletes it).
    ///
    /// # Errors
    ///
    /// [`SessionError::NotAnObject`], [`SessionError::TooLarge`] (the session is left as it was),
    /// [`SessionError::Serde`]; load errors.
    pub async fn set_data<T: Serialize>(&self, value: &T) -> Result<(), SessionError> {
        let Value::Object(map) = serde_json::to_value(value).map_err(SessionError::from_serde)?
        else {
            return Err(SessionError::NotAnObject);
        };
        self.with_loaded(move |loaded, config| {
            if loaded.data == map {
                return Ok(());
            }
            let previous = std::mem::replace(&mut loaded.data, map);
            if let Err(error) = loaded.check_size(config) {
                loaded.data = previous;
                return Err(error);
            }
            loaded.modified = true;
            Ok(())
        })
        .await
    }

    /// A snapshot of the session that neither waits for nor takes the busy lease.
    ///
    /// If this request already holds the session, the snapshot is its current (possibly changed) data.
    /// Otherwise it is the last committed state, read lock-free from the store: a request that only
    /// reads does not queue behind another request of the same session (parallel page fragments, say),
    /// at the price of maybe missing that request's pending change. Taking a snapshot does not touch
    /// the session: it sets no cookie, and nothing is saved.
    ///
    /// # Errors
    ///
    /// [`SessionError::Store`] if the store failed.
    pub async fn read_only(&self) -> Result<ReadOnlySession, SessionError> {
        if let Ok(state) = self.inner.state.try_lock() {
            match &*state {
                State::Loaded(loaded) => {
                    return Ok(ReadOnlySession::new(
                        Some(loaded.id),
                        Arc::new(loaded.data.clone()),
                    ));
                }
                State::Finished => return Err(SessionError::Finished),
                State::Unloaded | State::Failed(_) => {}
            }
        }
        let Some(id) = self.inner.cookie_id else {
            return Ok(ReadOnlySession::empty());
        };
        let hash = id.log_name();
        let record = self
            .inner
            .shared
            .backend
            .get_unleased(id.as_bytes())
            .await
            .map_err(|error| backend_failure(hash, "reading the session failed", error))?;
        let now = SystemTime::now();
        let Some(record) = record.filter(|record| record.expires_at > now) else {
            return Ok(ReadOnlySession::empty());
        };
        match envelope::decode(&record.value) {
            Ok(decoded) => Ok(ReadOnlySession::new(Some(id), Arc::new(decoded.data))),
            Err(error) => {
                tracing::warn!(
                    session = %hash,
                    category = ?error.classify(),
                    "a stored session does not decode; reading it as empty"
                );
                Ok(ReadOnlySession::empty())
            }
        }
    }
}
