//! Store benchmark: the store against an in-process `Mutex<HashMap>` and SQLite (WAL,
//! `synchronous=NORMAL`), all doing the same operations in one run.
//!
//! Run with `cargo bench -p mmap-session-store --bench store`. Cases:
//!
//! - `rmw_one_key/*`, `rmw_10k_keys/*`: take the key's lease (or lock, or `BEGIN IMMEDIATE`),
//!   copy the value out, write a new value of the same size, release (or commit). One key
//!   reused, or 10,000 distinct keys visited in turn. Values of 128 B, 1 KiB and 16 KiB.
//! - `rmw_1KiB_durability/*`: the read-modify-write of 1 KiB values over 1,000 keys, with each
//!   `Durability` setting (`never`, `periodic_1000ms`, `periodic_10ms`, `on_commit`), the
//!   file in the temporary directory.
//! - `get_1KiB/*`: read one 1 KiB value without a lease (store: the lock-free `get`).
//! - `two_procs_hot_keys_1KiB/*`: a second process (this binary re-executed) does 1 KiB
//!   read-modify-writes on 4 hot keys in a loop while this process measures its own on the same
//!   keys; for `Mutex<HashMap>` the second party is a thread.
//! - `handover/*`: two processes pass leases back and forth; one iteration is one round trip
//!   (two hand-overs from a release to a waiter blocked in `lease_blocking`). `pipe_round_trip`
//!   is the floor the kernel sets: one byte sent to the other process and echoed back.
//!
//! After the criterion cases a latency pass times single operations and prints percentiles
//! (p50/p90/p99/p99.9). Set `MMAP_BENCH_LATENCY=0` to skip it; it is also skipped when a
//! filter that does not contain `latency` is given.
//!
//! Profiling driver: `MMAP_BENCH_CHILD=loop-get` (or `loop-rmw`) with `MMAP_BENCH_PATH=<dir>`
//! runs one store operation in a loop (`MMAP_BENCH_OPS`, `MMAP_BENCH_SIZE`) without criterion,
//! for `perf record` or `valgrind --tool=callgrind`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashMap;
use std::hint::black_box;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use criterion::{criterion_group, BenchmarkId, Criterion};
use mmap_session_store::{Durability, Lease, Options, Store};
use rusqlite::{params, Connection, OptionalExtension};
use tempfile::TempDir;

mod common;
use common::{expiry, far_deadline, fmt_ns, keys, pct, store_rmw, time_each, value, Rng};

const SIZES: [usize; 3] = [128, 1024, 16 * 1024];
const MANY_KEYS: usize = 10_000;
const HOT_KEYS: usize = 4;
const HOT_VALUE: usize = 1024;
const CHILD_ENV: &str = "MMAP_BENCH_CHILD";
const PATH_ENV: &str = "MMAP_BENCH_PATH";

// ---------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------

fn hot_keys() -> Vec<[u8; 16]> {
    keys(HOT_KEYS, 0x407)
}

/// Where the two parties of a cross-process case run.
#[derive(Clone, Copy, Debug)]
enum Placement {
    /// The scheduler decides (and may move them).
    Free,
    /// Pinned to two different CPUs: this process on CPU 0, the other on CPU 1.
    Split,
    /// Both pinned to CPU 0.
    Same,
}

impl Placement {
    fn cpus(self) -> Option<(&'static str, &'static str)> {
        match self {
            Placement::Free => None,
            Placement::Split => Some(("0", "1")),
            Placement::Same => Some(("0", "0")),
        }
    }

    fn label(self) -> &'static str {
        match self {
            Placement::Free => "unpinned",
            Placement::Split => "two_cpus",
            Placement::Same => "one_cpu",
        }
    }
}

/// Sets the CPU affinity of every thread of `pid` with `taskset` (no unsafe code here).
fn taskset(pid: u32, cpus: &str) {
    taskset_args(&["-a", "-p", "-c", cpus, &pid.to_string()]);
}

