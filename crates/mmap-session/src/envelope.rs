//! The bytes of a stored session: a small JSON envelope around the session's map.
//!
//! `{"d": {..the session's keys..}, "x": <per-session expiry, only if set>}`. The record's absolute
//! expiry lives in the store next to the bytes; the time of the last sliding refresh follows from it
//! (expiry minus the inactivity period), so it needs no field of its own.

use std::io;
use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::Expiry;

/// A per-session expiry as stored: milliseconds, so the envelope stays plain JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum StoredExpiry {
    #[serde(rename = "s")]
    OnSessionEnd,
    #[serde(rename = "i")]
    OnInactivity(u64),
    #[serde(rename = "t")]
    AtDateTime(u64),
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl From<Expiry> for StoredExpiry {
    fn from(expiry: Expiry) -> Self {
        match expiry {
            Expiry::OnSessionEnd => StoredExpiry::OnSessionEnd,
            Expiry::OnInactivity(ttl) => StoredExpiry::OnInactivity(millis(ttl)),
            Expiry::AtDateTime(at) => {
                StoredExpiry::AtDateTime(millis(at.duration_since(UNIX_EPOCH).unwrap_or_default()))
            }
        }
    }
}

impl From<StoredExpiry> for Expiry {
    fn from(stored: StoredExpiry) -> Self {
        match stored {
            StoredExpiry::OnSessionEnd => Expiry::OnSessionEnd,
            StoredExpiry::OnInactivity(ms) => Expiry::OnInactivity(Duration::from_millis(ms)),
            StoredExpiry::AtDateTime(ms) => Expiry::AtDateTime(
                UNIX_EPOCH
                    .checked_add(Duration::from_millis(ms))
                    .unwrap_or(UNIX_EPOCH),
            ),
        }
    }
}

#[derive(Serialize)]
struct EnvelopeRef<'a> {
    #[serde(rename = "d")]
    data: &'a Map<String, Value>,
    #[serde(rename = "x", skip_serializing_if = "Option::is_none")]
    expiry: Option<StoredExpiry>,
}

/// A decoded session.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Decoded {
    pub(crate) data: Map<String, Value>,
    pub(crate) expiry: Option<Expiry>,
}

pub(crate) fn encode(
    data: &Map<String, Value>,
    expiry: Option<Expiry>,
) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&EnvelopeRef {
        data,
        expiry: expiry.map(StoredExpiry::from),
    })
}

/// The length [`encode`] would produce, without building the bytes.
pub(crate) fn encoded_len(
    data: &Map<String, Value>,
    expiry: Option<Expiry>,
) -> Result<usize, serde_json::Error> {
    let mut counter = Counter(0);
    serde_json::to_writer(
        &mut counter,
        &EnvelopeRef {
            data,
            expiry: expiry.map(StoredExpiry::from),
        },
    )?;
    Ok(counter.0)
}

pub(crate) fn decode(bytes: &[u8]) -> Result<Decoded, serde_json::Error> {
    // The whole record is parsed, fields this version does not know included. serde_json checks
    // less in fields it skips (their bytes need not be UTF-8, their escapes need not be valid,
    // their nesting has no limit), so skipping them would accept records that are not JSON.
    let mut fields: Map<String, Value> = serde_json::from_slice(bytes)?;
    let data = match fields.remove("d") {
        Some(Value::Object(data)) => data,
        _ => return Err(invalid("no session map under \"d\"")),
    };
    let expiry = match fields.remove("x") {
        Some(stored) => serde_json::from_value::<Option<StoredExpiry>>(stored)?,
        None => None,
    };
    Ok(Decoded {
        data,
        expiry: expiry.map(Expiry::from),
    })
}

fn invalid(what: &str) -> serde_json::Error {
    <serde_json::Error as serde::de::Error>::custom(what)
}

struct Counter(usize);

impl io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 = self.0.saturating_add(buf.len());
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn a_session_round_trips_with_and_without_its_own_expiry() {
        let mut data = Map::new();
        data.insert("n".into(), Value::from(3));
        for expiry in [
            None,
            Some(Expiry::OnSessionEnd),
            Some(Expiry::OnInactivity(Duration::from_secs(90))),
            Some(Expiry::AtDateTime(
                UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            )),
        ] {
            let bytes = encode(&data, expiry).unwrap();
            assert_eq!(encoded_len(&data, expiry).unwrap(), bytes.len());
            assert_eq!(
                decode(&bytes).unwrap(),
                Decoded {
                    data: data.clone(),
                    expiry
                }
            );
        }
    }

    #[test]
    fn bytes_that_are_not_an_envelope_do_not_decode() {
        assert!(decode(b"").is_err());
        assert!(decode(b"[1,2]").is_err());
        assert!(decode(b"{\"d\": 5}").is_err());
    }

    #[test]
    fn an_unknown_field_is_kept_out_of_the_session_but_must_be_json() {
        let known = decode(b"{\"d\":{\"n\":2},\"xd\":{\"i\":90000},\"x\":null}").unwrap();
        assert_eq!(known.data.get("n"), Some(&Value::from(2)));
        assert_eq!(known.data.len(), 1);
        assert_eq!(known.expiry, None);

        // Found by the `record` fuzz target: serde_json skips an unknown field without checking
        // that its strings are UTF-8, so this decoded as a session with n = 2.
        let mut not_utf8 = b"{\"d\":{\"n\":2},\"xd\":{\"i".to_vec();
        not_utf8.extend_from_slice(&[0xd6; 14]);
        not_utf8.extend_from_slice(b"\":90000}}");
        assert!(decode(&not_utf8).is_err());
        // Nor that its escapes make characters, nor how deep it nests.
        assert!(decode(b"{\"d\":{},\"z\":\"\\ud800\"}").is_err());
        let deep = format!(
            "{{\"d\":{{}},\"z\":{}{}}}",
            "[".repeat(200),
            "]".repeat(200)
        );
        assert!(decode(deep.as_bytes()).is_err());
    }
}
