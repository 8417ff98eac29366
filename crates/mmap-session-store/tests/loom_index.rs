//! Exhaustive model check, with `loom`, of the two protocols that hold index entries besides a
//! session's own lease: the removal of an idle record by an internal holder (the sweep,
//! eviction, a purge) and the insert of a new key under a shard lock that a stalled holder can
//! lose. Threads stand in for processes.
//!
//! Run with: `RUSTFLAGS="--cfg mmap_loom" cargo test -p mmap-session-store --test loom_index --release`
//!
//! The models mirror `Shared::remove_idle` (`src/evict.rs`) and `Shared::insert_locked` /
//! `scan_window` (`src/index.rs`) step by step: every shared word is an atomic, and every step
//! that writes one is a compare-and-swap, as in the store.
#![cfg(mmap_loom)]
#![allow(clippy::unwrap_used, missing_docs)]

use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use loom::sync::{Arc, Mutex};
use loom::thread;

const TOKEN: u64 = 0xFFFF_FFFF;

fn state(block: u64, token: u64) -> u64 {
    (block << 32) | token
}
fn block_of(s: u64) -> u64 {
    s >> 32
}
fn holder(s: u64) -> u64 {
    s & TOKEN
}

/// One key's entry, three blocks, a LIFO free list (its own lock-freedom is not the subject
/// here), and per block the record's "expired" flag and value.
struct Records {
    word: AtomicU64,
    expired: [AtomicBool; 4],
    value: [AtomicU64; 4],
    free: Mutex<Vec<u64>>,
}

impl Records {
    /// Block 1 holds an expired record; blocks 2 and 3 are free (3 on top).
    fn new() -> Arc<Records> {
        let r = Records {
            word: AtomicU64::new(state(1, 0)),
            expired: [(); 4].map(|_| AtomicBool::new(false)),
            value: [(); 4].map(|_| AtomicU64::new(0)),
            free: Mutex::new(vec![2, 3]),
        };
        r.expired[1].store(true, Ordering::Relaxed);
        Arc::new(r)
    }

    fn lease(&self, me: u64) {
        loop {
            let s = self.word.load(Ordering::Acquire);
            if holder(s) == 0
                && self
                    .word
                    .compare_exchange(
                        s,
                        state(block_of(s), me),
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    )
                    .is_ok()
            {
                return;
            }
            thread::yield_now();
        }
    }

    /// A holder's commit: a fresh block, written, then published with the token check, the
    /// old block freed (last in, first out: the same block comes back soon).
    fn commit(&self, me: u64, value: u64) {
        let block = self.free.lock().unwrap().pop().unwrap();
        self.expired[block as usize].store(false, Ordering::Relaxed);
        self.value[block as usize].store(value, Ordering::Relaxed);
        loop {
            let s = self.word.load(Ordering::Acquire);
            assert_eq!(holder(s), me);
            if self
                .word
                .compare_exchange(s, state(block, me), Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                if block_of(s) != 0 {
                    self.free.lock().unwrap().push(block_of(s));
                }
                return;
            }
        }
    }

    fn release(&self, me: u64) {
        let s = self.word.load(Ordering::Acquire);
        assert_eq!(holder(s), me);
        self.word.store(state(block_of(s), 0), Ordering::Release);
    }

    /// `remove_idle` with `Removal::Expired`: chose the idle word `seen`, leases it by
    /// compare-and-swap, re-checks the expiry under the lease, removes.
    fn remove_idle(&self, seen: u64, me: u64) -> bool {
        if self
            .word
            .compare_exchange(
                seen,
                state(block_of(seen), me),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
        {
            return false;
        }
        let block = block_of(seen);
        let still = self.expired[block as usize].load(Ordering::Acquire);
        if still {
            self.word.store(state(0, me), Ordering::Release);
            self.free.lock().unwrap().push(block);
        }
        self.release(me);
        still
    }
}

#[test]
fn an_idle_removal_never_deletes_a_record_committed_after_it_looked() {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(|| {
        let r = Records::new();
        // The sweep sees the expired record in block 1 and decides to remove it.
        let seen = r.word.load(Ordering::Acquire);
        assert!(r.expired[block_of(seen) as usize].load(Ordering::Acquire));
        let sweeper = {
            let r = r.clone();
            thread::spawn(move || r.remove_idle(seen, 9))
        };
        // Meanwhile a request commits twice: block 1 comes back, holding a live record.
        for value in [10, 11] {
            r.lease(1);
            r.commit(1, value);
            r.release(1);
        }
        let removed = sweeper.join().unwrap();
        let s = r.word.load(Ordering::Acquire);
        if removed {
            // Only the expired record may have gone, before the commits.
            assert_ne!(block_of(s), 0, "a live record was removed");
        }
        assert_eq!(r.value[block_of(s) as usize].load(Ordering::Acquire), 11);
    });
}

const EMPTY: u64 = 0;
const VACATED: u64 = 1;
const KEY: u64 = 2; // a key's tag: low bits 10
const OTHER: u64 = 6; // another key's tag

fn claim(lock: u64) -> u64 {
    (lock << 2) | 3
}
fn is_claim(tag: u64) -> bool {
    tag & 3 == 3
}

/// A two-entry shard with its lock word.
struct Shard {
    lock: AtomicU64,
    tag: [AtomicU64; 2],
    word: [AtomicU64; 2],
}

enum Inserted {
    Leased(usize, u64),
    Exists(usize),
    Retry,
}

impl Shard {
    fn new() -> Arc<Shard> {
        Arc::new(Shard {
            lock: AtomicU64::new(0),
            tag: [AtomicU64::new(EMPTY), AtomicU64::new(EMPTY)],
            word: [AtomicU64::new(0), AtomicU64::new(0)],
        })
    }

