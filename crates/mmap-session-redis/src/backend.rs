//! [`RedisBackend`] and [`RedisLease`]: the layer's storage trait on Redis.

use std::fmt;
use std::pin::pin;
use std::sync::{Arc, PoisonError, Weak};
use std::time::{Duration, Instant, SystemTime};

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use fred::interfaces::ClientLike as _;
use fred::prelude::{Builder, Config, ReconnectPolicy, Value};
use fred::types::config::UnresponsiveConfig;
use fred::types::scripts::Script;
use fred::types::{ClusterHash, CustomCommand};
use mmap_session::{BackendError, BackendLease, SessionBackend, StoredRecord};
use tokio::task::{AbortHandle, JoinHandle};

use crate::chain::{Chain, Failure, Write};
use crate::config::{redacted, RedisConfig};
use crate::connections::Connections;
use crate::keys::SessionKeys;
use crate::record;
use crate::scripts::Scripts;
use crate::wake::{self, TurnGuard, Waiters};
use crate::watchdog::{self, Watch, Watched};
use crate::RedisError;

/// How long a waiter waits before trying again when the held lease has no TTL (which only
/// another program writing the key can cause).
const FALLBACK_WAIT: Duration = Duration::from_millis(250);
/// The shortest lease TTL: renewed every third of it, at least every millisecond.
const MIN_LEASE_TTL: Duration = Duration::from_millis(3);
/// The least time an acquire is given, even when the caller's deadline is nearer: a try that
/// could not possibly answer in time would only fail.
const MIN_ACQUIRE_BUDGET: Duration = Duration::from_millis(100);
/// How long before its entry in a session's queue lapses a waiter refreshes it, at most: the
/// entry lives for the lease TTL, and the refresh (a try) must reach Redis before then.
const REFRESH_MARGIN: Duration = Duration::from_millis(100);
/// The least time a renewal is given, however near its lease is to lapsing.
const MIN_RENEW_BUDGET: Duration = Duration::from_millis(10);
/// How soon a renewal that failed (timed out on a connection that stalled, or found no
/// connection up) is tried again, at most, while its lease has not lapsed.
const RENEW_RETRY: Duration = Duration::from_millis(20);
/// How many hand-overs in a row within one process go on although a request of another process
/// may wait: bounds how long a busy process keeps a session from the others. The hand-overs of a
/// run do not wait for their writes' round trips, so a run of 32 takes about as long as 32
/// handlers (well under a millisecond each for a counter) plus a round trip or two; each hand-over
/// to another process costs a release, a message and an acquire (measured: a hot session on 3
/// processes served 5,868 req/s with runs of 8, 13,775 with runs of 32, BENCHMARKS.md).
const KEEP_RUN: u32 = 32;
/// What the log says when a lease is taken that its previous holder never released.
const TAKEOVER: &str = "took over an expired lease that its holder never released";

/// Sessions in Redis (or Valkey), with the same busy lease per session as the memory-mapped store:
/// a [`SessionBackend`] for [`SessionLayer::new`](mmap_session::SessionLayer::new), for sessions
/// shared by processes on several machines.
///
/// A cheap clone: clones share the connection pool. See the crate documentation for what is kept
/// in Redis and what is guaranteed.
///
/// # Examples
///
/// ```no_run
/// use axum::{routing::get, Router};
/// use mmap_session::{Session, SessionError, SessionLayer};
/// use mmap_session_redis::RedisBackend;
///
/// async fn count(session: Session) -> Result<String, SessionError> {
///     let n: u64 = session.get("n").await?.unwrap_or(0) + 1;
///     session.insert("n", n).await?;
///     Ok(format!("visit {n}"))
/// }
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let backend = RedisBackend::connect("redis://127.0.0.1:6379").await?;
/// let app: Router = Router::new().route("/", get(count)).layer(SessionLayer::new(backend));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

struct Inner {
    connections: Connections,
    /// The held leases to renew, in the order they are due.
    renewals: Arc<watchdog::Queue<Renewal>>,
    scripts: Scripts,
    waiters: Arc<Waiters>,
    prefix: String,
    lease_timeout: Duration,
    lease_ttl: Duration,
    command_timeout: Duration,
    /// How long a cancel marker lives: longer than a cancelled acquire can stay on its way.
    marker_life: Duration,
    max_value_len: usize,
    /// The connection, subscription and dispatch tasks, stopped when the last clone goes.
    tasks: Vec<AbortHandle>,
    url: String,
    /// Tasks sending the queued writes of a run of hand-overs that have not ended yet.
    senders: Arc<AtomicUsize>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("url", &redacted(&self.inner.url))
            .field("key_prefix", &self.inner.prefix)
            .field("lease_timeout", &self.inner.lease_timeout)
            .field("lease_ttl", &self.inner.lease_ttl)
            .field("max_value_len", &self.inner.max_value_len)
            .finish_non_exhaustive()
    }
}

impl RedisBackend {
    /// Connects to the server at `url` with the defaults of [`RedisConfig::new`].
    ///
    /// # Errors
    ///
    /// See [`RedisConfig::connect`].
    pub async fn connect(url: &str) -> Result<Self, RedisError> {
        RedisConfig::new(url).connect().await
    }

    /// A configuration to adjust before connecting: the same as [`RedisConfig::new`].
    pub fn builder(url: impl Into<String>) -> RedisConfig {
        RedisConfig::new(url)
    }

