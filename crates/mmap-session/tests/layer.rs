//! Behaviour of the layer, driven in process through an axum `Router`, each test on its own store.
//!
//! Every route test runs twice, once on the memory-mapped file and once on Redis (a redis-server of
//! the test's own): `every_backend!` at the end makes a `file::` and a `redis::` test of each.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::http::{header, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use common::{
    cookie_pair, get as get_req, id_of, send, send_json, send_raw_cookie, set_cookies, text,
    the_set_cookie, Counting, Faulty, Kind, TestStore,
};
use mmap_session::store::{Options, Store};
use mmap_session::{
    BackendLease as _, Expiry, ReadOnlySession, SameSite, Session, SessionError, SessionLayer,
    SigningKeys, TypedSession,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

async fn read_n(session: Session) -> Result<String, SessionError> {
    let n: u64 = session.get("n").await?.unwrap_or(0);
    Ok(n.to_string())
}

async fn increment(session: Session) -> Result<String, SessionError> {
    let n: u64 = session.get("n").await?.unwrap_or(0) + 1;
    session.insert("n", n).await?;
    Ok(n.to_string())
}

async fn insert_then_fail(session: Session) -> Result<StatusCode, SessionError> {
    session.insert("n", 999).await?;
    Ok(StatusCode::INTERNAL_SERVER_ERROR)
}

async fn logout(session: Session) -> Result<(), SessionError> {
    session.flush().await
}

async fn login(session: Session) -> Result<(), SessionError> {
    session.cycle_id().await?;
    session.insert("user", "ann").await
}

async fn clear(session: Session) -> Result<(), SessionError> {
    session.clear().await
}

async fn peek(session: ReadOnlySession) -> Result<String, SessionError> {
    Ok(session.get::<u64>("n")?.unwrap_or(0).to_string())
}

async fn big(session: Session) -> Result<(), SessionError> {
    session.insert("big", "x".repeat(10_000)).await
}

fn app(layer: SessionLayer) -> Router {
    routes().layer(layer)
}

/// The test routes, without the layer: add more routes, then the layer (routes added after
/// `.layer` are not wrapped by it).
fn routes() -> Router {
    Router::new()
        .route("/plain", get(|| async { "plain" }))
        .route("/n", get(read_n).post(increment))
        .route("/fail", post(insert_then_fail))
        .route("/logout", post(logout))
        .route("/login", post(login))
        .route("/clear", post(clear))
        .route("/peek", get(peek))
        .route("/big", post(big))
}

/// Creates a session with `n = 1` and returns its `name=value` cookie pair.
async fn new_session(app: &Router) -> String {
    let response = send(app, "POST", "/n", None).await;
    assert_eq!(response.status(), StatusCode::OK);
    cookie_pair(&response)
}

async fn a_new_session_gets_a_cookie_and_keeps_its_data(kind: Kind) {
    let store = kind.store().await;
    let app = app(SessionLayer::new(store.clone()));

    let first = send(&app, "POST", "/n", None).await;
    assert_eq!(first.status(), StatusCode::OK);
    let pair = cookie_pair(&first);
    let id = id_of(&pair);
    assert_eq!(pair.split_once('=').unwrap().1.len(), 22);
    assert!(store.get(id.as_bytes()).await.is_some());

    let second = send(&app, "POST", "/n", Some(&pair)).await;
    assert!(
        set_cookies(&second).is_empty(),
        "a known session needs no new cookie"
    );
    assert_eq!(text(second).await, "2");
    assert_eq!(text(get_req(&app, "/n", Some(&pair)).await).await, "2");
}

async fn an_untouched_request_sets_no_cookie_and_takes_no_lease(kind: Kind) {
    let store = kind.store().await;
    let backend = Counting::new(store);
    let app = app(SessionLayer::new(backend.clone()));
    let pair = new_session(&app).await;
    let (leases, reads) = (backend.leases(), backend.unleased_reads());

    for cookie in [None, Some(pair.as_str())] {
        let response = get_req(&app, "/plain", cookie).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(set_cookies(&response).is_empty());
    }
    assert_eq!(backend.leases(), leases, "no lease was taken");
    assert_eq!(backend.unleased_reads(), reads, "the store was not read");
}

async fn a_session_that_is_only_read_and_empty_sets_no_cookie(kind: Kind) {
    let store = kind.store().await;
    let backend = Counting::new(store);
    let app = app(SessionLayer::new(backend.clone()));
    let response = get_req(&app, "/n", None).await;
    assert_eq!(text_status(response).await, (StatusCode::OK, "0".into()));
    assert_eq!(backend.leases(), 0);
}

async fn text_status(response: axum::http::Response<axum::body::Body>) -> (StatusCode, String) {
    let status = response.status();
    (status, text(response).await)
}

async fn the_cookie_has_secure_defaults(kind: Kind) {
    let store = kind.store().await;
    let app = app(SessionLayer::new(store));
    let response = send(&app, "POST", "/n", None).await;
    let cookie = the_set_cookie(&response);
    assert_eq!(cookie.name(), "session");
    assert_eq!(cookie.path(), Some("/"));
    assert_eq!(cookie.secure(), Some(true));
    assert_eq!(cookie.http_only(), Some(true));
    assert_eq!(cookie.same_site(), Some(cookie::SameSite::Lax));
    assert_eq!(cookie.domain(), None);
    assert_eq!(
        cookie.max_age(),
        Some(cookie::time::Duration::seconds(24 * 60 * 60))
    );
}

async fn configured_cookie_attributes_are_sent(kind: Kind) {
    let store = kind.store().await;
    let app = app(SessionLayer::new(store)
        .cookie_name("sid")
        .domain("example.com")
        .path("/app")
        .secure(false)
        .http_only(false)
        .same_site(SameSite::Strict)
        .expiry(Expiry::OnInactivity(Duration::from_secs(90))));
    let response = send(&app, "POST", "/n", None).await;
    let cookie = the_set_cookie(&response);
    assert_eq!(cookie.name(), "sid");
    assert_eq!(cookie.domain(), Some("example.com"));
    assert_eq!(cookie.path(), Some("/app"));
    assert_eq!(cookie.secure(), None);
    assert_eq!(cookie.http_only(), None);
    assert_eq!(cookie.same_site(), Some(cookie::SameSite::Strict));
    assert_eq!(cookie.max_age(), Some(cookie::time::Duration::seconds(90)));
}

async fn a_browser_session_cookie_has_no_max_age_and_a_fixed_expiry_counts_down(kind: Kind) {
    let store = kind.store().await;
    let browser = app(SessionLayer::new(store.clone()).expiry(Expiry::OnSessionEnd));
    let response = send(&browser, "POST", "/n", None).await;
    let cookie = the_set_cookie(&response);
    assert_eq!(cookie.max_age(), None);
    assert_eq!(cookie.expires(), None);

    let at = SystemTime::now() + Duration::from_secs(3600);
    let fixed = app(SessionLayer::new(store.clone()).expiry(Expiry::AtDateTime(at)));
    let response = send(&fixed, "POST", "/n", None).await;
    let pair = cookie_pair(&response);
    let max_age = the_set_cookie(&response).max_age().unwrap().whole_seconds();
    assert!((3590..=3600).contains(&max_age), "{max_age}");
    let record = store.get(id_of(&pair).as_bytes()).await.unwrap();
    let drift = record
        .expires_at
        .duration_since(at)
        .unwrap_or_else(|e| e.duration());
    assert!(drift < Duration::from_secs(1));
}

async fn assert_fresh_session_for(
    app: &Router,
    store: &TestStore,
    cookie: &str,
    client_id: Option<mmap_session::SessionId>,
) {
    let response = send(app, "POST", "/n", Some(cookie)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let pair = cookie_pair(&response);
    assert_eq!(text(response).await, "1", "the session starts empty");
    let new_id = id_of(&pair);
    if let Some(client_id) = client_id {
        assert_ne!(new_id, client_id, "the client's id is never adopted");
        assert!(store.get(client_id.as_bytes()).await.is_none());
    }
    assert!(store.get(new_id.as_bytes()).await.is_some());
}

/// Checks that the session of `pair` was replaced (by `cycle_id` or `flush`) moments ago: the old
/// id holds only the marker, which expires within `REPLACED_GRACE`, and a request that still
/// carries the old cookie sees an empty session, may not change it, and sends no cookie.
async fn assert_replaced(app: &Router, store: &TestStore, pair: &str) {
    let record = store.get(id_of(pair).as_bytes()).await.unwrap();
    let marker: serde_json::Value = serde_json::from_slice(&record.value).unwrap();
    assert!(
        marker.get("d").is_none(),
        "no session data is left: {marker}"
    );
    assert!(record.expires_at <= SystemTime::now() + mmap_session::REPLACED_GRACE);
    let read = get_req(app, "/n", Some(pair)).await;
    assert!(set_cookies(&read).is_empty(), "{:?}", set_cookies(&read));
    assert_eq!(text_status(read).await, (StatusCode::OK, "0".into()));
    let write = send(app, "POST", "/n", Some(pair)).await;
    assert!(set_cookies(&write).is_empty(), "{:?}", set_cookies(&write));
    assert_eq!(write.status(), StatusCode::CONFLICT);
}

async fn a_malformed_cookie_gives_a_fresh_session(kind: Kind) {
    let store = kind.store().await;
    let app = app(SessionLayer::new(store.clone()));
    for cookie in [
        "session=",
        "session=not-an-id",
        "session=AAAAAAAAAAAAAAAAAAAAAB",
        "session=AAAAAAAAAAAAAAAAAAAA+/",
        "session=\"AAAAAAAAAAAAAAAAAAAAAA",
    ] {
        assert_fresh_session_for(&app, &store, cookie, None).await;
    }
}

async fn an_oversized_cookie_gives_a_fresh_session(kind: Kind) {
    let store = kind.store().await;
    let app = app(SessionLayer::new(store.clone()));
    let existing = new_session(&app).await;
    // A real id followed by junk: not ours, even though it starts like one.
    let oversized = format!("{existing}{}", "A".repeat(4000));
    assert_fresh_session_for(&app, &store, &oversized, None).await;
}

async fn an_unknown_cookie_gets_a_fresh_id_and_is_never_adopted(kind: Kind) {
    let store = kind.store().await;
    let backend = Counting::new(store.clone());
    let app = app(SessionLayer::new(backend.clone()));
    // Well formed, but the server never issued it.
    let chosen = "session=AAAAAAAAAAAAAAAAAAAAAA";
    let client_id = id_of(chosen);
    assert_fresh_session_for(&app, &store, chosen, Some(client_id)).await;
    // The new id, and the client's only to look for a login's marker before its cookie is
    // replaced: nothing is written there (checked above).
    assert_eq!(
        backend.leases(),
        2,
        "the new id and the client's id were leased"
    );

    // Asking again with the same id still does not adopt it.
    assert_fresh_session_for(&app, &store, chosen, Some(client_id)).await;
}

async fn a_forged_cookie_gives_a_fresh_session(kind: Kind) {
    let store = kind.store().await;
    let app = app(SessionLayer::new(store.clone()).signed(SigningKeys::new([[1u8; 32]]).unwrap()));
    let genuine = new_session(&app).await;
    let id = id_of(&genuine);
    let id_text = id.encode();

    let forger = SigningKeys::new([[2u8; 32]]).unwrap();
    let forged_app = app_with_keys(&store, forger);
    let forged = new_session(&forged_app).await;
    let forged_tag = forged.split_once('.').unwrap().1;

    for cookie in [
        format!("session={id_text}"),                    // signature stripped
        format!("session={id_text}.{forged_tag}"),       // another key's signature
        format!("session={id_text}.{}", "A".repeat(43)), // made-up signature
    ] {
        let response = send(&app, "POST", "/n", Some(&cookie)).await;
        let pair = cookie_pair(&response);
        assert_eq!(
            text(response).await,
            "1",
            "the genuine session's data is not reachable"
        );
        assert_ne!(id_of(&pair), id);
    }
    // The genuine cookie still works.
    assert_eq!(text(get_req(&app, "/n", Some(&genuine)).await).await, "1");
}

fn app_with_keys(store: &TestStore, keys: SigningKeys) -> Router {
    app(SessionLayer::new(store.clone()).signed(keys))
}

async fn signed_cookies_accept_old_keys_and_sign_with_the_first(kind: Kind) {
    let store = kind.store().await;
    let (old, new) = ([1u8; 32], [2u8; 32]);
    let before = app_with_keys(&store, SigningKeys::new([old]).unwrap());
    let after = app_with_keys(&store, SigningKeys::new([new, old]).unwrap());
    let only_new = app_with_keys(&store, SigningKeys::new([new]).unwrap());
    let only_old = app_with_keys(&store, SigningKeys::new([old]).unwrap());

    let signed_with_old = new_session(&before).await;
    assert_eq!(
        text(send(&after, "POST", "/n", Some(&signed_with_old)).await).await,
        "2",
        "a cookie signed with an older key is still accepted"
    );

    let signed_after_rotation = new_session(&after).await;
    assert!(signed_after_rotation.contains('.'));
    assert_eq!(
        text(get_req(&only_new, "/n", Some(&signed_after_rotation)).await).await,
        "1",
        "new cookies are signed with the first key"
    );
    assert_eq!(
        text(get_req(&only_old, "/n", Some(&signed_after_rotation)).await).await,
        "0",
        "and not with the old one"
    );
}

async fn an_inactive_session_expires(kind: Kind) {
    let store = kind.store().await;
    let app =
        app(SessionLayer::new(store.clone()).expiry(Expiry::OnInactivity(Duration::from_secs(1))));
    let pair = new_session(&app).await;
    assert_eq!(text(get_req(&app, "/n", Some(&pair)).await).await, "1");

    // Let the inactivity period pass (a deadline, not a condition to poll for).
    tokio::time::sleep(Duration::from_millis(1300)).await;

    assert!(store.get(id_of(&pair).as_bytes()).await.is_none());
    assert_fresh_session_for(&app, &store, &pair, Some(id_of(&pair))).await;
}

async fn an_unchanged_session_is_refreshed_at_most_once_per_interval(kind: Kind) {
    let store = kind.store().await;
    let hour = Duration::from_secs(3600);
    let eager = app(SessionLayer::new(store.clone())
        .expiry(Expiry::OnInactivity(hour))
        .refresh_interval(Duration::ZERO));
    let lazy = app(SessionLayer::new(store.clone())
        .expiry(Expiry::OnInactivity(hour))
        .refresh_interval(hour));
    let pair = new_session(&eager).await;
    let key = id_of(&pair);
    let created = store.get(key.as_bytes()).await.unwrap().expires_at;

    let response = get_req(&lazy, "/n", Some(&pair)).await;
    assert!(
        set_cookies(&response).is_empty(),
        "not due: nothing written, no cookie"
    );
    assert_eq!(store.get(key.as_bytes()).await.unwrap().expires_at, created);

    let response = get_req(&eager, "/n", Some(&pair)).await;
    let cookie = the_set_cookie(&response);
    assert_eq!(cookie.value(), pair.split_once('=').unwrap().1, "same id");
    assert_eq!(
        cookie.max_age(),
        Some(cookie::time::Duration::seconds(3600))
    );
    let refreshed = store.get(key.as_bytes()).await.unwrap();
    assert!(refreshed.expires_at >= created);
    assert_eq!(
        text(get_req(&lazy, "/n", Some(&pair)).await).await,
        "1",
        "data unchanged"
    );
}

async fn flush_deletes_the_session_and_expires_the_cookie(kind: Kind) {
    let store = kind.store().await;
    let app = app(SessionLayer::new(store.clone()));
    let pair = new_session(&app).await;

    let response = send(&app, "POST", "/logout", Some(&pair)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let removal = the_set_cookie(&response);
    assert_eq!(removal.name(), "session");
    assert_eq!(removal.value(), "");
    assert_eq!(removal.max_age(), Some(cookie::time::Duration::ZERO));
    assert_replaced(&app, &store, &pair).await;
}

async fn an_emptied_session_is_removed_and_its_cookie_expired(kind: Kind) {
    let store = kind.store().await;
    let app = app(SessionLayer::new(store.clone()));
    let pair = new_session(&app).await;
    let response = send(&app, "POST", "/clear", Some(&pair)).await;
    assert_eq!(
        the_set_cookie(&response).max_age(),
        Some(cookie::time::Duration::ZERO)
    );
    assert!(store.get(id_of(&pair).as_bytes()).await.is_none());
}

async fn data_inserted_after_flush_goes_to_a_new_id(kind: Kind) {
    let store = kind.store().await;
    let app = Router::new()
        .route("/n", post(increment))
        .route(
            "/logout",
            post(|session: Session| async move {
                session.flush().await?;
                session.insert("notice", "signed out").await?;
                Ok::<_, SessionError>(())
            }),
        )
        .layer(SessionLayer::new(store.clone()));
    let pair = new_session(&app).await;
    let response = send(&app, "POST", "/logout", Some(&pair)).await;
    let new_pair = cookie_pair(&response);
    assert_ne!(id_of(&new_pair), id_of(&pair));
    let old = store.get(id_of(&pair).as_bytes()).await.unwrap();
    assert!(!String::from_utf8(old.value).unwrap().contains("\"n\""));
    let record = store.get(id_of(&new_pair).as_bytes()).await.unwrap();
    let text = String::from_utf8(record.value).unwrap();
    assert!(
        text.contains("signed out") && !text.contains("\"n\""),
        "{text}"
    );
}

async fn cycle_id_moves_the_data_to_a_new_id_and_removes_the_old_record(kind: Kind) {
    let store = kind.store().await;
    let app = app(SessionLayer::new(store.clone()));
    let pair = new_session(&app).await;

    let response = send(&app, "POST", "/login", Some(&pair)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let new_pair = cookie_pair(&response);
    assert_ne!(id_of(&new_pair), id_of(&pair));
    assert_eq!(
        text(get_req(&app, "/n", Some(&new_pair)).await).await,
        "1",
        "data kept"
    );
    assert_replaced(&app, &store, &pair).await;
}

async fn a_failed_cycle_id_keeps_the_old_session(kind: Kind) {
    // The store refuses values over 100 bytes; the layer's own limit is higher, so the failure comes
    // from the store while writing the new record.
    let small = kind.store_with_max_value_len(100).await;
    let app = Router::new()
        .route("/n", post(increment))
        .route(
            "/login",
            post(|session: Session| async move {
                session.cycle_id().await?;
                session.insert("user", "x".repeat(200)).await
            }),
        )
        .layer(SessionLayer::new(small.clone()));
    let pair = new_session(&app).await;
    let response = send(&app, "POST", "/login", Some(&pair)).await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(set_cookies(&response).is_empty());
    let old = small.get(id_of(&pair).as_bytes()).await.unwrap();
    assert!(String::from_utf8(old.value).unwrap().contains("\"n\":1"));
}

async fn a_cycle_id_whose_old_record_cannot_be_removed_is_undone(kind: Kind) {
    let store = kind.store().await;
    let backend = Faulty::new(store.clone());
    let app = app(SessionLayer::new(backend.clone()));
    let pair = new_session(&app).await;
    *backend.fail_writes_to.lock().unwrap() = Some(id_of(&pair).as_bytes().to_vec());

    let response = send(&app, "POST", "/login", Some(&pair)).await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        set_cookies(&response).is_empty(),
        "the client keeps its old cookie"
    );
    let committed = backend.committed.lock().unwrap().clone();
    assert_eq!(
        committed.len(),
        2,
        "the data was first written under a new id"
    );
    let new_key = committed.last().unwrap();
    assert_ne!(new_key.as_slice(), id_of(&pair).as_bytes());
    assert!(
        store.get(new_key).await.is_none(),
        "and removed again when the old one could not go"
    );
    assert_eq!(
        text(get_req(&app, "/n", Some(&pair)).await).await,
        "1",
        "the old session is intact"
    );
}

async fn is_modified_tells_whether_the_request_changed_the_session(kind: Kind) {
    let store = kind.store().await;
    let app = Router::new()
        .route(
            "/",
            post(|session: Session| async move {
                let before = session.is_modified().await?;
                session.insert("k", 1).await?;
                let after = session.is_modified().await?;
                Ok::<_, SessionError>(format!("{before} {after}"))
            }),
        )
        .layer(SessionLayer::new(store));
    let response = send(&app, "POST", "/", None).await;
    let pair = cookie_pair(&response);
    assert_eq!(text(response).await, "false true");
    // Inserting the value already stored is no change.
    assert_eq!(
        text(send(&app, "POST", "/", Some(&pair)).await).await,
        "false false"
    );
}

async fn a_server_error_saves_nothing(kind: Kind) {
    let store = kind.store().await;
    let app = app(SessionLayer::new(store.clone()));
    let pair = new_session(&app).await;
    let response = send(&app, "POST", "/fail", Some(&pair)).await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(set_cookies(&response).is_empty());
    assert_eq!(text(get_req(&app, "/n", Some(&pair)).await).await, "1");

    let response = send(&app, "POST", "/fail", None).await;
    assert!(set_cookies(&response).is_empty(), "no new session either");
}

async fn a_server_error_saves_when_configured_to(kind: Kind) {
    let store = kind.store().await;
    let app = app(SessionLayer::new(store.clone()).save_on_server_error(true));
    let pair = new_session(&app).await;
    let response = send(&app, "POST", "/fail", Some(&pair)).await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(text(get_req(&app, "/n", Some(&pair)).await).await, "999");
}

async fn a_client_error_saves_unless_configured_not_to(kind: Kind) {
    let store = kind.store().await;
    let insert_then_reject = |session: Session| async move {
        session.insert("n", 7).await?;
        Ok::<_, SessionError>(StatusCode::UNPROCESSABLE_ENTITY)
    };
    let saving = routes()
        .route("/reject", post(insert_then_reject))
        .layer(SessionLayer::new(store.clone()));
    let strict = routes()
        .route("/reject", post(insert_then_reject))
        .layer(SessionLayer::new(store.clone()).save_on_client_error(false));

    let pair = new_session(&strict).await;
    let response = send(&strict, "POST", "/reject", Some(&pair)).await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(text(get_req(&strict, "/n", Some(&pair)).await).await, "1");

    send(&saving, "POST", "/reject", Some(&pair)).await;
    assert_eq!(text(get_req(&saving, "/n", Some(&pair)).await).await, "7");
}

/// Lets a test hold a handler inside a request: the handler touches the session, reports that it
/// holds it, and waits until it is let go.
#[derive(Clone, Default)]
struct Gate {
    holding: Arc<Notify>,
    release: Arc<Notify>,
}

fn gated_app(layer: SessionLayer, gate: Gate) -> Router {
    routes()
        .route(
            "/hold",
            post(move |session: Session| {
                let gate = gate.clone();
                async move {
                    session.insert("n", 1000).await?;
                    gate.holding.notify_one();
                    gate.release.notified().await;
                    Ok::<_, SessionError>("released")
                }
            }),
        )
        .route(
            "/panic",
            post(|session: Session| async move {
                session.insert("n", 1000).await?;
                if session.id().is_some() {
                    panic!("handler panics while holding the session");
                }
                Ok::<_, SessionError>(())
            }),
        )
        .layer(layer)
}

async fn a_panicking_handler_releases_the_lease_and_saves_nothing(kind: Kind) {
    let store = kind.store().await;
    let layer = SessionLayer::new(store.clone()).lease_wait(Duration::from_millis(300));
    let app = gated_app(layer, Gate::default());
    let pair = new_session(&app).await;

    let request = tokio::spawn({
        let (app, pair) = (app.clone(), pair.clone());
        async move { send(&app, "POST", "/panic", Some(&pair)).await }
    });
    assert!(request.await.unwrap_err().is_panic());

    let response = get_req(&app, "/n", Some(&pair)).await;
    assert_eq!(text_status(response).await, (StatusCode::OK, "1".into()));
}

async fn a_panic_caught_by_catch_panic_releases_the_lease_and_saves_nothing(kind: Kind) {
    let store = kind.store().await;
    let layer = SessionLayer::new(store.clone()).lease_wait(Duration::from_millis(300));
    let gate = Gate::default();
    // CatchPanic outside the session layer: the session future is dropped on unwind.
    let outer = gated_app(layer.clone(), gate.clone())
        .layer(tower_http::catch_panic::CatchPanicLayer::new());
    // CatchPanic inside: the session layer sees an ordinary 500.
    let inner = Router::new()
        .route(
            "/panic",
            post(|session: Session| async move {
                session.insert("n", 1000).await?;
                if session.id().is_some() {
                    panic!("handler panics while holding the session");
                }
                Ok::<_, SessionError>(())
            }),
        )
        .layer(tower_http::catch_panic::CatchPanicLayer::new())
        .layer(layer);
    let pair = new_session(&outer).await;

    for app in [&outer, &inner] {
        let response = send(app, "POST", "/panic", Some(&pair)).await;
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(set_cookies(&response).is_empty());
        let response = get_req(&outer, "/n", Some(&pair)).await;
        assert_eq!(text_status(response).await, (StatusCode::OK, "1".into()));
    }
}

async fn a_dropped_response_future_releases_the_lease_and_saves_nothing(kind: Kind) {
    let store = kind.store().await;
    let gate = Gate::default();
    let app = gated_app(
        SessionLayer::new(store.clone()).lease_wait(Duration::from_millis(300)),
        gate.clone(),
    );
    let pair = new_session(&app).await;

    let request = tokio::spawn({
        let (app, pair) = (app.clone(), pair.clone());
        async move { send(&app, "POST", "/hold", Some(&pair)).await }
    });
    tokio::time::timeout(Duration::from_secs(10), gate.holding.notified())
        .await
        .expect("the handler reached the gate");
    // The client goes away: the server drops the response future.
    request.abort();
    assert!(request.await.unwrap_err().is_cancelled());

    let response = get_req(&app, "/n", Some(&pair)).await;
    assert_eq!(text_status(response).await, (StatusCode::OK, "1".into()));
}

async fn overlapping_accesses_share_one_load_and_a_cancelled_load_is_tried_again(kind: Kind) {
    let store = kind.store().await;
    let gave_up = Arc::new(Notify::new());
    let app = routes()
        .route(
            "/overlap",
            post({
                let gave_up = Arc::clone(&gave_up);
                move |session: Session| async move {
                    // The lease is held elsewhere: this first load gives up, and is dropped.
                    let first =
                        tokio::time::timeout(Duration::from_millis(50), session.get::<u64>("n"))
                            .await;
                    assert!(first.is_err(), "the first load waited for the held lease");
                    gave_up.notify_one();
                    // Still held: one of these loads the session, the other waits for that load.
                    let (n, inserted) =
                        tokio::join!(session.get::<u64>("n"), session.insert("n", 10));
                    inserted?;
                    Ok::<_, SessionError>(n?.unwrap_or(0).to_string())
                }
            }),
        )
        .layer(SessionLayer::new(store.clone()).lease_wait(Duration::from_secs(10)));
    let pair = new_session(&app).await;

    let held = store.hold(id_of(&pair).as_bytes()).await;
    let request = tokio::spawn({
        let (app, pair) = (app.clone(), pair.clone());
        async move { send(&app, "POST", "/overlap", Some(&pair)).await }
    });
    tokio::time::timeout(Duration::from_secs(10), gave_up.notified())
        .await
        .expect("the handler's first load gave up");
    held.release().await;

    let response = tokio::time::timeout(Duration::from_secs(10), request)
        .await
        .expect("the overlapping accesses finished")
        .unwrap();
    // `get` ran first in `join!`: it saw the stored 1, then `insert` wrote 10.
    assert_eq!(text_status(response).await, (StatusCode::OK, "1".into()));
    let response = get_req(&app, "/n", Some(&pair)).await;
    assert_eq!(text_status(response).await, (StatusCode::OK, "10".into()));
}

async fn concurrent_increments_of_one_session_lose_no_update(kind: Kind) {
    let store = kind.store().await;
    let app = app(SessionLayer::new(store).lease_wait(Duration::from_secs(30)));
    let pair = new_session(&app).await;

    let requests: Vec<_> = (0..50)
        .map(|_| {
            let (app, pair) = (app.clone(), pair.clone());
            tokio::spawn(async move { send(&app, "POST", "/n", Some(&pair)).await.status() })
        })
        .collect();
    for request in requests {
        assert_eq!(request.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(text(get_req(&app, "/n", Some(&pair)).await).await, "51");
}

async fn the_read_only_path_does_not_wait_for_a_held_lease(kind: Kind) {
    let store = kind.store().await;
    let backend = Counting::new(store.clone());
    let app = app(SessionLayer::new(backend.clone()).lease_wait(Duration::from_millis(200)));
    let pair = new_session(&app).await;
    let leases = backend.leases();

    // Another request (here: the test itself) holds the session.
    let held = store.hold(id_of(&pair).as_bytes()).await;
    let response = get_req(&app, "/peek", Some(&pair)).await;
    assert!(set_cookies(&response).is_empty());
    assert_eq!(text_status(response).await, (StatusCode::OK, "1".into()));
    assert_eq!(backend.leases(), leases, "the read-only path took no lease");
    held.release().await;
}

async fn a_lease_wait_timeout_answers_503_with_retry_after(kind: Kind) {
    let store = kind.store().await;
    let seen = Arc::new(Mutex::new(None));
    let app = routes()
        .route(
            "/ignore-errors",
            get({
                let seen = Arc::clone(&seen);
                move |session: Session| async move {
                    // The handler swallows the error and claims success; the layer must not.
                    let result = session.get::<u64>("n").await;
                    *seen.lock().unwrap() =
                        Some(result.map_err(|e| matches!(e, SessionError::LeaseTimeout)));
                    (StatusCode::OK, "all good")
                }
            }),
        )
        .layer(SessionLayer::new(store.clone()).lease_wait(Duration::from_millis(100)));
    let pair = new_session(&app).await;
    let held = store.hold(id_of(&pair).as_bytes()).await;

    for path in ["/ignore-errors", "/n"] {
        let response = get_req(&app, path, Some(&pair)).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        assert!(set_cookies(&response).is_empty());
        assert_eq!(text(response).await, "Service Unavailable");
    }
    assert_eq!(
        *seen.lock().unwrap(),
        Some(Err(true)),
        "the handler saw LeaseTimeout"
    );
    held.release().await;
    assert_eq!(text(get_req(&app, "/n", Some(&pair)).await).await, "1");
}

async fn a_value_over_the_max_size_is_refused_and_nothing_is_written(kind: Kind) {
    let store = kind.store().await;
    let app = app(SessionLayer::new(store.clone()).max_session_size(1000));
    let pair = new_session(&app).await;
    let before = store.get(id_of(&pair).as_bytes()).await.unwrap();

    let response = send(&app, "POST", "/big", Some(&pair)).await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(text(response).await, "Internal Server Error");
    assert_eq!(store.get(id_of(&pair).as_bytes()).await.unwrap(), before);

    let response = send(&app, "POST", "/big", None).await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(set_cookies(&response).is_empty());
}

async fn a_failed_commit_replaces_the_handlers_success_with_a_500(kind: Kind) {
    let store = kind.store_with_max_value_len(100).await;
    let app = routes()
        .route(
            "/swallow",
            post(|session: Session| async move {
                // Within the layer's limit, over the store's: fails only at commit.
                let _ = session.insert("note", "y".repeat(200)).await;
                "saved, supposedly"
            }),
        )
        .layer(SessionLayer::new(store.clone()));
    let pair = new_session(&app).await;
    let before = store.get(id_of(&pair).as_bytes()).await.unwrap();
    let response = send(&app, "POST", "/swallow", Some(&pair)).await;
    assert_eq!(
        text_status(response).await,
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal Server Error".into()
        )
    );
    assert_eq!(store.get(id_of(&pair).as_bytes()).await.unwrap(), before);
}

// File only: a full file is the store's own condition (its size limit and eviction); Redis has no
// such limit of ours (its `maxmemory` policy is the server's business).
#[tokio::test]
async fn a_full_store_answers_503_and_keeps_what_it_had() {
    let dir = tempfile::tempdir().unwrap();
    // Room for a handful of 60 KiB sessions only, each held by a request: nothing can be evicted.
    let opts = Options::default().max_sessions(64);
    let probe = Store::open_with(dir.path().join("probe"), opts.clone()).unwrap();
    let data_start = probe.stats().bytes_reserved;
    drop(probe);
    let store = Store::open_with(
        dir.path().join("s"),
        opts.max_file_size(data_start + (1 << 20)),
    )
    .unwrap();
    let mut held = Vec::new();
    for i in 0..64u32 {
        let mut lease = store.try_lease(&i.to_le_bytes()).unwrap().unwrap();
        match lease.commit(
            &vec![1u8; 60 << 10],
            SystemTime::now() + Duration::from_secs(600),
        ) {
            Ok(()) => held.push(lease),
            Err(_) => break,
        }
    }
    let app = routes().layer(SessionLayer::new(store.clone()));
    let response = send(&app, "POST", "/big", None).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "1");
    assert!(response.headers().get("set-cookie").is_none());
    assert_eq!(store.stats().live_records, held.len() as u64);
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Cart {
    items: Vec<String>,
    visits: u32,
}

async fn the_typed_view_round_trips(kind: Kind) {
    let store = kind.store().await;
    let app = Router::new()
        .route(
            "/add",
            post(|cart: TypedSession<Cart>| async move {
                cart.update(|c| {
                    c.visits += 1;
                    c.items.push(format!("item{}", c.visits));
                })
                .await
            }),
        )
        .route(
            "/cart",
            get(|cart: TypedSession<Cart>| async move {
                let c = cart.get().await?;
                Ok::<_, SessionError>(axum::Json(c))
            }),
        )
        .route(
            "/cart-readonly",
            get(|session: ReadOnlySession| async move {
                let c: Cart = session.data()?.unwrap_or_default();
                Ok::<_, SessionError>(axum::Json(c))
            }),
        )
        .layer(SessionLayer::new(store));
    let pair = cookie_pair(&send(&app, "POST", "/add", None).await);
    send(&app, "POST", "/add", Some(&pair)).await;
    let expected = Cart {
        items: vec!["item1".into(), "item2".into()],
        visits: 2,
    };
    for path in ["/cart", "/cart-readonly"] {
        let body = text(get_req(&app, path, Some(&pair)).await).await;
        assert_eq!(serde_json::from_str::<Cart>(&body).unwrap(), expected);
    }
}

async fn a_session_deleted_by_logout_is_not_brought_back_by_a_concurrent_save(kind: Kind) {
    let store = kind.store().await;
    let gate = Gate::default();
    let app = routes()
        .route(
            "/slow-logout",
            post({
                let gate = gate.clone();
                move |session: Session| async move {
                    session.flush().await?;
                    gate.holding.notify_one();
                    gate.release.notified().await;
                    Ok::<_, SessionError>(())
                }
            }),
        )
        .layer(SessionLayer::new(store.clone()).lease_wait(Duration::from_secs(10)));
    let pair = new_session(&app).await;
    let logout = tokio::spawn({
        let (app, pair) = (app.clone(), pair.clone());
        async move { send(&app, "POST", "/slow-logout", Some(&pair)).await }
    });
    tokio::time::timeout(Duration::from_secs(10), gate.holding.notified())
        .await
        .expect("the handler reached the gate");
    // A save of the same session arrives while the logout holds it; it waits for the lease.
    let save = tokio::spawn({
        let (app, pair) = (app.clone(), pair.clone());
        async move { send(&app, "POST", "/n", Some(&pair)).await }
    });
    gate.release.notify_one();
    assert_eq!(logout.await.unwrap().status(), StatusCode::OK);
    // Whether it waited or came just after: it is refused, and sends no cookie that would
    // replace the logout's removal.
    let saved = save.await.unwrap();
    assert!(set_cookies(&saved).is_empty(), "{:?}", set_cookies(&saved));
    assert_eq!(saved.status(), StatusCode::CONFLICT);
    // The logged-out data did not come back.
    assert_replaced(&app, &store, &pair).await;
}

#[tokio::test]
async fn a_route_without_the_layer_answers_500_saying_so() {
    let app = Router::new()
        .route("/", get(|_session: Session| async { "unreachable" }))
        .route(
            "/optional",
            get(|session: Option<Session>| async move { session.is_none().to_string() }),
        );
    let response = get_req(&app, "/", None).await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(text(response).await.contains("SessionLayer"));
    assert_eq!(text(get_req(&app, "/optional", None).await).await, "true");
}

async fn set_expiry_is_stored_with_the_session_and_resends_the_cookie(kind: Kind) {
    let store = kind.store().await;
    let week = Duration::from_secs(7 * 24 * 3600);
    let app = routes()
        .route(
            "/remember",
            post(move |session: Session| async move {
                session.set_expiry(Some(Expiry::OnInactivity(week))).await?;
                Ok::<_, SessionError>(format!("{:?}", session.expiry().await?))
            }),
        )
        .layer(SessionLayer::new(store.clone()));
    let pair = new_session(&app).await;
    let response = send(&app, "POST", "/remember", Some(&pair)).await;
    assert_eq!(
        the_set_cookie(&response).max_age(),
        Some(cookie::time::Duration::seconds(7 * 24 * 3600))
    );
    let expires_at = store.get(id_of(&pair).as_bytes()).await.unwrap().expires_at;
    assert!(expires_at > SystemTime::now() + week - Duration::from_secs(60));
    assert_eq!(text(get_req(&app, "/n", Some(&pair)).await).await, "1");
}

// --- Hostile cookies and values (issue 13) ---

/// A `name=value` pair for a well-formed id that the server never issued.
fn unknown_pair(i: u8) -> String {
    use base64::Engine as _;
    let text = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([i; 16]);
    format!("session={text}")
}

async fn a_non_ascii_byte_in_another_cookie_does_not_hide_the_session(kind: Kind) {
    let store = kind.store().await;
    let app = app(SessionLayer::new(store.clone()));
    let pair = new_session(&app).await;
    let headers: [Vec<u8>; 3] = [
        // UTF-8 in a cookie of the site's (browsers send it as it was set).
        format!("pref=café; {pair}").into_bytes(),
        // A byte that is not UTF-8 at all (obs-text), before and after the session cookie.
        [b"pref=caf\xe9; ".as_slice(), pair.as_bytes()].concat(),
        [pair.as_bytes(), b"; theme=\xff\xfe".as_slice()].concat(),
    ];
    for (i, header) in headers.iter().enumerate() {
        let response = send_raw_cookie(&app, "POST", "/n", header).await;
        assert!(
            set_cookies(&response).is_empty(),
            "the session was found: no new cookie replaces it ({:?})",
            String::from_utf8_lossy(header)
        );
        assert_eq!(
            text_status(response).await,
            (StatusCode::OK, (i + 2).to_string())
        );
    }
}

async fn a_stale_session_cookie_listed_first_does_not_hide_the_live_one(kind: Kind) {
    let store = kind.store().await;
    let backend = Counting::new(store.clone());
    let app = app(SessionLayer::new(backend.clone()));
    let live = new_session(&app).await;
    // Once a session, now gone.
    let gone = new_session(&app).await;
    send(&app, "POST", "/clear", Some(&gone)).await;
    assert!(store.get(id_of(&gone).as_bytes()).await.is_none());

    // Cookies of the same name from another path or domain come first (RFC 6265 lists longer
    // paths first; a sibling subdomain can plant one).
    let header = format!("{}; session=junk; {gone}; {live}", unknown_pair(1));
    let response = send(&app, "POST", "/n", Some(&header)).await;
    assert!(
        set_cookies(&response).is_empty(),
        "the live session was found"
    );
    assert_eq!(text_status(response).await, (StatusCode::OK, "2".into()));

    // The candidates tried are bounded: behind many stale ones, the live one is not looked for.
    let reads = backend.unleased_reads() + backend.leases();
    let stale: Vec<String> = (10..40).map(unknown_pair).collect();
    let header = format!("{}; {live}", stale.join("; "));
    let response = send(&app, "GET", "/n", Some(&header)).await;
    assert_eq!(text_status(response).await, (StatusCode::OK, "0".into()));
    let asked = backend.unleased_reads() + backend.leases() - reads;
    assert!(asked <= 8, "{asked} store accesses for one request");
}

async fn a_host_prefixed_cookie_name_is_supported_and_its_rules_enforced(kind: Kind) {
    let store = kind.store().await;
    let host = app(SessionLayer::new(store.clone()).cookie_name("__Host-session"));
    let response = send(&host, "POST", "/n", None).await;
    let cookie = the_set_cookie(&response);
    assert_eq!(cookie.name(), "__Host-session");
    assert_eq!(cookie.secure(), Some(true));
    assert_eq!(cookie.path(), Some("/"));
    assert_eq!(cookie.domain(), None);
    // Browsers refuse a `__Host-` cookie with a Domain, without Secure or with another Path,
    // and a `__Secure-` one without Secure: such a layer would sign everybody out silently.
    for layer in [
        SessionLayer::new(store.clone())
            .cookie_name("__Host-session")
            .domain("example.com"),
        SessionLayer::new(store.clone())
            .cookie_name("__Host-session")
            .secure(false),
        SessionLayer::new(store.clone())
            .cookie_name("__Host-session")
            .path("/app"),
        SessionLayer::new(store.clone())
            .cookie_name("__Secure-session")
            .secure(false),
    ] {
        let response = send(&app(layer), "POST", "/n", None).await;
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(set_cookies(&response).is_empty());
    }
    let pair = cookie_pair(&response);
    // The prefixed name is the one looked for, stale values first included.
    let header = format!(
        "{}; {pair}",
        unknown_pair(1).replacen("session", "__Host-session", 1)
    );
    assert_eq!(
        text(send(&host, "POST", "/n", Some(&header)).await).await,
        "2"
    );
}

/// A JSON value nested `depth` arrays deep.
fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

async fn a_value_nested_too_deep_to_read_back_is_refused_and_the_session_kept(kind: Kind) {
    let store = kind.store().await;
    let app = routes()
        .route(
            "/remember",
            post(
                |session: Session, axum::Json(value): axum::Json<serde_json::Value>| async move {
                    session.insert_value("posted", value).await?;
                    Ok::<_, SessionError>("stored")
                },
            ),
        )
        .layer(SessionLayer::new(store.clone()));
    let pair = new_session(&app).await;
    let before = store.get(id_of(&pair).as_bytes()).await.unwrap();

    // axum's `Json` accepts this depth; the stored session could not be decoded again.
    let response = send_json(&app, "/remember", Some(&pair), nested(126)).await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(set_cookies(&response).is_empty());
    assert_eq!(store.get(id_of(&pair).as_bytes()).await.unwrap(), before);
    let response = send(&app, "POST", "/n", Some(&pair)).await;
    assert!(set_cookies(&response).is_empty(), "the session was kept");
    assert_eq!(text_status(response).await, (StatusCode::OK, "2".into()));

    // The deepest value that reads back is accepted, and reads back.
    let response = send_json(&app, "/remember", Some(&pair), nested(125)).await;
    assert_eq!(
        text_status(response).await,
        (StatusCode::OK, "stored".into())
    );
    let response = send(&app, "POST", "/n", Some(&pair)).await;
    assert!(set_cookies(&response).is_empty(), "the session was kept");
    assert_eq!(text_status(response).await, (StatusCode::OK, "3".into()));
}

async fn an_undecodable_stored_session_is_an_error_and_is_kept(kind: Kind) {
    let store = kind.store().await;
    let layer = SessionLayer::new(store.clone());
    let app = app(layer.clone());
    let pair = new_session(&app).await;
    let id = id_of(&pair);
    // What another version of the application might have written.
    let mut lease = store.hold(id.as_bytes()).await;
    let expires_at = SystemTime::now() + Duration::from_secs(3600);
    lease
        .commit(br#"{"v":2,"data":{"n":1}}"#, expires_at)
        .await
        .unwrap();
    lease.release().await;
    let before = store.get(id.as_bytes()).await.unwrap();

    for (method, path) in [("GET", "/n"), ("POST", "/n"), ("GET", "/peek")] {
        let response = send(&app, method, path, Some(&pair)).await;
        assert_eq!(
            response.status(),
            StatusCode::INTERNAL_SERVER_ERROR,
            "{method} {path}"
        );
        assert!(set_cookies(&response).is_empty(), "{method} {path}");
    }
    assert_eq!(
        store.get(id.as_bytes()).await.unwrap(),
        before,
        "kept as it was"
    );
    assert_eq!(layer.undecodable_sessions(), 3, "each one counted");
}

async fn a_request_abandoned_while_a_spawned_task_loads_the_session_releases_it(kind: Kind) {
    let store = kind.store().await;
    let backend = Counting::new(store.clone());
    let (results, mut result) = tokio::sync::mpsc::unbounded_channel();
    let task_may_end = Arc::new(Notify::new());
    let app = routes()
        .route(
            "/spawn",
            post({
                let task_may_end = Arc::clone(&task_may_end);
                move |session: Session| {
                    let (results, task_may_end) = (results.clone(), Arc::clone(&task_may_end));
                    async move {
                        // The session's first access happens in a task of the handler's, which
                        // outlives the request.
                        tokio::spawn(async move {
                            let inserted = session.insert("n", 5).await;
                            results.send(inserted.map_err(|e| e.to_string())).unwrap();
                            task_may_end.notified().await;
                            drop(session);
                        });
                        std::future::pending::<()>().await
                    }
                }
            }),
        )
        .layer(SessionLayer::new(backend.clone()).lease_wait(Duration::from_millis(300)));
    let pair = new_session(&app).await;

    let held = store.hold(id_of(&pair).as_bytes()).await;
    let leases = backend.leases();
    let request = tokio::spawn({
        let (app, pair) = (app.clone(), pair.clone());
        async move { send(&app, "POST", "/spawn", Some(&pair)).await }
    });
    // The task is loading the session: it asked for the lease, which is held.
    tokio::time::timeout(Duration::from_secs(10), backend.leases_asked(leases + 1))
        .await
        .expect("the task asked for the session's lease");
    // The client goes away while the task waits.
    request.abort();
    assert!(request.await.unwrap_err().is_cancelled());
    held.release().await;

    let inserted = tokio::time::timeout(Duration::from_secs(10), result.recv())
        .await
        .expect("the task's insert finished")
        .unwrap();
    // The task still holds its handle, but the lease is free and nothing was saved.
    let response = get_req(&app, "/n", Some(&pair)).await;
    assert_eq!(text_status(response).await, (StatusCode::OK, "1".into()));
    assert!(
        inserted.is_err(),
        "the insert of an abandoned request reports that nothing will be saved"
    );
    task_may_end.notify_one();
}

async fn a_request_of_a_session_cycled_while_it_waited_does_not_replace_the_new_cookie(kind: Kind) {
    let store = kind.store().await;
    let backend = Counting::new(store.clone());
    let gate = Gate::default();
    let app = routes()
        .route(
            "/slow-login",
            post({
                let gate = gate.clone();
                move |session: Session| async move {
                    session.cycle_id().await?;
                    session.insert("user", "ann").await?;
                    gate.holding.notify_one();
                    gate.release.notified().await;
                    Ok::<_, SessionError>(())
                }
            }),
        )
        .layer(SessionLayer::new(backend.clone()).lease_wait(Duration::from_secs(10)));
    let pair = new_session(&app).await;
    let login = tokio::spawn({
        let (app, pair) = (app.clone(), pair.clone());
        async move { send(&app, "POST", "/slow-login", Some(&pair)).await }
    });
    tokio::time::timeout(Duration::from_secs(10), gate.holding.notified())
        .await
        .expect("the login reached the gate");
    // Two requests of the same user with the pre-login cookie wait for the lease.
    let leases = backend.leases();
    let read = tokio::spawn({
        let (app, pair) = (app.clone(), pair.clone());
        async move { send(&app, "GET", "/n", Some(&pair)).await }
    });
    let write = tokio::spawn({
        let (app, pair) = (app.clone(), pair.clone());
        async move { send(&app, "POST", "/n", Some(&pair)).await }
    });
    tokio::time::timeout(Duration::from_secs(10), backend.leases_asked(leases + 2))
        .await
        .expect("both requests wait for the lease");
    gate.release.notify_one();

    let login = login.await.unwrap();
    assert_eq!(login.status(), StatusCode::OK);
    let new_pair = cookie_pair(&login);
    assert_ne!(id_of(&new_pair), id_of(&pair));

    let read = read.await.unwrap();
    assert!(set_cookies(&read).is_empty(), "{:?}", set_cookies(&read));
    assert_eq!(text_status(read).await, (StatusCode::OK, "0".into()));
    let write = write.await.unwrap();
    assert!(set_cookies(&write).is_empty(), "{:?}", set_cookies(&write));
    assert_eq!(write.status(), StatusCode::CONFLICT);

    // A request sent with the old cookie just after the login was answered: the same.
    let late = send(&app, "POST", "/n", Some(&pair)).await;
    assert!(set_cookies(&late).is_empty(), "{:?}", set_cookies(&late));
    assert_eq!(late.status(), StatusCode::CONFLICT);

    // The new cookie holds the logged-in session, with the data it had.
    let response = send(&app, "POST", "/n", Some(&new_pair)).await;
    assert!(set_cookies(&response).is_empty());
    assert_eq!(text_status(response).await, (StatusCode::OK, "2".into()));
}

async fn a_malformed_session_cookie_is_expired_when_the_session_is_touched(kind: Kind) {
    let store = kind.store().await;
    let backend = Counting::new(store.clone());
    let app = app(SessionLayer::new(backend.clone()));
    let oversized = format!("session={}", "A".repeat(4000));
    for cookie in [
        "session=",
        "session=not-an-id",
        "session=AAAAAAAAAAAAAAAAAAAAAB",
        "other=1; session=\"AAAAAAAAAAAAAAAAAAAAAA",
        &oversized,
    ] {
        // Untouched: no store access and no cookie (a removal could log out a login answered
        // just before it).
        let response = get_req(&app, "/plain", Some(cookie)).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(set_cookies(&response).is_empty(), "{cookie}");
        assert_eq!(
            backend.leases() + backend.unleased_reads(),
            0,
            "no store access"
        );
    }
    for cookie in [
        "session=",
        "session=not-an-id",
        "session=AAAAAAAAAAAAAAAAAAAAAB",
        "other=1; session=\"AAAAAAAAAAAAAAAAAAAAAA",
        &oversized,
    ] {
        let response = get_req(&app, "/n", Some(cookie)).await;
        assert_eq!(response.status(), StatusCode::OK);
        let removal = the_set_cookie(&response);
        assert_eq!(removal.name(), "session", "{cookie}");
        assert_eq!(removal.value(), "");
        assert_eq!(removal.path(), Some("/"));
        assert_eq!(removal.max_age(), Some(cookie::time::Duration::ZERO));
    }
    // Not ours: other cookies, however odd, are left alone.
    let response = get_req(&app, "/plain", Some("sessions=x; other=session=")).await;
    assert!(set_cookies(&response).is_empty());
}

async fn a_cookie_naming_a_gone_session_is_expired_when_the_session_is_touched(kind: Kind) {
    let store = kind.store().await;
    let backend = Counting::new(store.clone());
    let app = app(SessionLayer::new(backend.clone()));
    let removed = new_session(&app).await;
    let mut lease = store.hold(id_of(&removed).as_bytes()).await;
    lease.remove().await.unwrap();
    lease.release().await;
    for cookie in [unknown_pair(1), removed] {
        // Untouched: nothing to know, nothing sent.
        let accesses = backend.leases() + backend.unleased_reads();
        let response = get_req(&app, "/plain", Some(&cookie)).await;
        assert!(set_cookies(&response).is_empty());
        assert_eq!(backend.leases() + backend.unleased_reads(), accesses);

        let response = get_req(&app, "/n", Some(&cookie)).await;
        let removal = the_set_cookie(&response);
        assert_eq!(removal.name(), "session");
        assert_eq!(removal.value(), "");
        assert_eq!(removal.max_age(), Some(cookie::time::Duration::ZERO));
        assert_eq!(text_status(response).await, (StatusCode::OK, "0".into()));
    }
}

// --- Review of issue 13's fixes: what still breaks from the outside ---

/// Plays a browser's cookie jar for the session cookie: applies the responses' `Set-Cookie`
/// headers in the order they arrive and returns the `name=value` pair the browser then sends,
/// if any.
fn jar_after(
    mut pair: Option<String>,
    responses: &[&axum::http::Response<axum::body::Body>],
) -> Option<String> {
    for response in responses {
        for text in set_cookies(response) {
            let cookie = cookie::Cookie::parse(text).unwrap();
            if cookie.name() != "session" {
                continue;
            }
            let removed = cookie.max_age() == Some(cookie::time::Duration::ZERO);
            pair = (!removed).then(|| format!("session={}", cookie.value()));
        }
    }
    pair
}

/// A page's long poll, sent with the browser's cookie before the user logs in and answered
/// after: it reads the session, then waits at the gate.
fn long_poll_app(layer: SessionLayer, gate: Gate) -> Router {
    let plain_gate = gate.clone();
    let write_gate = gate.clone();
    routes()
        .route(
            "/long-poll",
            get(move |session: Session| {
                let gate = gate.clone();
                async move {
                    let user: Option<String> = session.get("user").await?;
                    gate.holding.notify_one();
                    gate.release.notified().await;
                    Ok::<_, SessionError>(user.unwrap_or_default())
                }
            }),
        )
        .route(
            "/slow-write",
            get(move |session: Session| {
                let gate = write_gate.clone();
                async move {
                    session.insert("n", 5).await?;
                    gate.holding.notify_one();
                    gate.release.notified().await;
                    Ok::<_, SessionError>("written")
                }
            }),
        )
        .route(
            "/try-write",
            post(|session: Session| async move {
                match session.insert("n", 5).await {
                    Err(SessionError::Replaced) => "refused",
                    Err(_) => "failed",
                    Ok(()) => "written",
                }
            }),
        )
        .route(
            "/user",
            get(|session: Session| async move {
                let user: Option<String> = session.get("user").await?;
                Ok::<_, SessionError>(user.unwrap_or_default())
            }),
        )
        .route(
            "/slow-plain",
            get(move || {
                let gate = plain_gate.clone();
                async move {
                    gate.holding.notify_one();
                    gate.release.notified().await;
                    "plain"
                }
            }),
        )
        .layer(layer)
}

/// Sends a request to `path` with `stale` (a session cookie that names no session), holds it at
/// the gate while the user logs in with the same cookie, answers it after the login, and checks
/// that the browser, applying the answers in that order, holds the login's cookie; returns the
/// late answer's status. Then checks that a request with `stale` sent after the login sees an
/// empty session, may not change it and sends no cookie.
async fn answered_after_a_login(app: &Router, gate: &Gate, stale: &str, path: &str) -> StatusCode {
    let late = tokio::spawn({
        let (app, stale, path) = (app.clone(), stale.to_owned(), path.to_owned());
        async move { get_req(&app, &path, Some(&stale)).await }
    });
    tokio::time::timeout(Duration::from_secs(10), gate.holding.notified())
        .await
        .expect("the request reached the gate");
    // ...while the user logs in: a new session, and its cookie.
    let login = send(app, "POST", "/login", Some(stale)).await;
    assert_eq!(login.status(), StatusCode::OK);
    let logged_in = cookie_pair(&login);
    // The request in flight is answered after the login.
    gate.release.notify_one();
    let late = tokio::time::timeout(Duration::from_secs(10), late)
        .await
        .expect("the request was answered")
        .unwrap();
    assert_eq!(
        jar_after(Some(stale.to_owned()), &[&login, &late]),
        Some(logged_in.clone()),
        "the Set-Cookie {:?} of {path}, answered after the login, logged the user out",
        set_cookies(&late)
    );
    let read = get_req(app, "/n", Some(stale)).await;
    assert!(set_cookies(&read).is_empty(), "{:?}", set_cookies(&read));
    assert_eq!(text_status(read).await, (StatusCode::OK, "0".into()));
    let write = send(app, "POST", "/n", Some(stale)).await;
    assert!(set_cookies(&write).is_empty(), "{:?}", set_cookies(&write));
    assert_eq!(write.status(), StatusCode::CONFLICT);
    // Refused at the insert already, before the handler goes on as if it were made.
    let attempt = send(app, "POST", "/try-write", Some(stale)).await;
    assert!(
        set_cookies(&attempt).is_empty(),
        "{:?}",
        set_cookies(&attempt)
    );
    assert_eq!(
        text_status(attempt).await,
        (StatusCode::OK, "refused".into())
    );
    // The login's session is intact.
    let user = get_req(app, "/user", Some(&logged_in)).await;
    assert_eq!(text(user).await, "ann");
    late.status()
}

/// The cookie of a session that has since gone (expired, evicted, removed).
async fn gone_cookie(app: &Router, store: &TestStore) -> String {
    let gone = new_session(app).await;
    let mut lease = store.hold(id_of(&gone).as_bytes()).await;
    lease.remove().await.unwrap();
    lease.release().await;
    gone
}

/// A value that is not ours (an older version of the site's cookie, say).
const MALFORMED: &str = "session=not-an-id";

async fn a_request_with_a_gone_cookie_answered_after_a_login_does_not_log_the_user_out(kind: Kind) {
    let store = kind.store().await;
    let gate = Gate::default();
    let app = long_poll_app(SessionLayer::new(store.clone()), gate.clone());
    let gone = gone_cookie(&app, &store).await;
    // A long poll of the page reads the session.
    let status = answered_after_a_login(&app, &gate, &gone, "/long-poll").await;
    assert_eq!(status, StatusCode::OK);
}

async fn a_change_with_a_gone_cookie_answered_after_a_login_is_refused(kind: Kind) {
    let store = kind.store().await;
    let gate = Gate::default();
    let app = long_poll_app(SessionLayer::new(store.clone()), gate.clone());
    let gone = gone_cookie(&app, &store).await;
    // Its new session's cookie would replace the login's: the change is refused.
    let status = answered_after_a_login(&app, &gate, &gone, "/slow-write").await;
    assert_eq!(status, StatusCode::CONFLICT);
}

/// Answers that replace a stale cookie are made ready one at a time: each holds the cookie's
/// key (here held by the test, as a request making its answer ready would) until it is ready.
async fn answers_replacing_a_stale_cookie_wait_for_its_key(kind: Kind) {
    let store = kind.store().await;
    let backend = Counting::new(store.clone());
    let app = app(SessionLayer::new(backend.clone()).lease_wait(Duration::from_secs(20)));
    let gone = gone_cookie(&app, &store).await;
    let key = id_of(&gone);
    for (method, path) in [("GET", "/n"), ("POST", "/login")] {
        let held = store.hold(key.as_bytes()).await;
        let leases = backend.leases();
        let answer = tokio::spawn({
            let (app, gone) = (app.clone(), gone.clone());
            async move { send(&app, method, path, Some(&gone)).await }
        });
        tokio::time::timeout(Duration::from_secs(10), backend.leases_asked(leases + 1))
            .await
            .expect("the request asked for a lease");
        assert!(
            !answer.is_finished(),
            "{path} was answered while another request held the cookie's key"
        );
        assert!(
            store.get(key.as_bytes()).await.is_none(),
            "nothing written yet"
        );
        held.release().await;
        let answer = tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .expect("answered once the key was free")
            .unwrap();
        assert_eq!(answer.status(), StatusCode::OK);
        let cookie = the_set_cookie(&answer);
        if path == "/n" {
            assert_eq!(cookie.max_age(), Some(cookie::time::Duration::ZERO));
        } else {
            // The login left the marker under the stale cookie's key.
            assert_replaced(&app, &store, &gone).await;
        }
    }
}

async fn a_login_on_a_stale_cookie_that_cannot_be_marked_is_undone(kind: Kind) {
    let store = kind.store().await;
    let backend = Faulty::new(store.clone());
    let app = long_poll_app(SessionLayer::new(backend.clone()), Gate::default());
    let gone = gone_cookie(&app, &store).await;
    backend.committed.lock().unwrap().clear();
    *backend.fail_writes_to.lock().unwrap() = Some(id_of(&gone).as_bytes().to_vec());

    let response = send(&app, "POST", "/login", Some(&gone)).await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        set_cookies(&response).is_empty(),
        "{:?}",
        set_cookies(&response)
    );
    let committed = backend.committed.lock().unwrap().clone();
    assert_eq!(committed.len(), 1, "the new session was written first");
    assert!(
        store.get(&committed[0]).await.is_none(),
        "and removed again when the marker could not be left"
    );
    assert!(store.get(id_of(&gone).as_bytes()).await.is_none());

    // Once the store takes writes again, the login goes through.
    *backend.fail_writes_to.lock().unwrap() = None;
    let response = send(&app, "POST", "/login", Some(&gone)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let logged_in = cookie_pair(&response);
    assert_eq!(
        text(get_req(&app, "/user", Some(&logged_in)).await).await,
        "ann"
    );
}

/// A removal is only a courtesy: when the cookie's key cannot be checked for a login's marker
/// (its lease stays busy), none is sent, rather than one that might log a login out.
async fn a_removal_whose_key_cannot_be_checked_is_not_sent(kind: Kind) {
    let store = kind.store().await;
    let gate = Gate::default();
    let app = long_poll_app(
        SessionLayer::new(store.clone()).lease_wait(Duration::from_millis(200)),
        gate.clone(),
    );
    let gone = gone_cookie(&app, &store).await;
    // The long poll reads the session (the cookie names none); while it waits, another holder
    // takes the cookie's key and keeps it past the long poll's answer.
    let poll = tokio::spawn({
        let (app, gone) = (app.clone(), gone.clone());
        async move { get_req(&app, "/long-poll", Some(&gone)).await }
    });
    tokio::time::timeout(Duration::from_secs(10), gate.holding.notified())
        .await
        .expect("the long poll read the session");
    let held = store.hold(id_of(&gone).as_bytes()).await;
    gate.release.notify_one();
    let response = tokio::time::timeout(Duration::from_secs(10), poll)
        .await
        .expect("the long poll was answered")
        .unwrap();
    assert!(
        set_cookies(&response).is_empty(),
        "{:?}",
        set_cookies(&response)
    );
    assert_eq!(text_status(response).await, (StatusCode::OK, String::new()));
    held.release().await;
    let response = get_req(&app, "/n", Some(&gone)).await;
    let removal = the_set_cookie(&response);
    assert_eq!(removal.max_age(), Some(cookie::time::Duration::ZERO));
}

async fn a_request_with_a_malformed_cookie_answered_after_a_login_does_not_log_the_user_out(
    kind: Kind,
) {
    let store = kind.store().await;
    let gate = Gate::default();
    let app = long_poll_app(SessionLayer::new(store.clone()), gate.clone());
    // A slow request that never touches the session sends no cookie at all.
    let status = answered_after_a_login(&app, &gate, MALFORMED, "/slow-plain").await;
    assert_eq!(status, StatusCode::OK);
}

async fn a_session_request_with_a_malformed_cookie_answered_after_a_login_does_not_log_the_user_out(
    kind: Kind,
) {
    let store = kind.store().await;
    let gate = Gate::default();
    let app = long_poll_app(SessionLayer::new(store.clone()), gate.clone());
    let status = answered_after_a_login(&app, &gate, MALFORMED, "/long-poll").await;
    assert_eq!(status, StatusCode::OK);
    let status = answered_after_a_login(&app, &gate, "session=other-junk", "/slow-write").await;
    assert_eq!(status, StatusCode::CONFLICT);
}

async fn a_live_session_cookie_behind_the_candidates_tried_is_never_expired(kind: Kind) {
    let store = kind.store().await;
    let app = app(SessionLayer::new(store.clone()));
    let live = new_session(&app).await;
    // Four stale values of the name come first (more specific paths, or planted from a sibling
    // subdomain); the live one is the fifth, and is not looked for.
    let stale: Vec<String> = (1..=4).map(unknown_pair).collect();
    let header = format!("{}; {live}", stale.join("; "));
    let response = get_req(&app, "/n", Some(&header)).await;
    assert_eq!(response.status(), StatusCode::OK);
    // The stale cookies live under other paths or domains: a removal cookie with the layer's
    // attributes hits only the live one.
    assert_eq!(
        jar_after(Some(live.clone()), &[&response]),
        Some(live.clone()),
        "a removal cookie expired the live session's cookie: {:?}",
        set_cookies(&response)
    );
    assert!(store.get(id_of(&live).as_bytes()).await.is_some());
}

async fn the_longest_inactivity_period_keeps_the_session(kind: Kind) {
    let store = kind.store().await;
    let app = routes()
        .route(
            "/remember-forever",
            post(|session: Session| async move {
                session.insert("user", "ann").await?;
                session
                    .set_expiry(Some(Expiry::OnInactivity(Duration::MAX)))
                    .await
            }),
        )
        .layer(SessionLayer::new(store.clone()));
    let response = send(&app, "POST", "/remember-forever", None).await;
    assert_eq!(response.status(), StatusCode::OK);
    let cookies = set_cookies(&response);
    let pair = jar_after(None, &[&response]);
    assert!(
        pair.is_some(),
        "the session was not saved, or its cookie expired: {cookies:?}"
    );
    let pair = pair.unwrap();
    assert!(store.get(id_of(&pair).as_bytes()).await.is_some());
}

async fn a_login_retried_after_its_answer_was_lost_is_not_refused(kind: Kind) {
    let store = kind.store().await;
    let app = app(SessionLayer::new(store.clone()));
    let anonymous = new_session(&app).await;
    // The server logs the user in, but the answer never reaches the browser (the connection
    // dropped, a proxy timed out): the browser still holds the pre-login cookie.
    let lost = send(&app, "POST", "/login", Some(&anonymous)).await;
    assert_eq!(lost.status(), StatusCode::OK);
    drop(lost);

    // The user submits the login form again, with the only cookie the browser has.
    let retry = send(&app, "POST", "/login", Some(&anonymous)).await;
    assert_eq!(
        retry.status(),
        StatusCode::OK,
        "the retried login was refused; the user cannot log in for REPLACED_GRACE"
    );
    let logged_in = cookie_pair(&retry);
    assert!(store.get(id_of(&logged_in).as_bytes()).await.is_some());
    // A new session, with nothing of the one the old cookie named (`n` was set before the first
    // login): an old, maybe attacker-known id never leads to a session's data.
    assert_ne!(id_of(&logged_in), id_of(&anonymous));
    let read = get_req(&app, "/n", Some(&logged_in)).await;
    assert_eq!(text_status(read).await, (StatusCode::OK, "0".into()));
    // A request with the old cookie that is not a login is still refused and sends no cookie.
    let racing = send(&app, "POST", "/n", Some(&anonymous)).await;
    assert_eq!(racing.status(), StatusCode::CONFLICT);
    assert!(
        set_cookies(&racing).is_empty(),
        "{:?}",
        set_cookies(&racing)
    );
}

/// A login that calls `cycle_id` with a cookie replaced moments ago but then saves nothing sends
/// nothing: not a removal, which would log out the login that replaced the cookie.
async fn a_login_on_a_replaced_cookie_that_saves_nothing_sends_no_cookie(kind: Kind) {
    let store = kind.store().await;
    let app = routes()
        .route(
            "/rotate",
            post(|session: Session| async move { session.cycle_id().await }),
        )
        .layer(SessionLayer::new(store.clone()));
    let anonymous = new_session(&app).await;
    let login = send(&app, "POST", "/login", Some(&anonymous)).await;
    let logged_in = cookie_pair(&login);
    let rotate = send(&app, "POST", "/rotate", Some(&anonymous)).await;
    assert_eq!(rotate.status(), StatusCode::OK);
    assert_eq!(
        jar_after(Some(logged_in.clone()), &[&rotate]),
        Some(logged_in)
    );
}

/// A request in flight, driven by hand so that a handler's task can drop it (the client goes
/// away) at an exact point.
type InFlight = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<axum::response::Response, std::convert::Infallible>>
            + Send,
    >,
>;

thread_local! {
    /// The request [`Disconnecting`] drops; per test thread (the test runs on a current-thread
    /// runtime, so the handler's tasks run on that thread too).
    static IN_FLIGHT: std::cell::RefCell<Option<InFlight>> = const { std::cell::RefCell::new(None) };
}

/// Reads as a `u64`; while it is read (inside the session's access, with its state held), the
/// client goes away: the request's future is dropped.
struct Disconnecting;

impl<'de> Deserialize<'de> for Disconnecting {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let request = IN_FLIGHT.with(|slot| slot.borrow_mut().take());
        assert!(request.is_some(), "the request was in flight");
        drop(request);
        u64::deserialize(deserializer)?;
        Ok(Disconnecting)
    }
}

async fn a_request_ended_during_an_access_releases_the_lease_when_the_next_waiting_access_is_cancelled(
    kind: Kind,
) {
    let store = kind.store().await;
    let backend = Counting::new(store.clone());
    let (done, mut first_done) = tokio::sync::mpsc::unbounded_channel::<bool>();
    let second_waits = Arc::new(Notify::new());
    let keep = Arc::new(Notify::new());
    let app = routes()
        .route(
            "/two-tasks",
            post({
                let (done, second_waits, keep) = (done.clone(), second_waits.clone(), keep.clone());
                move |session: Session| {
                    let (done, second_waits, keep) =
                        (done.clone(), second_waits.clone(), keep.clone());
                    async move {
                        let second_slot: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>> =
                            Arc::default();
                        // The first task reads the session; the client goes away meanwhile.
                        // It then cancels the second (a timeout, a select), and keeps its
                        // handle a while, as a task of the handler's may.
                        drop(tokio::spawn({
                            let (session, second_slot) = (session.clone(), second_slot.clone());
                            async move {
                                let read = session.get::<Disconnecting>("n").await;
                                if let Some(second) = second_slot.lock().unwrap().take() {
                                    second.abort();
                                }
                                done.send(read.is_ok()).unwrap();
                                keep.notified().await;
                                drop(session);
                            }
                        }));
                        // The second task waits for the session while the first holds it.
                        let second = tokio::spawn({
                            let session = session.clone();
                            async move {
                                second_waits.notify_one();
                                drop(session.get::<u64>("n").await);
                            }
                        });
                        *second_slot.lock().unwrap() = Some(second);
                        std::future::pending::<Result<(), SessionError>>().await
                    }
                }
            }),
        )
        .layer(SessionLayer::new(backend.clone()).lease_wait(Duration::from_millis(300)));
    let pair = new_session(&app).await;

    // Held elsewhere, so that the first task holds the session's state while it waits.
    let held = store.hold(id_of(&pair).as_bytes()).await;
    let leases = backend.leases();
    let request = axum::http::Request::builder()
        .method("POST")
        .uri("/two-tasks")
        .header(header::COOKIE, &pair)
        .body(axum::body::Body::empty())
        .unwrap();
    let request: InFlight = Box::pin(tower::ServiceExt::oneshot(app.clone(), request));
    IN_FLIGHT.with(|slot| *slot.borrow_mut() = Some(request));
    std::future::poll_fn(|cx| {
        IN_FLIGHT.with(|slot| {
            let mut slot = slot.borrow_mut();
            assert!(slot.as_mut().unwrap().as_mut().poll(cx).is_pending());
        });
        std::task::Poll::Ready(())
    })
    .await;
    tokio::time::timeout(Duration::from_secs(10), backend.leases_asked(leases + 1))
        .await
        .expect("the first task waits for the session's lease");
    tokio::time::timeout(Duration::from_secs(10), second_waits.notified())
        .await
        .expect("the second task waits for the session");
    held.release().await;
    tokio::time::timeout(Duration::from_secs(10), first_done.recv())
        .await
        .expect("the first task's read finished")
        .unwrap();
    // Let the cancellation of the second task happen.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }

    // The request is over: its session's lease is free, whoever still holds a handle.
    let response = get_req(&app, "/n", Some(&pair)).await;
    assert_eq!(
        text_status(response).await,
        (StatusCode::OK, "1".into()),
        "the lease of the ended request is still held"
    );
    keep.notify_one();
}

// --- Review 13: hostile cookies and the races around a stale cookie, tried from the outside ---
//
// Each test below is an attack on issue 13's promise ("hostile cookies and values never log a
// user out or leak a lease", file and Redis). The ones that found a hole say so in their doc.

/// Sends one request through `app` with one `Cookie` header per entry of `headers` (HTTP/2
/// clients send each cookie in a header of its own), of these exact bytes.
async fn send_cookie_headers(
    app: &Router,
    method: &str,
    path: &str,
    headers: &[Vec<u8>],
) -> axum::http::Response<axum::body::Body> {
    let mut request = axum::http::Request::builder().method(method).uri(path);
    for value in headers {
        request = request.header(
            header::COOKIE,
            axum::http::HeaderValue::from_bytes(value).unwrap(),
        );
    }
    tower::ServiceExt::oneshot(
        app.clone(),
        request.body(axum::body::Body::empty()).unwrap(),
    )
    .await
    .unwrap()
}

/// Odd bytes around a live session's cookie (duplicates, quotes, empty and non-UTF-8 values,
/// hundreds of malformed values, several `Cookie` headers, stale ids first) neither hide the
/// live session nor replace or expire its cookie.
async fn review13_odd_cookie_bytes_never_hide_replace_or_expire_a_live_session(kind: Kind) {
    let store = kind.store().await;
    let app = app(SessionLayer::new(store.clone()));
    let live = new_session(&app).await;
    let value = live.split_once('=').unwrap().1.to_owned();
    let hundreds: Vec<String> = (0..300).map(|i| format!("session=junk{i}")).collect();
    let headers: Vec<Vec<Vec<u8>>> = vec![
        vec![format!("{live}; {live}").into_bytes()],
        vec![format!("session=\"{value}\"").into_bytes()],
        vec![format!(" session = {value} ; session=junk").into_bytes()],
        vec![format!("session=; {live}").into_bytes()],
        vec![format!("session=\"; session=\"\"; {live}").into_bytes()],
        vec![[b"session=\xff\xfe\x80; ".as_slice(), live.as_bytes()].concat()],
        vec![format!("session=café; {live}; session=ünïcödé").into_bytes()],
        vec![format!("session=junk; {live}; session=other-junk").into_bytes()],
        vec![format!("{}; {live}", hundreds.join("; ")).into_bytes()],
        vec![b"session=junk".to_vec(), live.clone().into_bytes()],
        vec![
            unknown_pair(1).into_bytes(),
            b"session=junk".to_vec(),
            format!("{}; {live}", unknown_pair(2)).into_bytes(),
        ],
        vec![format!(
            "{}; {}; {}; {live}",
            unknown_pair(1),
            unknown_pair(2),
            unknown_pair(3)
        )
        .into_bytes()],
    ];
    for (i, header) in headers.iter().enumerate() {
        let response = send_cookie_headers(&app, "POST", "/n", header).await;
        assert!(
            set_cookies(&response).is_empty(),
            "case {i}: {:?}",
            set_cookies(&response)
        );
        assert_eq!(
            text_status(response).await,
            (StatusCode::OK, (i + 2).to_string()),
            "case {i}: the live session was not found"
        );
    }
    // A logout with odd values around the cookie ends the live session, and only it.
    let response = send_cookie_headers(
        &app,
        "POST",
        "/logout",
        &[format!("session=junk; {live}; session=").into_bytes()],
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(jar_after(Some(live.clone()), &[&response]), None);
    assert_replaced(&app, &store, &live).await;
}

/// Values a client can derive from a live session's cookie (or send without signing) never
/// reach that session: each starts a fresh one, with a fresh id, and the live one is untouched.
async fn review13_values_near_a_live_id_never_reach_its_session(kind: Kind) {
    let store = kind.store().await;
    let keys = SigningKeys::new([[7u8; 32]]).unwrap();
    for signed in [false, true] {
        let layer = SessionLayer::new(store.clone());
        let app = app(if signed {
            layer.signed(keys.clone())
        } else {
            layer
        });
        let live = new_session(&app).await;
        let value = live.split_once('=').unwrap().1.to_owned();
        let id_text = value.split('.').next().unwrap().to_owned();
        let mut near = vec![
            format!("session={value}x"),
            format!("session={}", &value[..value.len() - 1]),
            format!("session=\" {value}\""),
            format!("session={value}."),
            format!("session={}", value.to_ascii_uppercase()),
            format!("session={id_text}.{}", "A".repeat(43)),
        ];
        if signed {
            // The bare id, without its tag.
            near.push(format!("session={id_text}"));
        }
        for cookie in &near {
            let response = send(&app, "POST", "/n", Some(cookie)).await;
            assert_eq!(response.status(), StatusCode::OK, "{cookie}");
            let fresh = cookie_pair(&response);
            assert_ne!(id_of(&fresh), id_of(&live), "{cookie}");
            assert_eq!(
                text(response).await,
                "1",
                "{cookie} reached the live session"
            );
        }
        let response = get_req(&app, "/n", Some(&live)).await;
        assert_eq!(text_status(response).await, (StatusCode::OK, "1".into()));
    }
}

/// Requests that never touch the session do no store access, whatever their cookies hold
/// (a live, a replaced, a gone and malformed values, hundreds of values).
async fn review13_untouched_requests_with_hostile_cookies_do_no_store_access(kind: Kind) {
    let store = kind.store().await;
    let backend = Counting::new(store.clone());
    let app = routes()
        .route(
            "/id-only",
            get(|session: Session| async move { format!("{:?}", session.id()) }),
        )
        .layer(SessionLayer::new(backend.clone()));
    let live = new_session(&app).await;
    let replaced = new_session(&app).await;
    send(&app, "POST", "/logout", Some(&replaced)).await;
    let gone = gone_cookie(&app, &store).await;
    let hundreds: Vec<String> = (0..300).map(|i| format!("session=junk{i}")).collect();
    let accesses = backend.leases() + backend.unleased_reads();
    for cookie in [
        live.clone(),
        replaced.clone(),
        gone.clone(),
        format!("session=junk; {gone}; {replaced}; {live}"),
        format!("{}; {live}", hundreds.join("; ")),
        "session=\"".to_owned(),
    ] {
        for path in ["/plain", "/id-only"] {
            let response = get_req(&app, path, Some(&cookie)).await;
            assert_eq!(response.status(), StatusCode::OK);
            assert!(set_cookies(&response).is_empty(), "{path} {cookie}");
        }
    }
    assert_eq!(
        backend.leases() + backend.unleased_reads(),
        accesses,
        "an untouched request reached the store"
    );
}

/// A route that logs in and then waits at `barrier`: two such logins load the session (and see
/// no marker) before either saves.
fn two_logins_app(layer: SessionLayer, barrier: Arc<tokio::sync::Barrier>) -> Router {
    routes()
        .route(
            "/login-together",
            post(move |session: Session| {
                let barrier = Arc::clone(&barrier);
                async move {
                    session.cycle_id().await?;
                    session.insert("user", "ann").await?;
                    barrier.wait().await;
                    Ok::<_, SessionError>(())
                }
            }),
        )
        .layer(layer)
}

/// Two logins at once on one stale cookie (a gone id, a malformed value, both): both answer,
/// each with a session of its own; the cookie is left marked; no key's lease is left held.
async fn review13_two_logins_at_once_on_one_stale_cookie(kind: Kind) {
    let store = kind.store().await;
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let app = two_logins_app(
        SessionLayer::new(store.clone()).lease_wait(Duration::from_secs(10)),
        Arc::clone(&barrier),
    );
    let quick = app_with_wait(&store, Duration::from_millis(300));
    let gone = gone_cookie(&app, &store).await;
    for stale in [
        gone.clone(),
        MALFORMED.to_owned(),
        format!("{gone}; session=junk"),
    ] {
        let logins: Vec<_> = (0..2)
            .map(|_| {
                let (app, stale) = (app.clone(), stale.clone());
                tokio::spawn(
                    async move { send(&app, "POST", "/login-together", Some(&stale)).await },
                )
            })
            .collect();
        let mut pairs = Vec::new();
        for login in logins {
            let login = tokio::time::timeout(Duration::from_secs(20), login)
                .await
                .expect("both logins were answered")
                .unwrap();
            assert_eq!(login.status(), StatusCode::OK, "{stale}");
            pairs.push(cookie_pair(&login));
        }
        assert_ne!(id_of(&pairs[0]), id_of(&pairs[1]));
        for pair in &pairs {
            assert_eq!(
                text(get_req(&quick, "/user", Some(pair)).await).await,
                "ann"
            );
        }
        // The stale cookie is marked: a change with it is refused, and sends no cookie.
        let write = send(&quick, "POST", "/n", Some(&stale)).await;
        assert!(set_cookies(&write).is_empty(), "{:?}", set_cookies(&write));
        assert_eq!(write.status(), StatusCode::CONFLICT, "{stale}");
        // A third login on it goes through at once: no key's lease was left held.
        let again = send(&quick, "POST", "/login", Some(&stale)).await;
        assert_eq!(again.status(), StatusCode::OK, "{stale}");
    }
}

/// The test routes under a layer of `store` that waits at most `wait` for a lease: a request
/// that finds a lease left held answers 503.
fn app_with_wait(store: &TestStore, wait: Duration) -> Router {
    let gate = Gate::default();
    long_poll_app(SessionLayer::new(store.clone()).lease_wait(wait), gate)
}

/// The client goes away while its request holds a stale cookie's keys and waits for the next
/// one: every key it held is free at once for the next request.
async fn review13_a_request_cancelled_while_holding_stale_keys_releases_them(kind: Kind) {
    let store = kind.store().await;
    let backend = Counting::new(store.clone());
    let app = app(SessionLayer::new(backend.clone()).lease_wait(Duration::from_secs(20)));
    let quick = app_with_wait(&store, Duration::from_millis(300));
    // Keys sort as [0; 16] < the malformed value's key (most likely) < [0xff; 16]: the request
    // takes the first ones and waits for the last, which the test holds.
    let (first, last) = (unknown_pair(0), unknown_pair(0xff));
    // The login last: it leaves the malformed value's key marked.
    for (method, path) in [("POST", "/n"), ("POST", "/logout"), ("POST", "/login")] {
        let cookie = format!("{first}; session=junk; {last}");
        let held = store.hold(id_of(&last).as_bytes()).await;
        let leases = backend.leases();
        let request = tokio::spawn({
            let (app, cookie) = (app.clone(), cookie.clone());
            async move { send(&app, method, path, Some(&cookie)).await }
        });
        tokio::time::timeout(Duration::from_secs(10), backend.leases_asked(leases + 3))
            .await
            .expect("the request took the first keys and waits for the last");
        request.abort();
        assert!(request.await.unwrap_err().is_cancelled());
        held.release().await;
        // Nothing was written, and no key is held.
        assert!(store.get(id_of(&first).as_bytes()).await.is_none());
        let response = send(&quick, method, path, Some(&cookie)).await;
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "{path}: a key's lease was left held by the cancelled request"
        );
        // Start again from an unmarked cookie.
        for key in [&first, &last] {
            let mut lease = store.hold(id_of(key).as_bytes()).await;
            lease.remove().await.unwrap();
            lease.release().await;
        }
    }
}

/// A handler that panics after touching the session of a stale cookie leaves no lease held.
async fn review13_a_panic_with_a_stale_cookie_leaks_no_lease(kind: Kind) {
    let store = kind.store().await;
    let app = gated_app(
        SessionLayer::new(store.clone()).lease_wait(Duration::from_millis(300)),
        Gate::default(),
    );
    let gone = gone_cookie(&app, &store).await;
    for stale in [gone, MALFORMED.to_owned()] {
        let request = tokio::spawn({
            let (app, stale) = (app.clone(), stale.clone());
            async move { send(&app, "POST", "/panic", Some(&stale)).await }
        });
        assert!(request.await.unwrap_err().is_panic());
        let response = send(&app, "POST", "/login", Some(&stale)).await;
        assert_eq!(response.status(), StatusCode::OK, "{stale}");
    }
}

/// When a stale cookie's key stays busy past `lease_wait`: a change or a login answers `503`
/// with `Retry-After` and no cookie, and writes nothing (no new session, no marker); a read
/// answers as the handler did, without a cookie. Once the key is free, all go through.
async fn review13_a_stale_key_lease_timeout_answers_503_and_writes_nothing(kind: Kind) {
    let store = kind.store().await;
    let backend = Faulty::new(store.clone());
    let app = long_poll_app(
        SessionLayer::new(backend.clone()).lease_wait(Duration::from_millis(200)),
        Gate::default(),
    );
    let gone = gone_cookie(&app, &store).await;
    backend.committed.lock().unwrap().clear();
    let held = store.hold(id_of(&gone).as_bytes()).await;
    for path in ["/n", "/login"] {
        let response = send(&app, "POST", path, Some(&gone)).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}");
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        assert!(set_cookies(&response).is_empty(), "{path}");
    }
    let read = get_req(&app, "/n", Some(&gone)).await;
    assert!(set_cookies(&read).is_empty());
    assert_eq!(text_status(read).await, (StatusCode::OK, "0".into()));
    assert!(
        backend.committed.lock().unwrap().is_empty(),
        "something was written: {:?}",
        backend.committed.lock().unwrap()
    );
    held.release().await;
    let login = send(&app, "POST", "/login", Some(&gone)).await;
    assert_eq!(login.status(), StatusCode::OK);
    let logged_in = cookie_pair(&login);
    assert_eq!(
        text(get_req(&app, "/user", Some(&logged_in)).await).await,
        "ann"
    );
}

/// HOLE (fixed): a logout sent with the pre-login cookie and answered after a login made with
/// it (two tabs) answered 200 and sent nothing: the browser kept the login's cookie, and the
/// user who asked to log out stayed logged in. On a live session, and on a stale cookie
/// (loaded after the login, or before it and answered after).
async fn review13_a_logout_answered_after_a_login_logs_the_user_out(kind: Kind) {
    let store = kind.store().await;
    let gate = Gate::default();
    let app = routes()
        .route(
            "/slow-logout",
            post({
                let gate = gate.clone();
                move |session: Session| {
                    let gate = gate.clone();
                    async move {
                        session.flush().await?;
                        gate.holding.notify_one();
                        gate.release.notified().await;
                        Ok::<_, SessionError>(())
                    }
                }
            }),
        )
        .layer(SessionLayer::new(store.clone()));
    let live = new_session(&app).await;
    let gone = gone_cookie(&app, &store).await;
    for old in [live, gone.clone(), MALFORMED.to_owned()] {
        let login = send(&app, "POST", "/login", Some(&old)).await;
        assert_eq!(login.status(), StatusCode::OK);
        let logout = send(&app, "POST", "/logout", Some(&old)).await;
        assert_eq!(logout.status(), StatusCode::OK, "{old}");
        assert_eq!(
            jar_after(Some(old.clone()), &[&login, &logout]),
            None,
            "the logout with {old}, answered after the login, left the user logged in"
        );
    }
    // Loaded before the login, answered after it.
    let stale = unknown_pair(9);
    let logout = tokio::spawn({
        let (app, stale) = (app.clone(), stale.clone());
        async move { send(&app, "POST", "/slow-logout", Some(&stale)).await }
    });
    tokio::time::timeout(Duration::from_secs(10), gate.holding.notified())
        .await
        .expect("the logout reached the gate");
    let login = send(&app, "POST", "/login", Some(&stale)).await;
    assert_eq!(login.status(), StatusCode::OK);
    gate.release.notify_one();
    let logout = tokio::time::timeout(Duration::from_secs(10), logout)
        .await
        .expect("the logout was answered")
        .unwrap();
    assert_eq!(logout.status(), StatusCode::OK);
    assert_eq!(
        jar_after(Some(stale), &[&login, &logout]),
        None,
        "the logout answered after the login left the user logged in"
    );
}

/// The other order: a login sent with the old cookie and answered after a logout made with it
/// logs in (the last answer wins), with nothing of the logged-out session, and leaves no lease
/// held.
async fn review13_a_login_answered_after_a_logout_logs_in(kind: Kind) {
    let store = kind.store().await;
    let app = app_with_wait(&store, Duration::from_millis(300));
    let live = new_session(&app).await;
    let gone = gone_cookie(&app, &store).await;
    for old in [live, gone, MALFORMED.to_owned()] {
        let logout = send(&app, "POST", "/logout", Some(&old)).await;
        assert_eq!(logout.status(), StatusCode::OK);
        let login = send(&app, "POST", "/login", Some(&old)).await;
        assert_eq!(login.status(), StatusCode::OK, "{old}");
        let logged_in = jar_after(Some(old.clone()), &[&logout, &login]);
        assert_eq!(logged_in, Some(cookie_pair(&login)), "{old}");
        let logged_in = logged_in.unwrap();
        assert_eq!(
            text(get_req(&app, "/user", Some(&logged_in)).await).await,
            "ann"
        );
        assert_eq!(text(get_req(&app, "/n", Some(&logged_in)).await).await, "0");
    }
}

/// HOLE (fixed): only the first malformed value of the cookie's name had a key. A browser that
/// holds two (one under a longer path, sent first) sends both from that path and only the other
/// from `/`; a login from one of them left its marker where a request from the other did not
/// look, and that request, answered after the login, expired the login's cookie (`Path=/`).
async fn review13_two_malformed_values_of_two_paths_and_a_login(kind: Kind) {
    let store = kind.store().await;
    let gate = Gate::default();
    let app = long_poll_app(SessionLayer::new(store.clone()), gate.clone());
    // `session=junk-app-N` lives under `Path=/app`, `session=junk-root-N` under `Path=/` (the
    // layer's): from /app the browser sends both, the longer path first; from / only the latter.
    // Fresh values for each pass: a pass leaves its values marked.
    for pass in 0..2 {
        let from_app = format!("session=junk-app-{pass}; session=junk-root-{pass}");
        let from_root = format!("session=junk-root-{pass}");
        let (poll_cookie, login_cookie) = if pass == 0 {
            (from_root.clone(), from_app.clone())
        } else {
            (from_app.clone(), from_root.clone())
        };
        let late = tokio::spawn({
            let (app, cookie) = (app.clone(), poll_cookie.clone());
            async move { get_req(&app, "/long-poll", Some(&cookie)).await }
        });
        tokio::time::timeout(Duration::from_secs(10), gate.holding.notified())
            .await
            .expect("the long poll reached the gate");
        let login = send(&app, "POST", "/login", Some(&login_cookie)).await;
        assert_eq!(login.status(), StatusCode::OK);
        let logged_in = cookie_pair(&login);
        gate.release.notify_one();
        let late = tokio::time::timeout(Duration::from_secs(10), late)
            .await
            .expect("the long poll was answered")
            .unwrap();
        assert_eq!(
            jar_after(Some(from_root.clone()), &[&login, &late]),
            Some(logged_in),
            "the long poll sent with {poll_cookie:?}, answered after a login sent with \
             {login_cookie:?}, logged the user out: {:?}",
            set_cookies(&late)
        );
    }
}

/// More malformed values than are looked at: a request sent with them and answered after a
/// login sent with the same ones does not log the user out (the first ones are marked).
async fn review13_many_malformed_values_and_a_login(kind: Kind) {
    let store = kind.store().await;
    let gate = Gate::default();
    let app = long_poll_app(SessionLayer::new(store.clone()), gate.clone());
    let many: Vec<String> = (0..50).map(|i| format!("session=junk{i}")).collect();
    let status = answered_after_a_login(&app, &gate, &many.join("; "), "/long-poll").await;
    assert_eq!(status, StatusCode::OK);
    let many: Vec<String> = (0..50).map(|i| format!("session=other{i}")).collect();
    let status = answered_after_a_login(&app, &gate, &many.join("; "), "/slow-write").await;
    assert_eq!(status, StatusCode::CONFLICT);
}

/// HOLE (fixed): more well-formed values than are tried (five stale ids, say path-scoped or
/// planted) turned the whole stale-cookie guard off, not only the removal: a login with them left
/// no marker, and a change sent with them and answered after the login sent its new session's
/// cookie, which replaced the login's.
async fn review13_more_ids_than_are_tried_and_a_login(kind: Kind) {
    let store = kind.store().await;
    let gate = Gate::default();
    let app = long_poll_app(SessionLayer::new(store.clone()), gate.clone());
    let five: Vec<String> = (20..25).map(unknown_pair).collect();
    let status = answered_after_a_login(&app, &gate, &five.join("; "), "/slow-write").await;
    assert_eq!(status, StatusCode::CONFLICT);
    let five: Vec<String> = (30..35).map(unknown_pair).collect();
    let status = answered_after_a_login(&app, &gate, &five.join("; "), "/long-poll").await;
    assert_eq!(status, StatusCode::OK);
}

/// OPEN: one cookie value held by several browsers (an empty `session=`, a value an old version
/// of the site set for everyone, or one planted from a sibling subdomain when the name has no
/// `__Host-` prefix) stands for one key. A login by one of them, or by an attacker who sends that
/// value on purpose (again every `REPLACED_GRACE`), leaves the marker there, and every other
/// browser that sends it has its changes refused (`409`) and is never sent a new cookie, until
/// the marker expires. Not small to fix: the layer cannot tell two browsers that send the same
/// bytes apart.
async fn review13_a_value_shared_by_two_browsers_lets_one_login_refuse_the_others_changes(
    kind: Kind,
) {
    let store = kind.store().await;
    let app = app(SessionLayer::new(store.clone()));
    for shared in ["session=", &unknown_pair(5)] {
        // An attacker (or another user) logs in with the value.
        let login = send(&app, "POST", "/login", Some(shared)).await;
        assert_eq!(login.status(), StatusCode::OK);
        // Another browser with the same value starts an anonymous session.
        let response = send(&app, "POST", "/n", Some(shared)).await;
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "another browser's login with {shared:?} refused this browser's change"
        );
        assert!(jar_after(Some(shared.to_owned()), &[&response]).is_some());
    }
}

/// Makes a `file::NAME` and a `redis::NAME` test of each route test `NAME(kind: Kind)` listed (a
/// route test left out of the list is dead code, which the lints refuse). `NAME: multi_thread`
/// runs on a two-thread runtime; `NAME: open` marks a test of a hole not closed yet (ignored:
/// `cargo test -- --ignored` runs it).
macro_rules! every_backend {
    ($($name:ident $(: $flavor:ident)?),* $(,)?) => {
        every_backend!(@module file, File, $($name $(: $flavor)?),*);
        every_backend!(@module redis, Redis, $($name $(: $flavor)?),*);
    };
    (@module $module:ident, $kind:ident, $($name:ident $(: $flavor:ident)?),*) => {
        mod $module {
            $(every_backend!(@test $kind, $name $(: $flavor)?);)*
        }
    };
    (@test $kind:ident, $name:ident) => {
        #[tokio::test]
        async fn $name() {
            super::$name(super::Kind::$kind).await;
        }
    };
    (@test $kind:ident, $name:ident: open) => {
        #[tokio::test]
        #[ignore = "a hole found by review and not closed yet"]
        async fn $name() {
            super::$name(super::Kind::$kind).await;
        }
    };
    (@test $kind:ident, $name:ident: multi_thread) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            super::$name(super::Kind::$kind).await;
        }
    };
}

