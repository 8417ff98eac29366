//! End-to-end tests of the `counter` example: several real processes share one session file behind
//! nginx (round robin), and clients count through them, while processes are killed and restarted.
//! Each test runs twice: `file::` with the sessions in a file, `redis::` with the sessions in a
//! redis-server the test starts.
//!
//! They need nginx and redis-server (`tests/run.sh` installs them; Debian: `apt-get install nginx
//! redis-server`) and the example binaries, which plain `cargo test` builds first.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{bounded, cookie_pair, counter_request, is_removal, Chance, Cluster, Reply, Sessions};
use mmap_session::store::Store;
use reqwest::{Method, StatusCode};

const COPIES: usize = 3;

/// Starts the counter's copies with their sessions where `sessions` says.
async fn start(sessions: Sessions) -> Cluster {
    // A lease in Redis outlives a killed holder by its time-out: keep it short (and well above
    // what a request takes) so that the kill test's waiters take over soon.
    start_with(sessions, &[]).await
}

/// [`start`], with `extra` arguments for every copy.
async fn start_with(sessions: Sessions, extra: &[&str]) -> Cluster {
    let mut args: Vec<&str> = match sessions {
        Sessions::File => vec![],
        Sessions::Redis => vec!["--lease-timeout-ms", "1000"],
    };
    args.extend_from_slice(extra);
    Cluster::start_on(sessions, "counter", COPIES, &args).await
}

/// What the processes log when they take over the lease of a holder that never released it.
fn takeover_log(sessions: Sessions) -> &'static [&'static str] {
    match sessions {
        // The store: a waiter sees the holder's process gone, or the killed process's restart,
        // taking its slot, releases the leases it held before anyone waited long enough to look.
        Sessions::File => &[
            "holder process died",
            "released the leases of a process that died in this slot",
        ],
        // The Redis backend, which sees a lease that expired unreleased.
        Sessions::Redis => &["took over an expired lease"],
    }
}

/// How many take-overs of a dead holder's lease the processes of `cluster` logged.
fn takeovers(cluster: &Cluster, sessions: Sessions) -> usize {
    takeover_log(sessions)
        .iter()
        .map(|line| cluster.log_lines_containing(line))
        .sum()
}

/// Checks the session storage once every process is stopped: the session file with the store's
/// own verifier; Redis for leases left behind (every one must have been released or taken over
/// and released).
fn assert_store_is_clean(cluster: &Cluster) {
    if let Some(redis) = cluster.redis() {
        let leases = redis
            .raw_command("KEYS *:lease")
            .expect("ask Redis for leases");
        assert_eq!(
            String::from_utf8_lossy(&leases),
            "*0\r\n",
            "leases were left behind in Redis"
        );
        return;
    }
    let store = Store::open(cluster.store_path()).expect("open the session file");
    let report = store.verify();
    assert!(
        report.is_clean(),
        "the session file has problems: {:?}",
        report.problems
    );
}

/// A GET / with `cookie`; panics unless it is a 200 with a count. Adopts a new cookie if one is set.
async fn count_once(cluster: &Cluster, cookie: &mut Option<String>) -> (u64, u32) {
    let reply = counter_request(
        &cluster.client,
        Method::GET,
        &cluster.url("/"),
        cookie.as_deref(),
    )
    .await
    .expect("GET / through nginx");
    assert_eq!(reply.status, StatusCode::OK, "GET / answered {reply:?}");
    if let Some(set_cookie) = &reply.set_cookie {
        assert!(!is_removal(set_cookie), "GET / removed the cookie");
        *cookie = Some(cookie_pair(set_cookie));
    }
    assert!(cookie.is_some(), "the first GET / set no cookie");
    reply.count.expect("a JSON count")
}

async fn peek(cluster: &Cluster, cookie: Option<&str>) -> Reply {
    let reply = counter_request(&cluster.client, Method::GET, &cluster.url("/peek"), cookie)
        .await
        .expect("GET /peek through nginx");
    assert_eq!(reply.status, StatusCode::OK, "GET /peek answered {reply:?}");
    assert_eq!(reply.set_cookie, None, "GET /peek set a cookie");
    reply
}

