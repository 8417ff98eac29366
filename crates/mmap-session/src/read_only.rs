//! A lock-free, read-only view of the session.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::SessionError;
use crate::id::SessionId;

/// A read-only snapshot of the session, taken without waiting for or holding its busy lease.
///
/// Use it as an extractor in handlers that only read the session (polling endpoints, parallel page
/// fragments): they do not queue behind a request that holds the session, and they never set a
/// cookie or save anything. The snapshot is the last committed state: a change that another request
/// is still making is not in it. See [`Session::read_only`](crate::Session::read_only).
///
/// # Examples
///
/// ```
/// use mmap_session::ReadOnlySession;
///
/// async fn cart_size(session: ReadOnlySession) -> String {
///     let items: Vec<String> = session.get("cart").ok().flatten().unwrap_or_default();
///     items.len().to_string()
/// }
/// ```
#[derive(Clone, Debug)]
pub struct ReadOnlySession {
    id: Option<SessionId>,
    data: Arc<Map<String, Value>>,
}

impl ReadOnlySession {
    pub(crate) fn new(id: Option<SessionId>, data: Arc<Map<String, Value>>) -> Self {
        Self { id, data }
    }

    pub(crate) fn empty() -> Self {
        Self::new(None, Arc::new(Map::new()))
    }

    /// The id of the session read, or `None` if the request has no live session.
    pub fn id(&self) -> Option<SessionId> {
        self.id
    }

    /// The value under `key`, decoded as `T`.
    ///
    /// # Errors
    ///
    /// [`SessionError::Serde`] if the value does not decode as `T`.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, SessionError> {
        match self.data.get(key) {
            Some(value) => T::deserialize(value)
                .map(Some)
                .map_err(SessionError::from_serde),
            None => Ok(None),
        }
    }

    /// The JSON value under `key`.
    pub fn get_value(&self, key: &str) -> Option<&Value> {
        self.data.get(key)
    }

    /// The whole session decoded as one `T`; `None` if the session is empty.
    ///
    /// # Errors
    ///
    /// [`SessionError::Serde`] if the session does not decode as `T`.
    pub fn data<T: DeserializeOwned>(&self) -> Result<Option<T>, SessionError> {
        if self.data.is_empty() {
            return Ok(None);
        }
        T::deserialize(&Value::Object(Map::clone(&self.data)))
            .map(Some)
            .map_err(SessionError::from_serde)
    }

    /// The session's keys and values.
    pub fn map(&self) -> &Map<String, Value> {
        &self.data
    }

    /// True if the session holds no key (or there is no session).
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}
