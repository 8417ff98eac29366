//! End to end: a tower-sessions application (log in, count, log out), written as any
//! tower-sessions application is, with the adapter as its store and the `LeaseLayer` around
//! tower-sessions' layer, runs as three real server processes over one store file behind a real
//! nginx (round robin). 64 connections increment one session's counter at once: every successful
//! increment is in the final count.
//!
//! The servers are this test binary re-executed with `MMAP_TS_NGINX_CHILD` set to the store path;
//! they run `server_process_entry`, which does nothing in a normal test run.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use axum::extract::Path as UrlPath;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use mmap_session_tower_sessions::store::{Options, Store};
use mmap_session_tower_sessions::{LeaseLayer, MmapStore};
use tower_sessions::{Expiry, Session, SessionManagerLayer};

const CHILD_ENV: &str = "MMAP_TS_NGINX_CHILD";
/// Set (to anything) in a server that runs without the `LeaseLayer`.
const PLAIN_ENV: &str = "MMAP_TS_NGINX_PLAIN";
/// Concurrent connections, all on one session.
const CONNECTIONS: usize = 64;
/// Increments each connection sends, one after the other.
const PER_CONNECTION: usize = 25;
/// Bound of every wait of the test.
const LIMIT: Duration = Duration::from_secs(60);

// ---- The application, as a tower-sessions application is written ----

const USER: &str = "user";
const COUNT: &str = "count";

fn failed(error: tower_sessions::session::Error) -> StatusCode {
    tracing::error!(%error, "session error");
    StatusCode::INTERNAL_SERVER_ERROR
}

/// Logs `user` in: a fresh session id (against fixation), then the user's name.
async fn login(session: Session, UrlPath(user): UrlPath<String>) -> Result<String, StatusCode> {
    session.cycle_id().await.map_err(failed)?;
    session.insert(USER, &user).await.map_err(failed)?;
    Ok(format!("welcome {user}"))
}

/// Adds one to the logged-in user's counter and answers the new count.
async fn increment(session: Session) -> Result<String, StatusCode> {
    let user: Option<String> = session.get(USER).await.map_err(failed)?;
    if user.is_none() {
        return Err(StatusCode::UNAUTHORIZED);
    }
    let count: u64 = session.get(COUNT).await.map_err(failed)?.unwrap_or(0) + 1;
    session.insert(COUNT, count).await.map_err(failed)?;
    Ok(count.to_string())
}

/// The logged-in user's counter.
async fn count(session: Session) -> Result<String, StatusCode> {
    let user: Option<String> = session.get(USER).await.map_err(failed)?;
    if user.is_none() {
        return Err(StatusCode::UNAUTHORIZED);
    }
    let count: u64 = session.get(COUNT).await.map_err(failed)?.unwrap_or(0);
    Ok(count.to_string())
}

/// Ends the session.
async fn logout(session: Session) -> Result<&'static str, StatusCode> {
    session.flush().await.map_err(failed)?;
    Ok("bye")
}

fn application(store: MmapStore, leased: bool) -> Router {
    let router = Router::new()
        .route("/login/{user}", get(login))
        .route("/increment", get(increment))
        .route("/count", get(count))
        .route("/logout", get(logout))
        .route("/health", get(|| async { "ok" }))
        .layer(
            SessionManagerLayer::new(store)
                .with_secure(false)
                .with_expiry(Expiry::OnInactivity(time::Duration::hours(1))),
        );
    if leased {
        router.layer(LeaseLayer::new())
    } else {
        router
    }
}

/// The server process: serves the application on a free port of 127.0.0.1, prints `@port <n>`,
/// and runs until its standard input closes.
#[test]
fn server_process_entry() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let leased = std::env::var_os(PLAIN_ENV).is_none();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let store = Store::open_with(&path, Options::new().max_sessions(4096)).unwrap();
        let app = application(MmapStore::new(store), leased);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("@port {}", listener.local_addr().unwrap().port());
        let stdin_closed = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        });
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stdin_closed.await;
            })
            .await
            .unwrap();
    });
}

// ---- Processes ----