/// Pins the calling thread only (its id read from `/proc/thread-self`).
fn pin_this_thread(cpus: &str) {
    let link = std::fs::read_link("/proc/thread-self").expect("/proc/thread-self");
    let tid = link.file_name().unwrap().to_str().unwrap().to_owned();
    taskset_args(&["-p", "-c", cpus, &tid]);
}

fn taskset_args(args: &[&str]) {
    let ok = Command::new("taskset")
        .args(args)
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "taskset {args:?} failed (is util-linux installed?)");
}

/// Pins this process to one CPU for its lifetime, then restores the affinity it had.
struct PinSelf(Option<String>);

impl PinSelf {
    fn new(cpus: Option<&str>) -> PinSelf {
        let Some(cpus) = cpus else {
            return PinSelf(None);
        };
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let before = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .expect("Cpus_allowed_list")
            .trim()
            .to_owned();
        taskset(std::process::id(), cpus);
        PinSelf(Some(before))
    }
}

impl Drop for PinSelf {
    fn drop(&mut self) {
        if let Some(before) = self.0.take() {
            taskset(std::process::id(), &before);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The three backends, one read-modify-write each
// ---------------------------------------------------------------------------------------------

type MemMap = Mutex<HashMap<Vec<u8>, Vec<u8>>>;

/// Lock, clone the value out, put a new copy in.
fn mutex_rmw(map: &MemMap, key: &[u8], value: &[u8]) -> usize {
    let mut g = map.lock().unwrap();
    let old = g.get(key).cloned();
    g.insert(key.to_vec(), value.to_vec());
    drop(g);
    old.map_or(0, |v| v.len())
}

fn sqlite_open(path: &Path) -> Connection {
    let c = Connection::open(path).expect("sqlite open");
    let mode: String = c
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .expect("WAL");
    assert_eq!(mode.to_ascii_lowercase(), "wal");
    c.pragma_update(None, "synchronous", "NORMAL")
        .expect("synchronous");
    c.busy_timeout(Duration::from_secs(30)).expect("busy");
    c.execute_batch(
        "CREATE TABLE IF NOT EXISTS sessions (
             id BLOB PRIMARY KEY NOT NULL,
             value BLOB NOT NULL,
             expires INTEGER NOT NULL
         )",
    )
    .expect("schema");
    c
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// `BEGIN IMMEDIATE; SELECT; UPDATE (or INSERT); COMMIT`.
fn sqlite_rmw(c: &Connection, key: &[u8], value: &[u8], expires_ms: i64) -> usize {
    c.prepare_cached("BEGIN IMMEDIATE")
        .unwrap()
        .execute([])
        .expect("begin");
    let now = unix_ms(SystemTime::now());
    let old: Option<Vec<u8>> = c
        .prepare_cached("SELECT value FROM sessions WHERE id = ?1 AND expires > ?2")
        .unwrap()
        .query_row(params![key, now], |r| r.get(0))
        .optional()
        .expect("select");
    let n = c
        .prepare_cached("UPDATE sessions SET value = ?2, expires = ?3 WHERE id = ?1")
        .unwrap()
        .execute(params![key, value, expires_ms])
        .expect("update");
    if n == 0 {
        c.prepare_cached("INSERT INTO sessions (id, value, expires) VALUES (?1, ?2, ?3)")
            .unwrap()
            .execute(params![key, value, expires_ms])
            .expect("insert");
    }
    c.prepare_cached("COMMIT")
        .unwrap()
        .execute([])
        .expect("commit");
    old.map_or(0, |v| v.len())
}

fn sqlite_get(c: &Connection, key: &[u8]) -> Option<Vec<u8>> {
    let now = unix_ms(SystemTime::now());
    c.prepare_cached("SELECT value FROM sessions WHERE id = ?1 AND expires > ?2")
        .unwrap()
        .query_row(params![key, now], |r| r.get(0))
        .optional()
        .expect("select")
}

// ---------------------------------------------------------------------------------------------
// Fixtures: each owns its own temporary directory
// ---------------------------------------------------------------------------------------------

struct StoreFx {
    _dir: TempDir,
    path: PathBuf,
    store: Store,
    keys: Vec<[u8; 16]>,
}

impl StoreFx {
    fn new(keys: Vec<[u8; 16]>, size: usize) -> StoreFx {
        StoreFx::with(keys, size, Durability::Never)
    }

    fn with(keys: Vec<[u8; 16]>, size: usize, durability: Durability) -> StoreFx {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("sessions.mmap");
        let store =
            Store::open_with(&path, Options::new().durability(durability)).expect("open store");
        let (v, exp, dl) = (value(size), expiry(), far_deadline());
        for k in &keys {
            store_rmw(&store, k, &v, dl, exp);
        }
        StoreFx {
            _dir: dir,
            path,
            store,
            keys,
        }
    }
}

struct SqliteFx {
    _dir: TempDir,
    path: PathBuf,
    conn: Connection,
    keys: Vec<[u8; 16]>,
}

impl SqliteFx {
    fn new(keys: Vec<[u8; 16]>, size: usize) -> SqliteFx {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("sessions.sqlite");
        let conn = sqlite_open(&path);
        let (v, exp) = (value(size), unix_ms(expiry()));
        conn.execute_batch("BEGIN").unwrap();
        for k in &keys {
            conn.execute(
                "INSERT INTO sessions (id, value, expires) VALUES (?1, ?2, ?3)",
                params![&k[..], &v, exp],
            )
            .unwrap();
        }
        conn.execute_batch("COMMIT").unwrap();
        SqliteFx {
            _dir: dir,
            path,
            conn,
            keys,
        }
    }
}

fn mutex_fx(keys: &[[u8; 16]], size: usize) -> MemMap {
    let v = value(size);
    Mutex::new(keys.iter().map(|k| (k.to_vec(), v.clone())).collect())
}

// ---------------------------------------------------------------------------------------------
// Second process: this binary re-executed with MMAP_BENCH_CHILD set
// ---------------------------------------------------------------------------------------------

struct ChildProc {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    mode: &'static str,
}

impl ChildProc {
    /// Starts `mode` on `path` and waits until the child says it is ready.
    fn spawn(mode: &'static str, path: &Path, cpus: Option<&str>) -> ChildProc {
        let exe = std::env::current_exe().expect("current_exe");
        let mut child = Command::new(exe)
            .env(CHILD_ENV, mode)
            .env(PATH_ENV, path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child");
        if let Some(cpus) = cpus {
            taskset(child.id(), cpus);
        }
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).expect("child ready");
        assert_eq!(line.trim(), "ready", "child {mode} did not start");
        ChildProc {
            child,
            stdin,
            stdout,
            mode,
        }
    }

    /// Closes the child's stdin (its stop signal), waits for it, returns its last line.
    fn stop(mut self) -> String {
        drop(self.stdin.take());
        let mut rest = String::new();
        self.stdout.read_to_string(&mut rest).expect("child output");
        let status = self.child.wait().expect("wait child");
        assert!(status.success(), "child {} failed: {status}", self.mode);
        rest.trim().to_owned()
    }
}

/// Sets `stop` when stdin reaches end of file (the parent closed it or died).
fn watch_stdin(stop: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        stop.store(true, Ordering::Release);
    });
}

fn say_ready() {
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready").unwrap();
    out.flush().unwrap();
}

fn child_main(mode: &str) {
    let path = PathBuf::from(std::env::var_os(PATH_ENV).expect("MMAP_BENCH_PATH"));
    let stop = Arc::new(AtomicBool::new(false));
    let mut ops = 0u64;
    let started = Instant::now();
    match mode {
        "store-hot" => {
            let store = Store::open(&path).expect("child open");
            let (keys, mut v, exp) = (hot_keys(), value(HOT_VALUE), expiry());
            let mut rng = Rng(0x2545_f491_4f6c_dd1d);
            watch_stdin(stop.clone());
            say_ready();
            while !stop.load(Ordering::Acquire) {
                let k = &keys[(rng.next() % HOT_KEYS as u64) as usize];
                let dl = Instant::now() + Duration::from_secs(60);
                v[0] = v[0].wrapping_add(1);
                black_box(store_rmw(&store, k, &v, dl, exp));
                ops += 1;
            }
        }
        "sqlite-hot" => {
            let conn = sqlite_open(&path);
            let (keys, mut v, exp) = (hot_keys(), value(HOT_VALUE), unix_ms(expiry()));
            let mut rng = Rng(0x2545_f491_4f6c_dd1d);
            watch_stdin(stop.clone());
            say_ready();
            while !stop.load(Ordering::Acquire) {
                let k = &keys[(rng.next() % HOT_KEYS as u64) as usize];
                v[0] = v[0].wrapping_add(1);
                black_box(sqlite_rmw(&conn, k, &v, exp));
                ops += 1;
            }
        }
        "pingpong" => {
            // The parent holds keys 0 and 1; we hold 2. Step j: take j%3 (released by the
            // parent), then release (j+2)%3 (which the parent waits for).
            let store = Store::open(&path).expect("child open");
            let keys = keys(3, 0x9090);
            let mut held: [Option<Lease>; 3] = [None, None, None];
            held[2] = Some(store.try_lease(&keys[2]).unwrap().expect("key 2 is free"));
            watch_stdin(stop.clone());
            say_ready();
            let mut j = 0usize;
            while !stop.load(Ordering::Acquire) {
                let dl = Instant::now() + Duration::from_secs(60);
                held[j % 3] = Some(store.lease_blocking(&keys[j % 3], dl).expect("pp lease"));
                drop(held[(j + 2) % 3].take());
                j += 1;
                ops += 1;
            }
        }
        "echo" => {
            say_ready();
            let mut stdin = std::io::stdin().lock();
            let mut stdout = std::io::stdout().lock();
            let mut b = [0u8; 1];
            while stdin.read_exact(&mut b).is_ok() {
                stdout.write_all(&b).unwrap();
                stdout.flush().unwrap();
                ops += 1;
            }
        }
        "loop-get" | "loop-rmw" => {
            // A profiling driver (perf, callgrind): one operation in a loop, nothing else.
            // MMAP_BENCH_PATH is a directory; MMAP_BENCH_OPS and MMAP_BENCH_SIZE tune it.
            let env_num = |name: &str, default: usize| {
                std::env::var(name).map_or(default, |v| v.parse().expect(name))
            };
            let n = env_num("MMAP_BENCH_OPS", 1_000_000);
            let size = env_num("MMAP_BENCH_SIZE", 1024);
            let store = Store::open(path.join("sessions.mmap")).expect("open");
            let (k, mut v, exp, dl) = (keys(1, 1), value(size), expiry(), far_deadline());
            store_rmw(&store, &k[0], &v, dl, exp);
            for _ in 0..n {
                if mode == "loop-get" {
                    black_box(store.get(&k[0]));
                } else {
                    v[0] = v[0].wrapping_add(1);
                    black_box(store_rmw(&store, &k[0], &v, dl, exp));
                }
                ops += 1;
            }
        }
        other => panic!("unknown child mode {other}"),
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "child {mode}: {ops} ops in {secs:.2} s ({:.0} ns/op)",
        secs * 1e9 / ops.max(1) as f64
    );
}

/// The parent's side of the lease ping-pong (three keys, so that strict alternation follows
/// from the leases alone and nobody can take back a key it just released).
struct PingPong {
    _dir: TempDir,
    store: Store,
    keys: Vec<[u8; 16]>,
    held: [Option<Lease>; 3],
    i: usize,
    child: Option<ChildProc>,
    _pin: PinSelf,
}

impl PingPong {
    fn start(placement: Placement) -> PingPong {
        let cpus = placement.cpus();
        let pin = PinSelf::new(cpus.map(|c| c.0));
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("sessions.mmap");
        let store = Store::open(&path).expect("open store");
        let keys = keys(3, 0x9090);
        let dl = far_deadline();
        let held = [
            Some(store.lease_blocking(&keys[0], dl).unwrap()),
            Some(store.lease_blocking(&keys[1], dl).unwrap()),
            None,
        ];
        // Create key 2's index entry so the child only has to lease it.
        store.lease_blocking(&keys[2], dl).unwrap().release();
        let child = ChildProc::spawn("pingpong", &path, cpus.map(|c| c.1));
        PingPong {
            _dir: dir,
            store,
            keys,
            held,
            i: 0,
            child: Some(child),
            _pin: pin,
        }
    }

