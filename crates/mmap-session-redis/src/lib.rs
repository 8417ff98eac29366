//! A Redis (or Valkey) backend for [`mmap_session`]: the same busy lease per session as the
//! memory-mapped file, for sessions shared by processes on several machines.
//!
//! Wrap a router in `SessionLayer::new(RedisBackend::connect(url).await?)`; every process (on any
//! machine) that uses the same Redis and key prefix shares the sessions, and two requests of one
//! session never lose each other's changes.
//!
//! # What is kept in Redis
//!
//! For each session, under the configured prefix and a BLAKE3 hash of the session's key (never the
//! id itself):
//!
//! - `{prefix}{<hash>}`: the record, its absolute expiry in front of the layer's bytes, with a
//!   Redis TTL that drops it when it expires;
//! - `{prefix}{<hash>}:lease`: the busy lease, taken only where absent, with a short TTL (the
//!   lease TTL, 2 s by default) that its live holder renews while the request runs, holding the
//!   holder's random token and the lease's fencing generation;
//! - `{prefix}{<hash>}:gen`: the generation counter, which outlives every lease it numbered;
//! - `{prefix}{<hash>}:queue`: while anyone waits, the waiters of each process in arrival order
//!   (a hash of their tokens to their arrival and expiry), each entry lapsing a lease TTL after
//!   its waiter last refreshed it.
//!
//! Taking, committing under, removing under and releasing a lease are Lua scripts, each atomic on
//! the server; commit, remove and release check the holder's token first, so a holder whose lease
//! expired and was taken over writes nothing
//! ([`BackendError::LeaseLost`](mmap_session::BackendError::LeaseLost)). A changing request ends
//! with one script that writes and releases (two round trips per changing request, with the
//! acquire). The requests of one process take turns per session in arrival order; the one whose
//! turn it is and who finds the lease held joins the session's queue (`…:queue`) and subscribes
//! to its shard channel (`…:released`). A free lease goes to the head of the queue (a newcomer
//! queues behind), and a release publishes there (`SPUBLISH`) the head's token, only when
//! someone is queued. Trying again when the held lease's TTL (or the entry of the waiter ahead)
//! runs out, and once per lease TTL to keep the waiter's own entry alive, is the only fallback.
//!
//! # Limits
//!
//! - What survives a crash of Redis is what its persistence settings (RDB, AOF and its `fsync`
//!   policy) keep; a failover to a replica can lose the latest writes, and with them a lease.
//! - A lease lives by its TTL: Redis cannot tell that its holder died, so a session whose holder
//!   was killed waits until the lease TTL runs out ([`RedisConfig::lease_ttl`], 2 s by default;
//!   the file store, which asks the kernel, takes it over at once). A live holder renews its lease
//!   (a watchdog task, every third of the TTL) for at most [`RedisConfig::lease_timeout`]; a
//!   holder that cannot renew in time (a pause or a network cut longer than the TTL) loses the
//!   lease, and its commit is refused.
//! - A lease is only as good as Redis's clock: the lease TTL runs on the server.
//! - A Redis Cluster is supported (a `redis-cluster://` URL): each session's keys and channel
//!   share one hash tag, so its scripts run on one primary. Replication is asynchronous: a
//!   primary that crashes (or is failed over with `FORCE`/`TAKEOVER`) can take recent writes (and
//!   leases) with it; a manual `CLUSTER FAILOVER` loses nothing. While a primary is dead, its
//!   sessions get `Unavailable` until its replica is promoted; those of the live primaries are
//!   served (the backend keeps a pool per primary), except while Redis itself refuses every slot
//!   (`CLUSTERDOWN`, with the default `cluster-require-full-coverage yes`, from when it marks the
//!   node failed until the promotion). Redis 7 or later is needed (sharded pub/sub).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod backend;
mod chain;
mod config;
mod connections;
mod error;
#[cfg(feature = "test-server")]
pub mod fault_proxy;
mod keys;
mod record;
mod scripts;
#[cfg(feature = "test-server")]
pub mod test_server;
mod wake;
mod watchdog;

pub use backend::{RedisBackend, RedisLease};
pub use config::{
    RedisConfig, DEFAULT_COMMAND_TIMEOUT, DEFAULT_KEY_PREFIX, DEFAULT_LEASE_TIMEOUT,
    DEFAULT_LEASE_TTL, DEFAULT_MAX_VALUE_LEN, DEFAULT_POOL_SIZE,
};
pub use error::RedisError;
