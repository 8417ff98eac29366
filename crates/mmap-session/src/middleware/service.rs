use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes, HttpBody};
use axum::BoxError;
use http::{Request, Response};
use tower_service::Service;

use super::future::ResponseFuture;
use crate::cookies;
use crate::metrics;
use crate::session::{Session, Shared};

/// The service built by [`SessionLayer`](crate::SessionLayer): gives every request a lazy
/// [`Session`] and settles it when the response is ready.
#[derive(Clone, Debug)]
pub struct SessionService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> SessionService<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for SessionService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    ResBody: HttpBody<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        metrics::start_gauges(&self.shared);
        let cookie = cookies::session_cookies(request.headers(), &self.shared.config);
        let session = Session::new(Arc::clone(&self.shared), cookie);
        let guard = session.guard();
        request.extensions_mut().insert(session);
        // The clone has not been driven to readiness; the original, which has, serves this call
        // (tower's note on cloning services in `call`).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::new(inner.call(request), guard)
    }
}
