//! Real processes over one store file: a session started on one server process is read and
//! updated on another, and the update is seen again on the first; two processes creating
//! sessions with the same ids at once never share one.
//!
//! The children are this test binary re-executed with `MMAP_TS_CHILD` set to the store path and
//! `MMAP_TS_ROLE` to what they do; they run `child_process_entry`, which does nothing in a normal
//! test run.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write as _};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{an_hour, app, cookie_pair, open_store};
use mmap_session_tower_sessions::MmapStore;
use time::OffsetDateTime;
use tower_sessions::session::{Id, Record};
use tower_sessions::SessionStore;

const CHILD_ENV: &str = "MMAP_TS_CHILD";
const ROLE_ENV: &str = "MMAP_TS_ROLE";
/// How many sessions each creating child creates.
const CREATES: i128 = 200;

/// The child's side. Role `server`: serves the test app on a free port of 127.0.0.1, prints
/// `@port <n>`, and runs until its standard input closes. Role `create <name>`: prints `@ready`,
/// waits for a line on standard input, then creates sessions with the ids 1 to `CREATES`
/// (drawing other ids where those are taken), printing `@created <id>` for each.
#[test]
fn child_process_entry() {
    let (Ok(path), Ok(role)) = (std::env::var(CHILD_ENV), std::env::var(ROLE_ENV)) else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let store = MmapStore::new(open_store(Path::new(&path)));
    match role.split_once(' ') {
        None if role == "server" => runtime.block_on(serve(store)),
        Some(("create", name)) => runtime.block_on(create(store, name)),
        _ => panic!("unknown child role {role:?}"),
    }
}

async fn serve(store: MmapStore) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("@port {}", listener.local_addr().unwrap().port());
    let stdin_closed = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    });
    axum::serve(listener, app(store, an_hour()))
        .with_graceful_shutdown(async {
            let _ = stdin_closed.await;
        })
        .await
        .unwrap();
}

async fn create(store: MmapStore, name: &str) {
    println!("@ready");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    for n in 1..=CREATES {
        let mut record = Record {
            id: Id(n),
            data: HashMap::from([("by".to_owned(), serde_json::Value::from(name))]),
            expiry_date: OffsetDateTime::now_utc() + time::Duration::hours(1),
        };
        store.create(&mut record).await.unwrap();
        println!("@created {}", record.id.0);
    }
}

