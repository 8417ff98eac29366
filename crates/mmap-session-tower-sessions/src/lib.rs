//! A [tower-sessions] 0.15 store that keeps sessions in one memory-mapped file, shared by every
//! process on the machine that opens it.
//!
//! An application that uses tower-sessions switches to it in one line:
//!
//! ```no_run
//! # use mmap_session_tower_sessions::{store::Store, MmapStore};
//! # use tower_sessions::SessionManagerLayer;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let layer = SessionManagerLayer::new(MmapStore::new(Store::open("/var/lib/myapp/sessions")?));
//! # let _ = layer;
//! # Ok(())
//! # }
//! ```
//!
//! Then every copy of the application that opens the same path (behind nginx, or on one port with
//! `SO_REUSEPORT`) serves every session; sessions survive restarts and deploys.
//!
//! # What it gives
//!
//! - **Sharing between processes** through [`Store`](mmap_session_store::Store): a load copies
//!   the record out of shared memory without any lock; a create, save or delete takes the
//!   session's busy lease in the file only while the record is copied in (inside a
//!   [`LeaseLayer`], from the request's first access to its response).
//! - **Crash safety**: a process killed at any moment leaves each session at its old or its new
//!   state, and a lease whose holder died is taken over within milliseconds.
//! - **No id collision** ([`SessionStore::create`](tower_sessions_core::SessionStore::create)):
//!   the id is checked free and written under its lease; a taken id is replaced by a fresh one.
//! - **Logout wins**: a save of a session that another request deleted (logout, `cycle_id`,
//!   `flush`), or that expired or was evicted meanwhile, does not bring it back.
//! - **No usable id in the file**: the store keeps only a BLAKE3 hash of each id, and the record
//!   holds the data and expiry only. Logs name a session by the first 8 hex characters of that
//!   hash, the name `mmap-session-admin` shows.
//! - **Expiry**: expired records are never loaded, and are reclaimed by the store as it goes;
//!   [`ExpiredDeletion::delete_expired`](tower_sessions_core::ExpiredDeletion::delete_expired)
//!   purges them all at once.
//!
//! # No lost update: [`LeaseLayer`]
//!
//! tower-sessions calls its store at the first access of a request and again when the response is
//! ready, with nothing in between, so on its own the adapter holds no lease across a request: when
//! two requests of one session overlap (in one process or two), each saves the state it loaded
//! plus its own change, and the change of the one that saves first is lost, as with every
//! tower-sessions store. Put [`LeaseLayer`] around tower-sessions' layer and the session's busy
//! lease is held from the request's first access to its session until its response is ready: the
//! second request waits and sees the first one's change, as with `mmap_session::SessionLayer`.
//!
//! ```no_run
//! # use mmap_session_tower_sessions::{store::Store, LeaseLayer, MmapStore};
//! # use tower_sessions::SessionManagerLayer;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = MmapStore::new(Store::open("/var/lib/myapp/sessions")?);
//! let app: axum::Router = axum::Router::new()
//!     // .route(...)
//!     .layer(SessionManagerLayer::new(store))
//!     .layer(LeaseLayer::new());
//! # Ok(())
//! # }
//! ```
//!
//! See [`LeaseLayer`] for what it does with cancelled requests, lease waits that run out (`503`),
//! stalled holders, and tasks spawned by handlers ([`in_request_scope`]).
//!
//! Give this adapter a file of its own: the `mmap-session` layer stores its sessions in another
//! format, and each treats the other's records as damaged (absent).
//!
//! [tower-sessions]: https://docs.rs/tower-sessions/0.15

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod adapter;
mod error;
mod lease_layer;
mod record;

pub use adapter::MmapStore;
pub use error::MmapStoreError;
pub use lease_layer::{in_request_scope, LeaseLayer, LeaseService};

/// The store file this adapter works on (`mmap-session-store`), re-exported so that an
/// application needs no second dependency to open it.
pub use mmap_session_store as store;
