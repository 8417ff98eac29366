//! The [`Session`] handle: lazy loading under the store's busy lease, and the operations handlers use.

use std::fmt;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::backend::{BackendError, LayerBackend, LayerLease};
use crate::config::{Config, Expiry};
use crate::cookies::{self, Candidates, InvalidCookieConfig};
use crate::envelope::{self, EncodeError, Stored};
use crate::error::SessionError;
use crate::id::{LogName, SessionId};
use crate::metrics::{self, Outcome};
use crate::read_only::ReadOnlySession;

/// What the layer shares with every request: the backend and the configuration.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) backend: LayerBackend,
    pub(crate) config: Config,
    /// What follows `name=value` in every session cookie, formatted once; an error if the cookie
    /// configuration cannot be sent.
    pub(crate) cookie_tail: std::sync::OnceLock<Result<String, InvalidCookieConfig>>,
    /// Stored sessions found undecodable, by every clone of the layer.
    pub(crate) undecodable: Arc<AtomicU64>,
    /// The task recording the store's gauges has been started (see [`metrics::start_gauges`]).
    pub(crate) gauges: Arc<AtomicBool>,
}

impl Shared {
    /// The attributes of the session cookie (see [`cookies::attribute_tail`]).
    pub(crate) fn cookie_tail(&self) -> Result<&str, InvalidCookieConfig> {
        match self
            .cookie_tail
            .get_or_init(|| cookies::attribute_tail(&self.config))
        {
            Ok(tail) => Ok(tail),
            Err(error) => Err(*error),
        }
    }

    /// True after the first call: whether the gauges' task was started already.
    pub(crate) fn gauges_started(&self) -> bool {
        self.gauges.load(Ordering::Relaxed) || self.gauges.swap(true, Ordering::Relaxed)
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
    /// The verified ids from the request's cookies; not yet known to exist in the store.
    pub(crate) cookie: Candidates,
    /// The request is over (answered or abandoned): whoever holds the state when this is set
    /// settles what is left (see [`SessionInner::abandon`]).
    abandoned: AtomicBool,
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
    /// The request carried a session cookie that names no session (malformed, unknown, ended):
    /// expire it if nothing else is sent.
    pub(crate) stale_cookie: bool,
    /// The cookie's session was replaced by another request moments ago (see
    /// [`SessionError::Replaced`]): nothing may change, nothing is saved, no cookie is sent.
    pub(crate) replaced: bool,
    /// [`Session::cycle_id`] was called: a login. On a cookie that names no session, the save
    /// leaves the replaced marker under the cookie's keys.
    pub(crate) cycled: bool,
    /// [`Session::flush`] was called: a logout. On a cookie replaced by a login moments ago, the
    /// save sends the removal all the same (the user asked to be logged out).
    pub(crate) flushed: bool,
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
            stale_cookie: false,
            replaced: false,
            cycled: false,
            flushed: false,
            size: envelope::EMPTY_LEN,
        }
    }

    /// Refuses any change to a session another request replaced.
    fn check_changeable(&self) -> Result<(), SessionError> {
        if self.replaced {
            return Err(SessionError::Replaced);
        }
        Ok(())
    }

    /// Counts the encoded session exactly and refuses it if it is too large or would not read
    /// back.
    fn check_size(&mut self, config: &Config) -> Result<(), SessionError> {
        let len = envelope::encoded_len(&self.data, self.expiry).map_err(|error| {
            let error = encode_failure(error);
            if matches!(error, SessionError::TooDeep { .. }) {
                tracing::warn!(
                    session = %self.id.short_hash(),
                    "refused a value nested too deep to be read back"
                );
            }
            error
        })?;
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

/// The error a handler sees for a session that does not encode.
pub(crate) fn encode_failure(error: EncodeError) -> SessionError {
    match error {
        EncodeError::TooDeep => SessionError::TooDeep {
            max: envelope::MAX_VALUE_DEPTH,
        },
        EncodeError::Json(error) => SessionError::from_serde(error),
    }
}

/// What a cookie's id leads to.
enum Existing {
    /// A live session, leased.
    Found(Box<Loaded>),
    /// Nothing live.
    Absent,
    /// The marker of a session another request replaced moments ago.
    Replaced,
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
            metrics::lease_timeout();
            tracing::warn!(session = %session, "{what}: timed out waiting for the session's lease");
        }
        other => tracing::error!(session = %session, error = %other, "{what}"),
    }
    SessionError::from_backend(error)
}

