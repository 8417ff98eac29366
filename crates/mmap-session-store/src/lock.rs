//! The lease protocol on one 64-bit word: take, wait (futex), take over a dead or stalled
//! holder, release. Used for index entries (a session's busy lease) and shard locks.
//! FORMAT.md, "The lease protocol".

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::error::StoreError;
use crate::index::KeyHash;
use crate::layout::*;
use crate::map::Wake;
use crate::metrics::TakeoverReason;
use crate::store::Shared;
use crate::sys;

/// How many times a waiter re-reads a held word before it sleeps (a few microseconds).
const SPIN_CHECKS: u32 = 200;

/// Progress of one wait for a lock word.
struct Waiter {
    spun: bool,
    seen: u32,
    since: Instant,
    slept: bool,
    woken: bool,
    timeouts: u32,
}

impl Shared {
    /// Whether a lease of this process holds `kh` right now.
    #[cfg(feature = "tokio")]
    pub(crate) fn held_here(&self, kh: &KeyHash) -> bool {
        let Some(pos) = self.lookup(kh) else {
            return false;
        };
        let state = self
            .map
            .load_u64(self.entry_off(pos) + E_STATE, Ordering::SeqCst);
        // A token naming our slot may be a dead predecessor's: only a token this process issued
        // will be released (or handed over) here.
        state.is_some_and(|s| {
            let token = holder(s);
            token != 0
                && token_slot(token) == self.slot
                && self.holder_alive(token).unwrap_or(false)
        })
    }

    pub(crate) fn new_token(&self) -> u32 {
        let seq =
            self.map.fetch_add_u64(self.slot_off(S_SEQ), 1).unwrap_or(0) as u32 & TOKEN_SEQ_MASK;
        ((self.slot as u32 + 1) << TOKEN_SLOT_SHIFT) | seq
    }

    /// Takes the lock word at `off` if it is free. `Ok(None)` if held.
    pub(crate) fn try_acquire(&self, off: u64) -> Result<Option<u32>, StoreError> {
        loop {
            let s = self.load_word(off)?;
            if holder(s) != 0 {
                return Ok(None);
            }
            let token = self.new_token();
            if self
                .map
                .cas_u64(off, s, state(state_block(s), token))
                .is_ok()
            {
                failpoint!("lock.acquired");
                return Ok(Some(token));
            }
        }
    }

    pub(crate) fn load_word(&self, off: u64) -> Result<u64, StoreError> {
        self.map
            .load_u64(off, Ordering::Acquire)
            .ok_or(StoreError::Corrupted("lock word outside the file"))
    }

    /// Takes the lock word at `off` (a lease or a shard lock), waiting until `deadline`.
    ///
    /// Waiting sleeps on a futex over the word's low half, which holds the token; the release
    /// wakes one sleeper. A holder is taken over when its process is dead (its registration
    /// lock is free: checked after a first short sleep) or when it has held the word for longer
    /// than the lease timeout while we watched.
    pub(crate) fn acquire(&self, off: u64, deadline: Instant) -> Result<u32, StoreError> {
        let mut w = Waiter {
            seen: 0,
            since: Instant::now(),
            slept: false,
            spun: false,
            woken: false,
            timeouts: 0,
        };
        loop {
            let s = self.load_word(off)?;
            let held = holder(s);
            if held == 0 {
                let token = self.new_token();
                // A waiter that slept may leave others asleep: mark the word so our release wakes one.
                let mark = if w.slept { TOKEN_WAITERS } else { 0 };
                if self
                    .map
                    .cas_u64(off, s, state(state_block(s), token | mark))
                    .is_ok()
                {
                    failpoint!("lock.acquired");
                    return Ok(token);
                }
                continue;
            }
            let now = Instant::now();
            if held != w.seen {
                if w.seen == 0 {
                    self.count(S_LEASE_WAITS, 1);
                }
                w.seen = held;
                w.since = now;
                w.timeouts = 0;
            }
            let overdue = now.duration_since(w.since) >= self.lease_timeout;
            if overdue || (w.timeouts > 0 && !self.holder_alive(held)?) {
                let token = self.new_token();
                let new = state(state_block(s), token | (state_token(s) & TOKEN_WAITERS));
                if self.map.cas_u64(off, s, new).is_ok() {
                    failpoint!("lock.taken_over");
                    self.count(S_TAKEOVERS, 1);
                    crate::metrics::takeovers(
                        if overdue {
                            TakeoverReason::HolderStalled
                        } else {
                            TakeoverReason::HolderDied
                        },
                        1,
                    );
                    tracing::warn!(
                        holder_slot = token_slot(held),
                        reason = if overdue {
                            "held past the lease timeout"
                        } else {
                            "holder process died"
                        },
                        "took over a session lease"
                    );
                    return Ok(token);
                }
                continue;
            }
            if now >= deadline {
                if w.woken {
                    self.map.wake(off, 1); // pass on the wake-up we will not use
                }
                return Err(StoreError::LeaseTimeout);
            }
            // Leases are usually held for a microsecond or two: before sleeping (which costs a
            // wake-up of a halted CPU on the other side), watch the word briefly.
            if !w.spun {
                w.spun = true;
                for _ in 0..SPIN_CHECKS {
                    std::hint::spin_loop();
                    if self.map.load_u64(off, Ordering::Relaxed) != Some(s) {
                        break;
                    }
                }
                continue;
            }
            let word = state_token(s) | TOKEN_WAITERS;
            if state_token(s) & TOKEN_WAITERS == 0
                && self
                    .map
                    .cas_u64(off, s, state(state_block(s), word))
                    .is_err()
            {
                continue;
            }
            failpoint!("lock.marked_waiting");
            // The first sleep is short so that a dead holder is noticed quickly.
            let nap = if w.timeouts == 0 {
                Duration::from_millis(2)
            } else {
                Duration::from_millis(25)
            };
            let until_overdue = self
                .lease_timeout
                .saturating_sub(now.duration_since(w.since));
            let timeout = nap
                .min(deadline - now)
                .min(until_overdue.max(Duration::from_micros(100)));
            match self.map.wait(off, word, timeout) {
                Wake::Woken => w.woken = true,
                Wake::TimedOut => w.timeouts += 1,
                Wake::Changed => {}
            }
            w.slept = true;
        }
    }

