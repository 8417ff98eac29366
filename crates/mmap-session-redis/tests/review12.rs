//! Attacks on the insert script, the lease watchdog, the queue of waiters and cluster routing,
//! through a fault proxy in front of a real redis-server, and on a real cluster with a primary
//! stopped by SIGSTOP: each test states the promise it tries to break. Three of them failed when
//! they were written (a replayed insert bringing back a removed session, renewals lost to one
//! stalled connection, and in the unit tests of `watchdog.rs` an entry queued in front of the
//! one the watchdog slept for); they pass since the fixes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{bounded, in_an_hour, request, serve, soon};
use mmap_session::{BackendLease as _, SessionBackend as _};
use mmap_session_redis::fault_proxy::{Fault, FaultProxy};
use mmap_session_redis::test_server::{script_sha1, RedisServer};
use mmap_session_redis::{RedisBackend, RedisConfig};

/// How long any one test of this file may take.
const LIMIT: Duration = Duration::from_secs(60);

/// The default key prefix of the backend.
const PREFIX: &str = "mmap-session:";

/// The Redis name of the lease of the layer's key `key` (default prefix).
fn lease_key(key: &[u8]) -> Vec<u8> {
    format!("{PREFIX}{{{}}}:lease", blake3::hash(key).to_hex()).into_bytes()
}

/// A rule matcher: `EVALSHA` of the script `name` whose first key is the lease of `key`.
fn script_on(name: &str, key: &[u8]) -> impl Fn(&[Vec<u8>]) -> bool + Send + Sync + 'static {
    let sha = script_sha1(name).unwrap().into_bytes();
    let lease = lease_key(key);
    move |command: &[Vec<u8>]| {
        matches!(command, [evalsha, s, _, first, ..]
            if evalsha.eq_ignore_ascii_case(b"EVALSHA")
                && s.eq_ignore_ascii_case(&sha)
                && *first == lease)
    }
}

/// Loads the insert script into the server (an unknown script's first `EVALSHA` answers
/// `NOSCRIPT` without running), so that the rules below act on runs of the script.
async fn warm_up(backend: &RedisBackend) {
    assert!(backend
        .insert_new(b"warm-up", b"x", in_an_hour(), soon(5_000))
        .await
        .unwrap());
}

/// An insert whose reply is lost is sent again (the connection broke under it): the replay must
/// answer "written", and the record must be the inserted bytes.
#[tokio::test]
async fn an_insert_whose_reply_is_lost_is_written_once_and_answers_written() {
    bounded(LIMIT, async {
        let server = RedisServer::start().unwrap();
        let proxy = FaultProxy::start(server.port()).await.unwrap();
        let backend = RedisBackend::connect(&proxy.url()).await.unwrap();
        warm_up(&backend).await;
        let dropped = proxy.add_rule(Fault::DropReply, 1, script_on("insert", b"new"));
        let inserted = backend
            .insert_new(b"new", b"first", in_an_hour(), soon(5_000))
            .await
            .unwrap();
        dropped.completed(1).await;
        assert!(
            inserted,
            "the replay of an insert that ran answered 'in use'"
        );
        let record = backend.get_unleased(b"new").await.unwrap().unwrap();
        assert_eq!(record.value, b"first");
    })
    .await;
}

/// An insert that ran, whose reply was lost, and whose replay is held back while a later request
/// takes the lease, writes and releases: the replay must not overwrite the later write.
#[tokio::test]
async fn a_replayed_insert_does_not_overwrite_a_later_write() {
    bounded(LIMIT, async {
        let server = RedisServer::start().unwrap();
        let proxy = FaultProxy::start(server.port()).await.unwrap();
        let backend = RedisBackend::connect(&proxy.url()).await.unwrap();
        warm_up(&backend).await;
        let direct = RedisBackend::connect(&server.url()).await.unwrap();
        let dropped = proxy.add_rule(Fault::DropReply, 1, script_on("insert", b"new"));
        let replay = proxy.add_rule(Fault::Hold, 1, script_on("insert", b"new"));
        let insert = tokio::spawn({
            let backend = backend.clone();
            async move {
                backend
                    .insert_new(b"new", b"first", in_an_hour(), soon(5_000))
                    .await
            }
        });
        dropped.completed(1).await;
        replay.matched(1).await;
        // The first run wrote: a later request finds the record and changes it.
        let mut lease = direct
            .lease_existing(b"new", soon(2_000))
            .await
            .unwrap()
            .expect("the first run of the insert wrote nothing");
        assert_eq!(lease.load().await.unwrap().unwrap().value, b"first");
        lease
            .commit_and_release(b"later", in_an_hour())
            .await
            .unwrap();
        replay.open();
        let answer = insert.await.unwrap();
        println!("the replayed insert answered {answer:?}");
        let record = direct.get_unleased(b"new").await.unwrap().unwrap();
        assert_eq!(
            record.value, b"later",
            "the replayed insert overwrote a later write"
        );
    })
    .await;
}

