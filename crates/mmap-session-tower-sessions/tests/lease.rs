//! The companion [`LeaseLayer`] in one process: an axum app with tower-sessions' layer over the
//! adapter and the `LeaseLayer` around it, driven through `oneshot`. Requests are made to overlap
//! by a handler that stops between reading and writing its session until the test lets it go.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, Request, StatusCode};
use axum::routing::get;
use axum::Router;
use common::{cookie_pair, id_of, wait_for};
use http_body_util::BodyExt as _;
use mmap_session_tower_sessions::store::{Options, Store};
use mmap_session_tower_sessions::{in_request_scope, LeaseLayer, MmapStore};
use tempfile::TempDir;
use tokio::sync::{mpsc, Semaphore};
use tower::ServiceExt as _;
use tower_sessions::{Expiry, Session, SessionManagerLayer, SessionStore};

/// Every wait of these tests is bounded by this.
const LIMIT: Duration = Duration::from_secs(20);

/// Where the gated handler stops: it reports that it has read the session, then waits for a
/// permit.
#[derive(Clone)]
struct Gate {
    entered: mpsc::UnboundedSender<()>,
    permits: Arc<Semaphore>,
}

/// The test's side of the gate.
struct GateControl {
    entered: mpsc::UnboundedReceiver<()>,
    permits: Arc<Semaphore>,
}

impl GateControl {
    /// Waits until a gated handler has read its session.
    async fn entered(&mut self) {
        tokio::time::timeout(LIMIT, self.entered.recv())
            .await
            .expect("no gated request read its session in time")
            .unwrap();
    }

    /// Lets one gated handler go on.
    fn open_once(&self) {
        self.permits.add_permits(1);
    }
}

fn failed(error: tower_sessions::session::Error) -> StatusCode {
    eprintln!("session error: {error}");
    StatusCode::INTERNAL_SERVER_ERROR
}

async fn increment(session: Session) -> Result<String, StatusCode> {
    let count: u64 = session.get("count").await.map_err(failed)?.unwrap_or(0) + 1;
    session.insert("count", count).await.map_err(failed)?;
    Ok(count.to_string())
}

/// `increment` that stops at the gate between its read and its write.
async fn gated_increment(State(gate): State<Gate>, session: Session) -> Result<String, StatusCode> {
    let count: u64 = session.get("count").await.map_err(failed)?.unwrap_or(0) + 1;
    gate.entered.send(()).unwrap();
    gate.permits.acquire().await.unwrap().forget();
    session.insert("count", count).await.map_err(failed)?;
    Ok(count.to_string())
}

async fn count(session: Session) -> Result<String, StatusCode> {
    let count: u64 = session.get("count").await.map_err(failed)?.unwrap_or(0);
    Ok(count.to_string())
}

async fn cycle(session: Session) -> Result<String, StatusCode> {
    session.cycle_id().await.map_err(failed)?;
    increment(session).await
}

async fn flush(session: Session) -> Result<&'static str, StatusCode> {
    session.flush().await.map_err(failed)?;
    Ok("flushed")
}

/// Reads the session in the request, then again in a spawned task outside the request's scope,
/// which the handler awaits.
async fn spawned_read(session: Session) -> Result<String, StatusCode> {
    let here: u64 = session.get("count").await.map_err(failed)?.unwrap_or(0);
    let there = tokio::spawn(async move { session.get::<u64>("count").await })
        .await
        .unwrap()
        .map_err(failed)?
        .unwrap_or(0);
    Ok(format!("{here} {there}"))
}

/// Increments the counter in a spawned task that saves the session itself; the task runs in the
/// request's scope when `scoped`.
async fn spawned_save(session: Session, scoped: bool) -> Result<String, StatusCode> {
    let count: u64 = session.get("count").await.map_err(failed)?.unwrap_or(0) + 1;
    let work = async move {
        session.insert("count", count).await?;
        session.save().await
    };
    let task = if scoped {
        tokio::spawn(in_request_scope(work))
    } else {
        tokio::spawn(work)
    };
    task.await.unwrap().map_err(failed)?;
    Ok(count.to_string())
}

