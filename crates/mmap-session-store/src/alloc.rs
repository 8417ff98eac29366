//! The block allocator: size-classed chunks, lock-free free lists with an ABA tag, and the
//! claiming of new chunks. FORMAT.md, "Blocks and records".

use std::sync::atomic::Ordering;

use crate::error::StoreError;
use crate::layout::*;
use crate::store::Shared;

impl Shared {
    /// The size class of the block at reference `block`, if it is a valid block start inside
    /// the file. Every reference read from the file goes through here before it is used.
    pub(crate) fn block_class(&self, block: u32) -> Option<usize> {
        let off = block as u64 * REF_UNIT;
        let rel = off.checked_sub(self.g.data_off)?;
        let chunk = rel / CHUNK_LEN;
        if chunk >= self.g.max_chunks() {
            return None;
        }
        let c = self.map.load_u8(CHUNK_TABLE_OFF + chunk)? as usize;
        if c == 0 || c > CLASS_COUNT {
            return None;
        }
        let size = class_size(c - 1);
        let within = rel % CHUNK_LEN;
        // A chunk is used only once it lies wholly inside the file (growth comes first).
        if within % size != 0
            || within + size > CHUNK_LEN
            || !self.map.in_file(off - within, CHUNK_LEN)
        {
            return None;
        }
        Some(c - 1)
    }

    /// Takes a block of `class`: from its free list, else from an unclaimed chunk, else from a
    /// chunk of another class whose blocks are all free, else by evicting a record of the class.
    pub(crate) fn alloc(&self, class: usize) -> Result<u32, StoreError> {
        for _ in 0..8 {
            if let Some(block) = self.pop(class) {
                return Ok(block);
            }
            if let Some(block) = self.claim_chunk(class)? {
                return Ok(block);
            }
            // A wholly free chunk of another class goes before any live record.
            if self.unclaim_free_chunks(class) {
                continue;
            }
            // Free blocks of this class may be off their list for a moment, popped by a live
            // process giving chunks back: wait for them rather than evict a live record; if
            // they stay out (that process is stalled), the store is full for now.
            if self.giving_back(class) {
                if let Some(block) = self.wait_for_give_back(class) {
                    return Ok(block);
                }
                if self.giving_back(class) {
                    break;
                }
                continue; // the give-back ended meanwhile: look again
            }
            if !self.evict_for(class) {
                break;
            }
        }
        tracing::warn!(
            class_size = class_size(class),
            "session store full: nothing could be evicted"
        );
        Err(StoreError::StoreFull)
    }

    pub(crate) fn free_head_off(class: usize) -> u64 {
        (H_FREE_HEADS + class * 8) as u64
    }

    /// Pushes the chain `first ..= last` (already linked) onto `class`'s free list.
    pub(crate) fn push(&self, class: usize, first: u32, last: u32) {
        let head_off = Self::free_head_off(class);
        loop {
            let Some(h) = self.map.load_u64(head_off, Ordering::Acquire) else {
                return;
            };
            self.map
                .store_u64(last as u64 * REF_UNIT, h as u32 as u64, Ordering::Relaxed);
            failpoint!("alloc.push.linked");
            let new = (((h >> 32) + 1) << 32) | first as u64;
            if self.map.cas_u64(head_off, h, new).is_ok() {
                return;
            }
        }
    }

    /// Pops a block off `class`'s free list. The head carries an ABA tag, so a `next` read from a
    /// block that was popped and reused meanwhile can never be installed.
    fn pop(&self, class: usize) -> Option<u32> {
        let head_off = Self::free_head_off(class);
        loop {
            let h = self.map.load_u64(head_off, Ordering::Acquire)?;
            let first = h as u32;
            if first == 0 {
                return None;
            }
            let next = self
                .map
                .load_u64(first as u64 * REF_UNIT, Ordering::Relaxed)
                .unwrap_or(u64::MAX);
            let valid = self.block_class(first) == Some(class)
                && (next == 0
                    || (next <= u32::MAX as u64 && self.block_class(next as u32) == Some(class)));
            let new = (((h >> 32) + 1) << 32) | if valid { next } else { 0 };
            if !valid && self.map.load_u64(head_off, Ordering::Acquire) != Some(h) {
                continue; // we read a block being reused: the head moved on, try again
            }
            failpoint!("alloc.pop.read");
            if self.map.cas_u64(head_off, h, new).is_ok() {
                if valid {
                    return Some(first);
                }
                tracing::error!(
                    class,
                    "free list corrupted; dropping it (space is recovered on the next solo open)"
                );
                return None;
            }
        }
    }

