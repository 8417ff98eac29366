//! Opening and using a store file made of fuzzer bytes.
//!
//! Input: `mode`, `ops`, then either the whole file (raw mode, `mode & 3 == 0`) or patches to
//! the template store file (see `take_patch`): the template gets the fuzzer past the header
//! checks. `mode` bit 2 recomputes the header checksum after patching (so changed geometry is
//! believed up to the geometry checks), bit 3 marks the file dirty (the opener runs recovery),
//! bits 4..5 pick the length of committed values, bits 6 and 7 both set run `verify`.
//!
//! Must never panic or fault. A key whose index window and record no patch touched (with the
//! immutable header untouched too) reads as its last committed value or as absent, never as
//! another value.
#![no_main]

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use mmap_session_fuzz::*;
use mmap_session_store::Store;

// Mostly the template's size class (whose chunk is there already), sometimes another.
const LENS: [usize; 4] = [2000, 2496, 2200, 3000];

fuzz_target!(|data: &[u8]| run(data));

fn check(store: &Store, latest: &[Option<Vec<u8>>], intact: &[bool; 4], when: &str) {
    for k in 0..KEYS.len() {
        let got = store.get(KEYS[k]).map(|r| r.value);
        if intact[k] && got.is_some() {
            assert_eq!(
                got.as_ref(),
                latest[k].as_ref(),
                "{when}: an untouched key read as another value"
            );
        }
    }
}

fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Some((&ops, mut rest)) = rest.split_first() else {
        return;
    };
    let t = template();
    let path = workdir().join("store_file");
    let mut intact = [false; 4];
    if mode & 3 == 0 {
        let file = create_file(&path).unwrap();
        file.write_all_at(rest, 0).unwrap();
    } else {
        let mut overlay = Overlay::new(t);
        let mut patches = Vec::new();
        while patches.len() < 64 {
            let Some(p) = take_patch(t, &mut rest) else {
                break;
            };
            overlay.apply(&p);
            patches.push(p);
        }
        if mode & 4 != 0 {
            overlay.fix_header_checksum();
            // Keep the file (which may grow up to this) small.
            if overlay.header_u64(H_MAX_LEN) > 16 << 20 {
                return;
            }
        }
        if mode & 8 != 0 {
            overlay.set_u64(H_DIRTY, 1);
        }
        let header_intact = !patches
            .iter()
            .any(|p| p.overlaps(0, H_IMMUTABLE_END as u64));
        let index = &t.bytes[t.index_off as usize..t.shard_locks_off as usize];
        for (k, ok) in intact.iter_mut().enumerate() {
            let mut ranges = t.window_ranges(k);
            ranges.extend(t.record_range(index, k, t.latest[k].as_deref()));
            *ok = header_intact
                && !patches
                    .iter()
                    .any(|p| ranges.iter().any(|&(o, l)| p.overlaps(o, l)));
        }
        overlay.write(&path).unwrap();
    }

    if let Ok(store) = Store::open_with(&path, options()) {
        let mut latest = t.latest.clone();
        check(&store, &latest, &intact, "after open");
        let len = LENS[(mode >> 4) as usize & 3];
        for k in 0..KEYS.len() {
            if let Ok(Some(mut lease)) = store.try_lease(KEYS[k]) {
                let read = lease.read().map(|r| r.value);
                if intact[k] && read.is_some() {
                    assert_eq!(read, latest[k], "lease read of an untouched key");
                }
                match (ops >> (2 * k)) & 3 {
                    0 => {}
                    3 => {
                        if lease.remove().is_ok() {
                            latest[k] = None;
                        }
                    }
                    n => {
                        let v = value_for(k, 100 + n as u64, len);
                        if lease.commit(&v, far_future()).is_ok() {
                            latest[k] = Some(v);
                        }
                    }
                }
            }
        }
        let k = (ops & 3) as usize;
        if let Ok(lease) = store.lease_blocking(KEYS[k], Instant::now() + Duration::from_millis(2))
        {
            let read = lease.read().map(|r| r.value);
            if intact[k] && read.is_some() {
                assert_eq!(read, latest[k], "blocking lease read of an untouched key");
            }
        }
        let _ = store.stats();
        if mode & 0xc0 == 0xc0 {
            let _ = store.verify();
        }
        check(&store, &latest, &intact, "after the operations");
    }
    let _ = std::fs::remove_file(&path);
}