    pub(crate) async fn from_config(config: RedisConfig) -> Result<Self, RedisError> {
        if config.pool_size == 0 {
            return Err(RedisError::Config("the pool needs at least one connection"));
        }
        if config.lease_timeout.as_millis() == 0 {
            return Err(RedisError::Config(
                "the lease time-out must be at least 1 ms",
            ));
        }
        if config.lease_ttl < MIN_LEASE_TTL {
            return Err(RedisError::Config("the lease TTL must be at least 3 ms"));
        }
        let server =
            Config::from_url(&config.url).map_err(|source| RedisError::InvalidUrl { source })?;
        let mut builder = Builder::from_config(server);
        builder
            .with_connection_config(|connection| {
                connection.connection_timeout = config.command_timeout;
                connection.internal_command_timeout = config.command_timeout;
                // A connection that stops answering (a host gone without closing it) is closed and
                // made again, instead of every later command timing out on it.
                connection.unresponsive = UnresponsiveConfig {
                    max_timeout: Some(config.command_timeout),
                    interval: (config.command_timeout / 4).max(Duration::from_millis(10)),
                };
            })
            .with_performance_config(|performance| {
                performance.default_command_timeout = config.command_timeout;
            })
            // Reconnect for ever (10 ms to 1 s apart). Meanwhile commands are not queued for the
            // reconnection: with no connection up they fail at once (`NotConnected`).
            .set_policy(ReconnectPolicy::new_exponential(0, 10, 1_000, 2));
        let connect = |source| RedisError::Connect { source };
        let subscriber = builder.build_subscriber_client().map_err(connect)?;
        let (connections, mut tasks) =
            Connections::connect(&builder, config.pool_size, config.command_timeout)
                .await
                .map_err(connect)?;
        tasks.push(subscriber.init().await.map_err(connect)?.abort_handle());
        tasks.push(subscriber.manage_subscriptions().abort_handle());
        let (waiters, subscriptions) = Waiters::new(subscriber.clone());
        let waiters = Arc::new(waiters);
        tasks.push(tokio::spawn(subscriptions).abort_handle());
        tasks.push(tokio::spawn(wake::dispatch(&subscriber, Arc::clone(&waiters))).abort_handle());
        tracing::debug!(
            url = %redacted(&config.url),
            prefix = %config.key_prefix,
            "connected to Redis"
        );
        let renewals = Arc::new(watchdog::Queue::default());
        Ok(Self {
            inner: Arc::new_cyclic(|inner| {
                // Holds the backend weakly: it ends with the last clone (its handle is aborted
                // then too).
                tasks.push(
                    tokio::spawn(watchdog(Weak::clone(inner), Arc::clone(&renewals)))
                        .abort_handle(),
                );
                Inner {
                    connections,
                    renewals,
                    scripts: Scripts::new(),
                    waiters,
                    prefix: config.key_prefix,
                    lease_timeout: config.lease_timeout,
                    lease_ttl: config.lease_ttl.min(config.lease_timeout),
                    command_timeout: config.command_timeout,
                    marker_life: config
                        .lease_timeout
                        .saturating_add(config.command_timeout.saturating_mul(2)),
                    max_value_len: config.max_value_len,
                    tasks,
                    url: config.url,
                    senders: Arc::new(AtomicUsize::new(0)),
                }
            }),
        })
    }

    /// The prefix of every key this backend writes.
    pub fn key_prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// Test hook: how many requests of this process wait for their turn at `key`'s session
    /// behind another request of this process. Lets a test wait until a request has lined up,
    /// instead of sleeping.
    #[cfg(feature = "test-server")]
    #[doc(hidden)]
    pub fn requests_waiting_for_turn(&self, key: &[u8]) -> usize {
        let keys = SessionKeys::new(&self.inner.prefix, key);
        self.inner.waiters.queued(&keys.hash)
    }

    /// Test hook: how many tasks sending the queued writes of a run of hand-overs have not
    /// ended yet.
    #[cfg(feature = "test-server")]
    #[doc(hidden)]
    pub fn write_senders_running(&self) -> usize {
        self.inner.senders.load(Ordering::SeqCst)
    }
}

impl Inner {
    /// Runs one of the scripts on `keys`, failing after `budget` (at most the command time-out);
    /// sent again if a connection breaks under it (the scripts are idempotent per token).
    async fn run(
        &self,
        script: &Script,
        command: &'static str,
        keys: Vec<String>,
        args: Vec<Value>,
        budget: Duration,
    ) -> Result<Value, RedisError> {
        // Every key of a script is in the session's slot (one hash tag): the first one names it.
        let slot = keys
            .first()
            .map_or(0, |key| fred::util::redis_keyslot(key.as_bytes()));
        let mut all: Vec<Value> = Vec::with_capacity(2 + keys.len() + args.len());
        all.push(Value::from(script.sha1().clone()));
        all.push(Value::from(i64::try_from(keys.len()).unwrap_or(i64::MAX)));
        all.extend(keys.into_iter().map(Value::from));
        all.extend(args);
        self.connections
            .send(
                command,
                CustomCommand::new_static("EVALSHA", ClusterHash::Custom(slot), false),
                all,
                Some(script),
                budget,
            )
            .await
    }

    /// Runs a one-key read (`GET`, `EXISTS`) on `key`.
    async fn read(&self, command: &'static str, key: &str) -> Result<Value, RedisError> {
        self.connections
            .send(
                command,
                CustomCommand::new_static(command, ClusterHash::FirstKey, false),
                vec![Value::from(key)],
                None,
                self.command_timeout,
            )
            .await
    }

    /// One try at the lease; with `only_existing`, only if the record exists.
    async fn try_acquire(
        &self,
        keys: &SessionKeys,
        token: &str,
        only_existing: bool,
        budget: Duration,
        entry_life: Duration,
    ) -> Result<Attempt, RedisError> {
        let generation_life = self
            .lease_timeout
            .saturating_mul(2)
            .saturating_add(Duration::from_secs(10));
        let reply = self
            .run(
                &self.scripts.acquire,
                "acquire lease",
                keys.for_token(token),
                vec![
                    Value::from(token),
                    Value::from(millis(self.lease_ttl)),
                    Value::from(millis(generation_life)),
                    Value::from(if only_existing { "1" } else { "0" }),
                    Value::from(millis(entry_life)),
                ],
                budget,
            )
            .await?;
        let unexpected = |reply: &Value| RedisError::UnexpectedReply {
            command: "acquire lease",
            reply: format!("{:?}", reply.kind()),
        };
        let Value::Array(parts) = &reply else {
            return Err(unexpected(&reply));
        };
        match parts.as_slice() {
            [Value::Integer(2)] => Ok(Attempt::Absent),
            [Value::Integer(3)] => Ok(Attempt::Cancelled),
            [Value::Integer(0), Value::Integer(pttl)] => Ok(Attempt::Held {
                remaining: u64::try_from(*pttl).ok().map(Duration::from_millis),
            }),
            [Value::Integer(4), Value::Integer(ms)] => Ok(Attempt::Queued {
                head_life: Duration::from_millis(u64::try_from(*ms).unwrap_or_default()),
            }),
            [Value::Integer(1), Value::Integer(generation), Value::Integer(overdue), rest @ ..] => {
                let stored = match rest {
                    [] | [Value::Null] => None,
                    [value] => Some(value.as_bytes().ok_or_else(|| unexpected(&reply))?.to_vec()),
                    _ => return Err(unexpected(&reply)),
                };
                Ok(Attempt::Taken {
                    generation: u64::try_from(*generation).unwrap_or_default(),
                    overdue: *overdue == 1,
                    stored,
                })
            }
            _ => Err(unexpected(&reply)),
        }
    }

