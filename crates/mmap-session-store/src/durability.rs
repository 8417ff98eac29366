//! When committed data is forced to the disk: never (the kernel writes the mapping back when it
//! likes), by a background thread at most every so often, or before a commit returns.
//! FORMAT.md, "Durability".

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::StoreError;
use crate::layout::{CHUNK_LEN, CHUNK_TABLE_OFF, ENTRY_LEN, E_STATE, REF_UNIT};
use crate::map::Map;
use crate::store::Shared;

/// When this process forces what it commits to the disk. A choice of each process, not of the
/// file: it applies whether the process creates the file or opens an existing one, and
/// processes sharing a file may choose differently.
///
/// Whatever the choice, a *process* crash loses nothing committed: the data is in the shared
/// page cache the moment `commit` returns. The choice is about a crash of the machine (power
/// loss, kernel panic), where only what reached the disk survives. FORMAT.md ("Durability")
/// says exactly what each setting guarantees.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Durability {
    /// Nothing is forced: the kernel writes changed pages back on its own schedule (on Linux,
    /// within about 30 s by default). A power loss may lose any change made since. No system
    /// call on the commit path. The default.
    #[default]
    Never,
    /// A background thread of this process (one per opened store, stopped when the last handle
    /// is dropped) `msync`s the range of the file this process changed since its last pass, at
    /// most once per period and only when something changed; a last pass runs when the store is
    /// closed. A power loss loses at most about one period of this process's changes (plus the
    /// time the disk takes). Commits cost a few atomic instructions more.
    Periodic(Duration),
    /// `commit` and `remove` return only once the change is on the disk: the file is
    /// `fdatasync`ed before a new record is published and again after, so that a power loss
    /// keeps every acknowledged change and leaves a key that was being committed at its old or
    /// its new value. Costs two disk flushes per commit and one per removal.
    OnCommit,
}

/// The shortest period accepted for [`Durability::Periodic`].
pub(crate) const MIN_PERIOD: Duration = Duration::from_millis(1);

/// An empty dirty range: no page below `u32::MAX`, none above 0.
const EMPTY: u64 = (u32::MAX as u64) << 32;

/// The name of the background thread (as `/proc/<pid>/task/*/comm` shows it).
const SYNC_THREAD: &str = "mmap-sess-sync";

/// Pages are tracked in 4 KiB units (the smallest page size the store supports).
const PAGE: u64 = 4096;

/// What the background thread and the store share: the range of the file this process dirtied
/// since the last pass, packed into one word (first page in the high half, one past the last
/// page in the low half), so that widening it and taking it are each one atomic operation.
#[derive(Debug)]
pub(crate) struct Dirty {
    range: AtomicU64,
    /// Syncs that failed in this process (periodic passes and commits).
    failures: AtomicU64,
    /// Set to stop the thread; the condition variable wakes it early for that.
    stop: Mutex<bool>,
    wake: Condvar,
}

impl Dirty {
    fn new() -> Dirty {
        Dirty {
            range: AtomicU64::new(EMPTY),
            failures: AtomicU64::new(0),
            stop: Mutex::new(false),
            wake: Condvar::new(),
        }
    }

    /// Widens the dirty range to cover `off..off + len`. A load when it already does (the
    /// common case once a few commits ran), else a compare-and-swap.
    #[inline]
    pub(crate) fn mark(&self, off: u64, len: u64) {
        let first = (off / PAGE).min(u32::MAX as u64 - 1);
        let end = (off.saturating_add(len).div_ceil(PAGE)).min(u32::MAX as u64);
        let mut cur = self.range.load(Ordering::Relaxed);
        loop {
            let new = ((cur >> 32).min(first) << 32) | (cur & 0xFFFF_FFFF).max(end);
            if new == cur {
                return;
            }
            match self
                .range
                .compare_exchange_weak(cur, new, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(seen) => cur = seen,
            }
        }
    }

    /// Takes the dirty range (bytes), leaving it empty; `None` if nothing was dirtied.
    fn take(&self) -> Option<(u64, u64)> {
        let r = self.range.swap(EMPTY, Ordering::Acquire);
        let (first, end) = (r >> 32, r & 0xFFFF_FFFF);
        (first < end).then(|| (first * PAGE, (end - first) * PAGE))
    }

    fn failed(&self, what: &str, e: &io::Error) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        crate::metrics::sync_failure();
        tracing::error!(
            error = %e,
            failures = n,
            "syncing the session store file to disk failed ({what}); recent changes may not \
             survive a power loss: check the disk and the kernel log"
        );
    }
}

