//! A store process driven line by line from standard input (see the crate documentation).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use mmap_session_store::{Lease, Store};
use mmap_session_store_faults::options;

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn read_line() -> Option<String> {
    let mut line = String::new();
    match std::io::stdin().read_line(&mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(line.trim_end().to_owned()),
    }
}

fn main() {
    // Running: the exec that started us has closed every file of the test process we were a
    // copy of (see `Child::spawn`).
    say("@ready");
    let mut store: Option<Store> = None;
    let mut held: Vec<Lease> = Vec::new();
    while let Some(line) = read_line() {
        let words: Vec<&str> = line.split(' ').collect();
        match words.as_slice() {
            ["open", path, lease_ms] => {
                let timeout = Duration::from_millis(lease_ms.parse().unwrap());
                match Store::open_with(path, options(timeout)) {
                    Ok(s) => {
                        store = Some(s);
                        say("@ok");
                    }
                    Err(e) => say(&format!("@err {e}")),
                }
            }
            ["arm", name] => {
                let name = (*name).to_owned();
                let armed = Arc::new(AtomicBool::new(true));
                let at = name.clone();
                fail::cfg_callback(name, move || {
                    if armed.swap(false, Ordering::SeqCst) {
                        say(&format!("@at {at}"));
                        // Stand still here until the test says "resume" (or kills us).
                        let _ = read_line();
                    }
                })
                .unwrap();
                say("@armed");
            }
            ["commit", key, value, ttl_ms] => {
                let s = store.as_ref().unwrap();
                let ttl = Duration::from_millis(ttl_ms.parse().unwrap());
                let result = s
                    .lease_blocking(key.as_bytes(), Instant::now() + Duration::from_secs(10))
                    .and_then(|mut lease| lease.commit(value.as_bytes(), SystemTime::now() + ttl));
                match result {
                    Ok(()) => say("@ok"),
                    Err(e) => say(&format!("@err {e}")),
                }
            }
            ["rmw", key, tag, pad] => {
                // Read-modify-write under the lease: the new value names what was read, so a
                // test can tell a lost update from a legitimate later one.
                let s = store.as_ref().unwrap();
                let pad: usize = pad.parse().unwrap();
                let result = s
                    .lease_blocking(key.as_bytes(), Instant::now() + Duration::from_secs(10))
                    .and_then(|mut lease| {
                        let read = lease.read().map_or_else(
                            || "none".to_owned(),
                            |r| mmap_session_store_faults::unpad(&r.value),
                        );
                        let value =
                            mmap_session_store_faults::padded(&format!("{tag}<-{read}"), pad);
                        lease
                            .commit(
                                value.as_bytes(),
                                SystemTime::now() + Duration::from_secs(3600),
                            )
                            .map(|()| mmap_session_store_faults::unpad(value.as_bytes()))
                    });
                match result {
                    Ok(v) => say(&format!("@ok {v}")),
                    Err(e) => say(&format!("@err {e}")),
                }
            }
            ["remove", key] => {
                let s = store.as_ref().unwrap();
                let result = s
                    .lease_blocking(key.as_bytes(), Instant::now() + Duration::from_secs(10))
                    .and_then(|mut lease| lease.remove());
                match result {
                    Ok(()) => say("@ok"),
                    Err(e) => say(&format!("@err {e}")),
                }
            }
            ["hold", key] => {
                let s = store.as_ref().unwrap();
                match s.lease_blocking(key.as_bytes(), Instant::now() + Duration::from_secs(10)) {
                    Ok(lease) => {
                        held.push(lease);
                        say("@held");
                    }
                    Err(e) => say(&format!("@err {e}")),
                }
            }
            ["release"] => {
                held.clear();
                say("@ok");
            }
            ["purge"] => {
                let n = store.as_ref().unwrap().purge_expired();
                say(&format!("@ok {n}"));
            }
            ["get", key] => match store.as_ref().unwrap().get(key.as_bytes()) {
                Some(r) => say(&format!("@val {}", String::from_utf8_lossy(&r.value))),
                None => say("@none"),
            },
            ["fork-lease", key] => {
                // Forks, and in the child tries to take a lease through the parent's store.
                let s = store.as_ref().unwrap();
                let code = Store::in_forked_child(|| {
                    let result =
                        s.lease_blocking(key.as_bytes(), Instant::now() + Duration::from_secs(2));
                    say(&format!(
                        "@forked {}",
                        result.map_or_else(|e| e.to_string(), |_| "leased".into())
                    ));
                    0
                });
                code.unwrap();
                say("@ok");
            }
            ["exit"] => break,
            _ => say(&format!("@err unknown command {line:?}")),
        }
    }
    drop(held);
    drop(store);
}
