//! The index: where a key's entry lives (an open-addressed window inside one shard), how a
//! lookup finds it without locks, and how an insert claims an entry under the shard's lock.
//! FORMAT.md, "Index entry".

use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::error::StoreError;
use crate::layout::*;
use crate::store::Shared;

/// The hash under which a key is indexed. The file never holds the key itself.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KeyHash {
    pub(crate) hash: [u8; 32],
    pub(crate) tag: u64,
    home: u64,
}

/// Tag of an entry that never held a key: lookups stop here.
pub(crate) const TAG_EMPTY: u64 = 0;
/// Tag of an entry given up by an insert that lost its shard lock; matches no key.
pub(crate) const TAG_VACATED: u64 = 1;

impl KeyHash {
    pub(crate) fn new(key: &[u8]) -> KeyHash {
        let hash = *blake3::hash(key).as_bytes();
        let word = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&hash[at..at + 8]);
            u64::from_le_bytes(b)
        };
        // Real tags have bit 1 set and bit 0 clear, so they never equal EMPTY or VACATED.
        KeyHash {
            hash,
            tag: (word(0) & !3) | 2,
            home: word(8),
        }
    }

    /// A short, non-reversible name for logs.
    pub(crate) fn short(&self) -> String {
        self.hash[..4].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Outcome of an insert under the shard lock.
pub(crate) enum Inserted {
    Leased(u64, u32),
    Exists(u64),
    Retry,
}

impl Shared {
    pub(crate) fn home(&self, kh: &KeyHash) -> u64 {
        kh.home & (self.g.index_entries - 1)
    }

    /// The positions a key may occupy: up to `MAX_PROBE` entries from its home, wrapping inside
    /// its shard.
    pub(crate) fn window(&self, home: u64) -> impl Iterator<Item = u64> {
        let len = self.g.shard_len();
        let base = home - home % len;
        let start = home - base;
        (0..MAX_PROBE.min(len)).map(move |i| base + (start + i) % len)
    }

    /// Finds the entry holding `kh`'s tag.
    pub(crate) fn lookup(&self, kh: &KeyHash) -> Option<u64> {
        for pos in self.window(self.home(kh)) {
            let tag = self
                .map
                .load_u64(self.entry_off(pos) + E_TAG, Ordering::Acquire)?;
            if tag == kh.tag {
                return Some(pos);
            }
            if tag == TAG_EMPTY {
                return None;
            }
        }
        None
    }

    /// Inserts an entry for `kh` under its shard's lock, leasing it; or finds it there.
    pub(crate) fn insert(&self, kh: &KeyHash, deadline: Instant) -> Result<Inserted, StoreError> {
        let shard = self.home(kh) / self.g.shard_len();
        let lock_off = self.g.shard_locks_off() + shard * 8;
        let lock = self.acquire(lock_off, deadline)?;
        let result = self.insert_locked(kh, lock_off, lock);
        self.release_word(lock_off, lock);
        result
    }

    fn insert_locked(
        &self,
        kh: &KeyHash,
        lock_off: u64,
        lock: u32,
    ) -> Result<Inserted, StoreError> {
        for _ in 0..4 {
            if let Some(pos) = self.lookup(kh) {
                return Ok(Inserted::Exists(pos));
            }
            let mut chosen = None;
            for pos in self.window(self.home(kh)) {
                let tag = self
                    .map
                    .load_u64(self.entry_off(pos) + E_TAG, Ordering::Acquire);
                let st = self
                    .map
                    .load_u64(self.entry_off(pos) + E_STATE, Ordering::Acquire);
                let (Some(tag), Some(st)) = (tag, st) else {
                    return Err(StoreError::Corrupted("index outside the file"));
                };
                // Vacant, or an insert whose lock holder died (or was deposed) mid-way: only the
                // holder of this shard's lock creates an entry with an empty tag.
                if st == 0 || (tag == TAG_EMPTY && state_block(st) == 0) {
                    chosen = Some((pos, tag, st));
                    break;
                }
            }
            let Some((pos, tag, st)) = chosen else {
                if self.evict_in_window(kh)? {
                    continue;
                }
                return Err(StoreError::StoreFull);
            };
            let token = self.new_token();
            let state_off = self.entry_off(pos) + E_STATE;
            if self.map.cas_u64(state_off, st, state(0, token)).is_err() {
                continue;
            }
            let tag_off = self.entry_off(pos) + E_TAG;
            let tagged = self.map.cas_u64(tag_off, tag, kh.tag).is_ok();
            // A stopped process can lose the shard lock to a take-over; its insert must not
            // stand, or two entries could hold one key.
            let still_locked =
                self.map.load_u64(lock_off, Ordering::Acquire).map(holder) == Some(lock);
            if tagged && still_locked {
                return Ok(Inserted::Leased(pos, token));
            }
            if tagged {
                let _ = self.map.cas_u64(tag_off, kh.tag, TAG_VACATED);
            }
            self.release_word(state_off, token);
            if !still_locked {
                return Ok(Inserted::Retry);
            }
        }
        Ok(Inserted::Retry)
    }
}