    /// Releases the lease of `token` on `keys`, if it still holds it (waiters of other processes
    /// are woken by the published message, this process's next one by its turn). `cancelled`: the
    /// taking of the lease did not complete (its caller went away or failed before the acquire's
    /// answer), so the acquire may still be on its way: leave the token's cancel marker.
    async fn release(&self, keys: &SessionKeys, token: &str, cancelled: bool) {
        let args = vec![
            Value::from(token),
            Value::from(if cancelled { "1" } else { "0" }),
            Value::from(millis(self.marker_life)),
            Value::from(keys.release_channel()),
            Value::from(keys.hash.as_str()),
        ];
        match self
            .run(
                &self.scripts.release,
                "release lease",
                keys.for_token(token),
                args,
                self.command_timeout,
            )
            .await
        {
            Ok(Value::Integer(1)) => {}
            Ok(_) => {
                tracing::debug!(
                    key = keys.short(),
                    "lease not released: it was no longer held"
                );
            }
            Err(error) => tracing::warn!(
                key = keys.short(),
                error = %error,
                "cannot release a session lease; it expires by its TTL"
            ),
        }
    }

    /// Sends the pending write of `chain`, a run of hand-overs of the lease of `token`, as
    /// `step` says, once the run's script on its way (if any) has returned: in a task of its own,
    /// so that the outcome is recorded even if the caller goes away.
    async fn chain_step(
        self: &Arc<Self>,
        keys: &SessionKeys,
        token: &str,
        chain: &Arc<Chain>,
        step: Step,
        own: Option<Write>,
    ) -> Result<After, Failure> {
        let task = tokio::spawn({
            let inner = Arc::clone(self);
            let keys = keys.clone();
            let token = token.to_owned();
            let chain = Arc::clone(chain);
            async move {
                let _sending = chain.sending.lock().await;
                inner
                    .chain_step_locked(&keys, &token, &chain, step, chain.supersede(own))
                    .await
            }
        });
        task.await.unwrap_or_else(|error| {
            // Only a runtime shutting down ends the task early.
            let failure = Failure::Failed {
                unavailable: false,
                reason: format!("the task sending the write ended early: {error}"),
            };
            chain.fail(failure.clone());
            Err(failure)
        })
    }

    /// [`Inner::chain_step`], with the run's sending lock held: sends `write` (taken by
    /// [`Chain::next_to_send`] or [`Chain::supersede`]) as `step` says, and records its outcome.
    /// A step that ends the lease (`Release`, or `KeepUnlessOthersWait` when it fails) releases
    /// it in any case.
    async fn chain_step_locked(
        &self,
        keys: &SessionKeys,
        token: &str,
        chain: &Chain,
        step: Step,
        write: Option<Write>,
    ) -> Result<After, Failure> {
        if let Some(failure) = chain.failure() {
            if step != Step::Keep {
                self.release(keys, token, false).await;
            }
            return Err(failure);
        }
        let Some(write) = write else {
            // Sent (and confirmed) by an earlier step already.
            return match step {
                Step::Release => {
                    self.release(keys, token, false).await;
                    Ok(After::Released)
                }
                Step::Keep | Step::KeepUnlessOthersWait => Ok(After::Kept),
            };
        };
        let (script, command, args) = match (step, write.record) {
            (Step::Release, record) => {
                let mut args = vec![
                    Value::from(token),
                    Value::from(if record.is_some() { "1" } else { "0" }),
                    Value::from(""),
                    Value::from(keys.release_channel()),
                    Value::from(keys.hash.as_str()),
                ];
                if let Some((stored, ttl)) = record {
                    args.push(Value::Bytes(stored.into()));
                    args.push(Value::from(millis(ttl)));
                }
                (&self.scripts.commit_release, "commit and release", args)
            }
            (Step::Keep | Step::KeepUnlessOthersWait, Some((stored, ttl))) => (
                &self.scripts.commit_keep,
                "commit and hand over",
                vec![
                    Value::from(token),
                    Value::Bytes(stored.into()),
                    Value::from(millis(ttl)),
                    Value::from(keys.release_channel()),
                    Value::from(keys.hash.as_str()),
                    Value::from(millis(self.lease_ttl)),
                    Value::from(if step == Step::Keep { "1" } else { "0" }),
                ],
            ),
            (Step::Keep | Step::KeepUnlessOthersWait, None) => (
                &self.scripts.remove,
                "remove record",
                vec![Value::from(token)],
            ),
        };
        let reply = self
            .run(
                script,
                command,
                keys.for_token(token),
                args,
                self.command_timeout,
            )
            .await;
        let failure = match reply {
            Ok(Value::Integer(1)) => {
                chain.confirm(write.number);
                return Ok(if step == Step::Release {
                    After::Released
                } else {
                    After::Kept
                });
            }
            // Written, then released to a request of another process.
            Ok(Value::Integer(2)) if step == Step::KeepUnlessOthersWait => {
                chain.confirm(write.number);
                return Ok(After::Released);
            }
            // The lease is someone else's (or was released): nothing was written.
            Ok(Value::Integer(0 | 2)) => {
                tracing::warn!(
                    key = keys.short(),
                    "the session's lease expired before the write; nothing was written"
                );
                chain.fail(Failure::Lost);
                return Err(Failure::Lost);
            }
            Ok(other) => Failure::Failed {
                unavailable: false,
                reason: RedisError::UnexpectedReply {
                    command,
                    reply: format!("{:?}", other.kind()),
                }
                .to_string(),
            },
            Err(error) => Failure::Failed {
                unavailable: error.is_unavailable(),
                reason: error.to_string(),
            },
        };
        chain.fail(failure.clone());
        if step != Step::Keep {
            // Whether the write was made is unknown; the lease goes either way (a late copy of
            // the write finds it released and writes nothing).
            self.release(keys, token, false).await;
        }
        Err(failure)
    }

    /// Queues a write (`record`, or `None` to delete the record) in `chain`, the run of
    /// hand-overs of the lease of `token`, starting the task that sends the queued writes if
    /// none runs; returns the write's number.
    fn queue_write(
        self: &Arc<Self>,
        keys: &SessionKeys,
        token: &str,
        chain: &Arc<Chain>,
        record: Option<(Vec<u8>, Duration)>,
    ) -> u64 {
        let (number, start) = chain.queue(record);
        if start {
            let inner = Arc::clone(self);
            let keys = keys.clone();
            let token = token.to_owned();
            let chain = Arc::clone(chain);
            // Made before the task: dropped unpolled (its runtime shutting down), the task drops
            // it too, and the run fails instead of waiting for a sender that never runs.
            let unfinished = Unfinished::new(&chain, &self.senders);
            tokio::spawn(async move {
                // Ends when nothing is queued; what it sends records its outcome.
                loop {
                    let _sending = chain.sending.lock().await;
                    let Some(write) = chain.next_to_send() else {
                        break;
                    };
                    let _ = inner
                        .chain_step_locked(&keys, &token, &chain, Step::Keep, Some(write))
                        .await;
                }
                unfinished.finished();
            });
        }
        number
    }

