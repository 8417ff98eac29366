//! The tower middleware: [`SessionLayer`] wraps a service in a [`SessionService`], whose calls return
//! a [`ResponseFuture`].
//!
//! For every request the service reads the session cookie (checking its form and, when signing is
//! on, its signature), puts a lazy [`Session`](crate::Session) handle into the request's extensions
//! and calls the inner service. When the inner service's response is ready, the future settles the
//! session: it commits a changed session and releases the lease, refreshes a sliding expiry that is
//! due, deletes an emptied or flushed session and expires its cookie, and adds `Set-Cookie` only when
//! the browser has something new to learn. If the session was never touched, the response passes
//! through untouched.
//!
//! If the future is dropped before that (the client went away, the handler panicked), the session is
//! released and nothing is saved.
//!
//! ```
//! use axum::{routing::get, Router};
//! use mmap_session::{store::Store, SessionLayer};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! let store = Store::open(dir.path().join("sessions"))?;
//! let app: Router = Router::new()
//!     .route("/", get(|| async { "hello" }))
//!     .layer(SessionLayer::new(store));
//! # Ok(())
//! # }
//! ```

mod future;
mod layer;
mod service;

pub use future::ResponseFuture;
pub use layer::SessionLayer;
pub use service::SessionService;
