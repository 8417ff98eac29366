use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::service::SessionService;
use crate::backend::{LayerBackend, SessionBackend};
use crate::config::{Config, Expiry, SameSite, SigningKeys};
use crate::session::Shared;

/// Adds sessions to a service: a [`Session`](crate::Session) in every request, kept in a
/// [`SessionBackend`] (normally the memory-mapped [`Store`](crate::store::Store)).
///
/// Defaults: cookie `session`, `Path=/`, `Secure`, `HttpOnly`, `SameSite=Lax`, no `Domain`; expiry
/// after 24 hours of inactivity, refreshed at most once a minute; wait up to 5 seconds for a busy
/// session; at most 64 KiB per session; nothing saved on a 5xx response (saved on a 4xx); unsigned
/// cookies.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use axum::{routing::get, Router};
/// use mmap_session::{store::Store, Expiry, SessionLayer};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// let store = Store::open(dir.path().join("sessions"))?;
/// let sessions = SessionLayer::new(store)
///     .cookie_name("sid")
///     .expiry(Expiry::OnInactivity(Duration::from_secs(2 * 60 * 60)));
/// let app: Router = Router::new().route("/", get(|| async { "hi" })).layer(sessions);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct SessionLayer {
    shared: Arc<Shared>,
}

impl SessionLayer {
    /// A layer keeping sessions in `backend`, with the secure defaults listed above.
    ///
    /// # Examples
    ///
    /// ```
    /// use mmap_session::{store::Store, SessionLayer};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// let layer = SessionLayer::new(Store::open(dir.path().join("sessions"))?);
    /// # Ok(())
    /// # }
    /// ```
    pub fn new<B: SessionBackend>(backend: B) -> Self {
        Self {
            shared: Arc::new(Shared {
                backend: LayerBackend::new(backend),
                config: Config::default(),
                cookie_tail: std::sync::OnceLock::new(),
                undecodable: Arc::default(),
                gauges: Arc::default(),
            }),
        }
    }

    fn config(&mut self) -> &mut Config {
        let shared = Arc::make_mut(&mut self.shared);
        shared.cookie_tail = std::sync::OnceLock::new();
        &mut shared.config
    }

    /// Name of the session cookie (default `session`).
    ///
    /// Prefer a name starting with `__Host-` on HTTPS sites: browsers then accept the cookie only
    /// from this host, with `Secure`, `Path=/` and no `Domain`, so a sibling subdomain (or a
    /// plain-HTTP page) cannot plant a session cookie of that name next to yours. A `__Host-` name
    /// with a [`domain`](Self::domain), a [`path`](Self::path) other than `/` or
    /// [`secure(false)`](Self::secure), or a `__Secure-` name without `Secure`, would be refused by
    /// browsers: every request that touches the session then fails with a `500` and an error log
    /// line saying why.
    ///
    /// When the browser sends several cookies of this name (one per path or domain it holds),
    /// the first few (four) are tried in order until one names a live session.
    ///
    /// # Examples
    ///
    /// ```
    /// # use mmap_session::{store::Store, SessionLayer};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let store = Store::open(dir.path().join("sessions"))?;
    /// let layer = SessionLayer::new(store).cookie_name("__Host-sid");
    /// # Ok(())
    /// # }
    /// ```
    pub fn cookie_name(mut self, name: impl Into<String>) -> Self {
        self.config().cookie_name = name.into();
        self
    }

    /// `Domain` attribute of the cookie (default: none, so only the host that set it gets it back).
    /// Setting it shares the session with every subdomain of `domain`.
    ///
    /// # Examples
    ///
    /// ```
    /// # use mmap_session::{store::Store, SessionLayer};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let store = Store::open(dir.path().join("sessions"))?;
    /// let layer = SessionLayer::new(store).domain("example.com");
    /// # Ok(())
    /// # }
    /// ```
    pub fn domain(mut self, domain: impl Into<String>) -> Self {
        self.config().domain = Some(domain.into());
        self
    }

