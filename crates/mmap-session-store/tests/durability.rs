//! Durability: the system calls each setting issues, seen by `strace` on a real process.
//!
//! The child is this test binary re-executed with `MMAP_DURABILITY_CHILD` set (it runs
//! `durability_child_entry`, which does nothing in a normal test run) under
//! `strace -f -ttt -e trace=msync,fsync,fdatasync,write`. It opens a store file the parent
//! created (so the setting is seen to apply to an existing file), obeys commands read from its
//! standard input, and prints `@ack`, `@removed`, ... after each. The parent reads the trace:
//! which sync calls were issued, when, and whether before the acknowledgement was written.
//!
//! Needs `strace` (`$STRACE`, else in `PATH`); `tests/run.sh` installs it. Without it, or
//! where ptrace is not allowed, these tests fail saying so.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use mmap_session_store::{Durability, Options, Store};

const CHILD_ENV: &str = "MMAP_DURABILITY_CHILD";
const MODE_ENV: &str = "MMAP_DURABILITY_MODE";
/// The background thread's name, as `/proc/self/task/*/comm` shows it.
const SYNC_THREAD: &str = "mmap-sess-sync";
/// How long any one step may take before the test gives up.
const STEP: Duration = Duration::from_secs(30);

fn later() -> SystemTime {
    SystemTime::now() + Duration::from_secs(3600)
}

fn options() -> Options {
    Options::new().max_sessions(1024).max_file_size(64 << 20)
}

fn mode(s: &str) -> Durability {
    match s.split_once(':') {
        Some(("periodic", ms)) => Durability::Periodic(Duration::from_millis(ms.parse().unwrap())),
        _ if s == "oncommit" => Durability::OnCommit,
        _ if s == "never" => Durability::Never,
        _ => panic!("unknown durability {s}"),
    }
}

fn sync_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter(|t| {
            let comm = std::fs::read_to_string(t.as_ref().unwrap().path().join("comm"));
            comm.is_ok_and(|c| c.trim() == SYNC_THREAD)
        })
        .count()
}

/// The child: opens the store and obeys one command per line of its standard input.
///
/// - `commit <key> <n> <gap ms>`: `n` commits of `key`, `gap` ms apart, `@ack <key> <i>` after each;
/// - `remove <key>`: removes the key's record, then `@removed <key>`;
/// - `threads`: `@threads <n>`, the number of this process's sync threads;
/// - `close`: drops the store, then `@closed`.
#[test]
fn durability_child_entry() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let durability = mode(&std::env::var(MODE_ENV).unwrap());
    let mut store = Some(Store::open_with(&path, options().durability(durability)).unwrap());
    assert_eq!(store.as_ref().unwrap().durability(), durability);
    println!("@ready");
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["commit", key, n, gap] => {
                let s = store.as_ref().unwrap();
                let gap = Duration::from_millis(gap.parse().unwrap());
                for i in 0..n.parse::<u64>().unwrap() {
                    if i > 0 {
                        std::thread::sleep(gap); // pacing a workload, not an interleaving
                    }
                    let deadline = Instant::now() + Duration::from_secs(10);
                    let mut lease = s.lease_blocking(key.as_bytes(), deadline).unwrap();
                    lease.commit(&i.to_le_bytes(), later()).unwrap();
                    drop(lease);
                    println!("@ack {key} {i}");
                }
            }
            ["remove", key] => {
                let s = store.as_ref().unwrap();
                let deadline = Instant::now() + Duration::from_secs(10);
                let mut lease = s.lease_blocking(key.as_bytes(), deadline).unwrap();
                lease.remove().unwrap();
                drop(lease);
                println!("@removed {key}");
            }
            ["threads"] => println!("@threads {}", sync_threads()),
            ["close"] => {
                let s = store.take().unwrap();
                assert_eq!(s.sync_failures(), 0);
                drop(s);
                println!("@closed");
            }
            _ => panic!("unknown command {line:?}"),
        }
    }
}