    fn decode(&self, keys: &SessionKeys, stored: &[u8]) -> Option<StoredRecord> {
        match record::decode(stored, SystemTime::now()) {
            Ok(record) => record,
            Err(record::Malformed) => {
                tracing::warn!(
                    key = keys.short(),
                    len = stored.len(),
                    "a stored session record is too short to be one; treating it as absent"
                );
                None
            }
        }
    }
}

/// What one try at a lease found.
enum Attempt {
    /// The record was asked to exist and does not; nothing was taken.
    Absent,
    /// The taking was cancelled (its release ran first); nothing was taken.
    Cancelled,
    /// Someone else holds it, for `remaining` more (`None`: no expiry on the lease key); the
    /// caller is in the session's queue.
    Held { remaining: Option<Duration> },
    /// It is free, but a waiter of another process comes first, whose entry in the queue lapses
    /// in `head_life` unless refreshed; the caller is in the queue behind it.
    Queued { head_life: Duration },
    /// It is ours now.
    Taken {
        generation: u64,
        overdue: bool,
        stored: Option<Vec<u8>>,
    },
}

/// What a script of a run of hand-overs (a [`Chain`]) does besides its write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Keeps the lease, for the run's next request (which already has it).
    Keep,
    /// Keeps the lease unless a request of another process waits for it: then releases it.
    KeepUnlessOthersWait,
    /// Releases the lease: the run ends.
    Release,
}

/// Where the lease is after a script of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum After {
    /// Still held by the run's token.
    Kept,
    /// Released.
    Released,
}

/// The error a request gets when its run of hand-overs failed: the lease lost, or the cause of
/// the failed write (the request that made it gets that; the later ones started from it).
fn failure_error(failure: Failure) -> BackendError {
    match failure {
        Failure::Lost => BackendError::LeaseLost,
        Failure::Failed {
            unavailable,
            reason,
        } => RedisError::PipelinedWriteFailed {
            unavailable,
            reason,
        }
        .into(),
    }
}

/// Fails the run of a task that sends its queued writes if the task ends before it is done
/// (dropped with the runtime, started or not): no request waits for an outcome that would never
/// come.
struct Unfinished {
    chain: Option<Arc<Chain>>,
    /// The backend's count of sender tasks not ended, which this one is part of until dropped.
    senders: Arc<AtomicUsize>,
}

impl Unfinished {
    fn new(chain: &Arc<Chain>, senders: &Arc<AtomicUsize>) -> Self {
        senders.fetch_add(1, Ordering::SeqCst);
        Self {
            chain: Some(Arc::clone(chain)),
            senders: Arc::clone(senders),
        }
    }

    /// The task is done: nothing to fail.
    fn finished(mut self) {
        self.chain = None;
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        self.senders.fetch_sub(1, Ordering::SeqCst);
        if let Some(chain) = self.chain.take() {
            chain.fail(Failure::Failed {
                unavailable: false,
                reason: "the task sending the session's writes ended early (the runtime is \
                         shutting down)"
                    .to_owned(),
            });
        }
    }
}

/// How often at most a waiter tries again while it waits, to refresh its entry in the session's
/// queue (which lives for `lease_ttl`): `lease_ttl` less a quarter of it, or less 100 ms if that
/// is smaller.
fn refresh_every(lease_ttl: Duration) -> Duration {
    lease_ttl.saturating_sub((lease_ttl / 4).min(REFRESH_MARGIN))
}

/// Milliseconds, rounded up, at least 1 (a TTL of 0 would be refused or expire at once).
fn millis(duration: Duration) -> i64 {
    let ms = duration.as_micros().div_ceil(1000).max(1);
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// 128 random bits, in hex: whose a lease is.
fn new_token() -> Result<String, BackendError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|error| {
        BackendError::Io(std::io::Error::other(format!(
            "the OS random number generator failed: {error}"
        )))
    })?;
    Ok(hex(&bytes))
}

/// `bytes` in lower-case hex.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    text
}

/// A lease that may be held on the server: released when dropped unless disarmed.
///
/// Dropping runs the release script as a task on the current tokio runtime; without a runtime the
/// lease expires by its TTL.
struct Holding {
    inner: Arc<Inner>,
    keys: SessionKeys,
    token: String,
    armed: bool,
    /// Whether the acquire's answer was received: until then, the release leaves the token's
    /// cancel marker.
    confirmed: bool,
    /// The lease's entry in the watchdog's queue while it is held: renewed until dropped.
    watchdog: Option<Watch<Renewal>>,
    /// This request's turn at the session in this process, and its registration: given back
    /// once the lease is released, or by the watchdog once the lease has lapsed, so that the next
    /// request of this process tries then.
    turn: Arc<TurnSlot>,
    /// The writes of the run of hand-overs this lease is part of, once its first write was
    /// queued there (see [`Chain`]): then every write and the release go through it, in order.
    chain: Option<Arc<Chain>>,
}

/// A turn at a session in this process, while its lease is held.
type TurnSlot = std::sync::Mutex<Option<TurnGuard>>;

/// Takes the turn out of `slot`, to give it back.
fn take_turn(slot: &TurnSlot) -> Option<TurnGuard> {
    slot.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take()
}

fn turn_slot(turn: Option<TurnGuard>) -> Arc<TurnSlot> {
    Arc::new(std::sync::Mutex::new(turn))
}

/// A lease handed from a request that finished to the next request of the same process, without
/// a release and a new acquire: its token keeps holding it in Redis (with the same generation).
/// Dropped without being taken, it is released.
pub(crate) struct Handover {
    holding: Holding,
    generation: u64,
    stored: Option<Vec<u8>>,
    /// How many hand-overs in a row led to this one.
    run: u32,
    /// When the lease's TTL was last set, at the latest: its watchdog counts from then.
    counted_from: Instant,
}

