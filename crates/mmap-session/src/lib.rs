//! Sessions for axum and tower, kept in one memory-mapped file that every copy of the application
//! shares.
//!
//! Wrap a router in a [`SessionLayer`] and take a [`Session`] in handlers. The session is loaded on
//! the handler's first access, under the session's *busy lease*: a second request of the same
//! session (in this process or another one mapping the same file) waits until the first one's response
//! is ready, so concurrent requests never lose each other's changes. Handlers that only read can use
//! [`ReadOnlySession`], which neither waits nor holds anything. Applications that keep their session
//! in one struct can use [`TypedSession`].
//!
//! What the layer promises:
//!
//! - **Lazy**: a handler that does not touch the session costs no store access, no lease and no
//!   cookie.
//! - **No lost updates**: one busy lease per session, held from first access to response.
//! - **Saved only when changed**; an unchanged session's sliding expiry is refreshed at most once per
//!   [`refresh_interval`](SessionLayer::refresh_interval). Emptied or flushed sessions are deleted and
//!   their cookie expired. Nothing is saved on a 5xx response unless
//!   [`save_on_server_error`](SessionLayer::save_on_server_error) says so.
//! - **A success status means it is saved**: if loading or saving fails, the client gets a plain `500`
//!   (or `503` with `Retry-After: 1` when the session stayed busy past
//!   [`lease_wait`](SessionLayer::lease_wait)) instead of the handler's response. The cause goes to
//!   `tracing` with the session's [`ShortHash`], never its id.
//! - **No fixation**: ids are 128 bits from the OS CSPRNG; a malformed, oversized, forged or unknown
//!   cookie is "no session", and a new session always gets a fresh id.
//!   [`Session::cycle_id`] moves a session to a new id at login without ever losing it.
//! - **Hostile input loses nothing**: the `Cookie` header is read as bytes (other cookies may hold
//!   any byte); of several session cookies (other paths, other domains) the first few are tried
//!   until one names a live session; a session cookie that names none is expired when the handler
//!   touched the session (never over a login sent with it at the same time); a value nested
//!   too deep to be read back is refused at insert ([`SessionError::TooDeep`]); a stored session
//!   that does not decode fails the request and is kept and counted, never silently replaced.
//!   Name the cookie `__Host-...` to stop sibling subdomains from planting one (see
//!   [`SessionLayer::cookie_name`]).
//! - **Login and logout win over the requests racing them**: a request still carrying the old
//!   cookie while (or just after) [`Session::cycle_id`] or [`Session::flush`] replaced the session
//!   sets no cookie and changes nothing ([`SessionError::Replaced`], [`REPLACED_GRACE`]).
//! - **Panics and disconnects** release the lease and save nothing.
//! - **Secure cookie defaults** (`Secure`, `HttpOnly`, `SameSite=Lax`, `Path=/`), optional HMAC-signed
//!   cookies with key rotation ([`SigningKeys`]).
//!
//! Storage is reached through the [`SessionBackend`] trait, implemented for
//! [`store::Store`]; another backend can be added without changing the layer.
//!
//! # Example: wrap your router
//!
//! ```
//! use axum::{body::Body, http::Request, routing::get, Router};
//! use mmap_session::{store::Store, Session, SessionError, SessionLayer};
//! use tower::ServiceExt as _;
//!
//! async fn count(session: Session) -> Result<String, SessionError> {
//!     let visits: u64 = session.get("visits").await?.unwrap_or(0) + 1;
//!     session.insert("visits", visits).await?;
//!     Ok(format!("visit number {visits}"))
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! // Every copy of the application opens the same file.
//! let store = Store::open(dir.path().join("sessions"))?;
//! let app = Router::new()
//!     .route("/", get(count))
//!     .layer(SessionLayer::new(store));
//!
//! // Serve it with `axum::serve(listener, app)`; here, one request in process:
//! let response = app
//!     .oneshot(Request::get("/").body(Body::empty())?)
//!     .await?;
//! let cookie = response.headers()["set-cookie"].to_str()?;
//! assert!(cookie.starts_with("session="));
//! assert!(cookie.contains("HttpOnly") && cookie.contains("Secure"));
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod backend;
mod config;
mod cookies;
mod envelope;
mod error;
mod extract;
mod id;
mod metrics;
pub mod middleware;
mod read_only;
mod save;
mod session;
mod typed;

pub use backend::{BackendError, BackendLease, SessionBackend, StoredRecord};
pub use config::{
    Expiry, KeyError, SameSite, SigningKeys, BROWSER_SESSION_IDLE, DEFAULT_COOKIE_NAME,
    DEFAULT_EXPIRY, DEFAULT_LEASE_WAIT, DEFAULT_MAX_SESSION_SIZE, DEFAULT_REFRESH_INTERVAL,
    MIN_KEY_LEN, REPLACED_GRACE,
};
pub use error::{SessionError, SessionLayerMissing};
pub use id::{SessionId, ShortHash};
pub use middleware::{ResponseFuture, SessionLayer, SessionService};
pub use read_only::ReadOnlySession;
pub use session::Session;
pub use typed::TypedSession;

/// The memory-mapped store this crate is built on (the `mmap-session-store` crate), re-exported so
/// that one dependency is enough.
pub use mmap_session_store as store;
