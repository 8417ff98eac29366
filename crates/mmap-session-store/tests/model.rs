//! Model test: random operation sequences against the store and a `HashMap`.
//!
//! Two `Store` handles on one path are used interchangeably (each is its own open file
//! description and registration slot, as a second process would be). After every operation,
//! `get` through both handles must agree with the model for every key. Reopening every handle
//! after a clean close, or after a simulated crash (the file's dirty word set, so the lone
//! opener runs recovery), must leave the file verifying clean with no leaked block.
//!
//! The small-store variant has room for three chunks only, so commits evict idle records or
//! fail with `StoreFull`. There the model accepts that a key disappears, but only when the
//! eviction counter moved, and never that a key reads a value other than its last commit.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mmap_session_store::{Options, Record, Store, StoreError};
use proptest::prelude::*;
use proptest::test_runner::Config;

#[derive(Clone, Copy, Debug)]
enum Expiry {
    /// Already expired when committed: the record must never be returned.
    Past,
    /// This many seconds after the test started.
    Future(u64),
}

#[derive(Clone, Debug)]
enum Op {
    /// Lease, check the leased read, commit a value, check `get` while still leased, release.
    Commit {
        key: usize,
        len: usize,
        seed: u64,
        expiry: Expiry,
        handle: usize,
    },
    /// Lease, remove the record, release.
    Remove { key: usize, handle: usize },
    /// Lease, check the leased read, drop the lease without any change.
    LeaseAndDrop { key: usize, handle: usize },
    /// A plain lock-free read.
    Get { key: usize, handle: usize },
    /// While `holder` leases `key`, `other` (possibly the same handle) cannot lease it.
    TryLeaseWhileHeld {
        key: usize,
        holder: usize,
        other: usize,
    },
    /// Drop one handle and open the path again; the other handle keeps the file open, so the
    /// new opener is not alone and does not run recovery.
    ReopenOne { handle: usize },
    /// Drop both handles and open again (a clean close: the lone opener need not recover).
    ReopenAll,
    /// Drop both handles, mark the file as left by a crashed process, and open again: the lone
    /// opener runs recovery, which must keep every record.
    ReopenAfterCrash,
}

/// What the model remembers of a key: its last committed value and expiry.
type Model = HashMap<usize, Record>;

struct Harness {
    path: std::path::PathBuf,
    options: Options,
    handles: Vec<Option<Store>>,
    model: Model,
    keys: usize,
    /// Ms since the epoch when the run started; future expiries are counted from here.
    base_ms: u64,
    /// Small store: evictions may make keys disappear and commits may fail with `StoreFull`.
    lossy: bool,
    evictions_seen: u64,
    store_full: u64,
}

fn key_bytes(k: usize) -> Vec<u8> {
    format!("session-{k}").into_bytes()
}

