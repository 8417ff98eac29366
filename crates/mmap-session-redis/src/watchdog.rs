//! The lease watchdog's queue: which held leases are due for renewal, and when.
//!
//! A lease is renewed every third of its TTL while its holder keeps it, but most requests end
//! long before their first renewal is due. So taking a lease does not start a task and a timer of
//! its own: it puts an entry in one queue per backend (a lock and an insert near the back), and
//! one task sleeps until the first entry is due. A holder that is done only marks its entry; the
//! task drops marked entries as they reach the front, so a short request costs the watchdog no
//! wake-up at all.
//!
//! Every entry is due one period after it was queued (a lease taken, or a renewal answered), and
//! the period is the same for every lease of a backend: the queue stays ordered by due time with
//! inserts at the back, give or take a round trip (an entry is inserted at its place, and one
//! that goes in front wakes the task).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use tokio::sync::Notify;

/// The leases to renew, in the order they are due.
pub(crate) struct Queue<T> {
    entries: Mutex<VecDeque<(Instant, Arc<Watched<T>>)>>,
    /// Notified when an entry goes in front of the queue (into an empty one, or due before the
    /// entry the task sleeps for).
    added: Notify,
}

/// One held lease, as the watchdog sees it: `lease`, what renewing it needs.
pub(crate) struct Watched<T> {
    pub(crate) lease: T,
    /// Set once its holder no longer needs it renewed.
    done: AtomicBool,
}

impl<T> Watched<T> {
    /// Whether its holder is done with it (released, committed, dropped).
    pub(crate) fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }
}

/// The holder's side of an entry: the lease is renewed until this is dropped.
pub(crate) struct Watch<T>(Arc<Watched<T>>);

impl<T> Watch<T> {
    /// What renewing the lease needs, as the watchdog sees it.
    pub(crate) fn lease(&self) -> &T {
        &self.0.lease
    }
}

impl<T> Drop for Watch<T> {
    fn drop(&mut self) {
        self.0.done.store(true, Ordering::Release);
    }
}

impl<T> Default for Queue<T> {
    fn default() -> Self {
        Self {
            entries: Mutex::new(VecDeque::new()),
            added: Notify::new(),
        }
    }
}

impl<T> Queue<T> {
    fn lock(&self) -> MutexGuard<'_, VecDeque<(Instant, Arc<Watched<T>>)>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `lease` for its first renewal at `due`; renewed until the returned guard is dropped.
    pub(crate) fn watch(&self, lease: T, due: Instant) -> Watch<T> {
        let watched = Arc::new(Watched {
            lease,
            done: AtomicBool::new(false),
        });
        self.requeue(Arc::clone(&watched), due);
        Watch(watched)
    }

    /// Queues an entry again, for its next renewal at `due`.
    pub(crate) fn requeue(&self, watched: Arc<Watched<T>>, due: Instant) {
        let mut entries = self.lock();
        let at = entries.partition_point(|(at, _)| *at <= due);
        entries.insert(at, (due, watched));
        drop(entries);
        if at == 0 {
            // A new first entry: the task sleeps for a later one, or for none. Stored as a permit
            // if the task is not waiting yet: never missed.
            self.added.notify_one();
        }
    }

    /// Waits until the first entry whose holder is not done is due, and takes it out.
    pub(crate) async fn next_due(&self) -> Arc<Watched<T>> {
        loop {
            let first = {
                let mut entries = self.lock();
                while entries
                    .front()
                    .is_some_and(|(_, watched)| watched.is_done())
                {
                    entries.pop_front();
                }
                entries.front().map(|(due, _)| *due)
            };
            let Some(due) = first else {
                self.added.notified().await;
                continue;
            };
            tokio::select! {
                () = tokio::time::sleep_until(tokio::time::Instant::from_std(due)) => {}
                // An entry went in front: look again.
                () = self.added.notified() => continue,
            }
            let mut entries = self.lock();
            if entries.front().is_some_and(|(at, _)| *at <= Instant::now()) {
                if let Some((_, watched)) = entries.pop_front() {
                    if !watched.is_done() {
                        return watched;
                    }
                }
            }
        }
    }

    /// How many entries are queued, done ones included.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn entries_come_out_in_due_order_and_done_ones_never() {
        let queue = Queue::default();
        let now = Instant::now();
        let late = queue.watch("late", now + Duration::from_millis(30));
        let early = queue.watch("early", now + Duration::from_millis(10));
        let dropped = queue.watch("dropped", now + Duration::from_millis(5));
        drop(dropped);
        assert_eq!(queue.len(), 3);
        assert_eq!(queue.next_due().await.lease, "early");
        assert!(Instant::now() >= now + Duration::from_millis(10));
        assert_eq!(queue.next_due().await.lease, "late");
        assert_eq!(queue.len(), 0);
        drop((late, early));
    }

    #[tokio::test(start_paused = true)]
    async fn a_requeued_entry_comes_out_again_and_an_empty_queue_waits_for_an_entry() {
        let queue = Arc::new(Queue::default());
        let waiter = tokio::spawn({
            let queue = Arc::clone(&queue);
            async move { queue.next_due().await.lease }
        });
        tokio::task::yield_now().await;
        let watch = queue.watch(1, Instant::now() + Duration::from_millis(10));
        assert_eq!(waiter.await.unwrap(), 1);
        queue.requeue(
            Arc::clone(&watch.0),
            Instant::now() + Duration::from_millis(10),
        );
        assert_eq!(queue.next_due().await.lease, 1);
        drop(watch);
        queue.requeue(
            Arc::new(Watched {
                lease: 2,
                done: AtomicBool::new(false),
            }),
            Instant::now(),
        );
        assert_eq!(queue.next_due().await.lease, 2);
    }

    /// A lease whose acquire answered late is queued with a due time already past (one period
    /// after the acquire was sent), in front of the entry the task already sleeps for: it must be
    /// taken out when it is due, not only when that later entry is.
    #[tokio::test]
    async fn an_entry_queued_in_front_is_not_held_up_by_the_later_front() {
        let queue = Arc::new(Queue::default());
        let later_due = Instant::now() + Duration::from_millis(500);
        let later = queue.watch("later", later_due);
        let task = tokio::spawn({
            let queue = Arc::clone(&queue);
            async move { (queue.next_due().await.lease, Instant::now()) }
        });
        // On this one-thread runtime the task's first poll runs now: it goes to sleep until
        // `later` is due.
        tokio::task::yield_now().await;
        let early = queue.watch("early", Instant::now());
        let (first, at) = task.await.unwrap();
        assert_eq!(first, "early");
        assert!(
            at < later_due,
            "an entry due at once came out only when the later front was due"
        );
        drop((later, early));
    }
}
