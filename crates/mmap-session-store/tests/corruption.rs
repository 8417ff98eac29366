//! The file is input: damaged or hostile bytes must give a typed `OpenError`, or a store on
//! which every operation runs without panicking and without touching memory outside the file,
//! and on which a record reads either exactly as it was written or as absent. `verify` must
//! report the damage it can see.
//!
//! Every case starts from the same file (records of four size classes, some overwritten, some
//! removed), damages a copy and opens it in this process: a panic inside the store fails the
//! test. Most cases run in three modes (`Mode`): the damaged file reopened after a clean close
//! (no recovery runs), reopened after a crash (the dirty word is set, so the lone opener runs
//! recovery first), and live (the store is open while the bytes change under it).
//!
//! The offsets below mirror `src/layout.rs` (the format is documented in `FORMAT.md`); the
//! tests read the geometry of the file from its header.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mmap_session_store::{OpenError, Options, Record, Store, StoreError};

// ---- The format (mirrors src/layout.rs) -------------------------------------------------

const HEADER_LEN: usize = 4096;
const H_VERSION: usize = 8;
const H_FINGERPRINT: usize = 16;
const H_INDEX_ENTRIES: usize = 24;
const H_INDEX_OFF: usize = 32;
const H_DATA_OFF: usize = 40;
const H_MAX_LEN: usize = 48;
const H_CHECKSUM: usize = 72;
const H_FILE_LEN: usize = 128;
const H_CHUNKS_CLAIMED: usize = 192;
const H_SWEEP_HAND: usize = 256;
const H_LIVE_BASE: usize = 320;
const H_BYTES_BASE: usize = 328;
const H_DIRTY: usize = 336;
const H_FREE_HEADS: usize = 512;
const SLOTS_OFF: usize = 4096;
const SLOT_LEN: usize = 128;
const MAX_SLOTS: usize = 511;
const S_LIVE: usize = 8;
const S_EVICTIONS: usize = 24;
const S_CHECKSUM_FAILURES: usize = 48;
const CHUNK_TABLE_OFF: usize = SLOTS_OFF + (MAX_SLOTS + 1) * SLOT_LEN;
const ENTRY_LEN: usize = 16;
const E_STATE: usize = 8;
const CHUNK_LEN: usize = 1 << 20;
const REF_UNIT: usize = 16;
const RECORD_HEADER: usize = 64;
const R_LEN: usize = 4;
const R_EXPIRES: usize = 8;
const R_LAST_USED: usize = 16;
const R_CHECKSUM: usize = 24;
const R_KEY: usize = 32;
const CLASS_COUNT: usize = 57;

fn class_size(class: usize) -> usize {
    let base = 64usize << (class / 4);
    base + (base / 4) * (class % 4)
}

fn class_for(bytes: usize) -> usize {
    (0..CLASS_COUNT).find(|&c| class_size(c) >= bytes).unwrap()
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

// ---- A deterministic generator -----------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // SplitMix64.
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn nonzero_byte(&mut self) -> u8 {
        1 + self.below(255) as u8
    }
}

// ---- The fixture: one store file with known records ----------------------------------------

const VALUE_LENS: [usize; 4] = [10, 100, 900, 3000];
const KEYS: usize = 48;
const MAX_VALUE: usize = 64 << 10;

fn options() -> Options {
    Options::new()
        .max_sessions(1000)
        .max_file_size(16 << 20)
        .max_value_len(MAX_VALUE)
        .lease_timeout(Duration::from_millis(200))
}

fn key(i: usize) -> Vec<u8> {
    format!("session-{i:03}").into_bytes()
}

fn original_value(i: usize, round: usize) -> Vec<u8> {
    let len = VALUE_LENS[i % VALUE_LENS.len()];
    let mut rng = Rng((i as u64) << 8 | round as u64);
    (0..len).map(|_| rng.next() as u8).collect()
}

fn expiry() -> SystemTime {
    // Whole milliseconds, as the file keeps them.
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    UNIX_EPOCH + Duration::from_millis(ms + 86_400_000)
}

/// Where a live record sits in the file.
#[derive(Clone, Copy, Debug)]
struct Loc {
    key: usize,
    entry: usize,
    block: usize,
    len: usize,
    class: usize,
}

struct Fixture {
    dir: tempfile::TempDir,
    pristine: Vec<u8>,
    /// What each key held when the file was closed (`None`: removed).
    expected: Vec<Option<Record>>,
    index_entries: usize,
    index_off: usize,
    data_off: usize,
    max_len: usize,
    records: Vec<Loc>,
    /// Chunk number to size class, for the chunks in use.
    chunk_class: HashMap<usize, usize>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pristine");
    let mut expected = vec![None; KEYS];
    {
        let store = Store::open_with(&path, options()).unwrap();
        let at = expiry();
        for round in 0..2 {
            for (i, slot) in expected.iter_mut().enumerate() {
                // Every third key is written twice, so freed blocks still hold old records.
                if round == 1 && i % 3 != 0 {
                    continue;
                }
                let mut lease = store.try_lease(&key(i)).unwrap().unwrap();
                let value = original_value(i, round);
                lease.commit(&value, at).unwrap();
                *slot = Some(Record {
                    value,
                    expires_at: at,
                });
            }
        }
        for i in (0..KEYS).filter(|i| i % 7 == 6) {
            let mut lease = store.try_lease(&key(i)).unwrap().unwrap();
            lease.remove().unwrap();
            expected[i] = None;
        }
        assert!(store.verify().is_clean());
    }
    let pristine = std::fs::read(&path).unwrap();
    let index_entries = u64_at(&pristine, H_INDEX_ENTRIES) as usize;
    let index_off = u64_at(&pristine, H_INDEX_OFF) as usize;
    let data_off = u64_at(&pristine, H_DATA_OFF) as usize;
    let max_len = u64_at(&pristine, H_MAX_LEN) as usize;
    let mut records = Vec::new();
    for entry in 0..index_entries {
        let st = u64_at(&pristine, index_off + entry * ENTRY_LEN + E_STATE);
        let block = (st >> 32) as usize * REF_UNIT;
        if block == 0 {
            continue;
        }
        let len = u32::from_le_bytes(pristine[block + R_LEN..block + 8].try_into().unwrap());
        let len = len as usize;
        let value = &pristine[block + RECORD_HEADER..block + RECORD_HEADER + len];
        let key = expected
            .iter()
            .position(|r| r.as_ref().is_some_and(|r| r.value == value))
            .expect("every live record belongs to a key");
        records.push(Loc {
            key,
            entry,
            block,
            len,
            class: class_for(RECORD_HEADER + len),
        });
    }
    assert_eq!(records.len(), expected.iter().flatten().count());
    let chunk_class = (0..(max_len - data_off) / CHUNK_LEN)
        .filter_map(|c| {
            let b = pristine[CHUNK_TABLE_OFF + c];
            (b != 0).then(|| (c, b as usize - 1))
        })
        .collect::<HashMap<_, _>>();
    // The offsets above mirror the crate's layout: if it changed, say so here, not in every test.
    assert_eq!(
        chunk_class.len(),
        VALUE_LENS.len(),
        "CHUNK_TABLE_OFF is stale"
    );
    for r in &records {
        let chunk = (r.block - data_off) / CHUNK_LEN;
        assert_eq!(
            chunk_class.get(&chunk),
            Some(&r.class),
            "CHUNK_TABLE_OFF is stale"
        );
    }
    assert_eq!(u64_at(&pristine, H_DIRTY), 0, "H_DIRTY is stale");
    Fixture {
        dir,
        pristine,
        expected,
        index_entries,
        index_off,
        data_off,
        max_len,
        records,
        chunk_class,
    }
}

