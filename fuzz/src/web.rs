//! The application the layer targets talk to: routers wrapped in `SessionLayer`s of several
//! configurations, over one store, driven on a current-thread runtime.

use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use axum::routing::get;
use axum::Router;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use mmap_session::store::{Options, Store};
use mmap_session::{Expiry, ReadOnlySession, Session, SessionError, SessionId, SigningKeys};
use serde_json::Value;
use sha2::Sha256;
use std::sync::OnceLock;
use tower::ServiceExt as _;

/// The signing key of the signed layer.
pub const SIGNING_KEY: [u8; 32] = [7; 32];
/// A session that exists in the store before every run of the cookie target (`fuzz-seeded-id01`).
pub const SEEDED_ID: &str = "ZnV6ei1zZWVkZWQtaWQwMQ";
/// The session whose record the record target writes (`fuzz-record-id01`).
pub const RECORD_ID: &str = "ZnV6ei1yZWNvcmQtaWQwMQ";

/// The layer configurations a target can pick (by index).
pub const LAYERS: usize = 4;
/// Index of the signed layer.
pub const SIGNED: usize = 1;

/// The routes a target can pick (by index).
pub const ROUTES: [&str; 8] = [
    "/insert",
    "/get",
    "/ro",
    "/snapshot",
    "/clear",
    "/none",
    "/expiry",
    "/flush",
];

pub struct Web {
    pub rt: tokio::runtime::Runtime,
    pub store: Store,
    pub apps: Vec<Router>,
    /// The layer of each app, to read its count of undecodable sessions.
    pub layers: Vec<mmap_session::SessionLayer>,
}

/// The cookie value the signed layer issues for `id_text`: `id.tag`, the tag being
/// HMAC-SHA256 over `session=<id>` (see crates/mmap-session/src/cookies.rs).
pub fn signed_value(id_text: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(&SIGNING_KEY).unwrap();
    mac.update(b"session=");
    mac.update(id_text.as_bytes());
    let tag = mac.finalize().into_bytes();
    format!("{id_text}.{}", URL_SAFE_NO_PAD.encode(tag))
}

async fn insert(session: Session) -> Result<String, SessionError> {
    let n = session.get_value("n").await?;
    let next = n
        .as_ref()
        .and_then(Value::as_u64)
        .unwrap_or(0)
        .saturating_add(1);
    session.insert_value("n", Value::from(next)).await?;
    Ok(format!("{next}"))
}

async fn read(session: Session) -> Result<String, SessionError> {
    Ok(format!("{:?}", session.get_value("n").await?))
}

async fn read_only(session: ReadOnlySession) -> String {
    format!("{}", session.map().len())
}

async fn snapshot(session: Session) -> Result<String, SessionError> {
    Ok(format!("{}", session.read_only().await?.map().len()))
}

async fn clear(session: Session) -> Result<String, SessionError> {
    session.clear().await?;
    Ok(String::new())
}

async fn none() -> &'static str {
    "none"
}

async fn expiry(session: Session) -> Result<String, SessionError> {
    let was = session.expiry().await?;
    session
        .set_expiry(Some(Expiry::OnInactivity(Duration::from_secs(3600))))
        .await?;
    session.insert_value("e", Value::from(1)).await?;
    Ok(format!("{was:?}"))
}

async fn flush(session: Session) -> Result<String, SessionError> {
    session.flush().await?;
    Ok(String::new())
}

fn router() -> Router {
    Router::new()
        .route(ROUTES[0], get(insert))
        .route(ROUTES[1], get(read))
        .route(ROUTES[2], get(read_only))
        .route(ROUTES[3], get(snapshot))
        .route(ROUTES[4], get(clear))
        .route(ROUTES[5], get(none))
        .route(ROUTES[6], get(expiry))
        .route(ROUTES[7], get(flush))
}

/// The runtime, store and applications, built on first use.
pub fn web() -> &'static Web {
    static W: OnceLock<Web> = OnceLock::new();
    W.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let path = crate::workdir().join("web-store");
        let _ = std::fs::remove_file(&path);
        let store = Store::open_with(
            &path,
            Options::new()
                .max_sessions(1024)
                .max_file_size(16 << 20)
                .lease_timeout(Duration::from_millis(100)),
        )
        .unwrap();
        // The store keeps its descriptor and mapping; the name is not needed any more.
        std::fs::remove_file(&path).unwrap();
        let keys = SigningKeys::new([SIGNING_KEY]).unwrap();
        let layer = || mmap_session::SessionLayer::new(store.clone()).secure(false);
        let layers = vec![
            layer(),
            layer().signed(keys),
            layer()
                .expiry(Expiry::OnSessionEnd)
                .refresh_interval(Duration::ZERO),
            layer().expiry(Expiry::AtDateTime(
                SystemTime::now() + Duration::from_secs(3600),
            )),
        ];
        let apps = layers.iter().map(|l| router().layer(l.clone())).collect();
        Web {
            rt,
            store,
            apps,
            layers,
        }
    })
}

/// Writes `value` as the record of session `id_text`, straight into the store.
pub fn put_record(web: &Web, id_text: &str, value: &[u8], expires_at: SystemTime) {
    let id = SessionId::decode(id_text).unwrap();
    let mut lease = web
        .store
        .lease_blocking(id.as_bytes(), Instant::now() + Duration::from_secs(1))
        .unwrap();
    lease.commit(value, expires_at).unwrap();
}

/// Removes the record of session `id_text` (one a run created), so that every run starts from
/// the same store: an id issued in one run must not be a live session in the next.
pub fn forget(web: &Web, id_text: &str) {
    let Some(id) = SessionId::decode(id_text) else {
        return;
    };
    if let Ok(mut lease) = web
        .store
        .lease_blocking(id.as_bytes(), Instant::now() + Duration::from_secs(1))
    {
        let _ = lease.remove();
    }
}

/// Sends `GET route` with an optional raw `Cookie` header through app `app`.
pub fn send(web: &Web, app: usize, route: &str, cookie: Option<HeaderValue>) -> Response<Body> {
    let mut request = Request::builder().uri(route);
    if let Some(cookie) = cookie {
        request = request.header(header::COOKIE, cookie);
    }
    let request = request.body(Body::empty()).unwrap();
    let app = web.apps[app].clone();
    web.rt
        .block_on(async move { app.oneshot(request).await.unwrap() })
}

/// The values of the `session` cookies a response sets (empty for a removal).
pub fn set_cookie_values(response: &Response<Body>) -> Vec<String> {
    response
        .headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.strip_prefix("session="))
        .map(|v| v.split(';').next().unwrap_or("").to_owned())
        .collect()
}

/// The sessions all layers have found undecodable so far.
pub fn undecodable_count(web: &Web) -> u64 {
    web.layers.iter().map(|l| l.undecodable_sessions()).sum()
}

/// Whether a response status says the layer failed on its own (not the store being busy or full).
pub fn layer_failed(status: StatusCode) -> bool {
    status == StatusCode::INTERNAL_SERVER_ERROR
}
