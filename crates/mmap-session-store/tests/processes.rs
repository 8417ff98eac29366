//! Real processes sharing one store: exact counting, SIGKILL at random moments, growth.
//!
//! Children are this test binary re-executed with `MMAP_STORE_CHILD` set; they run
//! `child_process_entry`, which does nothing in a normal test run.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use mmap_session_store::{Options, Store};

const KEYS: u64 = 16;

fn later() -> SystemTime {
    SystemTime::now() + Duration::from_secs(3600)
}

fn options() -> Options {
    Options::new().max_sessions(4096).max_file_size(256 << 20)
}

/// A tiny deterministic generator (xorshift64*), so runs differ by seed only.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn key(k: u64) -> Vec<u8> {
    format!("counter-{k}").into_bytes()
}

fn counter(store: &Store, k: u64) -> u64 {
    store
        .get(&key(k))
        .map_or(0, |r| u64::from_le_bytes(r.value.try_into().unwrap()))
}

/// The child's work: `rounds` lease-read-increment-commit cycles on random keys, printing
/// `@ack <key>` after each commit returns (so the parent knows it was acknowledged).
#[test]
fn child_process_entry() {
    let Ok(path) = std::env::var("MMAP_STORE_CHILD") else {
        return;
    };
    if let Ok(key) = std::env::var("HOLD_KEY") {
        // Take a lease, say so, and hold it until killed.
        let store = Store::open(&path).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let _lease = store.lease_blocking(key.as_bytes(), deadline).unwrap();
        println!("@held");
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        return;
    }
    let rounds: u64 = std::env::var("ROUNDS").unwrap().parse().unwrap();
    let seed: u64 = std::env::var("SEED").unwrap().parse().unwrap();
    let keys: u64 = std::env::var("KEYS").unwrap().parse().unwrap();
    let store = Store::open(&path).unwrap();
    if std::env::var("TASKS").is_ok() {
        return tasks_child(&store, keys, seed);
    }
    let mut rng = Rng(seed | 1);
    for _ in 0..rounds {
        let k = rng.next() % keys;
        let mut lease = store
            .lease_blocking(&key(k), Instant::now() + Duration::from_secs(60))
            .unwrap();
        let n = lease
            .read()
            .map_or(0, |r| u64::from_le_bytes(r.value.try_into().unwrap()));
        lease.commit(&(n + 1).to_le_bytes(), later()).unwrap();
        drop(lease);
        println!("@ack {k}");
    }
    println!("DONE");
}

/// Tasks of the child's work in `TASKS` mode: this many tasks on a two-thread runtime.
const TASKS: u64 = 4;

/// `TASKS` tasks each increment random keys for ever through the async lease (tasks of one
/// process waiting for one key queue in the process and get the lease handed over), printing
/// `@ack <key>` after each commit. One wait in eight gives up after up to 2 ms (a request that
/// went away while queued) and one lease in sixteen is dropped without a commit.
fn tasks_child(store: &Store, keys: u64, seed: u64) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let tasks: Vec<_> = (0..TASKS)
            .map(|task| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut rng = Rng((seed.wrapping_mul(31) + task) | 1);
                    loop {
                        let k = rng.next() % keys;
                        let deadline = Instant::now() + Duration::from_secs(60);
                        let name = key(k);
                        let wait = store.lease(&name, deadline);
                        let lease = if rng.next() % 8 == 0 {
                            let patience = Duration::from_micros(rng.next() % 2000);
                            match tokio::time::timeout(patience, wait).await {
                                Ok(lease) => lease,
                                Err(_) => continue,
                            }
                        } else {
                            wait.await
                        };
                        let mut lease = lease.unwrap();
                        let n = lease
                            .read()
                            .map_or(0, |r| u64::from_le_bytes(r.value.try_into().unwrap()));
                        tokio::task::yield_now().await;
                        if rng.next() % 16 == 0 {
                            continue; // dropped: released unchanged
                        }
                        lease.commit(&(n + 1).to_le_bytes(), later()).unwrap();
                        drop(lease);
                        println!("@ack {k}");
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    });
}

struct Worker {
    child: Child,
    reader: std::thread::JoinHandle<()>,
}

/// Held (shared) while a child starts: from its fork until well into its exec (past `spawn`'s
/// return) it holds copies of this process's files and their OFD locks, so a store closed
/// meanwhile would still count as open to a solo reopen that must recover. A child counts as
/// started once it has printed a line. Taken exclusively around such a reopen.
static STARTING: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// This test binary, run as a child on the store at `path` (see `child_process_entry`).
fn child(path: &Path) -> Command {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "--exact",
            "child_process_entry",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("MMAP_STORE_CHILD", path);
    command
}

