//! Helpers shared by the fuzz targets: a scratch directory, a small valid store file to mutate,
//! the patch language the store targets decode from their input, and the web application the
//! layer targets send requests to.
//!
//! Every target must be deterministic for one input: each store target writes a fresh file per
//! run; the layer targets share one store but re-seed what they rely on before each run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use mmap_session_store::{Options, Store};

pub mod web;

// ---- The format (mirrors crates/mmap-session-store/src/layout.rs) -------------------------

pub const PAGE: usize = 4096;
pub const H_CHECKSUM: usize = 72;
pub const H_IMMUTABLE_END: usize = 80;
pub const H_INDEX_ENTRIES: usize = 24;
pub const H_INDEX_OFF: usize = 32;
pub const H_DATA_OFF: usize = 40;
pub const H_MAX_LEN: usize = 48;
pub const H_DIRTY: usize = 336;
pub const SLOTS_OFF: u64 = 4096;
pub const SLOTS_LEN: u64 = 512 * 128;
pub const CHUNK_TABLE_OFF: u64 = SLOTS_OFF + SLOTS_LEN;
pub const ENTRY_LEN: u64 = 16;
pub const SHARD_ENTRIES: u64 = 1024;
pub const MAX_PROBE: u64 = 64;
pub const CHUNK_LEN: u64 = 1 << 20;
pub const REF_UNIT: u64 = 16;
pub const RECORD_HEADER: u64 = 64;

/// The keys the store targets use. The template holds a record for the first two (the second
/// one overwritten once, so a block with its stale record sits on a free list), a removed
/// record for the third, and nothing for the fourth.
pub const KEYS: [&[u8]; 4] = [b"alpha", b"bravo", b"charlie", b"delta"];

/// Options of every store the targets open: a small file (at most 3 data chunks), short
/// lease timeouts so that a token the fuzzer wrote is taken over quickly.
pub fn options() -> Options {
    Options::new()
        .max_sessions(512)
        .max_file_size(4 << 20)
        .max_value_len(4096)
        .lease_timeout(Duration::from_millis(10))
}

/// Length of the template's values (the 2560-byte size class holds 2000..=2496).
pub const TEMPLATE_LEN: usize = 2000;

/// Far enough in the future that no record of a run expires.
pub fn far_future() -> SystemTime {
    SystemTime::now() + Duration::from_secs(10 * 365 * 24 * 3600)
}

/// A value for key `k`, unique per `n`, padded to `len` bytes (at least the prefix).
pub fn value_for(k: usize, n: u64, len: usize) -> Vec<u8> {
    let mut v = format!("{}#{n}#", String::from_utf8_lossy(KEYS[k])).into_bytes();
    while v.len() < len {
        v.push(b'.');
    }
    v
}

// ---- Scratch directory ------------------------------------------------------------------

/// A directory of this process (on tmpfs when there is one), created once. Directories of
/// processes that are gone are removed on the way.
pub fn workdir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_owned()
        } else {
            std::env::temp_dir()
        };
        if let Ok(entries) = fs::read_dir(&base) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix("mmap-session-fuzz-") {
                    if !Path::new("/proc").join(pid).exists() {
                        let _ = fs::remove_dir_all(entry.path());
                    }
                }
            }
        }
        let dir = base.join(format!("mmap-session-fuzz-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        dir
    })
}

/// Creates (or truncates) the file at `path` with mode 0600, without following a symlink.
pub fn create_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

// ---- Key geometry -----------------------------------------------------------------------

/// The tag and home position a key has in an index of `entries` entries.
pub fn key_tag_home(key: &[u8], entries: u64) -> (u64, u64) {
    let hash = blake3::hash(key);
    let h = hash.as_bytes();
    let word = |at: usize| u64::from_le_bytes(h[at..at + 8].try_into().unwrap());
    ((word(0) & !3) | 2, word(8) & (entries - 1))
}

