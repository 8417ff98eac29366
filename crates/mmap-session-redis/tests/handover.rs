//! What a request costs in Redis and how a busy session is handed over, counted through the
//! fault proxy (which sees every command) and Redis's own command statistics: round trips per
//! request, publishes per release, tries per waiter, and the order in which the requests of one
//! process get a session.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{bounded, in_an_hour, request, serve, soon};
use mmap_session::{BackendLease as _, SessionBackend as _};
use mmap_session_redis::fault_proxy::{Fault, FaultProxy, RuleHandle};
use mmap_session_redis::test_server::{script_sha1, RedisServer};
use mmap_session_redis::{RedisBackend, RedisConfig};

const LIMIT: Duration = Duration::from_secs(60);

/// A rule that counts every command through `proxy` (its replies).
fn count_all(proxy: &FaultProxy) -> RuleHandle {
    proxy.add_rule(Fault::Observe, usize::MAX, |_| true)
}

fn counted(rule: &RuleHandle) -> usize {
    rule.matched_count()
}

/// How many times Redis ran `command` (scripts' own calls included), from `INFO commandstats`.
fn calls(server: &RedisServer, command: &str) -> u64 {
    let info = server.raw_command("INFO commandstats").unwrap();
    let info = String::from_utf8_lossy(&info);
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changing_request_costs_two_round_trips_and_a_read_only_one_costs_one() {
    bounded(LIMIT, async {
        let server = RedisServer::start().unwrap();
        let proxy = FaultProxy::start(server.port()).await.unwrap();
        let backend = RedisConfig::new(proxy.url()).connect().await.unwrap();
        let port = serve(backend, Duration::from_secs(5)).await;
        let first = request(port, "/", None).await;
        assert_eq!((first.status, first.body.as_str()), (200, "1"));
        let cookie = first.cookie.unwrap();
        // The first request of each script loads it (NOSCRIPT, SCRIPT LOAD): counted from here.
        let warm = request(port, "/", Some(&cookie)).await;
        assert_eq!(warm.body, "2");

        let commands = count_all(&proxy);
        let changed = request(port, "/", Some(&cookie)).await;
        assert_eq!((changed.status, changed.body.as_str()), (200, "3"));
        assert_eq!(counted(&commands), 2, "acquire+read, then commit+release");

        let read = request(port, "/peek", Some(&cookie)).await;
        assert_eq!((read.status, read.body.as_str()), (200, "3"));
        assert_eq!(counted(&commands), 3, "one GET");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_session_costs_one_round_trip_and_leaves_no_lease() {
    bounded(LIMIT, async {
        let server = RedisServer::start().unwrap();
        let proxy = FaultProxy::start(server.port()).await.unwrap();
        let backend = RedisConfig::new(proxy.url()).connect().await.unwrap();
        let port = serve(backend.clone(), Duration::from_secs(5)).await;
        // The first run of each script loads it (NOSCRIPT, SCRIPT LOAD): counted after.
        let warm = request(port, "/", None).await;
        assert_eq!((warm.status, warm.body.as_str()), (200, "1"));
        let warm = request(port, "/", warm.cookie.as_deref()).await;
        assert_eq!((warm.status, warm.body.as_str()), (200, "2"));

        let commands = count_all(&proxy);
        let scripts_before = calls(&server, "evalsha");
        let new = request(port, "/", None).await;
        assert_eq!((new.status, new.body.as_str()), (200, "1"));
        assert_eq!(counted(&commands), 1, "one insert script, no lease taken");
        assert_eq!(calls(&server, "evalsha"), scripts_before + 1);
        // The new session is there, and its lease is free: the next request takes it at the
        // first try (acquire+read, commit+release).
        let cookie = new.cookie.unwrap();
        let next = request(port, "/", Some(&cookie)).await;
        assert_eq!((next.status, next.body.as_str()), (200, "2"));
        assert_eq!(counted(&commands), 3);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_publishes_only_when_someone_waits() {
    bounded(LIMIT, async {
        let server = RedisServer::start().unwrap();
        let first = RedisBackend::connect(&server.url()).await.unwrap();
        for _ in 0..5 {
            let lease = first.lease(b"k", soon(1000)).await.unwrap();
            lease.commit_and_release(b"v", in_an_hour()).await.unwrap();
        }
        let published = calls(&server, "publish") + calls(&server, "spublish");
        assert_eq!(published, 0, "nobody waited");

        // Another process waits: the release wakes it with one message.
        let proxy = FaultProxy::start(server.port()).await.unwrap();
        let second = RedisBackend::connect(&proxy.url()).await.unwrap();
        let tries = proxy.on_script(Fault::Observe, usize::MAX, &script_sha1("acquire").unwrap());
        let held = first.lease(b"k", soon(1000)).await.unwrap();
        let waiter = tokio::spawn(async move {
            let lease = second.lease(b"k", soon(20_000)).await.unwrap();
            lease.release().await;
        });
        // Found held, subscribed, found held again: now it waits for the message.
        tries.completed(2).await;
        held.commit_and_release(b"w", in_an_hour()).await.unwrap();
        waiter.await.unwrap();
        assert_eq!(calls(&server, "spublish"), 1);
        assert_eq!(calls(&server, "publish"), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_is_woken_by_the_release_and_does_not_poll_while_the_holder_renews() {
    bounded(LIMIT, async {
        let server = RedisServer::start().unwrap();
        let proxy = FaultProxy::start(server.port()).await.unwrap();
        // Default lease TTL (2 s): renewed every 667 ms.
        let holder = RedisBackend::connect(&proxy.url()).await.unwrap();
        let waiter = RedisBackend::connect(&proxy.url()).await.unwrap();
        // Loads the acquire script (a first EVALSHA is answered NOSCRIPT and sent again).
        let warm = holder.lease(b"k", soon(1000)).await.unwrap();
        warm.release().await;
        let tries = proxy.on_script(Fault::Observe, usize::MAX, &script_sha1("acquire").unwrap());
        let renewals = proxy.on_script(Fault::Observe, usize::MAX, &script_sha1("renew").unwrap());
        let held = holder.lease(b"k", soon(1000)).await.unwrap();
        let waiting = tokio::spawn(async move {
            let lease = waiter.lease(b"k", soon(30_000)).await.unwrap();
            lease.release().await;
        });
        // Held for six renewals (4 s, two lease TTLs) while the other process waits.
        renewals.completed(6).await;
        held.commit_and_release(b"v", in_an_hour()).await.unwrap();
        waiting.await.unwrap();
        // The holder's one acquire; the waiter's: found held, subscribed and found held again,
        // one more each time the TTL it was told of ran out or, at the latest, 1.9 s after its
        // last try, to keep its entry in the queue (at most two in 4 s), and the one after the
        // release message. Polling every 250 ms would have made about 16.
        let waiter_tries = counted(&tries) - 1;
        assert!(
            (3..=6).contains(&waiter_tries),
            "the waiter tried {waiter_tries} times"
        );
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn requests_of_one_process_get_a_session_in_arrival_order() {
    bounded(LIMIT, async {
        let server = RedisServer::start().unwrap();
        let backend = RedisBackend::connect(&server.url()).await.unwrap();
        let held = backend.lease(b"k", soon(1000)).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..8 {
            let backend = backend.clone();
            let order = Arc::clone(&order);
            tasks.push(tokio::spawn(async move {
                let lease = backend.lease(b"k", soon(30_000)).await.unwrap();
                order.lock().unwrap().push(i);
                lease.commit_and_release(b"x", in_an_hour()).await.unwrap();
            }));
            // Let it run up to its wait (one thread: spawned tasks run in order).
            tokio::task::yield_now().await;
        }
        held.commit_and_release(b"first", in_an_hour())
            .await
            .unwrap();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), (0..8).collect::<Vec<_>>());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_requests_on_one_session_from_two_processes_lose_nothing() {
    bounded(LIMIT, async {
        let server = RedisServer::start().unwrap();
        let backends = [
            RedisBackend::connect(&server.url()).await.unwrap(),
            RedisBackend::connect(&server.url()).await.unwrap(),
        ];
        let mut tasks = Vec::new();
        for i in 0..64 {
            let backend = backends[i % 2].clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..4 {
                    // The layer's default lease_wait.
                    let mut lease = backend.lease(b"n", soon(5_000)).await.unwrap();
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
        let record = backends[0].get_unleased(b"n").await.unwrap().unwrap();
        assert_eq!(record.value, b"256");
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn the_next_request_of_the_same_process_takes_the_lease_over_without_an_acquire() {
    bounded(LIMIT, async {
        let server = RedisServer::start().unwrap();
        let proxy = FaultProxy::start(server.port()).await.unwrap();
        let backend = RedisBackend::connect(&proxy.url()).await.unwrap();
        // Loads the acquire script (a first EVALSHA is answered NOSCRIPT and sent again).
        let warm = backend.lease(b"warm-up", soon(1000)).await.unwrap();
        warm.release().await;
        let acquires =
            proxy.on_script(Fault::Observe, usize::MAX, &script_sha1("acquire").unwrap());
        let held = backend.lease(b"k", soon(1000)).await.unwrap();
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let backend = backend.clone();
            tasks.push(tokio::spawn(async move {
                let mut lease = backend.lease(b"k", soon(30_000)).await.unwrap();
                let n: u64 = String::from_utf8(lease.load().await.unwrap().unwrap().value)
                    .unwrap()
                    .parse()
                    .unwrap();
                lease
                    .commit_and_release((n + 1).to_string().as_bytes(), in_an_hour())
                    .await
                    .unwrap();
            }));
            // Let it run up to its wait (one thread: spawned tasks run in order).
            tokio::task::yield_now().await;
        }
        held.commit_and_release(b"0", in_an_hour()).await.unwrap();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(
            backend.get_unleased(b"k").await.unwrap().unwrap().value,
            b"4"
        );
        // The first request's acquire only: each next one had the lease handed over, with the
        // record it had just written.
        assert_eq!(acquires.matched_count(), 1);
        // And the last one released it.
        let free = backend.lease(b"k", soon(300)).await.unwrap();
        free.release().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_process_does_not_keep_a_session_from_a_request_of_another() {
    bounded(LIMIT, async {
        let server = RedisServer::start().unwrap();
        let busy = RedisBackend::connect(&server.url()).await.unwrap();
        let other = RedisBackend::connect(&server.url()).await.unwrap();
        // 16 requests of one process on one session, one after the other without a pause: the
        // lease is handed over among them.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let busy = busy.clone();
            let stop = Arc::clone(&stop);
            tasks.push(tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let lease = busy.lease(b"k", soon(30_000)).await.unwrap();
                    lease
                        .commit_and_release(b"busy", in_an_hour())
                        .await
                        .unwrap();
                }
            }));
        }
        // Another process gets it within the layer's default lease_wait, again and again.
        for _ in 0..5 {
            let lease = other.lease(b"k", soon(5_000)).await.unwrap();
            lease
                .commit_and_release(b"other", in_an_hour())
                .await
                .unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for task in tasks {
            task.await.unwrap();
        }
    })
    .await;
}

/// Not a check but a measurement (run it with `--ignored --nocapture`): what the scripts of an
/// uncontended changing request cost Redis, from `INFO commandstats` after 4,000 requests on
/// distinct sessions (taking the lease, then writing and releasing it): the scripts run
/// (`EVALSHA`), the Redis CPU time per script, and the calls the scripts make per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; prints the Redis CPU time per script"]
async fn uncontended_script_cost() {
    bounded(Duration::from_secs(300), async {
        let server = RedisServer::start().unwrap();
        let backend = RedisBackend::connect(&server.url()).await.unwrap();
        let warm = backend.lease(b"warm-up", soon(1000)).await.unwrap();
        warm.commit_and_release(b"v", in_an_hour()).await.unwrap();
        server.raw_command("CONFIG RESETSTAT").unwrap();
        const REQUESTS: usize = 4_000;
        let mut tasks = Vec::new();
        for task in 0..4 {
            let backend = backend.clone();
            tasks.push(tokio::spawn(async move {
                for i in (task..REQUESTS).step_by(4) {
                    let key = format!("session-{}", i % 1000);
                    let lease = backend.lease(key.as_bytes(), soon(5_000)).await.unwrap();
                    lease
                        .commit_and_release(b"a value", in_an_hour())
                        .await
                        .unwrap();
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let info = server.raw_command("INFO commandstats").unwrap();
        let info = String::from_utf8_lossy(&info);
        let mut inner = 0;
        for line in info.lines().filter(|line| line.starts_with("cmdstat_")) {
            println!("{line}");
            if !line.starts_with("cmdstat_evalsha:") && !line.starts_with("cmdstat_config") {
                inner += calls(&server, line[8..].split(':').next().unwrap());
            }
        }
        let scripts = calls(&server, "evalsha");
        println!(
            "{scripts} scripts for {REQUESTS} requests; {:.2} calls inside the scripts per request",
            inner as f64 / REQUESTS as f64
        );
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn the_next_waiter_of_a_process_already_subscribed_tries_once_before_the_release() {
    bounded(LIMIT, async {
        let server = RedisServer::start().unwrap();
        let proxy = FaultProxy::start(server.port()).await.unwrap();
        // Default lease TTL (2 s): renewed every 667 ms.
        let holder = RedisBackend::connect(&proxy.url()).await.unwrap();
        let waiter = RedisBackend::connect(&proxy.url()).await.unwrap();
        let held = holder.lease(b"k", soon(1000)).await.unwrap();
        let tries = proxy.on_script(Fault::Observe, usize::MAX, &script_sha1("acquire").unwrap());
        let renewals = proxy.on_script(Fault::Observe, usize::MAX, &script_sha1("renew").unwrap());
        // The first request of the process waits in Redis (found held, subscribed, found held
        // again) and goes away; the second one, which waited for its turn in the process, takes
        // its place in Redis with the subscription in place.
        let first = {
            let waiter = waiter.clone();
            tokio::spawn(async move { waiter.lease(b"k", soon(30_000)).await.map(drop) })
        };
        tries.completed(2).await;
        let second = tokio::spawn(async move {
            let lease = waiter.lease(b"k", soon(30_000)).await.unwrap();
            lease.release().await;
        });
        // Let it run up to its wait for its turn (one thread: spawned tasks run in order).
        tokio::task::yield_now().await;
        first.abort();
        // Found held once: it waits for the message, and tries no more until the holder's next
        // renewal at least (a second try would come at once).
        tries.completed(3).await;
        let renewed = renewals.matched_count();
        renewals.completed(renewed + 1).await;
        assert_eq!(counted(&tries), 3);
        held.release().await;
        second.await.unwrap();
        assert_eq!(
            counted(&tries),
            4,
            "2 + 1 tries, then the one after the release"
        );
    })
    .await;
}
