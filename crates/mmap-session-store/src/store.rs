//! The store: the index of keys, the lease protocol, and the block allocator, all living in the
//! shared mapping. See `FORMAT.md` for the layout and the crash analysis.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::error::{OpenError, StoreError};
use crate::layout::*;
use crate::lease::Lease;
use crate::map::{Map, Wake};
use crate::open::{now_ms, open_or_create, Geometry, Options};
use crate::sys::{self, LockKind};

/// A session store: one memory-mapped file shared by every process that opens the same path.
///
/// Cheap to clone; clones share one mapping. See the crate documentation for an example.
#[derive(Clone, Debug)]
pub struct Store {
    pub(crate) shared: Arc<Shared>,
}

/// What every clone of a [`Store`] shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) path: PathBuf,
    pub(crate) file: File,
    pub(crate) map: Map,
    pub(crate) g: Geometry,
    /// This process's registration slot: its OFD lock on `LOCK_BASE + slot` is its liveness.
    pub(crate) slot: usize,
    /// Tasks of this process waiting for leases.
    #[cfg(feature = "tokio")]
    pub(crate) local: crate::local::LocalWaiters,
    /// Where this process's expiry sweep looks next (per process, so commits do not contend).
    sweep_hand: AtomicU64,
    lease_timeout: Duration,
    /// Serialises growth within this process (the OFD grow lock serialises processes).
    grow: Mutex<()>,
}

/// A committed value and its absolute expiry time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The bytes last committed.
    pub value: Vec<u8>,
    /// When the record stops being returned.
    pub expires_at: SystemTime,
}

/// A snapshot of the store's counters. Counters are summed over every process that ever used
/// the file; live records and bytes are exact after a recovery and kept incrementally after.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Records currently stored (expired ones not yet reclaimed included).
    pub live_records: u64,
    /// Bytes of blocks holding records.
    pub bytes_used: u64,
    /// Bytes of the file reserved on disk (the file's length).
    pub bytes_reserved: u64,
    /// The largest size the file may grow to.
    pub capacity_bytes: u64,
    /// Number of index entries (the most sessions the file can index).
    pub index_entries: u64,
    /// The largest value the file accepts.
    pub max_value_len: u64,
    /// Idle records evicted to make room.
    pub evictions: u64,
    /// Expired records whose space was reclaimed.
    pub expired_reclaimed: u64,
    /// Lease requests that had to wait for another holder.
    pub lease_waits: u64,
    /// Leases taken over from a dead holder or one that held past the lease timeout.
    pub takeovers: u64,
    /// Records that failed verification and were treated as absent.
    pub checksum_failures: u64,
    /// Processes that have the file open now.
    pub processes: u64,
}

/// The hash under which a key is indexed. The file never holds the key itself.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KeyHash {
    pub(crate) hash: [u8; 32],
    pub(crate) tag: u64,
    home: u64,
}

/// Tag of an entry that never held a key: lookups stop here.
pub(crate) const TAG_EMPTY: u64 = 0;
/// Tag of an entry given up by an insert that lost its shard lock; matches no key.
pub(crate) const TAG_VACATED: u64 = 1;