static CASES: AtomicU64 = AtomicU64::new(0);

/// How a damaged file meets the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Reopened after a clean close: no recovery runs, the store meets the damage at run time.
    Clean,
    /// Reopened after a crash (the dirty word is set): the lone opener runs recovery first.
    Crashed,
    /// Written into the file while the store has it open.
    Live,
}

const MODES: [Mode; 3] = [Mode::Clean, Mode::Crashed, Mode::Live];

impl Fixture {
    fn copy(&self, bytes: &[u8]) -> PathBuf {
        let path = self
            .dir
            .path()
            .join(format!("case-{}", CASES.fetch_add(1, Ordering::Relaxed)));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// A copy of the file damaged by `damage`, opened in `mode`. In `Live` mode the store opens
    /// the intact copy and the changed bytes are then written through another handle.
    fn open_damaged(
        &self,
        mode: Mode,
        damage: impl FnOnce(&mut Vec<u8>),
    ) -> (PathBuf, Result<Store, OpenError>) {
        let mut bytes = self.pristine.clone();
        damage(&mut bytes);
        match mode {
            Mode::Clean => {
                let path = self.copy(&bytes);
                let opened = Store::open_with(&path, options());
                (path, opened)
            }
            Mode::Crashed => {
                if bytes.len() >= H_DIRTY + 8 {
                    put_u64(&mut bytes, H_DIRTY, 1);
                }
                let path = self.copy(&bytes);
                let opened = Store::open_with(&path, options());
                (path, opened)
            }
            Mode::Live => {
                assert_eq!(
                    bytes.len(),
                    self.pristine.len(),
                    "live damage keeps the length"
                );
                let path = self.copy(&self.pristine);
                let store = Store::open_with(&path, options()).unwrap();
                let f = OpenOptions::new().write(true).open(&path).unwrap();
                let mut i = 0;
                while i < bytes.len() {
                    if bytes[i] == self.pristine[i] {
                        i += 1;
                        continue;
                    }
                    let start = i;
                    while i < bytes.len() && bytes[i] != self.pristine[i] {
                        i += 1;
                    }
                    f.write_all_at(&bytes[start..i], start as u64).unwrap();
                }
                (path, Ok(store))
            }
        }
    }

    fn entry_state_off(&self, entry: usize) -> usize {
        self.index_off + entry * ENTRY_LEN + E_STATE
    }

    fn chunk_of(&self, off: usize) -> usize {
        (off - self.data_off) / CHUNK_LEN
    }

    fn chunk_for_class(&self, class: usize) -> usize {
        *self
            .chunk_class
            .iter()
            .find(|(_, c)| **c == class)
            .unwrap()
            .0
    }

    /// Blocks of `class` that hold no live record (in the pristine file: on its free list).
    fn free_blocks(&self, class: usize) -> Vec<usize> {
        let chunk = self.chunk_for_class(class);
        let start = self.data_off + chunk * CHUNK_LEN;
        let size = class_size(class);
        (0..CHUNK_LEN / size)
            .map(|i| start + i * size)
            .filter(|b| !self.records.iter().any(|r| r.block == *b))
            .collect()
    }

    fn record_of_class(&self, class: usize) -> Loc {
        *self.records.iter().find(|r| r.class == class).unwrap()
    }

    fn classes(&self) -> Vec<usize> {
        let mut c: Vec<usize> = self.chunk_class.values().copied().collect();
        c.sort_unstable();
        c
    }
}

/// Writes `bytes` at `off` of the file at `path` through a handle of its own, as another
/// process (or a stray writer) would while the store has it open.
fn write_live(path: &Path, off: usize, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off as u64).unwrap();
}

// ---- Exercising a damaged store --------------------------------------------------------------

/// What `exercise` saw before it wrote anything.
#[derive(Debug, Default)]
struct Seen {
    /// Keys that had a record and read as absent.
    absent: usize,
    /// What `verify` reported.
    problems: Vec<String>,
}

