//! Reading the session id out of `Cookie` headers and writing `Set-Cookie`.

use std::time::SystemTime;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use http::header::COOKIE;
use http::{HeaderMap, HeaderValue};

use crate::config::{Config, Expiry};
use crate::id::{SessionId, ENCODED_LEN};

/// Characters of a base64url HMAC-SHA256 tag.
const TAG_LEN: usize = 43;
/// Longest cookie value the layer looks at; anything longer is not ours.
const MAX_VALUE_LEN: usize = ENCODED_LEN + 1 + TAG_LEN;

/// The first session id in the request's cookies that is well formed and, when signing is on,
/// carries a valid signature. Anything else is "no session".
pub(crate) fn session_id_from(headers: &HeaderMap, config: &Config) -> Option<SessionId> {
    for header in headers.get_all(COOKIE) {
        let Ok(text) = header.to_str() else {
            continue;
        };
        for value in values_named(text, &config.cookie_name) {
            if let Some(id) = verify_value(value, config) {
                return Some(id);
            }
            tracing::debug!("ignored a session cookie that is malformed or not signed by us");
        }
    }
    None
}

/// The values of the cookies called `name` in one `Cookie` header: `name=value` pairs separated by
/// `;` (RFC 6265, section 4.2.1), whitespace around names and values ignored, a value's double
/// quotes removed. A plain split: a full cookie parser would build every cookie of the header on
/// every request only to look at one.
fn values_named<'a>(header: &'a str, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    header.split(';').filter_map(move |pair| {
        let (pair_name, value) = pair.split_once('=')?;
        if pair_name.trim_ascii() != name {
            return None;
        }
        let value = value.trim_ascii();
        Some(
            value
                .strip_prefix('"')
                .and_then(|inner| inner.strip_suffix('"'))
                .unwrap_or(value),
        )
    })
}

fn verify_value(value: &str, config: &Config) -> Option<SessionId> {
    if value.len() > MAX_VALUE_LEN {
        return None;
    }
    match &config.keys {
        None => SessionId::decode(value),
        Some(keys) => {
            let (id_text, tag_text) = value.split_once('.')?;
            if tag_text.len() != TAG_LEN {
                return None;
            }
            let id = SessionId::decode(id_text)?;
            let mut tag = [0u8; 33];
            let len = URL_SAFE_NO_PAD.decode_slice(tag_text, &mut tag).ok()?;
            let tag = tag.get(..len)?;
            let message = signed_message(&config.cookie_name, id_text);
            keys.verify(&message, tag).then_some(id)
        }
    }
}

/// What the signature covers: the cookie's name and the id, so a tag cannot be moved to another
/// cookie.
fn signed_message<'a>(name: &'a str, id_text: &'a str) -> [&'a [u8]; 3] {
    [name.as_bytes(), b"=", id_text.as_bytes()]
}

/// The text that goes into the cookie for `id`: the id, plus `.tag` when signing is on.
fn cookie_value(id: &SessionId, config: &Config) -> String {
    let id_text = id.encode();
    match &config.keys {
        None => id_text,
        Some(keys) => match keys.sign(&signed_message(&config.cookie_name, &id_text)) {
            Some(tag) => format!("{id_text}.{}", URL_SAFE_NO_PAD.encode(tag)),
            None => id_text,
        },
    }
}

/// The configuration cannot be written as a `Set-Cookie` header (a name, path or domain with
/// characters a header may not hold).
#[derive(Debug, thiserror::Error)]
#[error("the session cookie's configured name, path or domain is not valid in a header")]
pub(crate) struct InvalidCookieConfig;

fn base(config: &Config, value: String) -> cookie::Cookie<'static> {
    let mut cookie = cookie::Cookie::new(config.cookie_name.clone(), value);
    cookie.set_path(config.path.clone());
    if let Some(domain) = &config.domain {
        cookie.set_domain(domain.clone());
    }
    cookie.set_secure(config.secure);
    cookie.set_http_only(config.http_only);
    cookie.set_same_site(config.same_site.to_cookie());
    cookie
}

