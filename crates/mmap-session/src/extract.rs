//! The axum extractors.

use std::convert::Infallible;

use axum::extract::{FromRequestParts, OptionalFromRequestParts};
use http::request::Parts;

use crate::error::{SessionError, SessionLayerMissing};
use crate::read_only::ReadOnlySession;
use crate::session::Session;
use crate::typed::TypedSession;

fn session_of(parts: &Parts) -> Result<Session, SessionLayerMissing> {
    parts
        .extensions
        .get::<Session>()
        .cloned()
        .ok_or(SessionLayerMissing)
}

impl<S: Send + Sync> FromRequestParts<S> for Session {
    type Rejection = SessionLayerMissing;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        session_of(parts)
    }
}

/// `Option<Session>`: `None` when no [`SessionLayer`](crate::SessionLayer) wraps the route.
impl<S: Send + Sync> OptionalFromRequestParts<S> for Session {
    type Rejection = Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(session_of(parts).ok())
    }
}

impl<S: Send + Sync, T> FromRequestParts<S> for TypedSession<T> {
    type Rejection = SessionLayerMissing;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        session_of(parts).map(TypedSession::new)
    }
}

/// Takes the snapshot while extracting; a store failure rejects the request with a `500`.
impl<S: Send + Sync> FromRequestParts<S> for ReadOnlySession {
    type Rejection = SessionError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        session_of(parts)?.read_only().await
    }
}
