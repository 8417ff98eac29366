//! The pooled connections to Redis, and sending one command on a connection that is up.
//!
//! fred reconnects a broken connection in the background, and a command handed to a client
//! meanwhile waits for the reconnection (its state still says "connected" while it waits to try
//! again). A request must not wait for a Redis that is gone: each client's error and reconnection
//! events say whether its connection is up, a command goes only to a client that is up, and one
//! that waits on a client whose connection breaks is given up at once (and sent again on another,
//! the scripts being idempotent per lease token).
//!
//! On a Redis Cluster this is too coarse, and cannot be made finer here (a known bug): one node's
//! error marks a client down for every node, and fred 10 itself sends no command on a clustered
//! client while any primary that `CLUSTER SLOTS` names refuses its reconnection (it reconnects to
//! every primary at once, errors naming no server). Serving the live primaries' slots meanwhile
//! needs connections of the backend's own per primary.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fred::clients::{Client, Pool};
use fred::interfaces::{ClientLike as _, EventInterface as _};
use fred::prelude::{Options, Value};
use fred::types::scripts::Script;
use fred::types::CustomCommand;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::error::connection_lost;
use crate::RedisError;

/// How many times a command is sent when connections break under it.
const MAX_SENDS: u32 = 3;

/// The pool, with whether each of its connections is up.
pub(crate) struct Connections {
    pool: Pool,
    /// Per client of the pool: whether its connection is up.
    up: Arc<Vec<watch::Sender<bool>>>,
    /// Where the next command starts looking for a client that is up.
    next: AtomicUsize,
    command_timeout: Duration,
}

impl Connections {
    /// Watches the connections of `pool` (connected: every client up), with the tasks that do.
    pub(crate) fn new(pool: Pool, command_timeout: Duration) -> (Self, Vec<AbortHandle>) {
        let up: Arc<Vec<watch::Sender<bool>>> = Arc::new(
            pool.clients()
                .iter()
                .map(|_| watch::Sender::new(true))
                .collect(),
        );
        let tasks = pool
            .clients()
            .iter()
            .enumerate()
            .map(|(index, client)| {
                tokio::spawn(track(client, Arc::clone(&up), index)).abort_handle()
            })
            .collect();
        let connections = Self {
            pool,
            up,
            next: AtomicUsize::new(0),
            command_timeout,
        };
        (connections, tasks)
    }

    /// A client whose connection is up (round robin), with its index.
    fn pick(&self, command: &'static str) -> Result<(usize, &Client), RedisError> {
        let clients = self.pool.clients();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..clients.len())
            .map(|offset| (start + offset) % clients.len())
            .find(|&index| {
                self.up.get(index).is_some_and(|up| *up.borrow()) && clients[index].is_connected()
            })
            .map(|index| (index, &clients[index]))
            .ok_or(RedisError::NotConnected { command })
    }

    /// Sends `cmd` with `args` and returns the reply, failing after `budget` (at most the command
    /// time-out). `script`: the script an `EVALSHA` runs, loaded when the server does not know
    /// it (a new or restarted server).
    ///
    /// When the connection breaks before the reply, the command is sent again on another
    /// connection that is up, at most [`MAX_SENDS`] times in all: only for commands that may run
    /// twice. When none is up, it fails at once instead of waiting for a reconnection. The
    /// time-out is the client's own: a command that timed out is not sent again later (though one
    /// already written may still run).
    pub(crate) async fn send(
        &self,
        command: &'static str,
        cmd: CustomCommand,
        args: Vec<Value>,
        script: Option<&Script>,
        budget: Duration,
    ) -> Result<Value, RedisError> {
        let end = Instant::now() + budget.min(self.command_timeout);
        let mut sends = 0;
        loop {
            sends += 1;
            let (index, client) = self.pick(command)?;
            let mut up = self.up[index].subscribe();
            let options = Options {
                timeout: Some(end.saturating_duration_since(Instant::now())),
                // A reply lost with its connection is not waited for through a reconnection:
                // this loop sends the command again on a connection that is up.
                max_attempts: Some(1),
                ..Options::default()
            };
            let with = client.with_options(&options);
            let attempt = async {
                match with.custom::<Value, Value>(cmd.clone(), args.clone()).await {
                    Err(error) if error.details().starts_with("NOSCRIPT") && script.is_some() => {
                        if let Some(script) = script {
                            // On every primary of a cluster.
                            script.load(client).await?;
                        }
                        with.custom::<Value, Value>(cmd.clone(), args.clone()).await
                    }
                    other => other,
                }
            };
            let result = tokio::select! {
                result = attempt => result,
                _ = up.wait_for(|up| !*up) => Err(fred::error::Error::new(
                    fred::error::ErrorKind::IO,
                    "the connection broke before the reply",
                )),
            };
            match result {
                Err(error)
                    if connection_lost(&error) && sends < MAX_SENDS && Instant::now() < end =>
                {
                    tracing::debug!(command, error = %error, "connection lost; sending again");
                }
                other => return other.map_err(|source| RedisError::Command { command, source }),
            }
        }
    }
}

/// Keeps `up[index]` saying whether `client`'s connection is up: down from an error (a broken
/// connection, a failed reconnection) to the next successful reconnection.
///
/// The two kinds of event come on two channels, whose order between them is lost. While up, a
/// reconnection found waiting with an error came after it (the connection is back); while down,
/// errors found waiting with the reconnection came before it (failed tries).
fn track(
    client: &Client,
    up: Arc<Vec<watch::Sender<bool>>>,
    index: usize,
) -> impl Future<Output = ()> + Send + 'static {
    // Taken now, so that no event between here and the task's first poll is missed.
    let mut errors = client.error_rx();
    let mut reconnects = client.reconnect_rx();
    async move {
        let Some(flag) = up.get(index) else {
            return;
        };
        loop {
            if *flag.borrow() {
                match errors.recv().await {
                    Ok(_) | Err(RecvError::Lagged(_)) => {
                        // Up, no reconnection was waiting before this error: one waiting now
                        // came after it (the connection broke and is back already).
                        let mut back = false;
                        while !matches!(
                            reconnects.try_recv(),
                            Err(TryRecvError::Empty | TryRecvError::Closed)
                        ) {
                            back = true;
                        }
                        if !back {
                            flag.send_replace(false);
                        }
                    }
                    Err(RecvError::Closed) => return,
                }
            } else {
                match reconnects.recv().await {
                    Ok(_) | Err(RecvError::Lagged(_)) => {
                        while !matches!(
                            errors.try_recv(),
                            Err(TryRecvError::Empty | TryRecvError::Closed)
                        ) {}
                        flag.send_replace(true);
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        }
    }
}
