//! The Lua scripts that make each lease step atomic on the server.
//!
//! Every script gets the session's keys in the order of [`SessionKeys::all`]: `KEYS[1]` the lease,
//! `KEYS[2]` the generation counter, `KEYS[3]` the record. A lease's value is
//! `<token>:<generation>`, the token being 128 random bits of its holder. Commit, remove and
//! release take the caller's token as `ARGV[1]` and first check that the lease holds it
//! (compare-and-set, compare-and-delete), so a holder whose lease expired and was taken by someone
//! else writes nothing.
//!
//! [`SessionKeys::all`]: crate::keys::SessionKeys::all

use fred::types::scripts::Script;

/// Takes the lease if it is free.
///
/// `ARGV`: token, lease time-out (ms), life of the generation counter (ms), and `1` to take it
/// only if the record exists (`0` otherwise).
///
/// Returns `{2}` when the record was asked to exist and does not (no lease is taken), `{0, pttl}`
/// when the lease is held (`pttl`: its remaining time in ms, `-1` if it has no
/// expiry), or `{1, generation, overdue, record}` when taken: `overdue` is 1 when the previous
/// lease was never released (its holder died or stalled and the lease expired), `record` the
/// stored record or nil, read in the same step so that loading it costs no second round trip.
const ACQUIRE: &str = r"
if ARGV[4] == '1' and redis.call('EXISTS', KEYS[3]) == 0 then
  return {2}
end
local pttl = redis.call('PTTL', KEYS[1])
if pttl ~= -2 then
  return {0, pttl}
end
local generation = redis.call('HINCRBY', KEYS[2], 'n', 1)
local released = tonumber(redis.call('HGET', KEYS[2], 'released') or '0')
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. generation, 'PX', ARGV[2])
local overdue = 0
if released ~= generation - 1 then
  overdue = 1
end
return {1, generation, overdue, redis.call('GET', KEYS[3])}
";

/// A script that first checks that the lease holds the caller's token (`ARGV[1]`), returning 0 if
/// not, and then runs `body` with the lease's value in `held`.
macro_rules! fenced {
    ($body:literal) => {
        concat!(
            r"
local held = redis.call('GET', KEYS[1])
if not held or string.sub(held, 1, string.len(ARGV[1]) + 1) ~= ARGV[1] .. ':' then
  return 0
end",
            $body
        )
    };
}

/// Replaces the record if the caller still holds the lease.
///
/// `ARGV`: the holder's token, the stored record, its time to live (ms). Returns 1 if written, 0
/// if the lease was lost.
const COMMIT: &str = fenced!(
    r"
redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[3])
return 1
"
);

/// Deletes the record if the caller still holds the lease.
///
/// `ARGV`: the holder's token. Returns 1 if done, 0 if the lease was lost.
const REMOVE: &str = fenced!(
    r"
redis.call('DEL', KEYS[3])
return 1
"
);

/// Gives the lease back if the caller still holds it, notes its generation as released and
/// publishes the release so that waiters try at once.
///
/// `ARGV`: the holder's token, the release channel, the session's hash. Returns 1 if released, 0
/// if the lease was not the caller's (any more).
const RELEASE: &str = fenced!(
    r"
redis.call('DEL', KEYS[1])
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[2], 'released', string.sub(held, string.len(ARGV[1]) + 2))
end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"
);

/// The four scripts, with their SHA-1 digests (sent with `EVALSHA`, loaded on `NOSCRIPT`).
#[derive(Debug)]
pub(crate) struct Scripts {
    pub(crate) acquire: Script,
    pub(crate) commit: Script,
    pub(crate) remove: Script,
    pub(crate) release: Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        Self {
            acquire: Script::from_lua(ACQUIRE),
            commit: Script::from_lua(COMMIT),
            remove: Script::from_lua(REMOVE),
            release: Script::from_lua(RELEASE),
        }
    }
}
