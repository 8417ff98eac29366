//! Waiting for a session's lease: the requests of this process take turns per session (one of
//! them at a time deals with Redis), and the one whose turn it is waits for a message on the
//! session's own shard channel (`SSUBSCRIBE`), which a release publishes only when someone waits.
//!
//! - **Turns in arrival order.** Each session that requests of this process use has an entry
//!   with a fair (first in, first out) async mutex: a request takes its turn before it tries the
//!   lease in Redis and gives it back after releasing the lease. So at most one request per
//!   process per session talks to Redis, newcomers of this process never overtake earlier ones,
//!   and the next one in line tries at once when the lease is released.
//! - **Per-session channels.** The request whose turn it is and who finds the lease held
//!   subscribes to the session's channel (`{prefix}{<hash>}:released`, in the session's slot) and
//!   tries again; a release that finds the session's "someone waits" flag publishes the hash on
//!   that channel with `SPUBLISH`. The subscription ends when no request of this process uses the
//!   session any more. Subscribing and unsubscribing go through one task, in order.
//! - **Fallback.** A message lost to a reconnection is made up for by trying again when the
//!   held lease's TTL runs out, and at most every 250 ms.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use fred::clients::SubscriberClient;
use fred::interfaces::PubsubInterface as _;
use fred::prelude::EventInterface as _;
use fred::types::Message;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{mpsc, oneshot, Notify, OwnedMutexGuard};

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
    turn: Arc<tokio::sync::Mutex<()>>,
    /// How many [`Waiting`] guards use the entry; it goes when the last one does.
    users: usize,
    /// The channel, once a subscription to it has been asked for.
    subscribed: Option<String>,
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
            turn: Arc::new(tokio::sync::Mutex::new(())),
            users: 0,
            subscribed: None,
        });
        entry.users += 1;
        Waiting {
            notify: Arc::clone(&entry.notify),
            turn: Arc::clone(&entry.turn),
            hash: hash.to_owned(),
            waiters: Arc::clone(self),
        }
    }

    /// Wakes the request of this process whose turn it is for `hash`, if it waits.
    pub(crate) fn wake(&self, hash: &str) {
        let map = self.by_hash.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = map.get(hash) {
            entry.notify.notify_one();
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

/// A request's interest in one session: its place in the session's turns, and the wake-ups.
#[derive(Debug)]
pub(crate) struct Waiting {
    pub(crate) notify: Arc<Notify>,
    turn: Arc<tokio::sync::Mutex<()>>,
    hash: String,
    waiters: Arc<Waiters>,
}

impl Waiting {
    /// Waits for this request's turn at the session (first come, first served in this process).
    pub(crate) async fn turn(&self) -> OwnedMutexGuard<()> {
        Arc::clone(&self.turn).lock_owned().await
    }

    /// Subscribes to the session's release channel, once per session while requests of this
    /// process use it; returns when the subscription is in place (or failed: the caller then
    /// falls back to trying again when the lease expires).
    pub(crate) async fn subscribe(&self, keys: &SessionKeys) {
        let done = {
            let mut map = self
                .waiters
                .by_hash
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let Some(entry) = map.get_mut(&self.hash) else {
                return;
            };
            if entry.subscribed.is_some() {
                return;
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
                return;
            }
            answer
        };
        let _ = done.await;
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
                        // The message is the session's hash (hex), as text or bytes.
                        let hash = value.as_bytes().and_then(|b| std::str::from_utf8(b).ok());
                        if let Some(hash) = hash {
                            waiters.wake(hash);
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
