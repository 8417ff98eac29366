//! What the layer can be configured with: cookie attributes, expiry, signing keys and limits.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How long a session lives, and what kind of cookie carries it.
///
/// The server-side record always has an absolute expiry; the variants differ in how it moves and in
/// what the browser is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// A browser-session cookie (no `Max-Age`): the browser forgets it when it closes.
    ///
    /// The server still forgets the session after [`BROWSER_SESSION_IDLE`] without a request, so a
    /// browser that is never closed does not keep a session forever.
    OnSessionEnd,
    /// Expires after this long without a request (sliding expiry). The cookie gets a matching
    /// `Max-Age`. The expiry of an unchanged session is pushed forward at most once per
    /// [`SessionLayer::refresh_interval`](crate::SessionLayer::refresh_interval).
    OnInactivity(Duration),
    /// Expires at this moment, however active the session is. The cookie gets a matching `Max-Age`.
    AtDateTime(SystemTime),
}

impl Expiry {
    /// The inactivity period the record slides by, if it slides.
    pub(crate) fn sliding_ttl(self) -> Option<Duration> {
        match self {
            Expiry::OnSessionEnd => Some(BROWSER_SESSION_IDLE),
            Expiry::OnInactivity(ttl) => Some(ttl),
            Expiry::AtDateTime(_) => None,
        }
    }

    /// The absolute expiry of a record written (or refreshed) at `now`.
    pub(crate) fn expires_at(self, now: SystemTime) -> SystemTime {
        match self {
            Expiry::AtDateTime(at) => at,
            Expiry::OnSessionEnd | Expiry::OnInactivity(_) => {
                let ttl = self.sliding_ttl().unwrap_or(BROWSER_SESSION_IDLE);
                now.checked_add(ttl.min(LONGEST_TTL)).unwrap_or(now)
            }
        }
    }
}

/// The longest a record is kept: an inactivity period beyond it (up to `Duration::MAX`) is
/// taken as this, which every backend can store (Redis refuses an expiry past 2^63 ms).
pub(crate) const LONGEST_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// Server-side inactivity limit of an [`Expiry::OnSessionEnd`] session: 24 hours.
pub const BROWSER_SESSION_IDLE: Duration = Duration::from_secs(24 * 60 * 60);

/// The default expiry: 24 hours of inactivity.
///
/// Long enough that a user who comes back the next day is still signed in, short enough that a
/// forgotten session on a shared computer does not outlive the day. Change it with
/// [`SessionLayer::expiry`](crate::SessionLayer::expiry).
pub const DEFAULT_EXPIRY: Expiry = Expiry::OnInactivity(Duration::from_secs(24 * 60 * 60));

/// The `SameSite` attribute of the session cookie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SameSite {
    /// Sent only with requests that start on the same site.
    Strict,
    /// Also sent with top-level navigations from other sites (following a link). The default: it
    /// stops cross-site form posts and sub-requests from carrying the session, while a link from
    /// elsewhere still lands signed in (OWASP's session management advice).
    Lax,
    /// Sent with every request, including cross-site ones. Browsers accept it only with `Secure`.
    None,
}

impl SameSite {
    pub(crate) fn to_cookie(self) -> cookie::SameSite {
        match self {
            SameSite::Strict => cookie::SameSite::Strict,
            SameSite::Lax => cookie::SameSite::Lax,
            SameSite::None => cookie::SameSite::None,
        }
    }
}

/// Shortest signing key accepted by [`SigningKeys::new`], in bytes.
pub const MIN_KEY_LEN: usize = 32;

/// Why [`SigningKeys::new`] refused its keys.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// No key was given.
    #[error("no signing key was given")]
    Empty,
    /// A key is shorter than [`MIN_KEY_LEN`] bytes.
    #[error("signing key {index} has {len} bytes; at least {min} are required")]
    TooShort {
        /// Position of the key in the list.
        index: usize,
        /// Its length in bytes.
        len: usize,
        /// The minimum, [`MIN_KEY_LEN`].
        min: usize,
    },
}

/// Keys for signed session cookies (HMAC-SHA256), newest first.
///
/// New cookies are signed with the first key; a cookie signed with any of the keys is accepted. To
/// rotate, put the new key first and keep the old one after it until every cookie signed with it has
/// expired, then drop it.
///
/// Ids are already unguessable, so signing is defence in depth: a cookie that was not issued with one
/// of these keys is refused before the store is asked about it.
#[derive(Clone)]
pub struct SigningKeys {
    macs: Arc<[Hmac<Sha256>]>,
}

