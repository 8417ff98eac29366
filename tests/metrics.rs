//! The metrics an operator scrapes: three copies of the `shop` example behind nginx serve real
//! traffic, then each copy's `/metrics` (Prometheus text format) is read directly and the sums
//! over the three are checked against what the test did. On a file, the test also holds a
//! session's lease itself past the lease timeout (a stalled holder) and has a child process
//! that holds one killed (a dead holder), and checks the store's take-over counters and gauges.
//! Each test runs on a file and on Redis.
//!
//! They need nginx and redis-server (`tests/run.sh` installs them).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write as _};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{bounded, cookie_pair, session_set_cookie, Cluster, Sessions};
use mmap_session::store::Store;
use mmap_session::SessionId;
use reqwest::header::COOKIE;
use reqwest::StatusCode;

const COPIES: usize = 3;
const USERS: usize = 6;
const ADDS_PER_USER: usize = 4;
const LOGOUTS: usize = 2;
/// The copies' lease timeout: how long the test's stalled lease lasts before a request takes it.
const LEASE_TIMEOUT_MS: u64 = 300;

/// The child mode of this test binary: holds a session's lease until it is killed.
const HOLD_ENV: &str = "METRICS_TEST_HOLD_LEASE";

/// One scrape: `name{labels}` -> value.
type Scrape = BTreeMap<String, f64>;

fn parse(text: &str) -> Scrape {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("a sample line");
            (series.to_owned(), value.parse().expect("a sample value"))
        })
        .collect()
}

async fn scrape(cluster: &Cluster, index: usize) -> (String, Scrape) {
    let response = cluster
        .client
        .get(cluster.server_url(index, "/metrics"))
        .send()
        .await
        .expect("scrape /metrics");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        session_set_cookie(&response).is_none(),
        "a scrape set a session cookie"
    );
    let text = response.text().await.expect("the scrape's body");
    let parsed = parse(&text);
    (text, parsed)
}

/// The sum of one series over every copy (absent counts as 0).
fn total(scrapes: &[Scrape], series: &str) -> f64 {
    scrapes.iter().filter_map(|s| s.get(series)).sum()
}

fn outcome(scrapes: &[Scrape], outcome: &str) -> f64 {
    total(
        scrapes,
        &format!("mmap_session_requests_total{{outcome=\"{outcome}\"}}"),
    )
}

/// A signed-in shopper: the `name=value` pair of its session cookie.
struct Shopper {
    cookie: String,
}

impl Shopper {
    fn id(&self) -> SessionId {
        let value = self.cookie.split_once('=').expect("name=value").1;
        SessionId::decode(value).expect("a session id")
    }
}

async fn post(
    cluster: &Cluster,
    path: &str,
    cookie: Option<&str>,
    form: &[(&str, &str)],
) -> reqwest::Response {
    let mut request = cluster.client.post(cluster.url(path)).form(form);
    if let Some(cookie) = cookie {
        request = request.header(COOKIE, cookie);
    }
    let response = request.send().await.expect("send the request");
    assert_eq!(response.status(), StatusCode::SEE_OTHER, "POST {path}");
    response
}

async fn get_home(cluster: &Cluster, cookie: Option<&str>) {
    let mut request = cluster.client.get(cluster.url("/"));
    if let Some(cookie) = cookie {
        request = request.header(COOKIE, cookie);
    }
    let response = request.send().await.expect("send the request");
    assert_eq!(response.status(), StatusCode::OK, "GET /");
    assert!(
        session_set_cookie(&response).is_none(),
        "an unchanged session was given a cookie"
    );
}

async fn sign_in(cluster: &Cluster, name: &str) -> Shopper {
    let response = post(cluster, "/login", None, &[("username", name)]).await;
    let set_cookie = session_set_cookie(&response).expect("signing in sets the session cookie");
    Shopper {
        cookie: cookie_pair(&set_cookie),
    }
}

async fn add_to_cart(cluster: &Cluster, shopper: &Shopper) {
    post(
        cluster,
        "/cart/add",
        Some(&shopper.cookie),
        &[("item", "mug")],
    )
    .await;
}

