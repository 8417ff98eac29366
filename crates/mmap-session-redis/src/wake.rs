//! Waiting for a session's lease: the requests of this process take turns per session (one of
//! them at a time deals with Redis), and the one whose turn it is queues in Redis behind the
//! waiters of other processes and waits for a message on the session's own shard channel
//! (`SSUBSCRIBE`), which a release publishes only when someone is queued, naming the head.
//!
//! - **Turns in arrival order.** Each session that requests of this process use has an entry
//!   with a queue (first in, first out): a request takes its turn before it tries the lease in
//!   Redis and gives it back after releasing the lease. So at most one request per process per
//!   session talks to Redis, and newcomers of this process never overtake earlier ones. When the
//!   holder finishes with the next request already in line, it hands the lease over (see
//!   [`Handover`]): the next one goes on without an acquire, and without waiting for the
//!   write of the one before, which keeps the lease (see the `chain` module).
//! - **A queue across processes, per-session channels.** The request whose turn it is and who
//!   finds the lease held (or free, but another process's waiter first in the session's queue in
//!   Redis) is put in that queue by the acquire script, subscribes to the session's channel
//!   (`{prefix}{<hash>}:released`, in the session's slot) and tries again; a release that finds
//!   the queue publishes `<hash>:<token>` on that channel with `SPUBLISH`, `<token>` being the
//!   head's. Every process subscribed to the session receives it, and only the one whose waiter
//!   holds that token wakes it. The subscription ends when no request of this process uses the
//!   session any more. Subscribing and unsubscribing go through one task, in order.
//! - **Fallback.** A message lost to a reconnection is made up for by waking every waiter of
//!   this process then, and by trying again when the held lease's TTL, or the queue entry of the
//!   waiter ahead, runs out; a waiter tries at least once per lease TTL anyway, to keep its own
//!   entry in the queue.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use fred::clients::SubscriberClient;
use fred::interfaces::PubsubInterface as _;
use fred::prelude::EventInterface as _;
use fred::types::Message;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::backend::Handover;
use crate::keys::SessionKeys;

/// The sessions that requests of this process use, by hash.
#[derive(Debug)]
pub(crate) struct Waiters {
    // A std mutex: held only to look up or change the map, never across an await.
    by_hash: Mutex<HashMap<String, Entry>>,
    subscriptions: mpsc::UnboundedSender<Subscription>,
}

#[derive(Debug)]
struct Entry {
    notify: Arc<Notify>,
    /// Whether a request of this process has its turn (holds or is taking the lease).
    busy: bool,
    /// The requests waiting for their turn, in arrival order.
    queue: VecDeque<oneshot::Sender<Turn>>,
    /// How many [`Waiting`] guards use the entry; it goes when the last one does.
    users: usize,
    /// The channel, once a subscription to it has been asked for.
    subscribed: Option<String>,
    /// Whether the subscription is known to be in place (its request was answered).
    confirmed: bool,
    /// The token of the request of this process that queues in Redis (the last one to): a
    /// release message naming another token is not for this process.
    token: Option<String>,
}

/// One change to the subscriptions, with where to say that it is done.
#[derive(Debug)]
struct Subscription {
    channel: String,
    subscribe: bool,
    done: Option<oneshot::Sender<Result<(), fred::error::Error>>>,
}

impl Waiters {
    /// The waiters of a backend whose subscriber is `subscriber`, and the task that subscribes
    /// and unsubscribes for them.
    pub(crate) fn new(
        subscriber: SubscriberClient,
    ) -> (Self, impl std::future::Future<Output = ()> + Send + 'static) {
        let (subscriptions, mut changes) = mpsc::unbounded_channel::<Subscription>();
        let task = async move {
            while let Some(change) = changes.recv().await {
                let result = if change.subscribe {
                    subscriber.ssubscribe(change.channel.as_str()).await
                } else {
                    subscriber.sunsubscribe(change.channel.as_str()).await
                };
                if let Err(error) = &result {
                    tracing::debug!(error = %error, subscribe = change.subscribe, "a lease release subscription change failed");
                }
                if let Some(done) = change.done {
                    let _ = done.send(result);
                }
            }
        };
        let waiters = Self {
            by_hash: Mutex::new(HashMap::new()),
            subscriptions,
        };
        (waiters, task)
    }

    /// Registers a request's interest in `hash` until the guard is dropped.
    pub(crate) fn register(self: &Arc<Self>, hash: &str) -> Waiting {
        let mut map = self.by_hash.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = map.entry(hash.to_owned()).or_insert_with(|| Entry {
            notify: Arc::new(Notify::new()),
            busy: false,
            queue: VecDeque::new(),
            users: 0,
            subscribed: None,
            confirmed: false,
            token: None,
        });
        entry.users += 1;
        Waiting {
            notify: Arc::clone(&entry.notify),
            hash: hash.to_owned(),
            waiters: Arc::clone(self),
        }
    }