/// The same, but the later request removes the session (a logout): the replay must not bring the
/// removed session back.
#[tokio::test]
async fn a_replayed_insert_does_not_bring_back_a_removed_session() {
    bounded(LIMIT, async {
        let server = RedisServer::start().unwrap();
        let proxy = FaultProxy::start(server.port()).await.unwrap();
        let backend = RedisBackend::connect(&proxy.url()).await.unwrap();
        warm_up(&backend).await;
        let direct = RedisBackend::connect(&server.url()).await.unwrap();
        let dropped = proxy.add_rule(Fault::DropReply, 1, script_on("insert", b"new"));
        let replay = proxy.add_rule(Fault::Hold, 1, script_on("insert", b"new"));
        let insert = tokio::spawn({
            let backend = backend.clone();
            async move {
                backend
                    .insert_new(b"new", b"first", in_an_hour(), soon(5_000))
                    .await
            }
        });
        dropped.completed(1).await;
        replay.matched(1).await;
        let lease = direct
            .lease_existing(b"new", soon(2_000))
            .await
            .unwrap()
            .expect("the first run of the insert wrote nothing");
        lease.remove_and_release().await.unwrap();
        assert!(!direct.exists(b"new").await.unwrap());
        replay.open();
        let answer = insert.await.unwrap();
        println!("the replayed insert answered {answer:?}");
        assert!(
            !direct.exists(b"new").await.unwrap(),
            "the replayed insert brought a removed session back"
        );
    })
    .await;
}

/// An insert held back (not run yet) while another caller takes the lease of the key: it must
/// write nothing and answer "in use", and the holder's commit must stand.
#[tokio::test]
async fn an_insert_that_runs_while_the_key_is_leased_writes_nothing() {
    bounded(LIMIT, async {
        let server = RedisServer::start().unwrap();
        let proxy = FaultProxy::start(server.port()).await.unwrap();
        let backend = RedisBackend::connect(&proxy.url()).await.unwrap();
        warm_up(&backend).await;
        let direct = RedisBackend::connect(&server.url()).await.unwrap();
        let held = proxy.add_rule(Fault::Hold, 1, script_on("insert", b"new"));
        let insert = tokio::spawn({
            let backend = backend.clone();
            async move {
                backend
                    .insert_new(b"new", b"insert", in_an_hour(), soon(5_000))
                    .await
            }
        });
        held.matched(1).await;
        let mut lease = direct.lease(b"new", soon(2_000)).await.unwrap();
        assert!(lease.load().await.unwrap().is_none());
        held.open();
        assert!(!insert.await.unwrap().unwrap(), "insert answered written");
        assert!(direct.get_unleased(b"new").await.unwrap().is_none());
        lease.commit(b"holder", in_an_hour()).await.unwrap();
        lease.release().await;
        let record = direct.get_unleased(b"new").await.unwrap().unwrap();
        assert_eq!(record.value, b"holder");
    })
    .await;
}

/// New sessions over HTTP, many at once: each gets its own cookie, and each counts from 1.
#[tokio::test]
async fn many_new_sessions_at_once_over_http_are_each_their_own() {
    bounded(LIMIT, async {
        let server = RedisServer::start().unwrap();
        let backend = RedisBackend::connect(&server.url()).await.unwrap();
        let port = serve(backend, Duration::from_secs(5)).await;
        let firsts: Vec<_> = (0..32)
            .map(|_| tokio::spawn(request(port, "/", None)))
            .collect();
        let mut cookies = std::collections::HashSet::new();
        for first in firsts {
            let reply = first.await.unwrap();
            assert_eq!((reply.status, reply.body.as_str()), (200, "1"));
            assert!(cookies.insert(reply.cookie.unwrap()), "a cookie came twice");
        }
        for cookie in &cookies {
            let reply = request(port, "/", Some(cookie)).await;
            assert_eq!((reply.status, reply.body.as_str()), (200, "2"));
        }
    })
    .await;
}