/// Reads every key, leases and rewrites some, removes one, writes new keys, runs `verify` and
/// `stats`; checks that every read is the original record or absent and that every successful
/// commit reads back.
fn exercise(store: &Store, fx: &Fixture, ctx: &str) -> Seen {
    let mut seen = Seen::default();
    let mut expected: Vec<Option<Record>> = fx.expected.clone();
    for (i, exp) in expected.iter().enumerate() {
        match (store.get(&key(i)), exp) {
            (None, Some(_)) => seen.absent += 1,
            (None, None) => {}
            (Some(got), Some(exp)) => assert_eq!(&got, exp, "{ctx}: key {i} read a wrong record"),
            (Some(got), None) => panic!("{ctx}: removed key {i} came back as {got:?}"),
        }
    }
    seen.problems = store.verify().problems;
    let _ = store.stats();

    let at = expiry();
    for i in (0..KEYS).step_by(4) {
        let k = key(i);
        let mut lease = match store.try_lease(&k) {
            Ok(Some(lease)) => lease,
            Ok(None) | Err(_) => continue, // a damaged lease word may name a holder
        };
        let read = lease.read();
        assert!(
            read.is_none() || read == expected[i],
            "{ctx}: leased read of key {i} is a wrong record"
        );
        let value = original_value(i, 7);
        match lease.commit(&value, at) {
            Ok(()) => {
                let rec = Record {
                    value,
                    expires_at: at,
                };
                assert_eq!(lease.read().as_ref(), Some(&rec), "{ctx}: key {i}");
                drop(lease);
                assert_eq!(store.get(&k).as_ref(), Some(&rec), "{ctx}: key {i}");
                expected[i] = Some(rec);
            }
            Err(StoreError::StoreFull | StoreError::Corrupted(_)) => {}
            Err(e) => panic!("{ctx}: commit of key {i}: unexpected {e:?}"),
        }
    }
    if let Ok(Some(mut lease)) = store.try_lease(&key(1)) {
        if lease.remove().is_ok() {
            drop(lease);
            assert_eq!(
                store.get(&key(1)),
                None,
                "{ctx}: a removed key reads absent"
            );
            expected[1] = None;
        }
    }
    let mut fresh = Vec::new();
    for j in 0..8 {
        let k = format!("fresh-{j}").into_bytes();
        let value = original_value(KEYS + j, 0);
        if let Ok(Some(mut lease)) = store.try_lease(&k) {
            if lease.commit(&value, at).is_ok() {
                fresh.push((k, value));
            }
        }
    }
    for (k, value) in &fresh {
        let got = store.get(k);
        assert_eq!(got.map(|r| r.value).as_ref(), Some(value), "{ctx}: new key");
    }
    for (i, exp) in expected.iter().enumerate() {
        let got = store.get(&key(i));
        assert!(
            got.is_none() || got == *exp,
            "{ctx}: after writes, key {i} read a wrong record: {got:?}"
        );
    }
    let _ = store.verify();
    let _ = store.stats();
    seen
}

/// Opens a damaged copy in `mode` and exercises it; `None` if the open gave a (typed) error.
/// A store that opened is closed and the file opened once more, which must succeed.
fn open_and_exercise(
    fx: &Fixture,
    mode: Mode,
    damage: impl FnOnce(&mut Vec<u8>),
    ctx: &str,
) -> Option<Seen> {
    let ctx = format!("{mode:?}: {ctx}");
    let (path, opened) = fx.open_damaged(mode, damage);
    let seen = match opened {
        Ok(store) => {
            let seen = exercise(&store, fx, &ctx);
            drop(store);
            let again = Store::open_with(&path, options())
                .unwrap_or_else(|e| panic!("{ctx}: second open failed: {e}"));
            let _ = again.verify();
            Some(seen)
        }
        Err(e) => {
            assert_typed(&e, &ctx);
            None
        }
    };
    std::fs::remove_file(&path).unwrap();
    seen
}

fn assert_typed(e: &OpenError, ctx: &str) {
    assert!(
        matches!(
            e,
            OpenError::Corrupted { .. }
                | OpenError::NotAStore(_)
                | OpenError::UpgradeRequired { .. }
        ),
        "{ctx}: unexpected open error {e:?}"
    );
}

fn has_problem(problems: &[String], needle: &str) -> bool {
    problems.iter().any(|p| p.contains(needle))
}

// ---- Random damage ----------------------------------------------------------------------------

/// An offset in one of the areas of the file, chosen at random.
fn random_offset(rng: &mut Rng, fx: &Fixture) -> usize {
    let file_len = fx.pristine.len();
    match rng.below(7) {
        0 => rng.below(HEADER_LEN),
        1 => SLOTS_OFF + rng.below(CHUNK_TABLE_OFF - SLOTS_OFF),
        2 => CHUNK_TABLE_OFF + rng.below((fx.max_len - fx.data_off) / CHUNK_LEN),
        3 => {
            let r = fx.records[rng.below(fx.records.len())];
            fx.index_off + r.entry * ENTRY_LEN + rng.below(ENTRY_LEN)
        }
        4 => fx.index_off + rng.below(fx.index_entries * ENTRY_LEN),
        5 => {
            let r = fx.records[rng.below(fx.records.len())];
            r.block + rng.below(RECORD_HEADER + r.len)
        }
        _ => fx.data_off + rng.below(file_len - fx.data_off),
    }
}

#[test]
fn random_byte_flips_never_panic_and_never_return_a_wrong_record() {
    let fx = fixture();
    let mut rng = Rng(0x5EED_0001);
    let (mut opened, mut refused, mut lost) = (0, 0, 0);
    for iteration in 0..150 {
        let mode = MODES[iteration % MODES.len()];
        let flips: Vec<(usize, u8)> = (0..1 + rng.below(4))
            .map(|_| (random_offset(&mut rng, &fx), rng.nonzero_byte()))
            .collect();
        let damage = |b: &mut Vec<u8>| {
            for &(off, x) in &flips {
                b[off] ^= x;
            }
        };
        let ctx = format!("iteration {iteration}, flips {flips:x?}");
        match open_and_exercise(&fx, mode, damage, &ctx) {
            Some(seen) => {
                opened += 1;
                lost += seen.absent;
            }
            None => refused += 1,
        }
    }
    assert!(
        opened > 120 && lost > 10,
        "opened {opened}, refused {refused}, lost {lost}"
    );
}

