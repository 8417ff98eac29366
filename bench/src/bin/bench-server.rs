//! Run: `bench-server --backend mmap --store /tmp/s --listen 127.0.0.1:3000` (the runner starts it).
//!
//! The one server of the HTTP benchmark. Every backend serves the same two handlers, written once
//! and made generic over the session type, so that the only thing that changes from case to case is
//! the session layer underneath:
//!
//! - `GET /`: read-modify-write. Reads the session's counter, adds one, writes it back, answers
//!   `{"count": N, "pid": P}`. A new session (no cookie) starts at 1; with `--workload large` a new
//!   session also gets a string of `--large-bytes` (16 KiB by default), so every later request
//!   loads and saves that much. mmap-session's limits (largest store value and session size) are
//!   raised to the payload plus 4 KiB where that is above their 64 KiB default.
//! - `GET /peek`: read-only. The same answer without changing anything (`count` is 0 without a
//!   session). mmap-session serves it with `ReadOnlySession` (no lease); tower-sessions has no
//!   read-only handle, so it is its ordinary `Session`, which saves nothing when unchanged.
//! - `GET /health`: `ok`, no session.
//!
//! Backends: `none` (bare axum: the handlers run over a session that is always empty and keeps
//! nothing), `mmap` (mmap-session over `--store`), `ts-memory` (tower-sessions 0.15 `MemoryStore`),
//! `ts-redis` (tower-sessions 0.14 + tower-sessions-redis-store 0.16 over `--redis-url`),
//! `ts-sqlite` (tower-sessions 0.14 + tower-sessions-sqlx-store 0.15 over `--sqlite-path`, WAL,
//! `synchronous=NORMAL`), `mmap-redis` (mmap-session over its Redis backend, `--redis-url`),
//! `ts-mmap` (tower-sessions 0.15 over the file store through mmap-session-tower-sessions,
//! `--store`), `ts-mmap-lease` (the same with the adapter's `LeaseLayer`, which holds a session's
//! lease for the whole request). SIGTERM or Ctrl-C stops it gracefully.
//!
//! `--durability` (or the environment variable `MMAP_BENCH_DURABILITY`, which the runner's
//! servers inherit) sets when the file backends (`mmap`, `ts-mmap`, `ts-mmap-lease`) force
//! commits to the disk: `never` (the default), `periodic:<ms>` or `on-commit`.
//!
//! `--metrics prometheus` (or `MMAP_BENCH_METRICS=prometheus`) installs a Prometheus recorder
//! first, so the cost of recording the metrics can be set beside `none`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use clap::{Parser, ValueEnum};
use serde::Serialize;
use serde_json::Value;

use tower_sessions_14 as ts14;
use tower_sessions_15 as ts15;

