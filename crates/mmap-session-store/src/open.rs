//! Creating and opening a store file: race-free creation, and a header that is checked before
//! anything else in the file is believed.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::durability::Durability;
use crate::error::OpenError;
use crate::layout::*;
use crate::sys;

/// How a store is opened: the shape of a file this process creates, and the behaviour of this
/// process towards the file. A file that already exists keeps the shape it was created with.
#[derive(Clone, Debug)]
pub struct Options {
    pub(crate) max_file_size: u64,
    pub(crate) max_sessions: u64,
    pub(crate) max_value_len: usize,
    pub(crate) lease_timeout: Duration,
    pub(crate) allow_foreign_owner: bool,
    pub(crate) durability: Durability,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_file_size: 4 << 30,
            max_sessions: 1 << 20,
            max_value_len: 64 << 10,
            lease_timeout: Duration::from_secs(30),
            allow_foreign_owner: false,
            durability: Durability::Never,
        }
    }
}

impl Options {
    /// Options with the defaults: files grow up to 4 GiB, an index for 1,048,576 sessions,
    /// values up to 64 KiB, and a lease may be held for 30 s before a waiter takes it over.
    pub fn new() -> Self {
        Self::default()
    }

    /// The largest size a newly created file may grow to (it starts small and grows on demand).
    /// At most 64 GiB.
    pub fn max_file_size(mut self, bytes: u64) -> Self {
        self.max_file_size = bytes;
        self
    }

    /// How many sessions a newly created file's index is sized for. The index is reserved at
    /// creation: 32 bytes per session (32 MiB for the default).
    pub fn max_sessions(mut self, sessions: u64) -> Self {
        self.max_sessions = sessions;
        self
    }

    /// The largest value a newly created file accepts (at most 1 MiB less 64 bytes).
    pub fn max_value_len(mut self, bytes: usize) -> Self {
        self.max_value_len = bytes;
        self
    }

    /// How long this process lets another holder keep a lease it is waiting for before taking
    /// the lease over. The old holder's later commit is then refused (`StoreError::LeaseLost`).
    /// A holder whose process died is taken over within milliseconds, whatever this says.
    pub fn lease_timeout(mut self, timeout: Duration) -> Self {
        self.lease_timeout = timeout;
        self
    }

    /// When this process forces what it commits to the disk (default [`Durability::Never`]).
    /// Unlike the shape of the file, this applies to an existing file too: it is this
    /// process's choice, and other processes sharing the file may choose differently.
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Accept a file owned by another user (refused by default: a session store shared across
    /// users is usually a mistake or an attack).
    pub fn allow_foreign_owner(mut self, allow: bool) -> Self {
        self.allow_foreign_owner = allow;
        self
    }
}

/// The shape of a store file, read from (or about to be written to) its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub(crate) index_entries: u64,
    pub(crate) index_off: u64,
    pub(crate) data_off: u64,
    pub(crate) max_len: u64,
    pub(crate) max_value: u64,
    pub(crate) created_ms: u64,
}

const fn align_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

impl Geometry {
    fn for_options(opts: &Options) -> Result<Geometry, OpenError> {
        let bad = |m: &str| Err(OpenError::InvalidOptions(m.to_owned()));
        if opts.max_value_len as u64 > MAX_VALUE_LIMIT {
            return bad("max_value_len is larger than 1 MiB - 64 bytes");
        }
        if opts.max_sessions == 0 || opts.max_sessions > 1 << 30 {
            return bad("max_sessions must be between 1 and 2^30");
        }
        if opts.max_file_size > MAX_FILE_LEN {
            return bad("max_file_size is larger than 64 GiB");
        }
        let index_entries = (opts.max_sessions * 2)
            .next_power_of_two()
            .max(SHARD_ENTRIES);
        let geometry = Geometry {
            index_entries,
            index_off: Self::index_off(opts.max_file_size),
            data_off: 0,
            max_len: opts.max_file_size,
            max_value: opts.max_value_len as u64,
            created_ms: now_ms(),
        };
        let geometry = Geometry {
            data_off: geometry.data_off_for(),
            ..geometry
        };
        if geometry.max_chunks() < 1 {
            return bad("max_file_size leaves no room for data after the index");
        }
        Ok(geometry)
    }

    fn index_off(max_len: u64) -> u64 {
        let chunk_table = max_len / CHUNK_LEN;
        align_up(CHUNK_TABLE_OFF + chunk_table, 4096)
    }

    fn data_off_for(&self) -> u64 {
        align_up(self.shard_locks_off() + self.shards() * 8, 4096)
    }

    /// Number of insert shards.
    pub(crate) fn shards(&self) -> u64 {
        self.index_entries / self.shard_len()
    }