    /// One round trip: release i%3 (the child takes it), wait for (i+2)%3 (the child releases
    /// it once it has taken i%3).
    fn round_trip(&mut self) {
        let i = self.i;
        drop(self.held[i % 3].take());
        let dl = Instant::now() + Duration::from_secs(60);
        let k = &self.keys[(i + 2) % 3];
        self.held[(i + 2) % 3] = Some(self.store.lease_blocking(k, dl).expect("pp lease"));
        self.i += 1;
    }

    fn stop(mut self) -> String {
        for h in &mut self.held {
            drop(h.take());
        }
        self.child.take().unwrap().stop()
    }
}

/// A process that echoes bytes: the kernel's floor for a cross-process round trip.
struct Echo {
    child: ChildProc,
    _pin: PinSelf,
    _dir: TempDir,
}

impl Echo {
    fn start(placement: Placement) -> Echo {
        let cpus = placement.cpus();
        let pin = PinSelf::new(cpus.map(|c| c.0));
        let dir = TempDir::new().unwrap();
        let child = ChildProc::spawn("echo", dir.path(), cpus.map(|c| c.1));
        Echo {
            child,
            _pin: pin,
            _dir: dir,
        }
    }

    fn round_trip(&mut self) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(&[7]).unwrap();
        stdin.flush().unwrap();
        let mut b = [0u8; 1];
        self.child.stdout.read_exact(&mut b).unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Criterion cases
// ---------------------------------------------------------------------------------------------

fn bench_rmw(c: &mut Criterion) {
    let exp = expiry();
    let exp_ms = unix_ms(exp);
    for (group, nkeys) in [("rmw_one_key", 1usize), ("rmw_10k_keys", MANY_KEYS)] {
        let mut g = c.benchmark_group(group);
        for size in SIZES {
            let mut v = value(size);
            {
                let fx = StoreFx::new(keys(nkeys, 1), size);
                let dl = far_deadline();
                g.bench_with_input(BenchmarkId::new("store", size), &size, |b, _| {
                    let mut i = 0usize;
                    b.iter(|| {
                        let k = &fx.keys[i % nkeys];
                        i += 1;
                        v[0] = v[0].wrapping_add(1);
                        black_box(store_rmw(&fx.store, k, &v, dl, exp))
                    })
                });
                let report = fx.store.verify();
                assert!(
                    report.is_clean(),
                    "store inconsistent: {:?}",
                    report.problems
                );
                assert_eq!(report.records, nkeys as u64);
            }
            {
                let ks = keys(nkeys, 1);
                let map = mutex_fx(&ks, size);
                g.bench_with_input(BenchmarkId::new("mutex_hashmap", size), &size, |b, _| {
                    let mut i = 0usize;
                    b.iter(|| {
                        let k = &ks[i % nkeys];
                        i += 1;
                        v[0] = v[0].wrapping_add(1);
                        black_box(mutex_rmw(&map, k, &v))
                    })
                });
            }
            {
                let fx = SqliteFx::new(keys(nkeys, 1), size);
                g.bench_with_input(BenchmarkId::new("sqlite", size), &size, |b, _| {
                    let mut i = 0usize;
                    b.iter(|| {
                        let k = &fx.keys[i % nkeys];
                        i += 1;
                        v[0] = v[0].wrapping_add(1);
                        black_box(sqlite_rmw(&fx.conn, k, &v, exp_ms))
                    })
                });
            }
        }
        g.finish();
    }
}

/// The read-modify-write of `rmw_10k_keys/store/1024` (1,000 keys here) under each durability
/// setting, on a file in the temporary directory (its filesystem decides what a sync costs).
fn bench_durability(c: &mut Criterion) {
    let mut g = c.benchmark_group("rmw_1KiB_durability");
    let settings = [
        ("never", Durability::Never),
        (
            "periodic_1000ms",
            Durability::Periodic(Duration::from_secs(1)),
        ),
        (
            "periodic_10ms",
            Durability::Periodic(Duration::from_millis(10)),
        ),
        ("on_commit", Durability::OnCommit),
    ];
    let nkeys = 1000;
    let (exp, dl) = (expiry(), far_deadline());
    let mut v = value(1024);
    for (name, durability) in settings {
        let fx = StoreFx::with(keys(nkeys, 3), 1024, durability);
        g.bench_function(name, |b| {
            let mut i = 0usize;
            b.iter(|| {
                let k = &fx.keys[i % nkeys];
                i += 1;
                v[0] = v[0].wrapping_add(1);
                black_box(store_rmw(&fx.store, k, &v, dl, exp))
            })
        });
        assert_eq!(fx.store.sync_failures(), 0);
    }
    g.finish();
}

fn bench_get(c: &mut Criterion) {
    let mut g = c.benchmark_group("get_1KiB");
    let ks = keys(1, 2);
    {
        let fx = StoreFx::new(ks.clone(), 1024);
        g.bench_function("store", |b| {
            b.iter(|| black_box(fx.store.get(&fx.keys[0]).expect("present")))
        });
    }
    {
        let map = mutex_fx(&ks, 1024);
        g.bench_function("mutex_hashmap", |b| {
            b.iter(|| black_box(map.lock().unwrap().get(&ks[0][..]).cloned()))
        });
    }
    {
        let fx = SqliteFx::new(ks.clone(), 1024);
        g.bench_function("sqlite", |b| {
            b.iter(|| black_box(sqlite_get(&fx.conn, &fx.keys[0]).expect("present")))
        });
    }
    g.finish();
}

fn bench_two_processes(c: &mut Criterion) {
    let mut g = c.benchmark_group("two_procs_hot_keys_1KiB");
    let exp = expiry();
    let mut v = value(HOT_VALUE);
    {
        let fx = StoreFx::new(hot_keys(), HOT_VALUE);
        let _pin = PinSelf::new(Some("0"));
        let child = ChildProc::spawn("store-hot", &fx.path, Some("1"));
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        g.bench_function("store", |b| {
            b.iter_custom(|iters| {
                let dl = far_deadline();
                let start = Instant::now();
                for _ in 0..iters {
                    let k = &fx.keys[(rng.next() % HOT_KEYS as u64) as usize];
                    v[0] = v[0].wrapping_add(1);
                    black_box(store_rmw(&fx.store, k, &v, dl, exp));
                }
                start.elapsed()
            })
        });
        let waits = fx.store.stats().lease_waits;
        eprintln!("store two processes: {}, lease waits {waits}", child.stop());
    }
    {
        let ks = hot_keys();
        let map = Arc::new(mutex_fx(&ks, HOT_VALUE));
        let stop = Arc::new(AtomicBool::new(false));
        let other_ops = Arc::new(AtomicU64::new(0));
        let _pin = PinSelf::new(Some("0"));
        let other = {
            let (map, stop, other_ops, ks, mut v) = (
                map.clone(),
                stop.clone(),
                other_ops.clone(),
                ks.clone(),
                v.clone(),
            );
            std::thread::spawn(move || {
                pin_this_thread("1");
                let mut rng = Rng(0x2545_f491_4f6c_dd1d);
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let k = &ks[(rng.next() % HOT_KEYS as u64) as usize];
                    v[0] = v[0].wrapping_add(1);
                    black_box(mutex_rmw(&map, k, &v));
                    n += 1;
                }
                other_ops.store(n, Ordering::Relaxed);
            })
        };
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        g.bench_function("mutex_hashmap_two_threads", |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    let k = &ks[(rng.next() % HOT_KEYS as u64) as usize];
                    v[0] = v[0].wrapping_add(1);
                    black_box(mutex_rmw(&map, k, &v));
                }
                start.elapsed()
            })
        });
        stop.store(true, Ordering::Relaxed);
        other.join().unwrap();
        eprintln!(
            "mutex two threads: other thread ops {}",
            other_ops.load(Ordering::Relaxed)
        );
    }
    {
        let fx = SqliteFx::new(hot_keys(), HOT_VALUE);
        let _pin = PinSelf::new(Some("0"));
        let child = ChildProc::spawn("sqlite-hot", &fx.path, Some("1"));
        let exp_ms = unix_ms(exp);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        g.bench_function("sqlite", |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    let k = &fx.keys[(rng.next() % HOT_KEYS as u64) as usize];
                    v[0] = v[0].wrapping_add(1);
                    black_box(sqlite_rmw(&fx.conn, k, &v, exp_ms));
                }
                start.elapsed()
            })
        });
        eprintln!("sqlite two processes: {}", child.stop());
    }
    g.finish();
}