/// The application: tower-sessions' layer over `store`, inside a `LeaseLayer` if `leased`.
fn app(store: MmapStore, leased: bool) -> (Router, GateControl) {
    let (entered_tx, entered) = mpsc::unbounded_channel();
    let permits = Arc::new(Semaphore::new(0));
    let gate = Gate {
        entered: entered_tx,
        permits: Arc::clone(&permits),
    };
    let router = Router::new()
        .route("/increment", get(increment))
        .route("/gated", get(gated_increment))
        .route("/count", get(count))
        .route("/cycle", get(cycle))
        .route("/flush", get(flush))
        .route("/untouched", get(|| async { "untouched" }))
        .route("/spawned-read", get(spawned_read))
        .route(
            "/spawned-save-scoped",
            get(|session: Session| spawned_save(session, true)),
        )
        .route(
            "/spawned-save-unscoped",
            get(|session: Session| spawned_save(session, false)),
        )
        .with_state(gate)
        .layer(
            SessionManagerLayer::new(store)
                .with_secure(false)
                .with_expiry(Expiry::OnInactivity(time::Duration::hours(1))),
        );
    let router = if leased {
        router.layer(LeaseLayer::new())
    } else {
        router
    };
    (router, GateControl { entered, permits })
}

fn fresh(options: Options) -> (TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_with(
        dir.path().join("sessions"),
        options.max_sessions(4096).max_file_size(64 << 20),
    )
    .unwrap();
    (dir, store)
}

struct Answer {
    status: StatusCode,
    retry_after: Option<String>,
    set_cookie: Option<String>,
    body: String,
}

fn send(app: &Router, path: &str, cookie: Option<&str>) -> impl Future<Output = Answer> + 'static {
    let mut request = Request::builder().uri(path);
    if let Some(cookie) = cookie {
        request = request.header(header::COOKIE, cookie);
    }
    let request = request.body(Body::empty()).unwrap();
    let app = app.clone();
    async move {
        let response = app.oneshot(request).await.unwrap();
        let retry_after = header_of(response.headers(), header::RETRY_AFTER);
        let set_cookie = header_of(response.headers(), header::SET_COOKIE);
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            retry_after,
            set_cookie,
            body: String::from_utf8(bytes.to_vec()).unwrap(),
        }
    }
}

fn header_of(headers: &header::HeaderMap, name: header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .map(|value| value.to_str().unwrap().to_owned())
}

async fn bounded<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, future)
        .await
        .expect("the request did not finish in time")
}

/// Starts a session whose counter is 1; returns its cookie (`name=value`).
async fn start_session(app: &Router) -> String {
    let answer = bounded(send(app, "/increment", None)).await;
    assert_eq!((answer.status, answer.body.as_str()), (StatusCode::OK, "1"));
    cookie_pair(&answer.set_cookie.expect("a new session sets its cookie"))
}

/// Whether some request of this process waits for a lease in the file: a task queued for a lease
/// held in this process gets a watcher that waits in the file after 50 ms, which the store counts.
fn someone_waits(store: &Store, waits_before: u64) -> bool {
    store.stats().lease_waits > waits_before
}

