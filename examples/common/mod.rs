//! What the example servers share: their command line, logging, the session storage (a file or
//! Redis), the listening socket and graceful shutdown. Included by each example with `#[path]`; not an example of its own.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use axum::Router;
use clap::{ArgGroup, Args};
use mmap_session::store::{Options, Store};
use mmap_session::SessionLayer;
use mmap_session_redis::RedisConfig;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// The flags every example server takes.
#[derive(Args, Debug, Clone)]
#[command(group(ArgGroup::new("sessions").required(true).args(["store", "redis"])))]
pub(crate) struct ServerArgs {
    /// Address to listen on, e.g. 127.0.0.1:3000.
    #[arg(long)]
    pub(crate) listen: SocketAddr,

    /// The session file. Every process started with the same path shares the same sessions; it is
    /// created on first use.
    #[arg(long, value_name = "PATH")]
    pub(crate) store: Option<PathBuf>,

    /// Keep the sessions in Redis instead of a file, e.g. redis://127.0.0.1:6379. Every process
    /// given the same server shares the same sessions, on any machine.
    #[arg(long, value_name = "URL")]
    pub(crate) redis: Option<String>,

    /// Send the session cookie without the `Secure` attribute, so that browsers and clients keep it
    /// over plain http (local development and the tests on 127.0.0.1). Never use it behind HTTPS.
    #[arg(long)]
    pub(crate) insecure_cookies: bool,

    /// Bind with SO_REUSEPORT, so that several processes can listen on the same port and the kernel
    /// spreads connections over them (the demo's fallback when nginx is not installed).
    #[arg(long)]
    pub(crate) reuse_port: bool,

    /// How long a request waits for its session while another request of the same session holds it
    /// (the layer's `lease_wait`); past it the answer is 503 with `Retry-After: 1`.
    #[arg(long, value_name = "MS")]
    pub(crate) lease_wait_ms: Option<u64>,

    /// How long this process lets a live holder keep a session's lease before taking it over (the
    /// store's `lease_timeout`). A holder whose process died is taken over at once regardless with a
    /// file; with Redis, a lease lives this long unless released, whatever happened to its holder.
    #[arg(long, value_name = "MS")]
    pub(crate) lease_timeout_ms: Option<u64>,
}

/// Logs to stderr; `RUST_LOG` selects what (default: `info`).
pub(crate) fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Opens (or creates) the shared session file, or connects to Redis, and wraps it in a layer
/// configured from the flags.
pub(crate) async fn session_layer(
    args: &ServerArgs,
) -> Result<SessionLayer, Box<dyn std::error::Error>> {
    let lease_timeout = args.lease_timeout_ms.map(Duration::from_millis);
    let layer = match (&args.store, &args.redis) {
        (None, Some(url)) => {
            let mut config = RedisConfig::new(url.as_str());
            if let Some(timeout) = lease_timeout {
                config = config.lease_timeout(timeout);
            }
            let backend = config
                .connect()
                .await
                .map_err(|error| format!("cannot use Redis for the sessions: {error}"))?;
            SessionLayer::new(backend)
        }
        (Some(path), None) => {
            let mut options = Options::new();
            if let Some(timeout) = lease_timeout {
                options = options.lease_timeout(timeout);
            }
            let store = Store::open_with(path, options).map_err(|error| {
                format!("cannot open the session file {}: {error}", path.display())
            })?;
            SessionLayer::new(store)
        }
        _ => return Err("give exactly one of --store PATH and --redis URL".into()),
    };
    let mut layer = layer.secure(!args.insecure_cookies);
    if let Some(ms) = args.lease_wait_ms {
        layer = layer.lease_wait(Duration::from_millis(ms));
    }
    Ok(layer)
}

/// Binds the listening socket, with SO_REUSEPORT when asked.
pub(crate) fn bind(args: &ServerArgs) -> std::io::Result<TcpListener> {
    let socket = Socket::new(
        Domain::for_address(args.listen),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    // A restarted process must be able to bind while connections of its predecessor linger.
    socket.set_reuse_address(true)?;
    if args.reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&args.listen.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Serves `app` until SIGTERM or Ctrl-C, then lets the requests in flight finish.
pub(crate) async fn serve(listener: TcpListener, app: Router) -> std::io::Result<()> {
    let address = listener.local_addr()?;
    tracing::info!(%address, pid = std::process::id(), "listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    tracing::info!(pid = std::process::id(), "stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C: shutting down"),
        () = terminate => tracing::info!("SIGTERM: shutting down"),
    }
}
