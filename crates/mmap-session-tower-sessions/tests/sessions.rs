//! tower-sessions' usual behaviours over the adapter, in one process: an axum app driven through
//! `oneshot`, and the store traits called directly.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use common::{an_hour, app, cookie_pair, id_of, open_store, wait_for};
use http_body_util::BodyExt as _;
use mmap_session_tower_sessions::store::{Options, Store};
use mmap_session_tower_sessions::MmapStore;
use tempfile::TempDir;
use time::OffsetDateTime;
use tower::ServiceExt as _;
use tower_sessions::session::{Id, Record};
use tower_sessions::session_store::Error as StoreTraitError;
use tower_sessions::{ExpiredDeletion, Expiry, SessionStore};

/// What a test needs: its own directory, the adapter over a store file in it.
fn fresh() -> (TempDir, MmapStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = MmapStore::new(open_store(&dir.path().join("sessions")));
    (dir, store)
}

/// One response, reduced to what the tests look at.
struct Answer {
    status: StatusCode,
    set_cookie: Option<String>,
    body: String,
}

async fn send(app: &Router, path: &str, cookie: Option<&str>) -> Answer {
    let mut request = Request::builder().uri(path);
    if let Some(cookie) = cookie {
        request = request.header(header::COOKIE, cookie);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let set_cookie = response
        .headers()
        .get(header::SET_COOKIE)
        .map(|value| value.to_str().unwrap().to_owned());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        set_cookie,
        body: String::from_utf8(bytes.to_vec()).unwrap(),
    }
}

/// Sends `path` with no cookie and returns the session cookie (`name=value`) the answer sets.
async fn start_session(app: &Router, path: &str) -> String {
    let answer = send(app, path, None).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    cookie_pair(&answer.set_cookie.expect("a new session sets its cookie"))
}

fn record(id: Id, user: &str, lifetime: time::Duration) -> Record {
    Record {
        id,
        data: HashMap::from([("user".to_owned(), serde_json::Value::from(user))]),
        expiry_date: OffsetDateTime::now_utc() + lifetime,
    }
}

#[tokio::test]
async fn a_value_inserted_is_read_on_a_later_request_that_sends_the_cookie() {
    let (_dir, store) = fresh();
    let app = app(store.clone(), an_hour());
    let cookie = start_session(&app, "/set/user/ada").await;

    assert_eq!(send(&app, "/get/user", Some(&cookie)).await.body, "ada");
    assert_eq!(send(&app, "/get/user", None).await.body, "none");
    // The record is in the file under the hash of the id, which is not the id.
    let entries = store.store().entries();
    assert_eq!(entries.len(), 1);
    assert!(!cookie.contains(&entries[0].key_hash));
}

#[tokio::test]
async fn a_removed_value_is_gone_and_the_others_stay() {
    let (_dir, store) = fresh();
    let app = app(store, an_hour());
    let cookie = start_session(&app, "/set/user/ada").await;
    send(&app, "/set/theme/dark", Some(&cookie)).await;

    assert_eq!(
        send(&app, "/remove/theme", Some(&cookie)).await.body,
        "removed"
    );
    assert_eq!(send(&app, "/get/theme", Some(&cookie)).await.body, "none");
    assert_eq!(send(&app, "/get/user", Some(&cookie)).await.body, "ada");
}

#[tokio::test]
async fn cycle_id_keeps_the_data_under_a_new_id_and_the_old_id_no_longer_loads() {
    let (_dir, store) = fresh();
    let app = app(store.clone(), an_hour());
    let old = start_session(&app, "/set/user/ada").await;

    let cycled = send(&app, "/cycle", Some(&old)).await;
    assert_eq!(cycled.body, "cycled");
    let new = cookie_pair(&cycled.set_cookie.expect("cycle_id sets the new id"));
    assert_ne!(new, old);

    assert_eq!(send(&app, "/get/user", Some(&new)).await.body, "ada");
    assert_eq!(store.load(&id_of(&old)).await.unwrap(), None);
    assert_eq!(send(&app, "/get/user", Some(&old)).await.body, "none");
    assert_eq!(store.store().entries().len(), 1);
}

