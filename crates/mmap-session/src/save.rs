//! What happens when the handler's response is ready: commit, refresh, remove or just release.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::response::Response;
use http::header::SET_COOKIE;
use http::HeaderValue;

use crate::backend::LayerLease;
use crate::config::{Config, Expiry, REPLACED_GRACE};
use crate::cookies::{self, Candidates, InvalidCookieConfig};
use crate::envelope::{self, Stored};
use crate::error::{plain_response, SessionError};
use crate::id::SessionId;
use crate::metrics::{self, Outcome};
use crate::session::{
    backend_failure, deadline_after, encode_failure, fresh_id, Found, Loaded, SessionInner, Shared,
    State,
};

/// Settles the session once the handler's response is ready, and returns the response to send:
/// the handler's (with `Set-Cookie` when needed), or an error response if the session could not be
/// loaded or saved.
pub(crate) async fn finish(inner: Arc<SessionInner>, mut response: Response) -> Response {
    let state = {
        let mut state = inner.lock_state().await;
        std::mem::replace(&mut *state, State::Finished)
    };
    let loaded = match state {
        State::Unloaded | State::Finished => return response,
        // The cause was logged when loading failed; whatever the handler answered, it could not have
        // done what it meant to with the session.
        State::Failed(error) => {
            metrics::outcome(Outcome::Refused);
            return plain_response(error.status());
        }
        State::Loaded(loaded) => loaded,
    };
    let config = &inner.shared.config;
    let status = response.status();
    if (status.is_server_error() && !config.save_on_server_error)
        || (status.is_client_error() && !config.save_on_client_error)
    {
        tracing::debug!(
            session = %loaded.id.short_hash(),
            status = status.as_u16(),
            "error response: the session is released unsaved"
        );
        if let Some(found) = loaded.found {
            found.lease.release().await;
        }
        metrics::outcome(Outcome::Unchanged);
        return response;
    }
    let now = SystemTime::now();
    let ended = ends(&loaded, config, now);
    let outcome = planned_outcome(&loaded, ended);
    match save(&inner.shared, loaded, &inner.cookie, now, ended).await {
        Ok(cookie) => {
            metrics::outcome(outcome);
            if let Some(cookie) = cookie {
                response.headers_mut().append(SET_COOKIE, cookie);
            }
            response
        }
        Err(error) => {
            metrics::outcome(Outcome::Refused);
            plain_response(error.status())
        }
    }
}

/// Whether the session ends when saved: emptied, or past a fixed expiry.
fn ends(loaded: &Loaded, config: &Config, now: SystemTime) -> bool {
    let expiry = loaded.expiry.unwrap_or(config.expiry);
    loaded.data.is_empty() || expiry.expires_at(now) <= now
}

/// What [`save`] does with `loaded` (which `ended`, see [`ends`]) if it succeeds, for
/// `mmap_session_requests_total`.
fn planned_outcome(loaded: &Loaded, ended: bool) -> Outcome {
    match &loaded.found {
        Some(_) if ended => Outcome::Removed,
        Some(found) if found.id != loaded.id || loaded.modified => Outcome::Saved,
        Some(_) => Outcome::Unchanged,
        None if loaded.replaced => Outcome::Unchanged,
        None if ended => Outcome::Empty,
        None => Outcome::New,
    }
}

pub(crate) fn invalid_config(error: InvalidCookieConfig) -> SessionError {
    tracing::error!(%error, "the session cannot be saved");
    SessionError::Store(Arc::new(crate::backend::BackendError::Other(Box::new(
        error,
    ))))
}

/// True if an unchanged session's sliding expiry should be pushed forward now: the last refresh
/// (its expiry minus the inactivity period) is at least `interval` old. The interval is capped at
/// half the inactivity period, so an active session never expires between two refreshes.
fn refresh_due(
    expiry: Expiry,
    expires_at: SystemTime,
    now: SystemTime,
    interval: Duration,
) -> bool {
    let Some(ttl) = expiry.sliding_ttl() else {
        return false;
    };
    let interval = interval.min(ttl / 2);
    let Some(last_refresh) = expires_at.checked_sub(ttl) else {
        return true;
    };
    match now.duration_since(last_refresh) {
        Ok(elapsed) => elapsed >= interval,
        // The stored expiry is further out than this policy allows (the policy was shortened).
        Err(_) => true,
    }
}