#[test]
fn a_flipped_record_byte_reads_as_absent_and_verify_reports_it() {
    let fx = fixture();
    let mut rng = Rng(0x5EED_0002);
    for (n, r) in fx.records.iter().step_by(3).enumerate() {
        let mode = MODES[n % MODES.len()];
        let mut offsets = vec![
            0,                         // magic
            R_LEN,                     // length
            R_EXPIRES + 2,             // expiry
            R_CHECKSUM + 7,            // checksum
            R_KEY + 8 + rng.below(24), // key hash, past the part the index tag is made of
        ];
        if r.len > 0 {
            offsets.push(RECORD_HEADER + rng.below(r.len));
            offsets.push(RECORD_HEADER + r.len - 1);
        }
        for rel in offsets {
            let bit = 1 << rng.below(8);
            let ctx = format!("{mode:?}: key {} record byte {rel}", r.key);
            let (_, store) = fx.open_damaged(mode, |b| b[r.block + rel] ^= bit);
            let store = store.unwrap();
            assert_eq!(store.get(&key(r.key)), None, "{ctx}");
            assert!(store.stats().checksum_failures >= 1, "{ctx}: not counted");
            let problems = store.verify().problems;
            assert!(!problems.is_empty(), "{ctx}: verify saw nothing");
            for other in fx.records.iter().filter(|o| o.key != r.key) {
                assert_eq!(store.get(&key(other.key)), fx.expected[other.key], "{ctx}");
            }
            // The key can be written again, and then reads the new value.
            let mut lease = store.try_lease(&key(r.key)).unwrap().unwrap();
            assert_eq!(lease.read(), None, "{ctx}");
            lease.commit(b"fresh", expiry()).unwrap();
            drop(lease);
            assert_eq!(store.get(&key(r.key)).unwrap().value, b"fresh", "{ctx}");
        }
    }
}

#[test]
fn a_flipped_last_used_stamp_changes_nothing_read() {
    let fx = fixture();
    let r = fx.records[0];
    for mode in MODES {
        let (_, store) = fx.open_damaged(mode, |b| b[r.block + R_LAST_USED + 3] ^= 0x40);
        let store = store.unwrap();
        assert_eq!(store.get(&key(r.key)), fx.expected[r.key], "{mode:?}");
        assert!(store.verify().is_clean(), "{mode:?}");
    }
}

#[test]
fn a_flipped_key_tag_makes_only_that_record_absent() {
    let fx = fixture();
    for r in fx.records.iter().take(6) {
        // The index entry's tag and the first key-hash bytes of the record must agree.
        for off in [fx.index_off + r.entry * ENTRY_LEN + 3, r.block + R_KEY + 5] {
            for mode in MODES {
                let ctx = format!("key {} byte {off}", r.key);
                let seen = open_and_exercise(&fx, mode, |b| b[off] ^= 0x10, &ctx).unwrap();
                assert_eq!(
                    seen.absent, 1,
                    "{mode:?}: {ctx}: only the damaged record is lost"
                );
                if mode != Mode::Crashed {
                    // Recovery drops the entry; otherwise verify sees the mismatch.
                    assert!(
                        !seen.problems.is_empty(),
                        "{mode:?}: {ctx}: verify saw nothing"
                    );
                }
            }
        }
    }
}

// ---- Truncated, empty and foreign files ----------------------------------------------------------

#[test]
fn a_truncated_file_is_refused_as_corrupted_at_every_length() {
    let fx = fixture();
    let file_len = fx.pristine.len();
    let mut lengths = vec![
        0,
        1,
        4,
        7,
        8,
        9,
        16,
        100,
        HEADER_LEN - 1,
        HEADER_LEN,
        HEADER_LEN + 1,
        CHUNK_TABLE_OFF,
        fx.index_off,
        fx.index_off + 17,
        fx.data_off - 1,
        fx.data_off,
        fx.data_off + 1,
        fx.data_off + CHUNK_LEN,
        file_len - HEADER_LEN,
        file_len - 1,
    ];
    let mut rng = Rng(0x5EED_0004);
    lengths.extend((0..40).map(|_| rng.below(file_len)));
    for len in lengths {
        for mode in [Mode::Clean, Mode::Crashed] {
            let (path, opened) = fx.open_damaged(mode, |b| b.truncate(len));
            match opened {
                Err(OpenError::Corrupted { reason, .. }) => {
                    assert!(reason.contains("truncated"), "{len} bytes: {reason}")
                }
                Err(e) => panic!("{len} bytes: {e:?}"),
                Ok(_) => panic!("a file truncated to {len} of {file_len} bytes was opened"),
            }
            std::fs::remove_file(&path).unwrap();
        }
    }
}

#[test]
fn a_file_longer_than_its_header_says_keeps_every_record() {
    let fx = fixture();
    for mode in [Mode::Clean, Mode::Crashed] {
        let extend = |b: &mut Vec<u8>| b.resize(b.len() + 3 * CHUNK_LEN + 123, 0xA5);
        let seen = open_and_exercise(&fx, mode, extend, "extended").unwrap();
        assert_eq!(seen.absent, 0);
        assert!(seen.problems.is_empty(), "{:?}", seen.problems);
    }
}

#[test]
fn an_empty_file_is_refused_with_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty");
    std::fs::write(&path, b"").unwrap();
    let e = Store::open_with(&path, options()).unwrap_err();
    assert!(matches!(e, OpenError::Corrupted { .. }), "{e:?}");
}

fn open_error(fx: &Fixture, damage: impl FnOnce(&mut Vec<u8>)) -> OpenError {
    let (path, opened) = fx.open_damaged(Mode::Clean, damage);
    std::fs::remove_file(path).unwrap();
    match opened {
        Ok(_) => panic!("the damaged file was opened"),
        Err(e) => e,
    }
}

