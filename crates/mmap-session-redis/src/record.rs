//! How a record is stored in its Redis value: its absolute expiry, then the layer's bytes.
//!
//! | bytes | what |
//! |---|---|
//! | 0..8 | `expires_at`: nanoseconds since the Unix epoch, little-endian `u64` (to year 2554) |
//! | 8.. | the value the layer committed |
//!
//! Redis also drops the key by its TTL; the expiry in the value is what the layer gets back, exact
//! to the nanosecond, and what a read checks against this machine's clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mmap_session::StoredRecord;

const HEADER: usize = 8;

/// `expires_at` as nanoseconds since the epoch (0 for a time before it, saturating far ahead).
fn nanos(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|since| u64::try_from(since.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The stored form of a record.
pub(crate) fn encode(value: &[u8], expires_at: SystemTime) -> Vec<u8> {
    let mut stored = Vec::with_capacity(HEADER + value.len());
    stored.extend_from_slice(&nanos(expires_at).to_le_bytes());
    stored.extend_from_slice(value);
    stored
}

/// The record in a stored value, if it is one and has not expired by `now`.
pub(crate) fn decode(stored: &[u8], now: SystemTime) -> Result<Option<StoredRecord>, Malformed> {
    let Some((header, value)) = stored.split_first_chunk::<HEADER>() else {
        return Err(Malformed);
    };
    let expires_at = UNIX_EPOCH
        .checked_add(Duration::from_nanos(u64::from_le_bytes(*header)))
        .ok_or(Malformed)?;
    if expires_at <= now {
        return Ok(None);
    }
    Ok(Some(StoredRecord {
        value: value.to_vec(),
        expires_at,
    }))
}

/// A stored value too short to hold a record (not written by this backend).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Malformed;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_to_the_nanosecond() {
        let at = UNIX_EPOCH + Duration::from_nanos(1_800_000_000_123_456_789);
        let stored = encode(b"hello", at);
        let record = decode(&stored, UNIX_EPOCH).unwrap().unwrap();
        assert_eq!(record.value, b"hello");
        assert_eq!(record.expires_at, at);
    }

    #[test]
    fn an_expired_record_is_absent() {
        let at = UNIX_EPOCH + Duration::from_secs(100);
        let stored = encode(b"x", at);
        assert_eq!(decode(&stored, at).unwrap(), None);
        assert_eq!(decode(&stored, at + Duration::from_secs(1)).unwrap(), None);
        assert!(decode(&stored, at - Duration::from_secs(1))
            .unwrap()
            .is_some());
    }

    #[test]
    fn a_short_value_is_malformed() {
        assert_eq!(decode(b"1234567", UNIX_EPOCH), Err(Malformed));
        assert_eq!(
            decode(
                &encode(b"", UNIX_EPOCH + Duration::from_secs(1)),
                UNIX_EPOCH
            )
            .unwrap()
            .unwrap()
            .value,
            b""
        );
    }
}
