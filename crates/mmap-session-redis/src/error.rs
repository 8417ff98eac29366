//! What can go wrong talking to Redis, with what to do about it.

/// Why connecting to Redis, or a command sent to it, failed.
///
/// Operations of the [`SessionBackend`](mmap_session::SessionBackend) trait report these inside
/// [`BackendError::Unavailable`](mmap_session::BackendError::Unavailable) when Redis cannot be
/// reached ([`RedisError::is_unavailable`]; the layer answers `503`), and inside
/// [`BackendError::Other`](mmap_session::BackendError::Other) otherwise (`500`). The layer logs
/// them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisError {
    /// The URL is not a Redis URL fred understands.
    #[error("invalid Redis URL (expected redis://[user:password@]host[:port][/db]): {source}")]
    InvalidUrl {
        /// The parser's complaint.
        #[source]
        source: fred::error::Error,
    },
    /// The first connection (or the subscription for lease releases) could not be made.
    #[error("cannot connect to Redis: {source}; check that the server runs and the URL is right")]
    Connect {
        /// The client's error.
        #[source]
        source: fred::error::Error,
    },
    /// A command failed: the connection broke, the server refused it or did not answer in time.
    #[error("the Redis command `{command}` failed: {source}")]
    Command {
        /// Which of the backend's commands or scripts failed.
        command: &'static str,
        /// The client's error.
        #[source]
        source: fred::error::Error,
    },
    /// No connection to Redis is up: the server is down, restarting or unreachable. The client
    /// reconnects in the background; the command was not sent.
    #[error(
        "cannot send `{command}`: not connected to Redis (the client is reconnecting); check \
         that the server runs and is reachable"
    )]
    NotConnected {
        /// Which of the backend's commands or scripts could not be sent.
        command: &'static str,
    },
    /// Redis answered something the backend's scripts never return (another program writing the
    /// same keys, or a server that is not Redis-compatible).
    #[error("unexpected reply from Redis to `{command}`: {reply}")]
    UnexpectedReply {
        /// The command whose reply was unexpected.
        command: &'static str,
        /// The reply, summarised (never a stored value).
        reply: String,
    },
    /// A write of a run of requests of this process on one session failed: the requests of a run
    /// hand the session's lease to each other while their writes are on their way, each starting
    /// from the changes of the one before, so one failed write fails the request that made it and
    /// every later one of the run. Their changes may or may not have been written.
    #[error(
        "a write of this session by this process failed ({reason}); the request's changes, \
         which were part of it or started from it, may not have been written"
    )]
    PipelinedWriteFailed {
        /// Whether the write failed because Redis could not be reached.
        unavailable: bool,
        /// What became of the write.
        reason: String,
    },
    /// A configuration value is out of range.
    #[error("invalid Redis backend configuration: {0}")]
    Config(&'static str),
}

impl RedisError {
    /// Whether the error says that Redis cannot be reached now (no connection, a broken one, no
    /// answer in time, a cluster without a primary for the slot), rather than that it refused
    /// what was asked: the layer answers the first with `503`.
    pub fn is_unavailable(&self) -> bool {
        use fred::error::ErrorKind;
        match self {
            RedisError::NotConnected { .. } => true,
            RedisError::PipelinedWriteFailed { unavailable, .. } => *unavailable,
            RedisError::Command { source, .. } | RedisError::Connect { source } => {
                connection_lost(source)
                    || matches!(
                        source.kind(),
                        ErrorKind::Timeout
                            | ErrorKind::Cluster
                            | ErrorKind::Routing
                            | ErrorKind::Backpressure
                    )
                    || ["CLUSTERDOWN", "TRYAGAIN", "LOADING", "MASTERDOWN"]
                        .iter()
                        .any(|prefix| source.details().starts_with(prefix))
            }
            _ => false,
        }
    }
}

/// Whether the client failed `error`'s command because its connection broke or was not there (it
/// may or may not have run): the command can be sent again on another connection.
pub(crate) fn connection_lost(error: &fred::error::Error) -> bool {
    use fred::error::ErrorKind;
    match error.kind() {
        ErrorKind::IO | ErrorKind::Canceled => true,
        // The client's words for "no connection to send it on" and "its connection broke each
        // time it was written".
        ErrorKind::Unknown => {
            let details = error.details();
            details.starts_with("Failed to route command")
                || details.starts_with("Too many failed write attempts")
        }
        _ => false,
    }
}

impl From<RedisError> for mmap_session::BackendError {
    fn from(error: RedisError) -> Self {
        if error.is_unavailable() {
            mmap_session::BackendError::Unavailable(Box::new(error))
        } else {
            mmap_session::BackendError::Other(Box::new(error))
        }
    }
}