/// What follows `name=value` in every session cookie: the configured attributes
/// (`; HttpOnly; SameSite=Lax; Secure; Path=/` by default), formatted by the `cookie` crate once
/// per layer instead of once per response. `None` if the configuration cannot be sent as a header.
pub(crate) fn attribute_tail(config: &Config) -> Option<String> {
    removal_cookie(config).ok()?;
    let formatted = base(config, String::new()).to_string();
    formatted
        .strip_prefix(&config.cookie_name)
        .and_then(|rest| rest.strip_prefix('='))
        .map(str::to_owned)
}

/// `Set-Cookie` carrying `id`, with a lifetime matching `expiry`; `tail` is
/// [`attribute_tail`] of `config`.
pub(crate) fn session_cookie(
    id: &SessionId,
    expiry: Expiry,
    now: SystemTime,
    config: &Config,
    tail: &str,
) -> Result<HeaderValue, InvalidCookieConfig> {
    let value = cookie_value(id, config);
    let mut text = String::with_capacity(config.cookie_name.len() + value.len() + tail.len() + 24);
    text.push_str(&config.cookie_name);
    text.push('=');
    text.push_str(&value);
    text.push_str(tail);
    let max_age = match expiry {
        Expiry::OnSessionEnd => None,
        Expiry::OnInactivity(ttl) => Some(ttl),
        Expiry::AtDateTime(at) => Some(at.duration_since(now).unwrap_or_default()),
    };
    if let Some(max_age) = max_age {
        // Round up: a sub-second lifetime must not become `Max-Age=0`, which deletes the cookie.
        let secs = max_age
            .as_secs()
            .saturating_add(u64::from(max_age.subsec_nanos() > 0));
        text.push_str("; Max-Age=");
        text.push_str(&secs.to_string());
    }
    HeaderValue::try_from(text).map_err(|_| InvalidCookieConfig)
}

/// `Set-Cookie` that makes the browser drop the session cookie.
pub(crate) fn removal_cookie(config: &Config) -> Result<HeaderValue, InvalidCookieConfig> {
    let mut cookie = base(config, String::new());
    cookie.make_removal();
    HeaderValue::try_from(cookie.to_string()).map_err(|_| InvalidCookieConfig)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::config::SigningKeys;

    #[test]
    fn the_values_of_one_cookie_name_are_found_among_the_others() {
        let found: Vec<&str> = values_named(
            r#"a=1; session=x;b=2 ;  session = "y" ;sessions=z; =w; session"#,
            "session",
        )
        .collect();
        assert_eq!(found, ["x", "y"]);
        assert_eq!(values_named("", "session").count(), 0);
        assert_eq!(
            values_named("session=", "session").collect::<Vec<_>>(),
            [""]
        );
        assert_eq!(
            values_named(r#"session=""#, "session").collect::<Vec<_>>(),
            ["\""]
        );
    }

    fn headers(cookie: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(COOKIE, HeaderValue::from_str(cookie).unwrap());
        headers
    }

    #[test]
    fn the_id_is_found_among_other_cookies() {
        let config = Config::default();
        let id = SessionId::generate().unwrap();
        let h = headers(&format!("a=1; session={}; b=2", id.encode()));
        assert_eq!(session_id_from(&h, &config), Some(id));
    }

    #[test]
    fn a_signed_value_verifies_and_a_tampered_one_does_not() {
        let config = Config {
            keys: Some(SigningKeys::new([[1u8; 32]]).unwrap()),
            ..Config::default()
        };
        let id = SessionId::generate().unwrap();
        let value = cookie_value(&id, &config);
        assert_eq!(verify_value(&value, &config), Some(id));

        let other = SessionId::generate().unwrap();
        let (_, tag) = value.split_once('.').unwrap();
        let moved = format!("{}.{tag}", other.encode());
        assert_eq!(verify_value(&moved, &config), None);
        assert_eq!(verify_value(&id.encode(), &config), None);
    }

    #[test]
    fn a_signature_made_for_another_cookie_name_is_refused() {
        let keys = SigningKeys::new([[1u8; 32]]).unwrap();
        let a = Config {
            keys: Some(keys.clone()),
            cookie_name: "a".into(),
            ..Config::default()
        };
        let b = Config {
            keys: Some(keys),
            cookie_name: "b".into(),
            ..Config::default()
        };
        let id = SessionId::generate().unwrap();
        assert_eq!(verify_value(&cookie_value(&id, &a), &b), None);
    }
}