    /// How many requests of this process wait for their turn at `hash`.
    #[cfg(feature = "test-server")]
    pub(crate) fn queued(&self, hash: &str) -> usize {
        let map = self.by_hash.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(hash).map_or(0, |entry| {
            entry
                .queue
                .iter()
                .filter(|waiter| !waiter.is_closed())
                .count()
        })
    }

    /// Whether a request of this process waits for its turn at `hash`.
    pub(crate) fn has_queued(&self, hash: &str) -> bool {
        let map = self.by_hash.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(hash)
            .is_some_and(|entry| entry.queue.iter().any(|waiter| !waiter.is_closed()))
    }

    /// Gives the turn at `hash` to the next request waiting for it, with `handover` if given;
    /// with nobody waiting, the session is free in this process. The hand-over comes back when
    /// nobody took it.
    fn pass(&self, hash: &str, handover: Option<Handover>) -> Option<Handover> {
        let mut map = self.by_hash.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(entry) = map.get_mut(hash) else {
            return handover;
        };
        let mut turn = match handover {
            Some(handover) => Turn::Handed(Box::new(handover)),
            None => Turn::Yours,
        };
        while let Some(next) = entry.queue.pop_front() {
            match next.send(turn) {
                Ok(()) => return None,
                // It went away (its deadline passed or its request was dropped): the next one.
                Err(back) => turn = back,
            }
        }
        entry.busy = false;
        match turn {
            Turn::Handed(handover) => Some(*handover),
            Turn::Yours => None,
        }
    }

    /// Wakes the request of this process whose turn it is for `hash`, if it waits (and, when
    /// `token` is given, if it is the one that queues with that token).
    pub(crate) fn wake(&self, hash: &str, token: Option<&str>) {
        let map = self.by_hash.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = map.get(hash) {
            if token.is_none() || token == entry.token.as_deref() {
                entry.notify.notify_one();
            }
        }
    }

    /// Wakes every waiter (when release messages may have been missed).
    pub(crate) fn wake_all(&self) {
        let map = self.by_hash.lock().unwrap_or_else(PoisonError::into_inner);
        for entry in map.values() {
            entry.notify.notify_waiters();
        }
    }
}

/// What a request gets when its turn comes.
#[derive(Debug)]
enum Turn {
    /// Take the lease from Redis.
    Yours,
    /// The lease, already held.
    Handed(Box<Handover>),
}

/// A request waiting for its turn. Dropped before it got it (its request went away), it passes
/// on a turn that came meanwhile: the session must never stay busy for nobody.
struct Pending {
    receiver: oneshot::Receiver<Turn>,
    waiters: Arc<Waiters>,
    hash: String,
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.receiver.close();
        match self.receiver.try_recv() {
            Ok(Turn::Yours) => {
                self.waiters.pass(&self.hash, None);
            }
            // Passed on, or released (by dropping it) if nobody waits any more.
            Ok(Turn::Handed(handover)) => drop(self.waiters.pass(&self.hash, Some(*handover))),
            Err(_) => {}
        }
    }
}

/// A request's turn at a session in this process: given to the next request when dropped.
#[derive(Debug)]
pub(crate) struct TurnGuard {
    waiting: Waiting,
    passed: bool,
}

impl TurnGuard {
    /// Gives the turn to the next request with `handover`; back if nobody took it.
    pub(crate) fn hand_over(mut self, handover: Handover) -> Option<Handover> {
        self.passed = true;
        self.waiting
            .waiters
            .pass(&self.waiting.hash, Some(handover))
    }

    /// The registration this turn belongs to.
    pub(crate) fn waiting(&self) -> &Waiting {
        &self.waiting
    }
}

impl Drop for TurnGuard {
    fn drop(&mut self) {
        if !self.passed {
            self.waiting.waiters.pass(&self.waiting.hash, None);
        }
    }
}

/// A request's interest in one session: its place in the session's turns, and the wake-ups.
#[derive(Debug)]
pub(crate) struct Waiting {
    pub(crate) notify: Arc<Notify>,
    hash: String,
    waiters: Arc<Waiters>,
}