async fn the_counter_keeps_its_http_contract(sessions: Sessions) {
    bounded(Duration::from_secs(120), async {
        let cluster = start(sessions).await;

        // No session: /peek reads 0 and creates nothing.
        let reply = peek(&cluster, None).await;
        assert_eq!(reply.count.map(|(count, _)| count), Some(0));

        // The first GET / starts a session at 1, with the cookie attributes asked for.
        let reply = counter_request(&cluster.client, Method::GET, &cluster.url("/"), None)
            .await
            .unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.count.map(|(count, _)| count), Some(1));
        let set_cookie = reply.set_cookie.expect("a new session sets its cookie");
        for attribute in ["HttpOnly", "SameSite=Lax", "Path=/"] {
            assert!(
                set_cookie.contains(attribute),
                "{set_cookie} lacks {attribute}"
            );
        }
        assert!(
            !set_cookie.contains("Secure"),
            "--insecure-cookies still sent Secure: {set_cookie}"
        );
        let cookie = cookie_pair(&set_cookie);

        // /peek sees it without changing it, whichever process answers.
        for _ in 0..COPIES {
            let reply = peek(&cluster, Some(&cookie)).await;
            assert_eq!(reply.count.map(|(count, _)| count), Some(1));
        }

        // Logout deletes the session and expires the cookie.
        let reply = counter_request(
            &cluster.client,
            Method::POST,
            &cluster.url("/logout"),
            Some(&cookie),
        )
        .await
        .unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        let removal = reply.set_cookie.expect("logout expires the cookie");
        assert!(is_removal(&removal), "not a removal: {removal}");
        let reply = peek(&cluster, Some(&cookie)).await;
        assert_eq!(reply.count.map(|(count, _)| count), Some(0));

        // A request still carrying the logged-out cookie just after the logout (one sent in
        // parallel with it) changes nothing and sets no cookie, whichever process answers, so
        // that the logout's removal stays in the browser.
        for _ in 0..COPIES {
            let reply = counter_request(
                &cluster.client,
                Method::GET,
                &cluster.url("/"),
                Some(&cookie),
            )
            .await
            .unwrap();
            assert_eq!(reply.status, StatusCode::CONFLICT);
            assert_eq!(reply.set_cookie, None, "the logged-out cookie was answered");
        }
        // Counting again starts a new session under a new id.
        let reply = counter_request(&cluster.client, Method::GET, &cluster.url("/"), None)
            .await
            .unwrap();
        assert_eq!(reply.count.map(|(count, _)| count), Some(1));
        let fresh = cookie_pair(&reply.set_cookie.expect("a new session sets its cookie"));
        assert_ne!(fresh, cookie, "the logged-out id was reused");
    })
    .await;
}

async fn one_client_is_counted_without_gaps_by_all_three_processes(sessions: Sessions) {
    bounded(Duration::from_secs(180), async {
        let cluster = start(sessions).await;
        let started = Instant::now();
        let mut cookie = None;
        let mut served_by = HashSet::new();
        for expected in 1..=300 {
            let (count, pid) = count_once(&cluster, &mut cookie).await;
            assert_eq!(count, expected, "request {expected} was counted as {count}");
            served_by.insert(pid);
        }
        let all: HashSet<u32> = cluster.pids().into_iter().collect();
        assert_eq!(served_by, all, "not every process served the client");
        eprintln!("300 sequential requests in {:?}", started.elapsed());
    })
    .await;
}

async fn sixteen_clients_sharing_one_cookie_lose_no_increment(sessions: Sessions) {
    const CLIENTS: u64 = 16;
    const EACH: u64 = 40;
    bounded(Duration::from_secs(180), async {
        let cluster = start(sessions).await;
        let mut cookie = None;
        let (base, _) = count_once(&cluster, &mut cookie).await;
        let cookie = cookie.unwrap();
        let url = cluster.url("/");
        let started = Instant::now();

        let mut tasks = Vec::new();
        for _ in 0..CLIENTS {
            // A client of its own (own connections), the same cookie.
            let client = common::http_client();
            let url = url.clone();
            let cookie = cookie.clone();
            tasks.push(tokio::spawn(async move {
                let mut seen = Vec::new();
                for _ in 0..EACH {
                    let reply = counter_request(&client, Method::GET, &url, Some(&cookie))
                        .await
                        .expect("GET / through nginx");
                    assert_eq!(reply.status, StatusCode::OK, "GET / answered {reply:?}");
                    seen.push(reply.count.expect("a JSON count"));
                }
                seen
            }));
        }
        let mut counts = Vec::new();
        let mut served_by = HashSet::new();
        for task in tasks {
            for (count, pid) in task.await.expect("a client task panicked") {
                counts.push(count);
                served_by.insert(pid);
            }
        }
        let elapsed = started.elapsed();
        counts.sort_unstable();
        let expected: Vec<u64> = (base + 1..=base + CLIENTS * EACH).collect();
        assert_eq!(counts, expected, "the counts seen are not exactly one each");
        let reply = peek(&cluster, Some(&cookie)).await;
        assert_eq!(
            reply.count.map(|(count, _)| count),
            Some(base + CLIENTS * EACH)
        );
        assert_eq!(served_by.len(), COPIES, "not every process served");
        eprintln!(
            "{} concurrent increments of one session in {elapsed:?}",
            CLIENTS * EACH
        );
    })
    .await;
}