/// A server process; killed when dropped.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(store: &Path, leased: bool) -> Server {
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .args([
                "--exact",
                "server_process_entry",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_ENV, store)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if !leased {
            command.env(PLAIN_ENV, "1");
        }
        let mut child = command.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        // Reads to the end, so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some((_, ours)) = line.split_once("@port ") {
                    let _ = tx.send(ours.trim().to_owned());
                }
            }
        });
        let mut server = Server { child, port: 0 };
        let port = rx
            .recv_timeout(LIMIT)
            .expect("the server process did not print its port in time");
        server.port = port.parse().unwrap();
        server
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nginx as the current user, with its own prefix directory, in front of `ports` (round robin,
/// the configuration the workspace's demo ships). Stopped with its workers when dropped.
struct Nginx {
    child: Child,
    port: u16,
}

const NGINX_TEMPLATE: &str = include_str!("../../../examples/nginx/nginx.conf.template");

impl Nginx {
    fn start(dir: &Path, ports: &[u16]) -> Nginx {
        let nginx = nginx_program();
        let prefix = dir.join("nginx");
        std::fs::create_dir_all(&prefix).unwrap();
        let port = free_port();
        let servers: String = ports
            .iter()
            .map(|port| format!("        server 127.0.0.1:{port} max_fails=0;\n"))
            .collect();
        let root = nix::unistd::geteuid().is_root();
        let config = NGINX_TEMPLATE
            .replace("@USER@", if root { "user root;" } else { "" })
            .replace("@PREFIX@", &prefix.display().to_string())
            .replace("@LISTEN@", &format!("127.0.0.1:{port}"))
            .replace("@SERVERS@", &servers);
        let config_path = prefix.join("nginx.conf");
        std::fs::write(&config_path, config).unwrap();
        let child = Command::new(nginx)
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&config_path)
            .arg("-e")
            .arg(prefix.join("error.log"))
            // A group of its own, so that its workers are stopped with it.
            .process_group(0)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        Nginx { child, port }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// The nginx binary: `$NGINX`, or `nginx` in PATH or the sbin directories (`tests/run.sh`
/// installs it).
fn nginx_program() -> PathBuf {
    if let Some(path) = std::env::var_os("NGINX") {
        return PathBuf::from(path);
    }
    let paths = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&paths)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join("nginx"))
        .find(|path| path.is_file())
        .expect("nginx is required by this test: run tests/run.sh, which installs it")
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

// ---- The test ----

/// GETs `url` with `cookie`; returns the status, the body and the session cookie it sets.
async fn http_get(
    client: &reqwest::Client,
    url: &str,
    cookie: Option<&str>,
) -> (StatusCode, String, Option<String>) {
    let mut request = client.get(url);
    if let Some(cookie) = cookie {
        request = request.header(reqwest::header::COOKIE, cookie);
    }
    let response = request.send().await.unwrap();
    let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
    let set_cookie = response
        .headers()
        .get(reqwest::header::SET_COOKIE)
        .map(|value| {
            let value = value.to_str().unwrap();
            value.split(';').next().unwrap().trim().to_owned()
        });
    (status, response.text().await.unwrap(), set_cookie)
}

/// Runs the scenario with three servers (with or without the `LeaseLayer`) behind nginx; returns
/// (successful increments, final count, statuses of the failed ones).
async fn hammer_one_session(leased: bool) -> (u64, u64, Vec<StatusCode>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sessions");
    let servers: Vec<Server> = (0..3).map(|_| Server::start(&path, leased)).collect();
    let ports: Vec<u16> = servers.iter().map(|server| server.port).collect();
    let nginx = Nginx::start(dir.path(), &ports);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(CONNECTIONS)
        .build()
        .unwrap();

    let deadline = Instant::now() + LIMIT;
    let health = nginx.url("/health");
    loop {
        match client.get(&health).send().await {
            Ok(response) if response.status().is_success() => break,
            _ if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!("nginx did not answer in time: {other:?}"),
        }
    }

    let (status, body, cookie) = http_get(&client, &nginx.url("/login/ada"), None).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "welcome ada"));
    let cookie = cookie.expect("login sets the session cookie");

    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let client = client.clone();
            let url = nginx.url("/increment");
            let cookie = cookie.clone();
            tokio::spawn(async move {
                let mut done = 0u64;
                let mut failures = Vec::new();
                for _ in 0..PER_CONNECTION {
                    let (status, _, _) = http_get(&client, &url, Some(&cookie)).await;
                    if status == StatusCode::OK {
                        done += 1;
                    } else {
                        failures.push(status);
                    }
                }
                (done, failures)
            })
        })
        .collect();
    let mut succeeded = 0;
    let mut failures = Vec::new();
    for task in tasks {
        let (done, failed) = task.await.unwrap();
        succeeded += done;
        failures.extend(failed);
    }

    let (status, body, _) = http_get(&client, &nginx.url("/count"), Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK);
    let final_count: u64 = body.parse().unwrap();

    // Logging out ends the session on every process.
    let (status, _, removal) = http_get(&client, &nginx.url("/logout"), Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(removal.is_some(), "logout removes the cookie");
    for _ in 0..3 {
        let (status, _, _) = http_get(&client, &nginx.url("/count"), Some(&cookie)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "the session is gone");
    }

    drop(nginx);
    drop(servers);
    let store = Store::open(&path).unwrap();
    assert!(store.entries().iter().all(|entry| entry.lease.is_none()));
    assert!(store.verify().is_clean());
    (succeeded, final_count, failures)
}

#[test]
fn sixty_four_connections_on_one_session_through_nginx_lose_no_update() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (succeeded, final_count, failures) = runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(300), hammer_one_session(true))
            .await
            .expect("the test did not finish in 300 s")
    });
    eprintln!("{succeeded} increments succeeded, final count {final_count}, failures {failures:?}");
    assert!(
        succeeded > 0,
        "no increment succeeded; failures: {failures:?}"
    );
    assert_eq!(
        final_count, succeeded,
        "every successful increment is counted, none lost (failures: {failures:?})"
    );
}
