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

/// `base` followed by `suffix`, in a string of its own (every request builds these names: plain
/// copies, not the formatting machinery).
fn joined(base: &str, suffix: &str) -> String {
    let mut name = String::with_capacity(base.len() + suffix.len());
    name.push_str(base);
    name.push_str(suffix);
    name
}

impl SessionKeys {
    pub(crate) fn new(prefix: &str, key: &[u8]) -> Self {
        let hash = blake3::hash(key).to_hex();
        let mut record = String::with_capacity(prefix.len() + hash.len() + 2);
        record.push_str(prefix);
        record.push('{');
        record.push_str(&hash);
        record.push('}');
        Self {
            lease: joined(&record, ":lease"),
            generation: joined(&record, ":gen"),
            record,
            hash: hash.as_str().to_owned(),
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
        let mut marker = String::with_capacity(self.record.len() + 11 + token.len());
        marker.push_str(&self.record);
        marker.push_str(":cancelled:");
        marker.push_str(token);
        vec![
            self.lease.clone(),
            self.generation.clone(),
            self.record.clone(),
            marker,
            self.queue(),
        ]
    }

    /// The session's queue of waiters (see the `scripts` module).
    pub(crate) fn queue(&self) -> String {
        joined(&self.record, ":queue")
    }

    /// The session's shard channel, on which a release publishes `<hash>:<token>` to wake the
    /// head of the queue (in the session's slot, like its keys).
    pub(crate) fn release_channel(&self) -> String {
        joined(&self.record, ":released")
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
        assert_eq!(
            keys.for_token("t"),
            [
                format!("app:{{{}}}:lease", keys.hash),
                format!("app:{{{}}}:gen", keys.hash),
                format!("app:{{{}}}", keys.hash),
                format!("app:{{{}}}:cancelled:t", keys.hash),
                format!("app:{{{}}}:queue", keys.hash),
            ]
        );
        assert_eq!(
            keys.release_channel(),
            format!("app:{{{}}}:released", keys.hash)
        );
    }

    #[test]
    fn different_keys_get_different_names() {
        let a = SessionKeys::new("p:", b"a");
        let b = SessionKeys::new("p:", b"b");
        assert_ne!(a.record, b.record);
    }
}