/// The five counts answered most often, each with how often and by which processes: what a
/// failed run of the kill test reports (a lost session shows as one count answered many times).
fn most_repeated(ok: &[(u64, u32)]) -> Vec<(u64, usize, BTreeSet<u32>)> {
    let mut by_count: std::collections::BTreeMap<u64, (usize, BTreeSet<u32>)> =
        std::collections::BTreeMap::new();
    for &(count, pid) in ok {
        let entry = by_count.entry(count).or_default();
        entry.0 += 1;
        entry.1.insert(pid);
    }
    let mut repeated: Vec<(u64, usize, BTreeSet<u32>)> = by_count
        .into_iter()
        .filter(|(_, (times, _))| *times > 1)
        .map(|(count, (times, pids))| (count, times, pids))
        .collect();
    repeated.sort_by_key(|r| std::cmp::Reverse(r.1));
    repeated.truncate(5);
    repeated
}

/// What the load clients saw.
#[derive(Default)]
struct Seen {
    /// `(count, pid)` of every 200.
    ok: Vec<(u64, u32)>,
    /// Everything else: status or transport error.
    failed: Vec<String>,
}

/// Each request holds the session for 2 ms, so that the session is held nearly all the time and
/// a kill hits its holder about once in three rounds; the kills go on until one has.
async fn a_process_killed_mid_load_loses_nothing_that_was_acknowledged(sessions: Sessions) {
    killed_under_load(sessions, Some(2), 5).await;
}

/// Requests as fast as they come (a lease held for microseconds of each, handed over within a
/// process): fifteen kills at random moments, whatever they hit.
async fn processes_killed_between_fast_requests_lose_nothing_that_was_acknowledged(
    sessions: Sessions,
) {
    killed_under_load(sessions, None, 15).await;
}

/// Eight clients count on one session through nginx while processes are SIGKILLed and restarted
/// at random moments, `rounds` times at least; with `hold_ms`, until a kill has hit the holder
/// of the session's lease too. No acknowledged increment may be lost.
async fn killed_under_load(sessions: Sessions, hold_ms: Option<u64>, rounds: usize) {
    const CLIENTS: usize = 8;
    const MAX_ROUNDS: usize = 100;
    bounded(Duration::from_secs(240), async {
        let hold = hold_ms.map(|ms| ms.to_string());
        let args: Vec<&str> = match &hold {
            Some(ms) => vec!["--hold-ms", ms.as_str()],
            None => vec![],
        };
        let mut cluster = start_with(sessions, &args).await;
        let mut chance = Chance::from_clock();
        eprintln!("kill schedule seed: {}", chance.seed());
        let mut cookie = None;
        let (base, _) = count_once(&cluster, &mut cookie).await;
        let cookie = cookie.unwrap();
        let url = cluster.url("/");

        let stop = Arc::new(AtomicBool::new(false));
        let (progress, progress_rx) = tokio::sync::watch::channel(0u64);
        let progress = Arc::new(progress);
        let mut tasks = Vec::new();
        for _ in 0..CLIENTS {
            let client = common::http_client();
            let (url, cookie, stop, progress) = (
                url.clone(),
                cookie.clone(),
                Arc::clone(&stop),
                Arc::clone(&progress),
            );
            tasks.push(tokio::spawn(async move {
                let mut seen = Seen::default();
                while !stop.load(Ordering::Relaxed) {
                    match counter_request(&client, Method::GET, &url, Some(&cookie)).await {
                        Ok(reply) => match reply.count {
                            Some(count) if reply.status == StatusCode::OK => {
                                seen.ok.push(count);
                                progress.send_modify(|n| *n += 1);
                            }
                            _ => seen.failed.push(format!("status {}", reply.status)),
                        },
                        Err(error) => seen.failed.push(format!("error {error}")),
                    }
                }
                seen
            }));
        }

        // Kill at random moments until at least `rounds` kills have happened and, with a hold,
        // at least one of them hit a process while it held the session's lease (the survivors,
        // or the restart, log the take-over).
        let mut restarted_pids = Vec::new();
        let mut progress_rx = progress_rx;
        let mut round = 0;
        while round < rounds || (hold_ms.is_some() && takeovers(&cluster, sessions) == 0) {
            assert!(
                round < MAX_ROUNDS,
                "{MAX_ROUNDS} kills and none hit a process holding the lease"
            );
            let done = *progress_rx.borrow();
            let kill_after = done + chance.between(10, 100);
            progress_rx
                .wait_for(|n| *n >= kill_after)
                .await
                .expect("the load clients stopped");
            let victim = usize::try_from(chance.between(0, COPIES as u64)).unwrap();
            eprintln!("round {round}: SIGKILL copy {victim} after {kill_after} answers");
            cluster.kill(victim);
            cluster.restart(victim).await;
            restarted_pids.push(cluster.pids()[victim]);
            // Let the restarted process take part in the load before the next kill.
            let resume = *progress_rx.borrow() + 100;
            progress_rx
                .wait_for(|n| *n >= resume)
                .await
                .expect("the load clients stopped");
            round += 1;
        }
        stop.store(true, Ordering::Relaxed);

        let mut seen = Seen::default();
        for task in tasks {
            let part = task.await.expect("a load client panicked");
            seen.ok.extend(part.ok);
            seen.failed.extend(part.failed);
        }
        let counts: Vec<u64> = seen.ok.iter().map(|&(count, _)| count).collect();
        let unique: BTreeSet<u64> = counts.iter().copied().collect();
        assert_eq!(
            unique.len(),
            counts.len(),
            "two 200 answers carried the same count: an acknowledged increment was lost. \
             {} answers, {} distinct counts; the most repeated (count, times, answering pids): \
             {:?}; restarted pids in order: {:?}",
            counts.len(),
            unique.len(),
            most_repeated(&seen.ok),
            restarted_pids
        );
        let max_seen = unique.last().copied().unwrap_or(base);
        let reply = peek(&cluster, Some(&cookie)).await;
        let (final_count, _) = reply.count.unwrap();
        assert!(
            final_count >= max_seen,
            "the session says {final_count} but a client was told {max_seen}"
        );
        // nginx passes a GET whose process died before answering on to the next process, so a
        // request in flight in a killed process may have been counted twice (once unanswered).
        let attempts = u64::try_from(seen.ok.len() + seen.failed.len()).unwrap();
        let retried_at_most = u64::try_from(CLIENTS * restarted_pids.len()).unwrap();
        assert!(
            final_count <= base + attempts + retried_at_most,
            "the session counted {final_count}, more than {attempts} requests could have"
        );
        for restarted in &restarted_pids {
            assert!(
                seen.ok.iter().any(|(_, pid)| pid == restarted),
                "the restarted process {restarted} never served"
            );
        }
        // Each kill can fail at most the requests that were in flight in the killed process.
        assert!(
            seen.failed.len() <= CLIENTS * restarted_pids.len(),
            "{} requests failed: {:?}",
            seen.failed.len(),
            seen.failed
        );
        eprintln!(
            "{} kills ({} lease take-overs from a dead holder): {} acknowledged increments, {} \
             failed requests, final count {final_count} (base {base})",
            restarted_pids.len(),
            takeovers(&cluster, sessions),
            seen.ok.len(),
            seen.failed.len()
        );

        cluster.stop_all().await;
        assert_store_is_clean(&cluster);
    })
    .await;
}