impl KeyHash {
    pub(crate) fn new(key: &[u8]) -> KeyHash {
        let hash = *blake3::hash(key).as_bytes();
        let word = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&hash[at..at + 8]);
            u64::from_le_bytes(b)
        };
        // Real tags have bit 1 set and bit 0 clear, so they never equal EMPTY or VACATED.
        KeyHash {
            hash,
            tag: (word(0) & !3) | 2,
            home: word(8),
        }
    }

    /// A short, non-reversible name for logs.
    pub(crate) fn short(&self) -> String {
        self.hash[..4].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// What reading a record found.
pub(crate) enum ReadOutcome {
    Found(Record),
    Expired,
    /// Failed verification (possibly torn by a concurrent writer), with the reason.
    Invalid(&'static str),
}

/// Outcome of an insert under the shard lock.
enum Inserted {
    Leased(u64, u32),
    Exists(u64),
    Retry,
}

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

pub(crate) fn ms_to_time(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

pub(crate) fn time_to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis().min(u64::MAX as u128) as u64)
}

impl Store {
    /// Opens the store at `path`, creating it with default [`Options`] if it does not exist.
    pub fn open(path: impl AsRef<Path>) -> Result<Store, OpenError> {
        Self::open_with(path, Options::default())
    }

    /// Opens the store at `path`, creating it with `options` if it does not exist.
    ///
    /// Any number of processes and threads may open one path at once. A symbolic link at `path`
    /// is refused, a file of another user is refused unless allowed, and a file that is not a
    /// store of this format gives an error saying which.
    pub fn open_with(path: impl AsRef<Path>, options: Options) -> Result<Store, OpenError> {
        let path = path.as_ref();
        let (file, g) = open_or_create(path, &options)?;
        let io = |source| OpenError::Io {
            path: path.to_owned(),
            source,
        };
        let file_len = file.metadata().map_err(io)?.len().min(g.max_len);
        let map = Map::new(&file, g.max_len, file_len).map_err(io)?;
        // Every live process holds a shared lock on the recovery byte; getting it exclusively
        // proves we are alone, so whatever dead processes left behind can be repaired.
        let alone = sys::try_lock(&file, LOCK_RECOVERY, LockKind::Exclusive).map_err(io)?;
        if !alone {
            // Waits while a solo opener recovers; from then on our shared lock keeps anyone from
            // recovering under our feet.
            sys::lock(&file, LOCK_RECOVERY, LockKind::Shared).map_err(io)?;
        }
        let slot = (0..MAX_SLOTS)
            .find_map(
                |s| match sys::try_lock(&file, LOCK_BASE + s as i64, LockKind::Exclusive) {
                    Ok(true) => Some(Ok(s)),
                    Ok(false) => None,
                    Err(e) => Some(Err(e)),
                },
            )
            .transpose()
            .map_err(io)?
            .ok_or(OpenError::TooManyProcesses(MAX_SLOTS))?;
        let store = Store {
            shared: Arc::new(Shared {
                path: path.to_owned(),
                file,
                map,
                g,
                slot,
                #[cfg(feature = "tokio")]
                local: crate::local::LocalWaiters::default(),
                sweep_hand: AtomicU64::new(u64::from(std::process::id()).wrapping_mul(0x9E37_79B9)),
                lease_timeout: options.lease_timeout,
                grow: Mutex::new(()),
            }),
        };
        let s = &store.shared;
        // A slot still marked in use was left by a process that died without closing the store.
        if s.map.load_u64(s.slot_off(S_IN_USE), Ordering::Acquire) != Some(0) {
            s.map.store_u64(H_DIRTY as u64, 1, Ordering::Release);
        }
        if alone {
            let died = (0..MAX_SLOTS as u64).any(|slot| {
                s.map
                    .load_u64(SLOTS_OFF + slot * SLOT_LEN + S_IN_USE, Ordering::Acquire)
                    != Some(0)
            });
            if died || s.map.load_u64(H_DIRTY as u64, Ordering::Acquire) != Some(0) {
                s.recover();
            }
        }
        let next = s
            .map
            .load_u64(s.slot_off(S_SEQ), Ordering::Acquire)
            .unwrap_or(0);
        s.map
            .store_u64(s.slot_off(S_START), next, Ordering::Release);
        s.map.store_u64(
            s.slot_off(S_PID),
            std::process::id() as u64,
            Ordering::Relaxed,
        );
        s.map.store_u64(s.slot_off(S_IN_USE), 1, Ordering::Release);
        if alone {
            // Downgrade: from now on others may join.
            sys::lock(&s.file, LOCK_RECOVERY, LockKind::Shared).map_err(io)?;
        }
        tracing::debug!(path = %path.display(), slot, alone, "session store opened");
        Ok(store)
    }

    /// The path this store was opened at.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// The last committed value of `key`, read without waiting for or taking its lease.
    ///
    /// `None` if there is no record, it has expired, or it fails verification (which is logged
    /// and counted in [`Stats::checksum_failures`]).
    pub fn get(&self, key: &[u8]) -> Option<Record> {
        let s = &self.shared;
        let kh = KeyHash::new(key);
        let pos = s.lookup(&kh)?;
        let state_off = s.entry_off(pos) + E_STATE;
        let mut last_reason = "";
        for _ in 0..4 {
            let before = s.map.load_u64(state_off, Ordering::Acquire)?;
            let block = state_block(before);
            if block == 0 {
                return None;
            }
            let outcome = s.read_record(block, &kh);
            let after = s.map.load_u64(state_off, Ordering::Acquire)?;
            if state_block(after) != block {
                continue; // a commit replaced the record while we copied it: read again
            }
            match outcome {
                ReadOutcome::Found(r) => return Some(r),
                ReadOutcome::Expired => return None,
                ReadOutcome::Invalid(reason) => last_reason = reason,
            }
        }
        if !last_reason.is_empty() {
            s.report_invalid(&kh, last_reason);
        }
        None
    }

    /// Whether `key` has a record that has not expired, without copying or verifying it (a
    /// cheap pre-check; [`Store::get`] or a lease's read verifies the record itself).
    pub fn contains(&self, key: &[u8]) -> bool {
        self.contains_hashed(&KeyHash::new(key))
    }

    fn contains_hashed(&self, kh: &KeyHash) -> bool {
        let s = &self.shared;
        let Some(pos) = s.lookup(kh) else {
            return false;
        };
        let Some(state) = s
            .map
            .load_u64(s.entry_off(pos) + E_STATE, Ordering::Acquire)
        else {
            return false;
        };
        let block = state_block(state);
        if block == 0 || s.block_class(block).is_none() {
            return false;
        }
        s.map
            .load_u64(block as u64 * REF_UNIT + R_EXPIRES, Ordering::Relaxed)
            .is_some_and(|expires| expires > now_ms())
    }

    /// Takes the busy lease of `key` if nobody holds it, without waiting.
    pub fn try_lease(&self, key: &[u8]) -> Result<Option<Lease>, StoreError> {
        self.try_lease_hashed(KeyHash::new(key))
    }

    fn try_lease_hashed(&self, kh: KeyHash) -> Result<Option<Lease>, StoreError> {
        let s = &self.shared;
        for _ in 0..4 {
            let pos = match s.lookup(&kh) {
                Some(pos) => pos,
                None => match s.insert(&kh, Instant::now()) {
                    // Another inserter holds the shard's lock: that is "busy", not an error.
                    Err(StoreError::LeaseTimeout) => return Ok(None),
                    Err(e) => return Err(e),
                    Ok(Inserted::Leased(pos, token)) => {
                        return Ok(Some(self.lease_at(pos, token, kh)))
                    }
                    Ok(Inserted::Exists(pos)) => pos,
                    Ok(Inserted::Retry) => continue,
                },
            };
            let off = s.entry_off(pos) + E_STATE;
            let Some(token) = s.try_acquire(off)? else {
                return Ok(None);
            };
            if s.map.load_u64(s.entry_off(pos) + E_TAG, Ordering::Acquire) == Some(kh.tag) {
                return Ok(Some(self.lease_at(pos, token, kh)));
            }
            s.release_word(off, token); // the entry was recycled for another key meanwhile
        }
        Ok(None)
    }

    /// Waits until the busy lease of `key` is ours, blocking this thread, or until `deadline`
    /// ([`StoreError::LeaseTimeout`]). Waiters sleep on a futex and are woken by the release;
    /// a lease whose holder process died is taken over within milliseconds.
    pub fn lease_blocking(&self, key: &[u8], deadline: Instant) -> Result<Lease, StoreError> {
        self.lease_hashed_blocking(KeyHash::new(key), deadline)
    }

    pub(crate) fn lease_hashed_blocking(
        &self,
        kh: KeyHash,
        deadline: Instant,
    ) -> Result<Lease, StoreError> {
        let s = &self.shared;
        loop {
            let pos = match s.lookup(&kh) {
                Some(pos) => pos,
                None => match s.insert(&kh, deadline)? {
                    Inserted::Leased(pos, token) => return Ok(self.lease_at(pos, token, kh)),
                    Inserted::Exists(pos) => pos,
                    Inserted::Retry => continue,
                },
            };
            let off = s.entry_off(pos) + E_STATE;
            let token = s.acquire(off, deadline)?;
            if s.map.load_u64(s.entry_off(pos) + E_TAG, Ordering::Acquire) == Some(kh.tag) {
                return Ok(self.lease_at(pos, token, kh));
            }
            s.release_word(off, token);
        }
    }

    /// Waits until the busy lease of `key` is ours, or until `deadline`, without ever blocking a
    /// runtime worker. An uncontended lease is taken without leaving the calling task. Tasks of
    /// one process waiting for one key queue in the process: a lease released by a task of this
    /// process passes straight to the next queued task unless another process waits too, and a
    /// release by another process reaches the queue through one blocking thread per key.
    /// Dropping the future gives the lease back if it was obtained meanwhile.
    ///
    /// Needs a tokio runtime with timers enabled (as `#[tokio::main]` builds).
    #[cfg(feature = "tokio")]
    pub async fn lease(&self, key: &[u8], deadline: Instant) -> Result<Lease, StoreError> {
        self.lease_hashed(KeyHash::new(key), deadline).await
    }

    /// Like [`Store::lease`], but only if `key` has a record that has not expired (checked as
    /// [`Store::contains`] does); otherwise `None` at once, and no lease or index entry is made
    /// for the key. The record can still end while the lease is awaited: read it under the lease.
    ///
    /// For keys that come from outside (a cookie, say): a key that names nothing costs a lookup,
    /// never a lease.
    #[cfg(feature = "tokio")]
    pub async fn lease_existing(
        &self,
        key: &[u8],
        deadline: Instant,
    ) -> Result<Option<Lease>, StoreError> {
        let kh = KeyHash::new(key);
        if !self.contains_hashed(&kh) {
            return Ok(None);
        }
        self.lease_hashed(kh, deadline).await.map(Some)
    }

    #[cfg(feature = "tokio")]
    async fn lease_hashed(&self, kh: KeyHash, deadline: Instant) -> Result<Lease, StoreError> {
        if let Some(lease) = self.try_lease_hashed(kh)? {
            return Ok(lease);
        }
        let rx = self.shared.local.enqueue(self, kh, deadline);
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(Ok(delivery)) => delivery,
            Ok(Err(_)) => Err(StoreError::Io(io::Error::other(
                "the lease waiter was dropped",
            ))),
            Err(_) => Err(StoreError::LeaseTimeout),
        }
    }

    fn lease_at(&self, pos: u64, token: u32, kh: KeyHash) -> Lease {
        let s = &self.shared;
        if let Some(state) = s
            .map
            .load_u64(s.entry_off(pos) + E_STATE, Ordering::Acquire)
        {
            let block = state_block(state);
            if block != 0 && s.block_class(block).is_some() {
                // The lease protects this record header; others only read it.
                s.map.store_u64(
                    block as u64 * REF_UNIT + R_LAST_USED,
                    now_ms(),
                    Ordering::Relaxed,
                );
            }
        }
        Lease::new(self.clone(), pos, token, kh)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }
}

