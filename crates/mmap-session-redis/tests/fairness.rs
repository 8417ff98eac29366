//! Waiters of different processes get a session in the order they found it held: the queue of
//! waiters in Redis, with real processes (children of this test binary) where processes matter,
//! each talking to Redis through a fault proxy of its own that tells the test when the child has
//! found the lease held and waits (its second try: found held, subscribed, found held again).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{bounded, in_an_hour, soon};
use mmap_session::{BackendError, BackendLease as _, SessionBackend as _};
use mmap_session_redis::fault_proxy::{Fault, FaultProxy, RuleHandle};
use mmap_session_redis::test_server::{script_sha1, RedisServer};
use mmap_session_redis::{RedisBackend, RedisConfig, DEFAULT_LEASE_TTL};
use tokio::sync::mpsc;

/// Set in a child process: the URL to reach Redis by, and the name it appends to the record.
const WAITER_URL: &str = "MMAP_SESSION_REDIS_WAITER_URL";
const WAITER_NAME: &str = "MMAP_SESSION_REDIS_WAITER_NAME";

/// How long any one test of this file may take.
const LIMIT: Duration = Duration::from_secs(60);

/// The session every test uses.
const KEY: &[u8] = b"k";

/// Not a test: the body of the child processes, which re-run this binary with [`WAITER_URL`]
/// set. It waits (up to 30 s) for the lease of [`KEY`] with the default configuration, appends
/// `,<name>` to the record, commits and releases, and says `@served` (or `@failed` and why).
#[test]
fn waiter_process_entry() {
    let (Ok(url), Ok(name)) = (std::env::var(WAITER_URL), std::env::var(WAITER_NAME)) else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let backend = RedisBackend::connect(&url).await.unwrap();
        match backend.lease(KEY, soon(30_000)).await {
            Ok(mut lease) => {
                let before = match lease.load().await.unwrap() {
                    Some(record) => String::from_utf8(record.value).unwrap(),
                    None => String::new(),
                };
                let after = format!("{before},{name}");
                lease
                    .commit_and_release(after.as_bytes(), in_an_hour())
                    .await
                    .unwrap();
                println!("@served");
            }
            Err(error) => println!("@failed {error}"),
        }
    });
}

/// A child process waiting for the session, through a proxy of its own; killed when dropped.
struct Waiter {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    /// The child's acquire scripts, counted at the proxy.
    tries: RuleHandle,
    _proxy: FaultProxy,
}

impl Waiter {
    /// Starts the child `name` on `server` and returns once it waits for the lease: its second
    /// try has been answered (the first found the lease held, then it subscribed and tried again).
    async fn start_queued(server: &RedisServer, name: &str) -> Self {
        let waiter = Self::start(server, name).await;
        waiter.tries.completed(2).await;
        waiter
    }