/// Starts a child; each acknowledged increment is sent on `acks` as the key number.
fn spawn(path: &Path, mode: Mode, rounds: u64, seed: u64, acks: mpsc::Sender<u64>) -> Worker {
    let starting = STARTING.read().unwrap();
    let mut command = child(path);
    if mode == Mode::Tasks {
        command.env("TASKS", "1");
    }
    let mut child = command
        .env("ROUNDS", rounds.to_string())
        .env("SEED", seed.to_string())
        .env("KEYS", mode.keys().to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (running_tx, running) = mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let _ = running_tx.send(());
            let Ok(line) = line else { break };
            // libtest may print its own text on the same line before ours.
            if let Some((_, k)) = line.split_once("@ack ") {
                let _ = acks.send(k.trim().parse().unwrap());
            }
        }
    });
    // libtest's first line: the child runs, so the exec has closed its copies of our files.
    let _ = running.recv_timeout(Duration::from_secs(20));
    drop(starting);
    Worker { child, reader }
}

fn kill(worker: &mut Worker) {
    // SAFETY-free: Child::kill sends SIGKILL.
    let _ = worker.child.kill();
}

#[test]
fn four_processes_incrementing_sixteen_keys_lose_no_update() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let store = Store::open_with(&path, options()).unwrap();
    let (tx, rx) = mpsc::channel();
    let rounds = 10_000;
    let workers: Vec<Worker> = (0..4)
        .map(|i| spawn(&path, Mode::Blocking, rounds, 1000 + i, tx.clone()))
        .collect();
    drop(tx);
    let deadline = Instant::now() + Duration::from_secs(240);
    for mut w in workers {
        loop {
            if let Some(status) = w.child.try_wait().unwrap() {
                assert!(status.success(), "child failed: {status}");
                break;
            }
            assert!(Instant::now() < deadline, "children did not finish in time");
            std::thread::sleep(Duration::from_millis(20));
        }
        w.reader.join().unwrap();
    }
    let acked: u64 = rx.iter().count() as u64;
    assert_eq!(acked, 4 * rounds);
    let total: u64 = (0..KEYS).map(|k| counter(&store, k)).sum();
    assert_eq!(
        total,
        4 * rounds,
        "the counters must hold exactly every increment"
    );
    let report = store.verify();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.records, KEYS);
}

/// How the children of a test work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// One thread, blocking leases, on `KEYS` keys.
    Blocking,
    /// `TASKS` tasks on a runtime, async leases, on two keys (so that they queue for each other).
    Tasks,
}

impl Mode {
    fn keys(self) -> u64 {
        match self {
            Mode::Blocking => KEYS,
            Mode::Tasks => 2,
        }
    }

    /// How many leases one child holds at once at most.
    fn holders(self) -> u64 {
        match self {
            Mode::Blocking => 1,
            Mode::Tasks => TASKS.min(self.keys()),
        }
    }
}

#[test]
fn processes_killed_at_random_moments_lose_nothing_acknowledged_and_leave_no_stuck_lease() {
    killed_at_random_moments(Mode::Blocking);
}

/// The same with tasks queued in each process for the same keys: leases handed from task to
/// task, waits given up, leases dropped unchanged, and the process killed at any of it.
#[test]
fn processes_of_queued_tasks_killed_at_random_moments_lose_nothing_acknowledged() {
    killed_at_random_moments(Mode::Tasks);
}