impl fmt::Debug for Handover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handover")
            .field("key", &self.holding.keys.short())
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Holding {
    /// Starts releasing the lease (once), in a task of its own so that it completes even if the
    /// caller is cancelled. `None` if there is nothing to release or no runtime to do it on.
    fn start_release(&mut self) -> Option<JoinHandle<()>> {
        self.end_with(None)
    }

    /// [`Holding::start_release`], sending `own` (numbered in the lease's run) with the release
    /// where the lease is part of a run of hand-overs.
    fn end_with(&mut self, own: Option<Write>) -> Option<JoinHandle<()>> {
        let watch = self.watchdog.take();
        let turn = take_turn(&self.turn);
        if !std::mem::replace(&mut self.armed, false) {
            return None;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::debug!(
                key = self.keys.short(),
                "no tokio runtime to release a lease on; it expires by its TTL"
            );
            return None;
        };
        let inner = Arc::clone(&self.inner);
        let keys = self.keys.clone();
        let token = self.token.clone();
        if let Some(chain) = self.chain.clone() {
            // The run's last write (if one is pending) goes with the release, after the script
            // on its way; the lease is renewed until then.
            return Some(runtime.spawn(async move {
                let _sending = chain.sending.lock().await;
                let _ = inner
                    .chain_step_locked(&keys, &token, &chain, Step::Release, chain.supersede(own))
                    .await;
                drop(watch);
                drop(turn);
            }));
        }
        drop(watch);
        let cancelled = !self.confirmed;
        Some(runtime.spawn(async move {
            inner.release(&keys, &token, cancelled).await;
            drop(turn);
        }))
    }
}

impl Handover {
    /// Releases the handed-over lease (nobody took it).
    async fn release(mut self) {
        if let Some(task) = self.holding.start_release() {
            let _ = task.await;
        }
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        drop(self.start_release());
    }
}

/// What renewing one held lease needs.
pub(crate) struct Renewal {
    keys: SessionKeys,
    token: String,
    /// `lease_timeout` after the lease was taken: the last renewal makes it lapse exactly then.
    end: Instant,
    /// Set when a renewal finds the lease gone or someone else's: ends the holder's right to
    /// write.
    lost: Arc<AtomicBool>,
    /// The holder's turn in this process, given back once the lease is lost or past its time-out.
    turn: Arc<TurnSlot>,
    /// When the lease lapses unless renewed again, counted from when the last renewal that
    /// succeeded was sent (or from when the acquire was sent): what a renewal try may take.
    lapses_at: std::sync::Mutex<Instant>,
}

impl Inner {
    /// Has the lease of `token` renewed every third of the lease TTL, from `taken`, until the
    /// returned guard is dropped, at most until `lease_timeout` after `taken`.
    fn watch(
        &self,
        keys: &SessionKeys,
        token: &str,
        taken: Instant,
        lost: &Arc<AtomicBool>,
        turn: &Arc<TurnSlot>,
    ) -> Watch<Renewal> {
        let renewal = Renewal {
            keys: keys.clone(),
            token: token.to_owned(),
            end: taken + self.lease_timeout,
            lost: Arc::clone(lost),
            turn: Arc::clone(turn),
            lapses_at: std::sync::Mutex::new(taken + self.lease_ttl),
        };
        self.renewals.watch(renewal, taken + self.lease_ttl / 3)
    }
}

/// The lease watchdog: renews each lease in `inner`'s queue when it is due, each renewal in a
/// task of its own so that a slow one holds up no other. Ends with the backend.
async fn watchdog(inner: Weak<Inner>, queue: Arc<watchdog::Queue<Renewal>>) {
    loop {
        let due = queue.next_due().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        tokio::spawn(renew(inner, due));
    }
}

/// One renewal of a held lease, then queued again for the next one a third of the lease TTL
/// later. Past `lease_timeout` the lease is no longer renewed. A renewal that finds the lease gone
/// or someone else's sets `lost`, which ends the holder's right to write; either way (lost, or
/// past the time-out) the holder's turn in this process is given back.
///
/// A try may take a quarter of the time left before the lease lapses (and at most a renewal
/// period): one that fails (a connection that stalled, none up) is tried again soon, on the next
/// connection, several times while the lease has not lapsed, and a period later once it has (the scripts' token check
/// fences any write made after the lease lapsed).
async fn renew(inner: Arc<Inner>, due: Arc<Watched<Renewal>>) {
    let every = inner.lease_ttl / 3;
    let Renewal {
        keys,
        token,
        end,
        lost,
        turn,
        lapses_at,
    } = &due.lease;
    let lapses = *lapses_at.lock().unwrap_or_else(PoisonError::into_inner);
    let now = Instant::now();
    if now >= *end {
        tracing::warn!(
            key = keys.short(),
            timeout = ?inner.lease_timeout,
            "a request held its session's lease for the whole lease time-out; the lease is no \
             longer renewed and its changes will not be saved"
        );
        // The next request of this process may try now (and take the lease once it lapses).
        drop(take_turn(turn));
        return;
    }
    let ttl = inner.lease_ttl.min(*end - now);
    let budget = (lapses.saturating_duration_since(now) / 4).clamp(MIN_RENEW_BUDGET, every);
    let renewal = inner
        .run(
            &inner.scripts.renew,
            "renew lease",
            keys.for_token(token),
            vec![Value::from(token.as_str()), Value::from(millis(ttl))],
            budget,
        )
        .await;
    if due.is_done() {
        // Released, committed or handed over meanwhile: nothing more to do.
        return;
    }
    match renewal {
        Ok(Value::Integer(1)) => {
            *lapses_at.lock().unwrap_or_else(PoisonError::into_inner) = now + ttl;
        }
        Ok(_) => {
            lost.store(true, Ordering::SeqCst);
            tracing::warn!(
                key = keys.short(),
                "the session's lease expired before it could be renewed; its changes will not be \
                 saved"
            );
            drop(take_turn(turn));
            return;
        }
        Err(error) => {
            tracing::warn!(
                key = keys.short(),
                error = %error,
                "cannot renew a session lease; trying again"
            );
            let now = Instant::now();
            if now < lapses {
                inner.renewals.requeue(due, now + RENEW_RETRY.min(every));
                return;
            }
        }
    }
    inner.renewals.requeue(due, Instant::now() + every);
}

