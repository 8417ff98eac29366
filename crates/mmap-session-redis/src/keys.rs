//! The names the backend gives a session's keys in Redis: only a BLAKE3 hash of the layer's key.

/// The Redis keys of one session.
///
/// `{prefix}{<hash>}` holds the record, `{prefix}{<hash>}:lease` the busy lease and
/// `{prefix}{<hash>}:gen` the lease generation counter, `{prefix}{<hash>}:queue` the waiters of
/// other processes in arrival order while there are any (and, briefly, `…:cancelled:<token>` the
/// marker of a cancelled taking). The braces are a Redis Cluster hash tag:
/// the keys of one session live in one slot, so one script can touch them together.
#[derive(Clone, Debug)]
pub(crate) struct SessionKeys {
    /// Hex BLAKE3 hash of the layer's key: what a release publishes.
    pub(crate) hash: String,
    pub(crate) record: String,
    pub(crate) lease: String,
    pub(crate) generation: String,
}

impl SessionKeys {
    pub(crate) fn new(prefix: &str, key: &[u8]) -> Self {
        let hash = blake3::hash(key).to_hex().to_string();
        let record = format!("{prefix}{{{hash}}}");
        Self {
            lease: format!("{record}:lease"),
            generation: format!("{record}:gen"),
            record,
            hash,
        }
    }

    /// The first 8 hex characters of the hash: how logs name the session (the same as the layer's
    /// `ShortHash` of the id).
    pub(crate) fn short(&self) -> &str {
        self.hash.get(..8).unwrap_or(&self.hash)
    }

    /// The keys of a script run for the lease token `token`, in the order the scripts expect
    /// them: the lease, the generation counter, the record, the token's cancel marker
    /// (`{prefix}{<hash>}:cancelled:<token>`) and the queue of waiters (`{prefix}{<hash>}:queue`),
    /// all in the same slot.
    pub(crate) fn for_token(&self, token: &str) -> Vec<String> {
        vec![
            self.lease.clone(),
            self.generation.clone(),
            self.record.clone(),
            format!("{}:cancelled:{token}", self.record),
            self.queue(),
        ]
    }

    /// The session's queue of waiters (see the `scripts` module).
    pub(crate) fn queue(&self) -> String {
        format!("{}:queue", self.record)
    }

    /// The session's shard channel, on which a release publishes `<hash>:<token>` to wake the
    /// head of the queue (in the session's slot, like its keys).
    pub(crate) fn release_channel(&self) -> String {
        format!("{}:released", self.record)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn keys_hold_the_hash_and_not_the_key() {
        let key = b"0123456789abcdef";
        let keys = SessionKeys::new("app:", key);
        assert_eq!(keys.hash.len(), 64);
        for name in keys.for_token("t") {
            assert!(name.starts_with("app:{"), "{name}");
            assert!(!name.contains("0123456789abcdef"), "{name}");
        }
        assert_eq!(keys.short(), &keys.hash[..8]);
        assert_eq!(keys.lease, format!("app:{{{}}}:lease", keys.hash));
    }

    #[test]
    fn different_keys_get_different_names() {
        let a = SessionKeys::new("p:", b"a");
        let b = SessionKeys::new("p:", b"b");
        assert_ne!(a.record, b.record);
    }
}