async fn sessions_survive_a_restart_of_every_process(sessions: Sessions) {
    bounded(Duration::from_secs(180), async {
        let mut cluster = start(sessions).await;
        let mut clients = Vec::new();
        for visits in [1u64, 2, 5, 9, 14] {
            let mut cookie = None;
            for _ in 0..visits {
                count_once(&cluster, &mut cookie).await;
            }
            clients.push((cookie.unwrap(), visits));
        }
        let old_pids = cluster.pids();

        cluster.stop_all().await;
        assert_store_is_clean(&cluster);
        cluster.restart_all().await;
        cluster.nginx.wait_ready(&cluster.client).await;
        let new_pids = cluster.pids();
        assert!(
            new_pids.iter().all(|pid| !old_pids.contains(pid)),
            "the processes were not replaced: {old_pids:?} -> {new_pids:?}"
        );

        for (cookie, visits) in &clients {
            let reply = peek(&cluster, Some(cookie)).await;
            assert_eq!(reply.count.map(|(count, _)| count), Some(*visits));
            let mut cookie = Some(cookie.clone());
            let (count, pid) = count_once(&cluster, &mut cookie).await;
            assert_eq!(count, visits + 1);
            assert!(new_pids.contains(&pid));
        }
        let reply = peek(&cluster, None).await;
        assert_eq!(reply.count.map(|(count, _)| count), Some(0));
        assert_eq!(cluster.copies(), COPIES);
    })
    .await;
}

/// Makes a `file::NAME` and a `redis::NAME` test of each `NAME(sessions: Sessions)` listed.
macro_rules! on_file_and_redis {
    ($($name:ident),* $(,)?) => {
        mod file {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                super::$name(super::Sessions::File).await;
            })*
        }
        mod redis {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                super::$name(super::Sessions::Redis).await;
            })*
        }
    };
}

on_file_and_redis! {
    the_counter_keeps_its_http_contract,
    one_client_is_counted_without_gaps_by_all_three_processes,
    sixteen_clients_sharing_one_cookie_lose_no_increment,
    a_process_killed_mid_load_loses_nothing_that_was_acknowledged,
    processes_killed_between_fast_requests_lose_nothing_that_was_acknowledged,
    sessions_survive_a_restart_of_every_process,
}