/// Session key of the counter.
const COUNT: &str = "count";
/// Session key of the padding a `large` workload puts into each new session.
const PAYLOAD: &str = "payload";

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Backend {
    /// Bare axum: no session layer, the handlers see an empty session.
    None,
    /// mmap-session over one memory-mapped file.
    Mmap,
    /// tower-sessions 0.15 with its in-process MemoryStore.
    TsMemory,
    /// tower-sessions 0.14 with tower-sessions-redis-store 0.16 (fred).
    TsRedis,
    /// tower-sessions 0.14 with tower-sessions-sqlx-store 0.15 (SQLite, WAL).
    TsSqlite,
    /// mmap-session over its Redis backend (mmap-session-redis).
    MmapRedis,
    /// tower-sessions 0.15 over the file store (mmap-session-tower-sessions).
    TsMmap,
    /// The same, with the adapter's `LeaseLayer` around tower-sessions' layer.
    TsMmapLease,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Workload {
    /// New sessions hold only the counter.
    Small,
    /// New sessions also hold a `--large-bytes` string (16 KiB by default).
    Large,
}

#[derive(Parser, Debug)]
#[command(
    about = "One server for every case of the HTTP benchmark (the same handlers over each session layer)"
)]
struct Cli {
    #[arg(long, value_enum)]
    backend: Backend,
    #[arg(long, value_enum, default_value = "small")]
    workload: Workload,
    /// Size of the value a `large` workload puts into each new session.
    #[arg(long, default_value_t = 16 * 1024)]
    large_bytes: usize,
    #[arg(long)]
    listen: SocketAddr,
    /// The session file (`mmap`, `ts-mmap`).
    #[arg(long)]
    store: Option<PathBuf>,
    /// e.g. `redis://127.0.0.1:6379` (`ts-redis`, `mmap-redis`).
    #[arg(long)]
    redis_url: Option<String>,
    /// The SQLite database file (`ts-sqlite`); created and migrated when missing.
    #[arg(long)]
    sqlite_path: Option<PathBuf>,
    /// Connections per process to Redis or SQLite.
    #[arg(long, default_value_t = 4)]
    pool_size: u32,
    /// When the file backends force commits to the disk: `never`, `periodic:<ms>`, `on-commit`.
    #[arg(long, env = "MMAP_BENCH_DURABILITY", default_value = "never", value_parser = durability)]
    durability: mmap_session::store::Durability,
    /// `prometheus`: install the Prometheus recorder (metrics-exporter-prometheus) before
    /// serving, so that the layer's and the store's metrics are recorded, and serve them at
    /// `/metrics`; `none`: no recorder (nothing is recorded).
    #[arg(long, env = "MMAP_BENCH_METRICS", default_value = "none", value_parser = ["none", "prometheus"])]
    metrics: String,
}

fn durability(s: &str) -> Result<mmap_session::store::Durability, String> {
    use mmap_session::store::Durability;
    match s.split_once(':') {
        None if s == "never" => Ok(Durability::Never),
        None if s == "on-commit" => Ok(Durability::OnCommit),
        Some(("periodic", ms)) => ms
            .parse()
            .map(|ms| Durability::Periodic(std::time::Duration::from_millis(ms)))
            .map_err(|e| format!("periodic:<ms> needs a number of milliseconds: {e}")),
        _ => Err(format!(
            "unknown durability {s:?}: never, periodic:<ms> or on-commit"
        )),
    }
}

/// What the handlers share.
struct App {
    /// Put into each new session (empty: nothing is put).
    payload: String,
}

#[derive(Serialize)]
struct Count {
    count: u64,
    pid: u32,
}

/// A failed session access: a plain 500, the cause on stderr (the first few only, so that an
/// overloaded backend does not turn the benchmark into a logging benchmark).
struct BenchError(String);

static ERRORS_LOGGED: AtomicU64 = AtomicU64::new(0);

impl IntoResponse for BenchError {
    fn into_response(self) -> Response {
        if ERRORS_LOGGED.fetch_add(1, Ordering::Relaxed) < 10 {
            eprintln!(
                "bench-server {}: session error: {}",
                std::process::id(),
                self.0
            );
        }
        StatusCode::INTERNAL_SERVER_ERROR.into_response()
    }
}

fn bench_error(error: impl std::fmt::Display) -> BenchError {
    BenchError(error.to_string())
}

/// The session operations the handlers use, implemented by each backend's session handle.
trait RwSession: FromRequestParts<Arc<App>> + Send + 'static {
    fn get_u64(
        &self,
        key: &'static str,
    ) -> impl Future<Output = Result<Option<u64>, BenchError>> + Send;
    fn put(
        &self,
        key: &'static str,
        value: Value,
    ) -> impl Future<Output = Result<(), BenchError>> + Send;
}

/// The read-only access the `/peek` handler uses.
trait RoSession: FromRequestParts<Arc<App>> + Send + 'static {
    fn get_u64(
        &self,
        key: &'static str,
    ) -> impl Future<Output = Result<Option<u64>, BenchError>> + Send;
}

/// Read, add one, write back; a new session also gets the workload's payload.
async fn count<S: RwSession>(
    State(app): State<Arc<App>>,
    session: S,
) -> Result<Json<Count>, BenchError> {
    let count = session.get_u64(COUNT).await?.unwrap_or(0) + 1;
    if count == 1 && !app.payload.is_empty() {
        session
            .put(PAYLOAD, Value::String(app.payload.clone()))
            .await?;
    }
    session.put(COUNT, Value::from(count)).await?;
    Ok(Json(Count {
        count,
        pid: std::process::id(),
    }))
}