fn encode_checked(
    loaded_id: SessionId,
    data: &serde_json::Map<String, serde_json::Value>,
    expiry: Option<Expiry>,
    len_hint: usize,
    config: &Config,
) -> Result<Vec<u8>, SessionError> {
    let len_hint = len_hint.min(config.max_size);
    let bytes = envelope::encode(data, expiry, len_hint).map_err(|error| {
        let error = encode_failure(error);
        tracing::error!(session = %loaded_id.short_hash(), %error, "the session does not encode; nothing was written");
        error
    })?;
    metrics::encoded_size(bytes.len());
    if bytes.len() > config.max_size {
        tracing::warn!(
            session = %loaded_id.short_hash(),
            len = bytes.len(),
            max = config.max_size,
            "the session is too large to save; nothing was written"
        );
        return Err(SessionError::TooLarge {
            len: bytes.len(),
            max: config.max_size,
        });
    }
    Ok(bytes)
}

/// Writes what changed. Returns the `Set-Cookie` value to send, if any. On error nothing the handler
/// asked for is half-done: every write is a single commit or remove, and a two-step id change is undone.
/// `ended`: the session ends here ([`ends`], decided once by the caller).
///
/// `loaded` stays boxed and is read in place: these futures are moved into a box of their own,
/// and every byte of their state is copied there on every request.
async fn save(
    shared: &Shared,
    mut loaded: Box<Loaded>,
    cookie: &Candidates,
    now: SystemTime,
    ended: bool,
) -> Result<Option<HeaderValue>, SessionError> {
    let config = &shared.config;
    // Fail on a cookie configuration that cannot be sent before writing anything.
    let tail = shared.cookie_tail().map_err(invalid_config)?;
    let found = loaded.found.take();
    let mut id = loaded.id;
    let data = &loaded.data;
    let (own_expiry, modified, expiry_changed, size) = (
        loaded.expiry,
        loaded.modified,
        loaded.expiry_changed,
        loaded.size,
    );
    let expiry = own_expiry.unwrap_or(config.expiry);
    let expires_at = expiry.expires_at(now);

    match found {
        // `save_in_place` ends the lease (a write and the release go together, in one round trip
        // where the backend can).
        Some(found) if found.id == id => {
            save_in_place(
                shared,
                found,
                data,
                size,
                own_expiry,
                modified,
                expiry_changed,
                ended,
                now,
            )
            .await
        }
        Some(mut found) => {
            // Cycled or flushed: the data moves to (or the handle continues as) `id`, and the old
            // record is replaced by the marker that tells requests still carrying the old cookie
            // to leave the browser's cookie alone. The new record is written first, so a failure
            // never loses the session.
            // Boxed: a rare path, kept out of the future every request moves around.
            let result = Box::pin(async {
                let mut created = None;
                if !ended {
                    let bytes = encode_checked(id, data, own_expiry, size, config)?;
                    created = Some(create(shared, &mut id, &bytes, expires_at).await?);
                }
                let marker_expiry = now.checked_add(REPLACED_GRACE).unwrap_or(now);
                if let Err(error) = found.lease.commit(envelope::REPLACED, marker_expiry).await {
                    if let Some(mut new) = created.take() {
                        if let Err(undo) = new.remove().await {
                            tracing::error!(
                                session = %id.short_hash(),
                                error = %undo,
                                "could not undo the new record of a failed id change; it will expire"
                            );
                        }
                        new.release().await;
                    }
                    return Err(backend_failure(
                        found.id.log_name(),
                        "replacing the old session failed; it is kept",
                        error,
                    ));
                }
                tracing::debug!(
                    old = %found.id.short_hash(),
                    new = %id.short_hash(),
                    saved = created.is_some(),
                    "session id replaced"
                );
                match created {
                    Some(new) => {
                        new.release().await;
                        cookies::session_cookie(&id, expiry, now, config, tail)
                            .map(Some)
                            .map_err(invalid_config)
                    }
                    None => cookies::removal_cookie(config)
                        .map(Some)
                        .map_err(invalid_config),
                }
            })
            .await;
            found.lease.release().await;
            result
        }
        None if loaded.replaced => {
            // Another request replaced the cookie's session moments ago and sent the browser
            // its own cookie: nothing changed here (changes were refused), nothing is sent.
            // Except for a logout: the user asked to be logged out of whatever the browser
            // holds, the replacing login's cookie included.
            if loaded.flushed {
                tracing::debug!("a logout on a replaced session's cookie: expiring it");
                return cookies::removal_cookie(config)
                    .map(Some)
                    .map_err(invalid_config);
            }
            Ok(None)
        }
        None if loaded.stale_cookie => {
            // Boxed: a rare path, kept out of the future every request moves around.
            let session = NewSession {
                id,
                data,
                expiry: own_expiry,
                size,
                login: loaded.cycled,
                logout: loaded.flushed,
            };
            Box::pin(replace_stale_cookie(shared, cookie, session, ended, now)).await
        }
        None => {
            if ended {
                // Nothing to keep and nothing stored: no record, no cookie.
                return Ok(None);
            }
            let bytes = encode_checked(id, data, own_expiry, size, config)?;
            insert(shared, &mut id, &bytes, expires_at).await?;
            tracing::debug!(session = %id.short_hash(), "new session saved");
            cookies::session_cookie(&id, expiry, now, config, tail)
                .map(Some)
                .map_err(invalid_config)
        }
    }
}

