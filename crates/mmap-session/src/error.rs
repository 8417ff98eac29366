//! Errors a handler can see, and the responses they become.

use std::sync::Arc;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, StatusCode};

use crate::backend::BackendError;

/// Why a session operation failed.
///
/// It converts into a response (`?` in a handler works): [`SessionError::LeaseTimeout`], a full
/// store and an unavailable one ([`BackendError::Unavailable`]) become `503 Service Unavailable`
/// with `Retry-After: 1` (all pass), [`SessionError::Replaced`] a `409 Conflict`, everything else
/// a plain `500`. The response never
/// carries details; the layer has already logged the cause.
///
/// When the session could not be loaded (lease timeout, store failure), the layer replaces the
/// handler's response with that error response whatever the handler returned, so a success status
/// always means the session was handled as the handler asked.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// Another request held this session's lease past the wait deadline
    /// ([`SessionLayer::lease_wait`](crate::SessionLayer::lease_wait)).
    #[error("the session is busy: another request held it past the wait deadline")]
    LeaseTimeout,
    /// The session store failed.
    #[error("the session store failed")]
    Store(#[source] Arc<BackendError>),
    /// The session would be larger than
    /// [`SessionLayer::max_session_size`](crate::SessionLayer::max_session_size); the change was not
    /// made.
    #[error("the session would have {len} bytes; at most {max} are allowed")]
    TooLarge {
        /// Encoded size the change would have produced.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// A value nests deeper than the session can store and read back (arrays and objects, more
    /// than `max` levels inside one another); the change was not made.
    #[error("a session value nests more than {max} levels deep, so it could not be read back")]
    TooDeep {
        /// The deepest nesting a value may have.
        max: usize,
    },
    /// The stored session could not be decoded (written by another version of the application,
    /// or damaged). It is kept as it was, for whatever can read it, and the layer counts it
    /// ([`SessionLayer::undecodable_sessions`](crate::SessionLayer::undecodable_sessions)).
    #[error("the stored session could not be decoded; it was kept as it was")]
    Undecodable,
    /// Another request gave the session a new id ([`Session::cycle_id`](crate::Session::cycle_id),
    /// at login) or ended it ([`Session::flush`](crate::Session::flush), at logout) while this
    /// request, which carried the old cookie, was waiting or on its way. This request sees an
    /// empty session, may not change it, and sends no cookie, so that the other request's cookie
    /// stays in the browser. Answered with `409 Conflict`.
    #[error("another request replaced this session (login or logout); the change was not made")]
    Replaced,
    /// A value could not be converted to or from JSON as the requested type.
    #[error("a session value could not be converted to or from the requested type")]
    Serde(#[source] Arc<serde_json::Error>),
    /// A typed view's value did not serialize to a JSON object, so it cannot be the session's map.
    #[error("the session data must serialize to a JSON object")]
    NotAnObject,
    /// No session id could be drawn from the operating system's random source.
    #[error("no random session id could be generated")]
    Random,
    /// The session was used after its request's response was produced (for example, from a task that
    /// outlived the request).
    #[error("the session was used after its response was produced")]
    Finished,
    /// No [`SessionLayer`](crate::SessionLayer) wraps this route.
    #[error("no SessionLayer wraps this route")]
    LayerMissing,
}

impl SessionError {
    pub(crate) fn from_serde(error: serde_json::Error) -> Self {
        SessionError::Serde(Arc::new(error))
    }

    pub(crate) fn from_backend(error: BackendError) -> Self {
        match error {
            BackendError::LeaseTimeout => SessionError::LeaseTimeout,
            other => SessionError::Store(Arc::new(other)),
        }
    }

    /// The status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            SessionError::LeaseTimeout => StatusCode::SERVICE_UNAVAILABLE,
            SessionError::Store(e)
                if matches!(**e, BackendError::StoreFull | BackendError::Unavailable(_)) =>
            {
                StatusCode::SERVICE_UNAVAILABLE
            }
            SessionError::Replaced => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// A plain-text error response with nothing but the status's reason.
pub(crate) fn plain_response(status: StatusCode) -> Response {
    let text = status.canonical_reason().unwrap_or("Error");
    let mut response = Response::new(Body::from(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

impl IntoResponse for SessionError {
    fn into_response(self) -> Response {
        match &self {
            // Expected under load, or logged where the session's short hash is known.
            SessionError::LeaseTimeout | SessionError::Replaced | SessionError::Undecodable => {}
            // serde's message may quote session contents: log only the kind of failure.
            SessionError::Serde(error) => tracing::error!(
                category = ?error.classify(),
                "a session value could not be converted to or from the requested type"
            ),
            other => tracing::error!(error = %other, "session error"),
        }
        plain_response(self.status())
    }
}

/// Rejection of the session extractors when no [`SessionLayer`](crate::SessionLayer) wraps the
/// route: a `500` that says so (the route is wired wrong; this is not the client's fault).
#[derive(Clone, Copy, Debug, Default, thiserror::Error)]
#[error("missing session layer: wrap the router (or this route) in mmap_session::SessionLayer")]
#[non_exhaustive]
pub struct SessionLayerMissing;

impl IntoResponse for SessionLayerMissing {
    fn into_response(self) -> Response {
        tracing::error!("{self}");
        let mut response = Response::new(Body::from(self.to_string()));
        *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    }
}

impl From<SessionLayerMissing> for SessionError {
    fn from(_: SessionLayerMissing) -> Self {
        SessionError::LayerMissing
    }
}