    pub(crate) fn free_block(&self, block: u32) {
        match self.block_class(block) {
            Some(class) => self.push(class, block, block),
            None => tracing::error!(block, "not freeing an invalid block reference"),
        }
    }

    /// Claims an unclaimed chunk for `class` (the lowest one inside the file, else the next
    /// one, growing the file), returns its first block and puts the others on the free list.
    /// `None` when the file is at its maximum or the disk is full.
    pub(crate) fn claim_chunk(&self, class: usize) -> Result<Option<u32>, StoreError> {
        loop {
            let Some(hint) = self
                .map
                .load_u64(H_CHUNKS_CLAIMED as u64, Ordering::Acquire)
            else {
                return Ok(None);
            };
            // Chunks below the hint lie inside the file; some were given back (a whole chunk
            // of free blocks, by `unclaim_free_chunks` or recovery).
            let hole = (0..hint.min(self.g.max_chunks()))
                .find(|&c| self.map.load_u8(CHUNK_TABLE_OFF + c) == Some(0));
            let n = match hole {
                Some(c) => c,
                None if hint >= self.g.max_chunks() => return Ok(None),
                None => hint,
            };
            let start = self.g.data_off + n * CHUNK_LEN;
            if !self.ensure_len(start + CHUNK_LEN)? {
                return Ok(None);
            }
            let won = self.map.cas_u8(CHUNK_TABLE_OFF + n, 0, class as u8 + 1);
            self.map.max_u64(H_CHUNKS_CLAIMED as u64, n + 1);
            if !won {
                continue;
            }
            failpoint!("alloc.chunk.claimed");
            let size = class_size(class);
            let count = CHUNK_LEN / size;
            let block_ref = |i: u64| ((start + i * size) / REF_UNIT) as u32;
            if count > 1 {
                for i in 1..count - 1 {
                    self.map.store_u64(
                        start + i * size,
                        block_ref(i + 1) as u64,
                        Ordering::Relaxed,
                    );
                }
                failpoint!("alloc.chunk.carved");
                self.push(class, block_ref(1), block_ref(count - 1));
            }
            return Ok(Some(block_ref(0)));
        }
    }

