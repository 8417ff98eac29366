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
/// Tag of an entry given up by an insert (its own, or fenced by a later holder of the shard
/// lock); matches no key, and lookups go on past it.
pub(crate) const TAG_VACATED: u64 = 1;

impl KeyHash {
    pub(crate) fn new(key: &[u8]) -> KeyHash {
        KeyHash::from_hash(*blake3::hash(key).as_bytes())
    }

    /// The index position and tag of a key known by its BLAKE3 hash.
    pub(crate) fn from_hash(hash: [u8; 32]) -> KeyHash {
        let word = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&hash[at..at + 8]);
            u64::from_le_bytes(b)
        };
        // Real tags have bit 1 set and bit 0 clear, so they never equal EMPTY, VACATED or a claim.
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

    /// The insert protocol (FORMAT.md, "Inserting a key"). Every step is one compare-and-swap,
    /// and the key's tag is published only from this holder's claim, so that a holder deposed
    /// at any step can neither hide a successor's entry nor leave a second entry for a key.
    fn insert_locked(
        &self,
        kh: &KeyHash,
        lock_off: u64,
        lock: u32,
    ) -> Result<Inserted, StoreError> {
        let mine = claim_tag(lock);
        for _ in 0..4 {
            let (found, chosen) = self.scan_window(kh, mine)?;
            if let Some(pos) = found {
                return Ok(Inserted::Exists(pos));
            }
            let Some((pos, tag, st)) = chosen else {
                if self.evict_in_window(kh)? {
                    continue;
                }
                return Err(StoreError::StoreFull);
            };
            let token = self.new_token();
            let state_off = self.entry_off(pos) + E_STATE;
            let tag_off = self.entry_off(pos) + E_TAG;
            if self.map.cas_u64(state_off, st, state(0, token)).is_err() {
                continue;
            }
            failpoint!("index.insert.state_claimed");
            if self.map.cas_u64(tag_off, tag, mine).is_err() {
                self.release_internal(state_off, token);
                continue;
            }
            failpoint!("index.insert.tag_claimed");
            // A stopped process can lose the shard lock to a take-over. A claim made before
            // that is fenced by the successor (`scan_window`); one made after is undone here.
            let still_locked =
                self.map.load_u64(lock_off, Ordering::Acquire).map(holder) == Some(lock);
            if !still_locked {
                let _ = self.map.cas_u64(tag_off, mine, TAG_VACATED);
                self.release_internal(state_off, token);
                return Ok(Inserted::Retry);
            }
            failpoint!("index.insert.checked");
            // The commit point of an insert: fails if a successor fenced our claim meanwhile.
            if self.map.cas_u64(tag_off, mine, kh.tag).is_err() {
                self.release_internal(state_off, token);
                return Ok(Inserted::Retry);
            }
            failpoint!("index.insert.tagged");
            return Ok(Inserted::Leased(pos, token));
        }
        Ok(Inserted::Retry)
    }

    /// One pass over `kh`'s window under the shard lock whose claim tag is `mine`: fences off
    /// the claims of earlier, deposed holders of the lock (they become vacated, so their late
    /// publish fails), then finds `kh`'s entry, or else the first entry an insert may take.
    #[allow(clippy::type_complexity)]
    fn scan_window(
        &self,
        kh: &KeyHash,
        mine: u64,
    ) -> Result<(Option<u64>, Option<(u64, u64, u64)>), StoreError> {
        let mut chosen = None;
        for pos in self.window(self.home(kh)) {
            let tag_off = self.entry_off(pos) + E_TAG;
            let Some(mut tag) = self.map.load_u64(tag_off, Ordering::Acquire) else {
                return Err(StoreError::Corrupted("index outside the file"));
            };
            while is_claim(tag) && tag != mine {
                match self.map.cas_u64(tag_off, tag, TAG_VACATED) {
                    Ok(_) => tag = TAG_VACATED,
                    // The deposed holder published (or undid) its claim first: look again.
                    Err(Some(now)) => tag = now,
                    Err(None) => return Err(StoreError::Corrupted("index outside the file")),
                }
            }
            if tag == kh.tag {
                return Ok((Some(pos), None));
            }
            let Some(st) = self
                .map
                .load_u64(self.entry_off(pos) + E_STATE, Ordering::Acquire)
            else {
                return Err(StoreError::Corrupted("index outside the file"));
            };
            // Usable: no key and no record. A lease there is an insert's that was given up, or
            // a holder's that gave its key up on release (FORMAT.md, "Inserting a key"). An
            // entry that still has a key is never taken: only its own lease holder gives it up.
            let keyless = tag == TAG_EMPTY || tag == TAG_VACATED;
            if chosen.is_none() && keyless && state_block(st) == 0 {
                chosen = Some((pos, tag, st));
            }
            if tag == TAG_EMPTY {
                break; // lookups stop here, and no claim lies beyond the first empty entry
            }
        }
        Ok((None, chosen))
    }
}

impl Shared {
    /// Gives up the key of an entry whose lease `token` holds and which has no record, before
    /// the lease is released, so that an insert may reuse the entry. False if it still has a
    /// record, or the lease is no longer ours.
    pub(crate) fn give_up_key(&self, state_off: u64, token: u32) -> bool {
        let tag_off = state_off - E_STATE + E_TAG;
        if !self.holds_without_record(state_off, token) {
            return false;
        }
        failpoint!("index.give_up.checked");
        let Some(tag) = self.map.load_u64(tag_off, Ordering::Acquire) else {
            return false;
        };
        // Only a key's tag is given up; only the lease holder of a keyed entry changes it.
        if tag & 3 != 2 || self.map.cas_u64(tag_off, tag, TAG_VACATED).is_err() {
            return false;
        }
        failpoint!("index.key_given_up");
        // The check and the swap are two steps. A holder stopped between them for longer than
        // the lease timeout was deposed, and its successor may have committed a record under
        // the key meanwhile: it puts the key back (FORMAT.md, "Giving a key up").
        if self.holds_without_record(state_off, token) {
            return true;
        }
        let _ = self.map.cas_u64(tag_off, TAG_VACATED, tag);
        false
    }

    /// Whether `token` holds the lease at `state_off` and the entry has no record.
    fn holds_without_record(&self, state_off: u64, token: u32) -> bool {
        self.map
            .load_u64(state_off, Ordering::Acquire)
            .is_some_and(|st| holder(st) == token && state_block(st) == 0)
    }
}

/// The tag of an entry being inserted by the holder of a shard lock: its lock token, so that
/// a later holder can tell the claim is not its own. Low bits `11` match no key's tag.
pub(crate) fn claim_tag(lock: u32) -> u64 {
    (u64::from(lock & !TOKEN_WAITERS) << 2) | 3
}

/// Whether `tag` is an insert's claim rather than a key, empty or vacated.
pub(crate) fn is_claim(tag: u64) -> bool {
    tag & 3 == 3
}
