//! Chaos soak test: three `counter` processes share one small session file behind nginx, under
//! load from many clients, while the harness SIGKILLs and restarts processes, SIGSTOPs processes
//! that hold leases for longer than the lease timeout (so that waiters take the leases over and the
//! stopped holders' late commits are fenced), and the store is kept full by clients that create
//! sessions they never use again (eviction). At the end, a store with nothing evictable must answer
//! new sessions with a clean `503`.
//!
//! Afterwards it checks, per session, that every count a client was told (200) is reflected
//! exactly once in the final state, that no request waited past the lease wait plus a margin
//! (requests that sat in a stopped process are allowed the stop on top), that nothing is stuck,
//! that no process died unless killed, and that the file verifies clean, live and after recovery.
//!
//! `CHAOS_SECS` sets the length of the chaos phase (default 60). The schedule's seed is printed;
//! timing makes a run unrepeatable anyway, but the seed tells which choices were made.
//! `CHAOS_KEEP_LOGS=DIR` keeps the servers' logs and a line per request (start and end in seconds
//! from the start of the chaos, who, outcome) in `DIR` for a post-mortem.
//!
//! Needs nginx (`apt-get install nginx`) and the `counter` example binary, which plain `cargo test`
//! builds first.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{bounded, cookie_pair, counter_request, Chance, Cluster, Reply};
use mmap_session::store::{Lease, Options, Store};
use mmap_session::SessionId;
use reqwest::{Method, StatusCode};

const COPIES: usize = 3;
/// Clients with a session of their own each.
const OWN_CLIENTS: usize = 24;
/// Groups of clients that share one session (one cookie) per group.
const GROUPS: usize = 4;
const GROUP_SIZE: usize = 6;
/// Clients that create a new session with every request and never come back (they fill the
/// store, and their sessions are the ones eviction should take).
const FILLERS: usize = 4;
/// Sessions whose counts are checked: one per own client, one per group.
const CHECKED: usize = OWN_CLIENTS + GROUPS;

/// The counters' `--lease-timeout-ms`: a live holder is taken over after holding this long.
const LEASE_TIMEOUT: Duration = Duration::from_millis(1000);
/// The counters' `--lease-wait-ms`: above the lease timeout, so a waiter takes a stuck lease over
/// instead of giving up with a 503.
const LEASE_WAIT: Duration = Duration::from_millis(3000);
/// What a request may take beyond the lease wait: a debug build on a loaded two-core machine.
const LATENCY_MARGIN: Duration = Duration::from_millis(2000);
/// How long a process that holds a lease stays stopped (more than the lease timeout).
const STOP_MS: (u64, u64) = (1500, 2500);
/// Pause between two chaos events.
const PAUSE_MS: (u64, u64) = (300, 2000);
/// Default length of the chaos phase; `CHAOS_SECS` overrides it.
const DEFAULT_CHAOS_SECS: u64 = 60;
/// A lease that cannot be had within this long at the end, with no load, is stuck.
const STUCK_AFTER: Duration = Duration::from_secs(2);

/// The shape of the session file, created by the test before any process starts (an existing file
/// keeps its shape, and the counter has no flags for it). 512 sessions give the smallest index, 1024
/// entries (one shard, probe windows of 64): it fills after about a thousand sessions, and then
/// every new session evicts the least recently used idle one of its probe window. 2 MiB leave room
/// for one 1 MiB data chunk after the index, so the file also reaches its maximum size (the
/// counter's records all fall in one size class, and one chunk holds about 10,900 of them: the
/// index is what runs out).
const MAX_SESSIONS: u64 = 512;
const MAX_FILE_SIZE: u64 = 2 << 20;

/// Taken by each test of this file for its whole run: the soak's SIGKILLs and restarts load the
/// machine's two cores so much that the other test, which must catch a process in the short
/// moment it holds a lease, could go a minute without seeing it.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Which session a client counts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    /// Checked session number `n` (own clients first, then groups).
    Checked(usize),
    /// A filler: a new session per request.
    Filler,
}

/// What one request got.
#[derive(Debug)]
enum Outcome {
    /// 200 with the counter's JSON.
    Ok {
        count: u64,
        pid: u32,
        set_cookie: Option<String>,
    },
    /// Any other status (or a 200 without a count).
    Status(Reply),
    /// No HTTP answer at all.
    Transport(String),
}

/// One request, timed.
#[derive(Debug)]
struct Sample {
    who: Who,
    start: Instant,
    end: Instant,
    outcome: Outcome,
}

impl Sample {
    fn latency(&self) -> Duration {
        self.end - self.start
    }

    fn overlaps(&self, from: Instant, to: Instant) -> bool {
        self.start <= to && self.end >= from
    }

    fn status(&self) -> Option<StatusCode> {
        match &self.outcome {
            Outcome::Ok { .. } => Some(StatusCode::OK),
            Outcome::Status(reply) => Some(reply.status),
            Outcome::Transport(_) => None,
        }
    }
}

/// What a client task hands back.
#[derive(Default)]
struct ClientLog {
    samples: Vec<Sample>,
    /// Sessions a filler created: cookie pair and when.
    created: Vec<(String, Instant)>,
}

/// One SIGSTOP of a copy.
#[derive(Debug)]
struct Stop {
    index: usize,
    pid: u32,
    from: Instant,
    to: Instant,
    /// Leases the stopped process held once it was stopped.
    leases_held: usize,
    /// Of those, leases of checked group sessions (which always have waiters).
    group_leases_held: usize,
    /// Killed while stopped instead of continued.
    killed: bool,
}

/// Everything the harness did.
#[derive(Debug, Default)]
struct Chaos {
    /// `(copy, pid, when)` of every SIGKILL.
    kills: Vec<(usize, u32, Instant)>,
    /// `(kill, restarted and healthy)` windows.
    down: Vec<(Instant, Instant)>,
    stops: Vec<Stop>,
    /// Processes that exited without being killed: name, status, log tail.
    crashes: Vec<String>,
    /// Copies restarted after a kill, with their new pid.
    restarted_pids: Vec<u32>,
    /// Kills that left leases held by the dead process.
    kills_of_holders: usize,
}

