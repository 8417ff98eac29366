//! The layer's decoding of stored records: fuzzer bytes committed as a session's record
//! straight into the store, then a request carrying that session's cookie.
//!
//! Input: `sel`, then the record. `sel & 3` picks the layer configuration, `(sel >> 2) & 7` the
//! route, `sel & 0x20` a record expiring in a second instead of in ten years.
//!
//! Must never panic, and answer 500 only for a record that does not decode (the handlers only
//! use untyped values, so a record that decodes cannot make them fail), each such answer counted
//! by the layer. A record that is not JSON, or JSON that is neither an object with an object
//! under `"d"` nor the replaced marker (`"r"`), is such a record: every route that reads the
//! session answers 500 and sets no cookie (the record is kept for whatever wrote it). A record
//! with the replaced marker sets no cookie either.
#![no_main]

use std::time::{Duration, SystemTime};

use axum::http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use mmap_session_fuzz::far_future;
use mmap_session_fuzz::web::*;

fuzz_target!(|data: &[u8]| run(data));

fn run(data: &[u8]) {
    let Some((&sel, record)) = data.split_first() else {
        return;
    };
    if record.len() > 60_000 {
        return;
    }
    let app = (sel & 3) as usize;
    let route = ROUTES[(sel >> 2) as usize & 7];
    let expires = if sel & 0x20 != 0 {
        SystemTime::now() + Duration::from_secs(1)
    } else {
        far_future()
    };
    let web = web();
    put_record(web, RECORD_ID, record, expires);
    let value = if app == SIGNED {
        signed_value(RECORD_ID)
    } else {
        RECORD_ID.to_owned()
    };
    let cookie = HeaderValue::from_str(&format!("session={value}")).unwrap();
    let counted_before = undecodable_count(web);
    let response = send(web, app, route, Some(cookie));
    let counted = undecodable_count(web) - counted_before;
    // Sessions this run created go, so that the next run starts from the same store.
    for set in set_cookie_values(&response) {
        let id = set.split('.').next().unwrap_or("");
        if id != RECORD_ID {
            forget(web, id);
        }
    }
    let status = response.status();
    assert!(
        !layer_failed(status) || counted == 1,
        "{status} for record {:?}, which the layer did not count as undecodable",
        String::from_utf8_lossy(record)
    );
    // Surely not an envelope: not JSON, not an object, or neither an object under "d" nor the
    // marker (with a duplicate "d", the last one counts, here and in the layer's decoder).
    let parsed = serde_json::from_slice::<serde_json::Value>(record).ok();
    let marker = parsed.as_ref().is_some_and(|v| v.get("r").is_some());
    let undecodable = match &parsed {
        Some(v) => !marker && !v.get("d").is_some_and(serde_json::Value::is_object),
        None => true,
    };
    if undecodable {
        for set in set_cookie_values(&response) {
            assert!(
                !set.starts_with(RECORD_ID),
                "an undecodable record kept its id: {set}"
            );
        }
    }
    // A record that expires in a second may be gone by the time it is read: then the cookie
    // names no session, and a new session or the cookie's removal is sent.
    if sel & 0x20 == 0 {
        if undecodable && route != "/none" {
            assert!(
                layer_failed(status),
                "{status} for an undecodable record {:?}",
                String::from_utf8_lossy(record)
            );
        }
        if undecodable || marker {
            let set = set_cookie_values(&response);
            assert!(set.is_empty(), "a cookie was sent: {set:?}");
        }
    }
}
