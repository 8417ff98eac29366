//! Two real server processes over one store file: a session started on one is read and updated
//! on the other, and the update is seen again on the first.
//!
//! The servers are this test binary re-executed with `MMAP_TS_SERVER` set to the store path;
//! they run `server_process_entry`, which does nothing in a normal test run.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{an_hour, app, cookie_pair, open_store};
use mmap_session_tower_sessions::MmapStore;

const SERVER_ENV: &str = "MMAP_TS_SERVER";

/// The server's side: serves the test app on a free port of 127.0.0.1, prints `@port <n>`, and
/// runs until its standard input closes (or it is killed).
#[test]
fn server_process_entry() {
    let Ok(path) = std::env::var(SERVER_ENV) else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let store = MmapStore::new(open_store(Path::new(&path)));
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
    });
}

/// A running server process; killed when dropped, so a failing test leaves none behind.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(store: &Path) -> Server {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "server_process_entry",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(SERVER_ENV, store)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        // Reads to the end, so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest may print its own text on the same line before ours.
                if let Some((_, port)) = line.split_once("@port ") {
                    let _ = tx.send(port.trim().parse::<u16>().unwrap());
                }
            }
        });
        let mut server = Server { child, port: 0 };
        server.port = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the server process did not report its port within 60 s");
        server
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
fn a_session_started_on_one_process_is_updated_on_another_and_seen_again_on_the_first() {
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