every_backend! {
    a_new_session_gets_a_cookie_and_keeps_its_data,
    an_untouched_request_sets_no_cookie_and_takes_no_lease,
    a_session_that_is_only_read_and_empty_sets_no_cookie,
    the_cookie_has_secure_defaults,
    configured_cookie_attributes_are_sent,
    a_browser_session_cookie_has_no_max_age_and_a_fixed_expiry_counts_down,
    a_malformed_cookie_gives_a_fresh_session,
    an_oversized_cookie_gives_a_fresh_session,
    an_unknown_cookie_gets_a_fresh_id_and_is_never_adopted,
    a_forged_cookie_gives_a_fresh_session,
    signed_cookies_accept_old_keys_and_sign_with_the_first,
    an_inactive_session_expires,
    an_unchanged_session_is_refreshed_at_most_once_per_interval,
    flush_deletes_the_session_and_expires_the_cookie,
    an_emptied_session_is_removed_and_its_cookie_expired,
    data_inserted_after_flush_goes_to_a_new_id,
    cycle_id_moves_the_data_to_a_new_id_and_removes_the_old_record,
    a_failed_cycle_id_keeps_the_old_session,
    a_cycle_id_whose_old_record_cannot_be_removed_is_undone,
    is_modified_tells_whether_the_request_changed_the_session,
    a_server_error_saves_nothing,
    a_server_error_saves_when_configured_to,
    a_client_error_saves_unless_configured_not_to,
    a_panicking_handler_releases_the_lease_and_saves_nothing,
    a_panic_caught_by_catch_panic_releases_the_lease_and_saves_nothing,
    a_dropped_response_future_releases_the_lease_and_saves_nothing,
    overlapping_accesses_share_one_load_and_a_cancelled_load_is_tried_again,
    concurrent_increments_of_one_session_lose_no_update: multi_thread,
    the_read_only_path_does_not_wait_for_a_held_lease,
    a_lease_wait_timeout_answers_503_with_retry_after,
    a_value_over_the_max_size_is_refused_and_nothing_is_written,
    a_failed_commit_replaces_the_handlers_success_with_a_500,
    the_typed_view_round_trips,
    a_session_deleted_by_logout_is_not_brought_back_by_a_concurrent_save,
    set_expiry_is_stored_with_the_session_and_resends_the_cookie,
    a_non_ascii_byte_in_another_cookie_does_not_hide_the_session,
    a_stale_session_cookie_listed_first_does_not_hide_the_live_one,
    a_host_prefixed_cookie_name_is_supported_and_its_rules_enforced,
    a_value_nested_too_deep_to_read_back_is_refused_and_the_session_kept,
    an_undecodable_stored_session_is_an_error_and_is_kept,
    a_request_abandoned_while_a_spawned_task_loads_the_session_releases_it,
    a_request_of_a_session_cycled_while_it_waited_does_not_replace_the_new_cookie,
    a_malformed_session_cookie_is_expired_when_the_session_is_touched,
    a_cookie_naming_a_gone_session_is_expired_when_the_session_is_touched,
    a_request_with_a_gone_cookie_answered_after_a_login_does_not_log_the_user_out,
    a_change_with_a_gone_cookie_answered_after_a_login_is_refused,
    answers_replacing_a_stale_cookie_wait_for_its_key,
    a_login_on_a_stale_cookie_that_cannot_be_marked_is_undone,
    a_removal_whose_key_cannot_be_checked_is_not_sent,
    a_request_with_a_malformed_cookie_answered_after_a_login_does_not_log_the_user_out,
    a_session_request_with_a_malformed_cookie_answered_after_a_login_does_not_log_the_user_out,
    a_live_session_cookie_behind_the_candidates_tried_is_never_expired,
    the_longest_inactivity_period_keeps_the_session,
    a_login_retried_after_its_answer_was_lost_is_not_refused,
    a_login_on_a_replaced_cookie_that_saves_nothing_sends_no_cookie,
    a_request_ended_during_an_access_releases_the_lease_when_the_next_waiting_access_is_cancelled,
    review13_odd_cookie_bytes_never_hide_replace_or_expire_a_live_session,
    review13_values_near_a_live_id_never_reach_its_session,
    review13_untouched_requests_with_hostile_cookies_do_no_store_access,
    review13_two_logins_at_once_on_one_stale_cookie: multi_thread,
    review13_a_request_cancelled_while_holding_stale_keys_releases_them,
    review13_a_panic_with_a_stale_cookie_leaks_no_lease,
    review13_a_stale_key_lease_timeout_answers_503_and_writes_nothing,
    review13_a_logout_answered_after_a_login_logs_the_user_out,
    review13_a_login_answered_after_a_logout_logs_in,
    review13_two_malformed_values_of_two_paths_and_a_login,
    review13_many_malformed_values_and_a_login,
    review13_more_ids_than_are_tried_and_a_login,
    review13_a_value_shared_by_two_browsers_lets_one_login_refuse_the_others_changes: open,
}