/// The index positions a key may occupy, in probe order.
pub fn key_window(key: &[u8], entries: u64) -> Vec<u64> {
    let (_, home) = key_tag_home(key, entries);
    let len = SHARD_ENTRIES.min(entries);
    let base = home - home % len;
    let start = home - base;
    (0..MAX_PROBE.min(len))
        .map(|i| base + (start + i) % len)
        .collect()
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

// ---- The template store file --------------------------------------------------------------

/// A small valid store file, built once per process, and what the targets need to know about it.
pub struct Template {
    /// The whole file.
    pub bytes: Vec<u8>,
    /// Pages holding a non-zero byte (the others are written as holes).
    pub pages: Vec<usize>,
    pub index_off: u64,
    pub index_entries: u64,
    pub shard_locks_off: u64,
    pub data_off: u64,
    /// Offset of each key's index entry, if it has one.
    pub entries: Vec<Option<u64>>,
    /// Offsets of the blocks holding a record (current or stale).
    pub records: Vec<u64>,
    /// The value each key holds in the template.
    pub latest: Vec<Option<Vec<u8>>>,
}

impl Template {
    pub fn entry_off(&self, pos: u64) -> u64 {
        self.index_off + pos * ENTRY_LEN
    }

    /// Byte ranges of the index entries a key's lookup may read.
    pub fn window_ranges(&self, k: usize) -> Vec<(u64, u64)> {
        key_window(KEYS[k], self.index_entries)
            .into_iter()
            .map(|pos| (self.entry_off(pos), ENTRY_LEN))
            .collect()
    }

    /// The record block the key's entry points to in `index` (the index bytes, from
    /// `index_off`), as `(offset, 64 + value length)`, given the key's latest value.
    pub fn record_range(
        &self,
        index: &[u8],
        k: usize,
        latest: Option<&[u8]>,
    ) -> Option<(u64, u64)> {
        let (tag, _) = key_tag_home(KEYS[k], self.index_entries);
        for pos in key_window(KEYS[k], self.index_entries) {
            let at = (pos * ENTRY_LEN) as usize;
            if index.len() < at + 16 {
                return None;
            }
            let t = u64_at(index, at);
            if t == tag {
                let block = u64_at(index, at + 8) >> 32;
                if block == 0 {
                    return None;
                }
                let len = RECORD_HEADER + latest.map_or(0, |v| v.len() as u64);
                return Some((block * REF_UNIT, len));
            }
            if t == 0 {
                return None;
            }
        }
        None
    }
}

/// The template, built on first use.
pub fn template() -> &'static Template {
    static T: OnceLock<Template> = OnceLock::new();
    T.get_or_init(build_template)
}

fn commit(store: &Store, k: usize, value: Option<&[u8]>) {
    let mut lease = store.try_lease(KEYS[k]).unwrap().unwrap();
    match value {
        Some(v) => lease.commit(v, far_future()).unwrap(),
        None => lease.remove().unwrap(),
    }
}

fn build_template() -> Template {
    let path = workdir().join("template");
    let _ = fs::remove_file(&path);
    let store = Store::open_with(&path, options()).unwrap();
    // Values of the 2560-byte class: its chunk has 409 blocks, so free lists (which recovery
    // rebuilds and `verify` walks) stay short.
    let alpha = value_for(0, 0, TEMPLATE_LEN);
    let bravo_old = value_for(1, 0, TEMPLATE_LEN + 10);
    let bravo = value_for(1, 1, TEMPLATE_LEN + 20);
    let charlie = value_for(2, 0, TEMPLATE_LEN + 30);
    commit(&store, 0, Some(&alpha));
    commit(&store, 1, Some(&bravo_old));
    commit(&store, 2, Some(&charlie));
    commit(&store, 1, Some(&bravo));
    commit(&store, 2, None);
    assert!(store.verify().is_clean());
    drop(store);
    let bytes = fs::read(&path).unwrap();
    fs::remove_file(&path).unwrap();

    let index_entries = u64_at(&bytes, H_INDEX_ENTRIES);
    let index_off = u64_at(&bytes, H_INDEX_OFF);
    let data_off = u64_at(&bytes, H_DATA_OFF);
    let shard_locks_off = index_off + index_entries * ENTRY_LEN;
    let pages = bytes
        .chunks(PAGE)
        .enumerate()
        .filter(|(_, p)| p.iter().any(|&b| b != 0))
        .map(|(i, _)| i)
        .collect();
    let mut t = Template {
        bytes,
        pages,
        index_off,
        index_entries,
        shard_locks_off,
        data_off,
        entries: Vec::new(),
        records: Vec::new(),
        latest: vec![Some(alpha), Some(bravo), None, None],
    };
    for key in KEYS {
        let (tag, _) = key_tag_home(key, index_entries);
        let found = key_window(key, index_entries)
            .into_iter()
            .map(|pos| t.entry_off(pos))
            .find(|&off| u64_at(&t.bytes, off as usize) == tag);
        t.entries.push(found);
    }
    // Blocks holding a record of one of the keys, current or stale (a freed block keeps its
    // key hash; only its first 8 bytes become the free-list link).
    let hashes: Vec<[u8; 32]> = KEYS.iter().map(|k| *blake3::hash(k).as_bytes()).collect();
    let (from, to) = (data_off as usize, t.bytes.len() - RECORD_HEADER as usize);
    t.records = (from..to)
        .step_by(REF_UNIT as usize)
        .filter(|&at| hashes.iter().any(|h| t.bytes[at + 32..at + 64] == h[..]))
        .map(|at| at as u64)
        .collect();
    assert_eq!(t.records.len(), 4, "template records");
    t
}

// ---- Patches --------------------------------------------------------------------------------

/// One change the fuzzer makes to the file: `bytes` written (or XORed) at `off`.
#[derive(Debug, Clone)]
pub struct Patch {
    pub off: u64,
    pub bytes: Vec<u8>,
    pub xor: bool,
}

impl Patch {
    pub fn overlaps(&self, off: u64, len: u64) -> bool {
        let end = self.off + self.bytes.len() as u64;
        self.off < off + len && off < end
    }
}

