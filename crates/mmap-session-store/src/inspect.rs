//! What an operator needs to look inside a live store: every record, and a full expiry purge.

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use crate::layout::*;
use crate::open::now_ms;
use crate::record::parse_record_header;
use crate::store::{ms_to_time, Store};

/// One stored record, as [`Store::entries`] lists it. It never contains the key.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EntryInfo {
    /// The first 8 hex characters of the BLAKE3 hash of the key: the short name under which the
    /// store (and the session layer) log it.
    pub key_hash: String,
    /// Bytes of the value.
    pub value_len: u64,
    /// Bytes of the block holding it (value, header and slack).
    pub block_len: u64,
    /// When it expires.
    pub expires_at: SystemTime,
    /// When a lease holder last used it.
    pub last_used: SystemTime,
    /// Who holds its lease, if anyone.
    pub lease: Option<LeaseHolder>,
}

/// The holder of a lease.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LeaseHolder {
    /// Process id of the holder's process as it registered (in its own PID namespace).
    pub pid: u64,
    /// Whether that process is alive (a dead holder's lease is taken over on the next request).
    pub alive: bool,
}

impl Store {
    /// Every record in the file, with its size, expiry and lease holder. Walks the whole index:
    /// meant for operators, not for the request path. Safe while other processes use the file.
    pub fn entries(&self) -> Vec<EntryInfo> {
        let s = &self.shared;
        let mut out = Vec::new();
        for pos in 0..s.g.index_entries {
            let Some(st) = s
                .map
                .load_u64(s.entry_off(pos) + E_STATE, Ordering::Acquire)
            else {
                break;
            };
            let block = state_block(st);
            let Some(class) = (block != 0).then(|| s.block_class(block)).flatten() else {
                continue;
            };
            let mut h = [0u8; RECORD_HEADER as usize];
            if !s.map.read(block as u64 * REF_UNIT, &mut h) {
                continue;
            }
            let (magic, len, expires, _) = parse_record_header(&h);
            if magic != RECORD_MAGIC {
                continue;
            }
            let mut used = [0u8; 8];
            used.copy_from_slice(&h[R_LAST_USED as usize..R_LAST_USED as usize + 8]);
            let token = holder(st);
            let lease = (token != 0).then(|| {
                let slot = token_slot(token);
                let pid = (slot < MAX_SLOTS)
                    .then(|| {
                        s.map.load_u64(
                            SLOTS_OFF + slot as u64 * SLOT_LEN + S_PID,
                            Ordering::Relaxed,
                        )
                    })
                    .flatten()
                    .unwrap_or(0);
                LeaseHolder {
                    pid,
                    alive: s.holder_alive(token).unwrap_or(true),
                }
            });
            out.push(EntryInfo {
                key_hash: h[R_KEY as usize..R_KEY as usize + 4]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect(),
                value_len: u64::from(len),
                block_len: class_size(class),
                expires_at: ms_to_time(expires),
                last_used: ms_to_time(u64::from_le_bytes(used)),
                lease,
            });
        }
        out
    }

    /// Removes every expired record that is not leased, walking the whole index (expired records
    /// are otherwise reclaimed lazily). Returns how many were removed. Safe while other
    /// processes use the file.
    pub fn purge_expired(&self) -> u64 {
        let s = &self.shared;
        if s.check_not_forked().is_err() {
            return 0;
        }
        let now = now_ms();
        let mut removed = 0;
        for pos in 0..s.g.index_entries {
            let Some((st, block, _)) = s.idle_record(pos) else {
                continue;
            };
            let expires = s
                .map
                .load_u64(block as u64 * REF_UNIT + R_EXPIRES, Ordering::Relaxed);
            if expires.is_some_and(|e| e <= now)
                && s.remove_idle(pos, st, crate::evict::Removal::Expired)
            {
                removed += 1;
            }
        }
        removed
    }
}
