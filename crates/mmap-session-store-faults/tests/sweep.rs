//! The crash/stall-point sweep: for every named step of every protocol that writes shared
//! state (each `failpoint!` of `mmap-session-store`), one test kills a real process there
//! (SIGKILL) and one stalls it there while other processes carry on past its lease timeout.
//!
//! After the fault, a process that opened the file before it and one that opens it after
//! each lease the session the stopped process was working on (within a deadline far shorter
//! than a killed holder's lease timeout, so a dead holder must be recognised as dead), commit
//! it, commit a key of their own, and read each other's commits. A stalled process is then let
//! go on: whatever it acknowledges must have read the latest acknowledged value (no lost
//! update). Finally every process closes, the file is opened alone (recovering what the kill
//! left behind), and it must verify clean, with nothing leaked and every acknowledged value in
//! place.
//!
//! `every_failpoint_is_swept` reads the store's sources: a step added without a case here
//! fails the suite.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mmap_session_store::{Lease, Options, Store};
use mmap_session_store_faults::{later, lease_and_commit, no_child_starts, options, value, Child};

/// A killed holder must be taken over long before this: only the kernel's word that it died
/// can get a waiter there in time.
const LONG: Duration = Duration::from_secs(120);
/// Processes that carry on while another is stalled take its leases over after this.
const SHORT: Duration = Duration::from_millis(150);
/// How long any lease of the checks may wait.
const WAIT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Kill,
    Stall,
}

/// How the stopped process gets to its step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    /// `k` holds "a"; the child reads and rewrites it.
    Commit,
    /// `k` has no entry; the child's read-modify-write inserts it.
    Insert,
    /// A new file; the child's first commit grows it and claims its first chunk.
    FirstCommit,
    /// `k` held "a" and expired; the child purges expired records.
    Purge,
    /// The parent holds `k`'s lease; the child's read-modify-write waits for it.
    Wait,
    /// A process that held `k`'s lease was killed; the child takes the lease over.
    TakeOver,
    /// Every chunk is claimed and the large ones are empty; the child writes a value of a size
    /// class that has no chunk, so wholly free chunks are given back.
    Unclaim,
    /// A process died holding `k`'s lease while nobody else had the file open; the child opens
    /// it alone and recovers.
    Recover,
    /// A process died holding `k`'s lease; the child opens the file while another process has
    /// it open, takes the dead process's slot and releases its leases.
    ReclaimSlot,
    /// No file; the child creates it.
    Create,
}

/// Every failpoint of the store that sits on a step writing shared state, and the scenario
/// that reaches it.
const CASES: &[(&str, Scenario)] = &[
    ("lock.acquired", Scenario::Commit),
    ("lock.marked_waiting", Scenario::Wait),
    ("lock.taken_over", Scenario::TakeOver),
    ("lock.releasing", Scenario::Commit),
    ("record.allocated", Scenario::Commit),
    ("record.written", Scenario::Commit),
    ("record.published", Scenario::Commit),
    ("alloc.pop.read", Scenario::Commit),
    ("alloc.push.linked", Scenario::Commit),
    ("alloc.chunk.claimed", Scenario::FirstCommit),
    ("alloc.chunk.carved", Scenario::FirstCommit),
    ("grow.reserved", Scenario::FirstCommit),
    ("alloc.unclaim.popped", Scenario::Unclaim),
    ("alloc.unclaim.given_back", Scenario::Unclaim),
    ("index.insert.state_claimed", Scenario::Insert),
    ("index.insert.tag_claimed", Scenario::Insert),
    ("index.insert.checked", Scenario::Insert),
    ("index.insert.tagged", Scenario::Insert),
    ("evict.remove_idle.before_lease", Scenario::Purge),
    ("evict.remove_idle.leased", Scenario::Purge),
    ("evict.remove_idle.removed", Scenario::Purge),
    ("index.give_up.checked", Scenario::Purge),
    ("index.key_given_up", Scenario::Purge),
    ("recover.entries_done", Scenario::Recover),
    ("recover.rebuilt", Scenario::Recover),
    ("open.slot_marked_dirty", Scenario::ReclaimSlot),
    ("open.reclaim_slot.released", Scenario::ReclaimSlot),
    ("open.create.written", Scenario::Create),
];

/// Failpoints that observe rather than write shared state; the defect tests use them.
const OBSERVERS: &[&str] = &[
    "local.enqueued",
    "store.get.copied",
    // Steps of creation that touch only temporary files (tests/review.rs).
    "open.create.tmp_opened",
    "open.create.abandoned_locked",
];