impl Shared {
    pub(crate) fn entry_off(&self, pos: u64) -> u64 {
        self.g.index_off + pos * ENTRY_LEN
    }

    pub(crate) fn slot_off(&self, field: u64) -> u64 {
        SLOTS_OFF + self.slot as u64 * SLOT_LEN + field
    }

    pub(crate) fn count(&self, field: u64, delta: u64) {
        self.map.add_u64(self.slot_off(field), delta);
    }

    fn home(&self, kh: &KeyHash) -> u64 {
        kh.home & (self.g.index_entries - 1)
    }

    /// The positions a key may occupy: up to `MAX_PROBE` entries from its home, wrapping inside
    /// its shard.
    pub(crate) fn window(&self, home: u64) -> impl Iterator<Item = u64> {
        let len = self.g.shard_len();
        let base = home - home % len;
        let start = home - base;
        (0..MAX_PROBE.min(len)).map(move |i| base + (start + i) % len)
    }

    /// Finds the entry holding `kh`'s tag.
    pub(crate) fn lookup(&self, kh: &KeyHash) -> Option<u64> {
        for pos in self.window(self.home(kh)) {
            let tag = self
                .map
                .load_u64(self.entry_off(pos) + E_TAG, Ordering::Acquire)?;
            if tag == kh.tag {
                return Some(pos);
            }
            if tag == TAG_EMPTY {
                return None;
            }
        }
        None
    }

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