/// Decodes one patch from the front of `data`: a region byte, a 3-byte offset inside the
/// region, an op byte (bit 0: XOR instead of overwrite; bits 1..6: length - 1), then the bytes.
/// Regions focus the fuzzer on the parts of the file that matter.
pub fn take_patch(t: &Template, data: &mut &[u8]) -> Option<Patch> {
    if data.len() < 5 {
        return None;
    }
    let (head, rest) = data.split_at(5);
    let region = head[0] % 9;
    let which = (head[0] / 9) as usize;
    let rel = u64::from(head[1]) | u64::from(head[2]) << 8 | u64::from(head[3]) << 16;
    let xor = head[4] & 1 == 1;
    let len = ((head[4] >> 1) as usize & 31) + 1;
    let len = len.min(rest.len()).max(1);
    let entry = t.entries.iter().flatten().copied().collect::<Vec<_>>();
    let (start, size) = match region {
        0 => (0, 1024),              // header fields and free-list heads
        1 => (SLOTS_OFF, SLOTS_LEN), // process slots
        2 => (CHUNK_TABLE_OFF, t.index_off - CHUNK_TABLE_OFF), // chunk table
        3 => {
            // around the index entry of one of the template's keys
            let e = entry[which % entry.len()];
            (e - 32, 80)
        }
        4 => (t.index_off, t.shard_locks_off - t.index_off), // the whole index
        5 => (t.shard_locks_off, t.data_off - t.shard_locks_off), // shard locks
        6 => {
            // a record block of the template (header and value)
            let r = t.records[which % t.records.len()];
            (r, 128)
        }
        7 => (t.data_off, CHUNK_LEN), // the first data chunk
        _ => (0, t.bytes.len() as u64),
    };
    let off = start + rel % size.max(1);
    let bytes = if rest.is_empty() {
        vec![0xff]
    } else {
        rest[..len].to_vec()
    };
    *data = &rest[len.min(rest.len())..];
    Some(Patch { off, bytes, xor })
}

/// The template with patches applied, kept as changed pages over the template.
pub struct Overlay<'t> {
    pub t: &'t Template,
    pub pages: BTreeMap<usize, Vec<u8>>,
}

impl<'t> Overlay<'t> {
    pub fn new(t: &'t Template) -> Self {
        Overlay {
            t,
            pages: BTreeMap::new(),
        }
    }

    fn page_mut(&mut self, p: usize) -> &mut Vec<u8> {
        let t = self.t;
        self.pages
            .entry(p)
            .or_insert_with(|| t.bytes[p * PAGE..(p + 1) * PAGE].to_vec())
    }

    pub fn apply(&mut self, patch: &Patch) {
        let len = self.t.bytes.len() as u64;
        for (i, &b) in patch.bytes.iter().enumerate() {
            let at = patch.off + i as u64;
            if at >= len {
                break;
            }
            let page = self.page_mut(at as usize / PAGE);
            let byte = &mut page[at as usize % PAGE];
            *byte = if patch.xor { *byte ^ b } else { b };
        }
    }

    /// Recomputes the header checksum, so that changed geometry gets past the checksum check.
    pub fn fix_header_checksum(&mut self) {
        let page = self.page_mut(0);
        let sum = xxhash_rust::xxh3::xxh3_64(&page[..H_CHECKSUM]);
        page[H_CHECKSUM..H_CHECKSUM + 8].copy_from_slice(&sum.to_le_bytes());
    }

    pub fn set_u64(&mut self, at: usize, v: u64) {
        let page = self.page_mut(at / PAGE);
        page[at % PAGE..at % PAGE + 8].copy_from_slice(&v.to_le_bytes());
    }

    pub fn header_u64(&self, at: usize) -> u64 {
        match self.pages.get(&0) {
            Some(p) => u64_at(p, at),
            None => u64_at(&self.t.bytes, at),
        }
    }

    /// Writes the file: zero pages as holes.
    pub fn write(&self, path: &Path) -> io::Result<()> {
        let file = create_file(path)?;
        file.set_len(self.t.bytes.len() as u64)?;
        for &p in &self.t.pages {
            if !self.pages.contains_key(&p) {
                file.write_all_at(&self.t.bytes[p * PAGE..(p + 1) * PAGE], (p * PAGE) as u64)?;
            }
        }
        for (&p, bytes) in &self.pages {
            file.write_all_at(bytes, (p * PAGE) as u64)?;
        }
        Ok(())
    }
}

/// Applies `patch` to a live file through its own descriptor (pwrite), reading the bytes
/// first when XORing.
pub fn pwrite_patch(file: &File, patch: &Patch) -> io::Result<()> {
    let mut bytes = patch.bytes.clone();
    if patch.xor {
        let mut old = vec![0u8; bytes.len()];
        let n = file.read_at(&mut old, patch.off)?;
        for (b, o) in bytes.iter_mut().zip(&old[..n]) {
            *b ^= o;
        }
    }
    file.write_all_at(&bytes, patch.off)
}
