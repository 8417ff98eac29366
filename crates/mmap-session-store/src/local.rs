//! Waiting for a lease in async code without a thread per waiter, and handing a released lease
//! straight to the next waiter of the same process.
//!
//! Tasks of this process that wait for one key queue here. When a lease of this process is
//! released and no other process waits for the key (the word's waiters bit is clear), the lease
//! passes to the first queued task as it is: no store write, no system call. Otherwise the lease
//! is released in the file, and one blocking thread per key and process (the *watcher*) waits for
//! it like any other process would, then hands it to the first queued task.
//!
//! Who starts the watcher: a queued task, if the key is not held by this process when it queues;
//! else the holder, if it releases to the file while tasks are queued. Both sides follow
//! "write, full fence, read the other side's word", so at least one of them sees the other.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{fence, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::error::StoreError;
use crate::index::KeyHash;
use crate::lease::Lease;
use crate::store::Store;

type Delivery = Result<Lease, StoreError>;

/// The waiting tasks of this process, per key.
#[derive(Debug, Default)]
pub(crate) struct LocalWaiters {
    /// Tasks queued in all queues; read on every release, without the lock.
    pending: AtomicUsize,
    queues: Mutex<HashMap<[u8; 32], Queue>>,
}

#[derive(Debug)]
struct Queue {
    waiters: VecDeque<Waiter>,
    /// A watcher thread is waiting for the key in the file on this queue's behalf.
    watcher: bool,
    runtime: Handle,
}

#[derive(Debug)]
struct Waiter {
    deadline: Instant,
    tx: oneshot::Sender<Delivery>,
}

impl Queue {
    /// Drops waiters that gave up (their receiver is gone); returns how many.
    fn prune(&mut self) -> usize {
        let before = self.waiters.len();
        self.waiters.retain(|w| !w.tx.is_closed());
        before - self.waiters.len()
    }
}

