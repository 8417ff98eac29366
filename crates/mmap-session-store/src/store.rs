//! The store: the index of keys, the lease protocol, and the block allocator, all living in the
//! shared mapping. See `FORMAT.md` for the layout and the crash analysis.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::durability::{Durability, Syncer, MIN_PERIOD};
use crate::error::{OpenError, StoreError};
use crate::index::{Inserted, KeyHash};
use crate::layout::*;
use crate::lease::Lease;
use crate::map::Map;
use crate::open::{now_ms, open_or_create, Geometry, Options};
use crate::record::ReadOutcome;
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
    pub(crate) map: Arc<Map>,
    pub(crate) g: Geometry,
    /// This process's registration slot: its OFD lock on `LOCK_BASE + slot` is its liveness.
    pub(crate) slot: usize,
    /// Tasks of this process waiting for leases.
    #[cfg(feature = "tokio")]
    pub(crate) local: crate::local::LocalWaiters,
    /// Where this process's expiry sweep looks next (per process, so commits do not contend).
    pub(crate) sweep_hand: AtomicU64,
    pub(crate) lease_timeout: Duration,
    /// Serialises growth by writing zeros within this process, on filesystems without
    /// `fallocate` (the OFD grow lock serialises processes).
    pub(crate) grow: Mutex<()>,
    /// This very value, as the `Store` that internal holders hand to waiting tasks.
    pub(crate) me: std::sync::Weak<Shared>,
    /// `sys::fork_generation()` at open: a forked child may not use this registration.
    forked_at: u64,
    /// When this process forces its changes to the disk, and the thread that does it
    /// periodically.
    pub(crate) syncer: crate::durability::Syncer,
}

/// The shortest lease timeout accepted: a waiter takes over a live holder's lease once it has
/// watched it this long, so zero would let anyone take a live lease at once.
pub(crate) const MIN_LEASE_TIMEOUT: Duration = Duration::from_millis(1);

/// How long a task queued behind a lease holder of its own process waits for that holder's
/// hand-over before its queue also watches the key in the file (see `lease_hashed`).
#[cfg(feature = "tokio")]
const LOCAL_PATIENCE: Duration = Duration::from_millis(50);