impl SigningKeys {
    /// Prepares the keys, newest first. Each must have at least [`MIN_KEY_LEN`] bytes (use random
    /// bytes, not a password).
    ///
    /// # Examples
    ///
    /// ```
    /// use mmap_session::{KeyError, SigningKeys};
    ///
    /// let new_key = [7u8; 32];
    /// let old_key = [9u8; 32];
    /// let keys = SigningKeys::new([new_key, old_key])?;
    /// assert_eq!(keys.len(), 2);
    ///
    /// assert_eq!(SigningKeys::new(Vec::<Vec<u8>>::new()).err(), Some(KeyError::Empty));
    /// # Ok::<(), KeyError>(())
    /// ```
    pub fn new<I, K>(keys: I) -> Result<Self, KeyError>
    where
        I: IntoIterator<Item = K>,
        K: AsRef<[u8]>,
    {
        let mut macs = Vec::new();
        for (index, key) in keys.into_iter().enumerate() {
            let key = key.as_ref();
            if key.len() < MIN_KEY_LEN {
                return Err(KeyError::TooShort {
                    index,
                    len: key.len(),
                    min: MIN_KEY_LEN,
                });
            }
            // HMAC takes keys of any length, so this cannot fail; map it anyway rather than unwrap.
            let mac = Hmac::<Sha256>::new_from_slice(key).map_err(|_| KeyError::TooShort {
                index,
                len: key.len(),
                min: MIN_KEY_LEN,
            })?;
            macs.push(mac);
        }
        if macs.is_empty() {
            return Err(KeyError::Empty);
        }
        Ok(Self { macs: macs.into() })
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.macs.len()
    }

    /// Always false: a `SigningKeys` holds at least one key.
    pub fn is_empty(&self) -> bool {
        self.macs.is_empty()
    }

    /// Signs `message` with the first key.
    pub(crate) fn sign(&self, message: &[&[u8]]) -> Option<[u8; 32]> {
        let mut mac = self.macs.first()?.clone();
        for part in message {
            mac.update(part);
        }
        Some(mac.finalize().into_bytes().into())
    }

    /// True if `tag` is the signature of `message` under any key (compared in constant time).
    pub(crate) fn verify(&self, message: &[&[u8]], tag: &[u8]) -> bool {
        self.macs.iter().any(|mac| {
            let mut mac = mac.clone();
            for part in message {
                mac.update(part);
            }
            mac.verify_slice(tag).is_ok()
        })
    }
}

impl fmt::Debug for SigningKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never show key material.
        f.debug_struct("SigningKeys")
            .field("len", &self.macs.len())
            .finish_non_exhaustive()
    }
}

/// Everything the builder sets.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) cookie_name: String,
    pub(crate) domain: Option<String>,
    pub(crate) path: String,
    pub(crate) secure: bool,
    pub(crate) http_only: bool,
    pub(crate) same_site: SameSite,
    pub(crate) expiry: Expiry,
    pub(crate) refresh_interval: Duration,
    pub(crate) lease_wait: Duration,
    pub(crate) max_size: usize,
    pub(crate) save_on_server_error: bool,
    pub(crate) save_on_client_error: bool,
    pub(crate) keys: Option<SigningKeys>,
}

/// Default name of the session cookie.
pub const DEFAULT_COOKIE_NAME: &str = "session";
/// Default for [`SessionLayer::refresh_interval`](crate::SessionLayer::refresh_interval): one minute.
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(60);
/// How long the id a session had before [`Session::cycle_id`](crate::Session::cycle_id) or
/// [`Session::flush`](crate::Session::flush) is remembered as replaced: one minute.
///
/// A request that still carries the old cookie in that time (one sent in parallel with the login
/// or logout, which waited for the session or was on its way) sees an empty session that it may
/// not change ([`SessionError::Replaced`](crate::SessionError::Replaced), `409 Conflict`) and
/// sends no `Set-Cookie`, so the cookie the login or logout sent stays in the browser. Later, the
/// old cookie names no session: it is expired when a handler touches the session. A login on a
/// cookie that named no session leaves the same marker under that cookie.
pub const REPLACED_GRACE: Duration = Duration::from_secs(60);
/// Default for [`SessionLayer::lease_wait`](crate::SessionLayer::lease_wait): five seconds.
pub const DEFAULT_LEASE_WAIT: Duration = Duration::from_secs(5);
/// Default for [`SessionLayer::max_session_size`](crate::SessionLayer::max_session_size): 64 KiB,
/// the store's default largest value.
pub const DEFAULT_MAX_SESSION_SIZE: usize = 64 * 1024;

impl Default for Config {
    fn default() -> Self {
        Self {
            cookie_name: DEFAULT_COOKIE_NAME.to_owned(),
            domain: None,
            path: "/".to_owned(),
            secure: true,
            http_only: true,
            same_site: SameSite::Lax,
            expiry: DEFAULT_EXPIRY,
            refresh_interval: DEFAULT_REFRESH_INTERVAL,
            lease_wait: DEFAULT_LEASE_WAIT,
            max_size: DEFAULT_MAX_SESSION_SIZE,
            save_on_server_error: false,
            save_on_client_error: true,
            keys: None,
        }
    }
}
