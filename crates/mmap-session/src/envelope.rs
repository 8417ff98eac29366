//! The bytes of a stored session: a small JSON envelope around the session's map.
//!
//! `{"d": {..the session's keys..}, "x": <per-session expiry, only if set>}`. The record's absolute
//! expiry lives in the store next to the bytes; the time of the last sliding refresh follows from it
//! (expiry minus the inactivity period), so it needs no field of its own.

use std::time::{Duration, UNIX_EPOCH};
use std::{fmt, io};

use serde::de::{Deserializer, Error as _, MapAccess, Visitor};
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

/// The encoded length of an empty session without its own expiry: `{"d":{}}`.
pub(crate) const EMPTY_LEN: usize = 8;

/// The bytes one map entry `"key":value` adds to the encoding, not counting the comma between
/// entries. `usize::MAX` if the value cannot be encoded (the caller then encodes everything and
/// gets the error).
pub(crate) fn entry_len(key: &str, value: &Value) -> usize {
    let mut counter = Counter(0);
    match serde_json::to_writer(&mut counter, key)
        .and_then(|()| serde_json::to_writer(&mut counter, value))
    {
        Ok(()) => counter.0.saturating_add(1),
        Err(_) => usize::MAX,
    }
}

/// The bytes a per-session expiry adds to the encoding: `,"x":` and its value; 0 for none.
pub(crate) fn expiry_len(expiry: Option<Expiry>) -> usize {
    let Some(expiry) = expiry else {
        return 0;
    };
    let mut counter = Counter(0);
    match serde_json::to_writer(&mut counter, &StoredExpiry::from(expiry)) {
        Ok(()) => counter.0.saturating_add(5),
        Err(_) => usize::MAX,
    }
}

pub(crate) fn decode(bytes: &[u8]) -> Result<Decoded, serde_json::Error> {
    let envelope: EnvelopeOwned = serde_json::from_slice(bytes)?;
    Ok(Decoded {
        data: envelope.data,
        expiry: envelope.expiry.map(Expiry::from),
    })
}

/// A stored envelope, decoded field by field.
struct EnvelopeOwned {
    data: Map<String, Value>,
    expiry: Option<StoredExpiry>,
}

#[derive(Deserialize)]
#[serde(field_identifier)]
enum Field {
    #[serde(rename = "d")]
    Data,
    #[serde(rename = "x")]
    Expiry,
    #[serde(other)]
    Unknown,
}

impl<'de> Deserialize<'de> for EnvelopeOwned {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(EnvelopeVisitor)
    }
}

struct EnvelopeVisitor;

impl<'de> Visitor<'de> for EnvelopeVisitor {
    type Value = EnvelopeOwned;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a session envelope: an object with the session's map under \"d\"")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut fields: A) -> Result<EnvelopeOwned, A::Error> {
        let mut data = None;
        let mut expiry = None;
        // A repeated field: the last one counts, as in a JSON object read into a map.
        while let Some(field) = fields.next_key()? {
            match field {
                Field::Data => data = Some(fields.next_value()?),
                Field::Expiry => expiry = fields.next_value()?,
                // Parsed in full and dropped. serde_json checks less in a value it skips (its
                // bytes need not be UTF-8, its escapes need not make characters, its nesting
                // has no limit), and a record that is not JSON is not a session.
                Field::Unknown => drop(fields.next_value::<Value>()?),
            }
        }
        Ok(EnvelopeOwned {
            data: data.ok_or_else(|| A::Error::missing_field("d"))?,
            expiry,
        })
    }
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
    fn entry_and_expiry_lengths_add_up_to_the_encoded_length() {
        let mut data = Map::new();
        let mut len = EMPTY_LEN;
        assert_eq!(len, encoded_len(&data, None).unwrap());
        let values = [
            Value::from(3),
            Value::from("a \"quoted\" line\n"),
            Value::from(vec![1.5, -2.0]),
            serde_json::json!({"nested": {"k": null}}),
        ];
        for (i, value) in values.into_iter().enumerate() {
            let key = format!("key {i} \u{e9}");
            len += entry_len(&key, &value) + usize::from(!data.is_empty());
            data.insert(key, value);
            assert_eq!(len, encoded_len(&data, None).unwrap());
        }
        for expiry in [
            Expiry::OnSessionEnd,
            Expiry::OnInactivity(Duration::from_secs(90)),
            Expiry::AtDateTime(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)),
        ] {
            assert_eq!(
                len + expiry_len(Some(expiry)),
                encoded_len(&data, Some(expiry)).unwrap()
            );
        }
        assert_eq!(expiry_len(None), 0);
    }

    #[test]
    fn bytes_that_are_not_an_envelope_do_not_decode() {
        assert!(decode(b"").is_err());
        assert!(decode(b"[1,2]").is_err());
        assert!(decode(b"{\"d\": 5}").is_err());
        assert!(decode(b"{\"x\": null}").is_err());
        // A repeated field: the last one counts.
        let twice = decode(b"{\"d\":{\"n\":1},\"d\":{\"n\":2}}").unwrap();
        assert_eq!(twice.data.get("n"), Some(&Value::from(2)));
        assert!(decode(b"{\"d\":{\"n\":1},\"d\":5}").is_err());
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