#[test]
fn garbage_headers_are_refused_with_typed_errors() {
    let fx = fixture();
    let mut rng = Rng(0x5EED_0005);
    // Random bytes where the magic should be: not a store at all.
    for _ in 0..20 {
        let garbage: Vec<u8> = (0..HEADER_LEN).map(|_| rng.next() as u8).collect();
        let e = open_error(&fx, |b| b[..HEADER_LEN].copy_from_slice(&garbage));
        assert!(matches!(e, OpenError::NotAStore(_)), "{e:?}");
    }
    // The magic, then garbage: another version or layout.
    for _ in 0..20 {
        let e = open_error(&fx, |b| {
            for x in &mut b[H_VERSION..HEADER_LEN] {
                *x = rng.next() as u8;
            }
        });
        assert!(matches!(e, OpenError::UpgradeRequired { .. }), "{e:?}");
    }
    // A right version and layout with any immutable field changed: the checksum catches it.
    for field in (H_INDEX_ENTRIES..H_CHECKSUM + 8).step_by(4) {
        let x = rng.nonzero_byte();
        let e = open_error(&fx, |b| b[field + 1] ^= x);
        assert!(
            matches!(e, OpenError::Corrupted { .. }),
            "byte {field}: {e:?}"
        );
    }
    // A version flip says "another format"; a fingerprint flip under our own version breaks the
    // header checksum, so it is damage, not another format. Neither misreads the file.
    for at in [H_VERSION, H_VERSION + 3] {
        let e = open_error(&fx, |b| b[at] ^= 0x01);
        assert!(
            matches!(e, OpenError::UpgradeRequired { .. }),
            "byte {at}: {e:?}"
        );
    }
    for at in [H_FINGERPRINT, H_FINGERPRINT + 7] {
        let e = open_error(&fx, |b| b[at] ^= 0x01);
        assert!(matches!(e, OpenError::Corrupted { .. }), "byte {at}: {e:?}");
    }
    let e = open_error(&fx, |b| b[..HEADER_LEN].fill(0));
    assert!(matches!(e, OpenError::NotAStore(_)), "{e:?}");
}

#[test]
fn a_valid_header_of_a_store_of_another_shape_is_refused_or_reads_nothing_wrong() {
    let fx = fixture();
    let shapes = [
        Options::new().max_sessions(1000).max_file_size(4 << 30),
        Options::new().max_sessions(100).max_file_size(2 << 20),
        Options::new().max_sessions(5000).max_file_size(16 << 20),
        Options::new().max_sessions(1000).max_file_size(12 << 20),
        Options::new()
            .max_sessions(1000)
            .max_file_size(16 << 20)
            .max_value_len(100),
    ];
    for (n, shape) in shapes.into_iter().enumerate() {
        let donor_path = fx.dir.path().join(format!("donor-{n}"));
        drop(Store::open_with(&donor_path, shape).unwrap());
        let donor = std::fs::read(&donor_path).unwrap();
        for mode in [Mode::Clean, Mode::Crashed] {
            let transplant = |b: &mut Vec<u8>| {
                // The donor's whole header, but the file length recorded in ours.
                let file_len = u64_at(b, H_FILE_LEN);
                b[..HEADER_LEN].copy_from_slice(&donor[..HEADER_LEN]);
                put_u64(b, H_FILE_LEN, file_len.max(u64_at(&donor, H_FILE_LEN)));
            };
            open_and_exercise(&fx, mode, transplant, &format!("header of shape {n}"));
        }
    }
}

// ---- Hostile values at exact offsets ---------------------------------------------------------

/// State words (record references, with no lease) that point where no record of the entry's
/// key can be.
fn hostile_references(fx: &Fixture, victim: &Loc) -> Vec<(&'static str, u64)> {
    let other_class = fx.records.iter().find(|r| r.class != victim.class).unwrap();
    let same_class_other_key = fx
        .records
        .iter()
        .find(|r| r.class == victim.class && r.key != victim.key)
        .unwrap();
    let free = fx.free_blocks(victim.class)[3];
    let unclaimed_chunk = (0..16).find(|c| !fx.chunk_class.contains_key(c)).unwrap();
    let r = |off: usize| ((off / REF_UNIT) as u64) << 32;
    vec![
        ("the largest reference", u64::MAX << 32),
        ("the header", r(REF_UNIT)),
        ("the free-list heads", r(H_FREE_HEADS)),
        ("the slot table", r(SLOTS_OFF + 3 * SLOT_LEN)),
        ("the chunk table", r(CHUNK_TABLE_OFF)),
        ("the index", r(fx.index_off + 64 * ENTRY_LEN)),
        (
            "its own entry",
            r(fx.entry_state_off(victim.entry) - E_STATE),
        ),
        ("inside its block", r(victim.block + REF_UNIT)),
        (
            "a misaligned block",
            r(victim.block + class_size(victim.class) / 2),
        ),
        ("a block of another class", r(other_class.block)),
        ("another key's record", r(same_class_other_key.block)),
        ("a free block", r(free)),
        (
            "an unclaimed chunk",
            r(fx.data_off + unclaimed_chunk * CHUNK_LEN),
        ),
        ("beyond the file", r(fx.data_off + 12 * CHUNK_LEN)),
        ("beyond the maximum", r(fx.max_len + CHUNK_LEN)),
    ]
}

#[test]
fn index_entries_pointing_anywhere_but_their_record_read_as_absent() {
    let fx = fixture();
    for victim in [fx.records[0], fx.records[fx.records.len() - 1]] {
        for (what, state) in hostile_references(&fx, &victim) {
            for mode in MODES {
                let ctx = format!("key {} pointing at {what}", victim.key);
                let damage = |b: &mut Vec<u8>| put_u64(b, fx.entry_state_off(victim.entry), state);
                let seen = open_and_exercise(&fx, mode, damage, &ctx).expect("header intact");
                assert_eq!(
                    seen.absent, 1,
                    "{mode:?}: {ctx}: only the damaged entry is lost"
                );
                if mode != Mode::Crashed {
                    assert!(
                        !seen.problems.is_empty(),
                        "{mode:?}: {ctx}: verify saw nothing"
                    );
                }
            }
        }
    }
}