    /// Releases the lock word at `off` if `token` still holds it; wakes one sleeper if any.
    /// False if the word had been taken over.
    pub(crate) fn release_word(&self, off: u64, token: u32) -> bool {
        loop {
            let Ok(s) = self.load_word(off) else {
                return false;
            };
            if holder(s) != token {
                return false;
            }
            failpoint!("lock.releasing");
            if self.map.cas_u64(off, s, state(state_block(s), 0)).is_ok() {
                if state_token(s) & TOKEN_WAITERS != 0 {
                    self.map.wake(off, 1);
                }
                return true;
            }
        }
    }

    /// Releases a word that an internal holder of this process (an insert, the sweep,
    /// eviction, a purge, a lease on a recycled entry) held, and hands the key to tasks of this
    /// process that queued for it meanwhile: they saw the key held here and started no watcher,
    /// counting on the holder's release, as for a [`crate::Lease`].
    pub(crate) fn release_internal(&self, off: u64, token: u32) -> bool {
        let released = self.release_word(off, token);
        #[cfg(feature = "tokio")]
        {
            // Pairs with the fence in `LocalWaiters::enqueue`: either that task sees the word
            // free and starts its own watcher, or we see it queued.
            std::sync::atomic::fence(Ordering::SeqCst);
            if self.local.pending() {
                if let Some(store) = self.me.upgrade() {
                    self.local
                        .after_internal_release(&crate::store::Store { shared: store });
                }
            }
        }
        released
    }

    /// Whether the process that issued `token` is alive, as the kernel tells it: its slot's
    /// ready lock is held. A process that takes over the slot of one that died releases every
    /// word its predecessor held (`reclaim_slot`) before it takes the ready lock and issues a
    /// token, so a token of a ready slot is always its live owner's, however many tokens were
    /// issued since; and while the new owner is still releasing, the predecessor's tokens are
    /// seen as dead, as they are.
    pub(crate) fn holder_alive(&self, token: u32) -> Result<bool, StoreError> {
        let slot = token_slot(token);
        if slot >= MAX_SLOTS {
            return Ok(false);
        }
        Ok(
            slot == self.slot
                || sys::is_locked_by_other(&self.file, LOCK_READY_BASE + slot as i64)?,
        )
    }

    /// Releases every lease and shard lock that tokens of this process's slot hold: they were
    /// issued by the slot's previous owner, which died. Runs at open, before this process
    /// issues any token of its own; its cost is one pass over the index, only after a crash.
    pub(crate) fn reclaim_slot(&self) {
        let words = (0..self.g.index_entries)
            .map(|pos| self.entry_off(pos) + E_STATE)
            .chain((0..self.g.shards()).map(|s| self.g.shard_locks_off() + s * 8));
        let mut released = 0u64;
        for off in words {
            let Some(st) = self.map.load_u64(off, Ordering::Acquire) else {
                continue;
            };
            let token = holder(st);
            if token != 0 && token_slot(token) == self.slot && self.release_word(off, token) {
                released += 1;
                failpoint!("open.reclaim_slot.released");
            }
        }
        if released > 0 {
            self.count(S_TAKEOVERS, released);
            crate::metrics::takeovers(TakeoverReason::HolderDied, released);
            tracing::warn!(
                slot = self.slot,
                released,
                "released the leases of a process that died in this slot"
            );
        }
    }
}
