//! Store scaling benchmark: how the cost of one operation grows with the size of the value and
//! with the number of stored sessions, and what one stored session costs in memory and on disk.
//!
//! Run with `cargo bench -p mmap-session-store --bench scaling`. Every case opens its own store
//! with the default `Options` (an index for 1,048,576 sessions) in its own temporary directory.
//!
//! - `scale_size/{rmw,get}/<bytes>`: 1,000 stored keys with values of 128 B to 64 KiB. `rmw` is
//!   lease+read+commit+release of a new value of the same size, `get` the lock-free read; each
//!   operation picks its key at random among the stored ones.
//! - `scale_count/{rmw,get}/<sessions>`: 1 to 1,000,000 stored keys with 1 KiB values, the same
//!   two operations on keys picked at random, so that a larger store shows its cache and TLB
//!   misses.
//!
//! After the criterion cases of each store, the same operations are timed once more without
//! criterion: a batch of operations timed as a whole (wall-clock mean per operation, and the
//! thread's time on the CPU per operation from `/proc/thread-self/schedstat`) and each operation
//! on its own (p50, p99). The fill (the first commit of every key) is timed too, and the file's size
//! on disk, the store's own counters and the resident size of the mapping are read. Markdown
//! tables of all that are printed at the end.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{BenchmarkGroup, BenchmarkId, Criterion};
use mmap_session_store::{Stats, Store};
use tempfile::TempDir;

mod common;
use common::{expiry, far_deadline, fmt_ns, keys, pct, store_rmw, time_each, value, Rng};

const SIZES: [(usize, &str); 5] = [
    (128, "128 B"),
    (1 << 10, "1 KiB"),
    (4 << 10, "4 KiB"),
    (16 << 10, "16 KiB"),
    (64 << 10, "64 KiB"),
];
/// Keys stored for the size sweep: enough not to sit in one cache line, few enough that even
/// 64 KiB values fill only 64 MiB.
const SIZE_KEYS: usize = 1_000;
const COUNTS: [(usize, &str); 5] = [
    (1, "1"),
    (1_000, "1,000"),
    (10_000, "10,000"),
    (100_000, "100,000"),
    (1_000_000, "1,000,000"),
];
/// 1 KiB × 1,000,000 fills in seconds, so the count sweep uses the size of a typical session.
const COUNT_VALUE: usize = 1 << 10;

/// A store holding `keys`, each committed once with a value of `size` bytes.
struct Fixture {
    _dir: TempDir,
    path: PathBuf,
    store: Store,
    keys: Vec<[u8; 16]>,
    size: usize,
    fill: Duration,
}

impl Fixture {
    fn fill(count: usize, size: usize) -> Fixture {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("sessions.mmap");
        let store = Store::open(&path).expect("open store");
        let keys = keys(count, 7);
        let (v, exp, dl) = (value(size), expiry(), far_deadline());
        let started = Instant::now();
        for k in &keys {
            store_rmw(&store, k, &v, dl, exp);
        }
        let fill = started.elapsed();
        assert_eq!(store.stats().live_records, count as u64);
        Fixture {
            _dir: dir,
            path,
            store,
            keys,
            size,
            fill,
        }
    }

    /// Lease+read+commit+release on a key picked at random; one byte of the value changes each
    /// time so that every commit writes new bytes.
    fn rmw(&self) -> impl FnMut() + '_ {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut v = value(self.size);
        let (exp, dl) = (expiry(), far_deadline());
        move || {
            let k = &self.keys[rng.below(self.keys.len())];
            v[0] = v[0].wrapping_add(1);
            black_box(store_rmw(&self.store, k, &v, dl, exp));
        }
    }

    /// The lock-free `get` of a key picked at random.
    fn get(&self) -> impl FnMut() + '_ {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        move || {
            let k = &self.keys[rng.below(self.keys.len())];
            black_box(self.store.get(k).expect("present"));
        }
    }
}

/// One operation measured without criterion.
struct Timing {
    /// Wall-clock mean of a batch timed as a whole (no timer overhead per operation).
    wall_ns: f64,
    /// The same batch's time on the CPU per operation: the time this thread was not running
    /// (another process had the CPU) is left out, which wall-clock figures cannot do on a
    /// shared machine.
    cpu_ns: f64,
    /// Single operations, each timed with `Instant` (about 20 ns of timer included), sorted.
    single: Vec<u64>,
}

/// Nanoseconds this thread has spent on a CPU (first field of `/proc/thread-self/schedstat`).
fn thread_cpu_ns() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
    stat.split_whitespace().next().unwrap().parse().unwrap()
}

fn timing(n: usize, mut op: impl FnMut()) -> Timing {
    let (started, cpu) = (Instant::now(), thread_cpu_ns());
    for _ in 0..n {
        op();
    }
    let cpu_ns = (thread_cpu_ns() - cpu) as f64 / n as f64;
    let wall_ns = started.elapsed().as_nanos() as f64 / n as f64;
    let mut single = time_each(n / 10, n, op);
    single.sort_unstable();
    Timing {
        wall_ns,
        cpu_ns,
        single,
    }
}

/// Fewer operations for large values, so that every case takes about the same time.
fn operations(size: usize) -> usize {
    if size > 16 << 10 {
        20_000
    } else {
        100_000
    }
}

struct OpRow {
    label: &'static str,
    rmw: Timing,
    get: Timing,
}