#[tokio::test]
async fn flush_deletes_the_record_and_removes_the_cookie() {
    let (_dir, store) = fresh();
    let app = app(store.clone(), an_hour());
    let cookie = start_session(&app, "/set/user/ada").await;

    let flushed = send(&app, "/flush", Some(&cookie)).await;
    assert_eq!(flushed.body, "flushed");
    let removal = flushed
        .set_cookie
        .expect("flush answers with a removal cookie");
    assert!(removal.contains("Max-Age=0"), "{removal}");

    assert_eq!(store.load(&id_of(&cookie)).await.unwrap(), None);
    assert!(store.store().entries().is_empty());
    assert_eq!(send(&app, "/get/user", Some(&cookie)).await.body, "none");
}

#[tokio::test]
async fn a_session_idle_past_its_inactivity_period_is_gone() {
    let (_dir, store) = fresh();
    let idle = Expiry::OnInactivity(time::Duration::milliseconds(500));
    let app = app(store.clone(), idle);
    let cookie = start_session(&app, "/set/user/ada").await;
    let id = id_of(&cookie);

    // Wait until the store no longer returns the record, then ask through the app.
    wait_for("the session to expire", Duration::from_secs(10), || {
        store.store().get(&id.0.to_le_bytes()).is_none()
    });
    assert_eq!(store.load(&id).await.unwrap(), None);
    let later = send(&app, "/get/user", Some(&cookie)).await;
    assert_eq!(later.body, "none");
}

/// Commits `value` as the raw store value of session `id`, kept by the store for an hour.
async fn put_raw(store: &MmapStore, id: Id, value: &[u8]) {
    let mut lease = store
        .store()
        .lease(&id.0.to_le_bytes(), Instant::now() + Duration::from_secs(5))
        .await
        .unwrap();
    lease
        .commit(value, SystemTime::now() + Duration::from_secs(3600))
        .unwrap();
    lease.release();
}

/// The store value of `record` written by hand, in the layout the adapter documents.
fn hand_written(record: &Record) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "data": record.data,
        "expiry_date": record.expiry_date.unix_timestamp_nanos(),
    }))
    .unwrap()
}

#[tokio::test]
async fn an_expired_record_does_not_load_even_before_the_store_drops_it() {
    let (_dir, store) = fresh();
    // The store's expiry (an hour here) has millisecond resolution; the record's own decides.
    let mut expired = record(Id::default(), "ada", time::Duration::seconds(-1));
    put_raw(&store, expired.id, &hand_written(&expired)).await;

    assert!(store.store().get(&expired.id.0.to_le_bytes()).is_some());
    assert_eq!(store.load(&expired.id).await.unwrap(), None);
    // The same value with a date ahead does load: it was the date that made it absent.
    expired.expiry_date = OffsetDateTime::now_utc() + time::Duration::hours(1);
    put_raw(&store, expired.id, &hand_written(&expired)).await;
    assert_eq!(store.load(&expired.id).await.unwrap(), Some(expired));
}

#[tokio::test]
async fn create_with_a_taken_id_draws_another_and_keeps_both_records() {
    let (_dir, store) = fresh();
    let mut first = record(Id::default(), "ada", time::Duration::hours(1));
    let taken = first.id;
    store.create(&mut first).await.unwrap();
    assert_eq!(first.id, taken, "a free id is kept");

    let mut second = record(taken, "grace", time::Duration::hours(1));
    store.create(&mut second).await.unwrap();

    assert_ne!(second.id, taken);
    assert_eq!(store.load(&taken).await.unwrap(), Some(first));
    assert_eq!(store.load(&second.id).await.unwrap(), Some(second));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_of_one_id_end_with_distinct_ids() {
    let (_dir, store) = fresh();
    let id = Id::default();
    let tasks: Vec<_> = (0..16)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut record = record(id, &format!("user {n}"), time::Duration::hours(1));
                store.create(&mut record).await.unwrap();
                record
            })
        })
        .collect();
    let mut created = Vec::new();
    for task in tasks {
        created.push(task.await.unwrap());
    }

    let mut ids: Vec<i128> = created.iter().map(|r| r.id.0).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 16, "every create got an id of its own");
    for record in created {
        assert_eq!(store.load(&record.id).await.unwrap(), Some(record));
    }
}

#[tokio::test]
async fn a_save_after_a_delete_does_not_bring_the_session_back() {
    let (_dir, store) = fresh();
    let mut record = record(Id::default(), "ada", time::Duration::hours(1));
    store.create(&mut record).await.unwrap();
    let loaded = store.load(&record.id).await.unwrap().unwrap();

    // Another request logs the user out while this one still holds the loaded record.
    store.delete(&record.id).await.unwrap();
    store.save(&loaded).await.unwrap();

    assert_eq!(store.load(&record.id).await.unwrap(), None);
    assert!(store.store().entries().is_empty());
}

