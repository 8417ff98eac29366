//! The pooled connections to Redis, and sending one command on a connection that is up.
//!
//! fred reconnects a broken connection in the background, and a command handed to a client
//! meanwhile waits for the reconnection (its state still says "connected" while it waits to try
//! again). A request must not wait for a Redis that is gone: each client's error and reconnection
//! events say whether its connection is up, a command goes only to a client that is up, and one
//! that waits on a client whose connection breaks is given up at once (and sent again on another,
//! the scripts being idempotent per lease token).
//!
//! On a Redis Cluster the backend keeps one such pool per primary, and sends each command to the
//! pool of the primary that owns its hash slot: a dead primary makes only its own slots'
//! commands fail. (A clustered fred client serves no command at all while one primary refuses
//! its reconnection, and its error events would mark it down for every node.) The slot table is
//! read with `CLUSTER SLOTS` from a live primary when a command is redirected (`MOVED`, `ASK`) or
//! finds its primary down, and every [`CHECK_EVERY`] while a primary is down, so that the slots of
//! a primary that died move to its promoted replica; the pool of a node that no longer owns a slot
//! is closed.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use fred::clients::{Client, Pool};
use fred::interfaces::{ClientLike as _, EventInterface as _};
use fred::prelude::{Options, Value};
use fred::types::cluster::ClusterRouting;
use fred::types::config::{Server, ServerConfig};
use fred::types::scripts::Script;
use fred::types::{Builder, ClusterHash, CustomCommand};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::{watch, Notify};
use tokio::task::AbortHandle;

use crate::error::connection_lost;
use crate::RedisError;

/// How many times a command is sent when connections break under it.
const MAX_SENDS: u32 = 3;

/// How many times a command is sent again after a cluster node redirected it.
const MAX_REDIRECTS: u32 = 3;

/// How often the slot table is read again while a primary of the cluster is down.
const CHECK_EVERY: Duration = Duration::from_millis(100);

/// The number of hash slots of a Redis Cluster.
const SLOTS: usize = 16_384;

/// In a slot table: no node owns the slot.
const NO_NODE: u16 = u16::MAX;

/// The connections to Redis: one pool, or on a cluster one pool per primary.
pub(crate) struct Connections {
    route: Route,
}

enum Route {
    Single(Node),
    Cluster(Arc<Cluster>),
}

impl Connections {
    /// Connects the pool(s) of `size` clients that `builder` describes, with the tasks that watch
    /// them.
    pub(crate) async fn connect(
        builder: &Builder,
        size: usize,
        command_timeout: Duration,
    ) -> Result<(Self, Vec<AbortHandle>), fred::error::Error> {
        let clustered = builder
            .get_config()
            .is_some_and(|config| config.server.is_clustered());
        if clustered {
            let (cluster, task) = Cluster::connect(builder, size, command_timeout).await?;
            let route = Route::Cluster(cluster);
            return Ok((Self { route }, vec![task]));
        }
        let pool = builder.build_pool(size)?;
        let mut tasks = vec![pool.init().await?.abort_handle()];
        let (node, trackers) = Node::new(pool, command_timeout);
        tasks.extend(trackers);
        Ok((
            Self {
                route: Route::Single(node),
            },
            tasks,
        ))
    }

    /// Sends `cmd` with `args` and returns the reply, failing after `budget` (at most the command
    /// time-out). `script`: the script an `EVALSHA` runs, loaded when the server does not know
    /// it (a new or restarted server). See [`Node::send`]; on a cluster, to the primary that owns
    /// the command's hash slot.
    pub(crate) async fn send(
        &self,
        command: &'static str,
        cmd: CustomCommand,
        args: Vec<Value>,
        script: Option<&Script>,
        budget: Duration,
    ) -> Result<Value, RedisError> {
        match &self.route {
            Route::Single(node) => node.send(command, &cmd, &args, script, budget).await,
            Route::Cluster(cluster) => cluster.send(command, &cmd, &args, script, budget).await,
        }
    }
}

/// The pool of one server, with whether each of its connections is up.
struct Node {
    pool: Pool,
    /// Per client of the pool: whether its connection is up.
    up: Arc<Vec<watch::Sender<bool>>>,
    /// Where the next command starts looking for a client that is up.
    next: AtomicUsize,
    command_timeout: Duration,
}

impl Node {
    /// Watches the connections of `pool` (connected: every client up), with the tasks that do.
    fn new(pool: Pool, command_timeout: Duration) -> (Self, Vec<AbortHandle>) {
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
        let node = Self {
            pool,
            up,
            next: AtomicUsize::new(0),
            command_timeout,
        };
        (node, tasks)
    }

    /// Whether `index`'s client is up.
    fn is_up(&self, index: usize) -> bool {
        self.up.get(index).is_some_and(|up| *up.borrow())
            && self
                .pool
                .clients()
                .get(index)
                .is_some_and(|client| client.is_connected())
    }