/// What a key of a stale cookie holds, seen under its lease.
#[derive(Clone, Copy, PartialEq, Eq)]
enum StaleKey {
    /// Nothing (or something expired).
    Free,
    /// The marker of a login on the same cookie.
    Replaced,
    /// Anything else: left alone.
    Other,
}

/// What a request that found no session keeps (`Loaded` itself cannot cross an await of a
/// sent future: it may hold a lease, which is not `Sync`).
struct NewSession<'a> {
    id: SessionId,
    data: &'a serde_json::Map<String, serde_json::Value>,
    /// The session's own expiry.
    expiry: Option<Expiry>,
    size: usize,
    /// `cycle_id` was called.
    login: bool,
    /// `flush` was called.
    logout: bool,
}

/// Answers a request whose cookie names no session (unknown, ended or malformed values, every
/// one tried or, with more than are tried, the first ones) and that touched the session: with a
/// new session's cookie, or with a removal when nothing is kept and every value was tried.
///
/// Either would replace, in the browser, the cookie of a login sent with the same cookie at the
/// same time. So every key of the cookie (see [`Candidates::keys`]) is leased first, taken in
/// one order by every request, and held until this answer is ready:
///
/// - a login (`cycle_id`) leaves the replaced marker under each key before its own cookie is
///   ready;
/// - any other request that finds a marker there was overtaken by such a login: it sends no
///   cookie, and a change it made is refused ([`SessionError::Replaced`], `409`), as for a
///   request racing the login of a live session. One that finds none makes its answer ready
///   before a later login can leave the marker.
async fn replace_stale_cookie(
    shared: &Shared,
    cookie: &Candidates,
    session: NewSession<'_>,
    ended: bool,
    now: SystemTime,
) -> Result<Option<HeaderValue>, SessionError> {
    let mut keys: Vec<&[u8]> = cookie.keys().collect();
    keys.sort_unstable();
    keys.dedup();
    let mut leases = Vec::with_capacity(keys.len());
    let result = match lease_stale_keys(shared, &keys, &mut leases, now).await {
        Ok(found) => {
            let answer = Answer {
                ended,
                expirable: !cookie.untried,
            };
            answer_stale_cookie(shared, session, &mut leases, &found, answer, now).await
        }
        // Nothing to keep: the removal is only a courtesy to the browser, and without the keys
        // it could log out a login. Nothing is sent.
        Err(error) if ended => {
            tracing::warn!(%error, "could not check the stale session cookie's keys; it is not expired");
            Ok(None)
        }
        Err(error) => Err(error),
    };
    for lease in leases {
        lease.release().await;
    }
    result
}

/// Leases `keys` in order (into `leases`, which the caller releases) and says what each holds.
async fn lease_stale_keys(
    shared: &Shared,
    keys: &[&[u8]],
    leases: &mut Vec<LayerLease>,
    now: SystemTime,
) -> Result<Vec<StaleKey>, SessionError> {
    let deadline = deadline_after(shared.config.lease_wait);
    let mut found = Vec::with_capacity(keys.len());
    for key in keys {
        let mut lease = shared.backend.lease(key, deadline).await.map_err(|error| {
            tracing::warn!(%error, "taking the lease of a stale session cookie's key failed");
            SessionError::from_backend(error)
        })?;
        let record = lease.load().await;
        leases.push(lease);
        let record = record.map_err(|error| {
            tracing::warn!(%error, "reading a stale session cookie's key failed");
            SessionError::from_backend(error)
        })?;
        found.push(match record.filter(|record| record.expires_at > now) {
            None => StaleKey::Free,
            Some(record) => match envelope::decode(&record.value) {
                Ok(Stored::Replaced) => StaleKey::Replaced,
                _ => StaleKey::Other,
            },
        });
    }
    Ok(found)
}

/// What [`answer_stale_cookie`] is to answer.
#[derive(Clone, Copy)]
struct Answer {
    /// Nothing is kept: a removal, if anything.
    ended: bool,
    /// Every value of the cookie was tried: it may be expired. (A value not tried may be a
    /// live session's.)
    expirable: bool,
}