fn chaos_secs() -> u64 {
    match std::env::var("CHAOS_SECS") {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("CHAOS_SECS={text:?} is not a number of seconds")),
        Err(_) => DEFAULT_CHAOS_SECS,
    }
}

/// The store key (the session id's 16 bytes) of a `session=...` cookie pair.
fn key_of(cookie: &str) -> [u8; 16] {
    let value = cookie.split_once('=').map_or("", |(_, value)| value);
    *SessionId::decode(value)
        .unwrap_or_else(|| panic!("{cookie:?} holds no session id"))
        .as_bytes()
}

/// The short hash under which `Store::entries` lists the session of a cookie pair.
fn short_hash_of(cookie: &str) -> String {
    let value = cookie.split_once('=').map_or("", |(_, value)| value);
    SessionId::decode(value)
        .expect("a session id")
        .short_hash()
        .to_string()
}

/// Sends GET / (an increment) with `cookie` and times it.
async fn timed_increment(
    client: &reqwest::Client,
    url: &str,
    who: Who,
    cookie: Option<&str>,
) -> Sample {
    let start = Instant::now();
    let result = counter_request(client, Method::GET, url, cookie).await;
    let end = Instant::now();
    let outcome = match result {
        Ok(reply) => match reply.count {
            Some((count, pid)) if reply.status == StatusCode::OK => Outcome::Ok {
                count,
                pid,
                set_cookie: reply.set_cookie,
            },
            _ => Outcome::Status(reply),
        },
        Err(error) => Outcome::Transport(error.to_string()),
    };
    Sample {
        who,
        start,
        end,
        outcome,
    }
}

