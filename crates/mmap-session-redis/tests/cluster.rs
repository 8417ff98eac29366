//! The backend on a real local Redis Cluster (3 primaries, started by the test on free ports):
//! the counter app over HTTP with sessions spread over the primaries, busy sessions handed over
//! between two backends through the shard channels, and a primary failed over to its replica
//! under load in four ways (`CLUSTER FAILOVER`, `… FORCE`, `… TAKEOVER` on the replica, SIGKILL of
//! the primary), each measured (promotion, 503s, lease time-outs and losses, acknowledged updates
//! lost) and checked for what the mechanism guarantees. Run with `-- --nocapture` to see the
//! measurements.
//!
//! The layer's own route tests run on a cluster too:
//! `MMAP_SESSION_TEST_REDIS=cluster cargo test -p mmap-session --test layer redis::`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{bounded, in_an_hour, request, serve, soon};
use mmap_session::{BackendError, BackendLease as _, SessionBackend as _};
use mmap_session_redis::test_server::RedisServer;
use mmap_session_redis::RedisBackend;

const LIMIT: Duration = Duration::from_secs(180);

/// How many keys `node` holds.
fn keys_on(node: &RedisServer) -> usize {
    let reply = node.raw_node_command("DBSIZE").unwrap();
    String::from_utf8_lossy(&reply)
        .trim()
        .trim_start_matches(':')
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_counter_app_counts_sessions_spread_over_three_primaries() {
    bounded(LIMIT, async {
        let cluster = RedisServer::start_cluster(3, 0).unwrap();
        let backend = RedisBackend::connect(&cluster.url()).await.unwrap();
        let port = serve(backend, Duration::from_secs(5)).await;
        let mut cookies = Vec::new();
        for _ in 0..24 {
            let first = request(port, "/", None).await;
            assert_eq!((first.status, first.body.as_str()), (200, "1"));
            cookies.push(first.cookie.unwrap());
        }
        for round in 2..=3 {
            for cookie in &cookies {
                let reply = request(port, "/", Some(cookie)).await;
                assert_eq!((reply.status, reply.body), (200, round.to_string()));
            }
        }
        let peek = request(port, "/peek", Some(&cookies[0])).await;
        assert_eq!((peek.status, peek.body.as_str()), (200, "3"));
        let holding: Vec<usize> = cluster.nodes().map(keys_on).collect();
        assert!(
            holding.iter().filter(|&&keys| keys > 0).count() >= 2,
            "sessions on one primary only: {holding:?}"
        );
        // One session, 16 requests at once: none lost.
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let cookie = cookies[1].clone();
                tokio::spawn(async move { request(port, "/", Some(&cookie)).await.status })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap(), 200);
        }
        let after = request(port, "/peek", Some(&cookies[1])).await;
        assert_eq!(after.body, "19");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_backends_on_a_cluster_hand_busy_sessions_over_and_lose_nothing() {
    bounded(LIMIT, async {
        let cluster = RedisServer::start_cluster(3, 0).unwrap();
        let backends = [
            RedisBackend::connect(&cluster.url()).await.unwrap(),
            RedisBackend::connect(&cluster.url()).await.unwrap(),
        ];
        let mut tasks = Vec::new();
        for i in 0..48 {
            let backend = backends[i % 2].clone();
            // Three sessions, in (almost surely) different slots.
            let key = format!("session-{}", i % 3);
            tasks.push(tokio::spawn(async move {
                for _ in 0..4 {
                    let mut lease = backend.lease(key.as_bytes(), soon(10_000)).await.unwrap();
                    let n: u64 = match lease.load().await.unwrap() {
                        Some(record) => String::from_utf8(record.value).unwrap().parse().unwrap(),
                        None => 0,
                    };
                    lease
                        .commit_and_release((n + 1).to_string().as_bytes(), in_an_hour())
                        .await
                        .unwrap();
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        for session in 0..3 {
            let key = format!("session-{session}");
            let record = backends[1]
                .get_unleased(key.as_bytes())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(record.value, b"64", "{key}");
        }
    })
    .await;
}

/// The failover tests run one at a time: each starts six nodes and loads them as hard as it can,
/// and what it measures (times, losses) is its own failover's only.
static FAILOVERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How many sessions the failover load updates.
const SESSIONS: usize = 12;

/// How a primary is failed over to its replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failover {
    /// `CLUSTER FAILOVER` on the replica: the primary stops its clients until the replica has
    /// caught up, then the replica takes over.
    Graceful,
    /// `CLUSTER FAILOVER FORCE` on the replica: it is elected without waiting for its primary.
    Force,
    /// `CLUSTER FAILOVER TAKEOVER` on the replica: it takes over without an election.
    Takeover,
    /// SIGKILL of the primary: the others find it failed after the node time-out (1 s) and its
    /// replica is elected.
    Crash,
}

/// One acknowledged update: which backend made it, when its lease was taken and when the update
/// was acknowledged, the count it wrote and the lease generation it wrote under.
#[derive(Clone, Copy, Debug)]
struct Ack {
    backend: usize,
    taken: Instant,
    at: Instant,
    count: u64,
    generation: u64,
}

/// The errors the load met, by kind.
#[derive(Debug)]
struct Tally {
    /// `Unavailable` (the layer's `503`), per session.
    unavailable: Vec<AtomicU64>,
    timed_out: AtomicU64,
    lost_lease: AtomicU64,
    /// Any other error (the layer's `500`): there must be none.
    other: Mutex<Vec<String>>,
}

/// The load of the failover tests: [`SESSIONS`] sessions, each incremented (read, add one,
/// commit and release, through the backend's lease) in a loop by one task on each of two
/// backends, as two application processes would. Every acknowledged update is recorded.
struct Load {
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    /// Per session, its acknowledged updates in the order they were acknowledged.
    acks: Arc<Vec<Mutex<Vec<Ack>>>>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(backends: &[RedisBackend]) -> Self {
        let tally = Arc::new(Tally {
            unavailable: (0..SESSIONS).map(|_| AtomicU64::new(0)).collect(),
            timed_out: AtomicU64::new(0),
            lost_lease: AtomicU64::new(0),
            other: Mutex::new(Vec::new()),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let acks: Arc<Vec<Mutex<Vec<Ack>>>> =
            Arc::new((0..SESSIONS).map(|_| Mutex::new(Vec::new())).collect());
        let mut workers = Vec::new();
        for (index, backend) in backends.iter().enumerate() {
            for session in 0..SESSIONS {
                let backend = backend.clone();
                let (tally, stop, acks) =
                    (Arc::clone(&tally), Arc::clone(&stop), Arc::clone(&acks));
                workers.push(tokio::spawn(async move {
                    let key = format!("load-{session}");
                    while !stop.load(Ordering::Relaxed) {
                        let attempt = async {
                            let mut lease = backend.lease(key.as_bytes(), soon(2_000)).await?;
                            let taken = Instant::now();
                            let generation = lease.generation();
                            let n = count_in(lease.load().await?);
                            lease
                                .commit_and_release((n + 1).to_string().as_bytes(), in_an_hour())
                                .await?;
                            Ok::<_, BackendError>((taken, n + 1, generation))
                        };
                        let error = match attempt.await {
                            Ok((taken, count, generation)) => {
                                let at = Instant::now();
                                acks[session].lock().unwrap().push(Ack {
                                    backend: index,
                                    taken,
                                    at,
                                    count,
                                    generation,
                                });
                                continue;
                            }
                            Err(error) => error,
                        };
                        match error {
                            BackendError::Unavailable(_) => {
                                tally.unavailable[session].fetch_add(1, Ordering::Relaxed);
                            }
                            BackendError::LeaseTimeout => {
                                tally.timed_out.fetch_add(1, Ordering::Relaxed);
                            }
                            BackendError::LeaseLost => {
                                tally.lost_lease.fetch_add(1, Ordering::Relaxed);
                            }
                            other => tally.other.lock().unwrap().push(format!("{other:?}")),
                        }
                        // A client that got an error does not hammer the cluster meanwhile.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }));
            }
        }
        Self {
            tally,
            stop,
            acks,
            workers,
        }
    }

    /// How many updates have been acknowledged so far.
    fn acknowledged(&self) -> usize {
        self.acks
            .iter()
            .map(|acks| acks.lock().unwrap().len())
            .sum()
    }

    /// Per session, the highest count acknowledged so far.
    fn highest(&self) -> Vec<u64> {
        self.acks
            .iter()
            .map(|acks| {
                acks.lock()
                    .unwrap()
                    .iter()
                    .map(|ack| ack.count)
                    .max()
                    .unwrap_or(0)
            })
            .collect()
    }

    /// Whether every session has an update acknowledged at or after `since`.
    fn all_served_since(&self, since: Instant) -> bool {
        self.acks
            .iter()
            .all(|acks| acks.lock().unwrap().iter().any(|ack| ack.at >= since))
    }

    /// Waits (polling) until `done` holds, failing the test after `limit` from `from` or as soon
    /// as the load met an error other than the expected ones.
    async fn wait(&self, from: Instant, limit: Duration, what: &str, done: impl Fn(&Self) -> bool) {
        while !done(self) {
            let other = self.tally.other.lock().unwrap().clone();
            assert!(
                other.is_empty(),
                "unexpected errors under failover: {other:?}"
            );
            assert!(from.elapsed() < limit, "{what} within {limit:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops the load and returns, per session, its acknowledged updates.
    async fn stop(self) -> Vec<Vec<Ack>> {
        self.stop.store(true, Ordering::Relaxed);
        for worker in self.workers {
            worker.await.unwrap();
        }
        let other = self.tally.other.lock().unwrap().clone();
        assert!(
            other.is_empty(),
            "unexpected errors under failover: {other:?}"
        );
        self.acks
            .iter()
            .map(|acks| acks.lock().unwrap().clone())
            .collect()
    }
}

/// The count a record holds (0 for none).
fn count_in(record: Option<mmap_session::StoredRecord>) -> u64 {
    record.map_or(0, |record| {
        String::from_utf8(record.value).unwrap().parse().unwrap()
    })
}

/// The node of `cluster` on `port`.
fn node(cluster: &RedisServer, port: u16) -> &RedisServer {
    cluster.nodes().find(|node| node.port() == port).unwrap()
}

/// The value of `field` in the node's `INFO replication`, if it answers.
fn replication(node: &RedisServer, field: &str) -> Option<String> {
    let reply = node.query("INFO replication").ok()?;
    let text = String::from_utf8_lossy(&reply).into_owned();
    let prefix = format!("{field}:");
    text.lines().find_map(|line| {
        line.strip_prefix(&prefix)
            .map(|value| value.trim().to_owned())
    })
}

/// What one failover under load did, as the test measured it.
#[derive(Debug)]
struct Outcome {
    /// Acknowledged updates whose increment is not in the final count (see [`lost_updates`]).
    lost: u64,
}

/// The acknowledged updates of one session that the final count `stored` does not include: an
/// acknowledged count that was acknowledged again later (the second increment did not see the
/// first: a lost update) or that is above `stored`. With nothing lost, the acknowledged counts
/// are 1, 2, … each once, and `stored` is the highest.
fn lost_updates(acks: &[Ack], stored: u64) -> Vec<u64> {
    let mut counts: Vec<u64> = acks.iter().map(|ack| ack.count).collect();
    counts.sort_unstable();
    let mut lost: Vec<u64> = counts
        .windows(2)
        .filter(|pair| pair[0] == pair[1])
        .map(|pair| pair[0])
        .collect();
    counts.dedup();
    lost.extend(counts.iter().filter(|&&count| count > stored));
    lost
}

/// Fails a primary that holds some of the load's sessions over to its replica, `kind`'s way,
/// under load, and measures what it cost. Asserts what holds for every kind: every update
/// acknowledged before the replica was seen to have caught up is kept, every session is served
/// again soon after the promotion (no lease is left stuck), the load goes on through the same
/// backends, and no error other than `Unavailable`, `LeaseTimeout` and `LeaseLost` is met.
async fn fail_over_under_load(kind: Failover) -> Outcome {
    let mut cluster = RedisServer::start_cluster(3, 1).unwrap();
    let backends = [
        RedisBackend::connect(&cluster.url()).await.unwrap(),
        RedisBackend::connect(&cluster.url()).await.unwrap(),
    ];
    let load = Load::start(&backends);
    let started = Instant::now();
    load.wait(started, Duration::from_secs(60), "500 updates", |load| {
        load.acknowledged() >= 500
    })
    .await;

    // The victim: the primary (not the first node, which the URL names first) holding the most
    // sessions, and its replica.
    let records: Vec<String> = (0..SESSIONS)
        .map(|session| {
            let hash = blake3::hash(format!("load-{session}").as_bytes()).to_hex();
            format!("{}{{{hash}}}", backends[0].key_prefix())
        })
        .collect();
    // Per session, whether `node` holds it.
    let holds = |node: &RedisServer| -> Vec<bool> {
        records
            .iter()
            .map(|record| node.query(&format!("EXISTS {record}")).unwrap() == b":1\r\n")
            .collect()
    };
    let (held, primary, on_victim) = cluster
        .nodes()
        .skip(1)
        .filter(|node| replication(node, "role").as_deref() == Some("master"))
        .map(|node| {
            let on = holds(node);
            (on.iter().filter(|&&on| on).count(), node.port(), on)
        })
        .max()
        .unwrap();
    assert!(held > 0, "no session on a primary other than the first");
    let replica = cluster
        .nodes()
        .find(|node| replication(node, "master_port") == Some(primary.to_string()))
        .unwrap()
        .port();

    // The replicated point: every update acknowledged before it is on the replica.
    let kept = load.highest();
    let before = load.acknowledged();
    let offset: u64 = replication(node(&cluster, primary), "master_repl_offset")
        .unwrap()
        .parse()
        .unwrap();
    let caught_up = Instant::now();
    while replication(node(&cluster, replica), "slave_repl_offset")
        .and_then(|applied| applied.parse::<u64>().ok())
        .is_none_or(|applied| applied < offset)
    {
        assert!(
            caught_up.elapsed() < Duration::from_secs(10),
            "the replica never caught up"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let in_window = load.acknowledged() - before;

    let event = Instant::now();
    match kind {
        Failover::Crash => cluster.kill_node(primary).unwrap(),
        Failover::Graceful | Failover::Force | Failover::Takeover => {
            let command = match kind {
                Failover::Force => "CLUSTER FAILOVER FORCE",
                Failover::Takeover => "CLUSTER FAILOVER TAKEOVER",
                _ => "CLUSTER FAILOVER",
            };
            let answer = node(&cluster, replica).query(command).unwrap();
            assert_eq!(String::from_utf8_lossy(&answer), "+OK\r\n", "{command}");
        }
    }
    while replication(node(&cluster, replica), "role").as_deref() != Some("master") {
        assert!(
            event.elapsed() < Duration::from_secs(30),
            "no promotion within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let promoted = Instant::now();

    // No lease is left stuck: every session is served again soon after the promotion (a lease
    // held on the old primary is released, or expires by its TTL). And the load goes on: as many
    // updates again are acknowledged after the promotion as before it.
    load.wait(promoted, RECOVERY, "every session served again", |load| {
        load.all_served_since(promoted)
    })
    .await;
    let acknowledged = load.acknowledged();
    load.wait(
        promoted,
        Duration::from_secs(120),
        "the load going on",
        |load| load.acknowledged() >= acknowledged + before,
    )
    .await;
    let tally = Arc::clone(&load.tally);
    let acks = load.stop().await;

    // Per session: what it lost, and how it was served around the failover.
    let mut lost = 0;
    let mut twice = 0;
    let mut at_once = 0;
    let mut generations_again = 0;
    // Per group (sessions on the failed primary, the others): the longest any of them waited
    // after the promotion for its first update, the longest pause between two updates of one of
    // them that ended after the failover began, their 503s.
    let mut recovered = [Duration::ZERO; 2];
    let mut pause = [Duration::ZERO; 2];
    let mut unavailable = [0; 2];
    for (session, acks) in acks.iter().enumerate() {
        let key = format!("load-{session}");
        let stored = count_in(backends[0].get_unleased(key.as_bytes()).await.unwrap());
        let missing = lost_updates(acks, stored);
        // Guaranteed: what the replica had when the primary went is kept.
        assert!(
            missing.iter().all(|&count| count > kept[session]),
            "{key}: lost {missing:?}, though every count up to {} was on the replica",
            kept[session]
        );
        lost += missing.len() as u64;
        for (i, a) in acks.iter().enumerate() {
            for b in &acks[i + 1..] {
                if a.count == b.count {
                    twice += 1;
                    // Two holders at once, each acknowledged: the two backends held the lease
                    // over overlapping times (as each saw it).
                    if a.backend != b.backend && a.taken < b.at && b.taken < a.at {
                        at_once += 1;
                    }
                }
                if a.generation == b.generation {
                    generations_again += 1;
                }
            }
        }
        let group = usize::from(!on_victim[session]);
        let first_after = acks.iter().find(|ack| ack.at >= promoted).unwrap().at;
        recovered[group] = recovered[group].max(first_after - promoted);
        pause[group] = acks
            .windows(2)
            .filter(|pair| pair[1].at >= event)
            .map(|pair| pair[1].at - pair[0].at)
            .fold(pause[group], Duration::max);
        unavailable[group] += tally.unavailable[session].load(Ordering::Relaxed);
    }
    println!(
        "{kind:?} failover under load: {} updates acknowledged in {:.2?}; replica promoted \
         {:.2?} after the {}.\n  \
         {held} of {SESSIONS} sessions on the failed primary: first update {:.2?} after the \
         promotion at the latest, longest pause {:.2?}, {} unavailable (503).\n  \
         The other sessions: first update {:.2?} after the promotion at the latest, longest \
         pause {:.2?}, {} unavailable (503).\n  \
         {} lease time-outs, {} leases lost; {in_window} updates acknowledged between the \
         replicated point and the failover; {lost} acknowledged updates lost ({twice} counts \
         acknowledged twice, {at_once} of them by two holders at once); {generations_again} lease \
         generations given twice.",
        acks.iter().map(Vec::len).sum::<usize>(),
        started.elapsed(),
        promoted - event,
        if kind == Failover::Crash {
            "SIGKILL"
        } else {
            "command"
        },
        recovered[0],
        pause[0],
        unavailable[0],
        recovered[1],
        pause[1],
        unavailable[1],
        tally.timed_out.load(Ordering::Relaxed),
        tally.lost_lease.load(Ordering::Relaxed),
    );
    Outcome { lost }
}

/// How soon after a promotion every session must be served again: the lease TTL (2 s; a lease
/// held on the old primary, replicated, whose holder's release failed, expires by it), plus the
/// client's reconnection (at most 1 s apart) and its new view of the slots, with room for a
/// loaded machine. It is there to catch a lease that never expires, not to time the recovery
/// (which the test prints).
const RECOVERY: Duration = Duration::from_secs(2 + 5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_failed_over_under_load_loses_no_acknowledged_update() {
    let _alone = FAILOVERS.lock().await;
    let outcome = bounded(LIMIT, fail_over_under_load(Failover::Graceful)).await;
    // `CLUSTER FAILOVER` waits for the replica to have everything the primary acknowledged.
    assert_eq!(outcome.lost, 0, "{outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_failover_under_load_loses_at_most_what_was_not_replicated() {
    let _alone = FAILOVERS.lock().await;
    bounded(LIMIT, fail_over_under_load(Failover::Force)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_under_load_loses_at_most_what_was_not_replicated() {
    let _alone = FAILOVERS.lock().await;
    bounded(LIMIT, fail_over_under_load(Failover::Takeover)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_under_load_loses_at_most_what_was_not_replicated() {
    let _alone = FAILOVERS.lock().await;
    bounded(LIMIT, fail_over_under_load(Failover::Crash)).await;
}

/// A primary that dies takes only its own slots' sessions away: the other primaries still serve
/// theirs. The cluster here has no replicas and does not require every slot to be covered
/// (`cluster-require-full-coverage no`), so Redis itself goes on serving the other primaries'
/// slots; with the default (`yes`), it too refuses every key from when the dead node is marked
/// failed (after the node time-out) until a replica takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_primary_leaves_the_sessions_of_the_other_primaries_served() {
    bounded(LIMIT, async {
        let mut cluster =
            RedisServer::start_cluster_with(3, 0, &["--cluster-require-full-coverage", "no"])
                .unwrap();
        let backend = RedisBackend::connect(&cluster.url()).await.unwrap();
        let update = |key: String| {
            let backend = backend.clone();
            async move {
                let mut lease = backend.lease(key.as_bytes(), soon(2_000)).await?;
                let n = count_in(lease.load().await?);
                lease
                    .commit_and_release((n + 1).to_string().as_bytes(), in_an_hour())
                    .await
            }
        };
        for session in 0..SESSIONS {
            update(format!("dead-{session}")).await.unwrap();
        }
        // The primary (not the first node) that holds some of the sessions, killed.
        let record = |session: usize| {
            let hash = blake3::hash(format!("dead-{session}").as_bytes()).to_hex();
            format!("{}{{{hash}}}", backend.key_prefix())
        };
        let on = |node: &RedisServer, session: usize| {
            node.query(&format!("EXISTS {}", record(session))).unwrap() == b":1\r\n"
        };
        let (dead, port) = cluster
            .nodes()
            .skip(1)
            .map(|node| {
                let held: Vec<usize> = (0..SESSIONS).filter(|&s| on(node, s)).collect();
                (held, node.port())
            })
            .find(|(held, _)| !held.is_empty())
            .unwrap();
        cluster.kill_node(port).unwrap();
        let killed = Instant::now();
        // Each session of the other primaries is updated again within 10 s.
        let mut slowest = Duration::ZERO;
        let mut failed = 0;
        for session in (0..SESSIONS).filter(|session| !dead.contains(session)) {
            let mut errors = 0;
            while let Err(error) = update(format!("dead-{session}")).await {
                errors += 1;
                if killed.elapsed() >= Duration::from_secs(10) {
                    // Redis itself serves it: its primary answers a read of its record.
                    let owner = cluster.nodes().find(|node| on(node, session)).unwrap();
                    let direct = owner.query(&format!("GET {}", record(session))).unwrap();
                    panic!(
                        "dead-{session} not served 10 s after another primary died, though its \
                         own primary answers a GET of its record ({:?}): {errors} errors, the \
                         last {error:?}",
                        String::from_utf8_lossy(direct.split(|&b| b == b'\r').next().unwrap())
                    );
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            failed += errors;
            slowest = slowest.max(killed.elapsed());
        }
        println!(
            "{} of {SESSIONS} sessions on the killed primary; the other {} each updated within \
             {slowest:.2?} of the SIGKILL (one after the other), {failed} failed tries",
            dead.len(),
            SESSIONS - dead.len()
        );
    })
    .await;
}