async fn peek<R: RoSession>(session: R) -> Result<Json<Count>, BenchError> {
    let count = session.get_u64(COUNT).await?.unwrap_or(0);
    Ok(Json(Count {
        count,
        pid: std::process::id(),
    }))
}

async fn health() -> &'static str {
    "ok"
}

fn routes<S: RwSession, R: RoSession>(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(count::<S>))
        .route("/peek", get(peek::<R>))
        .route("/health", get(health))
        .with_state(app)
}

// ---- bare axum: a session that is always empty and keeps nothing ----

struct NoSession;

impl<St: Send + Sync> FromRequestParts<St> for NoSession {
    type Rejection = Infallible;

    async fn from_request_parts(_parts: &mut Parts, _state: &St) -> Result<Self, Infallible> {
        Ok(NoSession)
    }
}

impl RwSession for NoSession {
    async fn get_u64(&self, _key: &'static str) -> Result<Option<u64>, BenchError> {
        Ok(None)
    }
    async fn put(&self, _key: &'static str, _value: Value) -> Result<(), BenchError> {
        Ok(())
    }
}

impl RoSession for NoSession {
    async fn get_u64(&self, _key: &'static str) -> Result<Option<u64>, BenchError> {
        Ok(None)
    }
}

// ---- mmap-session ----

impl RwSession for mmap_session::Session {
    async fn get_u64(&self, key: &'static str) -> Result<Option<u64>, BenchError> {
        self.get::<u64>(key).await.map_err(bench_error)
    }
    async fn put(&self, key: &'static str, value: Value) -> Result<(), BenchError> {
        self.insert_value(key, value)
            .await
            .map(drop)
            .map_err(bench_error)
    }
}

impl RoSession for mmap_session::ReadOnlySession {
    async fn get_u64(&self, key: &'static str) -> Result<Option<u64>, BenchError> {
        self.get::<u64>(key).map_err(bench_error)
    }
}

// ---- tower-sessions 0.15 and 0.14: the same API, two crates ----

macro_rules! tower_sessions_impls {
    ($session:ty) => {
        impl RwSession for $session {
            async fn get_u64(&self, key: &'static str) -> Result<Option<u64>, BenchError> {
                self.get::<u64>(key).await.map_err(bench_error)
            }
            async fn put(&self, key: &'static str, value: Value) -> Result<(), BenchError> {
                self.insert_value(key, value)
                    .await
                    .map(drop)
                    .map_err(bench_error)
            }
        }

        impl RoSession for $session {
            async fn get_u64(&self, key: &'static str) -> Result<Option<u64>, BenchError> {
                self.get::<u64>(key).await.map_err(bench_error)
            }
        }
    };
}

tower_sessions_impls!(ts15::Session);
tower_sessions_impls!(ts14::Session);

fn required<'a, T>(value: &'a Option<T>, flag: &str) -> Result<&'a T, String> {
    value
        .as_ref()
        .ok_or_else(|| format!("this backend needs {flag}"))
}

