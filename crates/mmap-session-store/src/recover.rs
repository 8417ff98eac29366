//! Recovery: repairing what dead processes left behind, run by an opener that is alone.

use std::sync::atomic::Ordering;

use crate::layout::*;
use crate::store::Shared;

impl Shared {
    /// Repairs what dead processes left behind. Runs only when no other process has the file
    /// open: clears every lease and shard lock, drops entries whose record reference is
    /// invalid, rebuilds the free lists from the blocks no entry uses (reclaiming space leaked
    /// by processes killed between allocation and commit), and recounts live records and bytes.
    pub(crate) fn recover(&self) {
        let g = &self.g;
        for s in 0..g.shards() {
            self.map
                .store_u64(g.shard_locks_off() + s * 8, 0, Ordering::Relaxed);
        }
        let claimed = (0..g.max_chunks())
            .take_while(|&c| self.map.in_file(g.data_off + (c + 1) * CHUNK_LEN, 0))
            .filter(|&c| {
                self.map
                    .load_u8(CHUNK_TABLE_OFF + c)
                    .is_some_and(|b| b != 0)
            })
            .map(|c| c + 1)
            .max()
            .unwrap_or(0);
        self.map
            .store_u64(H_CHUNKS_CLAIMED as u64, claimed, Ordering::Relaxed);
        let mut used = vec![Vec::<bool>::new(); claimed as usize];
        let (mut live, mut bytes, mut dropped) = (0u64, 0u64, 0u64);
        for pos in 0..g.index_entries {
            let off = self.entry_off(pos);
            let (Some(tag), Some(st)) = (
                self.map.load_u64(off + E_TAG, Ordering::Relaxed),
                self.map.load_u64(off + E_STATE, Ordering::Relaxed),
            ) else {
                continue;
            };
            if crate::index::is_claim(tag) {
                // An insert that never finished: its entry matches no key.
                self.map
                    .store_u64(off + E_TAG, crate::index::TAG_VACATED, Ordering::Relaxed);
            }
            let block = state_block(st);
            let mut keep = block;
            if block != 0 {
                match self.block_class(block) {
                    Some(class) if tag & 3 == 2 && self.record_tag(block) == Some(tag) => {
                        let rel = block as u64 * REF_UNIT - g.data_off;
                        let chunk = (rel / CHUNK_LEN) as usize;
                        let i = ((rel % CHUNK_LEN) / class_size(class)) as usize;
                        // `block_class` only accepts chunks wholly inside the file, all counted.
                        let Some(slots) = used.get_mut(chunk) else {
                            continue;
                        };
                        if slots.is_empty() {
                            slots.resize((CHUNK_LEN / class_size(class)) as usize, false);
                        }
                        if slots[i] {
                            keep = 0; // two entries claim one block: keep the first
                        } else {
                            slots[i] = true;
                            live += 1;
                            bytes += class_size(class);
                        }
                    }
                    _ => keep = 0,
                }
                if keep == 0 {
                    dropped += 1;
                }
            }
            if keep == 0 && tag & 3 == 2 {
                // A key without a record (its holder died before giving it up).
                self.map
                    .store_u64(off + E_TAG, crate::index::TAG_VACATED, Ordering::Relaxed);
            }
            if st != state(keep, 0) {
                self.map
                    .store_u64(off + E_STATE, state(keep, 0), Ordering::Relaxed);
            }
        }
        for class in 0..CLASS_COUNT {
            self.map
                .store_u64(Self::free_head_off(class), 0, Ordering::Relaxed);
            self.map
                .store_u64((H_GIVING_BACK + class * 8) as u64, 0, Ordering::Relaxed);
        }
        failpoint!("recover.entries_done");
        let mut last_claimed = 0;
        for chunk in 0..claimed {
            let Some(c) = self.map.load_u8(CHUNK_TABLE_OFF + chunk) else {
                continue;
            };
            if c == 0 || c as usize > CLASS_COUNT {
                continue;
            }
            let class = c as usize - 1;
            let size = class_size(class);
            let start = g.data_off + chunk * CHUNK_LEN;
            let slots = &used[chunk as usize];
            if !slots.contains(&true) {
                // No record in it: give the chunk back, for whichever class needs one next.
                self.map.store_u8(CHUNK_TABLE_OFF + chunk, 0);
                continue;
            }
            last_claimed = chunk + 1;
            for i in 0..CHUNK_LEN / size {
                if !slots.get(i as usize).copied().unwrap_or(false) {
                    self.push(
                        class,
                        ((start + i * size) / REF_UNIT) as u32,
                        ((start + i * size) / REF_UNIT) as u32,
                    );
                }
            }
        }
        self.map
            .store_u64(H_CHUNKS_CLAIMED as u64, last_claimed, Ordering::Relaxed);
        failpoint!("recover.rebuilt");
        self.map
            .store_u64(H_LIVE_BASE as u64, live, Ordering::Relaxed);
        self.map
            .store_u64(H_BYTES_BASE as u64, bytes, Ordering::Relaxed);
        // Every other slot's owner is gone (we are alone): its in-use mark was left by a crash.
        for slot in 0..MAX_SLOTS as u64 {
            let base = SLOTS_OFF + slot * SLOT_LEN;
            self.map.store_u64(base + S_LIVE, 0, Ordering::Relaxed);
            self.map.store_u64(base + S_BYTES, 0, Ordering::Relaxed);
            self.map.store_u64(base + S_IN_USE, 0, Ordering::Relaxed);
        }
        self.map.store_u64(H_DIRTY as u64, 0, Ordering::Release);
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "recovery dropped index entries with invalid record references"
            );
        }
        tracing::debug!(live, bytes, chunks = claimed, "session store recovered");
    }
}