/// How many times `get` reads a record that concurrent commits keep replacing.
const GET_ATTEMPTS: u32 = 1000;

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
        if options.lease_timeout < MIN_LEASE_TIMEOUT {
            return Err(OpenError::InvalidOptions(format!(
                "lease_timeout must be at least {MIN_LEASE_TIMEOUT:?} (a waiter takes over a live \
                 holder's lease once it has waited this long)"
            )));
        }
        if let Durability::Periodic(period) = options.durability {
            if period < MIN_PERIOD {
                return Err(OpenError::InvalidOptions(format!(
                    "a periodic durability period must be at least {MIN_PERIOD:?}"
                )));
            }
        }
        let (file, g) = open_or_create(path, &options)?;
        let io = |source| OpenError::Io {
            path: path.to_owned(),
            source,
        };
        // Only the length the header records is ever used: a grower killed between reserving
        // space and recording it leaves the file longer, and space beyond the recorded length
        // would be invisible to processes that opened earlier.
        let map = Arc::new(Map::new(&file, g.max_len, HEADER_LEN).map_err(io)?);
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
        let syncer = Syncer::start(options.durability, &map).map_err(io)?;
        let store = Store {
            shared: Arc::new_cyclic(|me| Shared {
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
                me: me.clone(),
                forked_at: sys::fork_generation(),
                syncer,
            }),
        };
        let s = &store.shared;
        // A slot still marked in use was left by a process that died without closing the store.
        let predecessor_died = s.map.load_u64(s.slot_off(S_IN_USE), Ordering::Acquire) != Some(0);
        if predecessor_died {
            s.map.store_u64(H_DIRTY as u64, 1, Ordering::Release);
            failpoint!("open.slot_marked_dirty");
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
        if predecessor_died && !alone {
            s.reclaim_slot();
        }
        // From here on, tokens of this slot are ours and alive.
        if !sys::try_lock(&s.file, LOCK_READY_BASE + slot as i64, LockKind::Exclusive)
            .map_err(io)?
        {
            return Err(io(io::Error::other(
                "the ready lock of a free process slot is held by another process",
            )));
        }
        s.map.store_u64(
            s.slot_off(S_PID),
            std::process::id() as u64,
            Ordering::Relaxed,
        );
        s.map.store_u64(s.slot_off(S_IN_USE), 1, Ordering::Release);
        s.mark_metadata();
        if alone {
            // Downgrade: from now on others may join.
            sys::lock(&s.file, LOCK_RECOVERY, LockKind::Shared).map_err(io)?;
        }
        tracing::debug!(path = %path.display(), slot, alone, durability = ?options.durability, "session store opened");
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
        // A commit that replaces the record while we copy it makes us read again. Commits are
        // far rarer than a copy is long, so this ends at once in practice; the bound only
        // keeps a pathological writer from holding a reader forever.
        for attempt in 0..GET_ATTEMPTS {
            if attempt >= 8 {
                std::thread::yield_now();
            }
            let before = s.map.load_u64(state_off, Ordering::Acquire)?;
            let block = state_block(before);
            if block == 0 {
                return None;
            }
            let outcome = s.read_record(block, &kh);
            failpoint!("store.get.copied");
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
        s.check_not_forked()?;
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
            s.release_internal(off, token); // the entry was recycled for another key meanwhile
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
        s.check_not_forked()?;
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
            s.release_internal(off, token);
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
        let mut rx = self.shared.local.enqueue(self, kh, deadline);
        // A task queued behind a holder of this process relies on that holder's release. If
        // the holder keeps the lease for long (it may be stalled, and another process may take
        // the lease over and release it), the queue gets a watcher of its own, which waits in
        // the file like any other process would.
        let nudge = Instant::now() + LOCAL_PATIENCE;
        if nudge < deadline {
            match tokio::time::timeout_at(nudge.into(), &mut rx).await {
                Ok(Ok(delivery)) => return delivery,
                Ok(Err(_)) => {
                    return Err(StoreError::Io(io::Error::other(
                        "the lease waiter was dropped",
                    )))
                }
                Err(_) => self.shared.local.ensure_watcher(self, &kh),
            }
        }
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

    /// Records the file's gauges through the [`metrics`](https://docs.rs/metrics) facade, from
    /// [`Store::stats`]: `mmap_session_store_live_sessions`, `mmap_session_store_used_bytes`,
    /// `mmap_session_store_file_bytes` and `mmap_session_store_capacity_bytes`. Nothing is
    /// recorded without a recorder. `mmap-session`'s layer calls it every second; call it
    /// yourself (before each scrape, say) when using the store without the layer.
    ///
    /// The store's counters (take-overs, evictions, expired records reclaimed, checksum
    /// failures) are recorded as the events happen, by the process they happen in.
    pub fn record_gauges(&self) {
        crate::metrics::gauges(&self.shared.stats());
    }

    /// The durability this process opened the store with ([`Options::durability`]).
    pub fn durability(&self) -> Durability {
        self.shared.syncer.mode
    }

    /// How many times forcing changes to the disk failed in this process since it opened the
    /// store: periodic passes (logged; the changes stay in the page cache and the next pass
    /// does not retry them) and commits (also returned as [`StoreError::Sync`]). Not counted
    /// in the file: each process has its own.
    pub fn sync_failures(&self) -> u64 {
        self.shared.sync_failures()
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

impl Shared {
    /// `Err(Forked)` in a child forked after the store was opened.
    #[inline]
    pub(crate) fn check_not_forked(&self) -> Result<(), StoreError> {
        if sys::fork_generation() == self.forked_at {
            Ok(())
        } else {
            Err(StoreError::Forked)
        }
    }
}

impl Drop for Shared {
    /// A clean close: the slot is no longer in use, so the next solo open need not recover.
    /// (Not in a forked child: the slot is its parent's.)
    fn drop(&mut self) {
        let forked = self.check_not_forked().is_err();
        // The last periodic pass runs before the slot is marked closed.
        self.syncer.stop(forked);
        if forked {
            return;
        }
        self.map
            .store_u64(self.slot_off(S_IN_USE), 0, Ordering::Release);
    }
}

#[cfg(feature = "failpoints")]
impl Store {
    /// Test hook (only with the `failpoints` feature): runs `f` in a child forked from this
    /// single-threaded process, which ends with `_exit(f())`; returns its exit code.
    #[doc(hidden)]
    pub fn in_forked_child(f: impl FnOnce() -> i32) -> std::io::Result<i32> {
        sys::in_forked_child(f)
    }

    /// Test hook (only with the `failpoints` feature): advances this process's lease sequence
    /// by `n`, as issuing `n` lease tokens would, so that tests can reach a wrap of the sequence.
    #[doc(hidden)]
    pub fn burn_lease_tokens(&self, n: u64) {
        let s = &self.shared;
        s.map.add_u64(s.slot_off(S_SEQ), n);
    }
}