impl SessionInner {
    /// Loads the client's session under its lease, or starts a new one with a fresh id. The
    /// cookie's candidates are tried in order until one names a live session.
    async fn load(&self) -> Result<Loaded, SessionError> {
        let mut replaced = false;
        for client_id in self.cookie.ids() {
            match self.load_existing(client_id).await? {
                Existing::Found(loaded) => return Ok(*loaded),
                Existing::Replaced => replaced = true,
                Existing::Absent => {}
            }
        }
        // A malformed value names no session, but a login on it leaves a marker under the key
        // that stands for it.
        for key in &self.cookie.malformed_keys {
            if replaced {
                break;
            }
            replaced = self.marked_replaced(&key[..]).await?;
        }
        // The client's id, if any, is never adopted: a new session always gets a fresh one.
        let mut loaded = Loaded::new_session(fresh_id()?);
        loaded.replaced = replaced;
        // Guarded against a login with the same cookie (see `save::replace_stale_cookie`),
        // even when some values were not tried; those are then never expired, as a live
        // session's cookie may be among them.
        loaded.stale_cookie = !self.cookie.is_empty() || self.cookie.malformed;
        Ok(loaded)
    }

    async fn load_existing(&self, id: SessionId) -> Result<Existing, SessionError> {
        let backend = &self.shared.backend;
        let hash = id.log_name();
        // A cookie that names no live session takes no lease at all.
        let asked = Instant::now();
        let deadline = deadline_after(self.shared.config.lease_wait);
        let lease = backend
            .lease_existing(id.as_bytes(), deadline)
            .await
            .map_err(|error| backend_failure(hash, "taking the session's lease failed", error))?;
        let Some(mut lease) = lease else {
            tracing::debug!(session = %hash, "the cookie names no live session");
            return Ok(Existing::Absent);
        };
        metrics::lease_wait(asked.elapsed());
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
            tracing::debug!(session = %hash, "the session ended while waiting for its lease");
            return Ok(Existing::Absent);
        };
        match envelope::decode(&record.value) {
            Ok(Stored::Session(decoded)) => {
                let size = record.value.len();
                tracing::trace!(session = %hash, len = size, "session loaded");
                Ok(Existing::Found(Box::new(Loaded {
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
                    stale_cookie: false,
                    replaced: false,
                    cycled: false,
                    flushed: false,
                    size,
                })))
            }
            Ok(Stored::Replaced) => {
                lease.release().await;
                tracing::debug!(session = %hash, "another request replaced the session moments ago");
                Ok(Existing::Replaced)
            }
            Err(error) => {
                lease.release().await;
                Err(self.undecodable(hash, &error))
            }
        }
    }

    /// Whether `key`, which stands for a malformed cookie value, holds the marker of a login on
    /// that cookie moments ago. Read without the lease: the save looks again under it.
    async fn marked_replaced(&self, key: &[u8]) -> Result<bool, SessionError> {
        let record = self
            .shared
            .backend
            .get_unleased(key)
            .await
            .map_err(|error| {
                tracing::error!(%error, "reading the marker of a malformed cookie failed");
                SessionError::from_backend(error)
            })?;
        let now = SystemTime::now();
        Ok(record
            .filter(|record| record.expires_at > now)
            .is_some_and(|record| matches!(envelope::decode(&record.value), Ok(Stored::Replaced))))
    }

    /// Logs and counts a stored session that does not decode.
    fn undecodable(&self, session: LogName, error: &serde_json::Error) -> SessionError {
        self.shared.undecodable.fetch_add(1, Ordering::Relaxed);
        metrics::undecodable();
        tracing::error!(
            session = %session,
            category = ?error.classify(),
            "a stored session does not decode; it is kept as it was and the request fails"
        );
        SessionError::Undecodable
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

    /// Ends the session without saving: the response future was dropped (client gone, panic), or
    /// the response was sent. Dropping the lease releases it without a change.
    ///
    /// If another holder of the state (a task of the handler's, loading the session) has it
    /// now, that holder settles it when it lets go: it sees `abandoned`, set before the state
    /// is tried here.
    pub(crate) fn abandon(self: &Arc<Self>) {
        self.abandoned.store(true, Ordering::SeqCst);
        // Paired with the fence in `settle_if_abandoned`: either the state is free here, or its
        // holder, having let go, sees the flag.
        fence(Ordering::SeqCst);
        self.settle();
    }

    /// Called after letting go of the state: if the request ended meanwhile, ends whatever
    /// state is left (unless someone else holds it now, who will call this in turn).
    fn settle_if_abandoned(self: &Arc<Self>) {
        fence(Ordering::SeqCst);
        if self.abandoned.load(Ordering::SeqCst) {
            self.settle();
        }
    }

    /// Ends whatever state is left. If the state is held, its holder settles it when it lets
    /// go; but the lock may also have been handed to an access that is then cancelled before it
    /// runs (tokio's mutex passes the lock straight to the next waiter), and nobody would settle
    /// it: so a task takes the lock in turn and settles it then (finding it finished, if the
    /// holder did).
    fn settle(self: &Arc<Self>) {
        match self.state.try_lock() {
            Ok(mut state) => Self::finish(&mut state),
            Err(_) => {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    let inner = Arc::clone(self);
                    drop(runtime.spawn(async move {
                        let mut state = inner.state.lock().await;
                        Self::finish(&mut state);
                    }));
                }
            }
        }
    }

    fn finish(state: &mut State) {
        let previous = std::mem::replace(state, State::Finished);
        if let State::Loaded(loaded) = &previous {
            tracing::debug!(
                session = %loaded.id.short_hash(),
                "request abandoned before its response: the session is released unsaved"
            );
        }
        drop(previous);
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
    pub(crate) fn new(shared: Arc<Shared>, cookie: Candidates) -> Self {
        Self {
            inner: Arc::new(SessionInner {
                shared,
                cookie,
                abandoned: AtomicBool::new(false),
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
        // The request may have ended while this access waited or loaded (a task of the
        // handler's that outlives it): then nothing more happens, and the lease goes now.
        if self.inner.abandoned.load(Ordering::SeqCst) {
            let previous = std::mem::replace(&mut *state, State::Finished);
            drop(state);
            if let State::Loaded(loaded) = &previous {
                tracing::debug!(
                    session = %loaded.id.short_hash(),
                    "the request ended while its session was loading: released unsaved"
                );
            }
            drop(previous);
            return Err(SessionError::Finished);
        }
        let result = match &mut *state {
            State::Loaded(loaded) => {
                let result = f(loaded, &self.inner.shared.config);
                self.inner.set_id(Some(loaded.id));
                result
            }
            State::Failed(error) => Err(error.clone()),
            State::Finished | State::Unloaded => Err(SessionError::Finished),
        };
        drop(state);
        // Abandoned while the state was held here: `abandon` could not settle it, so settle it now.
        self.inner.settle_if_abandoned();
        result
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
    /// [`max_session_size`](crate::SessionLayer::max_session_size), [`SessionError::TooDeep`] if
    /// `value` nests too deep to be read back (the session is left as it was in both cases);
    /// [`SessionError::Replaced`] if another request replaced the session; [`SessionError::Serde`]
    /// if `value` does not serialize; load errors.
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
            loaded.check_changeable()?;
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
    /// (a "signed out" message, say) is saved under that new id, never under the old one. The old
    /// record is replaced by a marker for [`REPLACED_GRACE`](crate::REPLACED_GRACE): a request still
    /// carrying the old cookie in that time (sent in parallel with the logout) sees an empty
    /// session, may not change it ([`SessionError::Replaced`]) and sends no cookie, so the logout's
    /// cookie stays in the browser. Later the old cookie names no session. A flushed session never
    /// comes back.
    ///
    /// A logout sent with a cookie that a login (`cycle_id`) replaced while or just before it ran
    /// (two tabs, say) is the exception: the cookie the browser holds now is the login's, which
    /// the logout cannot reach, and the user asked to be logged out. The logout sends the
    /// removal, so the browser drops the login's cookie if the logout's answer arrives after the
    /// login's; the login's session itself is left to expire.
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
            loaded.flushed = true;
            Ok(())
        })
        .await
    }

    /// Gives the session a new id and keeps its data (call it at login, against session fixation).
    ///
    /// When the response is ready, the layer leases the new id, commits the data there, then
    /// replaces the old record by a marker, and sends the new cookie. If any step fails, the old
    /// record is kept intact, the new one is removed again, and the client gets an error response:
    /// the session is never lost.
    ///
    /// A request of the same user that carries the old cookie while or just after this happens
    /// (within [`REPLACED_GRACE`](crate::REPLACED_GRACE)) does not overwrite the new cookie: it
    /// sees an empty session, may not change it ([`SessionError::Replaced`], answered
    /// `409 Conflict`), and sends no `Set-Cookie`. It never reaches the new session: the old id
    /// leads nowhere, so a fixated id stays useless.
    ///
    /// Except a request that itself calls `cycle_id` (before any other change): that is a login
    /// sent again, say because the answer to the first one was lost. It goes on as a new, empty
    /// session with a fresh id, and its cookie replaces the first login's in the browser (the
    /// last login wins); the first login's session stays where it is, unreachable through the
    /// old cookie. Call `cycle_id` only at login: a request racing a login that calls it for
    /// another reason (a periodic rotation, say) also starts a new session, and its cookie
    /// would replace the logged-in one.
    ///
    /// On a request whose cookie names no session (unknown, ended, malformed), the new session is
    /// saved as any new one, and the same marker is left under that cookie (for a malformed value,
    /// under a key derived from it): a request sent with it at the same time and answered after
    /// this one sends no removal or cookie of its own that would log the user out.
    ///
    /// # Errors
    ///
    /// Load errors (see [`SessionError`]).
    pub async fn cycle_id(&self) -> Result<(), SessionError> {
        let new_id = fresh_id()?;
        self.with_loaded(move |loaded, _| {
            if loaded.replaced {
                // A login on a cookie whose session another request replaced moments ago: a
                // login sent again (its first answer lost, or the form submitted twice), not a
                // request racing the first one. It goes on as a new session of its own, which
                // holds nothing of the replaced one (whose id it does not adopt, and whose data
                // it never saw), and sends its own cookie: the last login wins. If it saves
                // nothing, it sends nothing, not even a removal.
                tracing::debug!(
                    session = %new_id.short_hash(),
                    "a login on a replaced session's cookie starts a new session"
                );
                loaded.replaced = false;
                loaded.stale_cookie = false;
            }
            loaded.id = new_id;
            loaded.cycled = true;
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
                loaded.check_changeable()?;
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
            loaded.check_changeable()?;
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
        for id in self.inner.cookie.ids() {
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
                continue;
            };
            match envelope::decode(&record.value) {
                Ok(Stored::Session(decoded)) => {
                    metrics::outcome(Outcome::Loaded);
                    return Ok(ReadOnlySession::new(Some(id), Arc::new(decoded.data)));
                }
                Ok(Stored::Replaced) => {}
                Err(error) => return Err(self.inner.undecodable(hash, &error)),
            }
        }
        Ok(ReadOnlySession::empty())
    }
}
