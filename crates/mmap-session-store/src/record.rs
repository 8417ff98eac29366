//! Records: writing one into a fresh block, publishing it with one compare-and-swap, and
//! copying one out with every check. FORMAT.md, "Blocks and records".

use crate::error::StoreError;
use crate::index::KeyHash;
use crate::layout::*;
use crate::open::now_ms;
use crate::store::{ms_to_time, Record, Shared};

/// What reading a record found.
pub(crate) enum ReadOutcome {
    Found(Record),
    Expired,
    /// Failed verification (possibly torn by a concurrent writer), with the reason.
    Invalid(&'static str),
}

impl Shared {
    /// Replaces the record of an entry whose lease `token` holds by `block` (0: no record), then
    /// frees the old block. Fails with `LeaseLost` (and changes nothing) if the lease was taken
    /// over. This single compare-and-swap is the commit point of every change.
    pub(crate) fn publish(&self, state_off: u64, token: u32, block: u32) -> Result<(), StoreError> {
        let old = self.swap_record(state_off, token, block)?;
        self.retire(block, old);
        Ok(())
    }

    /// The compare-and-swap of `publish`; returns the block it replaced.
    pub(crate) fn swap_record(
        &self,
        state_off: u64,
        token: u32,
        block: u32,
    ) -> Result<u32, StoreError> {
        let old = loop {
            let s = self.load_word(state_off)?;
            if holder(s) != token {
                return Err(StoreError::LeaseLost);
            }
            if self
                .map
                .cas_u64(state_off, s, state(block, state_token(s)))
                .is_ok()
            {
                break state_block(s);
            }
        };
        failpoint!("record.published");
        Ok(old)
    }

    /// The rest of `publish`, after the swap from `old` to `block`: counts, and frees `old`.
    pub(crate) fn retire(&self, block: u32, old: u32) {
        let size = |b: u32| self.block_class(b).map_or(0, class_size);
        self.count(S_BYTES, size(block).wrapping_sub(size(old)));
        self.count(
            S_LIVE,
            u64::from(block != 0).wrapping_sub(u64::from(old != 0)),
        );
        if old != 0 {
            self.free_block(old);
        }
    }

    /// Copies the record in `block` out and verifies it belongs to `kh` and is intact.
    pub(crate) fn read_record(&self, block: u32, kh: &KeyHash) -> ReadOutcome {
        let Some(class) = self.block_class(block) else {
            return ReadOutcome::Invalid("record reference outside the data area");
        };
        let off = block as u64 * REF_UNIT;
        let mut header = [0u8; RECORD_HEADER as usize];
        if !self.map.read(off, &mut header) {
            return ReadOutcome::Invalid("record outside the file");
        }
        let (magic, len, expires, sum) = parse_record_header(&header);
        if magic != RECORD_MAGIC {
            return ReadOutcome::Invalid("bad record magic");
        }
        if len as u64 > (class_size(class) - RECORD_HEADER).min(self.g.max_value) {
            return ReadOutcome::Invalid("record length larger than its block");
        }
        if header[R_KEY as usize..] != kh.hash {
            return ReadOutcome::Invalid("record belongs to another key");
        }
        let Some(value) = self.map.read_vec(off + RECORD_HEADER, len as usize) else {
            return ReadOutcome::Invalid("record outside the file");
        };
        if record_checksum(&header, &value) != sum {
            return ReadOutcome::Invalid("record checksum mismatch");
        }
        if expires <= now_ms() {
            return ReadOutcome::Expired;
        }
        ReadOutcome::Found(Record {
            value,
            expires_at: ms_to_time(expires),
        })
    }

    pub(crate) fn report_invalid(&self, kh: &KeyHash, reason: &'static str) {
        self.count(S_CHECKSUM_FAILURES, 1);
        crate::metrics::checksum_failure();
        tracing::warn!(key = %kh.short(), reason, "session record failed verification; treating it as absent");
    }

    /// Writes a record for `kh` into a fresh block and returns the block (not yet published).
    pub(crate) fn write_record(
        &self,
        kh: &KeyHash,
        value: &[u8],
        expires_ms: u64,
    ) -> Result<u32, StoreError> {
        let max = self.g.max_value as usize;
        if value.len() > max {
            return Err(StoreError::TooLarge {
                len: value.len(),
                max,
            });
        }
        let class = class_for(RECORD_HEADER + value.len() as u64).ok_or(StoreError::TooLarge {
            len: value.len(),
            max,
        })?;
        let block = self.alloc(class)?;
        failpoint!("record.allocated");
        let mut header = [0u8; RECORD_HEADER as usize];
        header[..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        header[R_LEN as usize..R_LEN as usize + 4]
            .copy_from_slice(&(value.len() as u32).to_le_bytes());
        header[R_EXPIRES as usize..R_EXPIRES as usize + 8]
            .copy_from_slice(&expires_ms.to_le_bytes());
        header[R_LAST_USED as usize..R_LAST_USED as usize + 8]
            .copy_from_slice(&now_ms().to_le_bytes());
        header[R_KEY as usize..].copy_from_slice(&kh.hash);
        let sum = record_checksum(&header, value);
        header[R_CHECKSUM as usize..R_CHECKSUM as usize + 8].copy_from_slice(&sum.to_le_bytes());
        let off = block as u64 * REF_UNIT;
        if !(self.map.write(off + RECORD_HEADER, value) && self.map.write(off, &header)) {
            self.free_block(block);
            return Err(StoreError::Corrupted("allocated block outside the file"));
        }
        failpoint!("record.written");
        Ok(block)
    }

    /// The tag derived from the key hash stored in a record's header.
    pub(crate) fn record_tag(&self, block: u32) -> Option<u64> {
        let mut key = [0u8; 32];
        if !self.map.read(block as u64 * REF_UNIT + R_KEY, &mut key) {
            return None;
        }
        let mut b = [0u8; 8];
        b.copy_from_slice(&key[..8]);
        Some((u64::from_le_bytes(b) & !3) | 2)
    }
}

/// Splits a record header into (magic, value length, expiry ms, checksum).
pub(crate) fn parse_record_header(h: &[u8; RECORD_HEADER as usize]) -> (u32, u32, u64, u64) {
    let u32_at = |at: u64| {
        let at = at as usize;
        u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]])
    };
    let u64_at = |at: u64| {
        let at = at as usize;
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[at..at + 8]);
        u64::from_le_bytes(b)
    };
    (
        u32_at(R_MAGIC),
        u32_at(R_LEN),
        u64_at(R_EXPIRES),
        u64_at(R_CHECKSUM),
    )
}

/// The checksum of a record: its length, expiry, key hash and value (not the last-used stamp,
/// which the lease holder updates in place).
pub(crate) fn record_checksum(header: &[u8; RECORD_HEADER as usize], value: &[u8]) -> u64 {
    // Two one-shot hashes (the small fields seed the value's) cost far less than a streaming
    // hasher's setup for the small values sessions usually are.
    let mut fields = [0u8; 12 + 32];
    fields[..12].copy_from_slice(&header[R_LEN as usize..R_LAST_USED as usize]);
    fields[12..].copy_from_slice(&header[R_KEY as usize..]);
    let seed = xxhash_rust::xxh3::xxh3_64(&fields);
    xxhash_rust::xxh3::xxh3_64_with_seed(value, seed)
}
