//! Fuzzer bytes written into a store file while the store has it open and uses it.
//!
//! Input: a list of commands; `cmd % 8` picks one: 0..=2 write a patch (see `take_patch`)
//! through a second descriptor (pwrite, so the bytes land in the shared pages the store has
//! mapped), 3 `get`, 4 lease + commit, 5 lease + remove, 6 blocking lease + read, 7 `stats`
//! (and `verify`, once per run, when the key bits are 3). The key is `(cmd >> 3) & 3`; `cmd >> 5`
//! picks the committed length from `LENS`.
//!
//! Must never panic or fault. A key is intact while no write has touched its index window or
//! the record its entry points to at the time of the write; an intact key reads as its last
//! committed value or as absent (a damaged allocator may hand its block to another key), never
//! as another value.
#![no_main]

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use mmap_session_fuzz::*;
use mmap_session_store::Store;

// Mostly the template's size class (whose chunk is there already), sometimes others.
const LENS: [usize; 8] = [2000, 2100, 2200, 2496, 2000, 2300, 1000, 3000];

fuzz_target!(|data: &[u8]| run(data));

struct Run<'a> {
    t: &'a Template,
    store: Store,
    latest: Vec<Option<Vec<u8>>>,
    intact: [bool; 4],
}

impl Run<'_> {
    fn expect(&self, k: usize, got: Option<Vec<u8>>, what: &str) {
        if self.intact[k] && got.is_some() {
            assert_eq!(
                got, self.latest[k],
                "{what}: an intact key read as another value"
            );
        }
    }
}

fn run(data: &[u8]) {
    let t = template();
    let path = workdir().join("store_live");
    Overlay::new(t).write(&path).unwrap();
    let store = Store::open_with(&path, options()).unwrap();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut r = Run {
        t,
        store,
        latest: t.latest.clone(),
        intact: [true; 4],
    };
    let mut rest = data;
    let mut n = 1000u64;
    let mut verifies = 0;
    let mut steps = 0;
    while let Some((&cmd, tail)) = rest.split_first() {
        rest = tail;
        steps += 1;
        if steps > 200 {
            break;
        }
        let k = (cmd >> 3) as usize & 3;
        match cmd % 8 {
            0..=2 => {
                let Some(p) = take_patch(r.t, &mut rest) else {
                    break;
                };
                let mut index = vec![0u8; (r.t.shard_locks_off - r.t.index_off) as usize];
                file.read_exact_at(&mut index, r.t.index_off).unwrap();
                for k in 0..KEYS.len() {
                    let mut ranges = r.t.window_ranges(k);
                    ranges.extend(r.t.record_range(&index, k, r.latest[k].as_deref()));
                    if ranges.iter().any(|&(o, l)| p.overlaps(o, l)) {
                        r.intact[k] = false;
                    }
                }
                pwrite_patch(&file, &p).unwrap();
            }
            3 => {
                let got = r.store.get(KEYS[k]).map(|x| x.value);
                r.expect(k, got, "get");
            }
            4 | 5 => {
                if let Ok(Some(mut lease)) = r.store.try_lease(KEYS[k]) {
                    r.expect(k, lease.read().map(|x| x.value), "lease read");
                    if cmd % 8 == 4 {
                        n += 1;
                        let v = value_for(k, n, LENS[(cmd >> 5) as usize]);
                        if lease.commit(&v, far_future()).is_ok() {
                            r.latest[k] = Some(v);
                        }
                    } else if lease.remove().is_ok() {
                        r.latest[k] = None;
                    }
                }
            }
            6 => {
                let deadline = Instant::now() + Duration::from_millis(2);
                if let Ok(lease) = r.store.lease_blocking(KEYS[k], deadline) {
                    r.expect(k, lease.read().map(|x| x.value), "blocking lease read");
                }
            }
            _ => {
                // `verify` walks the whole file: at most once per run, and only for key bits 3.
                if k == 3 && verifies < 1 {
                    verifies += 1;
                    let _ = r.store.verify();
                }
                let _ = r.store.stats();
            }
        }
    }
    for k in 0..KEYS.len() {
        let got = r.store.get(KEYS[k]).map(|x| x.value);
        r.expect(k, got, "final get");
    }
    drop(r);
    drop(file);
    let _ = std::fs::remove_file(&path);
}
