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

/// Most values of the session cookie's name that a request has looked up in the store. A browser
/// sends one per path and domain it holds the cookie for (a stale one from another path, or one
/// planted from a sibling subdomain, may come first); more than a few is not a browser.
pub(crate) const MAX_CANDIDATES: usize = 4;

/// What the request's `Cookie` headers say about the session cookie: the ids to try, in the
/// order the browser sent them, and whether a value was not ours.
#[derive(Clone, Debug, Default)]
pub(crate) struct Candidates {
    ids: [Option<SessionId>; MAX_CANDIDATES],
    /// A value of the cookie's name was malformed, oversized or not signed by us.
    pub(crate) malformed: bool,
    /// The store keys standing for the malformed values (see [`malformed_key`]), first sent
    /// first, each once, of the first [`MAX_CANDIDATES`] values: no session lives there, only
    /// the marker a login on that cookie leaves. Every one counts: a browser holding two (under two paths)
    /// sends both from one path and one from another, and a login from either must be seen from
    /// both. A boxed slice: most requests have none, and every request carries this struct.
    pub(crate) malformed_keys: Box<[[u8; MALFORMED_KEY_LEN]]>,
    /// More well-formed values were sent than are tried: one of those not tried may name a
    /// live session, so none of them may be expired.
    pub(crate) untried: bool,
}

impl Candidates {
    /// The well-formed ids, first sent first, each once.
    pub(crate) fn ids(&self) -> impl Iterator<Item = SessionId> + '_ {
        self.ids.iter().map_while(|id| *id)
    }

    /// True if the request carries no well-formed session cookie.
    pub(crate) fn is_empty(&self) -> bool {
        self.ids[0].is_none()
    }

    /// The store keys of the values sent, each once: the well-formed ids, then the keys that
    /// stand for the malformed values. A login on a cookie none of which names a session
    /// leaves its marker under each; a request that would expire or replace that cookie looks
    /// for the marker under each.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.ids
            .iter()
            .map_while(Option::as_ref)
            .map(|id| id.as_bytes().as_slice())
            .chain(
                self.malformed_keys
                    .iter()
                    .map(<[u8; MALFORMED_KEY_LEN]>::as_slice),
            )
    }

    fn push(&mut self, id: SessionId) -> bool {
        for slot in &mut self.ids {
            match slot {
                Some(existing) if *existing == id => return true,
                Some(_) => {}
                None => {
                    *slot = Some(id);
                    return true;
                }
            }
        }
        false
    }
}

/// The session ids in the request's cookies that are well formed and, when signing is on, carry
/// a valid signature (at most [`MAX_CANDIDATES`]). The header is read as bytes: another cookie of
/// the site may hold UTF-8 or any other byte, and must not hide ours.
pub(crate) fn session_cookies(headers: &HeaderMap, config: &Config) -> Candidates {
    let mut found = Candidates::default();
    // The distinct malformed values, kept as sent: each is hashed once, at the end, and at most
    // `MAX_CANDIDATES` are (a header of many values costs no more hashing than a few).
    let mut malformed: Vec<&[u8]> = Vec::new();
    'headers: for header in headers.get_all(COOKIE) {
        for value in values_named(header.as_bytes(), config.cookie_name.as_bytes()) {
            match verify_value(value, config) {
                Some(id) => {
                    if !found.push(id) {
                        found.untried = true;
                        break 'headers;
                    }
                }
                None => {
                    tracing::debug!(
                        "ignored a session cookie that is malformed or not signed by us"
                    );
                    found.malformed = true;
                    if malformed.contains(&value) {
                        continue;
                    }
                    // More is not a browser: the first few are looked at.
                    if malformed.len() < MAX_CANDIDATES {
                        malformed.push(value);
                    }
                }
            }
        }
    }
    found.malformed_keys = malformed
        .iter()
        .map(|value| malformed_key(&config.cookie_name, value))
        .collect();
    found
}

/// Length of [`malformed_key`]: longer than a session id's 16 bytes, so that it never names a
/// session.
pub(crate) const MALFORMED_KEY_LEN: usize = 32;

