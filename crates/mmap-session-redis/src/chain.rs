//! The writes of a run of hand-overs within one process, sent to Redis one at a time, in order.
//!
//! When a request finishes with the next request of its process already waiting for the same
//! session, it hands the lease over at once and its write goes to Redis meanwhile: the next
//! request starts from the record just written (it holds the same lease, so nobody else can
//! change the session in between) without waiting for the write's round trip. The requests of a
//! run share one [`Chain`]:
//!
//! - **Queued, then sent one at a time.** A finishing request queues its write with the next
//!   number; only the latest write not yet sent is kept, since it holds the changes of every
//!   earlier one. One task sends the queued writes while there are any (started by the write
//!   that finds none sending), and one script of the run is on its way at a time
//!   ([`Chain::sending`]); the writes queued while it is go out as one when it returns (a group
//!   commit), so a late write can never overwrite a later one.
//! - **Answered once confirmed.** A request answers only once Redis confirmed its write or a later
//!   one ([`Chain::outcome`]): its response never claims a write that was not made.
//! - **One failure fails the rest.** A write that fails (the lease lost, Redis unreachable, no
//!   answer in time) fails the run: every request whose write was not confirmed fails too, since
//!   it started from changes that may not be in Redis, and the run's lease is released when the
//!   run ends. A write that timed out may still run later; the release that ends the run makes
//!   it a no-op if it comes after (the scripts check the lease's token).
//! - **Ended by its last holder.** The last request of the run (nobody else waiting in this
//!   process, or a request of another process waiting after a bounded run) sends the pending
//!   write with the release, in one script.

use std::pin::pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

/// The shared state of one run; see the module documentation.
#[derive(Debug, Default)]
pub(crate) struct Chain {
    state: Mutex<State>,
    /// Held while a script of the run is on its way (by a task of its own, so that the outcome is
    /// recorded even if the request that sent it goes away).
    pub(crate) sending: Arc<tokio::sync::Mutex<()>>,
    /// Notified whenever an outcome is recorded.
    settled: Notify,
}

#[derive(Debug, Default)]
struct State {
    /// The number of the latest write queued (the first is 1).
    queued: u64,
    /// The latest write queued and not sent yet.
    pending: Option<Write>,
    /// The number of the latest write Redis confirmed (0: none yet).
    done: u64,
    /// Why the run failed, once a write of it failed.
    failed: Option<Failure>,
    /// Whether a task sends the queued writes (always, while one is queued).
    sender: bool,
}

/// One write of a run.
#[derive(Debug)]
pub(crate) struct Write {
    /// Its number in the run.
    pub(crate) number: u64,
    /// The record to store, with its time to live; `None` deletes the record.
    pub(crate) record: Option<(Vec<u8>, Duration)>,
}

/// Why a run failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The lease was no longer the run's when a write got to Redis: nothing of it was written.
    Lost,
    /// A write failed or got no answer (`unavailable`: Redis could not be reached); whether it
    /// was made is unknown.
    Failed { unavailable: bool, reason: String },
}

impl Chain {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a write (`record`, or `None` to delete the record) in place of the one not sent
    /// yet, if any, and returns its number, and whether the caller must start the task that sends
    /// the queued writes ([`Chain::next_to_send`]): when none runs.
    pub(crate) fn queue(&self, record: Option<(Vec<u8>, Duration)>) -> (u64, bool) {
        let mut state = self.state();
        state.queued += 1;
        let number = state.queued;
        state.pending = Some(Write { number, record });
        let start = !std::mem::replace(&mut state.sender, true);
        (number, start)
    }

    /// For the task that sends the queued writes, with [`Chain::sending`] held: the write to send
    /// now, or `None` when none is queued, and then the task ends (a later write starts another).
    pub(crate) fn next_to_send(&self) -> Option<Write> {
        let mut state = self.state();
        let next = state.pending.take();
        if next.is_none() {
            state.sender = false;
        }
        next
    }

    /// Numbers the last write of a lease's part in the run (`record`, or `None` to delete the
    /// record), to be sent by its holder's own step rather than queued: a step sending queued
    /// writes never takes it, so the holder's step decides what the script does besides.
    pub(crate) fn number_last(&self, record: Option<(Vec<u8>, Duration)>) -> Write {
        let mut state = self.state();
        state.queued += 1;
        Write {
            number: state.queued,
            record,
        }
    }

