//! Run: `cargo run --release --example counter -- --listen 127.0.0.1:3000 --store /tmp/sessions --insecure-cookies`
//! (or `--redis redis://127.0.0.1:6379` instead of `--store PATH`, to keep the sessions in Redis).
//!
//! A per-session counter. Start several copies on different ports with the same `--store` (or the
//! same `--redis`) and the count follows the client from process to process; the end-to-end tests
//! drive it that way.
//!
//! - `GET /health`: `200 ok`; never touches the session, sets no cookie.
//! - `GET /`: increments the session's counter (a new session starts at 1) and answers
//!   `{"count": N, "pid": P}`, P being the serving process.
//! - `GET /peek`: the same JSON without changing anything (`count` is 0 without a session); it reads
//!   the last committed state without waiting for the session, and sets no cookie.
//! - `POST /logout`: deletes the session and expires the cookie.
//!
//! `--hold-ms N` makes `GET /` keep the session for N milliseconds between reading and writing the
//! count, as a handler doing work of its own would (the kill tests use it so that a kill lands while
//! a process holds the session).
//!
//! `--insecure-cookies` drops the cookie's `Secure` attribute so that it is kept over plain http;
//! `--lease-wait-ms` and `--lease-timeout-ms` tune how long a busy session is waited for and how long
//! a live holder may keep it. SIGTERM or Ctrl-C stops the server gracefully.

use std::process::ExitCode;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use mmap_session::{ReadOnlySession, Session, SessionError};
use serde::Serialize;

#[path = "common/mod.rs"]
mod common;

/// Session key of the counter.
const COUNT: &str = "count";

#[derive(Parser, Debug)]
#[command(
    about = "A per-session counter shared by every process that opens the same session file or Redis"
)]
struct Cli {
    #[command(flatten)]
    server: common::ServerArgs,
    /// Milliseconds `GET /` holds the session between reading and writing the count.
    #[arg(long, default_value_t = 0)]
    hold_ms: u64,
}

#[derive(Serialize)]
struct Count {
    count: u64,
    pid: u32,
}

impl Count {
    fn here(count: u64) -> Json<Self> {
        Json(Self {
            count,
            pid: std::process::id(),
        })
    }
}

async fn health() -> &'static str {
    "ok"
}

/// How long `GET /` holds the session between its read and its write (`--hold-ms`).
#[derive(Clone, Copy)]
struct Hold(Duration);

/// Read, add one, write: the session's lease makes this atomic across every process.
async fn increment(
    State(Hold(hold)): State<Hold>,
    session: Session,
) -> Result<Json<Count>, SessionError> {
    let count = session.get::<u64>(COUNT).await?.unwrap_or(0) + 1;
    if !hold.is_zero() {
        tokio::time::sleep(hold).await;
    }
    session.insert(COUNT, count).await?;
    Ok(Count::here(count))
}

async fn peek(session: ReadOnlySession) -> Result<Json<Count>, SessionError> {
    Ok(Count::here(session.get::<u64>(COUNT)?.unwrap_or(0)))
}

async fn logout(session: Session) -> Result<StatusCode, SessionError> {
    session.flush().await?;
    Ok(StatusCode::OK)
}

fn app(hold: Hold) -> Router {
    Router::new()
        .route("/", get(increment))
        .route("/peek", get(peek))
        .route("/logout", post(logout))
        .route("/health", get(health))
        .with_state(hold)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> ExitCode {
    common::init_tracing();
    let cli = Cli::parse();
    let result = async {
        let layer = common::session_layer(&cli.server).await?;
        let listener = common::bind(&cli.server)?;
        let hold = Hold(Duration::from_millis(cli.hold_ms));
        common::serve(listener, app(hold).layer(layer)).await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    }
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error}");
            ExitCode::FAILURE
        }
    }
}