impl RedisBackend {
    /// Takes the lease of `key`, waiting until `deadline`; with `only_existing`, only while the
    /// record exists (`None` once it does not, without any lease).
    async fn lease_when(
        &self,
        key: &[u8],
        deadline: Instant,
        only_existing: bool,
    ) -> Result<Option<RedisLease>, BackendError> {
        let inner = &self.inner;
        let keys = SessionKeys::new(&inner.prefix, key);
        let token = new_token()?;
        let waiting = inner.waiters.register(&keys.hash);
        let notify = Arc::clone(&waiting.notify);
        // The requests of this process take turns, in arrival order; only the one whose turn it
        // is talks to Redis, and a finishing one may hand its lease over.
        let (turn, handed) = waiting
            .turn(tokio::time::Instant::from_std(deadline))
            .await
            .map_err(|()| BackendError::LeaseTimeout)?;
        if let Some(handover) = handed {
            let failed = handover
                .holding
                .chain
                .as_ref()
                .is_some_and(|chain| chain.failure().is_some());
            if !failed {
                return Ok(self.adopt(handover, turn, only_existing));
            }
            // A write of the run it belongs to failed: the record it holds may not be Redis's.
            // Released (after the run's scripts), then taken from Redis as any other.
            handover.release().await;
        }
        let mut turn = Some(turn);
        // Release messages name the waiter at the head of the session's queue by its token.
        if let Some(turn) = &turn {
            turn.waiting().queue_as(&token);
        }
        let mut subscribed = false;
        // Armed while a try may be running in Redis or this caller may be in the session's queue:
        // if this future is dropped, or gives up, the guard's release takes back what the acquire
        // may have taken and takes the token out of the queue (and leaves the cancel marker, so
        // that a try still on its way does neither).
        let mut holding = Holding {
            inner: Arc::clone(inner),
            keys: keys.clone(),
            token: token.clone(),
            armed: false,
            confirmed: false,
            watchdog: None,
            turn: turn_slot(None),
            chain: None,
        };
        let mut queued = false;
        loop {
            // Registered before the try, so that a release right after it is not missed.
            let mut released = pin!(notify.notified());
            released.as_mut().enable();
            holding.armed = true;
            let sent = Instant::now();
            let budget = deadline
                .saturating_duration_since(sent)
                .max(MIN_ACQUIRE_BUDGET);
            // The caller's entry in the queue lives for the lease TTL, or until its deadline if
            // that is nearer: a waiter that dies or gives up keeps nobody waiting for longer.
            let entry_life = deadline
                .saturating_duration_since(sent)
                .min(inner.lease_ttl);
            let attempt = inner
                .try_acquire(&keys, &token, only_existing, budget, entry_life)
                .await?;
            let wait = match attempt {
                Attempt::Absent => {
                    // Nothing taken; a caller that queued before leaves the queue (dropping
                    // the armed guard).
                    holding.armed = queued;
                    return Ok(None);
                }
                Attempt::Cancelled => {
                    // Only a release of this token leaves its marker, and this call has not
                    // released it: another program wrote the key.
                    holding.armed = false;
                    return Err(RedisError::UnexpectedReply {
                        command: "acquire lease",
                        reply: "cancelled by a release this caller never sent".to_owned(),
                    }
                    .into());
                }
                Attempt::Taken {
                    generation,
                    overdue,
                    stored,
                } => {
                    holding.confirmed = true;
                    holding.turn = turn_slot(turn.take());
                    if overdue && generation > 1 {
                        // Its holder stopped renewing it: dead, stopped or cut off from Redis.
                        metrics::counter!("mmap_session_takeovers_total", "reason" => "lease_expired")
                            .increment(1);
                        tracing::warn!(key = keys.short(), generation, "{TAKEOVER}");
                    }
                    // The server set the TTL after `sent`: counting from `sent` errs early.
                    let lost = Arc::new(AtomicBool::new(false));
                    holding.watchdog = Some(inner.watch(&keys, &token, sent, &lost, &holding.turn));
                    return Ok(Some(RedisLease {
                        holding,
                        generation,
                        stored,
                        lost,
                        handovers: 0,
                    }));
                }
                // Queued: until the message, or the held lease's TTL runs out (an expiry
                // publishes nothing)...
                Attempt::Held { remaining } => remaining.map_or(FALLBACK_WAIT, |remaining| {
                    remaining.saturating_add(Duration::from_millis(1))
                }),
                // ... or the entry of the waiter ahead lapses (it died or went away).
                Attempt::Queued { head_life } => head_life.saturating_add(Duration::from_millis(1)),
            };
            queued = true;
            if !subscribed {
                // Subscribed to the session's releases, then tried again at once: a release
                // between the try and the subscription is seen by the new try. A subscription
                // that an earlier request of this process put in place was there all along: no
                // second try.
                subscribed = true;
                let in_place = match &turn {
                    Some(turn) => turn.waiting().subscribe(&keys).await,
                    None => false,
                };
                if !in_place {
                    continue;
                }
            }
            let now = Instant::now();
            if now >= deadline {
                // Out of the queue before the caller hears of it (best effort: the entry lapses
                // at the deadline anyway).
                if let Some(task) = holding.start_release() {
                    let _ = task.await;
                }
                return Err(BackendError::LeaseTimeout);
            }
            // Woken by the release message; the other wake-ups are the lapses above, and the
            // refresh of this caller's own entry in the queue before it lapses: no polling while
            // the holder is alive and renews.
            let wait = wait.min(refresh_every(inner.lease_ttl)).min(deadline - now);
            tokio::select! {
                () = released => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}

impl RedisBackend {
    /// Makes a lease handed over by the previous request of this process this request's.
    fn adopt(
        &self,
        handover: Handover,
        turn: TurnGuard,
        only_existing: bool,
    ) -> Option<RedisLease> {
        let Handover {
            mut holding,
            generation,
            stored,
            run,
            counted_from,
        } = handover;
        holding.turn = turn_slot(Some(turn));
        if only_existing && stored.is_none() {
            // Released (then the turn given on) when dropped.
            return None;
        }
        let lost = Arc::new(AtomicBool::new(false));
        holding.watchdog = Some(self.inner.watch(
            &holding.keys,
            &holding.token,
            counted_from,
            &lost,
            &holding.turn,
        ));
        Some(RedisLease {
            holding,
            generation,
            stored,
            lost,
            handovers: run,
        })
    }
}

impl SessionBackend for RedisBackend {
    type Lease = RedisLease;

    async fn lease(&self, key: &[u8], deadline: Instant) -> Result<RedisLease, BackendError> {
        self.lease_when(key, deadline, false).await?.ok_or_else(|| {
            BackendError::Other(
                "the acquire script found no record, which was not asked for".into(),
            )
        })
    }

    /// One round trip for the presence check and the lease: the acquire script checks both.
    async fn lease_existing(
        &self,
        key: &[u8],
        deadline: Instant,
    ) -> Result<Option<RedisLease>, BackendError> {
        self.lease_when(key, deadline, true).await
    }

    /// One round trip, and no lease: the insert script writes the record only if the key has
    /// neither a lease nor a record, and answers `false` at once otherwise.
    async fn insert_new(
        &self,
        key: &[u8],
        value: &[u8],
        expires_at: SystemTime,
        _deadline: Instant,
    ) -> Result<bool, BackendError> {
        let inner = &self.inner;
        if value.len() > inner.max_value_len {
            return Err(BackendError::TooLarge {
                len: value.len(),
                max: inner.max_value_len,
            });
        }
        let ttl = match expires_at.duration_since(SystemTime::now()) {
            Ok(ttl) if !ttl.is_zero() => ttl,
            // Already expired: there is nothing to store, and nothing was in the way.
            _ => return Ok(true),
        };
        let keys = SessionKeys::new(&inner.prefix, key);
        let reply = inner
            .run(
                &inner.scripts.insert,
                "insert record",
                vec![
                    keys.lease.clone(),
                    keys.generation.clone(),
                    keys.record.clone(),
                ],
                vec![
                    Value::Bytes(record::encode(value, expires_at).into()),
                    Value::from(millis(ttl)),
                ],
                inner.command_timeout,
            )
            .await?;
        match reply {
            Value::Integer(1) => Ok(true),
            Value::Integer(0) => Ok(false),
            other => Err(RedisError::UnexpectedReply {
                command: "insert record",
                reply: format!("{:?}", other.kind()),
            }
            .into()),
        }
    }

    async fn get_unleased(&self, key: &[u8]) -> Result<Option<StoredRecord>, BackendError> {
        let keys = SessionKeys::new(&self.inner.prefix, key);
        let stored = self.inner.read("GET", &keys.record).await?;
        Ok(match stored.as_bytes() {
            Some(bytes) => self.inner.decode(&keys, bytes),
            None => None,
        })
    }

    async fn exists(&self, key: &[u8]) -> Result<bool, BackendError> {
        let keys = SessionKeys::new(&self.inner.prefix, key);
        match self.inner.read("EXISTS", &keys.record).await? {
            Value::Integer(count) => Ok(count > 0),
            other => Err(RedisError::UnexpectedReply {
                command: "EXISTS",
                reply: format!("{:?}", other.kind()),
            }
            .into()),
        }
    }
}

/// A held busy lease on one session in Redis.
///
/// Dropping it without [`BackendLease::release`] releases it all the same, from a task spawned on
/// the current tokio runtime; where no runtime is running, the lease expires by its TTL instead.
/// While it is held, a task renews it (see [`RedisConfig::lease_ttl`]).
pub struct RedisLease {
    holding: Holding,
    generation: u64,
    /// The stored record as read when the lease was taken, kept up to date by commit and remove
    /// (nobody else writes it while the lease is held).
    stored: Option<Vec<u8>>,
    /// Set by the watchdog when a renewal found the lease gone: no write is tried any more.
    lost: Arc<AtomicBool>,
    /// How many hand-overs within this process in a row led to this lease.
    handovers: u32,
}

impl fmt::Debug for RedisLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLease")
            .field("key", &self.holding.keys.short())
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl RedisLease {
    /// The lease's fencing generation: it increases with every lease taken on the session.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Runs a write script that checks the lease first, with the token in front of `args`.
    async fn fenced(
        &mut self,
        script: fn(&Scripts) -> &Script,
        command: &'static str,
        args: Vec<Value>,
    ) -> Result<(), BackendError> {
        let holding = &self.holding;
        let inner = &holding.inner;
        if self.lost.load(Ordering::SeqCst) {
            return Err(BackendError::LeaseLost);
        }
        let mut all = vec![Value::from(holding.token.as_str())];
        all.extend(args);
        match inner
            .run(
                script(&inner.scripts),
                command,
                holding.keys.for_token(&holding.token),
                all,
                inner.command_timeout,
            )
            .await?
        {
            Value::Integer(1) => Ok(()),
            Value::Integer(0) => {
                tracing::warn!(
                    key = holding.keys.short(),
                    generation = self.generation,
                    "the session's lease expired before the write; nothing was written"
                );
                Err(BackendError::LeaseLost)
            }
            other => Err(RedisError::UnexpectedReply {
                command,
                reply: format!("{:?}", other.kind()),
            }
            .into()),
        }
    }
}

impl RedisLease {
    /// A write (`record`, or `None` to delete the record) by the holder of a lease that is part
    /// of a run of hand-overs: after the run's earlier writes, keeping the lease.
    async fn chained(
        &mut self,
        chain: &Arc<Chain>,
        record: Option<(Vec<u8>, Duration)>,
    ) -> Result<(), BackendError> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(BackendError::LeaseLost);
        }
        let holding = &self.holding;
        let number = holding
            .inner
            .queue_write(&holding.keys, &holding.token, chain, record);
        chain.settled(number).await.map_err(failure_error)
    }

    /// Writes `stored` and hands the lease to the next request of this process waiting for the
    /// session. For the first [`KEEP_RUN`] hand-overs of a run, at once: the write is queued in
    /// the run's [`Chain`] and goes to Redis while the next request runs, and this one answers
    /// once it is confirmed. After that, only once the write's script has answered, and only if
    /// no request of another process waits: then the script releases the lease to them (and the
    /// next request here takes its turn at Redis); if nobody did, a new run begins.
    async fn commit_and_hand_over(
        mut self,
        stored: Vec<u8>,
        ttl: Duration,
    ) -> Result<(), BackendError> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(BackendError::LeaseLost);
        }
        let pipelined = self.handovers < KEEP_RUN;
        let holding = &mut self.holding;
        let inner = Arc::clone(&holding.inner);
        let chain = Arc::clone(holding.chain.get_or_insert_with(Arc::default));
        let record = Some((stored.clone(), ttl));
        let (number, own) = if pipelined {
            (
                inner.queue_write(&holding.keys, &holding.token, &chain, record),
                None,
            )
        } else {
            let own = chain.number_last(record);
            (own.number, Some(own))
        };
        let watched = holding.watchdog.take();
        let (run, counted_from) = if pipelined {
            // The lease's TTL was last set when its last renewal (or the acquire) was sent, at
            // the latest; the write on its way sets it again.
            let counted_from = watched.as_ref().map_or_else(Instant::now, |watch| {
                let lapses_at = *watch
                    .lease()
                    .lapses_at
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                lapses_at
                    .checked_sub(inner.lease_ttl)
                    .unwrap_or_else(Instant::now)
            });
            (self.handovers + 1, counted_from.min(Instant::now()))
        } else {
            let sent = Instant::now();
            match inner
                .chain_step(
                    &holding.keys,
                    &holding.token,
                    &chain,
                    Step::KeepUnlessOthersWait,
                    own,
                )
                .await
            {
                // Nobody of another process waited: a new run.
                Ok(After::Kept) => (0, sent),
                Ok(After::Released) => {
                    // Released to a request of another process; the turn goes on when dropped.
                    holding.armed = false;
                    return Ok(());
                }
                Err(failure) => {
                    // Released already, or not ours any more.
                    holding.armed = false;
                    return Err(failure_error(failure));
                }
            }
        };
        drop(watched);
        // The lease goes to the next request with the token, as it stands.
        holding.armed = false;
        let handover = Handover {
            holding: Holding {
                inner: Arc::clone(&inner),
                keys: holding.keys.clone(),
                token: holding.token.clone(),
                armed: true,
                confirmed: true,
                watchdog: None,
                turn: turn_slot(None),
                chain: Some(Arc::clone(&chain)),
            },
            generation: self.generation,
            stored: Some(stored),
            run,
            counted_from,
        };
        match take_turn(&holding.turn) {
            Some(turn) => {
                if let Some(back) = turn.hand_over(handover) {
                    // The next one went away meanwhile: the run ends here, with this write.
                    back.release().await;
                }
            }
            None => handover.release().await,
        }
        chain.settled(number).await.map_err(failure_error)
    }

    /// Ends a lease that is part of a run of hand-overs: queues `record` (`None`: delete the
    /// record) as the run's last write, which goes with the release, and waits for its outcome.
    async fn end_run(
        mut self,
        chain: &Arc<Chain>,
        record: Option<(Vec<u8>, Duration)>,
    ) -> Result<(), BackendError> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(BackendError::LeaseLost);
        }
        let own = chain.number_last(record);
        let number = own.number;
        if let Some(task) = self.holding.end_with(Some(own)) {
            // A failed join means the runtime is shutting down; the outcome below says so.
            let _ = task.await;
        }
        match chain.outcome(number) {
            Some(outcome) => outcome.map_err(failure_error),
            None => Err(RedisError::UnexpectedReply {
                command: "commit and release",
                reply: "no outcome recorded for the write (the runtime is shutting down)"
                    .to_owned(),
            }
            .into()),
        }
    }

    /// Runs the commit-and-release script with `write` (the write flag, then the record and its
    /// TTL when it writes), and ends the lease whatever the outcome.
    async fn finish(&mut self, write: Vec<Value>) -> Result<(), BackendError> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(BackendError::LeaseLost);
        }
        let holding = &mut self.holding;
        drop(holding.watchdog.take());
        let inner = Arc::clone(&holding.inner);
        let mut args = write.into_iter();
        let flag = args.next().unwrap_or_else(|| Value::from("0"));
        let all = vec![
            Value::from(holding.token.as_str()),
            flag,
            Value::from(""),
            Value::from(holding.keys.release_channel()),
            Value::from(holding.keys.hash.as_str()),
        ]
        .into_iter()
        .chain(args)
        .collect();
        let reply = inner
            .run(
                &inner.scripts.commit_release,
                "commit and release",
                holding.keys.for_token(&holding.token),
                all,
                inner.command_timeout,
            )
            .await;
        match reply {
            Ok(Value::Integer(1)) => {
                // Released by the script: nothing left to do when dropped.
                holding.armed = false;
                Ok(())
            }
            Ok(Value::Integer(0)) => {
                holding.armed = false;
                tracing::warn!(
                    key = holding.keys.short(),
                    generation = self.generation,
                    "the session's lease expired before the write; nothing was written"
                );
                Err(BackendError::LeaseLost)
            }
            // Whether it ran is unknown: dropping the lease sends a release, which is harmless
            // if it did.
            Ok(other) => Err(RedisError::UnexpectedReply {
                command: "commit and release",
                reply: format!("{:?}", other.kind()),
            }
            .into()),
            Err(error) => Err(error.into()),
        }
    }
}