    /// Whether any client of the pool is up.
    fn any_up(&self) -> bool {
        (0..self.pool.clients().len()).any(|index| self.is_up(index))
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
    async fn send(
        &self,
        command: &'static str,
        cmd: &CustomCommand,
        args: &[Value],
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
                match with
                    .custom::<Value, Value>(cmd.clone(), args.to_vec())
                    .await
                {
                    Err(error) if error.details().starts_with("NOSCRIPT") && script.is_some() => {
                        if let Some(script) = script {
                            script.load(client).await?;
                        }
                        with.custom::<Value, Value>(cmd.clone(), args.to_vec())
                            .await
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

/// One primary of a cluster: its pool and the tasks that watch it. Dropped when no slot table
/// names it any more (and no command is on it): its pool is closed then.
struct Member {
    server: Server,
    node: Node,
    tasks: Vec<AbortHandle>,
}

impl Drop for Member {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        // Ends its reconnection loop too (a dead node's pool tries again for ever).
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let pool = self.node.pool.clone();
            let limit = self.node.command_timeout;
            runtime.spawn(async move {
                let _ =
                    tokio::time::timeout(limit, fred::interfaces::ClientLike::quit(&pool)).await;
            });
        }
    }
}

/// Which primary owns each hash slot.
struct Table {
    /// Per hash slot: the index in `members` of its primary, or [`NO_NODE`].
    slots: Vec<u16>,
    members: Vec<Arc<Member>>,
}

/// A Redis Cluster: a pool per primary, and the slot table.
struct Cluster {
    /// Builds the pool of a node (the cluster's configuration, with the node as its server).
    builder: Builder,
    size: usize,
    command_timeout: Duration,
    table: RwLock<Arc<Table>>,
    /// How many times the table was read: a command redirected waits for the next reading.
    readings: watch::Sender<u64>,
    /// Asks for a new reading of the table.
    wanted: Notify,
}

impl Cluster {
    /// Reads the slot table from the first seed node that answers and connects to its primaries;
    /// returns the task that keeps the table current.
    async fn connect(
        builder: &Builder,
        size: usize,
        command_timeout: Duration,
    ) -> Result<(Arc<Self>, AbortHandle), fred::error::Error> {
        let seeds = builder
            .get_config()
            .map(|config| config.server.hosts())
            .unwrap_or_default();
        let cluster = Arc::new(Self {
            builder: builder.clone(),
            size,
            command_timeout,
            table: RwLock::new(Arc::new(Table {
                slots: Vec::new(),
                members: Vec::new(),
            })),
            readings: watch::Sender::new(0),
            wanted: Notify::new(),
        });
        let mut last = fred::error::Error::new(
            fred::error::ErrorKind::Cluster,
            "the URL names no node of the cluster",
        );
        for seed in seeds {
            let member = cluster.join(seed)?;
            match cluster.read_table(&member).await {
                Ok(()) => {
                    let task = tokio::spawn(keep_current(Arc::clone(&cluster))).abort_handle();
                    return Ok((cluster, task));
                }
                Err(error) => last = error,
            }
        }
        Err(last)
    }

    /// The current slot table.
    fn table(&self) -> Arc<Table> {
        Arc::clone(&self.table.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// A pool for `server`, connecting (waiting for it at most the command time-out).
    fn join(&self, server: Server) -> Result<Arc<Member>, fred::error::Error> {
        let mut builder = self.builder.clone();
        let mut config = builder.get_config().cloned().unwrap_or_default();
        config.server = ServerConfig::Centralized {
            server: server.clone(),
        };
        builder.set_config(config);
        let pool = builder.build_pool(self.size)?;
        // Watched before it connects: no event is missed.
        let (node, mut tasks) = Node::new(pool, self.command_timeout);
        tasks.push(node.pool.connect().abort_handle());
        Ok(Arc::new(Member {
            server,
            node,
            tasks,
        }))
    }

    /// Reads the slot table with `CLUSTER SLOTS` on `from`'s node, and connects to the primaries
    /// that are new in it.
    async fn read_table(&self, from: &Arc<Member>) -> Result<(), fred::error::Error> {
        // A pool just made waits for its connection.
        let _ = tokio::time::timeout(self.command_timeout, from.node.pool.wait_for_connect()).await;
        let reply = from
            .node
            .send(
                "read the cluster's slots",
                &CustomCommand::new_static("CLUSTER", ClusterHash::Random, false),
                &[Value::from("SLOTS")],
                None,
                self.command_timeout,
            )
            .await
            .map_err(|error| match error {
                RedisError::Command { source, .. } => source,
                other => fred::error::Error::new(fred::error::ErrorKind::IO, other.to_string()),
            })?;
        let routing = ClusterRouting::from_cluster_slots(reply, from.server.host.clone())?;
        let current = self.table();
        let mut slots = vec![NO_NODE; SLOTS];
        let mut members: Vec<Arc<Member>> = Vec::new();
        let mut joined = Vec::new();
        for range in routing.slots() {
            let index = match members.iter().position(|m| m.server == range.primary) {
                Some(index) => index,
                None => {
                    let known = current
                        .members
                        .iter()
                        .chain(std::iter::once(from))
                        .find(|m| m.server == range.primary);
                    let member = match known {
                        Some(member) => Arc::clone(member),
                        None => {
                            let member = self.join(range.primary.clone())?;
                            joined.push(Arc::clone(&member));
                            member
                        }
                    };
                    members.push(member);
                    members.len() - 1
                }
            };
            let index = u16::try_from(index).unwrap_or(NO_NODE);
            for slot in range.start..=range.end {
                if let Some(owner) = slots.get_mut(usize::from(slot)) {
                    *owner = index;
                }
            }
        }
        // New primaries (a promoted replica) are given their connection time before commands go
        // to them.
        for member in &joined {
            let _ = tokio::time::timeout(self.command_timeout, member.node.pool.wait_for_connect())
                .await;
        }
        let changed = members.len() != current.members.len()
            || members
                .iter()
                .zip(&current.members)
                .any(|(new, old)| !Arc::ptr_eq(new, old))
            || slots != current.slots;
        if changed {
            tracing::debug!(
                primaries = members.len(),
                joined = joined.len(),
                "new cluster slot table"
            );
            *self.table.write().unwrap_or_else(PoisonError::into_inner) =
                Arc::new(Table { slots, members });
        }
        self.readings.send_modify(|readings| *readings += 1);
        Ok(())
    }

    /// Reads the slot table from the first live primary that answers.
    async fn refresh(&self) {
        let table = self.table();
        for member in table.members.iter().filter(|member| member.node.any_up()) {
            match self.read_table(member).await {
                Ok(()) => return,
                Err(error) => tracing::debug!(error = %error, "reading the cluster's slots failed"),
            }
        }
    }

    /// The primary that owns `slot`, if known.
    fn owner(&self, slot: u16) -> Option<Arc<Member>> {
        let table = self.table.read().unwrap_or_else(PoisonError::into_inner);
        let index = *table.slots.get(usize::from(slot))?;
        table.members.get(usize::from(index)).cloned()
    }

    /// [`Node::send`] on the primary that owns the command's slot; when the node redirects it
    /// (the slot moved), again on the new owner once the table is read again, at most
    /// [`MAX_REDIRECTS`] times. When the owner is down, it fails at once (and the table is read
    /// again: the slot may have moved).
    async fn send(
        &self,
        command: &'static str,
        cmd: &CustomCommand,
        args: &[Value],
        script: Option<&Script>,
        budget: Duration,
    ) -> Result<Value, RedisError> {
        let end = Instant::now() + budget.min(self.command_timeout);
        let slot = cmd.cluster_hash.hash(args).unwrap_or(0);
        let mut redirects = 0;
        loop {
            let readings = *self.readings.borrow();
            let Some(member) = self.owner(slot) else {
                self.wanted.notify_one();
                return Err(RedisError::NotConnected { command });
            };
            let left = end.saturating_duration_since(Instant::now());
            let result = member.node.send(command, cmd, args, script, left).await;
            match result {
                Err(RedisError::Command { source, .. })
                    if redirected(&source) && redirects < MAX_REDIRECTS =>
                {
                    redirects += 1;
                    tracing::debug!(command, error = %source, "redirected; reading the slots");
                    self.wanted.notify_one();
                    let mut read = self.readings.subscribe();
                    let _ =
                        tokio::time::timeout_at(end.into(), read.wait_for(|&now| now > readings))
                            .await;
                    if Instant::now() >= end {
                        return Err(RedisError::Command { command, source });
                    }
                }
                Err(RedisError::NotConnected { command }) => {
                    self.wanted.notify_one();
                    return Err(RedisError::NotConnected { command });
                }
                other => return other,
            }
        }
    }
}

/// Whether a cluster node answered that another node serves the command's slot.
fn redirected(error: &fred::error::Error) -> bool {
    let details = error.details();
    details.starts_with("MOVED ") || details.starts_with("ASK ")
}

/// Reads the slot table again when asked, and every [`CHECK_EVERY`] while a primary is down.
async fn keep_current(cluster: Arc<Cluster>) {
    loop {
        let degraded = cluster
            .table()
            .members
            .iter()
            .any(|member| !member.node.any_up());
        if degraded {
            let _ = tokio::time::timeout(CHECK_EVERY, cluster.wanted.notified()).await;
        } else {
            cluster.wanted.notified().await;
        }
        cluster.refresh().await;
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