fn bench_handover(c: &mut Criterion) {
    let mut g = c.benchmark_group("handover");
    for placement in [Placement::Split, Placement::Same, Placement::Free] {
        let mut pp = PingPong::start(placement);
        let id = BenchmarkId::new("store_round_trip", placement.label());
        g.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    pp.round_trip();
                }
                start.elapsed()
            })
        });
        let waits = pp.store.stats().lease_waits;
        let label = placement.label();
        eprintln!(
            "store ping-pong {label}: {}, lease waits {waits}",
            pp.stop()
        );
    }
    for placement in [Placement::Split, Placement::Same] {
        let mut echo = Echo::start(placement);
        let id = BenchmarkId::new("pipe_round_trip", placement.label());
        g.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    echo.round_trip();
                }
                start.elapsed()
            })
        });
        eprintln!("pipe echo {}: {}", placement.label(), echo.child.stop());
    }
    g.finish();
}

// ---------------------------------------------------------------------------------------------
// Latency pass: single operations timed one by one, percentiles printed
// ---------------------------------------------------------------------------------------------

struct Row {
    case: &'static str,
    divide: u64,
    samples: Vec<u64>,
}

fn latency_pass() {
    let exp = expiry();
    let exp_ms = unix_ms(exp);
    let dl = far_deadline();
    let mut v = value(1024);
    let mut rows = Vec::new();

    rows.push(Row {
        case: "Instant::now() pair (timer overhead)",
        divide: 1,
        samples: time_each(1000, 200_000, || {}),
    });
    {
        let fx = StoreFx::new(keys(1, 1), 1024);
        let samples = time_each(20_000, 200_000, || {
            v[0] = v[0].wrapping_add(1);
            black_box(store_rmw(&fx.store, &fx.keys[0], &v, dl, exp));
        });
        rows.push(Row {
            case: "store lease+read+commit 1 KiB, one key",
            divide: 1,
            samples,
        });
        let samples = time_each(20_000, 200_000, || {
            black_box(fx.store.get(&fx.keys[0]));
        });
        rows.push(Row {
            case: "store get 1 KiB",
            divide: 1,
            samples,
        });
    }
    {
        let fx = StoreFx::new(keys(MANY_KEYS, 1), 1024);
        let mut i = 0;
        let samples = time_each(20_000, 200_000, || {
            v[0] = v[0].wrapping_add(1);
            black_box(store_rmw(&fx.store, &fx.keys[i % MANY_KEYS], &v, dl, exp));
            i += 1;
        });
        rows.push(Row {
            case: "store lease+read+commit 1 KiB, 10k keys",
            divide: 1,
            samples,
        });
    }
    {
        let ks = keys(1, 1);
        let map = mutex_fx(&ks, 1024);
        let samples = time_each(20_000, 200_000, || {
            v[0] = v[0].wrapping_add(1);
            black_box(mutex_rmw(&map, &ks[0], &v));
        });
        rows.push(Row {
            case: "Mutex<HashMap> lock+clone+insert 1 KiB, one key",
            divide: 1,
            samples,
        });
    }
    {
        let fx = SqliteFx::new(keys(1, 1), 1024);
        let samples = time_each(2_000, 20_000, || {
            v[0] = v[0].wrapping_add(1);
            black_box(sqlite_rmw(&fx.conn, &fx.keys[0], &v, exp_ms));
        });
        rows.push(Row {
            case: "SQLite BEGIN IMMEDIATE..COMMIT 1 KiB, one key",
            divide: 1,
            samples,
        });
    }
    {
        let fx = StoreFx::new(hot_keys(), HOT_VALUE);
        let pin = PinSelf::new(Some("0"));
        let child = ChildProc::spawn("store-hot", &fx.path, Some("1"));
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let samples = time_each(20_000, 200_000, || {
            let k = &fx.keys[(rng.next() % HOT_KEYS as u64) as usize];
            v[0] = v[0].wrapping_add(1);
            black_box(store_rmw(&fx.store, k, &v, dl, exp));
        });
        child.stop();
        drop(pin);
        rows.push(Row {
            case: "store lease+read+commit 1 KiB, 4 hot keys, 2 processes on 2 CPUs",
            divide: 1,
            samples,
        });
    }
    for (placement, case) in [
        (
            Placement::Split,
            "store hand-over, 2 CPUs (ping-pong round trip / 2)",
        ),
        (
            Placement::Same,
            "store hand-over, 1 CPU (ping-pong round trip / 2)",
        ),
    ] {
        let mut pp = PingPong::start(placement);
        let samples = time_each(2_000, 50_000, || pp.round_trip());
        pp.stop();
        rows.push(Row {
            case,
            divide: 2,
            samples,
        });
    }
    for (placement, case) in [
        (Placement::Split, "pipe echo, 2 CPUs (round trip / 2)"),
        (Placement::Same, "pipe echo, 1 CPU (round trip / 2)"),
    ] {
        let mut echo = Echo::start(placement);
        let samples = time_each(2_000, 50_000, || echo.round_trip());
        echo.child.stop();
        rows.push(Row {
            case,
            divide: 2,
            samples,
        });
    }

    println!();
    println!("latency pass: single operations, each timed with Instant (timer overhead included)");
    println!("| case | samples | p50 | p90 | p99 | p99.9 |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for mut r in rows {
        r.samples.sort_unstable();
        let d = r.divide as f64;
        let p = |q| fmt_ns(pct(&r.samples, q) as f64 / d);
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.case,
            r.samples.len(),
            p(0.5),
            p(0.9),
            p(0.99),
            p(0.999)
        );
    }
}

fn wants_latency_pass() -> bool {
    if std::env::var("MMAP_BENCH_LATENCY").is_ok_and(|v| v == "0") {
        return false;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--list") {
        return false;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    filters.is_empty() || filters.iter().any(|f| f.contains("latency"))
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50)
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_rmw, bench_durability, bench_get, bench_two_processes, bench_handover
}

fn main() {
    if let Ok(mode) = std::env::var(CHILD_ENV) {
        child_main(&mode);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
    if wants_latency_pass() {
        latency_pass();
    }
}
