//! Session ids: 128 bits from the operating system's CSPRNG, written as 22 characters of base64url.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

/// Number of characters of an encoded [`SessionId`].
pub(crate) const ENCODED_LEN: usize = 22;

/// A session id: 128 random bits from the operating system's CSPRNG.
///
/// The id is a bearer credential: whoever holds it holds the session. That is why this type has no
/// `Display`, and why its `Debug` shows only a [`ShortHash`]: logging a `SessionId` by accident never
/// writes the id itself. Use [`SessionId::encode`] where the text of the id is really needed.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId([u8; 16]);

impl SessionId {
    /// Draws a fresh id from the operating system's CSPRNG.
    pub(crate) fn generate() -> Result<Self, getrandom::Error> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes)?;
        Ok(Self(bytes))
    }

    /// Parses the 22-character base64url form (no padding).
    ///
    /// Returns `None` for anything else, including non-canonical encodings, so that every id has
    /// exactly one text form. Parsing an id says nothing about whether a session with that id exists.
    ///
    /// # Examples
    ///
    /// ```
    /// use mmap_session::SessionId;
    ///
    /// assert!(SessionId::decode("AAAAAAAAAAAAAAAAAAAAAA").is_some());
    /// assert!(SessionId::decode("too-short").is_none());
    /// ```
    pub fn decode(text: &str) -> Option<Self> {
        if text.len() != ENCODED_LEN {
            return None;
        }
        // 22 characters may decode to up to 18 bytes by the length estimate; only 16 are valid.
        let mut buf = [0u8; 18];
        let len = URL_SAFE_NO_PAD.decode_slice(text, &mut buf).ok()?;
        let bytes: [u8; 16] = buf.get(..len)?.try_into().ok()?;
        Some(Self(bytes))
    }

    /// The 22-character base64url form, as sent in the cookie.
    ///
    /// This is the credential itself: never log it. Log [`SessionId::short_hash`] instead.
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }

    /// The raw 16 bytes of the id. The layer uses them as the key in the [`SessionBackend`].
    ///
    /// [`SessionBackend`]: crate::SessionBackend
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// A short, one-way name for this id that is safe to log: the first 8 hex characters of the
    /// BLAKE3 hash of the id's 16 bytes, the same name under which the store logs the session and
    /// `mmap-session-admin list` shows it.
    ///
    /// An operator who has a cookie can compute it (`mmap-session-admin hash <cookie value>`) and
    /// find that session's lines in the logs; the logs alone do not give anyone the id.
    pub fn short_hash(&self) -> ShortHash {
        let hash = blake3::hash(&self.0);
        let mut out = [0u8; 4];
        out.copy_from_slice(&hash.as_bytes()[..4]);
        ShortHash(out)
    }
}

impl SessionId {
    /// The id's [`ShortHash`] for a log line, hashed only if the line is written: most requests
    /// log nothing, and BLAKE3 of the id is a measurable part of a request's cost.
    pub(crate) fn log_name(self) -> LogName {
        LogName(self)
    }
}

/// Displays as its id's [`ShortHash`], computed when shown.
#[derive(Clone, Copy)]
pub(crate) struct LogName(SessionId);

impl fmt::Display for LogName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.short_hash(), f)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId(#{})", self.short_hash())
    }
}

/// The log-safe name of a [`SessionId`]: 8 hex characters (see [`SessionId::short_hash`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShortHash([u8; 4]);

impl fmt::Display for ShortHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ShortHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn a_generated_id_round_trips_through_its_22_character_form() {
        let id = SessionId::generate().unwrap();
        let text = id.encode();
        assert_eq!(text.len(), ENCODED_LEN);
        assert!(text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(SessionId::decode(&text), Some(id));
    }

    #[test]
    fn two_generated_ids_differ() {
        assert_ne!(
            SessionId::generate().unwrap(),
            SessionId::generate().unwrap()
        );
    }

    #[test]
    fn a_non_canonical_or_wrongly_sized_text_is_not_an_id() {
        // The last character of a canonical 16-byte encoding carries 2 bits and 4 zero bits.
        assert!(SessionId::decode("AAAAAAAAAAAAAAAAAAAAAB").is_none());
        assert!(SessionId::decode("AAAAAAAAAAAAAAAAAAAAA").is_none());
        assert!(SessionId::decode("AAAAAAAAAAAAAAAAAAAAAAA").is_none());
        assert!(SessionId::decode("AAAAAAAAAAAAAAAAAAAA+/").is_none());
        assert!(SessionId::decode("AAAAAAAAAAAAAAAAAAAAé").is_none());
    }

    #[test]
    fn debug_shows_the_short_hash_and_never_the_id() {
        let id = SessionId::generate().unwrap();
        let shown = format!("{id:?}");
        assert!(!shown.contains(&id.encode()));
        assert!(shown.contains(&id.short_hash().to_string()));
        assert_eq!(id.short_hash().to_string().len(), 8);
    }
}