    async fn start(server: &RedisServer, name: &str) -> Self {
        let proxy = FaultProxy::start(server.port()).await.unwrap();
        let tries = proxy.on_script(Fault::Observe, usize::MAX, &script_sha1("acquire").unwrap());
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "waiter_process_entry",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(WAITER_URL, proxy.url())
            .env(WAITER_NAME, name)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // libtest may print the test's name in front of its output.
                if let Some(at) = line.find('@') {
                    if sender.send(line[at..].to_owned()).is_err() {
                        return;
                    }
                }
            }
        });
        Self {
            child,
            lines,
            tries,
            _proxy: proxy,
        }
    }

    /// Waits until the child says it was served (failing the test if it says anything else).
    async fn served(&mut self) {
        let line = self.lines.recv().await.expect("the waiter process ended");
        assert_eq!(line, "@served");
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The session's record, as text.
async fn record(backend: &RedisBackend) -> String {
    String::from_utf8(backend.get_unleased(KEY).await.unwrap().unwrap().value).unwrap()
}

/// How many waiters the session's queue in Redis holds (lapsed ones included).
fn queue_len(server: &RedisServer) -> usize {
    let key = format!(
        "{}{{{}}}:queue",
        mmap_session_redis::DEFAULT_KEY_PREFIX,
        blake3::hash(KEY).to_hex()
    );
    let reply = server.raw_command(&format!("HLEN {key}")).unwrap();
    let reply = String::from_utf8(reply).unwrap();
    reply.trim().trim_start_matches(':').parse().unwrap()
}

/// Waits until the session's queue holds `n` entries.
async fn queue_reaches(server: &RedisServer, n: usize) {
    while queue_len(server) != n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_are_served_in_the_order_they_found_the_session_held() {
    bounded(LIMIT, async {
        let server = RedisServer::start().unwrap();
        let holder = RedisBackend::connect(&server.url()).await.unwrap();
        let mut held = holder.lease(KEY, soon(1000)).await.unwrap();
        held.commit(b"H", in_an_hour()).await.unwrap();
        // Each one is waiting before the next one starts.
        let mut waiters = Vec::new();
        for name in ["A", "B", "C"] {
            waiters.push(Waiter::start_queued(&server, name).await);
        }
        held.release().await;
        for waiter in &mut waiters {
            waiter.served().await;
        }
        assert_eq!(record(&holder).await, "H,A,B,C");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newcomer_after_a_release_does_not_overtake_a_waiting_process() {
    bounded(LIMIT, async {
        let server = RedisServer::start().unwrap();
        let holder = RedisBackend::connect(&server.url()).await.unwrap();
        let mut held = holder.lease(KEY, soon(1000)).await.unwrap();
        held.commit(b"H", in_an_hour()).await.unwrap();
        let mut waiter = Waiter::start_queued(&server, "A").await;
        // The waiter's next try (woken by the release) is held back at its proxy: the release
        // has happened, and the waiter has not tried yet, when the newcomer comes.
        waiter.tries.disarm();
        let woken = waiter
            ._proxy
            .on_script(Fault::Hold, 1, &script_sha1("acquire").unwrap());
        held.release().await;
        woken.matched(1).await;
        // The newcomer: another process (a backend with its own connections and its own
        // waiters), whose first try comes after the release.
        let proxy = FaultProxy::start(server.port()).await.unwrap();
        let newcomer = RedisBackend::connect(&proxy.url()).await.unwrap();
        let tries = proxy.on_script(Fault::Observe, usize::MAX, &script_sha1("acquire").unwrap());
        let newcomer = tokio::spawn(async move {
            let mut lease = newcomer.lease(KEY, soon(30_000)).await.unwrap();
            let before = String::from_utf8(lease.load().await.unwrap().unwrap().value).unwrap();
            lease
                .commit_and_release(format!("{before},N").as_bytes(), in_an_hour())
                .await
                .unwrap();
        });
        tries.completed(1).await;
        woken.open();
        waiter.served().await;
        newcomer.await.unwrap();
        assert_eq!(record(&holder).await, "H,A,N");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_waiter_keeps_the_session_from_the_next_one_for_at_most_the_lease_ttl() {
    bounded(LIMIT, async {
        let server = RedisServer::start().unwrap();
        let holder = RedisBackend::connect(&server.url()).await.unwrap();
        let mut held = holder.lease(KEY, soon(1000)).await.unwrap();
        held.commit(b"H", in_an_hour()).await.unwrap();
        let mut first = Waiter::start_queued(&server, "A").await;
        let mut second = Waiter::start_queued(&server, "B").await;
        // Child::kill sends SIGKILL: the first waiter's entry stays at the head of the queue
        // until it lapses.
        first.child.kill().unwrap();
        let killed = Instant::now();
        first.child.wait().unwrap();
        held.release().await;
        second.served().await;
        let after = killed.elapsed();
        // For BENCHMARKS.md (run with --nocapture); the bound below is the test.
        println!("the next waiter was served {after:?} after the SIGKILL of the one ahead of it");
        // The killed waiter's entry lapses within the lease TTL of its last refresh, which came
        // before the kill; a second to spare for the round trips on a busy machine.
        assert!(
            after <= DEFAULT_LEASE_TTL + Duration::from_secs(1),
            "served {after:?} after the kill"
        );
        assert_eq!(record(&holder).await, "H,B");
    })
    .await;
}

/// A backend whose waiters' entries in the queue would live for 30 s if nobody took them out.
async fn long_lived(server: &RedisServer) -> RedisBackend {
    RedisConfig::new(server.url())
        .lease_ttl(Duration::from_secs(30))
        .connect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_that_times_out_leaves_the_queue() {
    bounded(LIMIT, async {
        let server = RedisServer::start().unwrap();
        let holder = RedisBackend::connect(&server.url()).await.unwrap();
        let held = holder.lease(KEY, soon(1000)).await.unwrap();
        let waiter = long_lived(&server).await;
        let waiting = tokio::spawn(async move { waiter.lease(KEY, soon(500)).await });
        queue_reaches(&server, 1).await;
        let waited = waiting.await.unwrap();
        assert!(
            matches!(waited, Err(BackendError::LeaseTimeout)),
            "{waited:?}"
        );
        // Gone by the time the caller hears of the time-out (not lapsed: the queue lives on).
        assert_eq!(queue_len(&server), 0);
        held.release().await;
        // And the session is free for anyone.
        let lease = holder.lease(KEY, soon(1000)).await.unwrap();
        lease.release().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_waiter_leaves_the_queue_and_the_next_one_is_served() {
    bounded(LIMIT, async {
        let server = RedisServer::start().unwrap();
        let holder = RedisBackend::connect(&server.url()).await.unwrap();
        let held = holder.lease(KEY, soon(1000)).await.unwrap();
        // Two waiters of two processes (backends with their own connections), one after the
        // other; the first one's request goes away.
        let first = long_lived(&server).await;
        let cancelled = tokio::spawn(async move { first.lease(KEY, soon(30_000)).await });
        queue_reaches(&server, 1).await;
        let second = long_lived(&server).await;
        let served = tokio::spawn(async move {
            let lease = second.lease(KEY, soon(30_000)).await.unwrap();
            lease.release().await;
        });
        queue_reaches(&server, 2).await;
        cancelled.abort();
        // Its entry would live for 30 s: only its leaving takes it out.
        queue_reaches(&server, 1).await;
        held.release().await;
        // The second one is at the head now and is woken by the release.
        served.await.unwrap();
        assert_eq!(queue_len(&server), 0);
    })
    .await;
}

/// The counter with a 20 ms handler, which holds the session's lease while it sleeps.
async fn slow_count(session: mmap_session::Session) -> Result<String, mmap_session::SessionError> {
    let n: u64 = session.get("n").await?.unwrap_or(0) + 1;
    tokio::time::sleep(Duration::from_millis(20)).await;
    session.insert("n", n).await?;
    Ok(n.to_string())
}

/// Not a check but a measurement (run it with `--ignored --nocapture`): 64 connections send
/// requests one after the other to one session of a 20 ms handler, for 15 s, spread over three
/// servers (each with its own backend: its own connections, its own waiters, as three processes
/// would have) with the layer's default `lease_wait` (5 s); prints how many were answered `503`.
/// The session serves at most 50 requests a second, so each request waits about 64 × 20 ms; with
/// waiters served out of order, some wait past the 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: 15 s of load; prints the count of 503s"]
async fn sixty_four_connections_on_one_session_of_a_20_ms_handler() {
    bounded(Duration::from_secs(120), async {
        let server = RedisServer::start().unwrap();
        let mut ports = Vec::new();
        for _ in 0..3 {
            let backend = RedisBackend::connect(&server.url()).await.unwrap();
            let app = axum::Router::new()
                .route("/", axum::routing::get(slow_count))
                .layer(mmap_session::SessionLayer::new(backend));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            ports.push(listener.local_addr().unwrap().port());
            tokio::spawn(async move { axum::serve(listener, app).await });
        }
        let first = common::request(ports[0], "/", None).await;
        let cookie = first.cookie.unwrap();
        let end = Instant::now() + Duration::from_secs(15);
        let mut clients = Vec::new();
        for i in 0..64 {
            let port = ports[i % 3];
            let cookie = cookie.clone();
            clients.push(tokio::spawn(async move {
                let (mut ok, mut busy, mut slowest) = (0u32, 0u32, Duration::ZERO);
                while Instant::now() < end {
                    let sent = Instant::now();
                    let reply = common::request(port, "/", Some(&cookie)).await;
                    slowest = slowest.max(sent.elapsed());
                    match reply.status {
                        200 => ok += 1,
                        503 => busy += 1,
                        other => panic!("status {other}"),
                    }
                }
                (ok, busy, slowest)
            }));
        }
        let (mut ok, mut busy, mut slowest) = (0, 0, Duration::ZERO);
        for client in clients {
            let (o, b, s) = client.await.unwrap();
            ok += o;
            busy += b;
            slowest = slowest.max(s);
        }
        println!("64 connections, 20 ms handler, 15 s: {ok} answered 200, {busy} answered 503, slowest {slowest:?}");
    })
    .await;
}