/// `strace`, or a failure saying how to get it.
fn strace() -> PathBuf {
    if let Some(p) = std::env::var_os("STRACE") {
        return PathBuf::from(p);
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain([PathBuf::from("/usr/bin"), PathBuf::from("/bin")])
            .map(|d| d.join("strace"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "strace is needed to see which system calls the store issues, and was not found \
             (install it: apt-get install strace, or run tests/run.sh, which does; $STRACE \
             points the test at another copy)"
        )
    })
}

/// A child under strace, its output lines arriving on a channel.
struct Traced {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    trace: PathBuf,
}

impl Traced {
    fn start(dir: &Path, durability: &str) -> Traced {
        let path = dir.join("store");
        // The parent creates the file: the child's setting must apply to an existing file.
        drop(Store::open_with(&path, options()).unwrap());
        let trace = dir.join(format!("trace-{}.txt", durability.replace(':', "-")));
        let mut child = Command::new(strace())
            .args([
                "-f",
                "-ttt",
                "-e",
                "trace=msync,fsync,fdatasync,write",
                "-o",
            ])
            .arg(&trace)
            .arg(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "durability_child_entry",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_ENV, &path)
            .env(MODE_ENV, durability)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start strace: {e}"));
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest may print its own text on the same line before ours.
                if let Some(at) = line.find('@') {
                    if tx.send(line[at..].to_owned()).is_err() {
                        break;
                    }
                }
            }
        });
        let mut t = Traced {
            child,
            stdin,
            lines,
            trace,
        };
        t.expect("@ready");
        t
    }

    /// Asks for the number of sync threads until it is `n` (a thread that was joined may
    /// linger in `/proc` for a moment).
    fn expect_threads(&mut self, n: usize) {
        let deadline = Instant::now() + STEP;
        loop {
            self.send("threads");
            let line = self.lines.recv_timeout(STEP).expect("an answer to threads");
            if line == format!("@threads {n}") {
                return;
            }
            assert!(Instant::now() < deadline, "{line}, not {n} threads");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn send(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Waits for the line `want` (failing on any other line, or after `STEP`).
    fn expect(&mut self, want: &str) {
        match self.lines.recv_timeout(STEP) {
            Ok(line) if line == want => {}
            Ok(line) => panic!("expected {want:?} from the child, got {line:?}"),
            Err(_) => {
                let _ = self.child.kill();
                let out = self.child.wait_with_output_now();
                panic!(
                    "the child did not say {want:?} within {STEP:?}; strace's stderr (if ptrace \
                     is not allowed here, that is why): {out}"
                );
            }
        }
    }

    /// Ends the child (closing its standard input) and returns the trace.
    fn finish(mut self) -> Vec<Event> {
        drop(self.stdin);
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                let _ =
                    std::io::Read::read_to_string(self.child.stderr.as_mut().unwrap(), &mut err);
                assert!(
                    status.success(),
                    "strace or the child failed: {status}: {err}"
                );
                break;
            }
            assert!(Instant::now() < deadline, "the child did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
        events(&self.trace)
    }

    /// The trace so far.
    fn events(&self) -> Vec<Event> {
        events(&self.trace)
    }
}

trait WaitNow {
    fn wait_with_output_now(&mut self) -> String;
}

impl WaitNow for Child {
    fn wait_with_output_now(&mut self) -> String {
        let _ = self.wait();
        let mut err = String::new();
        if let Some(e) = self.stderr.as_mut() {
            let _ = std::io::Read::read_to_string(e, &mut err);
        }
        err
    }
}

/// One finished system call of the trace, or one acknowledgement the child wrote.
#[derive(Clone, Debug, PartialEq)]
enum Event {
    /// A sync call returned 0: its name and the time it was entered (s since the epoch).
    Synced(String, f64),
    /// The child wrote this line (`@ack k i`, ...), at this time.
    Said(String, f64),
}

impl Event {
    fn is_sync(&self, name: &str) -> bool {
        matches!(self, Event::Synced(n, _) if n == name)
    }

    fn at(&self) -> f64 {
        match self {
            Event::Synced(_, t) | Event::Said(_, t) => *t,
        }
    }
}

/// Reads an `strace -f -ttt` output file into events, in the order the calls returned. A call
/// that another thread's call interrupted shows as `name(... <unfinished ...>` and later
/// `<... name resumed>...`; it is counted when it resumes, with its entry time.
fn events(trace: &Path) -> Vec<Event> {
    let mut text = std::fs::read_to_string(trace).unwrap_or_default();
    // strace may be writing a line while we read: only whole lines count.
    text.truncate(text.rfind('\n').map_or(0, |at| at + 1));
    let mut started: std::collections::HashMap<(String, String), f64> = Default::default();
    let mut out = Vec::new();
    for line in text.lines() {
        // `<pid> <time> <call>`; strace pads the pid with spaces to five characters.
        let Some((pid, rest)) = line.split_once(' ') else {
            continue;
        };
        let Some((ts, rest)) = rest.trim_start().split_once(' ') else {
            continue;
        };
        let Ok(ts) = ts.parse::<f64>() else { continue };
        let (name, at, rest) = if let Some(r) = rest.strip_prefix("<... ") {
            let Some((name, r)) = r.split_once(" resumed>") else {
                continue;
            };
            let at = started
                .remove(&(pid.to_owned(), name.to_owned()))
                .unwrap_or(ts);
            (name.to_owned(), at, r.to_owned())
        } else {
            let Some((name, _)) = rest.split_once('(') else {
                continue;
            };
            if rest.ends_with("<unfinished ...>") {
                started.insert((pid.to_owned(), name.to_owned()), ts);
                if name == "write" {
                    // A write's text is on its first line.
                    if let Some(said) = said(rest) {
                        out.push(Event::Said(said, ts));
                    }
                }
                continue;
            }
            (name.to_owned(), ts, rest.to_owned())
        };
        match name.as_str() {
            "write" => {
                if let Some(said) = said(&rest) {
                    out.push(Event::Said(said, at));
                }
            }
            "msync" | "fsync" | "fdatasync" => {
                assert!(
                    rest.trim_end().ends_with("= 0"),
                    "a sync call failed in the child: {line}"
                );
                out.push(Event::Synced(name, at));
            }
            _ => {}
        }
    }
    out
}

/// The `@...` line a traced `write(1, "...\n", n)` carries.
fn said(call: &str) -> Option<String> {
    let start = call.find("\"@")? + 1;
    let end = start + call[start..].find("\\n")?;
    Some(call[start..end].to_owned())
}

fn syncs(events: &[Event]) -> Vec<&Event> {
    events
        .iter()
        .filter(|e| matches!(e, Event::Synced(..)))
        .collect()
}

#[test]
fn never_issues_no_sync_call() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Traced::start(dir.path(), "never");
    t.expect_threads(0);
    t.send("commit a 20 0");
    for i in 0..20 {
        t.expect(&format!("@ack a {i}"));
    }
    t.send("remove a");
    t.expect("@removed a");
    t.send("close");
    t.expect("@closed");
    let events = t.finish();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Said(s, _) if s == "@closed")),
        "the trace does not show the child's output: {events:?}"
    );
    assert_eq!(syncs(&events), Vec::<&Event>::new(), "Never synced");
}