/// What one store occupies once filled.
struct SpaceRow {
    label: &'static str,
    count: usize,
    fill: Duration,
    /// `st_blocks * 512`: what the file takes on disk (it is reserved with `posix_fallocate`).
    disk: u64,
    /// `st_size`.
    apparent: u64,
    stats: Stats,
    /// Resident size of this process's mapping of the file (`Rss` in `/proc/self/smaps`).
    rss: u64,
}

/// The sum of the `Rss` lines of every mapping of `path` in this process.
fn mapping_rss(path: &Path) -> u64 {
    let path = path.canonicalize().unwrap();
    let path = path.to_str().unwrap();
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut in_file = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's header: address range, perms, offset, device, inode, path.
            in_file = fields.nth(4) == Some(path);
        } else if in_file && first == "Rss:" {
            kib += fields.next().unwrap().parse::<u64>().unwrap();
        }
    }
    kib * 1024
}

fn space(fx: &Fixture, label: &'static str) -> SpaceRow {
    let meta = std::fs::metadata(&fx.path).unwrap();
    SpaceRow {
        label,
        count: fx.keys.len(),
        fill: fx.fill,
        disk: meta.blocks() * 512,
        apparent: meta.size(),
        stats: fx.store.stats(),
        rss: mapping_rss(&fx.path),
    }
}

/// Runs both operations of `fx` under criterion, then once more on their own.
fn measure(
    g: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    param: usize,
    fx: &Fixture,
    label: &'static str,
) -> OpRow {
    g.bench_function(BenchmarkId::new("rmw", param), |b| {
        let mut op = fx.rmw();
        b.iter(&mut op)
    });
    g.bench_function(BenchmarkId::new("get", param), |b| {
        let mut op = fx.get();
        b.iter(&mut op)
    });
    let n = operations(fx.size);
    OpRow {
        label,
        rmw: timing(n, fx.rmw()),
        get: timing(n, fx.get()),
    }
}

fn bytes(n: f64) -> String {
    if n >= 10.0 * 1024.0 * 1024.0 {
        format!("{:.1} MiB", n / (1024.0 * 1024.0))
    } else if n >= 10.0 * 1024.0 {
        format!("{:.1} KiB", n / 1024.0)
    } else {
        format!("{n:.0} B")
    }
}

fn print_ops(title: &str, first: &str, rows: &[OpRow]) {
    println!();
    println!("{title}");
    println!(
        "| {first} | rmw wall | rmw on-CPU | rmw p50 | rmw p99 | get wall | get on-CPU | get p50 | get p99 | operations |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in rows {
        let columns = |t: &Timing| {
            format!(
                "{} | {} | {} | {}",
                fmt_ns(t.wall_ns),
                fmt_ns(t.cpu_ns),
                fmt_ns(pct(&t.single, 0.5) as f64),
                fmt_ns(pct(&t.single, 0.99) as f64)
            )
        };
        println!(
            "| {} | {} | {} | {} |",
            r.label,
            columns(&r.rmw),
            columns(&r.get),
            r.rmw.single.len(),
        );
    }
}

fn print_space(rows: &[SpaceRow]) {
    println!();
    println!(
        "space: store files with 1 KiB values (default Options: index for 1,048,576 sessions); \
         'per session' = total / sessions"
    );
    println!(
        "| sessions | fill | fill per session | disk (st_blocks) | per session | file size (st_size) \
         | bytes_used (stats) | per session | bytes_reserved (stats) | RSS of the mapping | per session |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in rows {
        let n = r.count as f64;
        println!(
            "| {} | {:.3} s | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.label,
            r.fill.as_secs_f64(),
            fmt_ns(r.fill.as_nanos() as f64 / n),
            bytes(r.disk as f64),
            bytes(r.disk as f64 / n),
            bytes(r.apparent as f64),
            bytes(r.stats.bytes_used as f64),
            bytes(r.stats.bytes_used as f64 / n),
            bytes(r.stats.bytes_reserved as f64),
            bytes(r.rss as f64),
            bytes(r.rss as f64 / n),
        );
    }
    if let Some(r) = rows.first() {
        println!(
            "index: {} entries of 16 B = {} (the same in every file above)",
            r.stats.index_entries,
            bytes(r.stats.index_entries as f64 * 16.0)
        );
    }
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50)
        .configure_from_args();

    let mut by_size = Vec::new();
    {
        let mut g = c.benchmark_group("scale_size");
        for (size, label) in SIZES {
            let fx = Fixture::fill(SIZE_KEYS, size);
            by_size.push(measure(&mut g, size, &fx, label));
        }
        g.finish();
    }

    let mut by_count = Vec::new();
    let mut spaces = Vec::new();
    {
        let mut g = c.benchmark_group("scale_count");
        for (count, label) in COUNTS {
            let fx = Fixture::fill(count, COUNT_VALUE);
            eprintln!(
                "filled {count} sessions of {COUNT_VALUE} B in {:.3} s",
                fx.fill.as_secs_f64()
            );
            by_count.push(measure(&mut g, count, &fx, label));
            spaces.push(space(&fx, label));
            let report = fx.store.verify();
            assert!(
                report.is_clean(),
                "store inconsistent: {:?}",
                report.problems
            );
        }
        g.finish();
    }
    c.final_summary();

    print_ops(
        &format!(
            "by value size: {SIZE_KEYS} stored keys, keys picked at random; wall and on-CPU = a \
             batch timed as a whole, p50/p99 = single operations timed with Instant (about 20 ns \
             of timer included)"
        ),
        "value size",
        &by_size,
    );
    print_ops(
        &format!(
            "by number of stored sessions: {COUNT_VALUE} B values, keys picked at random among \
             the stored ones"
        ),
        "sessions",
        &by_count,
    );
    print_space(&spaces);
}