fn killed_at_random_moments(mode: Mode) {
    let keys = mode.keys();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let store = Store::open_with(&path, options()).unwrap();
    let (tx, rx) = mpsc::channel();
    let mut rng = Rng(SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1);
    let mut seed = 1;
    let mut workers: Vec<Worker> = (0..4)
        .map(|_| {
            seed += 1;
            spawn(&path, mode, u64::MAX, seed, tx.clone())
        })
        .collect();
    let mut kills = 0u64;
    let run_for = Duration::from_secs(8);
    let start = Instant::now();
    while start.elapsed() < run_for {
        // The chaos schedule: a random pause, then SIGKILL a random child and start a new one.
        std::thread::sleep(Duration::from_millis(5 + rng.next() % 60));
        let victim = (rng.next() % workers.len() as u64) as usize;
        kill(&mut workers[victim]);
        kills += 1;
        seed += 1;
        let replacement = spawn(&path, mode, u64::MAX, seed, tx.clone());
        let old = std::mem::replace(&mut workers[victim], replacement);
        let mut old = old;
        let _ = old.child.wait();
        old.reader.join().unwrap();
    }
    for mut w in workers {
        kill(&mut w);
        kills += 1;
        let _ = w.child.wait();
        w.reader.join().unwrap();
    }
    drop(tx);
    let mut acked = vec![0u64; keys as usize];
    for k in rx.iter() {
        acked[k as usize] += 1;
    }
    let total_acked: u64 = acked.iter().sum();
    assert!(
        total_acked > 1000,
        "the children made too little progress: {total_acked}"
    );

    // No lease stays stuck: every key can be leased at once (dead holders are taken over).
    for k in 0..keys {
        let lease = store.lease_blocking(&key(k), Instant::now() + Duration::from_secs(2));
        assert!(lease.is_ok(), "key {k} stayed leased by a dead process");
    }
    let mut applied_twice_or_lost = Vec::new();
    let mut extra_total = 0;
    for k in 0..keys {
        let n = counter(&store, k);
        if n < acked[k as usize] || n > acked[k as usize] + kills {
            applied_twice_or_lost.push((k, n, acked[k as usize]));
        }
        extra_total += n - acked[k as usize].min(n);
    }
    assert!(
        applied_twice_or_lost.is_empty(),
        "(key, counter, acked): {applied_twice_or_lost:?}"
    );
    // Each kill can leave at most one unacknowledged increment per lease the child held.
    assert!(
        extra_total <= kills * mode.holders(),
        "{extra_total} unacknowledged increments but only {kills} kills"
    );
    assert!(
        store.stats().takeovers > 0,
        "no kill ever hit a lease holder; the test proved little"
    );
    let report = store.verify();
    assert!(report.is_clean(), "{report:?}");
    eprintln!(
        "{mode:?}: kills: {kills}, acknowledged: {total_acked}, unacknowledged but applied: {extra_total}, \
         takeovers: {}, leaked blocks: {}",
        store.stats().takeovers,
        report.leaked_blocks
    );

    // Alone again, the next open recovers the space leaked by the kills.
    drop(store);
    let quiet = STARTING.write().unwrap();
    let store = Store::open(&path).unwrap();
    drop(quiet);
    let report = store.verify();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.leaked_blocks, 0);
    assert_eq!(report.records, keys);
    for k in 0..keys {
        assert!(counter(&store, k) >= acked[k as usize]);
    }
}

#[test]
fn processes_keep_working_while_another_grows_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let store = Store::open_with(&path, options()).unwrap();
    let reserved_before = store.stats().bytes_reserved;
    let (tx, rx) = mpsc::channel();
    let rounds = 3000;
    let workers: Vec<Worker> = (0..3)
        .map(|i| spawn(&path, Mode::Blocking, rounds, 77 + i, tx.clone()))
        .collect();
    drop(tx);
    // Meanwhile: large records that force the file to grow many times.
    let big = vec![0x5au8; 60 << 10];
    for i in 0..600u32 {
        let mut lease = store
            .lease_blocking(&i.to_le_bytes(), Instant::now() + Duration::from_secs(10))
            .unwrap();
        lease.commit(&big, later()).unwrap();
    }
    for mut w in workers {
        let status = w.child.wait().unwrap();
        assert!(status.success(), "child failed: {status}");
        w.reader.join().unwrap();
    }
    assert_eq!(rx.iter().count() as u64, 3 * rounds);
    let total: u64 = (0..KEYS).map(|k| counter(&store, k)).sum();
    assert_eq!(total, 3 * rounds);
    assert!(store.stats().bytes_reserved > reserved_before + (30 << 20));
    for i in 0..600u32 {
        assert_eq!(store.get(&i.to_le_bytes()).unwrap().value, big);
    }
    assert!(store.verify().is_clean());
}

#[test]
fn a_lease_left_by_a_dead_process_is_taken_over_even_when_its_slot_is_reused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let first = Store::open_with(&path, options()).unwrap();
    let starting = STARTING.read().unwrap();
    let mut child = child(&path)
        .env("HOLD_KEY", "held-by-the-dead")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let _ = lines.next(); // libtest's first line: the child runs (see `STARTING`)
    drop(starting);
    assert!(
        lines.any(|l| l.is_ok_and(|l| l.contains("@held"))),
        "the child never took the lease"
    );
    assert!(first.try_lease(b"held-by-the-dead").unwrap().is_none());
    child.kill().unwrap();
    child.wait().unwrap();
    // A new opener takes the dead child's registration slot; the child's token names that slot,
    // yet it must be recognised as a dead predecessor's, not as the new owner's.
    let second = Store::open_with(&path, options()).unwrap();
    let start = Instant::now();
    // The async path (tasks queue in the process) must not mistake the dead token for one of
    // this process's own.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let lease = runtime.block_on(second.lease(b"held-by-the-dead", deadline));
    assert!(lease.is_ok(), "the dead child's lease was never taken over");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "take-over took {:?}",
        start.elapsed()
    );
    drop(lease);
    assert_eq!(first.stats().takeovers, 1);
    assert!(first.verify().is_clean());
}
