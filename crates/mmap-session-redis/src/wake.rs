//! Waking the waiters of a lease when it is released: one subscription per backend to the release
//! channel, and a [`Notify`] per session that someone in this process waits for.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use fred::prelude::EventInterface as _;
use fred::types::Message;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::Notify;

/// Sessions that requests of this process wait for, by hash.
#[derive(Debug, Default)]
pub(crate) struct Waiters {
    // A std mutex: held only to look up or change the map, never across an await.
    by_hash: Mutex<HashMap<String, Entry>>,
}

#[derive(Debug)]
struct Entry {
    notify: Arc<Notify>,
    /// How many [`Waiting`] guards use `notify`; the entry goes when the last one does.
    users: usize,
}

impl Waiters {
    /// Registers interest in releases of `hash` until the guard is dropped.
    pub(crate) fn register(self: &Arc<Self>, hash: &str) -> Waiting {
        let mut map = self.by_hash.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = map.entry(hash.to_owned()).or_insert_with(|| Entry {
            notify: Arc::new(Notify::new()),
            users: 0,
        });
        entry.users += 1;
        Waiting {
            notify: Arc::clone(&entry.notify),
            hash: hash.to_owned(),
            waiters: Arc::clone(self),
        }
    }

    /// Wakes the longest waiting of this process's waiters for `hash`: one request can take the
    /// lease, and waking all of them would only make the rest try in vain. If it loses the race to
    /// another process, that one's release wakes the next; if it went away, the others' polling
    /// is the fallback.
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

/// Interest in the releases of one session.
#[derive(Debug)]
pub(crate) struct Waiting {
    pub(crate) notify: Arc<Notify>,
    hash: String,
    waiters: Arc<Waiters>,
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
                map.remove(&self.hash);
            }
        }
    }
}

/// Forwards the release messages of `subscriber` on `channel` to `waiters`, until the subscriber's
/// message stream ends. The returned future runs as a task of its own; the streams are taken
/// before it first runs, so that no message that arrives before then is missed.
pub(crate) fn dispatch(
    subscriber: &fred::clients::SubscriberClient,
    channel: String,
    waiters: Arc<Waiters>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut messages = subscriber.message_rx();
    // The subscription may come back after a reconnection; releases published in between are
    // lost, so everyone tries again (waiters also poll, as a fallback).
    let mut reconnects = subscriber.reconnect_rx();
    async move {
        loop {
            tokio::select! {
                message = messages.recv() => match message {
                    Ok(Message { channel: on, value, .. }) if *on == *channel => {
                        // The message is the session's hash (hex), as text or bytes.
                        let hash = value.as_bytes().and_then(|b| std::str::from_utf8(b).ok());
                        if let Some(hash) = hash {
                            waiters.wake(hash);
                        }
                    }
                    Ok(_) => {}
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
