//! Run: `cargo bench -p mmap-session --bench layer`.
//!
//! What the layer costs per request, without a network in between: each iteration sends one
//! request through an axum `Router` (`tower::Service::call`, a current-thread runtime) and reads
//! the whole response body. The same handlers run bare and behind `SessionLayer` over a store in a
//! temporary directory, so the difference between the two is the session's cost: cookie parsing,
//! the busy lease, copying the record out and in, JSON decode and encode, `Set-Cookie`.
//!
//! Cases (each on its own store, sessions created through the layer beforehand):
//! - `counter`: `GET /` reads a counter, adds one and writes it back; 10,000 distinct sessions
//!   visited in turn.
//! - `peek`: `GET /peek` reads the counter through `ReadOnlySession` (no lease).
//! - `new`: `GET /` without a cookie: a new session on every request.
//! - `counter_16k`: the counter over 1,000 sessions that also hold a 16 KiB string.
//! - `untouched`: `GET /health` behind the layer, which never touches the session.
//!
//! Instruction counts, which do not move with the machine's load:
//! `MMAP_LAYER_BENCH_LOOP=<case> MMAP_LAYER_BENCH_OPS=N valgrind --tool=callgrind <bench binary>`
//! runs one case N times (with `bare-` before the case name: without the layer) and exits.
//! With `MMAP_LAYER_BENCH_RECORDER=prometheus` a Prometheus recorder (metrics-exporter-prometheus)
//! is installed first, so the metrics are recorded: the difference is the recorder's cost.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, Request};
use axum::routing::get;
use axum::Router;
use criterion::{criterion_group, Criterion};
use http_body_util::BodyExt as _;
use mmap_session::store::Store;
use mmap_session::{ReadOnlySession, Session, SessionError, SessionLayer};
use tower::Service as _;

const COUNT: &str = "count";
const PAYLOAD: &str = "payload";

async fn counter(session: Session) -> Result<String, SessionError> {
    let n: u64 = session.get(COUNT).await?.unwrap_or(0) + 1;
    session.insert(COUNT, n).await?;
    Ok(n.to_string())
}

async fn peek(session: ReadOnlySession) -> Result<String, SessionError> {
    Ok(session.get::<u64>(COUNT)?.unwrap_or(0).to_string())
}

async fn with_payload(session: Session) -> Result<String, SessionError> {
    session.insert(PAYLOAD, "x".repeat(16 * 1024)).await?;
    session.insert(COUNT, 0).await?;
    Ok("0".to_owned())
}

/// The bare routes: what an application without sessions would serve. The handlers still take
/// their session types, so the bare router gets a layer-free stand-in below.
fn routes() -> Router {
    Router::new()
        .route("/", get(counter))
        .route("/peek", get(peek))
        .route("/fill", get(with_payload))
        .route("/health", get(|| async { "ok" }))
}

/// The same answers without any session: a counter that always starts from 0.
fn bare_routes() -> Router {
    Router::new()
        .route("/", get(|| async { 1u64.to_string() }))
        .route("/peek", get(|| async { 0u64.to_string() }))
        .route("/health", get(|| async { "ok" }))
}

struct Bench {
    rt: tokio::runtime::Runtime,
    app: Router,
    cookies: Vec<HeaderValue>,
    path: &'static str,
    next: usize,
    _dir: tempfile::TempDir,
}

impl Bench {
    fn new(case: &str) -> Self {
        let (layered, case) = match case.strip_prefix("bare-") {
            Some(case) => (false, case),
            None => (true, case),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("sessions")).unwrap();
        let layer = SessionLayer::new(store).secure(false);
        let mut app = routes().layer(layer);
        let (path, sessions, fill) = match case {
            "counter" => ("/", 10_000, None),
            "peek" => ("/peek", 10_000, None),
            "new" => ("/", 0, None),
            "counter_16k" => ("/", 1_000, Some("/fill")),
            "untouched" => ("/health", 0, None),
            other => panic!("unknown case {other}"),
        };
        let cookies = rt.block_on(async {
            let mut cookies = Vec::with_capacity(sessions);
            for _ in 0..sessions {
                let response = app.call(request(fill.unwrap_or("/"), None)).await.unwrap();
                let set = response.headers()[header::SET_COOKIE].to_str().unwrap();
                let pair = set.split(';').next().unwrap().to_owned();
                cookies.push(HeaderValue::from_str(&pair).unwrap());
            }
            cookies
        });
        if !layered {
            app = bare_routes();
        }
        // As `axum::serve` does: `with_state` turns every handler into a route once, with the
        // layer applied, instead of on every call of an unfinished `Router`.
        let app = app.with_state(());
        Self {
            rt,
            app,
            cookies,
            path,
            next: 0,
            _dir: dir,
        }
    }

    #[inline(never)]
    fn once(&mut self) {
        let cookie = if self.cookies.is_empty() {
            None
        } else {
            self.next = (self.next + 1) % self.cookies.len();
            Some(self.cookies[self.next].clone())
        };
        let request = request(self.path, cookie);
        let app = &mut self.app;
        self.rt.block_on(async {
            let response = app.call(request).await.unwrap();
            assert!(response.status().is_success());
            black_box(response.into_body().collect().await.unwrap().to_bytes());
        });
    }
}

fn request(path: &str, cookie: Option<HeaderValue>) -> Request<Body> {
    let mut request = Request::get(path);
    if let Some(cookie) = cookie {
        request = request.header(header::COOKIE, cookie);
    }
    request.body(Body::empty()).unwrap()
}

const CASES: [&str; 5] = ["counter", "peek", "new", "counter_16k", "untouched"];

fn layer(c: &mut Criterion) {
    let mut group = c.benchmark_group("request");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for case in CASES {
        for variant in ["bare-", ""] {
            // `new` and `untouched` have nothing to do without the layer beyond what the bare
            // counter and health routes already measure.
            if variant == "bare-" && matches!(case, "new" | "untouched" | "counter_16k") {
                continue;
            }
            let name = format!("{variant}{case}");
            let mut bench = Bench::new(&name);
            group.bench_function(&name, |b| b.iter(|| bench.once()));
        }
    }
    group.finish();
}

criterion_group!(benches, layer);

fn main() {
    if std::env::var("MMAP_LAYER_BENCH_RECORDER").as_deref() == Ok("prometheus") {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .expect("install the Prometheus recorder");
    }
    if let Ok(case) = std::env::var("MMAP_LAYER_BENCH_LOOP") {
        let ops: usize = std::env::var("MMAP_LAYER_BENCH_OPS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(10_000);
        let mut bench = Bench::new(&case);
        for _ in 0..ops {
            bench.once();
        }
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
