//! Sessions in one memory-mapped file, shared by every process on the machine that opens it.
//!
//! Keys and values are opaque bytes. The file holds only a BLAKE3 hash of each key, never the
//! key itself, so a copy of the file does not reveal session ids.
//!
//! - **Busy lease per key.** [`Store::lease`] (async) or [`Store::lease_blocking`] waits until
//!   nobody else holds the key, in any process, thread or task, and returns a [`Lease`]. Through
//!   it the holder reads the committed bytes, commits new ones or removes the record; dropping it
//!   releases the key. Waiters sleep on a futex and are woken by the release.
//!   [`Store::lease_existing`] leases a key only if it has a live record (for keys that come from
//!   outside, such as a cookie's session id: a key that names nothing takes no lease).
//! - **Crash-safe.** A commit writes the new record to a fresh block and publishes it with one
//!   atomic compare-and-swap that also checks the lease is still held (fencing). A process
//!   killed at any instruction leaves each key at its old or its new value. A lease whose holder
//!   died is taken over within milliseconds: each process holds an OFD lock on its registration
//!   byte for its whole life, and the kernel drops it when the process dies.
//! - **Lock-free reads.** [`Store::get`] copies the last committed value without waiting for or
//!   taking the lease, and verifies it with a checksum.
//! - **Bounded.** Every record has an absolute expiry; expired records are never returned and
//!   are reclaimed incrementally. The file grows on demand up to a maximum; when full, expired
//!   and then least recently used idle records are evicted (never a leased one), or
//!   [`StoreError::StoreFull`] is returned.
//! - **Durability, chosen per process.** [`Options::durability`]: by default nothing is forced
//!   to the disk (a process crash loses nothing committed, a power loss may);
//!   [`Durability::Periodic`] `msync`s this process's changes in the background, and
//!   [`Durability::OnCommit`] returns from a commit only once it is on the disk.
//!
//! The byte layout and the lease protocol, with what a crash at each step leaves behind, are
//! described in `FORMAT.md` next to this crate's manifest.
//!
//! # Example
//!
//! ```
//! use std::time::{Duration, Instant, SystemTime};
//! use mmap_session_store::Store;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let store = Store::open(dir.path().join("sessions.mmap"))?;
//!
//! // Take the busy lease of one session, read it, change it, commit.
//! let mut lease = store.lease_blocking(b"session-id", Instant::now() + Duration::from_secs(1))?;
//! assert_eq!(lease.read(), None);
//! lease.commit(br#"{"count":1}"#, SystemTime::now() + Duration::from_secs(3600))?;
//! drop(lease); // releases the lease; another process may take it now
//!
//! // Any process that opens the same path sees the commit, without taking the lease.
//! let record = store.get(b"session-id").ok_or("missing")?;
//! assert_eq!(record.value, br#"{"count":1}"#);
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

/// Names a step of a protocol that writes shared state (see FORMAT.md, "What a crash leaves
/// behind"), so that a test can stall or kill a process exactly there. Compiled away unless the
/// `failpoints` feature is on; `crates/mmap-session-store-faults` tests every name.
macro_rules! failpoint {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name);
    };
}

mod alloc;
mod durability;
mod error;
mod evict;
mod grow;
mod index;
mod inspect;
mod layout;
mod lease;
#[cfg(feature = "tokio")]
mod local;
mod lock;
mod map;
mod metrics;
mod open;
mod record;
mod recover;
mod store;
mod sys;
mod verify;

pub use durability::Durability;
pub use error::{OpenError, StoreError};
pub use inspect::{EntryInfo, LeaseHolder};
pub use lease::Lease;
pub use open::Options;
pub use store::{Record, Stats, Store};
pub use verify::VerifyReport;
