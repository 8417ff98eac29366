//! How a tower-sessions [`Record`] is laid out in a store value, and under which key.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tower_sessions_core::session::{Id, Record};

/// The store value of a session: its data and its expiry, as JSON. The id is not part of it: it is
/// the key, which the store keeps only as a BLAKE3 hash, so the file holds no usable session id.
#[derive(Serialize, Deserialize)]
struct Stored<D> {
    data: D,
    /// Kept at full precision (the store's own expiry has millisecond resolution), so that a
    /// loaded record equals the saved one.
    #[serde(with = "time::serde::timestamp::nanoseconds")]
    expiry_date: OffsetDateTime,
}

/// The store key of a session: the 16 bytes of its id, in the order its cookie value encodes them
/// (tower-sessions writes the id as base64url of its little-endian bytes, as `mmap-session`
/// writes its own ids), so the operator tool finds a session from its cookie value.
pub(crate) fn key_of(id: &Id) -> [u8; 16] {
    id.0.to_le_bytes()
}

/// The name of a session in logs: the first 8 hex characters of the BLAKE3 hash of its key, the
/// same name the store logs it under and `mmap-session-admin list` shows. Never the id itself.
pub(crate) fn short_hash(key: &[u8]) -> String {
    blake3::hash(key).as_bytes()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The store value for `record` (every part of it but the id).
pub(crate) fn encode(record: &Record) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&Stored {
        data: &record.data,
        expiry_date: record.expiry_date,
    })
}

/// Why a stored value is not a session record.
#[derive(Debug)]
pub(crate) enum Undecodable {
    /// serde_json reads the strings of fields it skips without checking them, so the whole value
    /// is checked first: a record that is not UTF-8 is damaged, whatever its fields.
    NotUtf8,
    /// Not the JSON of a record.
    Json(serde_json::Error),
}

impl fmt::Display for Undecodable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Undecodable::NotUtf8 => f.write_str("not UTF-8"),
            // serde_json's own message may quote the session's data: only where and what kind.
            Undecodable::Json(e) => write!(
                f,
                "{:?} error in its JSON at line {} column {}",
                e.classify(),
                e.line(),
                e.column()
            ),
        }
    }
}

/// The record of session `id` from its store value.
pub(crate) fn decode(id: Id, value: &[u8]) -> Result<Record, Undecodable> {
    let text = std::str::from_utf8(value).map_err(|_| Undecodable::NotUtf8)?;
    let stored: Stored<HashMap<String, serde_json::Value>> =
        serde_json::from_str(text).map_err(Undecodable::Json)?;
    Ok(Record {
        id,
        data: stored.data,
        expiry_date: stored.expiry_date,
    })
}

/// The absolute expiry the store keeps for a record expiring at `date`. A date before 1970 is
/// already past; one too far out for the platform's clock is kept as the latest it can hold.
pub(crate) fn store_expiry(date: OffsetDateTime) -> SystemTime {
    let Ok(seconds) = u64::try_from(date.unix_timestamp()) else {
        return UNIX_EPOCH;
    };
    let since_epoch = Duration::new(seconds, date.nanosecond());
    UNIX_EPOCH
        .checked_add(since_epoch)
        .unwrap_or_else(|| UNIX_EPOCH + Duration::from_millis(u64::MAX))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn record() -> Record {
        Record {
            id: Id(0x0123_4567_89ab_cdef_0011_2233_4455_6677),
            data: HashMap::from([
                ("user".to_owned(), serde_json::json!("ada")),
                ("cart".to_owned(), serde_json::json!([1, 2, 3])),
            ]),
            expiry_date: OffsetDateTime::from_unix_timestamp_nanos(1_900_000_000_123_456_789)
                .unwrap(),
        }
    }

    #[test]
    fn a_record_round_trips_through_its_value_at_full_precision() {
        let record = record();
        let value = encode(&record).unwrap();
        assert_eq!(decode(record.id, &value).unwrap(), record);
    }

    #[test]
    fn the_value_does_not_contain_the_id() {
        let record = record();
        let value = String::from_utf8(encode(&record).unwrap()).unwrap();
        assert!(!value.contains(&record.id.to_string()), "{value}");
        assert!(!value.contains(&record.id.0.to_string()), "{value}");
    }

    #[test]
    fn the_key_is_the_id_as_its_cookie_value_encodes_it() {
        let id = record().id;
        let cookie_id = mmap_session::SessionId::decode(&id.to_string()).unwrap();
        assert_eq!(cookie_id.as_bytes(), &key_of(&id));
        assert_eq!(short_hash(&key_of(&id)), cookie_id.short_hash().to_string());
    }

    #[test]
    fn damaged_values_are_not_records() {
        let id = record().id;
        assert!(matches!(
            decode(id, b"{\"data\":"),
            Err(Undecodable::Json(_))
        ));
        assert!(matches!(decode(id, b"[1,2]"), Err(Undecodable::Json(_))));
        // Invalid UTF-8 inside a field serde_json would skip unchecked.
        let mut value = br#"{"data":{},"expiry_date":1,"extra":"#.to_vec();
        value.extend_from_slice(b"\"\xff\"}");
        assert!(matches!(decode(id, &value), Err(Undecodable::NotUtf8)));
    }

    #[test]
    fn expiry_dates_map_to_store_times() {
        let date = record().expiry_date;
        let at = store_expiry(date);
        let since = at.duration_since(UNIX_EPOCH).unwrap();
        assert_eq!(since.as_nanos(), 1_900_000_000_123_456_789);
        assert_eq!(
            store_expiry(OffsetDateTime::from_unix_timestamp(-5).unwrap()),
            UNIX_EPOCH
        );
        // The latest date tower-sessions can hold does not overflow.
        let _ = store_expiry(time::PrimitiveDateTime::MAX.assume_utc());
    }
}
