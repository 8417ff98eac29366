//! Driving real processes to an exact step of the store's protocols.
//!
//! The `fault-child` binary of this crate opens a store and runs commands read from its
//! standard input, one per line, answering each on its standard output. `arm <failpoint>` makes
//! the next pass through that named step (see `failpoint!` in `mmap-session-store`) print
//! `@at <failpoint>` and wait there for a line on standard input: the test then kills the child
//! (SIGKILL) or lets other processes work past the lease timeout and resumes it. No sleeps and
//! no debugger: the child stands still at the step until the test says otherwise.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use mmap_session_store::{Options, Store};

/// How long a test waits for any one answer of a child before it gives up (a hung protocol
/// fails the test instead of hanging the suite).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);

/// The largest size of the tests' store files: a header and index, and three data chunks.
pub const SMALL_FILE: u64 = 4 << 20;

/// The options every process of a test opens its store with. `lease_timeout` differs: a
/// process that must prove a dead holder is detected at once uses a long one, a process that
/// takes over a stalled holder a short one.
pub fn options(lease_timeout: Duration) -> Options {
    Options::new()
        .max_sessions(256)
        .max_file_size(SMALL_FILE)
        .max_value_len(512 << 10)
        .lease_timeout(lease_timeout)
}

/// The `fault-child` binary, which cargo builds next to the test binaries' directory.
fn child_exe() -> std::path::PathBuf {
    let me = std::env::current_exe().expect("the test binary's path");
    let profile_dir = me
        .parent()
        .and_then(|deps| deps.parent())
        .expect("tests run from target/<profile>/deps");
    profile_dir.join("fault-child")
}

/// A child process running `fault-child`.
pub struct Child {
    process: std::process::Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Child {
    /// Starts a child and opens `path` in it with `options(lease_timeout)`.
    pub fn open(path: &Path, lease_timeout: Duration) -> Child {
        let mut child = Child::spawn();
        child.ask(
            &format!("open {} {}", path.display(), lease_timeout.as_millis()),
            "@ok",
        );
        child
    }

    /// Starts a child that has opened nothing yet.
    pub fn spawn() -> Child {
        let starting = STARTING.read().unwrap_or_else(|p| p.into_inner());
        let mut process = Command::new(child_exe())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start fault-child");
        let stdin = process.stdin.take().unwrap();
        let stdout = process.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut child = Child {
            process,
            stdin,
            lines,
        };
        // `spawn` returns once the exec has begun, but the kernel closes the copied files a
        // little later in it: only a word from the running child proves they are gone.
        child.expect("@ready");
        drop(starting);
        child
    }

    /// Sends one command line.
    pub fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("write to child");
        self.stdin.flush().expect("flush child stdin");
    }

    /// Waits for the next answer; panics if it does not start with `prefix`.
    pub fn expect(&mut self, prefix: &str) -> String {
        let line = self
            .lines
            .recv_timeout(ANSWER_TIMEOUT)
            .unwrap_or_else(|e| panic!("no answer from the child while expecting {prefix}: {e}"));
        assert!(
            line.starts_with(prefix),
            "child answered {line:?}, expected {prefix}"
        );
        line
    }

    /// The next answer, whatever it is.
    pub fn answer(&mut self) -> String {
        self.lines
            .recv_timeout(ANSWER_TIMEOUT)
            .unwrap_or_else(|e| panic!("no answer from the child: {e}"))
    }

    /// Sends a command and expects an answer starting with `prefix`.
    pub fn ask(&mut self, line: &str, prefix: &str) -> String {
        self.send(line);
        self.expect(prefix)
    }

    /// Arms `failpoint`: the next pass through it stops the child there.
    pub fn arm(&mut self, failpoint: &str) {
        self.ask(&format!("arm {failpoint}"), "@armed");
    }

    /// Waits until the child stands at `failpoint`.
    pub fn wait_at(&mut self, failpoint: &str) {
        let line = self.expect("@at ");
        assert_eq!(line, format!("@at {failpoint}"));
    }

    /// Lets a child that stands at a failpoint go on.
    pub fn resume(&mut self) {
        self.send("resume");
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill(mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }

    /// Asks the child to exit cleanly (closing its store) and waits for it.
    pub fn exit(mut self) {
        self.send("exit");
        let _ = self.process.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// An expiry an hour from now.
pub fn later() -> SystemTime {
    SystemTime::now() + Duration::from_secs(3600)
}

/// Leases `key` (waiting at most `wait`), checks that its value is one of `allowed` (`None`:
/// no record), and commits `value`. Returns what it read.
pub fn lease_and_commit(
    store: &Store,
    key: &str,
    allowed: &[Option<&str>],
    value: &str,
    wait: Duration,
) -> Option<String> {
    let mut lease = store
        .lease_blocking(key.as_bytes(), Instant::now() + wait)
        .unwrap_or_else(|e| panic!("lease {key}: {e}"));
    let read = lease.read().map(|r| unpad(&r.value));
    assert!(
        allowed.contains(&read.as_deref()),
        "{key} read {read:?} under its lease; allowed {allowed:?}"
    );
    lease
        .commit(value.as_bytes(), later())
        .unwrap_or_else(|e| panic!("commit {key}: {e}"));
    read
}

/// The value of `key` as `store` reads it without a lease.
pub fn value(store: &Store, key: &str) -> Option<String> {
    store.get(key.as_bytes()).map(|r| unpad(&r.value))
}

/// `text` followed by `|` and `pad` bytes of filler (to reach a size class).
pub fn padded(text: &str, pad: usize) -> String {
    if pad == 0 {
        return text.to_owned();
    }
    format!("{text}|{}", "x".repeat(pad))
}

/// The text of a value written by [`padded`].
pub fn unpad(value: &[u8]) -> String {
    let text = String::from_utf8_lossy(value);
    text.split('|').next().unwrap_or("").to_owned()
}

/// Held (shared) by every start of a child process. Between its fork and its exec a child has a
/// copy of every file descriptor of this process, and with them the store's OFD locks: a store
/// this process closed meanwhile still counts as open, so an open that should find the file
/// unused (and recover it) would find it in use. The exec drops those copies, and the child's
/// first line says it has run.
static STARTING: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Keeps this test process from starting a child process while the guard lives, so that a
/// store it has closed is really closed: take it before an open that must be alone (a solo
/// open, which recovers what dead processes left), or before a child opens a file this
/// process just closed and must find it unused. See `STARTING`.
pub fn no_child_starts() -> std::sync::RwLockWriteGuard<'static, ()> {
    STARTING.write().unwrap_or_else(|p| p.into_inner())
}

/// Failpoints are process-wide: a test that configures one stops the first thread of any test
/// that passes it. Every test of a binary that configures failpoints in its own process holds
/// this guard for its whole run.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Configures failpoint `name` (in this process) to stop the first thread that passes it: that
/// thread sends on the returned `at` channel and waits until the returned `go` sender says go
/// (or is dropped). Later passes go through.
pub fn stop_once(name: &str) -> (mpsc::Receiver<()>, mpsc::Sender<()>) {
    let (at_tx, at_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let at_tx = std::sync::Mutex::new(Some(at_tx));
    let go_rx = std::sync::Mutex::new(go_rx);
    fail::cfg_callback(name, move || {
        let Some(at) = at_tx.lock().unwrap().take() else {
            return;
        };
        let _ = at.send(());
        let _ = go_rx.lock().unwrap().recv();
    })
    .unwrap();
    (at_rx, go_tx)
}