    /// Takes the shard lock; `impatient` takes it from a live holder (watched past the lease
    /// timeout), as a waiter does from a stalled one.
    fn take_lock(&self, me: u64, impatient: bool) {
        loop {
            let s = self.lock.load(Ordering::Acquire);
            if (s == 0 || impatient)
                && self
                    .lock
                    .compare_exchange(s, me, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                return;
            }
            thread::yield_now();
        }
    }

    fn release_lock(&self, me: u64) {
        let _ = self
            .lock
            .compare_exchange(me, 0, Ordering::AcqRel, Ordering::Acquire);
    }

    /// `scan_window`: fences stale claims, finds the key, or chooses an entry.
    fn scan(&self, key: u64, mine: u64) -> (Option<usize>, Option<(usize, u64, u64)>) {
        let mut chosen = None;
        for pos in 0..2 {
            let mut tag = self.tag[pos].load(Ordering::Acquire);
            while is_claim(tag) && tag != mine {
                match self.tag[pos].compare_exchange(
                    tag,
                    VACATED,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => tag = VACATED,
                    Err(now) => tag = now,
                }
            }
            if tag == key {
                return (Some(pos), None);
            }
            let st = self.word[pos].load(Ordering::Acquire);
            let keyless = tag == EMPTY || tag == VACATED;
            if chosen.is_none() && keyless && block_of(st) == 0 {
                chosen = Some((pos, tag, st));
            }
            if tag == EMPTY {
                break;
            }
        }
        (None, chosen)
    }

    /// `insert_locked`, one attempt, with lock token `lock` and lease token `token`.
    fn insert(&self, key: u64, lock: u64, token: u64) -> Inserted {
        let mine = claim(lock);
        let (found, chosen) = self.scan(key, mine);
        if let Some(pos) = found {
            return Inserted::Exists(pos);
        }
        let Some((pos, tag, st)) = chosen else {
            return Inserted::Retry;
        };
        if self.word[pos]
            .compare_exchange(st, state(0, token), Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Inserted::Retry;
        }
        if self.tag[pos]
            .compare_exchange(tag, mine, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            self.release(pos, token);
            return Inserted::Retry;
        }
        if self.lock.load(Ordering::Acquire) != lock {
            let _ =
                self.tag[pos].compare_exchange(mine, VACATED, Ordering::AcqRel, Ordering::Acquire);
            self.release(pos, token);
            return Inserted::Retry;
        }
        if self.tag[pos]
            .compare_exchange(mine, key, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            self.release(pos, token);
            return Inserted::Retry;
        }
        Inserted::Leased(pos, token)
    }

