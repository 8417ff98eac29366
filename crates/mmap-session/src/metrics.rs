//! What the layer records through the [`metrics`] facade. The names, units and labels are listed
//! in the README's "Metrics" table; no label ever holds a session id or hash.
//!
//! With no recorder installed every handle is a no-op. The handles of the per-request metrics are
//! registered once per process, at the first request that records one: install the recorder
//! (an exporter) before the server takes requests. The rare events (timeouts, undecodable
//! sessions) register at each use, so they reach a recorder installed at any time.

use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use metrics::{Counter, Histogram, Unit};

use crate::backend::LayerBackend;
use crate::session::Shared;

/// How a request that touched its session ended: the `outcome` label of
/// `mmap_session_requests_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// It had no session and saved a new one.
    New,
    /// It read its session without the lease (`ReadOnlySession`).
    Loaded,
    /// It changed its session (its id included) and saved it.
    Saved,
    /// It used its session and wrote nothing but, perhaps, a later expiry.
    Unchanged,
    /// It ended its session.
    Removed,
    /// Its session could not be used or saved: busy past `lease_wait`, the store full or
    /// unreachable, too large, undecodable, replaced moments ago.
    Refused,
    /// It had no session and left the new one empty: nothing stored.
    Empty,
}

impl Outcome {
    const ALL: [Outcome; 7] = [
        Outcome::New,
        Outcome::Loaded,
        Outcome::Saved,
        Outcome::Unchanged,
        Outcome::Removed,
        Outcome::Refused,
        Outcome::Empty,
    ];

    fn label(self) -> &'static str {
        match self {
            Outcome::New => "new",
            Outcome::Loaded => "loaded",
            Outcome::Saved => "saved",
            Outcome::Unchanged => "unchanged",
            Outcome::Removed => "removed",
            Outcome::Refused => "refused",
            Outcome::Empty => "empty",
        }
    }
}

pub(crate) const REQUESTS: &str = "mmap_session_requests_total";
pub(crate) const LEASE_WAIT: &str = "mmap_session_lease_wait_seconds";
pub(crate) const LEASE_TIMEOUTS: &str = "mmap_session_lease_timeouts_total";
pub(crate) const ENCODED_SIZE: &str = "mmap_session_encoded_size_bytes";
pub(crate) const UNDECODABLE: &str = "mmap_session_undecodable_total";

/// The handles of the metrics recorded on every request.
struct Handles {
    outcomes: [Counter; Outcome::ALL.len()],
    lease_wait: Histogram,
    encoded_size: Histogram,
}

fn handles() -> &'static Handles {
    static HANDLES: OnceLock<Handles> = OnceLock::new();
    HANDLES.get_or_init(|| {
        describe();
        // The rare events' counters exist from the start, at zero.
        metrics::counter!(LEASE_TIMEOUTS).increment(0);
        metrics::counter!(UNDECODABLE).increment(0);
        Handles {
            outcomes: Outcome::ALL
                .map(|outcome| metrics::counter!(REQUESTS, "outcome" => outcome.label())),
            lease_wait: metrics::histogram!(LEASE_WAIT),
            encoded_size: metrics::histogram!(ENCODED_SIZE),
        }
    })
}

fn describe() {
    metrics::describe_counter!(
        REQUESTS,
        Unit::Count,
        "Requests that touched their session, by how the session ended"
    );
    metrics::describe_histogram!(
        LEASE_WAIT,
        Unit::Seconds,
        "Time to take a session's busy lease, waiting for another request of it included"
    );
    metrics::describe_counter!(
        LEASE_TIMEOUTS,
        Unit::Count,
        "Requests answered 503 because their session stayed busy past lease_wait"
    );
    metrics::describe_histogram!(
        ENCODED_SIZE,
        Unit::Bytes,
        "Size of each session written, encoded"
    );
    metrics::describe_counter!(
        UNDECODABLE,
        Unit::Count,
        "Stored sessions that did not decode (the request failed with 500)"
    );
}

/// Counts a request that touched its session.
pub(crate) fn outcome(outcome: Outcome) {
    // `ALL` lists the variants in declaration order.
    handles().outcomes[outcome as usize].increment(1);
}

pub(crate) fn lease_wait(waited: Duration) {
    handles().lease_wait.record(waited);
}

pub(crate) fn encoded_size(bytes: usize) {
    handles().encoded_size.record(bytes as f64);
}

pub(crate) fn lease_timeout() {
    metrics::counter!(LEASE_TIMEOUTS).increment(1);
}

pub(crate) fn undecodable() {
    metrics::counter!(UNDECODABLE).increment(1);
}

/// How often the store's gauges are read again.
const GAUGE_PERIOD: Duration = Duration::from_secs(1);

/// Starts, once per layer, a task that records the file store's gauges
/// ([`Store::record_gauges`](mmap_session_store::Store::record_gauges)) every second while the
/// layer exists. Other backends have no gauges; outside a tokio runtime nothing is started.
pub(crate) fn start_gauges(shared: &Arc<Shared>) {
    if !matches!(shared.backend, LayerBackend::File(_)) || shared.gauges_started() {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let layer: Weak<Shared> = Arc::downgrade(shared);
    drop(runtime.spawn(async move {
        let mut ticks = tokio::time::interval(GAUGE_PERIOD);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            // The layer (and every clone of it) is gone: so is the reason to look.
            let Some(shared) = layer.upgrade() else {
                return;
            };
            if let LayerBackend::File(store) = &shared.backend {
                store.record_gauges();
            }
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_listed_in_declaration_order() {
        for (index, outcome) in Outcome::ALL.into_iter().enumerate() {
            assert_eq!(outcome as usize, index, "{outcome:?}");
        }
    }
}