#[test]
fn on_commit_syncs_twice_before_each_commit_is_acknowledged_and_once_per_removal() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Traced::start(dir.path(), "oncommit");
    t.expect_threads(0);
    let n = 5;
    t.send(&format!("commit a {n} 0"));
    for i in 0..n {
        t.expect(&format!("@ack a {i}"));
    }
    t.send("remove a");
    t.expect("@removed a");
    t.send("close");
    t.expect("@closed");
    let events = t.finish();
    // Between one acknowledgement and the next, exactly the syncs of that commit.
    let mut since_last = 0;
    let mut acks = 0;
    for e in &events {
        match e {
            Event::Synced(name, _) => {
                assert_eq!(name, "fdatasync", "OnCommit issued {name}: {events:?}");
                since_last += 1;
            }
            Event::Said(s, _) if s.starts_with("@ack") => {
                assert_eq!(
                    since_last, 2,
                    "{s} was written after {since_last} fdatasync calls since the previous \
                     acknowledgement, not 2: {events:?}"
                );
                since_last = 0;
                acks += 1;
            }
            Event::Said(s, _) if s.starts_with("@removed") => {
                assert_eq!(
                    since_last, 1,
                    "{s} was written after {since_last} fdatasync calls, not 1: {events:?}"
                );
                since_last = 0;
            }
            Event::Said(..) => {}
        }
    }
    assert_eq!(acks, n);
    assert_eq!(
        since_last, 0,
        "syncs after the last acknowledgement: {events:?}"
    );
}