/// A child process; killed when dropped, so a failing test leaves none behind. Its output lines
/// that start with `@` (after whatever libtest prints on the same line) arrive on `lines`.
struct ChildProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl ChildProcess {
    fn start(store: &Path, role: &str) -> ChildProcess {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_process_entry",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_ENV, store)
            .env(ROLE_ENV, role)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        // Reads to the end, so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some((_, ours)) = line.split_once('@') {
                    let _ = tx.send(ours.trim().to_owned());
                }
            }
        });
        let stdin = child.stdin.take();
        ChildProcess {
            child,
            stdin,
            lines,
        }
    }

    /// The next `@` line, without the `@`; panics after `limit`.
    fn next_line(&self, limit: Duration) -> String {
        self.lines
            .recv_timeout(limit)
            .expect("the child process did not answer in time (or exited)")
    }

    /// Every remaining `@` line, until the child exits; panics if it takes longer than `limit`.
    fn rest(&self, limit: Duration) -> Vec<String> {
        let deadline = std::time::Instant::now() + limit;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => out.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => return out,
                Err(mpsc::RecvTimeoutError::Timeout) => panic!("the child process did not finish"),
            }
        }
    }

    fn say(&mut self, line: &str) {
        writeln!(self.stdin.as_mut().unwrap(), "{line}").unwrap();
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server process and the port it serves on.
struct Server {
    _process: ChildProcess,
    port: u16,
}

impl Server {
    fn start(store: &Path) -> Server {
        let process = ChildProcess::start(store, "server");
        let line = process.next_line(Duration::from_secs(60));
        let port = line.strip_prefix("port ").unwrap().parse().unwrap();
        Server {
            _process: process,
            port,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

/// GETs `url` with `cookie`; returns the body and the cookie the answer sets, if any.
async fn get(
    client: &reqwest::Client,
    url: &str,
    cookie: Option<&str>,
) -> (String, Option<String>) {
    let mut request = client.get(url);
    if let Some(cookie) = cookie {
        request = request.header(reqwest::header::COOKIE, cookie);
    }
    let response = request.send().await.unwrap();
    assert!(
        response.status().is_success(),
        "{url}: {}",
        response.status()
    );
    let set_cookie = response
        .headers()
        .get(reqwest::header::SET_COOKIE)
        .map(|value| cookie_pair(value.to_str().unwrap()));
    (response.text().await.unwrap(), set_cookie)
}

/// Splits an answer `<pid> <count>` of the test app.
fn pid_and_count(body: &str) -> (u32, u64) {
    let (pid, count) = body.split_once(' ').unwrap();
    (pid.parse().unwrap(), count.parse().unwrap())
}

#[test]
fn a_session_started_on_one_server_process_is_updated_on_another_and_seen_again_on_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sessions");
    let store = open_store(&path);
    let a = Server::start(&path);
    let b = Server::start(&path);

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();

        let (body, cookie) = get(&client, &a.url("/increment"), None).await;
        let cookie = cookie.expect("the new session's cookie");
        let (pid_a, count) = pid_and_count(&body);
        assert_eq!(count, 1);

        let (body, _) = get(&client, &b.url("/increment"), Some(&cookie)).await;
        let (pid_b, count) = pid_and_count(&body);
        assert_eq!(count, 2, "B sees A's session and adds to it");
        assert_ne!(pid_a, pid_b, "two processes served the requests");
        assert_ne!(pid_a, std::process::id());
        assert_ne!(pid_b, std::process::id());

        let (body, _) = get(&client, &a.url("/count"), Some(&cookie)).await;
        assert_eq!(pid_and_count(&body), (pid_a, 2), "A sees B's update");

        get(&client, &a.url("/set/user/ada"), Some(&cookie)).await;
        let (body, _) = get(&client, &b.url("/get/user"), Some(&cookie)).await;
        assert_eq!(body, "ada");
        let (body, _) = get(&client, &b.url("/count"), Some(&cookie)).await;
        assert_eq!(
            pid_and_count(&body),
            (pid_b, 2),
            "A's later save kept B's count"
        );
    });

    drop((a, b));
    assert_eq!(store.entries().len(), 1);
    let report = store.verify();
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn two_processes_creating_sessions_with_the_same_ids_at_once_never_share_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sessions");
    let store = open_store(&path);
    let mut children = [
        ChildProcess::start(&path, "create a"),
        ChildProcess::start(&path, "create b"),
    ];
    for child in &children {
        assert_eq!(child.next_line(Duration::from_secs(60)), "ready");
    }
    for child in &mut children {
        child.say("go");
    }

    let mut owner = HashMap::new();
    for (child, name) in children.iter().zip(["a", "b"]) {
        for line in child.rest(Duration::from_secs(60)) {
            let id: i128 = line.strip_prefix("created ").unwrap().parse().unwrap();
            assert!(
                owner.insert(id, name).is_none(),
                "id {id} was created twice"
            );
        }
    }

    assert_eq!(owner.len(), 2 * CREATES as usize, "every create got an id");
    let fixed: HashSet<i128> = (1..=CREATES).collect();
    let got_fixed = owner.keys().filter(|id| fixed.contains(id)).count();
    assert_eq!(
        got_fixed, CREATES as usize,
        "each fixed id went to one process"
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let adapter = MmapStore::new(store.clone());
    for (id, name) in owner {
        let record = runtime.block_on(adapter.load(&Id(id))).unwrap().unwrap();
        assert_eq!(
            record.data["by"], name,
            "id {id} holds its creator's record"
        );
    }
    assert!(store.verify().is_clean());
}