    /// For a step that ends a lease's part in the run, with [`Chain::sending`] held: its `own`
    /// last write (numbered by [`Chain::number_last`]) in place of the queued one, whose changes
    /// it holds, or else the queued one, if any. The caller records the outcome with
    /// [`Chain::confirm`] or [`Chain::fail`].
    pub(crate) fn supersede(&self, own: Option<Write>) -> Option<Write> {
        let pending = self.state().pending.take();
        own.or(pending)
    }

    /// Notes that Redis confirmed write `number` (and so every earlier one).
    pub(crate) fn confirm(&self, number: u64) {
        {
            let mut state = self.state();
            state.done = state.done.max(number);
        }
        self.settled.notify_waiters();
    }

    /// Notes that the run failed: later writes are not sent, and every write not confirmed
    /// fails. The first failure is the one kept.
    pub(crate) fn fail(&self, failure: Failure) {
        {
            let mut state = self.state();
            state.pending = None;
            state.failed.get_or_insert(failure);
        }
        self.settled.notify_waiters();
    }

    /// Why the run failed, if it did.
    pub(crate) fn failure(&self) -> Option<Failure> {
        self.state().failed.clone()
    }

    /// Waits until the outcome of write `number` is known (see [`Chain::outcome`]): a write
    /// queued is sent by the task that sends them, or replaced by a later one, whose outcome
    /// decides; one taken to be sent has its outcome recorded by the task that sends it.
    pub(crate) async fn settled(&self, number: u64) -> Result<(), Failure> {
        loop {
            let mut notified = pin!(self.settled.notified());
            notified.as_mut().enable();
            if let Some(outcome) = self.outcome(number) {
                return outcome;
            }
            notified.await;
        }
    }

    /// What became of write `number`: confirmed (by itself or a later write), failed with the
    /// run, or not known yet (`None`: it is pending or on its way).
    pub(crate) fn outcome(&self, number: u64) -> Option<Result<(), Failure>> {
        let state = self.state();
        if state.done >= number {
            Some(Ok(()))
        } else {
            state.failed.clone().map(Err)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn record(byte: u8) -> Option<(Vec<u8>, Duration)> {
        Some((vec![byte], Duration::from_secs(60)))
    }

    #[test]
    fn a_later_write_replaces_the_pending_one_and_confirms_the_earlier_numbers() {
        let chain = Chain::default();
        let (first, start) = chain.queue(record(1));
        assert!(start, "the first write starts the sender");
        let (second, start) = chain.queue(record(2));
        assert!(!start, "one sender at a time");
        assert_eq!((first, second), (1, 2));
        assert_eq!(chain.outcome(first), None);
        let write = chain.next_to_send().unwrap();
        assert_eq!(write.number, 2);
        assert_eq!(write.record, record(2));
        assert!(chain.next_to_send().is_none());
        assert!(
            chain.queue(record(3)).1,
            "the sender ended: the next write starts another"
        );
        chain.confirm(write.number);
        assert_eq!(chain.outcome(first), Some(Ok(())));
        assert_eq!(chain.outcome(second), Some(Ok(())));
    }

    #[test]
    fn a_failure_fails_every_write_not_confirmed_and_drops_the_pending_one() {
        let chain = Chain::default();
        let (first, _) = chain.queue(record(1));
        let sent = chain.next_to_send().unwrap();
        chain.confirm(sent.number);
        let (second, _) = chain.queue(record(2));
        let (third, _) = chain.queue(None);
        chain.fail(Failure::Lost);
        chain.fail(Failure::Failed {
            unavailable: true,
            reason: "later".into(),
        });
        assert_eq!(chain.outcome(first), Some(Ok(())));
        assert_eq!(chain.outcome(second), Some(Err(Failure::Lost)));
        assert_eq!(chain.outcome(third), Some(Err(Failure::Lost)));
        assert!(chain.next_to_send().is_none());
        assert_eq!(chain.failure(), Some(Failure::Lost));
    }
}