/// Values of the large size class that the `Unclaim` scenario fills the file with.
const LARGE: usize = 300 << 10;
/// The child's value in the `Unclaim` scenario: a size class no chunk has.
const NEW_CLASS: usize = 100 << 10;

struct Run {
    dir: tempfile::TempDir,
    path: PathBuf,
    fault: Fault,
    /// The last acknowledged value of every key, in the order they were acknowledged.
    acked: Vec<(String, Option<String>)>,
}

impl Run {
    fn new(fault: Fault) -> Run {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        Run {
            dir,
            path,
            fault,
            acked: Vec::new(),
        }
    }

    /// The lease timeout of the processes that carry on.
    fn lease_timeout(&self) -> Duration {
        match self.fault {
            Fault::Kill => LONG,
            Fault::Stall => SHORT,
        }
    }

    fn open(&self) -> Store {
        Store::open_with(&self.path, options(self.lease_timeout())).unwrap()
    }

    fn ack(&mut self, key: &str, value: Option<&str>) {
        self.acked.retain(|(k, _)| k != key);
        self.acked.push((key.to_owned(), value.map(str::to_owned)));
    }

    fn last(&self, key: &str) -> Option<String> {
        self.acked
            .iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.clone())
    }

    fn commit(&mut self, store: &Store, key: &str, allowed: &[Option<&str>], value: &str) {
        lease_and_commit(store, key, allowed, value, WAIT);
        self.ack(key, Some(value));
    }

    fn check_reads(&self, store: &Store, who: &str) {
        for (k, v) in &self.acked {
            assert_eq!(&value(store, k), v, "{k} as {who} reads it");
        }
    }
}

fn unclaim_options() -> Options {
    options(LONG)
}

