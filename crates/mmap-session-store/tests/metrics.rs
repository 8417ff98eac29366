//! The store's metrics reach a recorder: take-overs by reason, evictions, expired records
//! reclaimed, and the gauges. A small recorder of the test's own, installed for the test's
//! thread (`metrics::with_local_recorder`), keeps what it is given.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use mmap_session_store::{Options, Store, StoreError};

/// Every counter and gauge registered, by `name{label="value",…}`.
#[derive(Default)]
struct Kept(Mutex<BTreeMap<String, Arc<AtomicU64>>>);

impl Kept {
    fn slot(&self, key: &Key) -> Arc<AtomicU64> {
        let labels: Vec<String> = key
            .labels()
            .map(|label| format!("{}=\"{}\"", label.key(), label.value()))
            .collect();
        let name = if labels.is_empty() {
            key.name().to_owned()
        } else {
            format!("{}{{{}}}", key.name(), labels.join(","))
        };
        Arc::clone(self.0.lock().unwrap().entry(name).or_default())
    }

    fn counter(&self, name: &str) -> u64 {
        self.0
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, |value| value.load(Ordering::Relaxed))
    }

    fn gauge(&self, name: &str) -> Option<f64> {
        let kept = self.0.lock().unwrap();
        kept.get(name)
            .map(|value| f64::from_bits(value.load(Ordering::Relaxed)))
    }
}

impl Recorder for Kept {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.slot(key))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.slot(key))
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

fn later() -> SystemTime {
    SystemTime::now() + Duration::from_secs(3600)
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

#[test]
fn a_stalled_holders_take_over_is_counted_by_its_reason() {
    let kept = Kept::default();
    let dir = tempfile::tempdir().unwrap();
    let options = Options::new()
        .max_sessions(64)
        .lease_timeout(Duration::from_millis(20));
    let store = Store::open_with(dir.path().join("s"), options).unwrap();
    metrics::with_local_recorder(&kept, || {
        // A holder that never lets go (alive: this very process) is taken over after the lease
        // timeout, and its late commit is refused.
        let mut stalled = store.lease_blocking(b"k", soon()).unwrap();
        let mut successor = store.lease_blocking(b"k", soon()).unwrap();
        successor.commit(b"v", later()).unwrap();
        assert!(matches!(
            stalled.commit(b"late", later()),
            Err(StoreError::LeaseLost)
        ));
    });
    assert_eq!(
        kept.counter("mmap_session_takeovers_total{reason=\"holder_stalled\"}"),
        1
    );
    assert_eq!(
        kept.counter("mmap_session_takeovers_total{reason=\"holder_died\"}"),
        0
    );
    assert_eq!(store.stats().takeovers, 1);
}

#[test]
fn evictions_expired_records_and_gauges_are_recorded() {
    let kept = Kept::default();
    let dir = tempfile::tempdir().unwrap();
    // One data chunk of 64 KiB-class blocks: a few records fill it.
    let options = Options::new().max_sessions(64);
    let probe = Store::open_with(dir.path().join("probe"), options.clone()).unwrap();
    let data_start = probe.stats().bytes_reserved;
    drop(probe);
    let store = Store::open_with(
        dir.path().join("s"),
        options.max_file_size(data_start + (1 << 20)),
    )
    .unwrap();
    metrics::with_local_recorder(&kept, || {
        // An expired record is reclaimed when its lease is released.
        let mut lease = store.lease_blocking(b"expired", soon()).unwrap();
        lease
            .commit(b"v", SystemTime::now() - Duration::from_millis(1))
            .unwrap();
        drop(lease);
        // Fill the chunk, then one more: the least recently used idle record is evicted.
        let value = vec![5u8; 60 << 10];
        for i in 0u32.. {
            let mut lease = store.lease_blocking(&i.to_le_bytes(), soon()).unwrap();
            lease.commit(&value, later()).unwrap();
            drop(lease);
            if store.stats().evictions > 0 {
                break;
            }
            assert!(i < 100, "nothing was evicted");
        }
        store.record_gauges();
    });
    let stats = store.stats();
    assert_eq!(kept.counter("mmap_session_expired_reclaimed_total"), 1);
    assert_eq!(stats.expired_reclaimed, 1);
    assert_eq!(kept.counter("mmap_session_evictions_total"), 1);
    assert_eq!(stats.evictions, 1);
    assert_eq!(
        kept.gauge("mmap_session_store_live_sessions"),
        Some(stats.live_records as f64)
    );
    assert_eq!(
        kept.gauge("mmap_session_store_used_bytes"),
        Some(stats.bytes_used as f64)
    );
    assert_eq!(
        kept.gauge("mmap_session_store_file_bytes"),
        Some(stats.bytes_reserved as f64)
    );
    assert_eq!(
        kept.gauge("mmap_session_store_capacity_bytes"),
        Some(stats.capacity_bytes as f64)
    );
}
