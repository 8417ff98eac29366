//! `max_session_size` at the byte: the layer keeps the session's encoded size change by change, and
//! refuses a change only after counting the whole session exactly. This is the layer's own
//! bookkeeping, the same over every backend, so these tests use the file store only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant, SystemTime};

use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use common::{cookie_pair, send, text};
use mmap_session::store::Store;
use mmap_session::{Session, SessionError, SessionId, SessionLayer};
use tempfile::TempDir;

fn temp_store() -> (TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("sessions")).unwrap();
    (dir, store)
}

/// Whether an insert went through, as the handler saw it.
async fn tried(session: &Session, key: &str, value: serde_json::Value) -> &'static str {
    match session.insert_value(key, value).await {
        Ok(_) => "ok",
        Err(SessionError::TooLarge { .. }) => "too large",
        Err(other) => panic!("unexpected {other}"),
    }
}

/// Walks a session to exactly 120 encoded bytes through inserts, a removal and replacements, and
/// reports each step's outcome.
async fn to_the_limit(session: Session) -> Result<String, SessionError> {
    let mut steps = Vec::new();
    steps.push(tried(&session, "a", "x".repeat(40).into()).await);
    session.remove_value("a").await?;
    steps.push(tried(&session, "b", 1.into()).await);
    // {"d":{"b":1,"c":"<k>"}} is 20 + k bytes.
    steps.push(tried(&session, "c", "x".repeat(100).into()).await); // 120: fits
    steps.push(tried(&session, "d", 0.into()).await); // 126
    steps.push(tried(&session, "c", "x".repeat(101).into()).await); // 121
    steps.push(tried(&session, "c", "x".repeat(99).into()).await); // 119
    steps.push(tried(&session, "e", "".into()).await); // 119 + 7
    Ok(steps.join(","))
}

async fn add_m(session: Session) -> Result<String, SessionError> {
    Ok(tried(&session, "m", 7.into()).await.to_owned())
}

fn app(layer: SessionLayer) -> Router {
    Router::new()
        .route("/limit", post(to_the_limit))
        .route("/m", post(add_m))
        .layer(layer)
}

#[tokio::test]
async fn a_change_is_refused_exactly_when_the_session_would_pass_the_limit() {
    let (_dir, store) = temp_store();
    let app = app(SessionLayer::new(store.clone()).max_session_size(120));
    let response = send(&app, "POST", "/limit", None).await;
    assert_eq!(response.status(), StatusCode::OK);
    let pair = cookie_pair(&response);
    assert_eq!(
        text(response).await,
        "ok,ok,ok,too large,too large,ok,too large"
    );
    let id = SessionId::decode(pair.split_once('=').unwrap().1).unwrap();
    let stored = store.get(id.as_bytes()).unwrap().value;
    let expected = format!(r#"{{"d":{{"b":1,"c":"{}"}}}}"#, "x".repeat(99));
    assert_eq!(String::from_utf8(stored).unwrap(), expected);
}

#[tokio::test]
async fn a_stored_record_longer_than_its_encoding_does_not_make_changes_too_large() {
    // A record written with padding (by another writer, or an older version): 200 bytes stored,
    // 13 when encoded again. The size kept from the stored length overestimates; the layer counts
    // exactly before it refuses anything.
    let (_dir, store) = temp_store();
    let app = app(SessionLayer::new(store.clone()).max_session_size(100));
    let id = SessionId::decode("cGFkZGVkLXJlY29yZC1pZA").unwrap();
    let mut padded = br#"{"d":{"n":1}"#.to_vec();
    padded.resize(199, b' ');
    padded.push(b'}');
    let mut lease = store
        .lease(id.as_bytes(), Instant::now() + Duration::from_secs(5))
        .await
        .unwrap();
    lease
        .commit(&padded, SystemTime::now() + Duration::from_secs(3600))
        .unwrap();
    lease.release();

    let cookie = format!("session={}", id.encode());
    let response = send(&app, "POST", "/m", Some(&cookie)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(text(response).await, "ok");
    let stored = store.get(id.as_bytes()).unwrap().value;
    assert_eq!(stored, br#"{"d":{"m":7,"n":1}}"#);
}