fn sweep(failpoint: &str, scenario: Scenario, fault: Fault) {
    let mut run = Run::new(fault);
    // Set up, and say what the stopped child may have written of `k` ("a" is acknowledged).
    let mut old: Option<Store> = None;
    let mut held: Option<Lease> = None;
    let mut child = Child::spawn();
    let open_cmd = format!("open {} {}", run.path.display(), LONG.as_millis());
    let child_pad = if scenario == Scenario::Unclaim {
        NEW_CLASS
    } else {
        0
    };
    let rmw = format!("rmw k v1 {child_pad}");
    let mut quiet = None;
    match scenario {
        Scenario::Commit | Scenario::Wait | Scenario::TakeOver | Scenario::ReclaimSlot => {
            let store = run.open();
            run.commit(&store, "k", &[None], "a");
            if scenario == Scenario::TakeOver {
                // The child opens first: the holder's slot must not become the child's.
                child.ask(&open_cmd, "@ok");
            }
            if scenario == Scenario::TakeOver || scenario == Scenario::ReclaimSlot {
                let mut holder = Child::open(&run.path, LONG);
                holder.ask("hold k", "@held");
                holder.kill();
            }
            if scenario == Scenario::Wait {
                held = Some(store.lease_blocking(b"k", Instant::now() + WAIT).unwrap());
            }
            old = Some(store);
        }
        Scenario::Insert | Scenario::FirstCommit => {
            old = Some(run.open());
            run.ack("k", None);
        }
        Scenario::Purge => {
            let store = run.open();
            // Committed first: the sweep that follows every commit could reclaim `k` itself
            // once it has expired.
            run.commit(&store, "live", &[None], "stays");
            let mut lease = store.lease_blocking(b"k", Instant::now() + WAIT).unwrap();
            lease
                .commit(
                    b"a",
                    std::time::SystemTime::now() + Duration::from_millis(20),
                )
                .unwrap();
            drop(lease);
            while store.get(b"k").is_some() {
                std::thread::yield_now(); // until its 20 ms are over
            }
            run.ack("k", None);
            old = Some(store);
        }
        Scenario::Unclaim => {
            let store = Store::open_with(&run.path, unclaim_options()).unwrap();
            // A small record claims the first chunk; large ones fill the others until one
            // has to be evicted; then the large ones go, leaving their chunks wholly free.
            run.commit(&store, "small", &[None], "s");
            let big = vec![b'L'; LARGE];
            let mut n = 0;
            while store.stats().evictions == 0 {
                assert!(n < 64, "the store never filled up");
                let mut lease = store
                    .lease_blocking(format!("large-{n}").as_bytes(), Instant::now() + WAIT)
                    .unwrap();
                lease.commit(&big, later()).unwrap();
                n += 1;
            }
            for i in 0..n {
                let mut lease = store
                    .lease_blocking(format!("large-{i}").as_bytes(), Instant::now() + WAIT)
                    .unwrap();
                lease.remove().unwrap();
            }
            run.ack("k", None);
            old = Some(store);
        }
        Scenario::Recover => {
            let store = run.open();
            run.commit(&store, "k", &[None], "a");
            let mut holder = Child::open(&run.path, LONG);
            holder.ask("hold k", "@held");
            quiet = Some(no_child_starts()); // until the child has opened the file alone
            drop(store); // the child must find the file unused by anyone
            holder.kill();
        }
        Scenario::Create => {}
    }
    let before = run.last("k");
    let child_value = format!("v1<-{}", before.as_deref().unwrap_or("none"));
    let allowed_k = [before.as_deref(), Some(child_value.as_str())];

    // Drive the child to the step.
    let opens_at_step = matches!(
        scenario,
        Scenario::Recover | Scenario::ReclaimSlot | Scenario::Create
    );
    if opens_at_step {
        child.arm(failpoint);
        child.send(&open_cmd);
    } else {
        if scenario != Scenario::TakeOver {
            child.ask(&open_cmd, "@ok");
        }
        child.arm(failpoint);
        match scenario {
            Scenario::Purge => child.send("purge"),
            _ => child.send(&rmw),
        }
    }
    child.wait_at(failpoint);
    drop(quiet);
    let mut child = match fault {
        Fault::Kill => {
            child.kill();
            None
        }
        Fault::Stall => Some(child),
    };
    if let Some(lease) = held.take() {
        drop(lease); // the waiting child's step is passed: let the others have the session
    }

    // Others carry on. A stalled child that is opening alone holds the file's recovery lock:
    // a new opener waits for it, so it is let go first.
    let new = if scenario == Scenario::Recover && fault == Fault::Stall {
        let path = run.path.clone();
        let timeout = run.lease_timeout();
        let opener = std::thread::spawn(move || Store::open_with(path, options(timeout)));
        let stalled = child.as_mut().unwrap();
        stalled.resume();
        stalled.expect("@ok");
        opener.join().unwrap().unwrap()
    } else {
        run.open()
    };
    if scenario == Scenario::Create {
        run.ack("k", None);
    }
    // A purged key had expired, and a key of a file being created did not exist yet.
    let allowed: Vec<Option<&str>> = if matches!(scenario, Scenario::Purge | Scenario::Create) {
        vec![None]
    } else {
        allowed_k.to_vec()
    };
    let first_read = lease_and_commit(&new, "k", &allowed, "n", WAIT);
    // The stopped child's commit was published before it stopped: that is the key's state
    // it had then (its acknowledgement may still be on its way).
    let published_before = first_read.as_deref() == Some(child_value.as_str());
    run.ack("k", Some("n"));
    run.commit(&new, "by-new", &[None], "fresh-n");
    if let Some(old) = &old {
        run.commit(old, "k", &[Some("n")], "o");
        run.commit(old, "by-old", &[None], "fresh-o");
        run.check_reads(old, "the process opened before the fault");
    }
    run.check_reads(&new, "a process opened after the fault");

    // A stalled child goes on: what it acknowledges must follow the last acknowledged value.
    if let Some(mut stalled) = child.take() {
        if scenario != Scenario::Recover {
            stalled.resume();
            if opens_at_step {
                stalled.expect("@ok");
            } else {
                let answer = stalled.answer();
                if scenario == Scenario::Purge {
                    assert!(answer.starts_with("@ok"), "purge: {answer}");
                } else if let Some(v) = answer.strip_prefix("@ok ") {
                    if published_before {
                        assert_eq!(v, child_value, "the child acknowledged another value");
                    } else {
                        let last = run.last("k").unwrap();
                        assert_eq!(
                            v,
                            format!("v1<-{last}"),
                            "the stalled child's commit did not read the last acknowledged value"
                        );
                        run.ack("k", Some(v));
                    }
                } else {
                    assert!(
                        answer.contains("lost"),
                        "the stalled child failed otherwise than by losing its lease: {answer}"
                    );
                }
            }
        }
        // Its own view agrees.
        let got = stalled.ask("get k", "@");
        let expect = run
            .last("k")
            .map_or("@none".to_owned(), |v| format!("@val {v}"));
        assert_eq!(
            unpad_answer(&got),
            expect,
            "k as the stalled child reads it"
        );
        stalled.exit();
    }
    if let Some(old) = &old {
        run.check_reads(old, "the process opened before the fault");
    }
    run.check_reads(&new, "a process opened after the fault");
    drop(old);
    drop(new);

    // Alone: recovery repairs what a kill left; the file must verify clean, nothing leaked.
    let quiet = no_child_starts();
    let alone = Store::open_with(&run.path, unclaim_options()).unwrap();
    drop(quiet);
    let report = alone.verify();
    assert!(report.is_clean(), "verify: {:?}", report.problems);
    assert_eq!(report.leaked_blocks, 0, "leaked: {report:?}");
    assert_eq!(report.leased, 0, "leases left: {report:?}");
    run.check_reads(&alone, "a solo opener");
    drop(alone);
    let leftovers = temporary_files(run.dir.path());
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}