/// The answer of [`replace_stale_cookie`], the keys leased.
async fn answer_stale_cookie(
    shared: &Shared,
    session: NewSession<'_>,
    leases: &mut [LayerLease],
    found: &[StaleKey],
    answer: Answer,
    now: SystemTime,
) -> Result<Option<HeaderValue>, SessionError> {
    let Answer { ended, expirable } = answer;
    let config = &shared.config;
    let replaced = found.contains(&StaleKey::Replaced);
    if replaced && !session.login {
        if ended && session.logout {
            // A logout overtaken by a login on the same cookie: the user asked to be logged
            // out, of the login's cookie too.
            tracing::debug!(
                "a login replaced the stale session cookie while a logout ran: expiring it"
            );
            return cookies::removal_cookie(config)
                .map(Some)
                .map_err(invalid_config);
        }
        if ended {
            tracing::debug!(
                "a login replaced the stale session cookie while this request ran: nothing sent"
            );
            return Ok(None);
        }
        tracing::debug!(
            "a login replaced the stale session cookie while this request ran: its change is refused"
        );
        return Err(SessionError::Replaced);
    }
    if ended {
        if replaced {
            // A login that keeps nothing, on a cookie another login replaced: it sends
            // nothing, not a removal that would log that one out.
            return Ok(None);
        }
        if !expirable {
            tracing::debug!("some session cookies were not tried: none is expired");
            return Ok(None);
        }
        tracing::debug!("the session cookie names no session: expiring it");
        return cookies::removal_cookie(config)
            .map(Some)
            .map_err(invalid_config);
    }
    let tail = shared.cookie_tail().map_err(invalid_config)?;
    let mut id = session.id;
    let expiry = session.expiry.unwrap_or(config.expiry);
    let bytes = encode_checked(id, session.data, session.expiry, session.size, config)?;
    let mut new = create(shared, &mut id, &bytes, expiry.expires_at(now)).await?;
    if session.login {
        // A login: requests still carrying the stale cookie, and any that are answered after
        // this one, learn that it was replaced.
        let marker_expiry = now.checked_add(REPLACED_GRACE).unwrap_or(now);
        for (lease, _) in leases
            .iter_mut()
            .zip(found)
            .filter(|(_, found)| **found != StaleKey::Other)
        {
            if let Err(error) = lease.commit(envelope::REPLACED, marker_expiry).await {
                // The login fails; a marker already left under another key only makes a
                // request with this cookie see an empty session for a while, and a login sent
                // again goes through (see `Session::cycle_id`).
                if let Err(undo) = new.remove().await {
                    tracing::error!(
                        session = %id.short_hash(),
                        error = %undo,
                        "could not undo the new session of a failed login; it will expire"
                    );
                }
                new.release().await;
                tracing::error!(%error, "marking the stale session cookie as replaced failed; the login fails");
                return Err(SessionError::from_backend(error));
            }
        }
    }
    new.release().await;
    tracing::debug!(session = %id.short_hash(), login = session.login, "new session saved in place of a stale cookie");
    cookies::session_cookie(&id, expiry, now, config, tail)
        .map(Some)
        .map_err(invalid_config)
}

/// Saves the session under its own lease, and releases the lease (dropping it on an early
/// error return releases it too).
#[allow(clippy::too_many_arguments)]
async fn save_in_place(
    shared: &Shared,
    found: Found,
    data: &serde_json::Map<String, serde_json::Value>,
    size: usize,
    own_expiry: Option<Expiry>,
    modified: bool,
    expiry_changed: bool,
    ended: bool,
    now: SystemTime,
) -> Result<Option<HeaderValue>, SessionError> {
    let config = &shared.config;
    let tail = shared.cookie_tail().map_err(invalid_config)?;
    let hash = found.id.log_name();
    if ended {
        found
            .lease
            .remove_and_release()
            .await
            .map_err(|error| backend_failure(hash, "removing the session failed", error))?;
        tracing::debug!(session = %hash, "session removed");
        return cookies::removal_cookie(config)
            .map(Some)
            .map_err(invalid_config);
    }
    let expiry = own_expiry.unwrap_or(config.expiry);
    let refresh =
        expiry_changed || refresh_due(expiry, found.expires_at, now, config.refresh_interval);
    if !modified && !refresh {
        found.lease.release().await;
        return Ok(None);
    }
    let expires_at = if refresh {
        expiry.expires_at(now)
    } else {
        found.expires_at
    };
    if modified {
        let bytes = encode_checked(found.id, data, own_expiry, size, config)?;
        found
            .lease
            .commit_and_release(&bytes, expires_at)
            .await
            .map_err(|error| backend_failure(hash, "saving the session failed", error))?;
        tracing::debug!(session = %hash, len = bytes.len(), refresh, "session saved");
    } else {
        // Unchanged: write the same bytes back with the later expiry, without re-encoding.
        found
            .lease
            .commit_and_release(&found.raw, expires_at)
            .await
            .map_err(|error| backend_failure(hash, "refreshing the session failed", error))?;
        tracing::debug!(session = %hash, "session expiry refreshed");
    }
    let send_cookie = expiry_changed || (refresh && matches!(expiry, Expiry::OnInactivity(_)));
    if send_cookie {
        cookies::session_cookie(&found.id, expiry, now, config, tail)
            .map(Some)
            .map_err(invalid_config)
    } else {
        Ok(None)
    }
}

