//! Helpers shared by the store's benchmarks (`store.rs`, `scaling.rs`). Each benchmark uses a
//! part of them, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::time::{Duration, Instant, SystemTime};

use mmap_session_store::Store;

pub(crate) fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The `i`-th 16-byte key of a family: it looks random (like a 128-bit session id), so no
/// backend gets sorted input.
pub(crate) fn key(i: u64, salt: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&splitmix(i ^ salt).to_le_bytes());
    k[8..].copy_from_slice(&splitmix(!i ^ salt).to_le_bytes());
    k
}

/// The first `n` keys of a family.
pub(crate) fn keys(n: usize, salt: u64) -> Vec<[u8; 16]> {
    (0..n as u64).map(|i| key(i, salt)).collect()
}

pub(crate) fn value(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i % 251) as u8).collect()
}

pub(crate) fn expiry() -> SystemTime {
    SystemTime::now() + Duration::from_secs(3600)
}

pub(crate) fn far_deadline() -> Instant {
    Instant::now() + Duration::from_secs(3600)
}

/// A small xorshift generator for picking keys.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number in `0..n`.
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Lease, copy the value out, commit a new one, release. Returns the old length.
pub(crate) fn store_rmw(
    store: &Store,
    key: &[u8],
    value: &[u8],
    deadline: Instant,
    expires: SystemTime,
) -> usize {
    let mut lease = store.lease_blocking(key, deadline).expect("lease");
    let old = lease.read();
    lease.commit(value, expires).expect("commit");
    lease.release();
    old.map_or(0, |r| r.value.len())
}

/// Times `n` calls of `op` one by one (after `warm` untimed ones), in nanoseconds.
pub(crate) fn time_each(warm: usize, n: usize, mut op: impl FnMut()) -> Vec<u64> {
    for _ in 0..warm {
        op();
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        op();
        out.push(t.elapsed().as_nanos() as u64);
    }
    out
}

/// The `p` quantile of sorted samples.
pub(crate) fn pct(sorted: &[u64], p: f64) -> u64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub(crate) fn fmt_ns(ns: f64) -> String {
    if ns >= 100_000.0 {
        format!("{:.0} µs", ns / 1000.0)
    } else if ns >= 1000.0 {
        format!("{:.2} µs", ns / 1000.0)
    } else {
        format!("{ns:.0} ns")
    }
}
