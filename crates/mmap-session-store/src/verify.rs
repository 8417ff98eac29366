//! A full consistency check of a store file.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;

use crate::index::{TAG_EMPTY, TAG_VACATED};
use crate::layout::*;
use crate::open::{now_ms, Geometry};
use crate::record::{parse_record_header, record_checksum};
use crate::store::Store;

/// What [`Store::verify`] found. `problems` lists every inconsistency; the counts describe the
/// file. Leaked blocks (space lost by a process killed between allocating and publishing) and
/// leases held by dead processes are not problems: the first are reclaimed by the next open that
/// finds no other process, the second by the next request for the key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyReport {
    /// Every inconsistency found, one line each.
    pub problems: Vec<String>,
    /// Records that verify.
    pub records: u64,
    /// Of those, records past their expiry (not yet reclaimed).
    pub expired_records: u64,
    /// Entries leased right now.
    pub leased: u64,
    /// Leases whose holder process is dead (taken over on next use).
    pub dead_holder_leases: u64,
    /// Blocks on free lists.
    pub free_blocks: u64,
    /// Blocks neither used nor free.
    pub leaked_blocks: u64,
    /// Bytes of those blocks.
    pub leaked_bytes: u64,
}

impl VerifyReport {
    /// True if no inconsistency was found.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

impl Store {
    /// Walks the whole file and reports every inconsistency: header, chunk table, every index
    /// entry and record (bounds, checksum, key), and every free list (bounds, cycles, blocks
    /// both free and used). Exact when no other process is changing the file; while others
    /// run it may also report changes that were in flight.
    pub fn verify(&self) -> VerifyReport {
        let s = &self.shared;
        let g = &s.g;
        let mut r = VerifyReport::default();
        let mut header = vec![0u8; HEADER_LEN as usize];
        let size = s.file.metadata().map(|m| m.len()).unwrap_or(0);
        if !s.map.read(0, &mut header) {
            r.problems.push("header unreadable".into());
            return r;
        }
        match Geometry::from_header(&s.path, &header, size) {
            Ok(found) if found == *g => {}
            Ok(_) => r.problems.push("header geometry changed since open".into()),
            Err(e) => r.problems.push(format!("header: {e}")),
        }
        let file_len = s.map.file_len();
        let load = |off: u64| s.map.load_u64(off, Ordering::Acquire);
        let claimed = load(H_CHUNKS_CLAIMED as u64).unwrap_or(0);
        if claimed > g.max_chunks() {
            r.problems.push(format!(
                "{claimed} chunks claimed, at most {} fit",
                g.max_chunks()
            ));
        }
        let mut total_blocks = 0u64;
        let mut block_bytes: HashMap<usize, u64> = HashMap::new();
        for c in 0..g.max_chunks() {
            let class = s.map.load_u8(CHUNK_TABLE_OFF + c).unwrap_or(0);
            if class == 0 {
                continue;
            }
            if class as usize > CLASS_COUNT {
                r.problems
                    .push(format!("chunk {c}: invalid size class {class}"));
                continue;
            }
            if g.data_off + (c + 1) * CHUNK_LEN > file_len {
                r.problems
                    .push(format!("chunk {c}: claimed but beyond the end of the file"));
                continue;
            }
            let size = class_size(class as usize - 1);
            total_blocks += CHUNK_LEN / size;
            *block_bytes.entry(class as usize - 1).or_default() += CHUNK_LEN / size;
        }

        let now = now_ms();
        let mut used: HashSet<u32> = HashSet::new();
        let mut keys: HashMap<[u8; 32], u64> = HashMap::new();
        let mut used_bytes = 0u64;
        for pos in 0..g.index_entries {
            let off = s.entry_off(pos);
            let (Some(tag), Some(st)) = (load(off + E_TAG), load(off + E_STATE)) else {
                r.problems.push(format!("entry {pos}: outside the file"));
                break;
            };
            let token = holder(st);
            if token != 0 {
                r.leased += 1;
                if !s.holder_alive(token).unwrap_or(true) {
                    r.dead_holder_leases += 1;
                }
            }
            let block = state_block(st);
            if block == 0 {
                continue;
            }
            if tag == TAG_EMPTY || tag == TAG_VACATED || tag & 3 != 2 {
                r.problems
                    .push(format!("entry {pos}: holds a record but no key tag"));
            }
            let Some(class) = s.block_class(block) else {
                r.problems.push(format!(
                    "entry {pos}: record reference {block} is not a valid block"
                ));
                continue;
            };
            if !used.insert(block) {
                r.problems
                    .push(format!("entry {pos}: block {block} is used by two entries"));
                continue;
            }
            used_bytes += class_size(class);
            let at = block as u64 * REF_UNIT;
            let mut h = [0u8; RECORD_HEADER as usize];
            if !s.map.read(at, &mut h) {
                r.problems
                    .push(format!("entry {pos}: record header unreadable"));
                continue;
            }
            let (magic, len, expires, sum) = parse_record_header(&h);
            if magic != RECORD_MAGIC {
                r.problems.push(format!("entry {pos}: bad record magic"));
                continue;
            }
            if len as u64 > (class_size(class) - RECORD_HEADER).min(g.max_value) {
                r.problems.push(format!(
                    "entry {pos}: record length {len} exceeds its block"
                ));
                continue;
            }
            let mut value = vec![0u8; len as usize];
            if !s.map.read(at + RECORD_HEADER, &mut value) || record_checksum(&h, &value) != sum {
                r.problems
                    .push(format!("entry {pos}: record checksum mismatch"));
                continue;
            }
            if s.record_tag(block) != Some(tag) {
                r.problems
                    .push(format!("entry {pos}: record belongs to another key"));
                continue;
            }
            let mut key = [0u8; 32];
            key.copy_from_slice(&h[R_KEY as usize..]);
            if let Some(other) = keys.insert(key, pos) {
                r.problems
                    .push(format!("entries {other} and {pos} hold the same key"));
            }
            r.records += 1;
            if expires <= now {
                r.expired_records += 1;
            }
        }

        let mut free: HashSet<u32> = HashSet::new();
        for class in 0..CLASS_COUNT {
            let mut next = load((H_FREE_HEADS + class * 8) as u64).unwrap_or(0) as u32;
            let bound = block_bytes.get(&class).copied().unwrap_or(0);
            let mut steps = 0u64;
            while next != 0 {
                steps += 1;
                if steps > bound {
                    r.problems.push(format!(
                        "free list of class {class}: longer than its blocks (a cycle?)"
                    ));
                    break;
                }
                if s.block_class(next) != Some(class) {
                    r.problems
                        .push(format!("free list of class {class}: invalid block {next}"));
                    break;
                }
                if used.contains(&next) {
                    r.problems.push(format!(
                        "free list of class {class}: block {next} is also in use"
                    ));
                }
                if !free.insert(next) {
                    r.problems.push(format!(
                        "free list of class {class}: block {next} listed twice"
                    ));
                    break;
                }
                next = load(next as u64 * REF_UNIT).unwrap_or(0) as u32;
            }
        }
        r.free_blocks = free.len() as u64;
        r.leaked_blocks = total_blocks.saturating_sub(used.len() as u64 + r.free_blocks);
        let all_bytes: u64 = block_bytes.iter().map(|(c, n)| class_size(*c) * n).sum();
        let free_bytes: u64 = free
            .iter()
            .filter_map(|b| s.block_class(*b))
            .map(class_size)
            .sum();
        r.leaked_bytes = all_bytes.saturating_sub(used_bytes + free_bytes);
        r
    }
}