impl BackendLease for RedisLease {
    async fn load(&mut self) -> Result<Option<StoredRecord>, BackendError> {
        Ok(match &self.stored {
            Some(stored) => self.holding.inner.decode(&self.holding.keys, stored),
            None => None,
        })
    }

    async fn commit(&mut self, value: &[u8], expires_at: SystemTime) -> Result<(), BackendError> {
        let max = self.holding.inner.max_value_len;
        if value.len() > max {
            return Err(BackendError::TooLarge {
                len: value.len(),
                max,
            });
        }
        // The TTL is relative, from this machine's clock, so that a clock difference with the
        // Redis host does not shift it; the absolute expiry travels in the value.
        let Ok(ttl) = expires_at.duration_since(SystemTime::now()) else {
            // Already expired: what is left to store is nothing.
            return self.remove().await;
        };
        if ttl.is_zero() {
            return self.remove().await;
        }
        let stored = record::encode(value, expires_at);
        if let Some(chain) = self.holding.chain.clone() {
            // After the run's earlier writes, in order.
            self.chained(&chain, Some((stored.clone(), ttl))).await?;
            self.stored = Some(stored);
            return Ok(());
        }
        self.fenced(
            |scripts| &scripts.commit,
            "commit record",
            vec![
                Value::Bytes(stored.clone().into()),
                Value::from(millis(ttl)),
            ],
        )
        .await?;
        self.stored = Some(stored);
        Ok(())
    }