#[test]
fn lease_words_naming_dead_or_impossible_holders_are_taken_over() {
    let fx = fixture();
    let victim = fx.records[2];
    let block = u64_at(&fx.pristine, fx.entry_state_off(victim.entry)) >> 32;
    for token in [
        1u32,
        0x7FFF_FFFF,
        0xFFFF_FFFF,
        (3 << 22) | 5,
        (600 << 22) | 9,
    ] {
        let st = (block << 32) | token as u64;
        for mode in MODES {
            let ctx = format!("{mode:?}: token {token:#x}");
            let (_, store) =
                fx.open_damaged(mode, |b| put_u64(b, fx.entry_state_off(victim.entry), st));
            let store = store.unwrap();
            if mode == Mode::Crashed {
                // Recovery cleared every lease.
                assert!(
                    store.try_lease(&key(victim.key)).unwrap().is_some(),
                    "{ctx}"
                );
            }
            // The holder is not a live process: a waiter takes the lease over at once.
            let lease = store
                .lease_blocking(&key(victim.key), Instant::now() + Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("{ctx}: {e:?}"));
            assert_eq!(lease.read(), fx.expected[victim.key], "{ctx}");
        }
    }
}

/// What a damaged free list is, its head word, and `(block offset, next reference)` links
/// written along with it.
type FreeListDamage = (&'static str, u64, Vec<(usize, u64)>);

/// Free-list heads (low 32 bits: the first block) that are not a list of free blocks, with
/// the block links written along with them.
fn hostile_free_heads(fx: &Fixture, class: usize) -> Vec<FreeListDamage> {
    let free = fx.free_blocks(class);
    let live = fx.record_of_class(class);
    let other = fx.records.iter().find(|r| r.class != class).unwrap();
    let r = |off: usize| (off / REF_UNIT) as u64;
    let tag = 7u64 << 32;
    vec![
        ("the largest reference", tag | u32::MAX as u64, vec![]),
        ("the header", tag | 1, vec![]),
        ("the index", tag | r(fx.index_off), vec![]),
        ("a misaligned block", tag | (r(free[0]) + 1), vec![]),
        ("a block of another class", tag | r(other.block), vec![]),
        ("a live record", tag | r(live.block), vec![]),
        (
            "beyond the file",
            tag | r(fx.data_off + 12 * CHUNK_LEN),
            vec![],
        ),
        (
            "a cycle of two free blocks",
            tag | r(free[0]),
            vec![(free[0], r(free[1])), (free[1], r(free[0]))],
        ),
        (
            "a block linking to itself",
            tag | r(free[2]),
            vec![(free[2], r(free[2]))],
        ),
        (
            "a free block linking to a live record",
            tag | r(free[3]),
            vec![(free[3], r(live.block))],
        ),
        (
            "a free block linking out of the file",
            tag | r(free[4]),
            vec![(free[4], u32::MAX as u64)],
        ),
    ]
}

/// Commits `n` new keys with values of `class`'s size, checking after each that every original
/// record is still intact (not even absent: free-list damage must never cost a live record),
/// then that every new key reads back.
fn fill_class_and_check(store: &Store, fx: &Fixture, class: usize, n: usize, ctx: &str) {
    let len = VALUE_LENS
        .iter()
        .copied()
        .find(|&l| class_for(RECORD_HEADER + l) == class)
        .unwrap();
    let at = expiry();
    let mut written = Vec::new();
    for j in 0..n {
        let k = format!("filler-{j}").into_bytes();
        let v: Vec<u8> = (0..len).map(|x| (x * 7 + j) as u8).collect();
        let mut lease = store.try_lease(&k).unwrap().unwrap();
        lease
            .commit(&v, at)
            .unwrap_or_else(|e| panic!("{ctx}: filler {j}: {e:?}"));
        drop(lease);
        written.push((k, v));
        for r in &fx.records {
            assert_eq!(
                store.get(&key(r.key)),
                fx.expected[r.key],
                "{ctx}: after filler {j}, key {} (block {:#x})",
                r.key,
                r.block
            );
        }
    }
    for (k, v) in &written {
        assert_eq!(store.get(k).map(|r| r.value).as_ref(), Some(v), "{ctx}");
    }
}

#[test]
fn damaged_free_lists_never_hand_out_a_live_block_and_recovery_rebuilds_them() {
    let fx = fixture();
    let classes = fx.classes();
    for class in [classes[0], classes[classes.len() - 1]] {
        for (what, head, links) in hostile_free_heads(&fx, class) {
            for mode in MODES {
                let ctx = format!("{mode:?}: class {class} free list: {what}");
                let (_, store) = fx.open_damaged(mode, |b| {
                    put_u64(b, H_FREE_HEADS + class * 8, head);
                    for &(at, next) in &links {
                        put_u64(b, at, next);
                    }
                });
                let store = store.unwrap();
                let report = store.verify();
                if mode == Mode::Crashed {
                    assert!(report.is_clean(), "{ctx}: {:?}", report.problems);
                    assert_eq!(report.leaked_blocks, 0, "{ctx}");
                } else {
                    assert!(!report.problems.is_empty(), "{ctx}: verify saw nothing");
                    assert!(
                        report.problems.iter().all(|p| p.contains("free list")),
                        "{ctx}: {:?}",
                        report.problems
                    );
                }
                fill_class_and_check(&store, &fx, class, 8, &ctx);
            }
        }
    }
}

#[test]
fn invalid_chunk_classes_make_only_that_chunks_records_absent() {
    let fx = fixture();
    for (&chunk, &class) in &fx.chunk_class {
        let in_chunk = fx
            .records
            .iter()
            .filter(|r| fx.chunk_of(r.block) == chunk)
            .count();
        for byte in [0u8, CLASS_COUNT as u8 + 1, 0x80, 0xFF] {
            for mode in MODES {
                let ctx = format!("chunk {chunk} (class {class}) set to {byte:#x}");
                let damage = |b: &mut Vec<u8>| b[CHUNK_TABLE_OFF + chunk] = byte;
                let seen = open_and_exercise(&fx, mode, damage, &ctx).unwrap();
                assert_eq!(seen.absent, in_chunk, "{mode:?}: {ctx}");
                if mode != Mode::Crashed || byte != 0 {
                    assert!(
                        !seen.problems.is_empty(),
                        "{mode:?}: {ctx}: verify saw nothing"
                    );
                }
                if byte != 0 {
                    assert!(
                        has_problem(&seen.problems, "invalid size class"),
                        "{mode:?}: {ctx}: {:?}",
                        seen.problems
                    );
                }
            }
        }
    }
}

#[test]
fn a_chunk_relabelled_with_another_valid_class_never_yields_a_wrong_record() {
    let fx = fixture();
    for (&chunk, &class) in &fx.chunk_class {
        for new_class in [0, class + 1, 56] {
            if new_class == class {
                continue;
            }
            for mode in MODES {
                let ctx = format!("chunk {chunk} relabelled from class {class} to {new_class}");
                let damage = |b: &mut Vec<u8>| b[CHUNK_TABLE_OFF + chunk] = new_class as u8 + 1;
                open_and_exercise(&fx, mode, damage, &ctx);
            }
        }
    }
}

#[test]
fn chunk_classes_set_on_unclaimed_chunks_never_yield_a_wrong_record() {
    let fx = fixture();
    let chunks = (fx.max_len - fx.data_off) / CHUNK_LEN;
    // Right after the claimed ones, the last of the table, and past the table's end.
    for chunk in [VALUE_LENS.len(), chunks - 1, chunks + 2] {
        assert!(!fx.chunk_class.contains_key(&chunk));
        for byte in [1u8, 57, 58, 0xFF] {
            for mode in MODES {
                let ctx = format!("unclaimed chunk {chunk} set to {byte}");
                let damage = |b: &mut Vec<u8>| b[CHUNK_TABLE_OFF + chunk] = byte;
                let seen = open_and_exercise(&fx, mode, damage, &ctx).unwrap();
                assert_eq!(seen.absent, 0, "{mode:?}: {ctx}");
            }
        }
    }
}

#[test]
fn record_lengths_larger_than_their_block_read_as_absent() {
    let fx = fixture();
    for victim in fx.classes().into_iter().map(|c| fx.record_of_class(c)) {
        let size = class_size(victim.class);
        for len in [
            u32::MAX,
            (MAX_VALUE + 1) as u32,
            (size - RECORD_HEADER + 1) as u32,
            CHUNK_LEN as u32,
        ] {
            for mode in MODES {
                let ctx = format!(
                    "{mode:?}: key {} (block of {size}) length {len}",
                    victim.key
                );
                let (_, store) = fx.open_damaged(mode, |b| put_u32(b, victim.block + R_LEN, len));
                let store = store.unwrap();
                assert_eq!(store.get(&key(victim.key)), None, "{ctx}");
                let seen = exercise(&store, &fx, &ctx);
                assert_eq!(seen.absent, 1, "{ctx}");
                assert!(
                    has_problem(&seen.problems, "exceeds its block"),
                    "{ctx}: {:?}",
                    seen.problems
                );
            }
        }
    }
}

#[test]
fn a_file_length_in_the_header_beyond_the_file_is_refused_at_open() {
    let fx = fixture();
    let file_len = fx.pristine.len() as u64;
    for claimed in [
        file_len + 1,
        file_len + CHUNK_LEN as u64,
        fx.max_len as u64,
        fx.max_len as u64 + 1,
        1 << 40,
        u64::MAX,
        fx.data_off as u64 - 1,
        0,
    ] {
        let e = open_error(&fx, |b| put_u64(b, H_FILE_LEN, claimed));
        assert!(matches!(e, OpenError::Corrupted { .. }), "{claimed}: {e:?}");
    }
}

#[test]
fn hostile_counters_and_hints_in_the_header_are_repaired_or_harmless() {
    let fx = fixture();
    let words = [
        (H_CHUNKS_CLAIMED, u64::MAX),
        (H_CHUNKS_CLAIMED, 0),
        (H_CHUNKS_CLAIMED, 3),
        (H_LIVE_BASE, u64::MAX),
        (H_BYTES_BASE, 1 << 63),
        (H_DIRTY, u64::MAX),
        (SLOTS_OFF + 7 * SLOT_LEN + S_LIVE, u64::MAX),
    ];
    for (at, value) in words {
        for mode in MODES {
            let ctx = format!("word {at} set to {value:#x}");
            let seen = open_and_exercise(&fx, mode, |b| put_u64(b, at, value), &ctx).unwrap();
            assert_eq!(seen.absent, 0, "{mode:?}: {ctx}");
        }
    }
}

#[test]
fn huge_per_process_counters_do_not_break_stats() {
    let fx = fixture();
    for field in [S_EVICTIONS, S_CHECKSUM_FAILURES] {
        for mode in MODES {
            let ctx = format!("{mode:?}: slot counter {field} at u64::MAX in two slots");
            let (_, store) = fx.open_damaged(mode, |b| {
                put_u64(b, SLOTS_OFF + 5 * SLOT_LEN + field, u64::MAX);
                put_u64(b, SLOTS_OFF + 6 * SLOT_LEN + field, u64::MAX);
            });
            let store = store.unwrap();
            let _ = store.stats();
            exercise(&store, &fx, &ctx);
        }
    }
}

#[test]
fn an_eviction_with_the_shared_sweep_hand_at_the_end_of_its_range_does_not_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("full");
    // One chunk of data: five blocks of the class of a 185,000-byte value.
    let opts = Options::new()
        .max_sessions(16)
        .max_file_size((1 << 20) + (200 << 10))
        .max_value_len(300_000);
    let store = Store::open_with(&path, opts).unwrap();
    write_live(&path, H_SWEEP_HAND, &(u64::MAX - 3).to_le_bytes());
    let at = expiry();
    let mut last = None;
    for i in 0..12usize {
        let k = key(i);
        let v = vec![i as u8; 185_000];
        let mut lease = store.try_lease(&k).unwrap().unwrap();
        match lease.commit(&v, at) {
            Ok(()) => last = Some((k, v)),
            Err(StoreError::StoreFull) => {}
            Err(e) => panic!("commit {i}: {e:?}"),
        }
    }
    let (k, v) = last.unwrap();
    assert_eq!(store.get(&k).unwrap().value, v);
    assert!(store.stats().evictions > 0);
}