impl Waiting {
    /// Waits (until `deadline`) for this request's turn at the session, first come first served
    /// in this process: `Ok((turn, None))` to take the lease from Redis, `Ok((turn, Some(_)))`
    /// with the lease handed over by the previous holder, `Err(())` when the deadline passed.
    pub(crate) async fn turn(
        self,
        deadline: tokio::time::Instant,
    ) -> Result<(TurnGuard, Option<Handover>), ()> {
        let waiting = {
            let mut map = self
                .waiters
                .by_hash
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match map.get_mut(&self.hash) {
                Some(entry) if entry.busy => {
                    let (sender, receiver) = oneshot::channel();
                    entry.queue.push_back(sender);
                    Some(receiver)
                }
                Some(entry) => {
                    entry.busy = true;
                    None
                }
                None => None,
            }
        };
        let guard = |waiting| TurnGuard {
            waiting,
            passed: false,
        };
        let Some(receiver) = waiting else {
            return Ok((guard(self), None));
        };
        let mut pending = Pending {
            receiver,
            waiters: Arc::clone(&self.waiters),
            hash: self.hash.clone(),
        };
        let turn = tokio::select! {
            turn = &mut pending.receiver => turn.ok(),
            () = tokio::time::sleep_until(deadline) => {
                // A turn given just now is taken all the same.
                pending.receiver.close();
                pending.receiver.try_recv().ok()
            }
        };
        match turn {
            Some(Turn::Yours) => Ok((guard(self), None)),
            Some(Turn::Handed(handover)) => Ok((guard(self), Some(*handover))),
            None => Err(()),
        }
    }

    /// Notes `token` as the one this process queues with for the session: release messages for
    /// it wake this request.
    pub(crate) fn queue_as(&self, token: &str) {
        let mut map = self
            .waiters
            .by_hash
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = map.get_mut(&self.hash) {
            entry.token = Some(token.to_owned());
        }
    }

    /// Subscribes to the session's release channel, once per session while requests of this
    /// process use it; returns when the subscription is in place (or failed: the caller then
    /// falls back to trying again when the lease expires). `true` if it was in place already
    /// (asked for and answered before this call), so that no release message since the caller's
    /// last try can have been missed.
    pub(crate) async fn subscribe(&self, keys: &SessionKeys) -> bool {
        let done = {
            let mut map = self
                .waiters
                .by_hash
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let Some(entry) = map.get_mut(&self.hash) else {
                return false;
            };
            if entry.confirmed {
                return true;
            }
            if entry.subscribed.is_some() {
                // Asked for by an earlier request that went away before the answer.
                return false;
            }
            let channel = keys.release_channel();
            entry.subscribed = Some(channel.clone());
            let (done, answer) = oneshot::channel();
            let change = Subscription {
                channel,
                subscribe: true,
                done: Some(done),
            };
            if self.waiters.subscriptions.send(change).is_err() {
                return false;
            }
            answer
        };
        if let Ok(Ok(())) = done.await {
            let mut map = self
                .waiters
                .by_hash
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(entry) = map.get_mut(&self.hash) {
                entry.confirmed = true;
            }
        }
        false
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut map = self
            .waiters
            .by_hash
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = map.get_mut(&self.hash) {
            entry.users -= 1;
            if entry.users == 0 {
                if let Some(channel) = map.remove(&self.hash).and_then(|entry| entry.subscribed) {
                    let _ = self.waiters.subscriptions.send(Subscription {
                        channel,
                        subscribe: false,
                        done: None,
                    });
                }
            }
        }
    }
}

/// Forwards the release messages of `subscriber` to `waiters`, until the subscriber's message
/// stream ends. The returned future runs as a task of its own; the streams are taken before it
/// first runs, so that no message that arrives before then is missed.
pub(crate) fn dispatch(
    subscriber: &SubscriberClient,
    waiters: Arc<Waiters>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut messages = subscriber.message_rx();
    // The subscriptions come back after a reconnection; releases published in between are lost,
    // so everyone tries again.
    let mut reconnects = subscriber.reconnect_rx();
    async move {
        loop {
            tokio::select! {
                message = messages.recv() => match message {
                    Ok(Message { value, .. }) => {
                        // The message is `<hash>:<token>` (hash and token in hex), as text or
                        // bytes: the session, and the waiter at the head of its queue. A message
                        // of the hash alone wakes whoever waits here.
                        let text = value.as_bytes().and_then(|b| std::str::from_utf8(b).ok());
                        if let Some(text) = text {
                            match text.split_once(':') {
                                Some((hash, token)) => waiters.wake(hash, Some(token)),
                                None => waiters.wake(text, None),
                            }
                        }
                    }
                    Err(RecvError::Lagged(missed)) => {
                        tracing::debug!(missed, "release messages dropped; waking every waiter");
                        waiters.wake_all();
                    }
                    Err(RecvError::Closed) => break,
                },
                reconnect = reconnects.recv() => match reconnect {
                    Ok(_) | Err(RecvError::Lagged(_)) => waiters.wake_all(),
                    Err(RecvError::Closed) => break,
                },
            }
        }
    }
}