#[tokio::test]
async fn a_save_replaces_the_record() {
    let (_dir, store) = fresh();
    let mut record = record(Id::default(), "ada", time::Duration::hours(1));
    store.create(&mut record).await.unwrap();
    record
        .data
        .insert("theme".to_owned(), serde_json::Value::from("dark"));
    record.expiry_date += time::Duration::minutes(5);

    store.save(&record).await.unwrap();

    assert_eq!(store.load(&record.id).await.unwrap(), Some(record));
}

#[tokio::test]
async fn deleting_a_session_the_store_never_had_succeeds() {
    let (_dir, store) = fresh();
    store.delete(&Id::default()).await.unwrap();
    assert!(store.store().entries().is_empty());
    assert!(store.store().verify().is_clean());
}

#[tokio::test]
async fn delete_expired_purges_the_expired_records_and_keeps_the_others() {
    let (_dir, store) = fresh();
    let mut soon = Vec::new();
    for user in ["ada", "grace", "alan"] {
        let mut r = record(Id::default(), user, time::Duration::milliseconds(200));
        store.create(&mut r).await.unwrap();
        soon.push(r);
    }
    let mut kept = record(Id::default(), "barbara", time::Duration::hours(1));
    store.create(&mut kept).await.unwrap();

    wait_for(
        "the short records to expire",
        Duration::from_secs(10),
        || {
            soon.iter()
                .all(|r| r.expiry_date < OffsetDateTime::now_utc())
        },
    );
    // Expired but not yet reclaimed: nothing has written to the store since.
    assert_eq!(store.store().entries().len(), 4);

    store.delete_expired().await.unwrap();

    let entries = store.store().entries();
    assert_eq!(entries.len(), 1);
    assert_eq!(store.load(&kept.id).await.unwrap(), Some(kept));
}

#[tokio::test]
async fn a_damaged_record_is_no_session_and_the_request_gets_a_new_one() {
    let (_dir, store) = fresh();
    let app = app(store.clone(), an_hour());
    let cookie = start_session(&app, "/set/user/ada").await;
    let id = id_of(&cookie);
    // A record that the store verifies (its checksum is right) but that is no session record.
    for damaged in [&b"not json"[..], b"{\"data\":1}", b"\xff\xfe"] {
        put_raw(&store, id, damaged).await;

        assert_eq!(store.load(&id).await.unwrap(), None);
        let answer = send(&app, "/get/user", Some(&cookie)).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.body, "none");
    }
}

#[tokio::test]
async fn a_record_larger_than_the_store_accepts_is_a_backend_error_that_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options::new().max_sessions(64).max_value_len(256);
    let store = MmapStore::new(Store::open_with(dir.path().join("sessions"), options).unwrap());
    let mut record = record(Id::default(), &"x".repeat(1000), time::Duration::hours(1));

    let error = store.create(&mut record).await.unwrap_err();

    match error {
        StoreTraitError::Backend(message) => {
            assert!(message.contains("create failed"), "{message}");
            assert!(message.contains("larger than"), "{message}");
            assert!(!message.contains(&record.id.to_string()), "{message}");
        }
        other => panic!("expected a backend error, got {other:?}"),
    }
    assert_eq!(store.load(&record.id).await.unwrap(), None);
}

#[tokio::test]
async fn a_lease_held_past_the_wait_is_a_backend_error_naming_the_wait() {
    let (_dir, store) = fresh();
    let store = store.with_lease_wait(Duration::from_millis(100));
    let mut record = record(Id::default(), "ada", time::Duration::hours(1));
    store.create(&mut record).await.unwrap();
    // A holder that keeps the lease for a whole request, as the mmap-session layer does.
    let held = store
        .store()
        .lease(
            &record.id.0.to_le_bytes(),
            Instant::now() + Duration::from_secs(5),
        )
        .await
        .unwrap();

    let error = store.save(&record).await.unwrap_err();

    let StoreTraitError::Backend(message) = error else {
        panic!("expected a backend error, got {error:?}");
    };
    assert!(message.contains("save gave up after 100ms"), "{message}");
    drop(held);
    store.save(&record).await.unwrap();
}
