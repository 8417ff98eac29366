//! The Lua scripts that make each lease step atomic on the server.
//!
//! Every script gets the session's keys in the order of [`SessionKeys::for_token`]: `KEYS[1]` the
//! lease, `KEYS[2]` the generation counter, `KEYS[3]` the record, `KEYS[4]` the cancel marker of
//! the caller's token, `KEYS[5]` the session's queue of waiters. A lease's value is
//! `<token>:<generation>`, the token being 128 random bits drawn for one taking of the lease.
//!
//! # The queue of waiters
//!
//! `KEYS[5]` is a hash from the token of each waiter (at most one per process and session: the
//! requests of one process take turns before they talk to Redis) to `<arrival>:<expiry>`, both in
//! microseconds of the server's clock (`TIME`). An acquire that finds the lease held puts its
//! token there, keeping its arrival if it is already there and has not lapsed, and sets the
//! entry's expiry to now plus `ARGV[5]` (the caller's lease TTL, or less when its deadline is
//! nearer); the waiter refreshes it at each try, so a waiter that died or went away without
//! leaving lapses within the lease TTL. The hash itself lives for the lease TTL after its last
//! write. The head is the live entry of the earliest arrival; lapsed entries are deleted whenever
//! the head is looked for. An acquire that finds the lease free takes it only when the queue is
//! empty or the caller is its head (and leaves the queue as it takes the lease); anyone else
//! queues behind the head and is told how long the head's entry lives. A release that finds the
//! queue publishes `<hash>:<head's token>` on the session's shard channel, which wakes the head's
//! process only; with nobody queued it publishes nothing.
//!
//! # Idempotent per token
//!
//! The client library sends a command again when the connection broke before its reply came, so
//! a script may run twice for one call, and a call that timed out may still run later. Each
//! script therefore gives the same answer when run again with the same token:
//!
//! - acquire, finding the lease already held by its own token, answers "taken" (with the same
//!   generation and record) instead of "held"; run again while the caller waits, it refreshes the
//!   caller's entry in the queue, which keeps its place;
//! - a release from a taking that was cancelled or failed (the caller never learned whether the
//!   acquire ran), or from a waiter that gives up, leaves a cancel marker for the token and takes
//!   the token out of the queue, and an acquire that finds its token's marker takes nothing and
//!   queues nothing: an acquire delayed past its own release leaves no lease and no waiter behind;
//! - commit, remove, renew and release check that the lease holds the caller's token (compare and
//!   set, compare and delete), so a late copy writes nothing once the lease has moved on; commit
//!   writes the same bytes again, remove deletes again, release of a lease no longer held is a
//!   no-op, and commit-and-release run again after it released answers "done" (the generation
//!   counter notes the token of the last release).
//!
//! [`SessionKeys::for_token`]: crate::keys::SessionKeys::for_token

use fred::types::scripts::Script;