/// The store key that stands for a malformed value of the session cookie: a BLAKE3 hash of the
/// cookie's name and value (the value itself never reaches the store or the logs).
fn malformed_key(name: &str, value: &[u8]) -> [u8; MALFORMED_KEY_LEN] {
    let mut hasher = blake3::Hasher::new_derive_key("mmap-session malformed session cookie v1");
    hasher.update(name.as_bytes());
    hasher.update(b"=");
    hasher.update(value);
    *hasher.finalize().as_bytes()
}

/// The values of the cookies called `name` in one `Cookie` header: `name=value` pairs separated by
/// `;` (RFC 6265, section 4.2.1), whitespace around names and values ignored, a value's double
/// quotes removed. A plain split over bytes: a full cookie parser would build every cookie of the
/// header on every request only to look at one.
fn values_named<'a>(header: &'a [u8], name: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
    header.split(|&byte| byte == b';').filter_map(move |pair| {
        let eq = pair.iter().position(|&byte| byte == b'=')?;
        let (pair_name, value) = (pair.get(..eq)?, pair.get(eq + 1..)?);
        if pair_name.trim_ascii() != name {
            return None;
        }
        let value = value.trim_ascii();
        Some(
            value
                .strip_prefix(b"\"")
                .and_then(|inner| inner.strip_suffix(b"\""))
                .unwrap_or(value),
        )
    })
}

fn verify_value(value: &[u8], config: &Config) -> Option<SessionId> {
    if value.len() > MAX_VALUE_LEN {
        return None;
    }
    // Ours are base64url (and a dot): anything else is not.
    let value = std::str::from_utf8(value).ok()?;
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

/// Why the configured cookie cannot be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum InvalidCookieConfig {
    /// A name, path or domain with characters a header may not hold.
    #[error("the session cookie's configured name, path or domain is not valid in a header")]
    NotAHeader,
    /// Browsers accept a `__Host-` cookie only with `Secure`, `Path=/` and no `Domain`.
    #[error("a cookie named __Host-... needs Secure, Path=/ and no Domain; browsers refuse it otherwise")]
    HostPrefix,
    /// Browsers accept a `__Secure-` cookie only with `Secure`.
    #[error("a cookie named __Secure-... needs Secure; browsers refuse it otherwise")]
    SecurePrefix,
}

/// Checks what browsers require of a cookie name's prefix (RFC 6265bis, section 4.1.3), matched
/// without regard to case as browsers do.
fn check_prefix(config: &Config) -> Result<(), InvalidCookieConfig> {
    let name = config.cookie_name.as_bytes();
    let has = |prefix: &[u8]| {
        name.get(..prefix.len())
            .is_some_and(|start| start.eq_ignore_ascii_case(prefix))
    };
    if has(b"__Host-") && (!config.secure || config.domain.is_some() || config.path != "/") {
        return Err(InvalidCookieConfig::HostPrefix);
    }
    if has(b"__Secure-") && !config.secure {
        return Err(InvalidCookieConfig::SecurePrefix);
    }
    Ok(())
}

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
/// per layer instead of once per response. An error if the configuration cannot be sent.
pub(crate) fn attribute_tail(config: &Config) -> Result<String, InvalidCookieConfig> {
    removal_cookie(config)?;
    let formatted = base(config, String::new()).to_string();
    formatted
        .strip_prefix(&config.cookie_name)
        .and_then(|rest| rest.strip_prefix('='))
        .map(str::to_owned)
        .ok_or(InvalidCookieConfig::NotAHeader)
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
    HeaderValue::try_from(text).map_err(|_| InvalidCookieConfig::NotAHeader)
}

