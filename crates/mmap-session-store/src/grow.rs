//! Growing the file: reserve the space on disk, then publish the new length in the header.
//!
//! Growth takes no lock: `fallocate` over a range that another process is reserving too only
//! allocates, and the recorded length is raised with an atomic maximum after the space is
//! reserved. A grower killed or stopped between the two leaves the file longer than the header
//! says; nobody uses that space until a grower records it, and the next growth reserves it
//! again (a no-op) and records it. On a filesystem without `fallocate`, zeros are written
//! instead, under the file-wide grow lock (writing zeros must not race with records).

use std::io;

use crate::error::StoreError;
use crate::layout::*;
use crate::store::Shared;
use crate::sys::{self, LockKind};

impl Shared {
    /// Makes sure the file is at least `len` bytes, reserving the space on disk. False if the
    /// disk is full.
    pub(crate) fn ensure_len(&self, len: u64) -> Result<bool, StoreError> {
        if self.map.in_file(0, len) {
            return Ok(true);
        }
        let current = self.map.file_len();
        if current >= len {
            return Ok(true);
        }
        // Grow by a quarter of the data area (between 4 and 64 MiB), so growth is rare but a
        // small store stays small.
        let data = current.saturating_sub(self.g.data_off);
        let step = (data / 4).clamp(4 * CHUNK_LEN, 64 * CHUNK_LEN);
        let mut target = len.max(current + step).min(self.g.max_len);
        loop {
            match self.reserve(current, target) {
                Ok(()) => break,
                Err(e) if is_no_space(&e) && target > len => target = len,
                Err(e) if is_no_space(&e) => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
        failpoint!("grow.reserved");
        self.map.max_u64(H_FILE_LEN as u64, target);
        self.map.note_file_len(target);
        self.mark_metadata();
        tracing::debug!(from = current, to = target, "session store file grown");
        Ok(true)
    }

    fn reserve(&self, from: u64, to: u64) -> io::Result<()> {
        if sys::fallocate(&self.file, from, to - from)? {
            return Ok(());
        }
        let _in_process = self.grow.lock().unwrap_or_else(|p| p.into_inner());
        sys::lock(&self.file, LOCK_GROW, LockKind::Exclusive)?;
        // Under the lock, nobody else writes zeros; only bytes beyond the recorded length are
        // written (never a byte that holds data).
        let recorded = self.map.file_len();
        let result = if recorded >= to {
            Ok(())
        } else {
            sys::reserve_by_writing(&self.file, recorded.max(from), to - recorded.max(from))
        };
        let _ = sys::unlock(&self.file, LOCK_GROW);
        result
    }
}

fn is_no_space(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull
        || matches!(
            e.raw_os_error(),
            Some(libc::ENOSPC) | Some(libc::EFBIG) | Some(libc::EDQUOT)
        )
}