/// Stores the record of a new id, without keeping any lease (one round trip where the backend
/// can). A drawn id that is somehow in use is replaced by another.
async fn insert(
    shared: &Shared,
    id: &mut SessionId,
    bytes: &[u8],
    expires_at: SystemTime,
) -> Result<(), SessionError> {
    for _ in 0..3 {
        let deadline = deadline_after(shared.config.lease_wait);
        let inserted = shared
            .backend
            .insert_new(id.as_bytes(), bytes, expires_at, deadline)
            .await
            .map_err(|error| {
                backend_failure(id.log_name(), "saving the new session failed", error)
            })?;
        if inserted {
            return Ok(());
        }
        tracing::warn!(session = %id.log_name(), "a freshly drawn id is already in use; drawing another");
        *id = fresh_id()?;
    }
    tracing::error!("three freshly drawn session ids were all in use: the random source is broken");
    Err(SessionError::Random)
}

/// Creates the record of a new id under its lease, and returns the lease (still held, so a two-step
/// id change can undo it). A drawn id that is somehow taken is replaced by another.
async fn create(
    shared: &Shared,
    id: &mut SessionId,
    bytes: &[u8],
    expires_at: SystemTime,
) -> Result<LayerLease, SessionError> {
    for _ in 0..3 {
        let hash = id.log_name();
        let deadline = deadline_after(shared.config.lease_wait);
        let mut lease = shared
            .backend
            .lease(id.as_bytes(), deadline)
            .await
            .map_err(|error| {
                backend_failure(hash, "taking the new session's lease failed", error)
            })?;
        match lease.load().await {
            Ok(None) => {}
            Ok(Some(_)) => {
                lease.release().await;
                tracing::warn!(session = %hash, "a freshly drawn id is already in use; drawing another");
                *id = fresh_id()?;
                continue;
            }
            Err(error) => {
                lease.release().await;
                return Err(backend_failure(
                    hash,
                    "checking the new session's id failed",
                    error,
                ));
            }
        }
        if let Err(error) = lease.commit(bytes, expires_at).await {
            lease.release().await;
            return Err(backend_failure(
                hash,
                "saving the new session failed",
                error,
            ));
        }
        return Ok(lease);
    }
    tracing::error!("three freshly drawn session ids were all in use: the random source is broken");
    Err(SessionError::Random)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn a_sliding_expiry_is_refreshed_once_the_interval_has_passed() {
        let now = SystemTime::now();
        let expiry = Expiry::OnInactivity(60 * MIN);
        let refreshed_just_now = now + 60 * MIN;
        let refreshed_two_minutes_ago = now + 58 * MIN;
        assert!(!refresh_due(expiry, refreshed_just_now, now, MIN));
        assert!(refresh_due(expiry, refreshed_two_minutes_ago, now, MIN));
    }

    #[test]
    fn the_refresh_interval_is_capped_at_half_the_inactivity_period() {
        let now = SystemTime::now();
        let expiry = Expiry::OnInactivity(10 * MIN);
        // Refreshed six minutes ago: past half of ten minutes, though the interval says an hour.
        assert!(refresh_due(expiry, now + 4 * MIN, now, 60 * MIN));
        assert!(!refresh_due(expiry, now + 6 * MIN, now, 60 * MIN));
    }

    #[test]
    fn a_fixed_expiry_is_never_refreshed_and_a_shortened_policy_refreshes_at_once() {
        let now = SystemTime::now();
        assert!(!refresh_due(
            Expiry::AtDateTime(now + MIN),
            now,
            now,
            Duration::ZERO
        ));
        // Stored under a 24 h policy, now read under a 1 h one.
        assert!(refresh_due(
            Expiry::OnInactivity(60 * MIN),
            now + 24 * 60 * MIN,
            now,
            MIN
        ));
    }
}
