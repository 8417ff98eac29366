//! How to reach Redis and how the backend behaves: [`RedisConfig`].

use std::fmt;
use std::time::Duration;

use crate::{RedisBackend, RedisError};

/// Default number of connections in the pool.
pub const DEFAULT_POOL_SIZE: usize = 4;
/// Default prefix of every key the backend writes.
pub const DEFAULT_KEY_PREFIX: &str = "mmap-session:";
/// Default lease time-out: the longest a live holder keeps a lease, like the file store's
/// `lease_timeout`.
pub const DEFAULT_LEASE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default lease TTL: how long a lease outlives its last renewal, and so how long the session of a
/// holder that died stays blocked.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(2);
/// Default largest record: like the file store's `max_value_len`.
pub const DEFAULT_MAX_VALUE_LEN: usize = 64 << 10;
/// Default time a command may take (connecting included) before it fails.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// Configuration of a [`RedisBackend`]: where Redis is, and the backend's limits.
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
/// use mmap_session_redis::RedisConfig;
///
/// # async fn run() -> Result<(), mmap_session_redis::RedisError> {
/// let backend = RedisConfig::new("redis://127.0.0.1:6379")
///     .pool_size(8)
///     .key_prefix("shop:session:")
///     .lease_timeout(Duration::from_secs(10))
///     .connect()
///     .await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisConfig {
    pub(crate) url: String,
    pub(crate) pool_size: usize,
    pub(crate) key_prefix: String,
    pub(crate) lease_timeout: Duration,
    pub(crate) lease_ttl: Duration,
    pub(crate) max_value_len: usize,
    pub(crate) command_timeout: Duration,
}

impl RedisConfig {
    /// A configuration for the server at `url` (`redis://[user:password@]host[:port][/db]`), with
    /// the defaults: a pool of 4 connections, key prefix `mmap-session:`, leases with a TTL of 2 s
    /// renewed by their holder for at most 30 s, records of at most 64 KiB, commands that fail
    /// after 5 s.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            pool_size: DEFAULT_POOL_SIZE,
            key_prefix: DEFAULT_KEY_PREFIX.to_owned(),
            lease_timeout: DEFAULT_LEASE_TIMEOUT,
            lease_ttl: DEFAULT_LEASE_TTL,
            max_value_len: DEFAULT_MAX_VALUE_LEN,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
        }
    }

    /// Number of pooled connections commands are spread over (at least 1; default 4). Each
    /// backend also keeps one more connection subscribed to lease releases.
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size;
        self
    }

    /// Prefix of every key and of the release channel (default `mmap-session:`): give each
    /// application sharing one Redis its own.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// The longest a live holder keeps a lease (default 30 s): its holder renews it while the
    /// request runs, up to this long after taking it; a request that takes longer loses the lease
    /// and its commit is refused.
    pub fn lease_timeout(mut self, timeout: Duration) -> Self {
        self.lease_timeout = timeout;
        self
    }

    /// How long a lease lives past its last renewal (default 2 s, at least 3 ms): the holder
    /// renews it every third of this while its request runs, so a holder that died (killed, frozen,
    /// cut off from Redis) blocks its session for at most this long. Redis cannot tell that a
    /// client died, only that a key expired: shorter frees such sessions sooner, at the cost of
    /// more renewals and of losing the lease to a pause (garbage collection, a stalled network)
    /// longer than this.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// Largest record, in bytes (default 64 KiB); a larger commit fails with
    /// [`BackendError::TooLarge`](mmap_session::BackendError::TooLarge) and writes nothing.
    pub fn max_value_len(mut self, len: usize) -> Self {
        self.max_value_len = len;
        self
    }

    /// How long connecting, or one command, may take before it fails (default 5 s).
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// Connects the pool and the release subscription.
    ///
    /// # Errors
    ///
    /// [`RedisError::InvalidUrl`], [`RedisError::Config`] for a zero pool size or lease time-out or
    /// a lease TTL under 3 ms,
    /// [`RedisError::Connect`] if the server cannot be reached.
    pub async fn connect(self) -> Result<RedisBackend, RedisError> {
        RedisBackend::from_config(self).await
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redacted(&self.url))
            .field("pool_size", &self.pool_size)
            .field("key_prefix", &self.key_prefix)
            .field("lease_timeout", &self.lease_timeout)
            .field("lease_ttl", &self.lease_ttl)
            .field("max_value_len", &self.max_value_len)
            .field("command_timeout", &self.command_timeout)
            .finish()
    }
}

/// `url` without the password, if it has one.
pub(crate) fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((credentials, host)) => {
            let user = credentials.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_the_password() {
        let config = RedisConfig::new("redis://ann:secret@cache:6380/2");
        let shown = format!("{config:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("redis://ann:***@cache:6380/2"), "{shown}");
        assert_eq!(redacted("redis://cache"), "redis://cache");
    }
}
