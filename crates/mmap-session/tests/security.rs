//! Security properties checked against real store files and real issued cookies.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use std::collections::HashSet;

use common::{cookie_pair, id_of, send};
use mmap_session::store::{OpenError, Options, Store};
use mmap_session::{Session, SessionError, SessionLayer};

async fn increment(session: Session) -> Result<String, SessionError> {
    let n: u64 = session.get("n").await?.unwrap_or(0) + 1;
    session.insert("n", n).await?;
    Ok(n.to_string())
}

#[tokio::test]
async fn the_store_file_holds_none_of_the_issued_ids() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sessions");
    let store = Store::open(&path).unwrap();
    let app = Router::new()
        .route("/n", post(increment))
        .layer(SessionLayer::new(store));
    let mut ids = Vec::new();
    for _ in 0..200 {
        let response = send(&app, "POST", "/n", None).await;
        assert_eq!(response.status(), StatusCode::OK);
        ids.push(id_of(&cookie_pair(&response)));
    }
    let bytes = std::fs::read(&path).unwrap();
    let raw: HashSet<Vec<u8>> = ids.iter().map(|id| id.as_bytes().to_vec()).collect();
    let text: HashSet<Vec<u8>> = ids.iter().map(|id| id.encode().into_bytes()).collect();
    assert!(
        !bytes.windows(16).any(|w| raw.contains(w)),
        "a raw id is in the file"
    );
    assert!(
        !bytes.windows(22).any(|w| text.contains(w)),
        "an id's text is in the file"
    );
    // The check can fail: the ids' hashes (what the file does hold) are found.
    assert!(ids.iter().take(3).all(|id| {
        let hash = blake3_prefix(id.as_bytes());
        bytes.windows(8).any(|w| w == hash)
    }));
}

#[tokio::test]
async fn issued_ids_are_random_not_constant_or_counted() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("sessions")).unwrap();
    let app = Router::new()
        .route("/n", post(increment))
        .layer(SessionLayer::new(store));
    let n = 2000;
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let response = send(&app, "POST", "/n", None).await;
        ids.push(*id_of(&cookie_pair(&response)).as_bytes());
    }
    let distinct: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), n, "an id was issued twice");
    // Every one of the 128 bit positions is set in about half of the ids. A counter leaves its
    // high bits constant; a constant or a weak generator skews positions. With 2000 samples a
    // fair bit lands in 1000 ± 150 with overwhelming probability (over 6.7 standard deviations).
    for bit in 0..128 {
        let ones = ids
            .iter()
            .filter(|id| id[bit / 8] >> (bit % 8) & 1 == 1)
            .count();
        assert!(
            (850..=1150).contains(&ones),
            "bit {bit} is set in {ones} of {n} ids"
        );
    }
    // Consecutive ids share about 64 bits; a counter's share almost all of theirs.
    let mean_equal_bits: f64 = ids
        .windows(2)
        .map(|w| {
            128 - w[0]
                .iter()
                .zip(&w[1])
                .map(|(a, b)| (a ^ b).count_ones())
                .sum::<u32>()
        })
        .map(f64::from)
        .sum::<f64>()
        / (n - 1) as f64;
    assert!((60.0..68.0).contains(&mean_equal_bits), "{mean_equal_bits}");
}

#[test]
fn a_store_file_owned_by_another_user_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sessions");
    drop(Store::open(&path).unwrap());
    // Give the file away (needs root or password-less sudo, as CI has).
    let uid = std::process::Command::new("id").arg("-u").output().unwrap();
    let root = String::from_utf8_lossy(&uid.stdout).trim() == "0";
    let mut chown = std::process::Command::new(if root { "chown" } else { "sudo" });
    if !root {
        chown.args(["-n", "chown"]);
    }
    let status = chown.arg("65534").arg(&path).status().unwrap();
    assert!(
        status.success(),
        "chown failed: this test needs root or password-less sudo, as CI has"
    );
    let refused = Store::open(&path).unwrap_err();
    assert!(
        matches!(refused, OpenError::ForeignOwner { owner: 65534, .. }),
        "{refused}"
    );
    assert!(Store::open_with(&path, Options::new().allow_foreign_owner(true)).is_ok());
}

/// The first 8 bytes of the BLAKE3 hash of a key, as the store keeps it in each record.
fn blake3_prefix(key: &[u8]) -> [u8; 8] {
    let mut out = [0u8; 8];
    out.copy_from_slice(&blake3::hash(key).as_bytes()[..8]);
    out
}
