//! The axum application the tests serve, and helpers shared by the test files.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code, unreachable_pub)]

use std::path::Path;
use std::time::{Duration, Instant};

use axum::extract::Path as UrlPath;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use mmap_session_tower_sessions::store::{Options, Store};
use mmap_session_tower_sessions::MmapStore;
use tower_sessions::{Expiry, Session, SessionManagerLayer};

/// Opens (or creates) a small store file at `path`.
pub fn open_store(path: &Path) -> Store {
    Store::open_with(
        path,
        Options::new().max_sessions(4096).max_file_size(64 << 20),
    )
    .unwrap()
}

/// A session error as the handler's answer: a plain 500.
fn failed(error: tower_sessions::session::Error) -> StatusCode {
    eprintln!("session error: {error}");
    StatusCode::INTERNAL_SERVER_ERROR
}

async fn set(
    session: Session,
    UrlPath((key, value)): UrlPath<(String, String)>,
) -> Result<&'static str, StatusCode> {
    session.insert(&key, value).await.map_err(failed)?;
    Ok("set")
}

async fn read(session: Session, UrlPath(key): UrlPath<String>) -> Result<String, StatusCode> {
    let value: Option<String> = session.get(&key).await.map_err(failed)?;
    Ok(value.unwrap_or_else(|| "none".to_owned()))
}

async fn remove(
    session: Session,
    UrlPath(key): UrlPath<String>,
) -> Result<&'static str, StatusCode> {
    session.remove::<String>(&key).await.map_err(failed)?;
    Ok("removed")
}

async fn cycle(session: Session) -> Result<&'static str, StatusCode> {
    session.cycle_id().await.map_err(failed)?;
    Ok("cycled")
}

async fn flush(session: Session) -> Result<&'static str, StatusCode> {
    session.flush().await.map_err(failed)?;
    Ok("flushed")
}

/// Adds one to the session's counter; answers `<pid> <count>`, so a client sees which process
/// served it.
async fn increment(session: Session) -> Result<String, StatusCode> {
    let count: u64 = session.get("count").await.map_err(failed)?.unwrap_or(0) + 1;
    session.insert("count", count).await.map_err(failed)?;
    Ok(format!("{} {count}", std::process::id()))
}

/// Answers `<pid> <count>` without changing the session.
async fn count(session: Session) -> Result<String, StatusCode> {
    let count: u64 = session.get("count").await.map_err(failed)?.unwrap_or(0);
    Ok(format!("{} {count}", std::process::id()))
}

/// The application: tower-sessions' layer over the adapter, with the given expiry policy.
pub fn app(store: MmapStore, expiry: Expiry) -> Router {
    let layer = SessionManagerLayer::new(store)
        .with_secure(false)
        .with_expiry(expiry);
    Router::new()
        .route("/set/{key}/{value}", get(set))
        .route("/get/{key}", get(read))
        .route("/remove/{key}", get(remove))
        .route("/cycle", get(cycle))
        .route("/flush", get(flush))
        .route("/increment", get(increment))
        .route("/count", get(count))
        .layer(layer)
}

/// The expiry the tests use unless they test expiry: long enough never to pass during a test.
pub fn an_hour() -> Expiry {
    Expiry::OnInactivity(time::Duration::hours(1))
}

/// Waits until `done` holds, checking every 10 ms; panics naming `what` after `limit`.
pub fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The `name=value` part of a `Set-Cookie` header value.
pub fn cookie_pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().trim().to_owned()
}

/// The session id a `name=value` cookie pair carries.
pub fn id_of(pair: &str) -> tower_sessions::session::Id {
    pair.split_once('=').unwrap().1.parse().unwrap()
}