/// Whether the lease of `key` is held on `server` (asked directly, not through the proxy).
fn lease_held(server: &RedisServer, key: &[u8]) -> bool {
    let name = String::from_utf8(lease_key(key)).unwrap();
    server.query(&format!("EXISTS {name}")).unwrap() == b":1\r\n"
}

/// One lease's renewal held back by the proxy (its connection stalls) must not cost other leases
/// of the same backend theirs: each of them is still held after three lease TTLs.
#[tokio::test]
async fn a_stalled_renewal_of_one_lease_does_not_lose_the_others() {
    bounded(LIMIT, async {
        let server = RedisServer::start().unwrap();
        let proxy = FaultProxy::start(server.port()).await.unwrap();
        let ttl = Duration::from_millis(600);
        let backend = RedisConfig::new(proxy.url())
            .lease_ttl(ttl)
            .lease_timeout(Duration::from_secs(20))
            .connect()
            .await
            .unwrap();
        let stalled = proxy.add_rule(Fault::Hold, 1, script_on("renew", b"slow"));
        let slow = backend.lease(b"slow", soon(2_000)).await.unwrap();
        let mut others = Vec::new();
        for n in 0..8 {
            let key = format!("other{n}").into_bytes();
            others.push((backend.lease(&key, soon(2_000)).await.unwrap(), key));
        }
        stalled.matched(1).await;
        // The subject of the test is time passing while the watchdog works: three lease TTLs.
        tokio::time::sleep(ttl * 3).await;
        let lost: Vec<String> = others
            .iter()
            .filter(|(_, key)| !lease_held(&server, key))
            .map(|(_, key)| String::from_utf8(key.clone()).unwrap())
            .collect();
        stalled.open();
        drop((slow, others));
        assert!(
            lost.is_empty(),
            "leases lapsed while another lease's renewal was stalled: {lost:?}"
        );
    })
    .await;
}

/// A renewal held back until its holder has released and another caller of the same backend has
/// taken the lease: its late answer ("not yours") must not mark the new holder lost.
#[tokio::test]
async fn a_late_renewal_answer_does_not_mark_the_next_holder_lost() {
    bounded(LIMIT, async {
        let server = RedisServer::start().unwrap();
        let proxy = FaultProxy::start(server.port()).await.unwrap();
        let ttl = Duration::from_millis(900);
        // Three connections, picked in turn: the held renewal stalls one, the release and the
        // next acquire go on the other two.
        let backend = RedisConfig::new(proxy.url())
            .lease_ttl(ttl)
            .lease_timeout(Duration::from_secs(20))
            .pool_size(3)
            .connect()
            .await
            .unwrap();
        let first = backend.lease(b"k", soon(2_000)).await.unwrap();
        let held = proxy.add_rule(Fault::Hold, 1, script_on("renew", b"k"));
        held.matched(1).await;
        first
            .commit_and_release(b"first", in_an_hour())
            .await
            .unwrap();
        let mut second = backend.lease(b"k", soon(2_000)).await.unwrap();
        held.open();
        held.completed(1).await;
        // Past one more renewal of the second holder, and past the first holder's TTL.
        tokio::time::sleep(ttl + ttl / 3).await;
        assert!(
            lease_held(&server, b"k"),
            "the second holder's lease lapsed"
        );
        second.commit(b"second", in_an_hour()).await.unwrap();
        second.release().await;
        let record = backend.get_unleased(b"k").await.unwrap().unwrap();
        assert_eq!(record.value, b"second");
    })
    .await;
}

