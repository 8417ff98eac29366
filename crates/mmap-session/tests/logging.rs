//! The layer's logs name sessions only by their short hash, never by their id.
//!
//! In its own test binary, so the global subscriber sees the layer's logs from every thread
//! (including the store's blocking waits) and nothing from other tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use common::{cookie_pair, id_of, send, set_cookies, Kind};
use mmap_session::{BackendLease as _, Session, SessionError, SessionId, SessionLayer};
use tracing_subscriber::fmt::MakeWriter;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Capture {
    type Writer = Capture;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

async fn increment(session: Session) -> Result<String, SessionError> {
    let n: u64 = session.get("n").await?.unwrap_or(0) + 1;
    session.insert("n", n).await?;
    Ok(n.to_string())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Goes through what the layer logs about (new, unknown, too large, busy, cycled, flushed
/// sessions) on storage of `kind`, and returns the ids involved.
async fn log_worthy_requests(kind: Kind) -> Vec<SessionId> {
    // Small values only, so that a large session fails at commit inside the store.
    let store = kind.store_with_max_value_len(200).await;
    let app = Router::new()
        .route("/n", post(increment))
        .route(
            "/big",
            post(|session: Session| async move {
                let _ = session.insert("big", "z".repeat(300)).await;
            }),
        )
        .route(
            "/login",
            post(|session: Session| async move { session.cycle_id().await }),
        )
        .route(
            "/logout",
            post(|session: Session| async move { session.flush().await }),
        )
        .layer(SessionLayer::new(store.clone()).lease_wait(Duration::from_millis(50)));

    let mut ids: Vec<SessionId> = Vec::new();
    let first = send(&app, "POST", "/n", None).await;
    let pair = cookie_pair(&first);
    ids.push(id_of(&pair));
    send(&app, "POST", "/n", Some(&pair)).await;

    // Unknown id chosen by the client.
    let chosen = "session=AAAAAAAAAAAAAAAAAAAAAA";
    ids.push(id_of(chosen));
    let fresh = send(&app, "POST", "/n", Some(chosen)).await;
    ids.push(id_of(&cookie_pair(&fresh)));

    // Commit failure inside the store.
    let failed = send(&app, "POST", "/big", Some(&pair)).await;
    assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);

    // Lease wait timeout.
    let held = store.hold(id_of(&pair).as_bytes()).await;
    let busy = send(&app, "POST", "/n", Some(&pair)).await;
    assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
    held.release().await;

    // Cycle, then flush.
    let cycled = send(&app, "POST", "/login", Some(&pair)).await;
    let cycled_pair = cookie_pair(&cycled);
    ids.push(id_of(&cycled_pair));
    let flushed = send(&app, "POST", "/logout", Some(&cycled_pair)).await;
    assert_eq!(set_cookies(&flushed).len(), 1);

    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_raw_id_never_appears_in_logs() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(capture.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let mut ids = log_worthy_requests(Kind::File).await;
    // The Redis backend logs too (and its client library must not see an id either).
    ids.extend(log_worthy_requests(Kind::Redis).await);

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(!logs.is_empty());
    for id in &ids {
        assert!(!logs.contains(&id.encode()), "an id was logged:\n{logs}");
        assert!(
            !logs.contains(&hex(id.as_bytes())),
            "an id was logged in hex:\n{logs}"
        );
    }
    // The sessions are still traceable by their short hash.
    for id in [ids[0], ids[3], ids[4], ids[7]] {
        assert!(
            logs.contains(&id.short_hash().to_string()),
            "no line names session {}:\n{logs}",
            id.short_hash()
        );
    }
}
