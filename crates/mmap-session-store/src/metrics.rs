//! What the store records through the [`metrics`] facade (the workspace README's "Metrics"
//! table). Nothing is recorded without a recorder. The events are rare (a take-over, an
//! eviction, a damaged record), so each registers its counter when it happens; the gauges are
//! recorded by [`Store::record_gauges`](crate::Store::record_gauges).
//!
//! The counters count what this process did or saw; the gauges describe the whole file, as
//! every process sees it.

use std::sync::Once;

use metrics::Unit;

use crate::store::Stats;

const TAKEOVERS: &str = "mmap_session_takeovers_total";
const EVICTIONS: &str = "mmap_session_evictions_total";
const EXPIRED: &str = "mmap_session_expired_reclaimed_total";
const CHECKSUM_FAILURES: &str = "mmap_session_checksum_failures_total";
const SYNC_FAILURES: &str = "mmap_session_sync_failures_total";
const LIVE: &str = "mmap_session_store_live_sessions";
const USED: &str = "mmap_session_store_used_bytes";
const FILE: &str = "mmap_session_store_file_bytes";
const CAPACITY: &str = "mmap_session_store_capacity_bytes";

/// Why a lease was taken from its holder: the `reason` label of `mmap_session_takeovers_total`.
#[derive(Clone, Copy, Debug)]
pub(crate) enum TakeoverReason {
    /// Its process is gone (its lock was released by the kernel).
    HolderDied,
    /// Its process lives, but held the lease past the lease timeout.
    HolderStalled,
}

pub(crate) fn takeovers(reason: TakeoverReason, count: u64) {
    let counter = match reason {
        TakeoverReason::HolderDied => metrics::counter!(TAKEOVERS, "reason" => "holder_died"),
        TakeoverReason::HolderStalled => {
            metrics::counter!(TAKEOVERS, "reason" => "holder_stalled")
        }
    };
    counter.increment(count);
}

pub(crate) fn eviction() {
    metrics::counter!(EVICTIONS).increment(1);
}

pub(crate) fn expired_reclaimed() {
    metrics::counter!(EXPIRED).increment(1);
}

pub(crate) fn checksum_failure() {
    metrics::counter!(CHECKSUM_FAILURES).increment(1);
}

pub(crate) fn sync_failure() {
    metrics::counter!(SYNC_FAILURES).increment(1);
}

pub(crate) fn gauges(stats: &Stats) {
    static DESCRIBED: Once = Once::new();
    DESCRIBED.call_once(describe);
    metrics::gauge!(LIVE).set(stats.live_records as f64);
    metrics::gauge!(USED).set(stats.bytes_used as f64);
    metrics::gauge!(FILE).set(stats.bytes_reserved as f64);
    metrics::gauge!(CAPACITY).set(stats.capacity_bytes as f64);
}

/// Describes the store's metrics to the recorder (units and help texts).
fn describe() {
    metrics::describe_counter!(
        TAKEOVERS,
        Unit::Count,
        "Session leases taken from a holder that died or held them past the lease timeout"
    );
    metrics::describe_counter!(EVICTIONS, Unit::Count, "Idle sessions evicted to make room");
    metrics::describe_counter!(
        EXPIRED,
        Unit::Count,
        "Expired sessions whose space was reclaimed"
    );
    metrics::describe_counter!(
        CHECKSUM_FAILURES,
        Unit::Count,
        "Records that failed verification and were treated as absent"
    );
    metrics::describe_counter!(
        SYNC_FAILURES,
        Unit::Count,
        "Times forcing changes to the disk failed (the durability setting)"
    );
    metrics::describe_gauge!(
        LIVE,
        Unit::Count,
        "Sessions stored in the file (expired ones not yet reclaimed included)"
    );
    metrics::describe_gauge!(
        USED,
        Unit::Bytes,
        "Bytes of the file's blocks holding sessions"
    );
    metrics::describe_gauge!(FILE, Unit::Bytes, "Length of the store file");
    metrics::describe_gauge!(CAPACITY, Unit::Bytes, "Largest length the file may grow to");
    // The counters exist from the start, at zero, so that a rate or an alert sees them.
    for reason in [TakeoverReason::HolderDied, TakeoverReason::HolderStalled] {
        takeovers(reason, 0);
    }
    for name in [EVICTIONS, EXPIRED, CHECKSUM_FAILURES, SYNC_FAILURES] {
        metrics::counter!(name).increment(0);
    }
}