    /// `Lease::release`: a key without a record gives its entry up (`give_up_key`), then the
    /// word is released if it is still ours.
    fn release_entry(&self, pos: usize, token: u64) {
        let s = self.word[pos].load(Ordering::Acquire);
        if holder(s) == token && block_of(s) == 0 {
            let tag = self.tag[pos].load(Ordering::Acquire);
            if tag & 3 == 2
                && self.tag[pos]
                    .compare_exchange(tag, VACATED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                // Checked again: a holder deposed meanwhile puts the key back.
                let s = self.word[pos].load(Ordering::Acquire);
                if holder(s) != token || block_of(s) != 0 {
                    let _ = self.tag[pos].compare_exchange(
                        VACATED,
                        tag,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                }
            }
        }
        self.release(pos, token);
    }

    fn release(&self, pos: usize, token: u64) {
        let s = self.word[pos].load(Ordering::Acquire);
        if holder(s) == token {
            let _ = self.word[pos].compare_exchange(
                s,
                state(block_of(s), 0),
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    }

    /// Leases the entry at `pos` (taking it from a live holder if `impatient`) and checks that
    /// it still holds `key`.
    fn lease_existing(&self, pos: usize, key: u64, token: u64, impatient: bool) -> bool {
        loop {
            let s = self.word[pos].load(Ordering::Acquire);
            if (holder(s) == 0 || impatient)
                && self.word[pos]
                    .compare_exchange(
                        s,
                        state(block_of(s), token),
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    )
                    .is_ok()
            {
                if self.tag[pos].load(Ordering::Acquire) == key {
                    return true;
                }
                self.release(pos, token);
                return false;
            }
            thread::yield_now();
        }
    }

    /// Publishes `block` under the lease `token`; false if the lease was taken over.
    fn commit(&self, pos: usize, token: u64, block: u64) -> bool {
        loop {
            let s = self.word[pos].load(Ordering::Acquire);
            if holder(s) != token {
                return false;
            }
            if self.word[pos]
                .compare_exchange(s, state(block, token), Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return true;
            }
        }
    }

    fn lookup(&self, key: u64) -> Option<usize> {
        (0..2).find(|&pos| self.tag[pos].load(Ordering::Acquire) == key)
    }
}

/// A session request for `key`: lease it (inserting it if needed, under the shard lock), then
/// commit `block`. `impatient` stands for a process that takes over locks and leases held past
/// the lease timeout. Returns whether its commit was acknowledged.
fn request(shard: &Shard, key: u64, lock: u64, token: u64, block: u64, impatient: bool) -> bool {
    for _ in 0..3 {
        let pos = match shard.lookup(key) {
            Some(pos) => pos,
            None => {
                shard.take_lock(lock, impatient);
                let inserted = shard.insert(key, lock, token);
                shard.release_lock(lock);
                match inserted {
                    Inserted::Leased(pos, token) => {
                        let acked = block != 0 && shard.commit(pos, token, block);
                        shard.release_entry(pos, token);
                        return acked;
                    }
                    Inserted::Exists(pos) => pos,
                    Inserted::Retry => continue,
                }
            }
        };
        if shard.lease_existing(pos, key, token, impatient) {
            let acked = block != 0 && shard.commit(pos, token, block);
            shard.release_entry(pos, token);
            return acked;
        }
    }
    false
}

#[test]
fn a_deposed_inserter_never_hides_its_successors_commit_nor_duplicates_a_key() {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    // Waiters spin (yielding) while a live holder works; allow long executions.
    builder.max_branches = 100_000;
    builder.check(|| {
        let shard = Shard::new();
        // The slow inserter (lock token 1, lease token 11) may be deposed at any step by the
        // successor (lock token 2, lease token 12), which takes locks and leases over.
        let slow = {
            let shard = shard.clone();
            thread::spawn(move || request(&shard, KEY, 1, 11, 7, false))
        };
        let acked = request(&shard, KEY, 2, 12, 8, true);
        let slow_acked = slow.join().unwrap();
        // One entry at most holds the key, and only entries with a key hold a record.
        let keyed = (0..2)
            .filter(|&p| shard.tag[p].load(Ordering::Acquire) == KEY)
            .count();
        assert!(keyed <= 1, "two entries hold one key");
        for p in 0..2 {
            let tag = shard.tag[p].load(Ordering::Acquire);
            let block = block_of(shard.word[p].load(Ordering::Acquire));
            assert!(block == 0 || tag == KEY, "a record without its key's tag");
        }
        // Every acknowledged commit is what a lookup finds, unless the other request's
        // acknowledged commit replaced it.
        let found = shard
            .lookup(KEY)
            .map(|p| block_of(shard.word[p].load(Ordering::Acquire)));
        if acked || slow_acked {
            assert!(
                (acked && found == Some(8)) || (slow_acked && found == Some(7)),
                "an acknowledged commit is hidden: acked {acked}/{slow_acked}, found {found:?}"
            );
        }
    });
}

#[test]
fn an_insert_reusing_an_entry_given_up_by_another_key_never_loses_either_key() {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    // Waiters spin (yielding) while a live holder works; allow long executions.
    builder.max_branches = 100_000;
    builder.check(|| {
        let shard = Shard::new();
        // The other key's entry exists without a record: a request that leased it and commits
        // nothing gives it up on release, then the key is written again.
        shard.tag[0].store(OTHER, Ordering::Relaxed);
        let other = {
            let shard = shard.clone();
            thread::spawn(move || {
                let _ = request(&shard, OTHER, 3, 13, 0, false);
                request(&shard, OTHER, 5, 15, 5, false)
            })
        };
        let acked = request(&shard, KEY, 4, 14, 6, false);
        let other_acked = other.join().unwrap();
        assert!(acked && other_acked, "a request gave up");
        let find = |key| {
            shard
                .lookup(key)
                .map(|p| block_of(shard.word[p].load(Ordering::Acquire)))
        };
        assert_eq!(find(KEY), Some(6));
        assert_eq!(find(OTHER), Some(5));
    });
}