fn value(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The header word that says a process died since the last recovery (`H_DIRTY` in
/// `src/layout.rs`); a lone opener that finds it set runs recovery.
const H_DIRTY: u64 = 336;

fn mark_dirty(path: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&1u64.to_le_bytes(), H_DIRTY).unwrap();
}

fn ms(t: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(t)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

impl Harness {
    fn new(path: &Path, options: Options, keys: usize, lossy: bool) -> Harness {
        let a = Store::open_with(path, options.clone()).unwrap();
        let b = Store::open_with(path, options.clone()).unwrap();
        Harness {
            path: path.to_owned(),
            options,
            handles: vec![Some(a), Some(b)],
            model: Model::new(),
            keys,
            base_ms: now_ms(),
            lossy,
            evictions_seen: 0,
            store_full: 0,
        }
    }

    fn h(&self, i: usize) -> &Store {
        self.handles[i].as_ref().unwrap()
    }

    fn expected(&self, key: usize) -> Option<Record> {
        self.model.get(&key).cloned()
    }

    fn expires(&self, e: Expiry) -> u64 {
        match e {
            Expiry::Past => now_ms() - 1000,
            Expiry::Future(s) => self.base_ms + s * 1000,
        }
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Commit {
                key,
                len,
                seed,
                expiry,
                handle,
            } => {
                let k = key_bytes(key);
                let mut lease = self
                    .h(handle)
                    .try_lease(&k)
                    .unwrap()
                    .expect("nobody holds the key");
                assert_eq!(lease.read(), self.expected(key), "leased read of {key}");
                let v = value(len, seed);
                let at = self.expires(expiry);
                match lease.commit(&v, ms(at)) {
                    Ok(()) => {
                        let rec = Record {
                            value: v,
                            expires_at: ms(at),
                        };
                        match expiry {
                            Expiry::Past => {
                                assert_eq!(lease.read(), None, "an expired commit reads absent");
                                assert_eq!(self.h(1 - handle).get(&k), None);
                                self.model.remove(&key);
                            }
                            Expiry::Future(_) => {
                                assert_eq!(lease.read().as_ref(), Some(&rec));
                                // Lock-free reads see the commit while the lease is still held.
                                assert_eq!(self.h(1 - handle).get(&k).as_ref(), Some(&rec));
                                self.model.insert(key, rec);
                            }
                        }
                    }
                    Err(StoreError::StoreFull) if self.lossy => {
                        self.store_full += 1;
                        // Nothing was changed: the leased record is still the old one.
                        assert_eq!(lease.read(), self.expected(key), "after StoreFull");
                    }
                    Err(e) => panic!("commit of {len} bytes to key {key} failed: {e:?}"),
                }
                drop(lease);
            }
            Op::Remove { key, handle } => {
                let k = key_bytes(key);
                let mut lease = self.h(handle).try_lease(&k).unwrap().unwrap();
                assert_eq!(lease.read(), self.expected(key));
                lease.remove().unwrap();
                assert_eq!(lease.read(), None);
                assert_eq!(self.h(handle).get(&k), None);
                lease.release();
                self.model.remove(&key);
            }
            Op::LeaseAndDrop { key, handle } => {
                let k = key_bytes(key);
                let lease = self
                    .h(handle)
                    .lease_blocking(&k, soon())
                    .expect("an idle key leases at once");
                assert!(lease.is_held());
                assert_eq!(lease.read(), self.expected(key));
                drop(lease);
            }
            Op::Get { key, handle } => {
                assert_eq!(self.h(handle).get(&key_bytes(key)), self.expected(key));
            }
            Op::TryLeaseWhileHeld { key, holder, other } => {
                let k = key_bytes(key);
                let held = self.h(holder).try_lease(&k).unwrap().unwrap();
                assert!(
                    self.h(other).try_lease(&k).unwrap().is_none(),
                    "a held key cannot be leased again (holder {holder}, other {other})"
                );
                let err = self
                    .h(other)
                    .lease_blocking(&k, Instant::now() + Duration::from_millis(1))
                    .unwrap_err();
                assert!(matches!(err, StoreError::LeaseTimeout), "{err:?}");
                // Another key is not affected.
                let k2 = key_bytes((key + 1) % self.keys);
                assert!(self.h(other).try_lease(&k2).unwrap().is_some());
                // The held lease still reads the committed value.
                assert_eq!(held.read(), self.expected(key));
                held.release();
                assert!(self.h(other).try_lease(&k).unwrap().is_some());
            }
            Op::ReopenOne { handle } => {
                self.handles[handle] = None;
                self.handles[handle] =
                    Some(Store::open_with(&self.path, self.options.clone()).unwrap());
            }
            Op::ReopenAll | Op::ReopenAfterCrash => {
                self.handles = vec![None, None];
                if matches!(op, Op::ReopenAfterCrash) {
                    mark_dirty(&self.path);
                }
                let a = Store::open_with(&self.path, self.options.clone()).unwrap();
                self.handles[0] = Some(a);
                self.check_verify(true);
                self.handles[1] = Some(Store::open_with(&self.path, self.options.clone()).unwrap());
            }
        }
    }

    /// Every key through both handles: the model's value, or (small store only) absent when
    /// an eviction explains it.
    fn check_reads(&mut self, via: usize) {
        let evictions = self.h(0).stats().evictions;
        let new_evictions = evictions - self.evictions_seen;
        self.evictions_seen = evictions;
        let mut lost = 0;
        for key in 0..self.keys {
            let k = key_bytes(key);
            let expected = self.expected(key);
            let got = self.h(via).get(&k);
            if got.is_none() && expected.is_some() && self.lossy {
                lost += 1;
                self.model.remove(&key);
            } else {
                assert_eq!(got, expected, "get of key {key} through handle {via}");
            }
            if !self.lossy {
                assert_eq!(
                    self.h(1 - via).get(&k),
                    got,
                    "both handles agree on key {key}"
                );
            }
        }
        assert!(
            lost <= new_evictions,
            "{lost} keys disappeared but only {new_evictions} records were evicted"
        );
    }

    fn check_verify(&self, after_solo_open: bool) {
        let report = self.h(0).verify();
        assert!(report.is_clean(), "verify: {:?}", report.problems);
        assert_eq!(report.records, self.model.len() as u64, "{report:?}");
        assert_eq!(report.leased, 0, "{report:?}");
        assert_eq!(report.leaked_blocks, 0, "{report:?}");
        if after_solo_open {
            assert_eq!(self.h(0).stats().live_records, self.model.len() as u64);
        }
    }

    fn finish(mut self) -> (u64, u64) {
        self.check_verify(false);
        let out = (self.evictions_seen, self.store_full);
        self.apply(&Op::ReopenAfterCrash);
        self.check_reads(0);
        self.check_reads(1);
        self.check_verify(true);
        out
    }
}

fn ops(keys: usize, len: BoxedStrategy<usize>, max_ops: usize) -> impl Strategy<Value = Vec<Op>> {
    let expiry = prop_oneof![
        1 => Just(Expiry::Past),
        4 => (60..86_400u64).prop_map(Expiry::Future),
    ];
    let op = prop_oneof![
        8 => (0..keys, len, any::<u64>(), expiry, 0..2usize).prop_map(
            |(key, len, seed, expiry, handle)| Op::Commit { key, len, seed, expiry, handle }
        ),
        2 => (0..keys, 0..2usize).prop_map(|(key, handle)| Op::Remove { key, handle }),
        2 => (0..keys, 0..2usize).prop_map(|(key, handle)| Op::LeaseAndDrop { key, handle }),
        2 => (0..keys, 0..2usize).prop_map(|(key, handle)| Op::Get { key, handle }),
        2 => (0..keys, 0..2usize, 0..2usize)
            .prop_map(|(key, holder, other)| Op::TryLeaseWhileHeld { key, holder, other }),
        1 => (0..2usize).prop_map(|handle| Op::ReopenOne { handle }),
        1 => Just(Op::ReopenAll),
        1 => Just(Op::ReopenAfterCrash),
    ];
    proptest::collection::vec(op, 1..max_ops)
}

fn run(options: Options, keys: usize, lossy: bool, ops: &[Op]) -> (u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new(&dir.path().join("sessions"), options, keys, lossy);
    for (i, op) in ops.iter().enumerate() {
        h.apply(op);
        h.check_reads(i % 2);
    }
    h.finish()
}

fn config(cases: u32) -> Config {
    Config {
        cases,
        // Regressions are not persisted into the source tree; failures print the minimal case.
        failure_persistence: None,
        ..Config::default()
    }
}

const KEYS: usize = 5;

fn roomy() -> Options {
    Options::new()
        .max_sessions(64)
        .max_file_size(64 << 20)
        .max_value_len(4096)
}

/// Room for exactly three 1 MiB chunks after the index (the data area starts at 60 KiB for an
/// index of 1024 entries), so only three size classes can ever hold records.
fn tiny() -> Options {
    Options::new()
        .max_sessions(16)
        .max_file_size((3 << 20) + (100 << 10))
        .max_value_len(300_000)
}

const TINY_KEYS: usize = 16;

/// Mostly three value sizes (one small class, two classes of 4-5 blocks a chunk), so the
/// chunks fill and records are evicted; sometimes a fourth size whose class finds no chunk.
fn tiny_lengths() -> BoxedStrategy<usize> {
    prop_oneof![
        1 => 100..=110usize,
        8 => 180_000..=190_000usize,
        3 => 240_000..=250_000usize,
        1 => 1000..=2000usize,
    ]
    .boxed()
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn the_store_behaves_like_a_map_across_handles_and_reopens(
        ops in ops(KEYS, (0..2000usize).boxed(), 60)
    ) {
        run(roomy(), KEYS, false, &ops);
    }
}

proptest! {
    #![proptest_config(config(20))]

    #[test]
    fn a_full_store_only_loses_keys_to_eviction_and_never_returns_a_stale_value(
        ops in ops(TINY_KEYS, tiny_lengths(), 100)
    ) {
        run(tiny(), TINY_KEYS, true, &ops);
    }
}

/// The small variant only means something if it does evict and does run full: check that a
/// fixed workload of the same shape gets there.
#[test]
fn the_small_store_variant_really_evicts_and_runs_full() {
    // One small record (of the last key) takes the first chunk; fifteen keys of each large
    // size overflow the five (and four) blocks of their chunks; the last size finds no chunk
    // left, and none to give back: the last keys keep their small and first large records.
    let mut ops = Vec::new();
    let sizes = [
        (TINY_KEYS - 1..TINY_KEYS, 105),
        (0..TINY_KEYS - 1, 185_000),
        (0..TINY_KEYS - 2, 245_000),
        (0..3, 1500),
    ];
    let mut seed = 0;
    for (keys, len) in sizes {
        for key in keys {
            seed += 1;
            ops.push(Op::Commit {
                key,
                len,
                seed,
                expiry: Expiry::Future(3600),
                handle: (seed % 2) as usize,
            });
        }
    }
    let (evictions, full) = run(tiny(), TINY_KEYS, true, &ops);
    assert!(evictions > 0, "no eviction happened");
    assert!(full > 0, "the store never ran full");
}
