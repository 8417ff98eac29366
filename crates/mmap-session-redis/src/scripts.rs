//! The Lua scripts that make each lease step atomic on the server.
//!
//! Every script gets the session's keys in the order of [`SessionKeys::for_token`]: `KEYS[1]` the
//! lease, `KEYS[2]` the generation counter, `KEYS[3]` the record, `KEYS[4]` the cancel marker of
//! the caller's token, `KEYS[5]` the flag saying that someone waits for the lease (set by an
//! acquire that finds it held; a release publishes only when it is set, and clears it). A lease's value is `<token>:<generation>`, the token being 128 random bits
//! drawn for one taking of the lease.
//!
//! # Idempotent per token
//!
//! The client library sends a command again when the connection broke before its reply came, so
//! a script may run twice for one call, and a call that timed out may still run later. Each
//! script therefore gives the same answer when run again with the same token:
//!
//! - acquire, finding the lease already held by its own token, answers "taken" (with the same
//!   generation and record) instead of "held";
//! - a release from a taking that was cancelled or failed (the caller never learned whether the
//!   acquire ran) leaves a cancel marker for the token, and an acquire that finds its token's
//!   marker takes nothing: an acquire delayed past its own release leaves no lease behind;
//! - commit, remove, renew and release check that the lease holds the caller's token (compare and
//!   set, compare and delete), so a late copy writes nothing once the lease has moved on; commit
//!   writes the same bytes again, remove deletes again, release of a lease no longer held is a
//!   no-op, and commit-and-release run again after it released answers "done" (the generation
//!   counter notes the token of the last release).
//!
//! [`SessionKeys::for_token`]: crate::keys::SessionKeys::for_token

use fred::types::scripts::Script;

/// Takes the lease if it is free (or already the caller's).
///
/// `ARGV`: token, lease TTL (ms), life of the generation counter (ms), `1` to take it only if the
/// record exists (`0` otherwise), life of the "someone waits" flag (ms).
///
/// Returns `{3}` when the caller's taking was cancelled before this ran (nothing is taken), `{2}`
/// when the record was asked to exist and does not (nothing is taken), `{0, pttl}` when someone
/// else holds the lease (`pttl`: its remaining time in ms, `-1` if it has no expiry), or
/// `{1, generation, overdue, record}` when it is the caller's: `overdue` is 1 when the previous
/// lease was never released (its holder died or stalled and the lease expired), `record` the
/// stored record or nil, read in the same step so that loading it costs no second round trip.
const ACQUIRE: &str = r"
if redis.call('EXISTS', KEYS[4]) == 1 then
  return {3}
end
local held = redis.call('GET', KEYS[1])
if held then
  local mine = ARGV[1] .. ':'
  if string.sub(held, 1, string.len(mine)) == mine then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1, tonumber(string.sub(held, string.len(mine) + 1)), 0, redis.call('GET', KEYS[3])}
  end
  redis.call('SET', KEYS[5], '1', 'PX', ARGV[5])
  return {0, redis.call('PTTL', KEYS[1])}
end
if ARGV[4] == '1' and redis.call('EXISTS', KEYS[3]) == 0 then
  return {2}
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

/// Extends the lease if the caller still holds it.
///
/// `ARGV`: the holder's token, the new TTL (ms). Returns 1 if extended, 0 if the lease was lost.
const RENEW: &str = fenced!(
    r"
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"
);

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

/// Every release: deletes the lease held in `held` by the token `ARGV[1]`, notes its generation
/// and token as the last released, and, if someone waits, clears the flag and publishes the
/// session's hash on its shard channel (`ARGV[4]`: channel, `ARGV[5]`: hash).
macro_rules! release_held {
    () => {
        r"
redis.call('DEL', KEYS[1])
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[2], 'released', string.sub(held, string.len(ARGV[1]) + 2), 'by', ARGV[1])
end
if redis.call('DEL', KEYS[5]) == 1 then
  redis.call('SPUBLISH', ARGV[4], ARGV[5])
end
"
    };
}

/// Gives the lease back if the caller still holds it (see `release_held!`). With `ARGV[2] == '1'`
/// (a taking that was cancelled or failed), first leaves the cancel marker of the token for
/// `ARGV[3]` ms, so that the acquire, if it has not run yet, takes nothing when it does.
///
/// `ARGV`: the holder's token, the cancel flag, the marker's life (ms), the session's channel, the
/// session's hash. Returns 1 if released, 0 if the lease was not the caller's (any more).
const RELEASE: &str = concat!(
    r"
if ARGV[2] == '1' then
  redis.call('SET', KEYS[4], '1', 'PX', ARGV[3])
end
local held = redis.call('GET', KEYS[1])
if not held or string.sub(held, 1, string.len(ARGV[1]) + 1) ~= ARGV[1] .. ':' then
  return 0
end",
    release_held!(),
    "return 1"
);