    fn new_token(&self) -> u32 {
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
                return Ok(Some(token));
            }
        }
    }

    fn load_word(&self, off: u64) -> Result<u64, StoreError> {
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
                    self.count(S_TAKEOVERS, 1);
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
            if self.map.cas_u64(off, s, state(state_block(s), 0)).is_ok() {
                if state_token(s) & TOKEN_WAITERS != 0 {
                    self.map.wake(off, 1);
                }
                return true;
            }
        }
    }

    /// Whether the process that issued `token` is alive, as the kernel tells it: its slot's
    /// registration lock is held, and the token was issued by the slot's current owner (tokens
    /// from before the owner's first sequence number belong to a dead predecessor).
    pub(crate) fn holder_alive(&self, token: u32) -> Result<bool, StoreError> {
        let slot = token_slot(token);
        if slot >= MAX_SLOTS {
            return Ok(false);
        }
        if slot != self.slot && !sys::is_locked_by_other(&self.file, LOCK_BASE + slot as i64)? {
            return Ok(false);
        }
        let base = SLOTS_OFF + slot as u64 * SLOT_LEN;
        let start = self
            .map
            .load_u64(base + S_START, Ordering::Acquire)
            .unwrap_or(0);
        let next = self
            .map
            .load_u64(base + S_SEQ, Ordering::Acquire)
            .unwrap_or(0);
        let issued = next.wrapping_sub(start);
        let age = u64::from(token & TOKEN_SEQ_MASK).wrapping_sub(start) & u64::from(TOKEN_SEQ_MASK);
        // After 2^22 tokens every number is "recent": fall back to the lease timeout.
        Ok(issued > u64::from(TOKEN_SEQ_MASK) || age < issued)
    }

    /// Inserts an entry for `kh` under its shard's lock, leasing it; or finds it there.
    fn insert(&self, kh: &KeyHash, deadline: Instant) -> Result<Inserted, StoreError> {
        let shard = self.home(kh) / self.g.shard_len();
        let lock_off = self.g.shard_locks_off() + shard * 8;
        let lock = self.acquire(lock_off, deadline)?;
        let result = self.insert_locked(kh, lock_off, lock);
        self.release_word(lock_off, lock);
        result
    }

    fn insert_locked(
        &self,
        kh: &KeyHash,
        lock_off: u64,
        lock: u32,
    ) -> Result<Inserted, StoreError> {
        for _ in 0..4 {
            if let Some(pos) = self.lookup(kh) {
                return Ok(Inserted::Exists(pos));
            }
            let mut chosen = None;
            for pos in self.window(self.home(kh)) {
                let tag = self
                    .map
                    .load_u64(self.entry_off(pos) + E_TAG, Ordering::Acquire);
                let st = self
                    .map
                    .load_u64(self.entry_off(pos) + E_STATE, Ordering::Acquire);
                let (Some(tag), Some(st)) = (tag, st) else {
                    return Err(StoreError::Corrupted("index outside the file"));
                };
                // Vacant, or an insert whose lock holder died (or was deposed) mid-way: only the
                // holder of this shard's lock creates an entry with an empty tag.
                if st == 0 || (tag == TAG_EMPTY && state_block(st) == 0) {
                    chosen = Some((pos, tag, st));
                    break;
                }
            }
            let Some((pos, tag, st)) = chosen else {
                if self.evict_in_window(kh)? {
                    continue;
                }
                return Err(StoreError::StoreFull);
            };
            let token = self.new_token();
            let state_off = self.entry_off(pos) + E_STATE;
            if self.map.cas_u64(state_off, st, state(0, token)).is_err() {
                continue;
            }
            let tag_off = self.entry_off(pos) + E_TAG;
            let tagged = self.map.cas_u64(tag_off, tag, kh.tag).is_ok();
            // A stopped process can lose the shard lock to a take-over; its insert must not
            // stand, or two entries could hold one key.
            let still_locked =
                self.map.load_u64(lock_off, Ordering::Acquire).map(holder) == Some(lock);
            if tagged && still_locked {
                return Ok(Inserted::Leased(pos, token));
            }
            if tagged {
                let _ = self.map.cas_u64(tag_off, kh.tag, TAG_VACATED);
            }
            self.release_word(state_off, token);
            if !still_locked {
                return Ok(Inserted::Retry);
            }
        }
        Ok(Inserted::Retry)
    }

    /// Makes room in `kh`'s probe window by evicting an idle record there: an expired one if
    /// any, else the least recently used. False if every entry is leased.
    fn evict_in_window(&self, kh: &KeyHash) -> Result<bool, StoreError> {
        let now = now_ms();
        let mut best: Option<(u64, u64, u64)> = None; // (last_used, pos, state)
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
            let used = if expires <= now {
                0
            } else {
                self.map
                    .load_u64(at + R_LAST_USED, Ordering::Relaxed)
                    .unwrap_or(0)
            };
            if best.is_none_or(|(u, _, _)| used < u) {
                best = Some((used, pos, st));
            }
        }
        let Some((used, pos, st)) = best else {
            return Ok(false);
        };
        let expired = used == 0;
        Ok(self.remove_idle(pos, st, if expired { S_EXPIRED } else { S_EVICTIONS }))
    }

    /// Removes the record of an idle entry observed in state `st`, by leasing it first. True if
    /// the record was removed.
    pub(crate) fn remove_idle(&self, pos: u64, st: u64, counter: u64) -> bool {
        let state_off = self.entry_off(pos) + E_STATE;
        let token = self.new_token();
        if self
            .map
            .cas_u64(state_off, st, state(state_block(st), token))
            .is_err()
        {
            return false;
        }
        let removed = self.publish(state_off, token, 0).is_ok();
        self.release_word(state_off, token);
        if removed {
            self.count(counter, 1);
        }
        removed
    }

    /// Replaces the record of an entry whose lease `token` holds by `block` (0: no record), then
    /// frees the old block. Fails with `LeaseLost` (and changes nothing) if the lease was taken
    /// over. This single compare-and-swap is the commit point of every change.
    pub(crate) fn publish(&self, state_off: u64, token: u32, block: u32) -> Result<(), StoreError> {
        let old = loop {
            let s = self.load_word(state_off)?;
            if holder(s) != token {
                return Err(StoreError::LeaseLost);
            }
            if self
                .map
                .cas_u64(state_off, s, state(block, state_token(s)))
                .is_ok()
            {
                break state_block(s);
            }
        };
        let size = |b: u32| self.block_class(b).map_or(0, class_size);
        self.count(S_BYTES, size(block).wrapping_sub(size(old)));
        self.count(
            S_LIVE,
            u64::from(block != 0).wrapping_sub(u64::from(old != 0)),
        );
        if old != 0 {
            self.free_block(old);
        }
        Ok(())
    }

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

    /// Copies the record in `block` out and verifies it belongs to `kh` and is intact.
    pub(crate) fn read_record(&self, block: u32, kh: &KeyHash) -> ReadOutcome {
        let Some(class) = self.block_class(block) else {
            return ReadOutcome::Invalid("record reference outside the data area");
        };
        let off = block as u64 * REF_UNIT;
        let mut header = [0u8; RECORD_HEADER as usize];
        if !self.map.read(off, &mut header) {
            return ReadOutcome::Invalid("record outside the file");
        }
        let (magic, len, expires, sum) = parse_record_header(&header);
        if magic != RECORD_MAGIC {
            return ReadOutcome::Invalid("bad record magic");
        }
        if len as u64 > (class_size(class) - RECORD_HEADER).min(self.g.max_value) {
            return ReadOutcome::Invalid("record length larger than its block");
        }
        if header[R_KEY as usize..] != kh.hash {
            return ReadOutcome::Invalid("record belongs to another key");
        }
        let Some(value) = self.map.read_vec(off + RECORD_HEADER, len as usize) else {
            return ReadOutcome::Invalid("record outside the file");
        };
        if record_checksum(&header, &value) != sum {
            return ReadOutcome::Invalid("record checksum mismatch");
        }
        if expires <= now_ms() {
            return ReadOutcome::Expired;
        }
        ReadOutcome::Found(Record {
            value,
            expires_at: ms_to_time(expires),
        })
    }

    pub(crate) fn report_invalid(&self, kh: &KeyHash, reason: &'static str) {
        self.count(S_CHECKSUM_FAILURES, 1);
        tracing::warn!(key = %kh.short(), reason, "session record failed verification; treating it as absent");
    }

    /// Writes a record for `kh` into a fresh block and returns the block (not yet published).
    pub(crate) fn write_record(
        &self,
        kh: &KeyHash,
        value: &[u8],
        expires_ms: u64,
    ) -> Result<u32, StoreError> {
        let max = self.g.max_value as usize;
        if value.len() > max {
            return Err(StoreError::TooLarge {
                len: value.len(),
                max,
            });
        }
        let class = class_for(RECORD_HEADER + value.len() as u64).ok_or(StoreError::TooLarge {
            len: value.len(),
            max,
        })?;
        let block = self.alloc(class)?;
        let mut header = [0u8; RECORD_HEADER as usize];
        header[..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        header[R_LEN as usize..R_LEN as usize + 4]
            .copy_from_slice(&(value.len() as u32).to_le_bytes());
        header[R_EXPIRES as usize..R_EXPIRES as usize + 8]
            .copy_from_slice(&expires_ms.to_le_bytes());
        header[R_LAST_USED as usize..R_LAST_USED as usize + 8]
            .copy_from_slice(&now_ms().to_le_bytes());
        header[R_KEY as usize..].copy_from_slice(&kh.hash);
        let sum = record_checksum(&header, value);
        header[R_CHECKSUM as usize..R_CHECKSUM as usize + 8].copy_from_slice(&sum.to_le_bytes());
        let off = block as u64 * REF_UNIT;
        if !(self.map.write(off + RECORD_HEADER, value) && self.map.write(off, &header)) {
            self.free_block(block);
            return Err(StoreError::Corrupted("allocated block outside the file"));
        }
        Ok(block)
    }

    /// Takes a block of `class`: from its free list, else from a new chunk, else by evicting.
    fn alloc(&self, class: usize) -> Result<u32, StoreError> {
        for _ in 0..8 {
            if let Some(block) = self.pop(class) {
                return Ok(block);
            }
            if let Some(block) = self.claim_chunk(class)? {
                return Ok(block);
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

    fn free_head_off(class: usize) -> u64 {
        (H_FREE_HEADS + class * 8) as u64
    }

    /// Pushes the chain `first ..= last` (already linked) onto `class`'s free list.
    fn push(&self, class: usize, first: u32, last: u32) {
        let head_off = Self::free_head_off(class);
        loop {
            let Some(h) = self.map.load_u64(head_off, Ordering::Acquire) else {
                return;
            };
            self.map
                .store_u64(last as u64 * REF_UNIT, h as u32 as u64, Ordering::Relaxed);
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

    /// Claims the next unused chunk for `class`, growing the file if needed; returns its first
    /// block and puts the others on the free list. `None` when the file is at its maximum or the
    /// disk is full.
    fn claim_chunk(&self, class: usize) -> Result<Option<u32>, StoreError> {
        loop {
            let Some(n) = self
                .map
                .load_u64(H_CHUNKS_CLAIMED as u64, Ordering::Acquire)
            else {
                return Ok(None);
            };
            if n >= self.g.max_chunks() {
                return Ok(None);
            }
            let start = self.g.data_off + n * CHUNK_LEN;
            if !self.ensure_len(start + CHUNK_LEN)? {
                return Ok(None);
            }
            let table = CHUNK_TABLE_OFF + n;
            let won = self.map.cas_u8(table, 0, class as u8 + 1);
            self.map.max_u64(H_CHUNKS_CLAIMED as u64, n + 1);
            if !won {
                continue;
            }
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
                self.push(class, block_ref(1), block_ref(count - 1));
            }
            return Ok(Some(block_ref(0)));
        }
    }

    /// Makes sure the file is at least `len` bytes, reserving the space on disk. False if the
    /// disk is full.
    fn ensure_len(&self, len: u64) -> Result<bool, StoreError> {
        if self.map.in_file(0, len) {
            return Ok(true);
        }
        let _in_process = self.grow.lock().unwrap_or_else(|p| p.into_inner());
        sys::lock(&self.file, LOCK_GROW, LockKind::Exclusive)?;
        let result = self.grow_locked(len);
        let _ = sys::unlock(&self.file, LOCK_GROW);
        result
    }

    fn grow_locked(&self, len: u64) -> Result<bool, StoreError> {
        let current = self.map.file_len();
        if current >= len {
            return Ok(true);
        }
        // Grow by a quarter of the data area (between 4 and 64 MiB), so growth is rare but a
        // small store stays small.
        let data = current.saturating_sub(self.g.data_off);
        let step = (data / 4).clamp(4 * CHUNK_LEN, 64 * CHUNK_LEN);
        let mut target = len.max(current + step).min(self.g.max_len);
        loop {
            match sys::reserve(&self.file, current, target - current) {
                Ok(()) => break,
                Err(e) if is_no_space(&e) && target > len => target = len,
                Err(e) if is_no_space(&e) => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
        self.map
            .store_u64(H_FILE_LEN as u64, target, Ordering::Release);
        self.map.note_file_len(target);
        tracing::debug!(from = current, to = target, "session store file grown");
        Ok(true)
    }

    /// Looks at a bounded sample of entries for an idle record of `class` to evict: an expired
    /// one if seen, else the least recently used of the sample.
    fn evict_for(&self, class: usize) -> bool {
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
        let mut best: Option<(u64, u64, u64)> = None;
        let mut seen = 0;
        for i in 0..SAMPLE {
            let pos = hand.wrapping_add(i) & (self.g.index_entries - 1);
            let Some((st, block, _)) = self.idle_record(pos).filter(|r| r.2 == class) else {
                continue;
            };
            let at = block as u64 * REF_UNIT;
            let expires = self
                .map
                .load_u64(at + R_EXPIRES, Ordering::Relaxed)
                .unwrap_or(0);
            if expires <= now && self.remove_idle(pos, st, S_EXPIRED) {
                return true;
            }
            let used = self
                .map
                .load_u64(at + R_LAST_USED, Ordering::Relaxed)
                .unwrap_or(0);
            if best.is_none_or(|(u, _, _)| used < u) {
                best = Some((used, pos, st));
            }
            seen += 1;
            if seen >= ENOUGH {
                break;
            }
        }
        best.is_some_and(|(_, pos, st)| self.remove_idle(pos, st, S_EVICTIONS))
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
                self.remove_idle(pos, st, S_EXPIRED);
            }
        }
    }

    /// Repairs what dead processes left behind. Runs only when no other process has the file
    /// open: clears every lease and shard lock, drops entries whose record reference is
    /// invalid, rebuilds the free lists from the blocks no entry uses (reclaiming space leaked
    /// by processes killed between allocation and commit), and recounts live records and bytes.
    fn recover(&self) {
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
            if st != state(keep, 0) {
                self.map
                    .store_u64(off + E_STATE, state(keep, 0), Ordering::Relaxed);
            }
        }
        for class in 0..CLASS_COUNT {
            self.map
                .store_u64(Self::free_head_off(class), 0, Ordering::Relaxed);
        }
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

    /// The tag derived from the key hash stored in a record's header.
    pub(crate) fn record_tag(&self, block: u32) -> Option<u64> {
        let mut key = [0u8; 32];
        if !self.map.read(block as u64 * REF_UNIT + R_KEY, &mut key) {
            return None;
        }
        let mut b = [0u8; 8];
        b.copy_from_slice(&key[..8]);
        Some((u64::from_le_bytes(b) & !3) | 2)
    }

    fn stats(&self) -> Stats {
        let load = |off: u64| self.map.load_u64(off, Ordering::Relaxed).unwrap_or(0);
        let mut st = Stats {
            bytes_reserved: self.map.file_len(),
            capacity_bytes: self.g.max_len,
            index_entries: self.g.index_entries,
            max_value_len: self.g.max_value,
            ..Stats::default()
        };
        let mut live = load(H_LIVE_BASE as u64);
        let mut bytes = load(H_BYTES_BASE as u64);
        for slot in 0..MAX_SLOTS as u64 {
            let base = SLOTS_OFF + slot * SLOT_LEN;
            live = live.wrapping_add(load(base + S_LIVE));
            bytes = bytes.wrapping_add(load(base + S_BYTES));
            st.evictions = st.evictions.saturating_add(load(base + S_EVICTIONS));
            st.lease_waits = st.lease_waits.saturating_add(load(base + S_LEASE_WAITS));
            st.takeovers = st.takeovers.saturating_add(load(base + S_TAKEOVERS));
            st.checksum_failures = st
                .checksum_failures
                .saturating_add(load(base + S_CHECKSUM_FAILURES));
            st.expired_reclaimed = st.expired_reclaimed.saturating_add(load(base + S_EXPIRED));
            let in_use = load(base + S_IN_USE) != 0;
            if slot as usize == self.slot
                || (in_use
                    && sys::is_locked_by_other(&self.file, LOCK_BASE + slot as i64)
                        .unwrap_or(false))
            {
                st.processes += 1;
            }
        }
        st.live_records = (live as i64).max(0) as u64;
        st.bytes_used = (bytes as i64).max(0) as u64;
        st
    }
}

impl Drop for Shared {
    /// A clean close: the slot is no longer in use, so the next solo open need not recover.
    fn drop(&mut self) {
        self.map
            .store_u64(self.slot_off(S_IN_USE), 0, Ordering::Release);
    }
}

fn is_no_space(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull
        || matches!(
            e.raw_os_error(),
            Some(libc::ENOSPC) | Some(libc::EFBIG) | Some(libc::EDQUOT)
        )
}

/// Splits a record header into (magic, value length, expiry ms, checksum).
pub(crate) fn parse_record_header(h: &[u8; RECORD_HEADER as usize]) -> (u32, u32, u64, u64) {
    let u32_at = |at: u64| {
        let at = at as usize;
        u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]])
    };
    let u64_at = |at: u64| {
        let at = at as usize;
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[at..at + 8]);
        u64::from_le_bytes(b)
    };
    (
        u32_at(R_MAGIC),
        u32_at(R_LEN),
        u64_at(R_EXPIRES),
        u64_at(R_CHECKSUM),
    )
}

/// The checksum of a record: its length, expiry, key hash and value (not the last-used stamp,
/// which the lease holder updates in place).
pub(crate) fn record_checksum(header: &[u8; RECORD_HEADER as usize], value: &[u8]) -> u64 {
    // Two one-shot hashes (the small fields seed the value's) cost far less than a streaming
    // hasher's setup for the small values sessions usually are.
    let mut fields = [0u8; 12 + 32];
    fields[..12].copy_from_slice(&header[R_LEN as usize..R_LAST_USED as usize]);
    fields[12..].copy_from_slice(&header[R_KEY as usize..]);
    let seed = xxhash_rust::xxh3::xxh3_64(&fields);
    xxhash_rust::xxh3::xxh3_64_with_seed(value, seed)
}