    /// `Path` attribute of the cookie (default `/`).
    ///
    /// # Examples
    ///
    /// ```
    /// # use mmap_session::{store::Store, SessionLayer};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let store = Store::open(dir.path().join("sessions"))?;
    /// let layer = SessionLayer::new(store).path("/app");
    /// # Ok(())
    /// # }
    /// ```
    pub fn path(mut self, path: impl Into<String>) -> Self {
        self.config().path = path.into();
        self
    }

    /// `Secure` attribute (default on: the cookie travels over HTTPS only). Turn it off only for
    /// plain-HTTP development.
    ///
    /// # Examples
    ///
    /// ```
    /// # use mmap_session::{store::Store, SessionLayer};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let store = Store::open(dir.path().join("sessions"))?;
    /// let development = cfg!(debug_assertions);
    /// let layer = SessionLayer::new(store).secure(!development);
    /// # Ok(())
    /// # }
    /// ```
    pub fn secure(mut self, secure: bool) -> Self {
        self.config().secure = secure;
        self
    }

    /// `HttpOnly` attribute (default on: page scripts cannot read the cookie, so an injected script
    /// cannot steal the session).
    ///
    /// # Examples
    ///
    /// ```
    /// # use mmap_session::{store::Store, SessionLayer};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let store = Store::open(dir.path().join("sessions"))?;
    /// let layer = SessionLayer::new(store).http_only(true);
    /// # Ok(())
    /// # }
    /// ```
    pub fn http_only(mut self, http_only: bool) -> Self {
        self.config().http_only = http_only;
        self
    }

    /// `SameSite` attribute (default [`SameSite::Lax`]).
    ///
    /// # Examples
    ///
    /// ```
    /// # use mmap_session::{store::Store, SessionLayer};
    /// use mmap_session::SameSite;
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let store = Store::open(dir.path().join("sessions"))?;
    /// let layer = SessionLayer::new(store).same_site(SameSite::Strict);
    /// # Ok(())
    /// # }
    /// ```
    pub fn same_site(mut self, same_site: SameSite) -> Self {
        self.config().same_site = same_site;
        self
    }

    /// How long sessions live (default [`DEFAULT_EXPIRY`](crate::DEFAULT_EXPIRY): 24 hours of
    /// inactivity). A session can override it with [`Session::set_expiry`](crate::Session::set_expiry).
    ///
    /// # Examples
    ///
    /// ```
    /// # use mmap_session::{store::Store, SessionLayer};
    /// use mmap_session::Expiry;
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let store = Store::open(dir.path().join("sessions"))?;
    /// // Forget the session when the browser closes.
    /// let layer = SessionLayer::new(store).expiry(Expiry::OnSessionEnd);
    /// # Ok(())
    /// # }
    /// ```
    pub fn expiry(mut self, expiry: Expiry) -> Self {
        self.config().expiry = expiry;
        self
    }

    /// How often, at most, the sliding expiry of an unchanged session is pushed forward (default one
    /// minute; never more than half the inactivity period). Each refresh is a store write and, for
    /// [`Expiry::OnInactivity`], a `Set-Cookie`; between refreshes a read-only visit writes nothing.
    ///
    /// # Examples
    ///
    /// ```
    /// # use mmap_session::{store::Store, SessionLayer};
    /// use std::time::Duration;
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let store = Store::open(dir.path().join("sessions"))?;
    /// let layer = SessionLayer::new(store).refresh_interval(Duration::from_secs(5 * 60));
    /// # Ok(())
    /// # }
    /// ```
    pub fn refresh_interval(mut self, interval: Duration) -> Self {
        self.config().refresh_interval = interval;
        self
    }

    /// How long a request waits for its session's busy lease while another request of the same
    /// session holds it (default 5 seconds). Past it, the session access fails with
    /// [`SessionError::LeaseTimeout`](crate::SessionError::LeaseTimeout) and the layer answers
    /// `503 Service Unavailable` with `Retry-After: 1`.
    ///
    /// # Examples
    ///
    /// ```
    /// # use mmap_session::{store::Store, SessionLayer};
    /// use std::time::Duration;
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let store = Store::open(dir.path().join("sessions"))?;
    /// let layer = SessionLayer::new(store).lease_wait(Duration::from_secs(2));
    /// # Ok(())
    /// # }
    /// ```
    pub fn lease_wait(mut self, wait: Duration) -> Self {
        self.config().lease_wait = wait;
        self
    }