    /// Entries per shard.
    pub(crate) fn shard_len(&self) -> u64 {
        SHARD_ENTRIES.min(self.index_entries)
    }

    /// One lock word per shard, right after the index.
    pub(crate) fn shard_locks_off(&self) -> u64 {
        self.index_off + self.index_entries * ENTRY_LEN
    }

    /// How many chunks fit between the data offset and the maximum length.
    pub(crate) fn max_chunks(&self) -> u64 {
        self.max_len.saturating_sub(self.data_off) / CHUNK_LEN
    }

    fn to_header(self) -> [u8; HEADER_LEN as usize] {
        let mut h = [0u8; HEADER_LEN as usize];
        h[H_MAGIC..H_MAGIC + 8].copy_from_slice(&MAGIC);
        h[H_VERSION..H_VERSION + 4].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        h[H_HEADER_LEN..H_HEADER_LEN + 4].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        let put = |h: &mut [u8], at: usize, v: u64| h[at..at + 8].copy_from_slice(&v.to_le_bytes());
        put(&mut h, H_FINGERPRINT, fingerprint());
        put(&mut h, H_INDEX_ENTRIES, self.index_entries);
        put(&mut h, H_INDEX_OFF, self.index_off);
        put(&mut h, H_DATA_OFF, self.data_off);
        put(&mut h, H_MAX_LEN, self.max_len);
        put(&mut h, H_MAX_VALUE, self.max_value);
        put(&mut h, H_CREATED_MS, self.created_ms);
        let sum = xxhash_rust::xxh3::xxh3_64(&h[..H_IMMUTABLE_END]);
        put(&mut h, H_CHECKSUM, sum);
        put(&mut h, H_FILE_LEN, self.data_off);
        h
    }

