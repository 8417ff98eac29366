//! The byte layout of a store file: every offset and size the format depends on.
//!
//! See `FORMAT.md` in the crate root for the table and the reasoning; this module is the
//! single place in code where those numbers live. All integers in the file are little-endian.

/// Identifies a store file.
pub(crate) const MAGIC: [u8; 8] = *b"MMSESSN\0";
/// Bumped whenever the meaning of any byte changes.
pub(crate) const FORMAT_VERSION: u32 = 2;
/// Identifies the locking scheme (OFD locks + futex on the state word); part of the fingerprint.
const LOCK_SCHEME: u64 = 2;

/// The header occupies the first page.
pub(crate) const HEADER_LEN: u64 = 4096;

// Immutable header fields, written once at creation.
pub(crate) const H_MAGIC: usize = 0;
pub(crate) const H_VERSION: usize = 8;
pub(crate) const H_HEADER_LEN: usize = 12;
pub(crate) const H_FINGERPRINT: usize = 16;
pub(crate) const H_INDEX_ENTRIES: usize = 24;
pub(crate) const H_INDEX_OFF: usize = 32;
pub(crate) const H_DATA_OFF: usize = 40;
pub(crate) const H_MAX_LEN: usize = 48;
pub(crate) const H_MAX_VALUE: usize = 56;
pub(crate) const H_CREATED_MS: usize = 64;
pub(crate) const H_CHECKSUM: usize = 72;
/// The checksum covers bytes `0..H_CHECKSUM`.
pub(crate) const H_IMMUTABLE_END: usize = H_CHECKSUM;

// Mutable header words, each on its own cache line where it is written often.
/// Bytes of the file reserved with `posix_fallocate` (the file's length). Only grows.
pub(crate) const H_FILE_LEN: usize = 128;
/// Number of chunks handed out (a hint; the chunk table is the truth).
pub(crate) const H_CHUNKS_CLAIMED: usize = 192;
/// Clock hand for the incremental sweep of expired records.
pub(crate) const H_SWEEP_HAND: usize = 256;
/// Live records and bytes counted by the last recovery; per-process deltas add to these.
pub(crate) const H_LIVE_BASE: usize = 320;
pub(crate) const H_BYTES_BASE: usize = 328;
/// Set when a process is known to have died since the last recovery (its slot was found in use).
pub(crate) const H_DIRTY: usize = 336;
/// Free-list heads, one word per size class: `ref (low 32) | ABA tag (high 32)`.
pub(crate) const H_FREE_HEADS: usize = 512;
/// Give-back marks, one word per size class: 0, or the token of the process giving chunks back
/// from that class's free list (its blocks are then off the list for a moment).
pub(crate) const H_GIVING_BACK: usize = 1024;

/// Process registration slots (see `sys` and `store`): one 64-byte record each.
pub(crate) const MAX_SLOTS: usize = 511;
pub(crate) const SLOTS_OFF: u64 = HEADER_LEN;
pub(crate) const SLOT_LEN: u64 = 128;
// Fields of a slot record. Counters are cumulative; live/bytes are signed deltas.
pub(crate) const S_PID: u64 = 0;
pub(crate) const S_LIVE: u64 = 8;
pub(crate) const S_BYTES: u64 = 16;
pub(crate) const S_EVICTIONS: u64 = 24;
pub(crate) const S_LEASE_WAITS: u64 = 32;
pub(crate) const S_TAKEOVERS: u64 = 40;
pub(crate) const S_CHECKSUM_FAILURES: u64 = 48;
pub(crate) const S_EXPIRED: u64 = 56;
/// 1 while a process owns the slot; cleared when it closes the store cleanly.
pub(crate) const S_IN_USE: u64 = 64;
/// The next lease sequence number this slot issues (only its owner writes it).
pub(crate) const S_SEQ: u64 = 72;
/// The chunk table (one byte per chunk: 0 = unclaimed, else size class + 1) follows the slots.
pub(crate) const CHUNK_TABLE_OFF: u64 = SLOTS_OFF + (MAX_SLOTS as u64 + 1) * SLOT_LEN;

/// An index entry: `tag: u64`, `state: u64`.
pub(crate) const ENTRY_LEN: u64 = 16;
pub(crate) const E_TAG: u64 = 0;
pub(crate) const E_STATE: u64 = 8;
/// Entries per shard; inserts lock one shard, probing never leaves it.
pub(crate) const SHARD_ENTRIES: u64 = 1024;
/// How many entries a lookup or insert examines from the home position.
pub(crate) const MAX_PROBE: u64 = 64;

/// Data lives in chunks; each chunk holds blocks of one size class.
pub(crate) const CHUNK_LEN: u64 = 1 << 20;
/// Block references count 16-byte units, so a 32-bit reference reaches 64 GiB.
pub(crate) const REF_UNIT: u64 = 16;
pub(crate) const MAX_FILE_LEN: u64 = (u32::MAX as u64) * REF_UNIT;