    /// Gives back to the unclaimed chunks every chunk of a class other than `wanted` whose
    /// blocks are all on its free list, so that a value of a class that has no chunk left
    /// can be stored. True if a chunk was given back.
    ///
    /// A free list is a lock-free stack, so a chunk's blocks are taken off it by popping: a
    /// read-only walk first finds the chunks whose blocks are all listed (bounded; recovery at
    /// the next solo open gives back every empty chunk), and only a class with such a chunk is
    /// popped, up to as many blocks as the walk saw. The blocks of chunks that turn out not
    /// to be wholly free after all are pushed back. A process killed in between leaks the
    /// blocks it popped until recovery, like any block between allocation and publication.
    fn unclaim_free_chunks(&self, wanted: usize) -> bool {
        let mut gave_back = false;
        for class in (0..CLASS_COUNT).filter(|&c| c != wanted) {
            let per_chunk = (CHUNK_LEN / class_size(class)) as usize;
            // Enough to see two whole chunks of the class, and never more than 65,536 blocks.
            let budget = (2 * per_chunk).min(1 << 16);
            let (walked, whole) = self.wholly_free_chunks(class, per_chunk, budget);
            if whole == 0 {
                continue;
            }
            // One give-back of a class at a time, marked so that allocators of the class know
            // its free blocks are only out for a moment (a dead giver's mark is taken over).
            let mark_off = Self::giving_back_off(class);
            let Some(mark) = self.map.load_u64(mark_off, Ordering::Acquire) else {
                continue;
            };
            if mark != 0 && self.holder_alive(mark as u32).unwrap_or(true) {
                continue;
            }
            let token = u64::from(self.new_token());
            if self.map.cas_u64(mark_off, mark, token).is_err() {
                continue;
            }
            let mut popped = Vec::new();
            while popped.len() < walked {
                let Some(block) = self.pop(class) else { break };
                popped.push(block);
            }
            failpoint!("alloc.unclaim.popped");
            popped.sort_unstable();
            let mut keep: Vec<u32> = Vec::new();
            for group in popped.chunk_by(|a, b| self.chunk_of(*a) == self.chunk_of(*b)) {
                let chunk = self.chunk_of(group[0]);
                if group.len() == per_chunk
                    && self.map.cas_u8(CHUNK_TABLE_OFF + chunk, class as u8 + 1, 0)
                {
                    gave_back = true;
                    tracing::debug!(chunk, class, "gave back a chunk of free blocks");
                } else {
                    keep.extend_from_slice(group);
                }
            }
            failpoint!("alloc.unclaim.given_back");
            if let (Some(&first), Some(&last)) = (keep.first(), keep.last()) {
                for pair in keep.windows(2) {
                    self.map.store_u64(
                        pair[0] as u64 * REF_UNIT,
                        pair[1] as u64,
                        Ordering::Relaxed,
                    );
                }
                self.push(class, first, last);
            }
            let _ = self.map.cas_u64(mark_off, token, 0);
        }
        gave_back
    }

    fn giving_back_off(class: usize) -> u64 {
        (H_GIVING_BACK + class * 8) as u64
    }

    /// Whether a live process is giving chunks back from `class`'s free list right now.
    fn giving_back(&self, class: usize) -> bool {
        match self
            .map
            .load_u64(Self::giving_back_off(class), Ordering::Acquire)
        {
            Some(0) | None => false,
            Some(mark) => self.holder_alive(mark as u32).unwrap_or(false),
        }
    }

    /// Waits a little (a give-back holds blocks for microseconds) for a block of `class` to come
    /// back to its free list. `None` if it did not, or the give-back ended without one.
    fn wait_for_give_back(&self, class: usize) -> Option<u32> {
        let until = std::time::Instant::now() + std::time::Duration::from_millis(2);
        while self.giving_back(class) && std::time::Instant::now() < until {
            if let Some(block) = self.pop(class) {
                return Some(block);
            }
            std::thread::yield_now();
        }
        self.pop(class)
    }

    /// Walks `class`'s free list without changing it (at most `budget` blocks; others may be
    /// changing it, which at worst makes the answer wrong, never unsafe): how many blocks it
    /// saw, and how many chunks had all of their `per_chunk` blocks among them.
    fn wholly_free_chunks(&self, class: usize, per_chunk: usize, budget: usize) -> (usize, usize) {
        let mut per: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
        let mut next = self
            .map
            .load_u64(Self::free_head_off(class), Ordering::Acquire)
            .unwrap_or(0) as u32;
        let mut walked = 0;
        while next != 0 && walked < budget && self.block_class(next) == Some(class) {
            *per.entry(self.chunk_of(next)).or_default() += 1;
            walked += 1;
            next = self
                .map
                .load_u64(next as u64 * REF_UNIT, Ordering::Relaxed)
                .unwrap_or(0) as u32;
        }
        let whole = per.values().filter(|&&n| n == per_chunk).count();
        (walked, whole)
    }

    /// The chunk a (valid) block reference lies in.
    fn chunk_of(&self, block: u32) -> u64 {
        (block as u64 * REF_UNIT - self.g.data_off) / CHUNK_LEN
    }
}