/// Polls the trace until it holds `n` msync calls; their events.
fn wait_for_msyncs(t: &Traced, n: usize) -> Vec<Event> {
    let deadline = Instant::now() + STEP;
    loop {
        let events = t.events();
        if events.iter().filter(|e| e.is_sync("msync")).count() >= n {
            return events;
        }
        assert!(
            Instant::now() < deadline,
            "fewer than {n} msync calls within {STEP:?}: {events:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn periodic_msyncs_within_the_period_after_writes_and_never_when_idle() {
    let period = Duration::from_millis(200);
    let p = period.as_secs_f64();
    let dir = tempfile::tempdir().unwrap();
    let mut t = Traced::start(dir.path(), &format!("periodic:{}", period.as_millis()));
    t.expect_threads(1);
    // Opening marks the process slot in use: that goes to the disk in the first pass.
    wait_for_msyncs(&t, 1);
    // Idle for five periods: no pass syncs anything.
    let idle_from = Instant::now();
    std::thread::sleep(period * 5); // observing that nothing happens, not ordering anything
    let events = t.events();
    assert_eq!(
        events.iter().filter(|e| e.is_sync("msync")).count(),
        1,
        "an idle process synced again: {events:?}"
    );
    assert!(idle_from.elapsed() >= period * 5);

    // One commit: one msync, within about the period after it. The sync thread may run its
    // pass between the commit and the child's acknowledgement line, so the msync is timed from
    // when the command was sent (strace's `-ttt` times and this clock are both the wall clock).
    let sent = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    t.send("commit a 1 0");
    t.expect("@ack a 0");
    let events = wait_for_msyncs(&t, 2);
    let msync = events
        .iter()
        .filter(|e| e.is_sync("msync"))
        .nth(1)
        .unwrap()
        .at();
    assert!(
        msync > sent && msync - sent <= p + 0.5,
        "the msync came {:.3} s after the commit was sent, period {p} s: {events:?}",
        msync - sent
    );

    // Commits every 20 ms for about 1.2 s: a pass per period, never two within one.
    t.send("commit b 60 20");
    for i in 0..60 {
        t.expect(&format!("@ack b {i}"));
    }
    // The last commits' pass.
    let deadline = Instant::now() + STEP;
    let events = loop {
        let events = t.events();
        let last_ack = events
            .iter()
            .find(|e| matches!(e, Event::Said(s, _) if s == "@ack b 59"))
            .map(Event::at);
        let last_msync = events
            .iter()
            .rev()
            .find(|e| e.is_sync("msync"))
            .map(Event::at);
        if let (Some(a), Some(m)) = (last_ack, last_msync) {
            if m > a {
                break events;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no msync after the last commit: {events:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let times: Vec<f64> = events
        .iter()
        .filter(|e| e.is_sync("msync"))
        .map(Event::at)
        .collect();
    for pair in times.windows(2) {
        assert!(
            pair[1] - pair[0] >= p * 0.95,
            "two msync calls {:.3} s apart, period {p} s: {times:?}",
            pair[1] - pair[0]
        );
    }
    let first_b = events
        .iter()
        .find(|e| matches!(e, Event::Said(s, _) if s == "@ack b 0"))
        .unwrap()
        .at();
    let during: Vec<f64> = times.iter().copied().filter(|&t| t > first_b).collect();
    assert!(
        during.len() >= 3,
        "commits spread over {:.1} s were synced only {} times: {times:?}",
        times.last().unwrap() - first_b,
        during.len()
    );

    // Closing: the thread ends; nothing was dirtied since the last pass, so no last msync.
    let synced = times.len();
    t.send("close");
    t.expect("@closed");
    t.expect_threads(0);
    let events = t.finish();
    let after = events.iter().filter(|e| e.is_sync("msync")).count();
    assert_eq!(
        after, synced,
        "a pass synced with nothing dirty: {events:?}"
    );
    assert!(
        events
            .iter()
            .all(|e| !e.is_sync("fdatasync") && !e.is_sync("fsync")),
        "Periodic used fsync or fdatasync: {events:?}"
    );
}

#[test]
fn periodic_closing_runs_a_last_pass_for_what_is_dirty() {
    // A period far longer than the test: only the pass at close can sync the commit.
    let dir = tempfile::tempdir().unwrap();
    let mut t = Traced::start(dir.path(), "periodic:3600000");
    t.send("commit a 1 0");
    t.expect("@ack a 0");
    let events = t.events();
    assert_eq!(
        syncs(&events),
        Vec::<&Event>::new(),
        "synced before the period"
    );
    t.send("close");
    t.expect("@closed");
    let events = t.finish();
    let closed = events
        .iter()
        .find(|e| matches!(e, Event::Said(s, _) if s == "@closed"))
        .unwrap()
        .at();
    let msyncs: Vec<f64> = events
        .iter()
        .filter(|e| e.is_sync("msync"))
        .map(Event::at)
        .collect();
    assert_eq!(msyncs.len(), 1, "{events:?}");
    assert!(
        msyncs[0] < closed,
        "the last pass ran after close returned: {events:?}"
    );
}

#[test]
fn a_periodic_thread_runs_only_while_the_store_is_open() {
    // In this process: clones share one thread, which stops with the last of them.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let named = |tid: &std::fs::DirEntry| {
        std::fs::read_to_string(tid.path().join("comm")).is_ok_and(|c| c.trim() == SYNC_THREAD)
    };
    let ours = || -> Vec<String> {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(Result::ok)
            .filter(named)
            .map(|t| t.file_name().to_string_lossy().into_owned())
            .collect()
    };
    let before = ours();
    let store = Store::open_with(
        &path,
        options().durability(Durability::Periodic(Duration::from_millis(5))),
    )
    .unwrap();
    let clone = store.clone();
    // The thread names itself once it runs.
    let deadline = Instant::now() + STEP;
    let started = loop {
        let started: Vec<String> = ours().into_iter().filter(|t| !before.contains(t)).collect();
        if !started.is_empty() || Instant::now() > deadline {
            break started;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(started.len(), 1, "one thread per opened store");
    drop(store);
    assert!(
        ours().contains(&started[0]),
        "stopped while a clone is alive"
    );
    drop(clone);
    // A joined thread may linger in /proc for a moment.
    let deadline = Instant::now() + STEP;
    while ours().contains(&started[0]) {
        assert!(
            Instant::now() < deadline,
            "the sync thread outlived the store"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_periodic_period_below_a_millisecond_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let err = Store::open_with(
        dir.path().join("store"),
        options().durability(Durability::Periodic(Duration::ZERO)),
    )
    .unwrap_err();
    assert!(err.to_string().contains("at least"), "{err}");
}
