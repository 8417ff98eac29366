//! The operator tool run as a real process against real store files.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime};

use mmap_session::SessionId;
use mmap_session_store::Store;

const ID: &str = "q83vEjRWeJCrze8SNFZ4kA";

fn admin(store: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mmap-session-admin"))
        .arg("--store")
        .arg(store)
        .args(args)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn store_with_one_session(path: &Path) -> (Store, SessionId) {
    let store = Store::open(path).unwrap();
    let id = SessionId::decode(ID).unwrap();
    let mut lease = store
        .lease_blocking(id.as_bytes(), Instant::now() + Duration::from_secs(5))
        .unwrap();
    lease
        .commit(
            br#"{"d":{"marker":"MARKERMARKER"}}"#,
            SystemTime::now() + Duration::from_secs(600),
        )
        .unwrap();
    drop(lease);
    (store, id)
}

#[test]
fn stats_list_and_hash_describe_sessions_without_showing_ids() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sessions");
    let (_store, id) = store_with_one_session(&path);

    let stats = admin(&path, &["stats"]);
    assert!(stats.status.success());
    assert!(
        text(&stats)
            .lines()
            .any(|l| l.starts_with("records") && l.ends_with(" 1")),
        "{}",
        text(&stats)
    );

    let list = admin(&path, &["list"]);
    assert!(list.status.success());
    let hash = id.short_hash().to_string();
    assert!(text(&list).contains(&hash), "{}", text(&list));
    assert!(!text(&list).contains(ID));
    assert!(text(&list).contains("1 session(s)"));

    let named = admin(&path, &["hash", &format!("{ID}.c2lnbmF0dXJl")]);
    assert_eq!(
        text(&named).trim(),
        hash,
        "a signed cookie value names the same session"
    );
}

#[test]
fn verify_exits_zero_on_a_clean_file_and_one_on_a_damaged_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sessions");
    let (store, _) = store_with_one_session(&path);
    let clean = admin(&path, &["verify"]);
    assert_eq!(clean.status.code(), Some(0), "{}", text(&clean));
    assert!(text(&clean).contains("clean"));

    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes
        .windows(12)
        .position(|w| w == b"MARKERMARKER")
        .unwrap();
    bytes[at] ^= 0x20;
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::File::options().write(true).open(&path).unwrap(),
        &bytes[at..at + 1],
        at as u64,
    )
    .unwrap();
    let damaged = admin(&path, &["verify"]);
    assert_eq!(damaged.status.code(), Some(1), "{}", text(&damaged));
    assert!(text(&damaged).contains("checksum"), "{}", text(&damaged));
    drop(store);
}

#[test]
fn remove_deletes_the_session_of_a_cookie_while_the_store_is_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sessions");
    let (store, id) = store_with_one_session(&path);
    let removed = admin(&path, &["remove", ID]);
    assert!(removed.status.success(), "{}", text(&removed));
    assert!(
        store.get(id.as_bytes()).is_none(),
        "the running process sees the removal"
    );
    let again = admin(&path, &["remove", ID]);
    assert_eq!(again.status.code(), Some(1));
    let garbage = admin(&path, &["remove", "not-a-cookie"]);
    assert_eq!(garbage.status.code(), Some(2));
}

#[test]
fn purge_expired_removes_expired_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sessions");
    let store = Store::open(&path).unwrap();
    let expiry = SystemTime::now() + Duration::from_millis(500);
    for i in 0..3u8 {
        let mut lease = store
            .lease_blocking(&[i; 16], Instant::now() + Duration::from_secs(5))
            .unwrap();
        lease.commit(b"{}", expiry).unwrap();
    }
    while SystemTime::now() <= expiry + Duration::from_millis(1) {
        std::thread::yield_now();
    }
    let out = admin(&path, &["purge-expired"]);
    assert!(out.status.success());
    assert!(text(&out).contains("removed 3"), "{}", text(&out));
    assert!(store.entries().is_empty());
}

#[test]
fn a_missing_store_file_is_an_error_and_is_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typo");
    let out = admin(&path, &["stats"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!path.exists());
}