/// Many leases taken at once are all due for renewal at once: every one of them is still held
/// after three lease TTLs.
#[tokio::test]
async fn many_leases_due_at_once_are_all_renewed() {
    bounded(LIMIT, async {
        let server = RedisServer::start().unwrap();
        let ttl = Duration::from_millis(600);
        let backend = RedisConfig::new(server.url())
            .lease_ttl(ttl)
            .lease_timeout(Duration::from_secs(20))
            .connect()
            .await
            .unwrap();
        let keys: Vec<Vec<u8>> = (0..200).map(|n| format!("many{n}").into_bytes()).collect();
        let takes: Vec<_> = keys
            .iter()
            .map(|key| {
                let backend = backend.clone();
                let key = key.clone();
                tokio::spawn(async move { backend.lease(&key, soon(5_000)).await.unwrap() })
            })
            .collect();
        let mut leases = Vec::new();
        for take in takes {
            leases.push(take.await.unwrap());
        }
        tokio::time::sleep(ttl * 3).await;
        let lapsed = keys.iter().filter(|key| !lease_held(&server, key)).count();
        assert_eq!(lapsed, 0, "{lapsed} of 200 leases lapsed");
        for lease in leases {
            lease.release().await;
        }
        assert!(keys.iter().all(|key| !lease_held(&server, key)));
    })
    .await;
}

/// Every clone of the backend dropped while a lease is held: the lease is still renewed while
/// held, and released when the lease is.
#[tokio::test]
async fn a_lease_outliving_its_backend_is_renewed_and_released() {
    bounded(LIMIT, async {
        let server = RedisServer::start().unwrap();
        let ttl = Duration::from_millis(600);
        let backend = RedisConfig::new(server.url())
            .lease_ttl(ttl)
            .lease_timeout(Duration::from_secs(20))
            .connect()
            .await
            .unwrap();
        let mut lease = backend.lease(b"orphan", soon(2_000)).await.unwrap();
        drop(backend);
        tokio::time::sleep(ttl * 3).await;
        assert!(lease_held(&server, b"orphan"), "the lease lapsed");
        lease.commit(b"still mine", in_an_hour()).await.unwrap();
        lease.release().await;
        assert!(
            !lease_held(&server, b"orphan"),
            "the lease was not released"
        );
    })
    .await;
}

/// The session's queue of waiters, `HLEN` (lapsed entries included).
fn queue_len(server: &RedisServer, key: &[u8]) -> usize {
    let name = format!("{PREFIX}{{{}}}:queue", blake3::hash(key).to_hex());
    let reply = String::from_utf8(server.query(&format!("HLEN {name}")).unwrap()).unwrap();
    reply.trim().trim_start_matches(':').parse().unwrap()
}

/// A waiter whose acquire is on its way to Redis (held by the proxy) when its request goes
/// away: the acquire, when it runs, must neither queue it nor take the lease, and the next waiter
/// is served as soon as the holder releases (not after the cancelled one's entry lapses).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_cancelled_while_its_acquire_is_on_its_way_leaves_nothing_behind() {
    bounded(LIMIT, async {
        let server = RedisServer::start().unwrap();
        let proxy = FaultProxy::start(server.port()).await.unwrap();
        // Long TTLs: a left-behind entry would hold the next waiter up for 20 s.
        let long = |url: String| {
            RedisConfig::new(url)
                .lease_ttl(Duration::from_secs(20))
                .lease_timeout(Duration::from_secs(20))
                .connect()
        };
        let holder = long(server.url()).await.unwrap();
        let held = holder.lease(b"q", soon(2_000)).await.unwrap();
        let cancelled = long(proxy.url()).await.unwrap();
        // Loaded first: the held acquire must be a run of the script, not a NOSCRIPT.
        cancelled
            .lease(b"warm-up", soon(2_000))
            .await
            .unwrap()
            .release()
            .await;
        let on_its_way = proxy.add_rule(Fault::Hold, 1, script_on("acquire", b"q"));
        let waiter = tokio::spawn({
            let cancelled = cancelled.clone();
            async move { cancelled.lease(b"q", soon(30_000)).await.map(drop) }
        });
        on_its_way.matched(1).await;
        waiter.abort();
        // The cancel marker is written through another connection of the pool.
        let marker = format!("{PREFIX}{{{}}}:cancelled:*", blake3::hash(b"q").to_hex());
        while server.query(&format!("KEYS {marker}")).unwrap() == b"*0\r\n" {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        on_its_way.open();
        on_its_way.completed(1).await;
        assert_eq!(
            queue_len(&server, b"q"),
            0,
            "the cancelled waiter was queued"
        );
        let next = long(server.url()).await.unwrap();
        let served = tokio::spawn(async move {
            let lease = next.lease(b"q", soon(10_000)).await.unwrap();
            lease.release().await;
        });
        while queue_len(&server, b"q") != 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        held.release().await;
        served.await.unwrap();
        assert!(!lease_held(&server, b"q"));
    })
    .await;
}