    async fn remove(&mut self) -> Result<(), BackendError> {
        if let Some(chain) = self.holding.chain.clone() {
            self.chained(&chain, None).await?;
            self.stored = None;
            return Ok(());
        }
        self.fenced(|scripts| &scripts.remove, "remove record", Vec::new())
            .await?;
        self.stored = None;
        Ok(())
    }

    /// One round trip: the write and the release in one script.
    async fn commit_and_release(
        mut self,
        value: &[u8],
        expires_at: SystemTime,
    ) -> Result<(), BackendError> {
        let max = self.holding.inner.max_value_len;
        if value.len() > max {
            self.release().await;
            return Err(BackendError::TooLarge {
                len: value.len(),
                max,
            });
        }
        match expires_at.duration_since(SystemTime::now()) {
            Ok(ttl) if !ttl.is_zero() => {
                let stored = record::encode(value, expires_at);
                let inner = &self.holding.inner;
                if inner.waiters.has_queued(&self.holding.keys.hash) {
                    return self.commit_and_hand_over(stored, ttl).await;
                }
                if let Some(chain) = self.holding.chain.clone() {
                    return self.end_run(&chain, Some((stored, ttl))).await;
                }
                self.finish(vec![
                    Value::from("1"),
                    Value::Bytes(stored.into()),
                    Value::from(millis(ttl)),
                ])
                .await
            }
            // Already expired: what is left to store is nothing.
            _ => self.remove_and_release().await,
        }
    }

    /// One round trip: the removal and the release in one script.
    async fn remove_and_release(mut self) -> Result<(), BackendError> {
        if let Some(chain) = self.holding.chain.clone() {
            return self.end_run(&chain, None).await;
        }
        self.finish(vec![Value::from("0")]).await
    }

    async fn release(mut self) {
        if let Some(task) = self.holding.start_release() {
            // A failed join means the runtime is shutting down; the lease then expires.
            let _ = task.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lower_case_two_digits_per_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(hex(&[]), "");
    }
}
