//! The layer's cookie decoding and signature check, through the public layer: a request with a
//! fuzzer-made `Cookie` header through routers wrapped in unsigned and signed `SessionLayer`s.
//!
//! Input: `sel`, then the header text. `sel & 3` picks the layer configuration (1 = signed),
//! `(sel >> 2) & 7` the route, `sel & 0x20` sends the text as it is instead of after
//! `session=`.
//!
//! Must never panic, never answer 500, and never adopt an id the client made up: a `Set-Cookie`
//! carries either a fresh id (one that does not occur in the request) or the id of the session
//! seeded before the run, and the latter only if the request held its valid cookie value.
#![no_main]

use axum::http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use mmap_session_fuzz::far_future;
use mmap_session_fuzz::web::*;

fuzz_target!(|data: &[u8]| run(data));

fn run(data: &[u8]) {
    let Some((&sel, text)) = data.split_first() else {
        return;
    };
    let app = (sel & 3) as usize;
    let route = ROUTES[(sel >> 2) as usize & 7];
    let mut header = if sel & 0x20 == 0 {
        b"session=".to_vec()
    } else {
        Vec::new()
    };
    header.extend_from_slice(text);
    let Ok(value) = HeaderValue::from_bytes(&header) else {
        return;
    };
    let web = web();
    put_record(web, SEEDED_ID, br#"{"d":{"n":1}}"#, far_future());
    let response = send(web, app, route, Some(value));
    // Sessions this run created go, so that the next run starts from the same store.
    for set in set_cookie_values(&response) {
        let id = set.split('.').next().unwrap_or("");
        if id != SEEDED_ID {
            forget(web, id);
        }
    }
    assert!(
        !layer_failed(response.status()),
        "{} for Cookie: {:?}",
        response.status(),
        String::from_utf8_lossy(&header)
    );
    let sent = String::from_utf8_lossy(&header);
    let valid_seeded = if app == SIGNED {
        signed_value(SEEDED_ID)
    } else {
        SEEDED_ID.to_owned()
    };
    for set in set_cookie_values(&response) {
        if set.is_empty() {
            continue; // a removal
        }
        let id = set.split('.').next().unwrap_or("");
        if id == SEEDED_ID {
            assert!(
                sent.contains(&valid_seeded),
                "the seeded session was served for a cookie without its valid value: {sent:?}"
            );
        } else {
            assert!(
                !sent.contains(id),
                "the client's id was adopted: {sent:?} -> {set}"
            );
        }
        if app == SIGNED {
            assert_eq!(
                set,
                signed_value(id),
                "a signed layer set an unsigned cookie"
            );
        }
    }
}