/// Writes (`ARGV[2] == '1'`: the record `ARGV[6]` with a time to live of `ARGV[7]` ms) or deletes
/// (`'0'`) the record and gives the lease back, in one step, if the caller still holds the lease.
/// Run again after it succeeded (its reply lost), it finds the caller's token noted as the last
/// released and answers 1 without writing.
///
/// `ARGV`: the holder's token, the write flag, unused, the session's channel, the session's hash,
/// the record, its TTL. Returns 1 if done, 0 if the lease was lost (nothing written).
const COMMIT_RELEASE: &str = concat!(
    r"
local held = redis.call('GET', KEYS[1])
if not held or string.sub(held, 1, string.len(ARGV[1]) + 1) ~= ARGV[1] .. ':' then
  if redis.call('HGET', KEYS[2], 'by') == ARGV[1] then
    return 1
  end
  return 0
end
if ARGV[2] == '1' then
  redis.call('SET', KEYS[3], ARGV[6], 'PX', ARGV[7])
else
  redis.call('DEL', KEYS[3])
end",
    release_held!(),
    "return 1"
);

/// Writes the record `ARGV[2]` with a time to live of `ARGV[3]` ms, if the caller still holds the
/// lease, and keeps the lease for the next request of the caller's process (its TTL set to
/// `ARGV[6]` ms) unless someone else waits for it and `ARGV[7]` is not `1`: then it releases it
/// as `COMMIT_RELEASE` does, so that a process whose requests follow each other does not keep a
/// session from the others for longer than a few requests (the caller keeps it regardless, with
/// `ARGV[7] == '1'`, only for a bounded run of hand-overs). Run again after it released, it
/// answers 2 without writing.
///
/// `ARGV`: the holder's token, the record, its TTL, the session's channel, the session's hash, the
/// lease TTL, `1` to keep it even if someone waits. Returns 1 if written and kept, 2 if written
/// and released, 0 if the lease was lost (nothing written).
const COMMIT_KEEP: &str = concat!(
    r"
local held = redis.call('GET', KEYS[1])
if not held or string.sub(held, 1, string.len(ARGV[1]) + 1) ~= ARGV[1] .. ':' then
  if redis.call('HGET', KEYS[2], 'by') == ARGV[1] then
    return 2
  end
  return 0
end
redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[3])
if ARGV[7] == '1' or redis.call('EXISTS', KEYS[5]) == 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
  return 1
end",
    release_held!(),
    "return 2"
);

/// Stores a new record if the key is free: no lease held on it and no record. Needs no lease of
/// its own: nobody else can be writing a record that does not exist and whose lease is free.
///
/// `ARGV`: the record, its TTL (ms). Returns 1 if written, 0 if the key is in use (nothing
/// written). Run again after it wrote (its reply lost), it finds its own bytes there (they hold
/// the record's expiry to the nanosecond and are never written twice by different callers) and
/// answers 1 again.
const INSERT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local found = redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[2], 'GET')
if not found or found == ARGV[1] then
  return 1
end
return 0
";

/// The scripts, with their SHA-1 digests (sent with `EVALSHA`, loaded on `NOSCRIPT`).
#[derive(Debug)]
pub(crate) struct Scripts {
    pub(crate) acquire: Script,
    pub(crate) renew: Script,
    pub(crate) commit: Script,
    pub(crate) remove: Script,
    pub(crate) release: Script,
    pub(crate) commit_release: Script,
    pub(crate) commit_keep: Script,
    pub(crate) insert: Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        Self {
            acquire: Script::from_lua(ACQUIRE),
            renew: Script::from_lua(RENEW),
            commit: Script::from_lua(COMMIT),
            remove: Script::from_lua(REMOVE),
            release: Script::from_lua(RELEASE),
            commit_release: Script::from_lua(COMMIT_RELEASE),
            commit_keep: Script::from_lua(COMMIT_KEEP),
            insert: Script::from_lua(INSERT),
        }
    }

    /// The script called `name` (`acquire`, `renew`, `commit`, `remove`, `release`,
    /// `commit_release`, `commit_keep`, `insert`).
    #[cfg(feature = "test-server")]
    pub(crate) fn named(&self, name: &str) -> Option<&Script> {
        Some(match name {
            "acquire" => &self.acquire,
            "renew" => &self.renew,
            "commit" => &self.commit,
            "remove" => &self.remove,
            "release" => &self.release,
            "commit_release" => &self.commit_release,
            "commit_keep" => &self.commit_keep,
            "insert" => &self.insert,
            _ => return None,
        })
    }
}
