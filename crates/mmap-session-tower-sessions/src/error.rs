//! The adapter's errors, and how tower-sessions sees them.

use std::time::Duration;

use mmap_session_store::StoreError;
use tower_sessions_core::session_store;

/// Why a [`MmapStore`](crate::MmapStore) operation failed. Sessions are named by the short hash
/// of their id (the name the store logs them under), never by the id.
///
/// tower-sessions only carries strings, so the [`SessionStore`](tower_sessions_core::SessionStore)
/// methods return this error converted into [`session_store::Error`]: `Encode` for
/// [`MmapStoreError::Encode`], `Backend` for everything else, with this error's message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MmapStoreError {
    /// The session data could not be serialized to JSON (a map key that is not a string, for
    /// example). Nothing was written.
    #[error("session {session}: its data does not serialize to JSON: {source}")]
    Encode {
        /// Short hash of the session's id.
        session: String,
        /// What serde_json reported.
        #[source]
        source: serde_json::Error,
    },
    /// Another request held the session's lease for longer than the adapter waits. Nothing was
    /// written; the request may be retried.
    #[error(
        "session {session}: {operation} gave up after {waited:?} waiting for the session's lease, \
         held by another request (raise MmapStore::with_lease_wait if this is expected load)"
    )]
    LeaseTimeout {
        /// Short hash of the session's id.
        session: String,
        /// What the adapter was doing: `create`, `load` (inside a
        /// [`LeaseLayer`](crate::LeaseLayer)), `save` or `delete`.
        operation: &'static str,
        /// How long it waited.
        waited: Duration,
    },
    /// The request held the session's lease (inside a [`LeaseLayer`](crate::LeaseLayer)) for
    /// longer than the store's lease timeout while another request waited, and that request took
    /// the lease over. Nothing was written, so the stalled request cannot overwrite the newer
    /// state.
    #[error(
        "session {session}: {operation} refused: this request held the session's lease past the \
         store's lease timeout and another request took it over; nothing was written (raise \
         Options::lease_timeout if requests legitimately take this long)"
    )]
    LeaseLost {
        /// Short hash of the session's id.
        session: String,
        /// What the adapter was doing: `save` or `delete`.
        operation: &'static str,
    },
    /// The store refused the operation (full, value too large, file damaged, I/O). Nothing was
    /// written.
    #[error("session {session}: {operation} failed in the session store: {source}")]
    Store {
        /// Short hash of the session's id.
        session: String,
        /// What the adapter was doing: `create`, `save` or `delete`.
        operation: &'static str,
        /// What the store reported.
        #[source]
        source: StoreError,
    },
    /// Every freshly drawn id for a new session was already taken: the id generator repeats
    /// itself, which 128 random bits never do in practice.
    #[error(
        "no free id for a new session after {0} random draws: the random number generator is broken"
    )]
    NoFreeId(u32),
    /// The background task purging expired records failed (it panicked or the runtime is shutting
    /// down).
    #[error("purging expired sessions did not complete: {0}")]
    Purge(#[source] tokio::task::JoinError),
}

impl MmapStoreError {
    /// Whether the store was unavailable rather than the request wrong: a lease wait that timed
    /// out, or a full store. A [`LeaseLayer`](crate::LeaseLayer) answers these with `503`.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            MmapStoreError::LeaseTimeout { .. }
                | MmapStoreError::Store {
                    source: StoreError::StoreFull,
                    ..
                }
        )
    }
}

impl From<MmapStoreError> for session_store::Error {
    fn from(error: MmapStoreError) -> Self {
        match error {
            MmapStoreError::Encode { .. } => session_store::Error::Encode(error.to_string()),
            _ => session_store::Error::Backend(error.to_string()),
        }
    }
}