/// A child process (this test binary again, in [`HOLD_ENV`] mode) that holds `id`'s lease in the
/// store at `store` until it is killed. Returns once it holds it.
async fn spawn_lease_holder(store: &std::path::Path, id: SessionId) -> std::process::Child {
    let store = store.to_owned();
    tokio::task::spawn_blocking(move || spawn_lease_holder_blocking(&store, id))
        .await
        .expect("start the lease holder")
}

fn spawn_lease_holder_blocking(store: &std::path::Path, id: SessionId) -> std::process::Child {
    let mut child = Command::new(std::env::current_exe().expect("the test binary"))
        .args([
            "--exact",
            "hold_a_lease_until_killed",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(HOLD_ENV, format!("{}\n{}", store.display(), id.encode()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the lease holder");
    let stdout = child.stdout.take().expect("the holder's stdout");
    let held = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        // The test harness prints its own `test … ` in front of the child's line.
        .any(|line| line.ends_with("lease held"));
    assert!(held, "the lease holder exited without taking the lease");
    child
}

/// Not a test of its own: the body of the child process [`spawn_lease_holder`] starts. Without
/// [`HOLD_ENV`] it does nothing.
#[test]
fn hold_a_lease_until_killed() {
    let Ok(task) = std::env::var(HOLD_ENV) else {
        return;
    };
    let (path, id) = task.split_once('\n').expect("path and id");
    let store = Store::open(path).expect("open the store");
    let id = SessionId::decode(id).expect("a session id");
    let lease = store
        .lease_blocking(id.as_bytes(), Instant::now() + Duration::from_secs(10))
        .expect("take the lease");
    println!("lease held");
    std::io::stdout().flush().expect("flush");
    // Holds it until killed (or until the parent goes away and closes our standard input).
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    drop(lease);
}

async fn scrapes_after_traffic(sessions: Sessions) {
    let lease_timeout = LEASE_TIMEOUT_MS.to_string();
    let cluster = Cluster::start_on(
        sessions,
        "shop",
        COPIES,
        &["--lease-timeout-ms", &lease_timeout],
    )
    .await;
    let mut shoppers = Vec::new();
    for user in 0..USERS {
        shoppers.push(sign_in(&cluster, &format!("user{user}")).await);
    }
    for shopper in &shoppers {
        for _ in 0..ADDS_PER_USER {
            add_to_cart(&cluster, shopper).await;
        }
        get_home(&cluster, Some(&shopper.cookie)).await;
    }
    for shopper in &shoppers[..LOGOUTS] {
        post(&cluster, "/logout", Some(&shopper.cookie), &[]).await;
    }
    // A visitor without a cookie: the page reads an empty session, nothing is stored.
    get_home(&cluster, None).await;

    let mut expected_saved = USERS * ADDS_PER_USER;
    let mut takeovers = None;
    if sessions == Sessions::File {
        let store = Store::open(cluster.store_path()).expect("open the session file");
        // A stalled holder: this process holds a session's lease past the copies' lease
        // timeout; the request waits that long, takes the lease over and saves.
        let stalled = &shoppers[LOGOUTS];
        let mut lease = store
            .lease(
                stalled.id().as_bytes(),
                Instant::now() + Duration::from_secs(5),
            )
            .await
            .expect("take the session's lease");
        let started = Instant::now();
        add_to_cart(&cluster, stalled).await;
        assert!(started.elapsed() >= Duration::from_millis(LEASE_TIMEOUT_MS));
        assert!(
            lease.commit(b"late", std::time::SystemTime::now()).is_err(),
            "the stalled holder's late commit was accepted after the take-over"
        );
        drop(lease);
        // A dead holder: a child process holds another session's lease and is killed.
        let dead = &shoppers[LOGOUTS + 1];
        let mut holder = spawn_lease_holder(cluster.store_path(), dead.id()).await;
        holder.kill().expect("kill the lease holder");
        holder.wait().expect("reap the lease holder");
        add_to_cart(&cluster, dead).await;
        expected_saved += 2;
        takeovers = Some(store);
    }

    let expected_live = USERS; // four sessions, and the two signed out for a minute as markers
    let deadline = Instant::now() + Duration::from_secs(20);
    let (texts, scrapes) = loop {
        let mut texts = Vec::new();
        let mut scrapes = Vec::new();
        for index in 0..COPIES {
            let (text, parsed) = scrape(&cluster, index).await;
            texts.push(text);
            scrapes.push(parsed);
        }
        // The gauges are read from the file every second: wait until every copy has.
        let gauges_current = sessions == Sessions::Redis
            || scrapes.iter().all(|s| {
                s.get("mmap_session_store_live_sessions") == Some(&(expected_live as f64))
            });
        if gauges_current || Instant::now() > deadline {
            break (texts, scrapes);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // Every request that touched its session, once, by outcome.
    assert_eq!(outcome(&scrapes, "new"), USERS as f64, "{texts:#?}");
    assert_eq!(outcome(&scrapes, "saved"), expected_saved as f64);
    assert_eq!(outcome(&scrapes, "unchanged"), USERS as f64);
    assert_eq!(outcome(&scrapes, "removed"), LOGOUTS as f64);
    assert_eq!(outcome(&scrapes, "empty"), 1.0);
    assert_eq!(outcome(&scrapes, "refused"), 0.0);
    assert_eq!(outcome(&scrapes, "loaded"), 0.0);
    // Each request that carried a live session's cookie took its lease once.
    let leased = expected_saved + USERS + LOGOUTS;
    assert_eq!(
        total(&scrapes, "mmap_session_lease_wait_seconds_count"),
        leased as f64
    );
    assert_eq!(total(&scrapes, "mmap_session_lease_timeouts_total"), 0.0);
    // Every session written was encoded once: the sign-ins and the saves.
    assert_eq!(
        total(&scrapes, "mmap_session_encoded_size_bytes_count"),
        (USERS + expected_saved) as f64
    );
    assert_eq!(total(&scrapes, "mmap_session_undecodable_total"), 0.0);

    match takeovers {
        Some(store) => {
            // The stalled holder's take-over waited the lease timeout: one wait above 0.1 s.
            assert_eq!(
                total(
                    &scrapes,
                    "mmap_session_lease_wait_seconds_bucket{le=\"0.1\"}"
                ),
                (leased - 1) as f64
            );
            let reason = |r: &str| {
                total(
                    &scrapes,
                    &format!("mmap_session_takeovers_total{{reason=\"{r}\"}}"),
                )
            };
            assert_eq!(reason("holder_stalled"), 1.0, "{texts:#?}");
            assert_eq!(reason("holder_died"), 1.0, "{texts:#?}");
            assert_eq!(total(&scrapes, "mmap_session_evictions_total"), 0.0);
            assert_eq!(total(&scrapes, "mmap_session_expired_reclaimed_total"), 0.0);
            assert_eq!(total(&scrapes, "mmap_session_checksum_failures_total"), 0.0);
            let stats = store.stats();
            for scrape in &scrapes {
                let gauge = |name: &str| scrape.get(name).copied();
                assert_eq!(
                    gauge("mmap_session_store_live_sessions"),
                    Some(expected_live as f64),
                    "{texts:#?}"
                );
                assert_eq!(
                    gauge("mmap_session_store_used_bytes"),
                    Some(stats.bytes_used as f64)
                );
                assert_eq!(
                    gauge("mmap_session_store_file_bytes"),
                    Some(stats.bytes_reserved as f64)
                );
                assert_eq!(
                    gauge("mmap_session_store_capacity_bytes"),
                    Some(stats.capacity_bytes as f64)
                );
            }
        }
        None => {
            // Redis: no file, no gauges, nothing taken over.
            for text in &texts {
                assert!(!text.contains("mmap_session_store_"), "{text}");
            }
            assert_eq!(
                total(
                    &scrapes,
                    "mmap_session_takeovers_total{reason=\"lease_expired\"}"
                ),
                0.0
            );
        }
    }
    // No label names a session: neither an id nor its short hash appears in any scrape.
    for shopper in &shoppers {
        let id = shopper.id();
        for text in &texts {
            assert!(!text.contains(&id.encode()), "a scrape holds a session id");
            assert!(
                !text.contains(&id.short_hash().to_string()),
                "a scrape holds a session's short hash"
            );
        }
    }
}

macro_rules! every_backend {
    ($($name:ident),* $(,)?) => {
        mod file {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    bounded(Duration::from_secs(120), super::$name(Sessions::File)).await;
                }
            )*
        }
        mod redis {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    bounded(Duration::from_secs(120), super::$name(Sessions::Redis)).await;
                }
            )*
        }
    };
}

every_backend!(scrapes_after_traffic);
