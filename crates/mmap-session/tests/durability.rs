//! The layer over a store that forces each commit to the disk (`Durability::OnCommit`): its
//! writes run on tokio's blocking pool, and every path (a new session, changes, an id change, a
//! logout, requests of one session at once) still does what it does on the default store. The
//! store's own tests check that the syncs are issued (strace); this checks the layer's use of it.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use http_body_util::BodyExt as _;
use mmap_session::store::{Durability, Options, Store};
use mmap_session::{Session, SessionError, SessionLayer};
use tower::ServiceExt as _;

async fn count(session: Session) -> Result<String, SessionError> {
    let n: u64 = session.get("n").await?.unwrap_or(0) + 1;
    session.insert("n", n).await?;
    Ok(n.to_string())
}

async fn login(session: Session) -> Result<&'static str, SessionError> {
    session.insert("user", "ann").await?;
    session.cycle_id().await?;
    Ok("in")
}

async fn logout(session: Session) -> Result<&'static str, SessionError> {
    session.flush().await?;
    Ok("out")
}

fn app(store: &Store) -> Router {
    Router::new()
        .route("/", get(count))
        .route("/login", post(login))
        .route("/logout", post(logout))
        .layer(SessionLayer::new(store.clone()).secure(false))
}

/// Sends one request; returns the status, the body and the `name=value` of a `Set-Cookie`.
async fn send(
    app: &Router,
    method: &str,
    path: &str,
    cookie: Option<&str>,
) -> (StatusCode, String, Option<String>) {
    let mut request = Request::builder().method(method).uri(path);
    if let Some(cookie) = cookie {
        request = request.header(header::COOKIE, cookie);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let set_cookie = response.headers().get(header::SET_COOKIE).map(|value| {
        value
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_owned()
    });
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        String::from_utf8(body.to_vec()).unwrap(),
        set_cookie,
    )
}

#[tokio::test]
async fn every_write_path_works_on_a_store_that_syncs_each_commit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sessions");
    let store = Store::open_with(&path, Options::new().durability(Durability::OnCommit)).unwrap();
    assert_eq!(store.durability(), Durability::OnCommit);
    let app = app(&store);

    let (status, body, cookie) = send(&app, "GET", "/", None).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "1"));
    let cookie = cookie.expect("a new session sets its cookie");

    // Requests of one session at once: each waits for the one before, none is lost.
    let requests: Vec<_> = (0..8)
        .map(|_| {
            let (app, cookie) = (app.clone(), cookie.clone());
            tokio::spawn(async move { send(&app, "GET", "/", Some(&cookie)).await })
        })
        .collect();
    for request in requests {
        assert_eq!(request.await.unwrap().0, StatusCode::OK);
    }
    assert_eq!(send(&app, "GET", "/", Some(&cookie)).await.1, "10");

    // An id change writes the new record and the old id's marker.
    let (status, _, new_cookie) = send(&app, "POST", "/login", Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK);
    let new_cookie = new_cookie.expect("a login sends the new id");
    assert_ne!(new_cookie, cookie);
    assert_eq!(send(&app, "GET", "/", Some(&new_cookie)).await.1, "11");

    // A logout removes the record.
    let (status, _, removal) = send(&app, "POST", "/logout", Some(&new_cookie)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(removal.is_some(), "a logout expires the cookie");
    // The old cookie now names the logout's marker: a change on it is refused for a minute.
    assert_eq!(
        send(&app, "GET", "/", Some(&new_cookie)).await.0,
        StatusCode::CONFLICT
    );

    // No lease was left behind, and the file verifies once reopened alone.
    drop(app);
    drop(store);
    let store = Store::open(&path).unwrap();
    let report = store.verify();
    assert!(report.is_clean(), "{:?}", report.problems);
    assert!(store.entries().iter().all(|entry| entry.lease.is_none()));
}

/// A request cancelled while its commit waits for (or runs on) the blocking pool: the commit
/// completes or does not happen at all, the lease is released once it is done, and the next
/// request of the session is served.
#[test]
fn a_request_cancelled_while_its_commit_is_on_the_blocking_pool_leaves_no_lease() {
    use std::sync::mpsc as std_mpsc;
    use std::time::{Duration, Instant};

    // One blocking thread, so the test can keep the request's commit waiting for it.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let limit = Duration::from_secs(20);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions");
        let store =
            Store::open_with(&path, Options::new().durability(Durability::OnCommit)).unwrap();
        let (changed_tx, mut changed) = tokio::sync::mpsc::unbounded_channel::<()>();
        let app = Router::new()
            .route("/", get(count))
            .route(
                "/change",
                get(move |session: Session| {
                    let changed_tx = changed_tx.clone();
                    async move {
                        session.insert("n", 100_u64).await?;
                        changed_tx.send(()).unwrap();
                        Ok::<_, SessionError>("changed")
                    }
                }),
            )
            .layer(SessionLayer::new(store.clone()).secure(false));

        let (status, _, cookie) = tokio::time::timeout(limit, send(&app, "GET", "/", None))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
        let cookie = cookie.expect("a new session sets its cookie");

        // Occupy the only blocking thread until the request has been cancelled.
        let (unblock_tx, unblock) = std_mpsc::channel::<()>();
        let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
        let blocker = tokio::task::spawn_blocking(move || {
            started_tx.send(()).unwrap();
            let _ = unblock.recv_timeout(Duration::from_secs(20));
        });
        tokio::time::timeout(limit, started).await.unwrap().unwrap();

        let request = {
            let (app, cookie) = (app.clone(), cookie.clone());
            tokio::spawn(async move { send(&app, "GET", "/change", Some(&cookie)).await })
        };
        // The handler has changed the session; its commit cannot have run (the blocking pool is
        // busy). The client goes away now.
        tokio::time::timeout(limit, changed.recv())
            .await
            .unwrap()
            .unwrap();
        request.abort();
        assert!(request.await.unwrap_err().is_cancelled());
        unblock_tx.send(()).unwrap();
        tokio::time::timeout(limit, blocker).await.unwrap().unwrap();

        // Whatever the cancelled commit did, it finishes and lets the lease go.
        let deadline = Instant::now() + limit;
        while store.entries().iter().any(|entry| entry.lease.is_some()) {
            assert!(
                Instant::now() < deadline,
                "the cancelled request's lease is still held"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (status, body, _) = tokio::time::timeout(limit, send(&app, "GET", "/", Some(&cookie)))
            .await
            .unwrap();
        assert_eq!(
            status,
            StatusCode::OK,
            "the next request of the session is served"
        );
        assert!(
            body == "2" || body == "101",
            "the cancelled change was written whole or not at all: {body}"
        );
        eprintln!("after the cancelled change the session counts {body}");
        assert!(store.verify().is_clean());
    });
}