impl LocalWaiters {
    pub(crate) fn pending(&self) -> bool {
        self.pending.load(Ordering::SeqCst) > 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Queue>> {
        // A panic while holding this lock leaves the map consistent (every change is one call).
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues the calling task for `kh`'s lease; the receiver gets the lease or an error.
    pub(crate) fn enqueue(
        &self,
        store: &Store,
        kh: KeyHash,
        deadline: Instant,
    ) -> oneshot::Receiver<Delivery> {
        let (tx, rx) = oneshot::channel();
        let runtime = match Handle::try_current() {
            Ok(handle) => handle,
            Err(e) => {
                let _ = tx.send(Err(StoreError::Io(std::io::Error::other(e))));
                return rx;
            }
        };
        let start_watcher = {
            let mut queues = self.lock();
            let q = queues.entry(kh.hash).or_insert_with(|| Queue {
                waiters: VecDeque::new(),
                watcher: false,
                runtime,
            });
            q.waiters.push_back(Waiter { deadline, tx });
            self.pending.fetch_add(1, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            // A holder in this process will hand the lease over or start a watcher when it
            // releases; a release anywhere else reaches us only through a watcher.
            let start = !q.watcher && !store.shared.held_here(&kh);
            failpoint!("local.enqueued");
            if start {
                q.watcher = true;
                Some(q.runtime.clone())
            } else {
                None
            }
        };
        if let Some(runtime) = start_watcher {
            spawn_watcher(runtime, store.clone(), kh);
        }
        rx
    }

    /// Passes a held lease to the first waiting task of this process. False if none took it.
    pub(crate) fn hand_over(&self, store: &Store, state_off: u64, token: u32, kh: KeyHash) -> bool {
        loop {
            let waiter = {
                let mut queues = self.lock();
                let Some(q) = queues.get_mut(&kh.hash) else {
                    return false;
                };
                let pruned = q.prune();
                let waiter = q.waiters.pop_front();
                self.pending
                    .fetch_sub(pruned + usize::from(waiter.is_some()), Ordering::SeqCst);
                if q.waiters.is_empty() && !q.watcher {
                    queues.remove(&kh.hash);
                }
                waiter
            };
            let Some(waiter) = waiter else { return false };
            let lease = Lease::from_parts(store.clone(), state_off, token, kh);
            match waiter.tx.send(Ok(lease)) {
                Ok(()) => return true,
                // The task gave up just now: take the lease back and try the next one.
                Err(Ok(lease)) => lease.disarm(),
                Err(Err(_)) => {}
            }
        }
    }

    /// Called after a lease of this process was released in the file: queued tasks now need a
    /// watcher, if none runs.
    pub(crate) fn after_release(&self, store: &Store, kh: &KeyHash) {
        let runtime = {
            let mut queues = self.lock();
            let Some(q) = queues.get_mut(&kh.hash) else {
                return;
            };
            let pruned = q.prune();
            self.pending.fetch_sub(pruned, Ordering::SeqCst);
            if q.waiters.is_empty() {
                if !q.watcher {
                    queues.remove(&kh.hash);
                }
                return;
            }
            if q.watcher {
                return;
            }
            q.watcher = true;
            q.runtime.clone()
        };
        spawn_watcher(runtime, store.clone(), *kh);
    }
    /// Starts a watcher for `kh`'s queue if it has waiters and none runs (a queued task that
    /// has waited long for a holder of this process asks for one).
    pub(crate) fn ensure_watcher(&self, store: &Store, kh: &KeyHash) {
        let runtime = {
            let mut queues = self.lock();
            let Some(q) = queues.get_mut(&kh.hash) else {
                return;
            };
            if q.watcher || q.waiters.is_empty() {
                return;
            }
            q.watcher = true;
            q.runtime.clone()
        };
        spawn_watcher(runtime, store.clone(), *kh);
    }

    /// Called after an internal holder of this process (which never hands a lease over)
    /// released a word: every queue that counted on a holder of this process now needs a
    /// watcher. Internal holders rarely meet queued tasks, so looking at every queue is cheap.
    pub(crate) fn after_internal_release(&self, store: &Store) {
        let start: Vec<(Handle, [u8; 32])> = {
            let mut queues = self.lock();
            let mut start = Vec::new();
            for (hash, q) in queues.iter_mut() {
                let pruned = q.prune();
                self.pending.fetch_sub(pruned, Ordering::SeqCst);
                if !q.watcher && !q.waiters.is_empty() {
                    q.watcher = true;
                    start.push((q.runtime.clone(), *hash));
                }
            }
            queues.retain(|_, q| q.watcher || !q.waiters.is_empty());
            start
        };
        for (runtime, hash) in start {
            spawn_watcher(runtime, store.clone(), KeyHash::from_hash(hash));
        }
    }
}

fn spawn_watcher(runtime: Handle, store: Store, kh: KeyHash) {
    drop(runtime.spawn_blocking(move || watch(&store, kh)));
}

/// The watcher: waits for the key in the file like another process would, for as long as some
/// task of this process waits, and hands the lease to the first of them.
fn watch(store: &Store, kh: KeyHash) {
    let local = &store.shared.local;
    loop {
        let deadline = {
            let mut queues = local.lock();
            let Some(q) = queues.get_mut(&kh.hash) else {
                return;
            };
            let pruned = q.prune();
            local.pending.fetch_sub(pruned, Ordering::SeqCst);
            match q.waiters.iter().map(|w| w.deadline).max() {
                Some(deadline) => deadline,
                None => {
                    queues.remove(&kh.hash);
                    return;
                }
            }
        };
        match store.lease_hashed_blocking(kh, deadline) {
            Ok(lease) => {
                // Give up the watcher role in the same step as picking the task: from here on
                // the lease's release takes care of whoever still waits.
                let waiter = {
                    let mut queues = local.lock();
                    let Some(q) = queues.get_mut(&kh.hash) else {
                        return;
                    };
                    let pruned = q.prune();
                    let waiter = q.waiters.pop_front();
                    local
                        .pending
                        .fetch_sub(pruned + usize::from(waiter.is_some()), Ordering::SeqCst);
                    q.watcher = false;
                    if q.waiters.is_empty() {
                        queues.remove(&kh.hash);
                    }
                    waiter
                };
                if let Some(waiter) = waiter {
                    // If the task just gave up, dropping the returned lease releases it (and
                    // hands it to the next task, if any).
                    let _ = waiter.tx.send(Ok(lease));
                }
                return;
            }
            // Waiters time out on their own; loop to drop them or wait for the later ones.
            Err(StoreError::LeaseTimeout) => continue,
            Err(error) => {
                let waiters = {
                    let mut queues = local.lock();
                    let Some(q) = queues.remove(&kh.hash) else {
                        return;
                    };
                    local.pending.fetch_sub(q.waiters.len(), Ordering::SeqCst);
                    q.waiters
                };
                for w in waiters {
                    let _ = w.tx.send(Err(error.duplicate()));
                }
                return;
            }
        }
    }
}