async fn build(cli: &Cli) -> Result<Router, Box<dyn std::error::Error>> {
    let app = Arc::new(App {
        payload: match cli.workload {
            Workload::Small => String::new(),
            Workload::Large => "x".repeat(cli.large_bytes),
        },
    });
    Ok(match cli.backend {
        Backend::None => routes::<NoSession, NoSession>(app),
        Backend::Mmap => {
            let path = required(&cli.store, "--store")?;
            // The defaults (64 KiB) are the largest session size a user would keep; a payload
            // close to that (or above) needs room for the counter and the encoding around it.
            let limit = (cli.large_bytes + 4096).max(mmap_session::DEFAULT_MAX_SESSION_SIZE);
            let options = mmap_session::store::Options::new()
                .max_value_len(limit)
                .durability(cli.durability);
            let store = mmap_session::store::Store::open_with(path, options)
                .map_err(|error| format!("cannot open {}: {error}", path.display()))?;
            routes::<mmap_session::Session, mmap_session::ReadOnlySession>(app).layer(
                mmap_session::SessionLayer::new(store)
                    .secure(false)
                    .max_session_size(limit),
            )
        }
        Backend::MmapRedis => {
            let url = required(&cli.redis_url, "--redis-url")?;
            let pool_size = usize::try_from(cli.pool_size)?;
            let backend = mmap_session_redis::RedisConfig::new(url.as_str())
                .pool_size(pool_size)
                .connect()
                .await?;
            routes::<mmap_session::Session, mmap_session::ReadOnlySession>(app)
                .layer(mmap_session::SessionLayer::new(backend).secure(false))
        }
        Backend::TsMmap | Backend::TsMmapLease => {
            let path = required(&cli.store, "--store")?;
            let options = mmap_session::store::Options::new().durability(cli.durability);
            let store = mmap_session::store::Store::open_with(path, options)
                .map_err(|error| format!("cannot open {}: {error}", path.display()))?;
            let store = mmap_session_tower_sessions::MmapStore::new(store);
            let router = routes::<ts15::Session, ts15::Session>(app)
                .layer(ts15::SessionManagerLayer::new(store).with_secure(false));
            if cli.backend == Backend::TsMmapLease {
                router.layer(mmap_session_tower_sessions::LeaseLayer::new())
            } else {
                router
            }
        }
        Backend::TsMemory => {
            let store = ts15::MemoryStore::default();
            routes::<ts15::Session, ts15::Session>(app)
                .layer(ts15::SessionManagerLayer::new(store).with_secure(false))
        }
        Backend::TsRedis => {
            use tower_sessions_redis_store::fred::prelude::{ClientLike as _, Config, Pool};
            let url = required(&cli.redis_url, "--redis-url")?;
            let config = Config::from_url(url)?;
            let pool_size = usize::try_from(cli.pool_size)?;
            let pool = Pool::new(config, None, None, None, pool_size)?;
            let _connection = pool.connect();
            pool.wait_for_connect().await?;
            let store = tower_sessions_redis_store::RedisStore::new(pool);
            routes::<ts14::Session, ts14::Session>(app)
                .layer(ts14::SessionManagerLayer::new(store).with_secure(false))
        }
        Backend::TsSqlite => {
            use tower_sessions_sqlx_store::sqlx::sqlite::{
                SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
            };
            let path = required(&cli.sqlite_path, "--sqlite-path")?;
            let options = SqliteConnectOptions::from_str("sqlite://")?
                .filename(path)
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal);
            let pool = SqlitePoolOptions::new()
                .max_connections(cli.pool_size)
                .connect_with(options)
                .await?;
            let store = tower_sessions_sqlx_store::SqliteStore::new(pool);
            store.migrate().await?;
            routes::<ts14::Session, ts14::Session>(app)
                .layer(ts14::SessionManagerLayer::new(store).with_secure(false))
        }
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut terminate), Ok(mut interrupt)) => {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
        }
        _ => {
            eprintln!("bench-server: cannot listen for signals; stop it with SIGKILL");
            std::future::pending::<()>().await;
        }
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = async {
        let prometheus = if cli.metrics == "prometheus" {
            let handle =
                metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
            let upkeep = handle.clone();
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(std::time::Duration::from_secs(5));
                loop {
                    ticks.tick().await;
                    upkeep.run_upkeep();
                }
            });
            Some(handle)
        } else {
            None
        };
        let mut router = build(&cli).await?;
        if let Some(handle) = prometheus {
            router = router.route(
                "/metrics",
                axum::routing::get(move || std::future::ready(handle.render())),
            );
        }
        let listener = tokio::net::TcpListener::bind(cli.listen).await?;
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown_signal())
            .await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    }
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("bench-server ({:?}): {error}", cli.backend);
            ExitCode::FAILURE
        }
    }
}