    /// Largest encoded session, in bytes (default 64 KiB). A change past it is refused with
    /// [`SessionError::TooLarge`](crate::SessionError::TooLarge) and nothing is written. Keep it at or
    /// below the store's own largest value.
    ///
    /// # Examples
    ///
    /// ```
    /// # use mmap_session::{store::Store, SessionLayer};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let store = Store::open(dir.path().join("sessions"))?;
    /// let layer = SessionLayer::new(store).max_session_size(8 * 1024);
    /// # Ok(())
    /// # }
    /// ```
    pub fn max_session_size(mut self, bytes: usize) -> Self {
        self.config().max_size = bytes;
        self
    }

    /// Whether changes are saved when the response is a server error (5xx). Default off: a handler
    /// that failed half-way should not leave half its changes behind.
    ///
    /// # Examples
    ///
    /// ```
    /// # use mmap_session::{store::Store, SessionLayer};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let store = Store::open(dir.path().join("sessions"))?;
    /// let layer = SessionLayer::new(store).save_on_server_error(true);
    /// # Ok(())
    /// # }
    /// ```
    pub fn save_on_server_error(mut self, save: bool) -> Self {
        self.config().save_on_server_error = save;
        self
    }

    /// Whether changes are saved when the response is a client error (4xx). Default on: a form
    /// that failed validation may still have changed the session on purpose (a flash message, a
    /// counter of failed attempts). Turn it off to treat 4xx like 5xx.
    ///
    /// # Examples
    ///
    /// ```
    /// # use mmap_session::{store::Store, SessionLayer};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let store = Store::open(dir.path().join("sessions"))?;
    /// let layer = SessionLayer::new(store).save_on_client_error(false);
    /// # Ok(())
    /// # }
    /// ```
    pub fn save_on_client_error(mut self, save: bool) -> Self {
        self.config().save_on_client_error = save;
        self
    }

    /// How many stored sessions this layer (and its clones) found undecodable: records written by
    /// another version of the application, or damaged. Each such request fails with a `500` and
    /// an error log line naming the session's [`ShortHash`](crate::ShortHash); the record is kept
    /// as it was. Watch it after a deploy.
    ///
    /// # Examples
    ///
    /// ```
    /// # use mmap_session::{store::Store, SessionLayer};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let store = Store::open(dir.path().join("sessions"))?;
    /// let layer = SessionLayer::new(store);
    /// let app: axum::Router = axum::Router::new().layer(layer.clone());
    /// assert_eq!(layer.undecodable_sessions(), 0);
    /// # Ok(())
    /// # }
    /// ```
    pub fn undecodable_sessions(&self) -> u64 {
        self.shared
            .undecodable
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Signs cookies with HMAC-SHA256 (default: unsigned). New cookies are signed with the first key;
    /// cookies signed with any of the keys are accepted, so keys can be rotated without signing
    /// everybody out. Unsigned or wrongly signed cookies are "no session".
    ///
    /// # Examples
    ///
    /// ```
    /// # use mmap_session::{store::Store, SessionLayer};
    /// use mmap_session::SigningKeys;
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let store = Store::open(dir.path().join("sessions"))?;
    /// # let (current_key, previous_key) = ([1u8; 32], [2u8; 32]);
    /// let keys = SigningKeys::new([current_key, previous_key])?;
    /// let layer = SessionLayer::new(store).signed(keys);
    /// # Ok(())
    /// # }
    /// ```
    pub fn signed(mut self, keys: SigningKeys) -> Self {
        self.config().keys = Some(keys);
        self
    }
}

impl<S> Layer<S> for SessionLayer {
    type Service = SessionService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SessionService::new(inner, Arc::clone(&self.shared))
    }
}
