//! The layer's decoding of stored records: fuzzer bytes committed as a session's record
//! straight into the store, then a request carrying that session's cookie.
//!
//! Input: `sel`, then the record. `sel & 3` picks the layer configuration, `(sel >> 2) & 7` the
//! route, `sel & 0x20` a record expiring in a second instead of in ten years.
//!
//! Must never panic and never answer 500 (the handlers only use untyped values, so a record
//! that decodes cannot make them fail). A record that is not JSON is no session: the
//! handler sees an empty one, and the client's id is not kept; so is any JSON that is not an
//! object with an object under `"d"`.
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
    let response = send(web, app, route, Some(cookie));
    // Sessions this run created go, so that the next run starts from the same store.
    for set in set_cookie_values(&response) {
        let id = set.split('.').next().unwrap_or("");
        if id != RECORD_ID {
            forget(web, id);
        }
    }
    let status = response.status();
    assert!(
        !layer_failed(status),
        "{status} for record {:?}",
        String::from_utf8_lossy(record)
    );
    // Surely not an envelope: not JSON, not an object, or no object under "d" (with a
    // duplicate "d", the last one counts, here and in the layer's decoder).
    let undecodable = match serde_json::from_slice::<serde_json::Value>(record) {
        Ok(v) => !v.get("d").is_some_and(serde_json::Value::is_object),
        Err(_) => true,
    };
    if undecodable {
        for set in set_cookie_values(&response) {
            assert!(
                !set.starts_with(RECORD_ID),
                "an undecodable record kept its id: {set}"
            );
        }
        if route == "/get" || route == "/ro" {
            let body = web
                .rt
                .block_on(axum::body::to_bytes(response.into_body(), 1 << 16))
                .unwrap();
            let expected: &[u8] = if route == "/get" { b"None" } else { b"0" };
            assert_eq!(&body[..], expected, "an undecodable record was served");
        }
    }
}