    /// Reads and checks a header. `file_size` is the file's length on disk.
    pub(crate) fn from_header(
        path: &Path,
        h: &[u8],
        file_size: u64,
    ) -> Result<Geometry, OpenError> {
        let corrupted = |reason: String| OpenError::Corrupted {
            path: path.to_owned(),
            reason,
        };
        if h.len() < 8 || h[H_MAGIC..H_MAGIC + 8] != MAGIC {
            if h.len() < 8 || MAGIC.starts_with(&h[..h.len().min(8)]) {
                return Err(corrupted(format!("truncated header ({file_size} bytes)")));
            }
            return Err(OpenError::NotAStore(path.to_owned()));
        }
        if h.len() < HEADER_LEN as usize {
            return Err(corrupted(format!("truncated header ({file_size} bytes)")));
        }
        let u32_at = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let version = u32_at(H_VERSION);
        let layout = u64_at(H_FINGERPRINT);
        let intact = xxhash_rust::xxh3::xxh3_64(&h[..H_IMMUTABLE_END]) == u64_at(H_CHECKSUM);
        // A damaged header of our own version is corruption; another version may checksum its
        // header differently, so its mismatch says "another format", not "damaged".
        if version == FORMAT_VERSION && !intact {
            return Err(corrupted("header checksum mismatch".into()));
        }
        if version != FORMAT_VERSION || layout != fingerprint() {
            return Err(OpenError::UpgradeRequired {
                path: path.to_owned(),
                found: version,
                expected: FORMAT_VERSION,
                found_layout: layout,
                expected_layout: fingerprint(),
            });
        }
        if u32_at(H_HEADER_LEN) as u64 != HEADER_LEN {
            return Err(corrupted("unexpected header length".into()));
        }
        let g = Geometry {
            index_entries: u64_at(H_INDEX_ENTRIES),
            index_off: u64_at(H_INDEX_OFF),
            data_off: u64_at(H_DATA_OFF),
            max_len: u64_at(H_MAX_LEN),
            max_value: u64_at(H_MAX_VALUE),
            created_ms: u64_at(H_CREATED_MS),
        };
        let sane = g.index_entries.is_power_of_two()
            && g.index_entries >= SHARD_ENTRIES
            && g.index_entries <= 1 << 31
            && g.max_len <= MAX_FILE_LEN
            && g.index_off == Self::index_off(g.max_len)
            && g.data_off == g.data_off_for()
            && g.max_chunks() >= 1
            && g.max_value <= MAX_VALUE_LIMIT;
        if !sane {
            return Err(corrupted("inconsistent geometry in header".into()));
        }
        let file_len = u64_at(H_FILE_LEN);
        if file_len < g.data_off || file_len > g.max_len {
            return Err(corrupted(format!(
                "recorded file length {file_len} is out of range"
            )));
        }
        if file_size < file_len {
            return Err(corrupted(format!(
                "truncated: the header records {file_len} bytes but the file has {file_size}"
            )));
        }
        Ok(g)
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> OpenError + '_ {
    move |source| OpenError::Io {
        path: path.to_owned(),
        source,
    }
}

fn open_existing(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Opens the file at `path`, creating it if absent. Creation writes a complete file under a
/// temporary name and links it into place, so a concurrent opener sees either no file or a
/// valid one, and of two concurrent creators exactly one wins.
pub(crate) fn open_or_create(path: &Path, opts: &Options) -> Result<(File, Geometry), OpenError> {
    for _ in 0..8 {
        match open_existing(path) {
            Ok(file) => return check_opened(path, file, opts),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(OpenError::Symlink(path.to_owned()))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => create(path, opts)?,
            Err(e) => return Err(io_err(path)(e)),
        }
    }
    Err(io_err(path)(io::Error::other(
        "the file keeps disappearing while being opened",
    )))
}

fn check_opened(path: &Path, file: File, opts: &Options) -> Result<(File, Geometry), OpenError> {
    let meta = file.metadata().map_err(io_err(path))?;
    if !meta.is_file() {
        return Err(OpenError::NotAStore(path.to_owned()));
    }
    let me = sys::effective_uid();
    if meta.uid() != me && !opts.allow_foreign_owner {
        return Err(OpenError::ForeignOwner {
            path: path.to_owned(),
            owner: meta.uid(),
            me,
        });
    }
    // Other processes may be growing the file meanwhile. They reserve the space before they
    // record the new length in the header, so a size taken after reading the header is at
    // least the length it records. A length word read while being written could still look
    // wrong: only a damage that persists is reported.
    let mut attempts = 0;
    loop {
        let mut header = vec![0u8; meta.len().min(HEADER_LEN) as usize];
        file.read_exact_at(&mut header, 0).map_err(io_err(path))?;
        let size = file.metadata().map_err(io_err(path))?.len();
        match Geometry::from_header(path, &header, size) {
            Err(OpenError::Corrupted { .. }) if attempts < 2 => attempts += 1,
            Err(e) => return Err(e),
            Ok(geometry) => return Ok((file, geometry)),
        }
    }
}

fn create(path: &Path, opts: &Options) -> Result<(), OpenError> {
    let geometry = Geometry::for_options(opts)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    remove_abandoned_creations(&dir, &name);
    // Unique among concurrent creators, and among the creators of every earlier run: a random
    // nonce (a fixed one would collide with the file of a creator killed with the same pid,
    // pid 1 in every container).
    let mut attempts = 0;
    let (tmp, file) = loop {
        let tmp = dir.join(format!(
            ".{name}.{}.{:016x}.creating",
            std::process::id(),
            random_u64()
        ));
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp);
        let file = match opened {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 8 => {
                attempts += 1;
                continue;
            }
            Err(e) => return Err(io_err(&tmp)(e)),
        };
        failpoint!("open.create.tmp_opened");
        // Held while the file is being written, so that a later creator can tell an abandoned
        // temporary file (its lock is free: the creator died) from one still being written.
        if sys::try_lock(&file, 0, sys::LockKind::Exclusive).map_err(io_err(&tmp))? {
            break (tmp, file);
        }
        // Another creator's clean-up took it for abandoned in the instant before we locked it
        // (and removes it): start again under another name.
        if attempts >= 8 {
            return Err(io_err(&tmp)(io::Error::other(
                "every new temporary file was taken by another creator's clean-up",
            )));
        }
        attempts += 1;
    };
    let result = (|| {
        sys::reserve(&file, 0, geometry.data_off).map_err(io_err(&tmp))?;
        file.write_all_at(&geometry.to_header(), 0)
            .map_err(io_err(&tmp))?;
        failpoint!("open.create.written");
        match std::fs::hard_link(&tmp, path) {
            Ok(()) => Ok(()),
            // Another creator won; or our temporary file was removed (taken for abandoned in
            // the instant before we locked it): the caller opens or creates again.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::AlreadyExists | io::ErrorKind::NotFound
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(io_err(path)(e)),
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    result
}

/// Removes the temporary files of creations of `name` in `dir` whose creator died (their lock
/// is free). Failures are ignored: a leftover file costs only its name.
fn remove_abandoned_creations(dir: &Path, name: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let prefix = format!(".{name}.");
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let file_name = file_name.to_string_lossy();
        if !(file_name.starts_with(&prefix) && file_name.ends_with(".creating")) {
            continue;
        }
        let path = entry.path();
        let Ok(file) = open_existing(&path) else {
            continue;
        };
        if sys::try_lock(&file, 0, sys::LockKind::Exclusive).unwrap_or(false) {
            failpoint!("open.create.abandoned_locked");
            tracing::info!(path = %path.display(), "removing the temporary file of a creator that died");
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// A random number for temporary file names (std's hasher keys come from the OS's generator).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    h.finish()
}