/// Sends `signal` (`STOP`, `CONT`) to the process `pid`.
fn signal(pid: &str, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), pid])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// Lets a stopped process go on when dropped, should the test fail while it is stopped.
struct Stopped(String);

impl Drop for Stopped {
    fn drop(&mut self) {
        signal(&self.0, "CONT");
    }
}

/// A cluster primary that stops answering (SIGSTOP: its connections stay open, nothing is
/// answered): the other primaries' sessions are still served, its own sessions fail (within the
/// command time-out, not hanging), and once it goes on (SIGCONT) they are served again without a
/// restart of the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_primary_that_stops_answering_takes_only_its_sessions_and_comes_back() {
    bounded(Duration::from_secs(120), async {
        let cluster =
            RedisServer::start_cluster_with(3, 0, &["--cluster-require-full-coverage", "no"])
                .unwrap();
        let command_timeout = Duration::from_secs(1);
        let backend = RedisConfig::new(cluster.url())
            .command_timeout(command_timeout)
            .connect()
            .await
            .unwrap();
        let update = |key: String| {
            let backend = backend.clone();
            async move {
                let mut lease = backend.lease(key.as_bytes(), soon(2_000)).await?;
                let n: u64 = lease.load().await?.map_or(0, |record| {
                    String::from_utf8(record.value).unwrap().parse().unwrap()
                });
                lease
                    .commit_and_release((n + 1).to_string().as_bytes(), in_an_hour())
                    .await
            }
        };
        const SESSIONS: usize = 30;
        for session in 0..SESSIONS {
            update(format!("stop-{session}")).await.unwrap();
        }
        let record = |session: usize| {
            let hash = blake3::hash(format!("stop-{session}").as_bytes()).to_hex();
            format!("{PREFIX}{{{hash}}}")
        };
        let on = |node: &RedisServer, session: usize| {
            node.query(&format!("EXISTS {}", record(session))).unwrap() == b":1\r\n"
        };
        let (stopped_sessions, stopped_node) = cluster
            .nodes()
            .skip(1)
            .map(|node| {
                (
                    (0..SESSIONS).filter(|&s| on(node, s)).collect::<Vec<_>>(),
                    node,
                )
            })
            .find(|(held, _)| !held.is_empty())
            .unwrap();
        let info = String::from_utf8(stopped_node.query("INFO server").unwrap()).unwrap();
        let pid = info
            .lines()
            .find_map(|line| line.strip_prefix("process_id:"))
            .unwrap()
            .trim()
            .to_owned();
        signal(&pid, "STOP");
        let stopped = Stopped(pid);
        let since = Instant::now();
        for session in (0..SESSIONS).filter(|session| !stopped_sessions.contains(session)) {
            while let Err(error) = update(format!("stop-{session}")).await {
                assert!(
                    since.elapsed() < Duration::from_secs(10),
                    "stop-{session} (on a primary that answers) not served 10 s after another \
                     primary stopped: {error:?}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        // A session of the stopped primary fails, and does not hang past a few command
        // time-outs.
        let one = stopped_sessions[0];
        let failed = tokio::time::timeout(command_timeout * 4, update(format!("stop-{one}"))).await;
        assert!(
            matches!(failed, Ok(Err(_))),
            "a session of the stopped primary: {failed:?}"
        );
        drop(stopped);
        let since = Instant::now();
        while let Err(error) = update(format!("stop-{one}")).await {
            assert!(
                since.elapsed() < Duration::from_secs(10),
                "stop-{one} not served 10 s after its primary went on: {error:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let stored = backend
            .get_unleased(format!("stop-{one}").as_bytes())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.value, b"2");
    })
    .await;
}
