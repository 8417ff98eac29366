use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use axum::body::{Body, Bytes, HttpBody};
use axum::BoxError;
use http::Response;
use pin_project_lite::pin_project;

use crate::backend::BoxFuture;
use crate::save::finish;
use crate::session::RequestGuard;

pin_project! {
    /// Response future of [`SessionService`](crate::SessionService): runs the inner service's
    /// future, then settles the session.
    ///
    /// Dropping it at any point releases the session's lease without saving.
    pub struct ResponseFuture<F> {
        #[pin]
        step: Step<F>,
        // Declared after `step`, so it is dropped after it: by then a settling in progress has let
        // go of the session's state, and the guard can release whatever is left.
        guard: RequestGuard,
    }
}

pin_project! {
    #[project = StepProj]
    enum Step<F> {
        Handler { #[pin] future: F },
        Settling { future: BoxFuture<'static, Response<Body>> },
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(future: F, guard: RequestGuard) -> Self {
        Self {
            step: Step::Handler { future },
            guard,
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let step = match self.step {
            Step::Handler { .. } => "handler",
            Step::Settling { .. } => "settling",
        };
        f.debug_struct("ResponseFuture")
            .field("step", &step)
            .finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.step.as_mut().project() {
                StepProj::Handler { future } => {
                    let response = match ready!(future.poll(cx)) {
                        Ok(response) => response.map(Body::new),
                        Err(error) => {
                            this.guard.0.abandon();
                            return Poll::Ready(Err(error));
                        }
                    };
                    if this.guard.0.finish_if_untouched() {
                        return Poll::Ready(Ok(response));
                    }
                    let settling = Box::pin(finish(Arc::clone(&this.guard.0), response));
                    this.step.set(Step::Settling { future: settling });
                }
                StepProj::Settling { future } => {
                    return Poll::Ready(Ok(ready!(future.as_mut().poll(cx))));
                }
            }
        }
    }
}
