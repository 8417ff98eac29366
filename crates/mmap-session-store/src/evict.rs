//! Reclaiming space: the incremental expiry sweep, eviction of idle records, and the removal
//! of an idle entry's record by an internal holder.

use std::sync::atomic::Ordering;

use crate::error::StoreError;
use crate::index::KeyHash;
use crate::layout::*;
use crate::open::now_ms;
use crate::store::Shared;

/// Why an internal holder removes an idle record, and what it saw when it chose the record.
/// Re-checked under the lease: the entry may have been committed again meanwhile, even into the
/// same block (free lists are last in, first out), and then it must stay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Removal {
    /// The record has expired.
    Expired,
    /// The record was the least recently used candidate: its last-used stamp and checksum.
    Evicted { last_used: u64, checksum: u64 },
}

impl Shared {
    /// Makes room in `kh`'s probe window by evicting an idle record there: an expired one if
    /// any, else the least recently used. False if every entry is leased.
    pub(crate) fn evict_in_window(&self, kh: &KeyHash) -> Result<bool, StoreError> {
        let now = now_ms();
        let mut best: Option<(u64, u64, u64, Removal)> = None; // (last_used, pos, state, why)
        for pos in self.window(self.home(kh)) {
            let Some(st) = self
                .map
                .load_u64(self.entry_off(pos) + E_STATE, Ordering::Acquire)
            else {
                continue;
            };
            if holder(st) != 0 || state_block(st) == 0 {
                continue;
            }
            let at = state_block(st) as u64 * REF_UNIT;
            let expires = self
                .map
                .load_u64(at + R_EXPIRES, Ordering::Relaxed)
                .unwrap_or(0);
            let (used, why) = if expires <= now {
                (0, Removal::Expired)
            } else {
                let Some(why) = self.eviction_mark(state_block(st)) else {
                    continue;
                };
                let Removal::Evicted { last_used, .. } = why else {
                    continue;
                };
                (last_used, why)
            };
            if best.is_none_or(|(u, ..)| used < u) {
                best = Some((used, pos, st, why));
            }
        }
        let Some((_, pos, st, why)) = best else {
            return Ok(false);
        };
        Ok(self.remove_idle(pos, st, why))
    }

    /// What an eviction must find again under the lease to remove the record in `block`.
    fn eviction_mark(&self, block: u32) -> Option<Removal> {
        let at = block as u64 * REF_UNIT;
        Some(Removal::Evicted {
            last_used: self.map.load_u64(at + R_LAST_USED, Ordering::Relaxed)?,
            checksum: self.map.load_u64(at + R_CHECKSUM, Ordering::Relaxed)?,
        })
    }

    /// Removes the record of an idle entry observed in state `st`, by leasing it first and
    /// checking under the lease that the record is still the one chosen (`why`). True if the
    /// record was removed.
    pub(crate) fn remove_idle(&self, pos: u64, st: u64, why: Removal) -> bool {
        let state_off = self.entry_off(pos) + E_STATE;
        failpoint!("evict.remove_idle.before_lease");
        let token = self.new_token();
        if self
            .map
            .cas_u64(state_off, st, state(state_block(st), token))
            .is_err()
        {
            return false;
        }
        failpoint!("evict.remove_idle.leased");
        let at = state_block(st) as u64 * REF_UNIT;
        let load = |field: u64| self.map.load_u64(at + field, Ordering::Acquire);
        let still = match why {
            Removal::Expired => load(R_EXPIRES).is_some_and(|e| e <= now_ms()),
            Removal::Evicted {
                last_used,
                checksum,
            } => load(R_LAST_USED) == Some(last_used) && load(R_CHECKSUM) == Some(checksum),
        };
        let removed = still && self.publish(state_off, token, 0).is_ok();
        failpoint!("evict.remove_idle.removed");
        if removed {
            self.give_up_key(state_off, token);
        }
        self.release_internal(state_off, token);
        if removed {
            let counter = match why {
                Removal::Expired => {
                    crate::metrics::expired_reclaimed();
                    S_EXPIRED
                }
                Removal::Evicted { .. } => {
                    crate::metrics::eviction();
                    S_EVICTIONS
                }
            };
            self.count(counter, 1);
        }
        removed
    }

    /// Looks at a bounded sample of entries for an idle record of `class` to evict: an expired
    /// one if seen, else the least recently used of the sample.
    pub(crate) fn evict_for(&self, class: usize) -> bool {
        // A sparse index may hold no candidate in one sample: look at a few, still bounded.
        (0..4).any(|_| self.evict_sample(class))
    }

    fn evict_sample(&self, class: usize) -> bool {
        const SAMPLE: u64 = 512;
        const ENOUGH: usize = 16;
        let hand = self
            .map
            .load_u64(H_SWEEP_HAND as u64, Ordering::Relaxed)
            .unwrap_or(0);
        self.map.add_u64(H_SWEEP_HAND as u64, SAMPLE);
        let now = now_ms();
        let mut best: Option<(u64, u64, u64, Removal)> = None;
        let mut seen = 0;
        for i in 0..SAMPLE {
            let pos = hand.wrapping_add(i) & (self.g.index_entries - 1);
            let Some((st, block, _)) = self.idle_record(pos).filter(|r| r.2 == class) else {
                continue;
            };
            let expires = self
                .map
                .load_u64(block as u64 * REF_UNIT + R_EXPIRES, Ordering::Relaxed)
                .unwrap_or(0);
            if expires <= now && self.remove_idle(pos, st, Removal::Expired) {
                return true;
            }
            let Some(why @ Removal::Evicted { last_used, .. }) = self.eviction_mark(block) else {
                continue;
            };
            if best.is_none_or(|(u, ..)| last_used < u) {
                best = Some((last_used, pos, st, why));
            }
            seen += 1;
            if seen >= ENOUGH {
                break;
            }
        }
        best.is_some_and(|(_, pos, st, why)| self.remove_idle(pos, st, why))
    }

    /// The state word and block of entry `pos` if it holds a valid record and nobody leases it:
    /// what the sweep, eviction and the operator's purge look for.
    pub(crate) fn idle_record(&self, pos: u64) -> Option<(u64, u32, usize)> {
        let st = self
            .map
            .load_u64(self.entry_off(pos) + E_STATE, Ordering::Acquire)?;
        let block = state_block(st);
        if holder(st) != 0 || block == 0 {
            return None;
        }
        Some((st, block, self.block_class(block)?))
    }

    /// Reclaims expired idle records among the next `n` entries of the sweep hand; called on
    /// each commit so expired space comes back without any full scan.
    pub(crate) fn sweep(&self, n: u64) {
        let hand = self.sweep_hand.fetch_add(n, Ordering::Relaxed);
        let now = now_ms();
        for i in 0..n {
            let pos = hand.wrapping_add(i) & (self.g.index_entries - 1);
            let Some((st, block, _)) = self.idle_record(pos) else {
                continue;
            };
            let expires = self
                .map
                .load_u64(block as u64 * REF_UNIT + R_EXPIRES, Ordering::Relaxed);
            if expires.is_some_and(|e| e <= now) {
                self.remove_idle(pos, st, Removal::Expired);
            }
        }
    }
}
