//! Error types.

use std::io;
use std::path::PathBuf;

/// Why a store file could not be opened or created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The operating system refused an operation on the file.
    #[error("store file {path}: {source}")]
    Io {
        /// The store file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The path is a symbolic link; the store never follows one (an attacker could point it at a
    /// file of their choosing). Use the link's target path instead.
    #[error("store file {0} is a symbolic link; refusing to follow it (give the real path)")]
    Symlink(PathBuf),
    /// The file belongs to another user. Refused unless `Options::allow_foreign_owner` is set.
    #[error(
        "store file {path} is owned by uid {owner}, not by this process (uid {me}); refusing it"
    )]
    ForeignOwner {
        /// The store file.
        path: PathBuf,
        /// Owner of the file.
        owner: u32,
        /// Effective uid of this process.
        me: u32,
    },
    /// The file is not a session store at all (wrong magic bytes).
    #[error("{0} is not a session store file (wrong magic bytes); point the store at a new path")]
    NotAStore(PathBuf),
    /// The file is a session store of another format version or layout.
    #[error(
        "store file {path} has format version {found} (layout {found_layout:#x}); this build reads \
         version {expected} (layout {expected_layout:#x}): remove the file or use a matching build"
    )]
    UpgradeRequired {
        /// The store file.
        path: PathBuf,
        /// Version in the file.
        found: u32,
        /// Version this build writes.
        expected: u32,
        /// Layout fingerprint in the file.
        found_layout: u64,
        /// Layout fingerprint of this build.
        expected_layout: u64,
    },
    /// The file claims to be a store of this version but its header is inconsistent.
    #[error("store file {path} is corrupted: {reason}; move it aside and start a new store")]
    Corrupted {
        /// The store file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The options cannot describe a valid store.
    #[error("invalid store options: {0}")]
    InvalidOptions(String),
    /// Every process registration slot is taken by a live process.
    #[error("all {0} process slots of the store are in use by live processes")]
    TooManyProcesses(usize),
}

/// Why a store operation failed. Nothing was changed when one of these is returned, except
/// for [`StoreError::Sync`] with `published: true`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The lease could not be had before the deadline: another request holds it.
    #[error("timed out waiting for the session lease")]
    LeaseTimeout,
    /// This lease was taken over (it was held past the lease timeout, for example while the
    /// process was stopped), so its commit was refused to protect the new holder's work.
    #[error("the session lease was lost to another holder; nothing was written")]
    LeaseLost,
    /// This process was forked from the one that opened the store. A child shares its
    /// parent's registration (its liveness lock and token sequence), so it may not take leases
    /// through the parent's `Store`: open the store again in the child.
    #[error("this store was opened before fork(); open it again in the child process")]
    Forked,
    /// No space is left: nothing expired or idle could be evicted, or the disk is full.
    #[error("the session store is full")]
    StoreFull,
    /// The value is larger than the store's maximum value size.
    #[error("value of {len} bytes is larger than the store's maximum of {max} bytes")]
    TooLarge {
        /// Size of the value.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The operating system refused an operation (growing the file, locking).
    #[error("store I/O error: {0}")]
    Io(#[from] io::Error),
    /// The store file is damaged where this operation needed it.
    #[error("store file corrupted: {0}")]
    Corrupted(&'static str),
    /// Forcing the change to the disk failed (only with [`crate::Durability::OnCommit`]). If
    /// `published` is false nothing was changed. If it is true the change *is* committed (other
    /// processes see it, and it survives a process crash) but may not survive a power loss.
    #[error(
        "syncing the session store file to disk failed: {source}; {}",
        if *published {
            "the change is committed and visible, but may not survive a power loss (check the disk)"
        } else {
            "nothing was changed (check the disk)"
        }
    )]
    Sync {
        /// Whether the change was published before the failure.
        published: bool,
        /// The error of `fdatasync`.
        #[source]
        source: io::Error,
    },
}

impl StoreError {
    /// A copy of this error for each of several waiters (an I/O error keeps its kind and text).
    #[cfg(feature = "tokio")]
    pub(crate) fn duplicate(&self) -> StoreError {
        match self {
            StoreError::LeaseTimeout => StoreError::LeaseTimeout,
            StoreError::LeaseLost => StoreError::LeaseLost,
            StoreError::Forked => StoreError::Forked,
            StoreError::StoreFull => StoreError::StoreFull,
            StoreError::TooLarge { len, max } => StoreError::TooLarge {
                len: *len,
                max: *max,
            },
            StoreError::Io(e) => StoreError::Io(io::Error::new(e.kind(), e.to_string())),
            StoreError::Corrupted(what) => StoreError::Corrupted(what),
            StoreError::Sync { published, source } => StoreError::Sync {
                published: *published,
                source: io::Error::new(source.kind(), source.to_string()),
            },
        }
    }
}