/// Whether any session of the file is leased now.
fn any_lease_held(store: &Store) -> bool {
    store.entries().iter().any(|entry| entry.lease.is_some())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_overlapping_requests_of_one_session_both_count() {
    let (_dir, store) = fresh(Options::new());
    let (app, mut gate) = app(MmapStore::new(store.clone()), true);
    let cookie = start_session(&app).await;

    let first = tokio::spawn(send(&app, "/gated", Some(&cookie)));
    gate.entered().await;
    // The second request of the session, while the first holds it between read and write. It
    // either waits for the session's lease (with the layer) or reads the session at once and
    // stops at the gate too (without it).
    let waits = store.stats().lease_waits;
    let second = tokio::spawn(send(&app, "/gated", Some(&cookie)));
    let mut second_entered = false;
    wait_for("the second request to wait or read", LIMIT, || {
        second_entered = second_entered || gate.entered.try_recv().is_ok();
        second_entered || someone_waits(&store, waits)
    });
    gate.open_once();
    let first = bounded(first).await.unwrap();
    if !second_entered {
        gate.entered().await;
    }
    gate.open_once();
    let second = bounded(second).await.unwrap();

    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(
        (first.body.as_str(), second.body.as_str()),
        ("2", "3"),
        "the second request saw the first one's change"
    );
    assert_eq!(bounded(send(&app, "/count", Some(&cookie))).await.body, "3");
    assert!(!any_lease_held(&store), "every lease was released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_dropped_before_its_response_releases_the_lease() {
    let (_dir, store) = fresh(Options::new());
    let (app, mut gate) = app(MmapStore::new(store.clone()), true);
    let cookie = start_session(&app).await;

    let mut abandoned = Box::pin(send(&app, "/gated", Some(&cookie)));
    tokio::select! {
        _ = &mut abandoned => panic!("the gated request finished without its permit"),
        _ = gate.entered() => {}
    }
    assert!(any_lease_held(&store), "the request holds its session");
    // The client goes away: the request's future is dropped mid-handler.
    drop(abandoned);
    assert!(!any_lease_held(&store), "dropping the request released it");

    let next = bounded(send(&app, "/increment", Some(&cookie))).await;
    assert_eq!((next.status, next.body.as_str()), (StatusCode::OK, "2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_waits_longer_than_the_lease_wait_gets_503_and_changes_nothing() {
    let (_dir, store) = fresh(Options::new());
    let adapter = MmapStore::new(store.clone()).with_lease_wait(Duration::from_millis(200));
    let (app, mut gate) = app(adapter, true);
    let cookie = start_session(&app).await;

    let holder = tokio::spawn(send(&app, "/gated", Some(&cookie)));
    gate.entered().await;
    let refused = bounded(send(&app, "/increment", Some(&cookie))).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.retry_after.as_deref(), Some("1"));

    gate.open_once();
    let holder = bounded(holder).await.unwrap();
    assert_eq!((holder.status, holder.body.as_str()), (StatusCode::OK, "2"));
    assert_eq!(bounded(send(&app, "/count", Some(&cookie))).await.body, "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_taken_over_past_the_lease_timeout_cannot_save_over_the_newer_state() {
    let (_dir, store) = fresh(Options::new().lease_timeout(Duration::from_millis(300)));
    let (app, mut gate) = app(MmapStore::new(store.clone()), true);
    let cookie = start_session(&app).await;

    let stalled = tokio::spawn(send(&app, "/gated", Some(&cookie)));
    gate.entered().await;
    // Waits past the lease timeout, takes the session over, and saves 2.
    let newer = bounded(send(&app, "/increment", Some(&cookie))).await;
    assert_eq!((newer.status, newer.body.as_str()), (StatusCode::OK, "2"));
    assert!(store.stats().takeovers >= 1);

    gate.open_once();
    let stalled = bounded(stalled).await.unwrap();
    assert_eq!(
        stalled.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "the stalled request's save is refused"
    );
    assert_eq!(bounded(send(&app, "/count", Some(&cookie))).await.body, "2");
    assert!(!any_lease_held(&store));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cycle_id_and_flush_work_inside_the_layer_and_release_every_lease() {
    let (_dir, store) = fresh(Options::new());
    let adapter = MmapStore::new(store.clone());
    let (app, _gate) = app(adapter.clone(), true);
    let old = start_session(&app).await;

    let cycled = bounded(send(&app, "/cycle", Some(&old))).await;
    assert_eq!((cycled.status, cycled.body.as_str()), (StatusCode::OK, "2"));
    let new = cookie_pair(&cycled.set_cookie.expect("cycle_id sets the new id"));
    assert_ne!(new, old);
    assert_eq!(adapter.load(&id_of(&old)).await.unwrap(), None);
    assert_eq!(bounded(send(&app, "/count", Some(&new))).await.body, "2");
    assert_eq!(store.entries().len(), 1);
    assert!(!any_lease_held(&store));

    let flushed = bounded(send(&app, "/flush", Some(&new))).await;
    assert_eq!(flushed.body, "flushed");
    assert_eq!(adapter.load(&id_of(&new)).await.unwrap(), None);
    assert!(store.entries().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_do_not_touch_a_stored_session_take_no_lease() {
    let (_dir, store) = fresh(Options::new());
    let (app, _gate) = app(MmapStore::new(store.clone()), true);
    let cookie = start_session(&app).await;

    // The session is held by a lease taken here: a request that does not access its session,
    // or whose cookie names no stored session, must not wait for it.
    let key = id_of(&cookie).0.to_le_bytes();
    let held = store
        .try_lease(&key)
        .unwrap()
        .expect("nobody holds the session");
    let untouched = bounded(send(&app, "/untouched", Some(&cookie))).await;
    assert_eq!(untouched.status, StatusCode::OK);
    let forged = "id=AAAAAAAAAAAAAAAAAAAAAA";
    let unknown = bounded(send(&app, "/count", Some(forged))).await;
    assert_eq!(
        (unknown.status, unknown.body.as_str()),
        (StatusCode::OK, "0")
    );
    let new = bounded(send(&app, "/increment", None)).await;
    assert_eq!((new.status, new.body.as_str()), (StatusCode::OK, "1"));
    drop(held);
    // The unknown id made no index entry; the two sessions are there.
    assert_eq!(store.entries().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spawned_task_reads_without_waiting_and_saves_through_the_request_scope_only() {
    let (_dir, store) = fresh(Options::new());
    let adapter = MmapStore::new(store.clone()).with_lease_wait(Duration::from_millis(300));
    let (app, _gate) = app(adapter, true);
    let cookie = start_session(&app).await;

    // Reading in a task outside the scope does not wait for the request's lease.
    let read = bounded(send(&app, "/spawned-read", Some(&cookie))).await;
    assert_eq!((read.status, read.body.as_str()), (StatusCode::OK, "1 1"));

    // A task in the request's scope (`in_request_scope`) saves through the request's lease.
    let scoped = bounded(send(&app, "/spawned-save-scoped", Some(&cookie))).await;
    assert_eq!((scoped.status, scoped.body.as_str()), (StatusCode::OK, "2"));
    assert_eq!(bounded(send(&app, "/count", Some(&cookie))).await.body, "2");

    // Documented: a task outside the scope that saves waits for the request's lease, so a
    // handler that awaits it gets the lease-wait error after the lease wait (the handler's 500:
    // the layer does not see errors outside its scope), and nothing is written.
    let unscoped = bounded(send(&app, "/spawned-save-unscoped", Some(&cookie))).await;
    assert_eq!(unscoped.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(bounded(send(&app, "/count", Some(&cookie))).await.body, "2");
    assert!(!any_lease_held(&store));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_layer_the_adapter_still_works_and_holds_nothing_across_a_request() {
    let (_dir, store) = fresh(Options::new());
    let (app, mut gate) = app(MmapStore::new(store.clone()), false);
    let cookie = start_session(&app).await;

    let gated = tokio::spawn(send(&app, "/gated", Some(&cookie)));
    gate.entered().await;
    assert!(!any_lease_held(&store), "no lease between load and save");
    gate.open_once();
    assert_eq!(bounded(gated).await.unwrap().body, "2");
    assert_eq!(bounded(send(&app, "/count", Some(&cookie))).await.body, "2");
}

/// Reads the session, then panics before its response.
async fn read_then_panic(session: Session) -> String {
    let _: Option<u64> = session.get("count").await.unwrap();
    panic!("the handler fails after reading its session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_panics_after_reading_its_session_releases_the_lease() {
    let (_dir, store) = fresh(Options::new());
    let adapter = MmapStore::new(store.clone()).with_lease_wait(Duration::from_millis(300));
    let (app, _gate) = app(adapter.clone(), true);
    let cookie = start_session(&app).await;
    let panicking = Router::new()
        .route("/panic", get(read_then_panic))
        .layer(SessionManagerLayer::new(adapter).with_secure(false))
        .layer(LeaseLayer::new());

    // As in a server's connection task: the panic ends the task that served the request.
    let task = tokio::spawn(send(&panicking, "/panic", Some(&cookie)));
    let Err(error) = bounded(task).await else {
        panic!("the handler did not panic")
    };
    assert!(error.is_panic());
    assert!(!any_lease_held(&store), "the panic released the lease");
    let next = bounded(send(&app, "/increment", Some(&cookie))).await;
    assert_eq!((next.status, next.body.as_str()), (StatusCode::OK, "2"));
}

/// Reads the session twice through its `Session`, then changes it.
async fn read_twice(session: Session) -> Result<String, StatusCode> {
    let first: u64 = session.get("count").await.map_err(failed)?.unwrap_or(0);
    let second: u64 = session.get("count").await.map_err(failed)?.unwrap_or(0);
    session.insert("count", second + 1).await.map_err(failed)?;
    Ok(format!("{first} {second}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_store_over_the_same_file_in_one_request_uses_the_held_lease() {
    let (dir, store) = fresh(Options::new());
    let adapter = MmapStore::new(store.clone()).with_lease_wait(Duration::from_millis(300));
    let (app, _gate) = app(adapter, true);
    let cookie = start_session(&app).await;
    // The same file, opened again under another path (through a link to its directory).
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(dir.path(), &link).unwrap();
    let again = Store::open(link.join("sessions")).unwrap();
    let other = MmapStore::new(again).with_lease_wait(Duration::from_millis(300));
    let id = id_of(&cookie);
    let twice = Router::new()
        .route(
            "/twice",
            get(move |session: Session| {
                let other = other.clone();
                async move {
                    let answer = read_twice(session).await?;
                    // The handler reads the session again through the second store.
                    let again = other.load(&id).await.map_err(|error| {
                        eprintln!("second store: {error}");
                        StatusCode::INTERNAL_SERVER_ERROR
                    })?;
                    Ok::<_, StatusCode>(format!("{answer} {}", again.is_some()))
                }
            }),
        )
        .layer(
            SessionManagerLayer::new(MmapStore::new(store.clone()))
                .with_secure(false)
                .with_expiry(Expiry::OnInactivity(time::Duration::hours(1))),
        )
        .layer(LeaseLayer::new());
    let answer = bounded(send(&twice, "/twice", Some(&cookie))).await;
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (StatusCode::OK, "1 1 true"),
        "the second store must not wait for the lease its own request holds"
    );
    assert_eq!(bounded(send(&app, "/count", Some(&cookie))).await.body, "2");
    assert!(!any_lease_held(&store));
}

/// Creates the session in the request (an explicit save), then changes it again.
async fn create_then_change(session: Session) -> Result<&'static str, StatusCode> {
    session.insert("count", 1_u64).await.map_err(failed)?;
    session.save().await.map_err(failed)?;
    session.insert("count", 5_u64).await.map_err(failed)?;
    Ok("created")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_created_in_the_request_then_changed_keeps_the_change() {
    let (_dir, store) = fresh(Options::new());
    let adapter = MmapStore::new(store.clone()).with_lease_wait(Duration::from_millis(300));
    let (app, _gate) = app(adapter.clone(), true);
    let creating = Router::new()
        .route("/create", get(create_then_change))
        .layer(SessionManagerLayer::new(adapter).with_secure(false))
        .layer(LeaseLayer::new());

    let created = bounded(send(&creating, "/create", None)).await;
    assert_eq!(created.status, StatusCode::OK);
    let cookie = cookie_pair(&created.set_cookie.expect("a new session sets its cookie"));
    assert!(!any_lease_held(&store));
    let next = bounded(send(&app, "/increment", Some(&cookie))).await;
    assert_eq!((next.status, next.body.as_str()), (StatusCode::OK, "6"));
}