/// A load client: increments until `stop`, with its own connections. A checked client always
/// sends its session's cookie (it never adopts another: a different id in a 200 means its session
/// was lost, which the analysis reports); a filler sends none, so each of its requests creates a
/// session.
async fn run_client(
    who: Who,
    url: String,
    cookie: Option<String>,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> ClientLog {
    let client = common::http_client();
    let mut chance = Chance::from_seed(seed);
    let mut log = ClientLog::default();
    while !stop.load(Ordering::Relaxed) {
        let sample = timed_increment(&client, &url, who, cookie.as_deref()).await;
        let failed = !matches!(sample.outcome, Outcome::Ok { .. });
        if let (
            Who::Filler,
            Outcome::Ok {
                set_cookie: Some(set_cookie),
                ..
            },
        ) = (who, &sample.outcome)
        {
            log.created.push((cookie_pair(set_cookie), sample.end));
        }
        log.samples.push(sample);
        if failed {
            // Do not spin on a copy that is down; a random pause, not a wait for a condition.
            tokio::time::sleep(Duration::from_millis(chance.between(10, 40))).await;
        }
    }
    log
}

/// Lease holders among the running copies: `(copy, leases, group-session leases)`.
fn lease_holders(
    store: &Store,
    pids: &[Option<u32>],
    group_hashes: &HashSet<String>,
) -> Vec<(usize, usize, usize)> {
    let mut held: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
    for entry in store.entries() {
        let Some(holder) = entry.lease else { continue };
        if !holder.alive {
            continue;
        }
        let Some(index) = pids
            .iter()
            .position(|pid| pid.is_some_and(|pid| u64::from(pid) == holder.pid))
        else {
            continue;
        };
        let slot = held.entry(index).or_default();
        slot.0 += 1;
        if group_hashes.contains(&entry.key_hash) {
            slot.1 += 1;
        }
    }
    held.into_iter()
        .map(|(index, (all, group))| (index, all, group))
        .collect()
}

fn running_pids(cluster: &mut Cluster) -> Vec<Option<u32>> {
    (0..cluster.copies())
        .map(|index| cluster.server(index).map(|process| process.pid()))
        .collect()
}

/// Restarts every copy that exited without being killed, recording it as a crash.
async fn reap_crashes(cluster: &mut Cluster, chaos: &mut Chaos) {
    for index in 0..cluster.copies() {
        let Some(process) = cluster.server(index) else {
            continue;
        };
        if let Some(status) = process.exited() {
            chaos.crashes.push(format!(
                "{} (pid {}) exited on its own: {status}\n{}",
                process.name(),
                process.pid(),
                process.log_tail()
            ));
            cluster.kill(index); // reaps it
            cluster.restart(index).await;
        }
    }
}

/// SIGKILLs copy `index` (stopped or not) and restarts it; counts the leases it died holding.
async fn kill_and_restart(cluster: &mut Cluster, chaos: &mut Chaos, probe: &Store, index: usize) {
    let pid = cluster.server(index).map_or(0, |process| process.pid());
    let killed_at = Instant::now();
    cluster.kill(index);
    chaos.kills.push((index, pid, killed_at));
    let dead_leases = probe
        .entries()
        .iter()
        .filter(|entry| {
            entry
                .lease
                .as_ref()
                .is_some_and(|holder| holder.pid == u64::from(pid) && !holder.alive)
        })
        .count();
    if dead_leases > 0 {
        chaos.kills_of_holders += 1;
    }
    eprintln!("SIGKILL copy {index} (pid {pid}), which held {dead_leases} leases");
    cluster.restart(index).await;
    chaos.down.push((killed_at, Instant::now()));
    if let Some(process) = cluster.server(index) {
        chaos.restarted_pids.push(process.pid());
    }
}

/// A running copy that holds a lease right now, looked for during up to 300 ms (preferring one
/// that holds a lease of a shared session if `prefer_shared`); else a random copy.
async fn find_holder(
    cluster: &mut Cluster,
    chance: &mut Chance,
    probe: &Store,
    group_hashes: &HashSet<String>,
    prefer_shared: bool,
) -> usize {
    let look_until = Instant::now() + Duration::from_millis(300);
    loop {
        let pids = running_pids(cluster);
        let holders = lease_holders(probe, &pids, group_hashes);
        let best = holders
            .iter()
            .max_by_key(|&&(_, all, group)| (group, all))
            .copied();
        match best {
            Some((index, _, group)) if group > 0 || !prefer_shared => return index,
            Some((index, _, _)) if Instant::now() >= look_until => return index,
            None if Instant::now() >= look_until => {
                return usize::try_from(chance.between(0, COPIES as u64)).unwrap()
            }
            _ => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

/// Stops a copy that holds leases (preferably of a group session, which other requests wait for),
/// keeps it stopped past the lease timeout, then continues it (or, if `then_kill`, kills and
/// restarts it). A copy found holding nothing once stopped is continued at once and another is
/// tried, a few times.
async fn stop_a_holder(
    cluster: &mut Cluster,
    chaos: &mut Chaos,
    chance: &mut Chance,
    probe: &Store,
    group_hashes: &HashSet<String>,
    then_kill: bool,
) {
    const ATTEMPTS: usize = 20;
    for attempt in 0..ATTEMPTS {
        // A group session's lease is nearly always held by someone: six clients take turns.
        let index = find_holder(cluster, chance, probe, group_hashes, true).await;
        let Some(process) = cluster.server(index) else {
            continue;
        };
        let pid = process.pid();
        let from = Instant::now();
        let stopped = process.suspend(Duration::from_secs(2)).await;
        assert!(
            stopped,
            "copy {index} (pid {pid}) did not stop after SIGSTOP"
        );
        // Stopped: what it holds now it holds until it is continued.
        let pids = running_pids(cluster);
        let (leases_held, group_leases_held) = lease_holders(probe, &pids, group_hashes)
            .into_iter()
            .find(|&(holder, _, _)| holder == index)
            .map_or((0, 0), |(_, all, group)| (all, group));
        let last = attempt + 1 == ATTEMPTS;
        if leases_held > 0 || last {
            let stop_for = Duration::from_millis(chance.between(STOP_MS.0, STOP_MS.1));
            eprintln!(
                "SIGSTOP copy {index} (pid {pid}) holding {leases_held} leases ({group_leases_held} \
                 of shared sessions) for {stop_for:?}{}",
                if then_kill { ", then:" } else { "" }
            );
            tokio::time::sleep(stop_for).await;
            if then_kill {
                chaos.stops.push(Stop {
                    index,
                    pid,
                    from,
                    to: Instant::now(),
                    leases_held,
                    group_leases_held,
                    killed: true,
                });
                kill_and_restart(cluster, chaos, probe, index).await;
            } else {
                cluster
                    .server(index)
                    .expect("the stopped copy is still ours")
                    .resume();
                chaos.stops.push(Stop {
                    index,
                    pid,
                    from,
                    to: Instant::now(),
                    leases_held,
                    group_leases_held,
                    killed: false,
                });
            }
            return;
        }
        // It held nothing once stopped: continue it and try again.
        cluster
            .server(index)
            .expect("the stopped copy is still ours")
            .resume();
        chaos.stops.push(Stop {
            index,
            pid,
            from,
            to: Instant::now(),
            leases_held: 0,
            group_leases_held: 0,
            killed: false,
        });
        tokio::time::sleep(Duration::from_millis(chance.between(5, 50))).await;
    }
}

/// Waits `pause` in short steps, restarting crashed copies meanwhile.
async fn pause_watching(cluster: &mut Cluster, chaos: &mut Chaos, pause: Duration) {
    let until = Instant::now() + pause;
    while Instant::now() < until {
        reap_crashes(cluster, chaos).await;
        let step = until
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(100));
        tokio::time::sleep(step).await;
    }
}

/// Creates the session file with a small shape before any process opens it.
fn create_small_store(path: &Path) {
    let store = Store::open_with(
        path,
        Options::new()
            .max_file_size(MAX_FILE_SIZE)
            .max_sessions(MAX_SESSIONS),
    )
    .expect("create the small session file");
    let stats = store.stats();
    assert_eq!(stats.capacity_bytes, MAX_FILE_SIZE, "{stats:?}");
    assert_eq!(stats.index_entries, 2 * MAX_SESSIONS, "{stats:?}");
}

/// One checked session's account.
#[derive(Debug, Default)]
struct Account {
    /// Counts of 200 answers for this session (the creating request's 1 included).
    counts: Vec<u64>,
    /// Requests without a 200 whose time in flight contains a SIGKILL: the only ones whose
    /// increment may have been committed without its answer reaching the client.
    failed_across_kill: u64,
    /// Requests without a 200.
    failed: u64,
    /// 200 answers that carried another session id: the session was gone.
    replaced: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_soak_loses_no_acknowledged_increment() {
    let chaos_for = Duration::from_secs(chaos_secs());
    // Hard bound: the chaos phase, plus startup (each start may take up to 30 s on a loaded
    // machine), restarts and the checks at the end.
    let limit = chaos_for + Duration::from_secs(240);
    let _alone = ONE_AT_A_TIME.lock().await;
    bounded(limit, soak(chaos_for)).await;
}

/// The counters' lease flags.
fn lease_args() -> Vec<String> {
    vec![
        "--lease-timeout-ms".to_owned(),
        LEASE_TIMEOUT.as_millis().to_string(),
        "--lease-wait-ms".to_owned(),
        LEASE_WAIT.as_millis().to_string(),
    ]
}

#[allow(clippy::too_many_lines)]
async fn soak(chaos_for: Duration) {
    let lease_args = lease_args();
    let lease_args: Vec<&str> = lease_args.iter().map(String::as_str).collect();
    // No retry on another upstream: nginx would otherwise pass a GET whose process died (after it
    // may have committed) on to the next process, applying one request's increment twice; with
    // this every increment corresponds to at most one client request.
    let mut cluster = Cluster::start_with(
        "counter",
        COPIES,
        &lease_args,
        "proxy_next_upstream off;",
        create_small_store,
    )
    .await;
    let mut chance = Chance::from_clock();
    eprintln!(
        "chaos: seed {}, {chaos_for:?} of chaos, store at {}",
        chance.seed(),
        cluster.store_path().display()
    );
    let url = cluster.url("/");

    // The checked sessions, each created by one request (count 1) before the chaos starts.
    let mut cookies = Vec::new();
    for _ in 0..CHECKED {
        let reply = counter_request(&cluster.client, Method::GET, &url, None)
            .await
            .expect("GET / through nginx");
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "creating a session: {reply:?}"
        );
        assert_eq!(reply.count.map(|(count, _)| count), Some(1));
        let set_cookie = reply.set_cookie.expect("a new session sets its cookie");
        cookies.push(cookie_pair(&set_cookie));
    }
    let group_hashes: HashSet<String> = cookies[OWN_CLIENTS..]
        .iter()
        .map(|cookie| short_hash_of(cookie))
        .collect();
    let checked_hashes: HashMap<String, usize> = cookies
        .iter()
        .enumerate()
        .map(|(n, cookie)| (short_hash_of(cookie), n))
        .collect();

    // The load.
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let mut spawn = |who: Who, cookie: Option<String>, chance: &mut Chance| {
        let seed = chance.between(1, u64::MAX);
        tasks.push(tokio::spawn(run_client(
            who,
            url.clone(),
            cookie,
            Arc::clone(&stop),
            seed,
        )));
    };
    for (n, cookie) in cookies.iter().enumerate().take(OWN_CLIENTS) {
        spawn(Who::Checked(n), Some(cookie.clone()), &mut chance);
    }
    for group in 0..GROUPS {
        let n = OWN_CLIENTS + group;
        for _ in 0..GROUP_SIZE {
            spawn(Who::Checked(n), Some(cookies[n].clone()), &mut chance);
        }
    }
    for _ in 0..FILLERS {
        spawn(Who::Filler, None, &mut chance);
    }

    // The chaos. The probe is this process's own handle on the file: it sees who holds which
    // lease (to stop a holder) and the store's counters.
    let probe = Store::open(cluster.store_path()).expect("open the session file");
    let mut chaos = Chaos::default();
    let started = Instant::now();
    let chaos_end = started + chaos_for;
    let mut event = 0u64;
    loop {
        let pause = Duration::from_millis(chance.between(PAUSE_MS.0, PAUSE_MS.1));
        pause_watching(&mut cluster, &mut chaos, pause).await;
        if Instant::now() >= chaos_end {
            break;
        }
        // The first two events are one of each kind, so that even a short run has both.
        let roll = match event {
            0 => 0,
            1 => 50,
            _ => chance.between(0, 100),
        };
        event += 1;
        eprint!("chaos {:>5.1}s: ", started.elapsed().as_secs_f64());
        if roll < 40 {
            // Half of the kills aim at a process holding a lease, so that its lease is left to
            // be taken over from a dead holder; the others hit whatever it is doing.
            let index = if chance.between(0, 2) == 0 {
                find_holder(&mut cluster, &mut chance, &probe, &group_hashes, false).await
            } else {
                usize::try_from(chance.between(0, COPIES as u64)).unwrap()
            };
            kill_and_restart(&mut cluster, &mut chaos, &probe, index).await;
        } else {
            let then_kill = roll >= 85;
            stop_a_holder(
                &mut cluster,
                &mut chaos,
                &mut chance,
                &probe,
                &group_hashes,
                then_kill,
            )
            .await;
        }
    }
    let chaos_elapsed = started.elapsed();

    // Stop the load and collect what the clients saw.
    stop.store(true, Ordering::Relaxed);
    let mut samples = Vec::new();
    let mut created = Vec::new();
    for task in tasks {
        let log = task.await.expect("a load client panicked");
        samples.extend(log.samples);
        created.extend(log.created);
    }
    reap_crashes(&mut cluster, &mut chaos).await;

    // The file as the live processes left it (idle now, so the check is exact), before any
    // recovery: leaked blocks and leases of dead holders are allowed, inconsistencies are not.
    let live_report = probe.verify();
    let stats = probe.stats();

    // Stuck leases: with no load, every checked session and every filler session still stored
    // must be leasable within a moment (a dead holder's lease is taken over at once).
    let mut leasable: Vec<(String, [u8; 16])> = cookies
        .iter()
        .map(|cookie| (cookie.clone(), key_of(cookie)))
        .collect();
    let mut fillers_present = 0usize;
    let mut fillers_evicted = 0usize;
    for (cookie, _) in &created {
        let key = key_of(cookie);
        if probe.get(&key).is_some() {
            fillers_present += 1;
            leasable.push((cookie.clone(), key));
        } else {
            fillers_evicted += 1;
        }
    }
    let stuck = {
        let probe = probe.clone();
        let keys: Vec<[u8; 16]> = leasable.iter().map(|(_, key)| *key).collect();
        tokio::task::spawn_blocking(move || {
            keys.iter()
                .filter(|key| {
                    probe
                        .lease_blocking(&key[..], Instant::now() + STUCK_AFTER)
                        .is_err()
                })
                .count()
        })
        .await
        .expect("the lease check panicked")
    };

    // The final count of every checked session, read without changing it.
    let mut finals = Vec::new();
    for cookie in &cookies {
        let reply = counter_request(
            &cluster.client,
            Method::GET,
            &cluster.url("/peek"),
            Some(cookie),
        )
        .await
        .expect("GET /peek through nginx");
        assert_eq!(reply.status, StatusCode::OK, "GET /peek answered {reply:?}");
        finals.push(reply.count.map_or(0, |(count, _)| count));
    }

    // ---- The accounts. ----
    let mut accounts: Vec<Account> = (0..CHECKED)
        .map(|_| Account {
            counts: vec![1],
            ..Account::default()
        })
        .collect();
    let kill_times: Vec<Instant> = chaos.kills.iter().map(|&(_, _, at)| at).collect();
    let mut filler_bad = Vec::new();
    for sample in &samples {
        match (sample.who, &sample.outcome) {
            (
                Who::Checked(n),
                Outcome::Ok {
                    count, set_cookie, ..
                },
            ) => {
                let other = set_cookie
                    .as_deref()
                    .map(cookie_pair)
                    .filter(|pair| *pair != cookies[n]);
                match other {
                    // A refresh of the sliding expiry re-sends the same id: still this session.
                    None => accounts[n].counts.push(*count),
                    Some(_) => accounts[n]
                        .replaced
                        .push(format!("count {count} under a new id")),
                }
            }
            (Who::Checked(n), _) => {
                accounts[n].failed += 1;
                if kill_times
                    .iter()
                    .any(|&at| sample.start <= at && at <= sample.end)
                {
                    accounts[n].failed_across_kill += 1;
                }
            }
            (
                Who::Filler,
                Outcome::Ok {
                    count, set_cookie, ..
                },
            ) => {
                if *count != 1 || set_cookie.is_none() {
                    filler_bad.push(format!("count {count}, set-cookie {set_cookie:?}"));
                }
            }
            (Who::Filler, _) => {}
        }
    }
    let mut duplicates = 0u64;
    let mut lost = 0u64;
    let mut unacknowledged = 0u64;
    let mut beyond_bound = Vec::new();
    let mut replaced = Vec::new();
    for (n, account) in accounts.iter().enumerate() {
        let mut seen: BTreeMap<u64, u64> = BTreeMap::new();
        for &count in &account.counts {
            *seen.entry(count).or_default() += 1;
        }
        let dups: u64 = seen.values().map(|&times| times - 1).sum();
        duplicates += dups;
        let final_count = finals[n];
        // An acknowledged count above the final one was lost (its session's state went back, or
        // the session disappeared: the final read is then 0).
        let above = account
            .counts
            .iter()
            .filter(|&&count| count > final_count)
            .count() as u64;
        lost += above;
        let acknowledged = seen.len() as u64;
        let extra = final_count.saturating_sub(acknowledged);
        unacknowledged += extra;
        // Increments committed without a 200 reaching the client: only a request in flight in a
        // process that was killed can be one (a stopped holder's late commit is refused; a
        // lease-wait 503 commits nothing; nginx does not retry).
        if extra > account.failed_across_kill {
            beyond_bound.push(format!(
                "session {n}: final {final_count}, {acknowledged} distinct counts acknowledged, \
                 {} failed requests in flight across a kill ({} failed in all)",
                account.failed_across_kill, account.failed
            ));
        }
        if !account.replaced.is_empty() {
            replaced.push(format!(
                "session {n} ({} acknowledged counts before): {:?}",
                account.counts.len(),
                account.replaced
            ));
        }
    }

    // Latency: no request waits past the lease wait plus the margin, except one that sat in a
    // stopped process (answered by it, or not answered with a 200 at all while a stop was on):
    // that one may also wait out the stop.
    let mut slow = Vec::new();
    let mut max_normal = Duration::ZERO;
    let mut max_stopped = Duration::ZERO;
    let mut exempted = 0u64;
    let mut slowest: Vec<(Duration, String)> = Vec::new();
    for sample in &samples {
        let stop = chaos.stops.iter().find(|stop| {
            sample.overlaps(stop.from, stop.to)
                && match &sample.outcome {
                    Outcome::Ok { pid, .. } => *pid == stop.pid,
                    _ => true,
                }
        });
        let (allowed, max) = match stop {
            Some(stop) => {
                exempted += 1;
                (
                    (stop.to - stop.from) + LEASE_WAIT + LATENCY_MARGIN,
                    &mut max_stopped,
                )
            }
            None => (LEASE_WAIT + LATENCY_MARGIN, &mut max_normal),
        };
        *max = (*max).max(sample.latency());
        if stop.is_none() && sample.latency() > LEASE_TIMEOUT + LATENCY_MARGIN / 4 {
            slowest.push((
                sample.latency(),
                format!(
                    "{:?} {:?} at {:.3}s: {:?}",
                    sample.latency(),
                    sample.who,
                    (sample.start - started).as_secs_f64(),
                    sample.outcome
                ),
            ));
        }
        if sample.latency() > allowed {
            slow.push(format!(
                "{:?} took {:?} (allowed {allowed:?}), started {:.1}s in: {:?}",
                sample.who,
                sample.latency(),
                (sample.start - started).as_secs_f64(),
                sample.outcome
            ));
        }
    }

    // Statuses.
    let mut by_status: BTreeMap<String, u64> = BTreeMap::new();
    let mut unclean_503 = Vec::new();
    let mut unexplained_500 = Vec::new();
    let mut unexplained_503 = Vec::new();
    let mut transport_errors = Vec::new();
    for sample in &samples {
        let in_stop = chaos
            .stops
            .iter()
            .any(|stop| sample.overlaps(stop.from, stop.to));
        if let Outcome::Transport(error) = &sample.outcome {
            transport_errors.push(error.clone());
        }
        let key = match sample.status() {
            Some(status) => status.as_u16().to_string(),
            None => "no answer".to_owned(),
        };
        *by_status.entry(key).or_default() += 1;
        if let Outcome::Status(reply) = &sample.outcome {
            if reply.status == StatusCode::SERVICE_UNAVAILABLE
                && (reply.retry_after.as_deref() != Some("1") || reply.set_cookie.is_some())
            {
                unclean_503.push(format!("{reply:?}"));
            }
            let at = format!(
                "{:?} at {:.3}s after {:?}",
                sample.who,
                (sample.start - started).as_secs_f64(),
                sample.latency()
            );
            // A 500 is expected only from a stopped holder whose late commit was refused.
            if reply.status == StatusCode::INTERNAL_SERVER_ERROR && !in_stop {
                unexplained_500.push(at.clone());
            }
            // The lease wait (3 s) is longer than the lease timeout (1 s): a waiter takes any
            // lease over before it gives up, so a 503 needs a request that sat in a stopped
            // process (its wait ran on during the stop). The store never fills up with nothing
            // evictable during the chaos, as the fillers' sessions are idle.
            if reply.status == StatusCode::SERVICE_UNAVAILABLE && !in_stop {
                unexplained_503.push(at);
            }
        }
    }
    let count_of = |code: &str| by_status.get(code).copied().unwrap_or(0);
    let requests = samples.len() as u64;
    let oks = count_of("200");
    let unavailable = count_of("503");
    let other_errors = requests - oks - unavailable;
    // Evicted checked sessions, seen from the store: a checked session missing from the index.
    //
    // Eviction takes the least recently used idle record of the new session's probe window (64
    // index entries). A checked session is used every few milliseconds (idle at most while its
    // client's request sits in a stopped process, ~2.5 s), while a filler's session is never used
    // again after its creation and the ~1000 of them turn over every several seconds: the oldest
    // idle record of a window is a filler's. So no checked session may be evicted. Had one been,
    // it would count as lost updates above too (its final read is 0 and its creation's count 1 was
    // acknowledged), and its client would have seen a 200 under a new id (`replaced`).
    let present: HashSet<usize> = probe
        .entries()
        .iter()
        .filter_map(|entry| checked_hashes.get(&entry.key_hash).copied())
        .collect();
    let checked_missing: Vec<usize> = (0..CHECKED).filter(|n| !present.contains(n)).collect();

    let timeout_takeovers = cluster.log_lines_containing("held past the lease timeout");
    let dead_takeovers = cluster.log_lines_containing("holder process died");
    let fenced = cluster.log_lines_containing("lease was lost before the write");
    let lease_timeouts = cluster.log_lines_containing("timed out waiting for the session's lease");
    let stops_on_shared = chaos
        .stops
        .iter()
        .filter(|stop| stop.group_leases_held > 0)
        .count();

    // ---- A full store with nothing evictable answers a clean 503. ----
    // This process leases every stored session (all were created by this test's clients), so
    // nothing is idle: a new session finds its probe window full of leased entries and nothing to
    // evict. Done after the final counts, since it makes every session busy.
    let mut squat: Vec<Lease> = Vec::new();
    for (_, key) in &leasable {
        if let Ok(Some(lease)) = probe.try_lease(&key[..]) {
            if lease.read().is_some() {
                squat.push(lease);
            }
        }
    }
    // New sessions still find vacant entries or evict each other, until the test, leasing each
    // new one too, has every entry of some probe window.
    let mut full_reply = None;
    let mut created_while_full = 0u64;
    let full_deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < full_deadline && created_while_full <= 4 * MAX_SESSIONS {
        let reply = counter_request(&cluster.client, Method::GET, &url, None)
            .await
            .expect("GET / through nginx");
        match &reply.set_cookie {
            Some(set_cookie) if reply.status == StatusCode::OK => {
                created_while_full += 1;
                if let Ok(Some(lease)) = probe.try_lease(&key_of(&cookie_pair(set_cookie))[..]) {
                    squat.push(lease);
                }
            }
            _ => {
                full_reply = Some(reply);
                break;
            }
        }
    }
    let squatted = squat.len();
    drop(squat);
    let store_full_logged = cluster.log_lines_containing("the session store is full");
    let after_full = counter_request(&cluster.client, Method::GET, &url, None)
        .await
        .expect("GET / through nginx");

    // Every copy we did not kill is still the process we started, alive; the restarted ones too.
    let alive: Vec<Option<u32>> = running_pids(&mut cluster);
    let final_stats = probe.stats();
    drop(probe);

    eprintln!(
        "chaos soak: {:.1}s of chaos, seed {}",
        chaos_elapsed.as_secs_f64(),
        chance.seed()
    );
    eprintln!(
        "  requests {requests}: 200 {oks}, 503 {unavailable}, other errors {other_errors} \
         (by status: {by_status:?})"
    );
    let long_stops: Vec<&Stop> = chaos
        .stops
        .iter()
        .filter(|stop| stop.leases_held > 0)
        .collect();
    eprintln!(
        "  kills {} (leaving a dead holder's lease {}, of a stopped process {}), stops {} \
         (holding leases, for 1.5-2.5 s: {} [copies {:?}], holding a shared session's lease \
         {stops_on_shared}; the others continued at once), crashes {}",
        chaos.kills.len(),
        chaos.kills_of_holders,
        chaos.stops.iter().filter(|stop| stop.killed).count(),
        chaos.stops.len(),
        long_stops.len(),
        long_stops.iter().map(|stop| stop.index).collect::<Vec<_>>(),
        chaos.crashes.len()
    );
    eprintln!(
        "  503s while no process was stopped {}, 500s while no process was stopped {}, \
         transport errors {} (e.g. {:?})",
        unexplained_503.len(),
        unexplained_500.len(),
        transport_errors.len(),
        transport_errors.first()
    );
    eprintln!(
        "  lost updates {lost}, duplicates {duplicates}, checked sessions replaced {}, \
         unacknowledged increments {unacknowledged} (all within their bound: {})",
        replaced.len(),
        beyond_bound.is_empty()
    );
    eprintln!(
        "  stuck leases {stuck} (of {} keys), verify errors live {} (leaked blocks {}, dead \
         holder leases {})",
        leasable.len(),
        live_report.problems.len(),
        live_report.leaked_blocks,
        live_report.dead_holder_leases
    );
    eprintln!(
        "  takeovers {} (logged: {timeout_takeovers} held past the timeout, {dead_takeovers} dead \
         holder), fenced commits {fenced}, lease-wait timeouts {lease_timeouts}",
        stats.takeovers
    );
    eprintln!(
        "  evictions {}, filler sessions created {} (still stored {fillers_present}, evicted \
         {fillers_evicted}), store-full logged {store_full_logged} (all in the full-store step)",
        stats.evictions,
        created.len()
    );
    eprintln!(
        "  file {} of {} bytes, index {} entries, {} live records",
        stats.bytes_reserved, stats.capacity_bytes, stats.index_entries, stats.live_records
    );
    slowest.sort_by_key(|slow| std::cmp::Reverse(slow.0));
    for (_, what) in slowest.iter().take(5) {
        eprintln!("  slow (no stop involved): {what}");
    }
    // For a post-mortem: the servers' logs and every request, timed from the start of the chaos.
    if let Ok(keep) = std::env::var("CHAOS_KEEP_LOGS") {
        let mut dump = String::new();
        for sample in &samples {
            dump.push_str(&format!(
                "{:.3} {:.3} {:?} {:?}\n",
                (sample.start - started).as_secs_f64(),
                (sample.end - started).as_secs_f64(),
                sample.who,
                sample.outcome
            ));
        }
        let _ = std::fs::create_dir_all(&keep);
        let _ = std::fs::write(Path::new(&keep).join("requests.txt"), dump);
        for entry in std::fs::read_dir(cluster.dir()).unwrap().flatten() {
            if entry.path().extension().is_some_and(|ext| ext == "log") {
                let _ = std::fs::copy(entry.path(), Path::new(&keep).join(entry.file_name()));
            }
        }
        eprintln!(
            "  logs and requests kept in {keep}; the chaos ended at {:?} (wall clock)",
            std::time::SystemTime::now() - (Instant::now() - started - chaos_elapsed)
        );
    }
    for stop in &chaos.stops {
        if stop.leases_held > 0 {
            eprintln!(
                "  stop of copy {} (pid {}) {:.3}s..{:.3}s",
                stop.index,
                stop.pid,
                (stop.from - started).as_secs_f64(),
                (stop.to - started).as_secs_f64()
            );
        }
    }
    for &(index, pid, at) in &chaos.kills {
        eprintln!(
            "  kill of copy {index} (pid {pid}) at {:.3}s",
            (at - started).as_secs_f64()
        );
    }
    eprintln!(
        "  latency max {max_normal:?} (allowed {:?}), in a stopped process {max_stopped:?} \
         ({exempted} requests overlapped a stop)",
        LEASE_WAIT + LATENCY_MARGIN
    );
    eprintln!(
        "  full store: {squatted} sessions leased by the test, {created_while_full} new \
         sessions still fitted, then {:?}; after releasing: {}",
        full_reply
            .as_ref()
            .map(|reply| (reply.status, reply.retry_after.clone())),
        after_full.status
    );

    // ---- The assertions. ----
    assert!(
        chaos.crashes.is_empty(),
        "processes died on their own:\n{}",
        chaos.crashes.join("\n")
    );
    assert!(
        alive.iter().all(Option::is_some),
        "copies not running at the end: {alive:?}"
    );
    assert_eq!(
        duplicates, 0,
        "two 200 answers of one session carried the same count"
    );
    assert_eq!(
        lost, 0,
        "acknowledged counts are above the final counts {finals:?}"
    );
    assert!(
        replaced.is_empty(),
        "checked sessions in active use were lost (evicted or dropped):\n{}",
        replaced.join("\n")
    );
    assert!(
        checked_missing.is_empty(),
        "checked sessions missing from the index: {checked_missing:?}"
    );
    assert!(
        beyond_bound.is_empty(),
        "sessions counted more increments than the answers lost to kills explain:\n{}",
        beyond_bound.join("\n")
    );
    assert!(
        slow.is_empty(),
        "{} requests waited too long, e.g.:\n{}",
        slow.len(),
        slow.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );
    assert!(
        unclean_503.is_empty(),
        "503 answers without `Retry-After: 1`: {unclean_503:?}"
    );
    assert!(
        unexplained_503.is_empty(),
        "{} 503 answers while no process was stopped (lease waits that no take-over ended?), \
         e.g. {:?}",
        unexplained_503.len(),
        &unexplained_503[..unexplained_503.len().min(10)]
    );
    assert!(
        unexplained_500.is_empty(),
        "500 answers while no process was stopped: {unexplained_500:?}"
    );
    assert!(
        filler_bad.is_empty(),
        "fillers got odd answers: {filler_bad:?}"
    );
    assert_eq!(
        stuck, 0,
        "leases could not be had within {STUCK_AFTER:?} at the end"
    );
    assert!(
        live_report.is_clean(),
        "the live session file has problems: {:?}",
        live_report.problems
    );
    // The chaos really happened.
    assert!(!chaos.kills.is_empty(), "no process was killed");
    assert!(
        !long_stops.is_empty(),
        "no stop hit a process holding a lease"
    );
    assert!(
        stops_on_shared == 0 || timeout_takeovers > 0,
        "a process holding a shared session's lease was stopped past the lease timeout, yet no \
         lease was taken over from a live holder"
    );
    for pid in &chaos.restarted_pids {
        // The last restart may have come too late to serve; every earlier one must have served.
        let served = samples
            .iter()
            .any(|sample| matches!(sample.outcome, Outcome::Ok { pid: p, .. } if p == *pid));
        let last = chaos.restarted_pids.last() == Some(pid);
        assert!(served || last, "the restarted process {pid} never served");
    }
    // The store was full: sessions were evicted (the fillers' oldest ones), the file is at its
    // maximum size, and with nothing evictable a new session is refused with a clean 503.
    assert!(
        stats.evictions > 0 && fillers_evicted > 0,
        "the store never filled up: {stats:?}"
    );
    assert_eq!(final_stats.bytes_reserved, final_stats.capacity_bytes);
    let full_reply = full_reply.expect("a full store with nothing evictable still took sessions");
    assert_eq!(
        full_reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{full_reply:?}"
    );
    assert_eq!(
        full_reply.retry_after.as_deref(),
        Some("1"),
        "{full_reply:?}"
    );
    assert_eq!(full_reply.set_cookie, None, "{full_reply:?}");
    assert!(
        store_full_logged > 0,
        "the full store's 503 was not logged as a full store"
    );
    assert_eq!(
        after_full.status,
        StatusCode::OK,
        "no new session once the test released its leases: {after_full:?}"
    );

    // Every process exits cleanly on SIGTERM; then the file, recovered by a solo open, verifies.
    cluster.stop_all().await;
    let store = Store::open(cluster.store_path()).expect("open the session file");
    let report = store.verify();
    let after = store.stats();
    eprintln!(
        "  after stopping every process: verify errors {}, {} records, leaked blocks {}, stats \
         {after:?}",
        report.problems.len(),
        report.records,
        report.leaked_blocks
    );
    assert!(
        report.is_clean(),
        "the session file has problems after recovery: {:?}",
        report.problems
    );
    assert_eq!(report.leaked_blocks, 0, "recovery left leaked blocks");
}

/// The case the soak test can only hit by chance: a process dies holding a session's lease, is
/// restarted, and the restarted process (which registers in the dead one's slot, the lowest free
/// one) is the first to want that session. It must take the dead holder's lease over at once, as
/// every other process does. (The restarted process releases what its slot's dead predecessor
/// held when it opens the file, before it issues a token of its own: a token of its slot must
/// never pass for one of its own holders.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_process_takes_over_the_lease_its_slot_predecessor_died_holding() {
    /// How long each counter request holds the session (under `LEASE_TIMEOUT`, so that a live
    /// holder is never taken over).
    const HOLD: Duration = Duration::from_millis(400);
    let _alone = ONE_AT_A_TIME.lock().await;
    bounded(Duration::from_secs(180), async {
        // Each `GET /` holds the session for HOLD: with four clients on copy 0 it holds the
        // session nearly all the time, so the probe below sees it at its first look.
        let hold = HOLD.as_millis().to_string();
        let mut args = lease_args();
        args.extend(["--hold-ms".to_owned(), hold]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut cluster = Cluster::start_with("counter", 2, &args, "", |_| {}).await;
        // Opened after both copies: the probe's slot is neither of theirs.
        let probe = Store::open(cluster.store_path()).expect("open the session file");
        let victim = 0;
        let direct = cluster.server_url(victim, "/");
        let reply = counter_request(&cluster.client, Method::GET, &direct, None)
            .await
            .expect("GET / on copy 0");
        let cookie = cookie_pair(&reply.set_cookie.expect("a new session sets its cookie"));
        let hash = short_hash_of(&cookie);

        // Catch copy 0 holding the session's lease: requests of the session go to it alone, and
        // it is stopped the moment the probe sees it hold the lease (and continued if it let go
        // before the stop landed).
        let stop = Arc::new(AtomicBool::new(false));
        let mut hammers = Vec::new();
        for _ in 0..4 {
            let (url, cookie, stop) = (direct.clone(), cookie.clone(), Arc::clone(&stop));
            hammers.push(tokio::spawn(async move {
                let client = common::http_client();
                while !stop.load(Ordering::Relaxed) {
                    let _ = counter_request(&client, Method::GET, &url, Some(&cookie)).await;
                }
            }));
        }
        let pid = cluster.server(victim).expect("copy 0 runs").pid();
        let holds = |probe: &Store| {
            probe.entries().iter().any(|entry| {
                entry.key_hash == hash
                    && entry
                        .lease
                        .as_ref()
                        .is_some_and(|holder| holder.pid == u64::from(pid) && holder.alive)
            })
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(
                Instant::now() < deadline,
                "copy 0 was never caught holding the lease"
            );
            if !holds(&probe) {
                tokio::task::yield_now().await;
                continue;
            }
            let process = cluster.server(victim).expect("copy 0 runs");
            assert!(process.suspend(Duration::from_secs(2)).await, "SIGSTOP");
            if holds(&probe) {
                break;
            }
            process.resume();
        }
        stop.store(true, Ordering::Relaxed);
        // Dies holding it; its successor registers in the freed slot.
        cluster.kill(victim);
        for hammer in hammers {
            hammer.await.expect("a request task panicked");
        }
        cluster.restart(victim).await;
        let successor = u64::from(cluster.server(victim).expect("copy 0 runs").pid());
        let dead_lease = probe
            .entries()
            .into_iter()
            .find(|entry| entry.key_hash == hash)
            .and_then(|entry| entry.lease);
        eprintln!("the session's lease after the restart: {dead_lease:?} (successor {successor})");
        assert!(
            dead_lease.as_ref().is_none_or(|holder| !holder.alive),
            "the session's lease is held by a live process after the restart: {dead_lease:?}"
        );

        let started = Instant::now();
        let reply = counter_request(&cluster.client, Method::GET, &direct, Some(&cookie))
            .await
            .expect("GET / on the restarted copy 0");
        let took = started.elapsed();
        eprintln!(
            "the restarted process answered {} after {took:?}",
            reply.status
        );
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "the restarted process did not take over the dead holder's lease (after {took:?})"
        );
        // The request itself holds the session for HOLD once it has it.
        let waited = took.saturating_sub(HOLD);
        assert!(
            waited < LEASE_TIMEOUT,
            "a dead holder's lease took {waited:?} to take over"
        );
    })
    .await;
}