/// A file's last chunk may be only partly in the file (its length is not a whole number of
/// chunks past the data offset). A class byte set for it, with an entry pointing into it, must
/// not be believed by recovery.
#[test]
fn a_class_on_a_partial_last_chunk_does_not_break_recovery() {
    let fx = fixture();
    let file_len = fx.pristine.len();
    let partial = (file_len - fx.data_off) / CHUNK_LEN;
    let victim = fx.records[4];
    let block = fx.data_off + partial * CHUNK_LEN;
    for mode in [Mode::Clean, Mode::Crashed] {
        let damage = |b: &mut Vec<u8>| {
            // Half a chunk more, as a file grown by a step that is not whole chunks.
            b.resize(file_len + CHUNK_LEN / 2, 0);
            b[CHUNK_TABLE_OFF + partial] = victim.class as u8 + 1;
            // A copy of the victim's record in the partial chunk, and its entry pointing there.
            let rec = b[victim.block..victim.block + RECORD_HEADER + victim.len].to_vec();
            b[block..block + rec.len()].copy_from_slice(&rec);
            put_u64(
                b,
                fx.entry_state_off(victim.entry),
                ((block / REF_UNIT) as u64) << 32,
            );
        };
        let seen = open_and_exercise(&fx, mode, damage, "partial chunk").unwrap();
        assert!(seen.absent <= 1, "{mode:?}");
    }
}