/// The durability machinery of one opened store.
#[derive(Debug)]
pub(crate) struct Syncer {
    pub(crate) mode: Durability,
    pub(crate) dirty: Arc<Dirty>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Syncer {
    /// Starts the background thread for `Periodic`; nothing for the other modes.
    pub(crate) fn start(mode: Durability, map: &Arc<Map>) -> io::Result<Syncer> {
        let dirty = Arc::new(Dirty::new());
        let thread = match mode {
            Durability::Periodic(period) => {
                let (map, d) = (Arc::clone(map), Arc::clone(&dirty));
                Some(
                    std::thread::Builder::new()
                        .name(SYNC_THREAD.into())
                        .spawn(move || run(&map, &d, period))?,
                )
            }
            Durability::Never | Durability::OnCommit => None,
        };
        Ok(Syncer {
            mode,
            dirty,
            thread: Mutex::new(thread),
        })
    }

    /// Stops the background thread after its last pass. In a forked child (which has no such
    /// thread) the handle is forgotten instead.
    pub(crate) fn stop(&self, forked: bool) {
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(handle) = handle else { return };
        if forked {
            std::mem::forget(handle);
            return;
        }
        *self.dirty.stop.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.dirty.wake.notify_all();
        if handle.join().is_err() {
            tracing::error!("the session store's sync thread panicked");
        }
    }
}

/// The background thread: a pass at most every `period`, and a last one when stopped.
fn run(map: &Map, dirty: &Dirty, period: Duration) {
    loop {
        let next = Instant::now() + period;
        let mut stop = dirty.stop.lock().unwrap_or_else(|p| p.into_inner());
        while !*stop {
            let now = Instant::now();
            if now >= next {
                break;
            }
            stop = dirty
                .wake
                .wait_timeout(stop, next - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let stopping = *stop;
        drop(stop);
        if let Some((off, len)) = dirty.take() {
            if let Err(e) = map.sync(off, len) {
                dirty.failed("periodic msync", &e);
            }
        }
        if stopping {
            return;
        }
    }
}

impl Shared {
    /// Called after a commit wrote its record into `block` and before it publishes it: with
    /// `OnCommit`, the record, its chunk's class byte and any growth of the file reach the disk
    /// first, so that the published reference never points at bytes the disk lacks. On error
    /// nothing is published.
    pub(crate) fn sync_before_publish(&self) -> Result<(), StoreError> {
        if self.syncer.mode != Durability::OnCommit {
            return Ok(());
        }
        self.file.sync_data().map_err(|source| {
            self.syncer.dirty.failed("before a commit", &source);
            StoreError::Sync {
                published: false,
                source,
            }
        })
    }

    /// Called after the compare-and-swap that published `block` (0 for a removal) in the entry
    /// at `state_off`, before the old block is freed (freeing writes into it): with `OnCommit`
    /// the new state word reaches the disk (an error says the change is published but perhaps
    /// not durable); with `Periodic` the pages are marked for the next pass.
    pub(crate) fn after_publish(&self, state_off: u64, block: u32) -> Result<(), StoreError> {
        match self.syncer.mode {
            Durability::Never => Ok(()),
            Durability::OnCommit => self.file.sync_data().map_err(|source| {
                self.syncer.dirty.failed("after a commit", &source);
                StoreError::Sync {
                    published: true,
                    source,
                }
            }),
            Durability::Periodic(_) => {
                let d = &self.syncer.dirty;
                d.mark(state_off - E_STATE, ENTRY_LEN);
                if block != 0 {
                    let off = block as u64 * REF_UNIT;
                    if let Some(class) = self.block_class(block) {
                        d.mark(off, crate::layout::class_size(class));
                    }
                    let chunk = (off - self.g.data_off.min(off)) / CHUNK_LEN;
                    d.mark(CHUNK_TABLE_OFF + chunk, 1);
                }
                Ok(())
            }
        }
    }

    /// Called at open (the slot's in-use mark) and when this process grew the file (the
    /// recorded length): with `Periodic`, the header and the process slots go with the next
    /// pass. (`OnCommit` syncs the whole file before publishing anything.)
    pub(crate) fn mark_metadata(&self) {
        if matches!(self.syncer.mode, Durability::Periodic(_)) {
            self.syncer.dirty.mark(0, CHUNK_TABLE_OFF);
        }
    }

    /// Syncs that failed in this process.
    pub(crate) fn sync_failures(&self) -> u64 {
        self.syncer.dirty.failures.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dirty_range_widens_and_empties() {
        let d = Dirty::new();
        assert_eq!(d.take(), None);
        d.mark(10_000, 16);
        d.mark(5000, 1);
        d.mark(6000, 100);
        assert_eq!(d.take(), Some((4096, 2 * 4096)));
        assert_eq!(d.take(), None);
        d.mark(8192, 4096);
        assert_eq!(d.take(), Some((8192, 4096)));
    }
}
