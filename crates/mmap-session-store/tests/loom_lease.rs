//! Exhaustive model check of the lease protocol with `loom` (threads stand in for processes).
//!
//! Run with: `RUSTFLAGS="--cfg mmap_loom" cargo test -p mmap-session-store --test loom_lease --release`
//!
//! The model mirrors `Shared::acquire`, `Shared::publish` and `Shared::release_word`: one 64-bit
//! state word holding the record (here: a counter value, in the high half) and the holder's token
//! (low half, with the waiters bit), and a liveness flag per holder standing in for its
//! registration lock. A commit writes `value read under the lease + 1` with a compare-and-swap
//! that checks only the token, exactly like the store's publish. Loom runs every interleaving,
//! including a holder that dies at each step and a live holder that is taken over because it
//! held the lease too long. The properties: every acknowledged commit is applied exactly once
//! (the final value equals the number of acknowledged commits), a holder that lost its lease
//! never commits, and nobody waits forever.
#![cfg(mmap_loom)]
#![allow(clippy::unwrap_used, missing_docs)]

use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;

const WAITERS: u64 = 1 << 31;
const TOKEN: u64 = 0xFFFF_FFFF;

fn holder(s: u64) -> u64 {
    s & TOKEN & !WAITERS
}

fn value(s: u64) -> u64 {
    s >> 32
}

struct World {
    word: AtomicU64,
    alive: [AtomicBool; 4],
    acks: AtomicUsize,
}

impl World {
    fn new() -> Arc<World> {
        Arc::new(World {
            word: AtomicU64::new(0),
            alive: [(); 4].map(|_| AtomicBool::new(true)),
            acks: AtomicUsize::new(0),
        })
    }

    /// `Shared::acquire`: take a free word, or one whose holder is dead; `impatient` also takes a
    /// live holder's word (it watched the same token past the lease timeout). Returns the value
    /// read under the lease.
    fn acquire(&self, me: u64, impatient: bool) -> u64 {
        loop {
            let s = self.word.load(Ordering::Acquire);
            let h = holder(s);
            let dead = h != 0 && !self.alive[h as usize].load(Ordering::Acquire);
            if h == 0 || dead || (impatient && h != me) {
                let new = (s & !(TOKEN & !WAITERS)) | me;
                if self
                    .word
                    .compare_exchange(s, new, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    return value(new);
                }
                continue;
            }
            // Mark the word so the release would wake a sleeper, then "sleep".
            let _ = self
                .word
                .compare_exchange(s, s | WAITERS, Ordering::AcqRel, Ordering::Acquire);
            thread::yield_now();
        }
    }

    /// `Shared::publish`: succeeds only while the token is ours.
    fn commit(&self, me: u64, read: u64) -> bool {
        loop {
            let s = self.word.load(Ordering::Acquire);
            if holder(s) != me {
                return false;
            }
            let new = ((read + 1) << 32) | (s & TOKEN);
            if self
                .word
                .compare_exchange(s, new, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                self.acks.fetch_add(1, Ordering::SeqCst);
                return true;
            }
        }
    }

    /// `Shared::release_word`: clears our token (and the waiters bit) if it is still ours.
    fn release(&self, me: u64) {
        loop {
            let s = self.word.load(Ordering::Acquire);
            if holder(s) != me {
                return;
            }
            if self
                .word
                .compare_exchange(s, s & !TOKEN, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return;
            }
        }
    }

    fn die(&self, me: u64) {
        self.alive[me as usize].store(false, Ordering::Release);
    }

    fn check(&self) {
        let applied = value(self.word.load(Ordering::Acquire)) as usize;
        assert_eq!(
            applied,
            self.acks.load(Ordering::SeqCst),
            "an acknowledged commit was lost or applied twice"
        );
    }
}

/// Every interleaving with up to `preemptions` forced context switches (loom's bound; the
/// cases here stay exhaustive for two threads and bounded for three).
fn model<F: Fn() + Sync + Send + 'static>(preemptions: usize, f: F) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(preemptions);
    // Waiters spin (yielding) while a live holder works; allow long executions.
    builder.max_branches = 20_000;
    builder.check(f);
}

fn increment(w: &World, me: u64) {
    let read = w.acquire(me, false);
    assert!(w.commit(me, read));
    w.release(me);
}

#[test]
fn two_holders_never_lose_an_increment() {
    model(3, || {
        let w = World::new();
        let a = {
            let w = w.clone();
            thread::spawn(move || increment(&w, 1))
        };
        increment(&w, 2);
        a.join().unwrap();
        w.check();
        assert_eq!(w.acks.load(Ordering::SeqCst), 2);
    });
}

#[test]
fn a_holder_dying_before_its_commit_is_taken_over_and_changes_nothing() {
    model(3, || {
        let w = World::new();
        let a = {
            let w = w.clone();
            thread::spawn(move || {
                let _read = w.acquire(1, false);
                w.die(1);
            })
        };
        increment(&w, 2);
        a.join().unwrap();
        w.check();
        assert_eq!(w.acks.load(Ordering::SeqCst), 1);
    });
}

#[test]
fn a_holder_dying_between_commit_and_release_keeps_its_commit() {
    model(3, || {
        let w = World::new();
        let a = {
            let w = w.clone();
            thread::spawn(move || {
                let read = w.acquire(1, false);
                assert!(w.commit(1, read));
                w.die(1);
            })
        };
        increment(&w, 2);
        a.join().unwrap();
        w.check();
        assert_eq!(w.acks.load(Ordering::SeqCst), 2);
    });
}

#[test]
fn a_live_holder_taken_over_for_holding_too_long_can_no_longer_commit() {
    model(3, || {
        let w = World::new();
        let stale = {
            let w = w.clone();
            thread::spawn(move || {
                let read = w.acquire(1, false);
                // Stopped here past the lease timeout, then resumed: commit and release late.
                let committed = w.commit(1, read);
                w.release(1);
                committed
            })
        };
        let read = w.acquire(2, true);
        assert!(
            w.commit(2, read),
            "the new holder's commit must never be refused"
        );
        w.release(2);
        let _ = stale.join().unwrap();
        w.check();
    });
}

#[test]
fn three_holders_with_one_dying_at_any_step_lose_nothing() {
    model(1, || {
        let w = World::new();
        let dying = {
            let w = w.clone();
            thread::spawn(move || {
                let read = w.acquire(1, false);
                w.die(1);
                // Its commit after death must be impossible to acknowledge as a lost update:
                // it may still land (the kernel has not noticed yet), and is then counted.
                let _ = w.commit(1, read);
            })
        };
        let b = {
            let w = w.clone();
            thread::spawn(move || increment(&w, 2))
        };
        increment(&w, 3);
        dying.join().unwrap();
        b.join().unwrap();
        w.check();
    });
}