fn unpad_answer(answer: &str) -> String {
    match answer.strip_prefix("@val ") {
        Some(v) => format!("@val {}", v.split('|').next().unwrap_or("")),
        None => answer.to_owned(),
    }
}

fn temporary_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".creating"))
        .collect()
}

fn case(failpoint: &str) -> Scenario {
    CASES
        .iter()
        .find(|(name, _)| *name == failpoint)
        .map(|(_, s)| *s)
        .unwrap_or_else(|| panic!("no case for {failpoint}"))
}

macro_rules! sweep_tests {
    ($($module:ident => $failpoint:literal,)*) => {
        $(
            mod $module {
                #[test]
                fn killed_here() {
                    super::sweep($failpoint, super::case($failpoint), super::Fault::Kill);
                }
                #[test]
                fn stalled_here() {
                    super::sweep($failpoint, super::case($failpoint), super::Fault::Stall);
                }
            }
        )*
        const SWEPT: &[&str] = &[$($failpoint),*];
    };
}

sweep_tests! {
    lock_acquired => "lock.acquired",
    lock_marked_waiting => "lock.marked_waiting",
    lock_taken_over => "lock.taken_over",
    lock_releasing => "lock.releasing",
    record_allocated => "record.allocated",
    record_written => "record.written",
    record_published => "record.published",
    alloc_pop_read => "alloc.pop.read",
    alloc_push_linked => "alloc.push.linked",
    alloc_chunk_claimed => "alloc.chunk.claimed",
    alloc_chunk_carved => "alloc.chunk.carved",
    grow_reserved => "grow.reserved",
    alloc_unclaim_popped => "alloc.unclaim.popped",
    alloc_unclaim_given_back => "alloc.unclaim.given_back",
    index_insert_state_claimed => "index.insert.state_claimed",
    index_insert_tag_claimed => "index.insert.tag_claimed",
    index_insert_checked => "index.insert.checked",
    index_insert_tagged => "index.insert.tagged",
    evict_remove_idle_before_lease => "evict.remove_idle.before_lease",
    evict_remove_idle_leased => "evict.remove_idle.leased",
    evict_remove_idle_removed => "evict.remove_idle.removed",
    index_give_up_checked => "index.give_up.checked",
    index_key_given_up => "index.key_given_up",
    recover_entries_done => "recover.entries_done",
    recover_rebuilt => "recover.rebuilt",
    open_slot_marked_dirty => "open.slot_marked_dirty",
    open_reclaim_slot_released => "open.reclaim_slot.released",
    open_create_written => "open.create.written",
}

/// Every `failpoint!` in the store's sources has a kill and a stall test here (or is one of the
/// few that only observe).
#[test]
fn every_failpoint_is_swept() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../mmap-session-store/src");
    let mut named = BTreeSet::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for part in text.split("failpoint!(\"").skip(1) {
            named.insert(part.split('"').next().unwrap().to_owned());
        }
    }
    named.remove("$name"); // the macro's own definition, if it names its argument so
    let swept: BTreeSet<String> = SWEPT.iter().map(|s| (*s).to_owned()).collect();
    let cased: BTreeSet<String> = CASES.iter().map(|(n, _)| (*n).to_owned()).collect();
    let observers: BTreeSet<String> = OBSERVERS.iter().map(|s| (*s).to_owned()).collect();
    let missing: Vec<_> = named
        .iter()
        .filter(|n| !swept.contains(*n) && !observers.contains(*n))
        .collect();
    assert!(
        missing.is_empty(),
        "failpoints without a kill and a stall test: {missing:?}"
    );
    let stale: Vec<_> = swept.iter().filter(|n| !named.contains(*n)).collect();
    assert!(
        stale.is_empty(),
        "swept failpoints that no longer exist: {stale:?}"
    );
    assert_eq!(swept, cased, "every swept failpoint needs a scenario");
}