/// Lua functions on the queue of waiters (`KEYS[5]`), put in front of the scripts that use them:
///
/// - `clock()`: the server's time in microseconds;
/// - `head(now)`: deletes the lapsed entries and returns the head's token and expiry (nil when
///   nobody waits), and the live entries by token;
/// - `enqueue(now, token, previous, life, ttl)`: puts `token` in the queue or refreshes its entry
///   (`previous`: its current value, if any) for `life` ms, and keeps the hash for `ttl` ms;
/// - `wake(now, channel, hash)`: publishes `<hash>:<head's token>` on `channel` if someone
///   waits.
macro_rules! queue_functions {
    () => {
        r"
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function head(now)
  local all = redis.call('HGETALL', KEYS[5])
  local live, lapsed = {}, {}
  local first, first_arrival, first_expiry
  for i = 1, #all, 2 do
    local arrival, expiry = string.match(all[i + 1], '^(%d+):(%d+)$')
    arrival, expiry = tonumber(arrival), tonumber(expiry)
    if arrival and expiry and expiry > now then
      live[all[i]] = all[i + 1]
      if not first or arrival < first_arrival or (arrival == first_arrival and all[i] < first) then
        first, first_arrival, first_expiry = all[i], arrival, expiry
      end
    else
      lapsed[#lapsed + 1] = all[i]
    end
  end
  if #lapsed > 0 then
    redis.call('HDEL', KEYS[5], unpack(lapsed))
  end
  return first, first_expiry, live
end
local function enqueue(now, token, previous, life, ttl)
  local arrival = now
  if previous then
    local since, expiry = string.match(previous, '^(%d+):(%d+)$')
    if since and expiry and tonumber(expiry) > now then
      arrival = tonumber(since)
    end
  end
  local expiry = now + tonumber(life) * 1000
  redis.call('HSET', KEYS[5], token, string.format('%.0f:%.0f', arrival, expiry))
  redis.call('PEXPIRE', KEYS[5], ttl)
end
local function wake(now, channel, hash)
  local first = head(now)
  if first then
    redis.call('SPUBLISH', channel, hash .. ':' .. first)
  end
end
"
    };
}

/// Takes the lease if it is free and nobody else comes first in the queue (or if it is already
/// the caller's); otherwise puts the caller in the queue (or refreshes its entry).
///
/// `ARGV`: token, lease TTL (ms), life of the generation counter (ms), `1` to take it only if the
/// record exists (`0` otherwise), life of the caller's entry in the queue (ms, at most the lease
/// TTL).
///
/// Returns `{3}` when the caller's taking was cancelled before this ran (nothing is taken or
/// queued), `{2}` when the record was asked to exist and does not (nothing is taken), `{0, pttl}`
/// when someone else holds the lease (`pttl`: its remaining time in ms, `-1` if it has no expiry;
/// the caller is queued), `{4, ms}` when the lease is free but another waiter comes first (the
/// caller is queued; `ms`: how long the head's entry lives unless refreshed), or
/// `{1, generation, overdue, record}` when it is the caller's: `overdue` is 1 when the previous
/// lease was never released (its holder died or stalled and the lease expired), `record` the
/// stored record or nil, read in the same step so that loading it costs no second round trip.
///
/// With the lease free and nobody queued, the queue costs one call (`EXISTS`).
const ACQUIRE: &str = concat!(
    queue_functions!(),
    r"
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
  enqueue(clock(), ARGV[1], redis.call('HGET', KEYS[5], ARGV[1]), ARGV[5], ARGV[2])
  return {0, redis.call('PTTL', KEYS[1])}
end
local record = redis.call('GET', KEYS[3])
if ARGV[4] == '1' and not record then
  return {2}
end
if redis.call('EXISTS', KEYS[5]) == 1 then
  local now = clock()
  local first, expiry, live = head(now)
  if first and first ~= ARGV[1] then
    enqueue(now, ARGV[1], live[ARGV[1]], ARGV[5], ARGV[2])
    return {4, math.ceil((expiry - now) / 1000)}
  end
  if first then
    redis.call('HDEL', KEYS[5], ARGV[1])
  end
end
local generation = redis.call('HINCRBY', KEYS[2], 'n', 1)
local released = tonumber(redis.call('HGET', KEYS[2], 'released') or '0')
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. generation, 'PX', ARGV[2])
local overdue = 0
if released ~= generation - 1 then
  overdue = 1
end
return {1, generation, overdue, record}
"
);

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
/// and token as the last released, and, if someone waits, publishes `<hash>:<head's token>` on
/// the session's shard channel (`ARGV[4]`: channel, `ARGV[5]`: hash). With nobody queued, the
/// queue costs one call (`EXISTS`). Needs `queue_functions!`.
macro_rules! release_held {
    () => {
        r"
redis.call('DEL', KEYS[1])
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[2], 'released', string.sub(held, string.len(ARGV[1]) + 2), 'by', ARGV[1])
end
if redis.call('EXISTS', KEYS[5]) == 1 then
  wake(clock(), ARGV[4], ARGV[5])
end
"
    };
}

/// Gives the lease back if the caller still holds it (see `release_held!`). With `ARGV[2] == '1'`
/// (a taking that was cancelled or failed, or a waiter that gives up), first leaves the cancel
/// marker of the token for `ARGV[3]` ms, so that the acquire, if it has not run yet, takes and
/// queues nothing when it does, and takes the token out of the queue; if it was there and the
/// lease is free, the next waiter may now be the head: it is woken.
///
/// `ARGV`: the holder's token, the cancel flag, the marker's life (ms), the session's channel, the
/// session's hash. Returns 1 if released, 0 if the lease was not the caller's (any more).
const RELEASE: &str = concat!(
    queue_functions!(),
    r"
if ARGV[2] == '1' then
  redis.call('SET', KEYS[4], '1', 'PX', ARGV[3])
  if redis.call('HDEL', KEYS[5], ARGV[1]) == 1 then
    if redis.call('EXISTS', KEYS[1]) == 0 and redis.call('EXISTS', KEYS[5]) == 1 then
      wake(clock(), ARGV[4], ARGV[5])
    end
    return 0
  end
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
    queue_functions!(),
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
    queue_functions!(),
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

/// Stores a new record if the key is free: no lease held on it, no generation counter (nobody
/// took its lease lately) and no record. Needs no lease of its own: nobody else can be writing a
/// record that does not exist and whose lease is free.
///
/// `ARGV`: the record, its TTL (ms). Returns 1 if written, 0 if the key is in use (nothing
/// written by this run). Run again after it wrote (its reply lost), it finds its own bytes there
/// (they hold the record's expiry to the nanosecond and are never written twice by different
/// callers) and answers 1 again; if someone took the key's lease in between (only a caller that
/// knew the key before the insert answered can), it answers 0 and writes nothing, so a replay
/// never brings back a record that was removed meanwhile.
const INSERT: &str = r"
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then
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
