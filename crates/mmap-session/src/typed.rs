//! A typed view for sessions kept as one serde struct.

use std::fmt;
use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::SessionError;
use crate::session::Session;

/// The whole session as one `T`, for applications that keep their session data in a single struct.
///
/// `T` is stored as the session's map (its fields are the session's keys), so it must serialize to a
/// JSON object. An empty session reads as `T::default()`; writing a value equal to the stored one is
/// not a change. It is an extractor, like [`Session`], and shares its lease and lifecycle.
///
/// # Examples
///
/// ```
/// use mmap_session::{SessionError, TypedSession};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Default, Serialize, Deserialize)]
/// struct Visitor {
///     visits: u64,
///     name: Option<String>,
/// }
///
/// async fn visit(session: TypedSession<Visitor>) -> Result<String, SessionError> {
///     let visits = session.update(|v| { v.visits += 1; v.visits }).await?;
///     Ok(format!("visit number {visits}"))
/// }
/// ```
pub struct TypedSession<T> {
    session: Session,
    _data: PhantomData<fn() -> T>,
}

impl<T> Clone for TypedSession<T> {
    fn clone(&self) -> Self {
        Self::new(self.session.clone())
    }
}

impl<T> fmt::Debug for TypedSession<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TypedSession")
            .field("session", &self.session)
            .finish()
    }
}

impl<T> TypedSession<T> {
    /// Views `session` as a `T`.
    pub fn new(session: Session) -> Self {
        Self {
            session,
            _data: PhantomData,
        }
    }

    /// The untyped session (for [`Session::flush`], [`Session::cycle_id`], expiry, ...).
    pub fn session(&self) -> &Session {
        &self.session
    }
}

impl<T: Serialize + DeserializeOwned + Default> TypedSession<T> {
    /// The session's data; `T::default()` if the session is empty.
    ///
    /// # Errors
    ///
    /// [`SessionError::Serde`] if the stored data does not decode as `T`; load errors.
    pub async fn get(&self) -> Result<T, SessionError> {
        Ok(self.session.data().await?.unwrap_or_default())
    }

    /// Replaces the session's data with `value`.
    ///
    /// # Errors
    ///
    /// As [`Session::set_data`].
    pub async fn set(&self, value: &T) -> Result<(), SessionError> {
        self.session.set_data(value).await
    }

    /// Reads the data, lets `f` change it, writes it back, and returns what `f` returned.
    ///
    /// # Errors
    ///
    /// As [`TypedSession::get`] and [`TypedSession::set`]; if writing fails, the session keeps its
    /// previous data.
    pub async fn update<R>(&self, f: impl FnOnce(&mut T) -> R) -> Result<R, SessionError> {
        let mut value = self.get().await?;
        let result = f(&mut value);
        self.set(&value).await?;
        Ok(result)
    }
}