// ---- A huge file length written into a live header ---------------------------------------------

const CHILD_ENV: &str = "MMAP_CORRUPTION_TEST_CHILD";

/// Runs `body` in a child process (this test binary, filtered to `name`): a SIGBUS from
/// touching pages beyond the end of the file would otherwise kill every test of this binary.
fn in_child_process(name: &str, body: impl FnOnce()) {
    if std::env::var_os(CHILD_ENV).is_some() {
        body();
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert!(
        out.status.success(),
        "the child running {name} failed: {:?} (signal {:?})\n{}{}",
        out.status,
        out.status.signal(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
}

#[test]
fn a_file_length_written_into_a_live_header_is_not_believed_beyond_the_file() {
    in_child_process(
        "a_file_length_written_into_a_live_header_is_not_believed_beyond_the_file",
        || {
            let fx = fixture();
            let (path, store) = fx.open_damaged(Mode::Live, |_| {});
            let store = store.unwrap();
            // At most the maximum length, so it passes a check against the mapping's size.
            write_live(&path, H_FILE_LEN, &(fx.max_len as u64).to_le_bytes());
            // New size classes need new chunks, past the end of the file as it really is.
            let at = expiry();
            for (n, len) in [5000usize, 7000, 9000, 11000, 14000, 17000]
                .iter()
                .enumerate()
            {
                let k = format!("grow-{n}").into_bytes();
                let v = vec![n as u8; *len];
                let mut lease = store.try_lease(&k).unwrap().unwrap();
                if lease.commit(&v, at).is_ok() {
                    drop(lease);
                    assert_eq!(store.get(&k).unwrap().value, v);
                }
            }
            let _ = store.verify();
        },
    );
}

// ---- Random writes into a live file while another thread reads -------------------------------

#[test]
fn random_writes_into_a_live_file_never_break_concurrent_readers() {
    let fx = Arc::new(fixture());
    let (path, store) = fx.open_damaged(Mode::Live, |_| {});
    let store = store.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (fx, store, stop) = (fx.clone(), store.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for i in 0..KEYS {
                    let got = store.get(&key(i));
                    assert!(
                        got.is_none() || got == fx.expected[i],
                        "key {i} read a wrong record: {got:?}"
                    );
                    reads += 1;
                }
            }
            reads
        })
    };
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    let mut rng = Rng(0x5EED_0006);
    for _ in 0..3000 {
        let off = random_offset(&mut rng, &fx);
        let n = 1 + rng.below(16).min(fx.pristine.len() - off - 1);
        let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
        f.write_all_at(&bytes, off as u64).unwrap();
        std::thread::yield_now();
    }
    stop.store(true, Ordering::Relaxed);
    let reads = reader.join().expect("the reader panicked");
    assert!(reads > 0);
    let _ = store.verify();
    for i in 0..KEYS {
        let got = store.get(&key(i));
        assert!(got.is_none() || got == fx.expected[i], "key {i}: {got:?}");
    }
}

// ---- Recovery after a crash, then clean closes -------------------------------------------------

/// FORMAT.md: a lone opener recovers only if some process died since the last recovery. After
/// one recovery and a clean close, the next lone open must not recover again: the damage
/// planted in between (which recovery would repair) is still there for `verify` to report.
#[test]
fn a_recovery_clears_the_crash_mark_so_the_next_clean_open_skips_it() {
    let fx = fixture();
    let (path, store) = fx.open_damaged(Mode::Crashed, |_| {});
    drop(store.unwrap()); // recovered, then closed cleanly
    let class = fx.classes()[0];
    write_live(
        &path,
        H_FREE_HEADS + class * 8,
        &(7u64 << 32 | 1).to_le_bytes(),
    );
    let store = Store::open_with(&path, options()).unwrap();
    let problems = store.verify().problems;
    assert!(
        has_problem(&problems, "free list"),
        "the open after a clean close recovered again: {problems:?}"
    );
}