/// Record header inside a block.
pub(crate) const R_MAGIC: u64 = 0;
pub(crate) const R_LEN: u64 = 4;
pub(crate) const R_EXPIRES: u64 = 8;
pub(crate) const R_LAST_USED: u64 = 16;
pub(crate) const R_CHECKSUM: u64 = 24;
pub(crate) const R_KEY: u64 = 32;
pub(crate) const RECORD_HEADER: u64 = 64;
pub(crate) const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"SREC");

/// Size classes: four per power of two from 64 bytes to one chunk (1 MiB), so a record wastes at
/// most a fifth of its block.
pub(crate) const CLASS_COUNT: usize = 57;

/// The block size of size class `class`.
pub(crate) const fn class_size(class: usize) -> u64 {
    let base = 64u64 << (class / 4);
    base + (base / 4) * (class % 4) as u64
}

/// The smallest class whose blocks hold `bytes`, if any.
pub(crate) fn class_for(bytes: u64) -> Option<usize> {
    (0..CLASS_COUNT).find(|&c| class_size(c) >= bytes)
}

/// Largest value a store can be configured to hold.
pub(crate) const MAX_VALUE_LIMIT: u64 = CHUNK_LEN - RECORD_HEADER;

/// The lease token lives in the low 32 bits of an entry's state word (so a futex can wait on it).
pub(crate) const TOKEN_WAITERS: u32 = 1 << 31;
pub(crate) const TOKEN_SLOT_SHIFT: u32 = 22;
pub(crate) const TOKEN_SEQ_MASK: u32 = (1 << TOKEN_SLOT_SHIFT) - 1;

/// Byte offsets used only as OFD lock ranges, far beyond any data.
pub(crate) const LOCK_BASE: i64 = 1 << 50;
pub(crate) const LOCK_RECOVERY: i64 = LOCK_BASE + 4096;
pub(crate) const LOCK_GROW: i64 = LOCK_BASE + 4097;
/// Byte `LOCK_READY_BASE + slot` is locked by a slot's owner once it has released whatever a
/// dead predecessor in the slot held: until then, tokens of the slot are a dead process's.
pub(crate) const LOCK_READY_BASE: i64 = LOCK_BASE + 8192;

/// A fingerprint of every constant that shapes the file, so a build with a different layout
/// refuses a file instead of misreading it.
pub(crate) fn fingerprint() -> u64 {
    let parts = [
        HEADER_LEN,
        MAX_SLOTS as u64,
        SLOT_LEN,
        ENTRY_LEN,
        SHARD_ENTRIES,
        MAX_PROBE,
        CHUNK_LEN,
        REF_UNIT,
        RECORD_HEADER,
        CLASS_COUNT as u64,
        class_size(CLASS_COUNT - 1),
        TOKEN_SLOT_SHIFT as u64,
        LOCK_SCHEME,
        LOCK_BASE as u64,
    ];
    let mut bytes = Vec::with_capacity(parts.len() * 8);
    for p in parts {
        bytes.extend_from_slice(&p.to_le_bytes());
    }
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

/// Packs a state word.
pub(crate) const fn state(block: u32, token: u32) -> u64 {
    ((block as u64) << 32) | token as u64
}
/// The block reference of a state word (0 = no record).
pub(crate) const fn state_block(state: u64) -> u32 {
    (state >> 32) as u32
}
/// The token of a state word, including the waiters bit.
pub(crate) const fn state_token(state: u64) -> u32 {
    state as u32
}
/// The token without the waiters bit (0 = not leased).
pub(crate) const fn holder(state: u64) -> u32 {
    (state as u32) & !TOKEN_WAITERS
}
/// The registration slot that a token names.
pub(crate) const fn token_slot(token: u32) -> usize {
    (((token & !TOKEN_WAITERS) >> TOKEN_SLOT_SHIFT) as usize).wrapping_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_grow_and_end_at_one_chunk() {
        for c in 1..CLASS_COUNT {
            assert!(class_size(c) > class_size(c - 1));
            assert_eq!(class_size(c) % REF_UNIT, 0);
        }
        assert_eq!(class_size(0), 64);
        assert_eq!(class_size(CLASS_COUNT - 1), CHUNK_LEN);
        assert_eq!(class_for(1024 + RECORD_HEADER), Some(17));
        assert_eq!(class_size(17), 1280);
        assert_eq!(class_for(CHUNK_LEN + 1), None);
    }

    #[test]
    fn tokens_name_their_slot() {
        let token = ((7u32 + 1) << TOKEN_SLOT_SHIFT) | 12345;
        assert_eq!(token_slot(token), 7);
        assert_eq!(token_slot(token | TOKEN_WAITERS), 7);
        assert_eq!(holder(state(9, token | TOKEN_WAITERS)), token);
        assert_eq!(state_block(state(9, token)), 9);
    }
}