/// `Set-Cookie` that makes the browser drop the session cookie.
pub(crate) fn removal_cookie(config: &Config) -> Result<HeaderValue, InvalidCookieConfig> {
    check_prefix(config)?;
    let mut cookie = base(config, String::new());
    cookie.make_removal();
    HeaderValue::try_from(cookie.to_string()).map_err(|_| InvalidCookieConfig::NotAHeader)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::config::SigningKeys;

    #[test]
    fn the_values_of_one_cookie_name_are_found_among_the_others() {
        let found: Vec<&[u8]> = values_named(
            "a=1; session=x;b=2 ;  session = \"y\" ;sessions=z; =w; session; é=\u{e9}".as_bytes(),
            b"session",
        )
        .collect();
        assert_eq!(found, [b"x", b"y"]);
        assert_eq!(values_named(b"", b"session").count(), 0);
        assert_eq!(
            values_named(b"session=", b"session").collect::<Vec<_>>(),
            [b""]
        );
        assert_eq!(
            values_named(b"session=\"", b"session").collect::<Vec<_>>(),
            [b"\""]
        );
        // Bytes that are not UTF-8 around the cookie do not hide it.
        assert_eq!(
            values_named(b"p=\xe9\xff; session=x; q=\xc3", b"session").collect::<Vec<_>>(),
            [b"x"]
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
        let found = session_cookies(&h, &config);
        assert_eq!(found.ids().collect::<Vec<_>>(), [id]);
        assert!(!found.malformed);
    }

    #[test]
    fn a_few_candidates_are_kept_in_order_each_once() {
        let config = Config::default();
        let ids: Vec<SessionId> = (0..6).map(|_| SessionId::generate().unwrap()).collect();
        let text: Vec<String> = ids
            .iter()
            .map(|id| format!("session={}", id.encode()))
            .collect();
        let header = format!(
            "{}; session=junk; {}; {}",
            text[0],
            text[0],
            text[1..].join("; ")
        );
        let found = session_cookies(&headers(&header), &config);
        assert_eq!(found.ids().collect::<Vec<_>>(), ids[..MAX_CANDIDATES]);
        assert!(found.malformed);
        // The ids' keys, then one key for the malformed value.
        let keys: Vec<&[u8]> = found.keys().collect();
        assert_eq!(keys.len(), MAX_CANDIDATES + 1);
        assert_eq!(keys[0], ids[0].as_bytes());
        assert_eq!(keys[MAX_CANDIDATES].len(), MALFORMED_KEY_LEN);
        let found = session_cookies(&headers("session=junk"), &config);
        assert!(found.is_empty() && found.malformed);
        assert_eq!(found.keys().count(), 1);
    }

    #[test]
    fn a_malformed_value_stands_for_a_key_of_its_own() {
        let config = Config::default();
        let keys = |cookie: &str| session_cookies(&headers(cookie), &config).malformed_keys;
        assert_eq!(keys("session=junk"), keys("a=1; session=junk"));
        assert_eq!(keys("session=junk").len(), 1);
        assert_ne!(keys("session=junk"), keys("session=junk2"));
        // Every malformed value counts, each once, in the order sent.
        let both = keys("session=junk; session=other; session=junk");
        assert_eq!(both.len(), 2);
        assert_eq!(both[..1], keys("session=junk")[..]);
        assert_eq!(both[1..], keys("session=other")[..]);
        assert!(keys("session=AAAAAAAAAAAAAAAAAAAAAA").is_empty());
        // The first few are looked at.
        let many: Vec<String> = (0..=MAX_CANDIDATES)
            .map(|i| format!("session=junk{i}"))
            .collect();
        let found = session_cookies(&headers(&many.join("; ")), &config);
        assert_eq!(
            found.malformed_keys,
            session_cookies(&headers(&many[..MAX_CANDIDATES].join("; ")), &config).malformed_keys
        );
    }

    #[test]
    fn a_signed_value_verifies_and_a_tampered_one_does_not() {
        let config = Config {
            keys: Some(SigningKeys::new([[1u8; 32]]).unwrap()),
            ..Config::default()
        };
        let id = SessionId::generate().unwrap();
        let value = cookie_value(&id, &config);
        assert_eq!(verify_value(value.as_bytes(), &config), Some(id));

        let other = SessionId::generate().unwrap();
        let (_, tag) = value.split_once('.').unwrap();
        let moved = format!("{}.{tag}", other.encode());
        assert_eq!(verify_value(moved.as_bytes(), &config), None);
        assert_eq!(verify_value(id.encode().as_bytes(), &config), None);
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
        assert_eq!(verify_value(cookie_value(&id, &a).as_bytes(), &b), None);
    }
}
