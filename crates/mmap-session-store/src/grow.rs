//! Growing the file: reserve the space on disk, then publish the new length.

use std::io;
use std::sync::atomic::Ordering;

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
        let _in_process = self.grow.lock().unwrap_or_else(|p| p.into_inner());
        sys::lock(&self.file, LOCK_GROW, LockKind::Exclusive)?;
        let result = self.grow_locked(len);
        let _ = sys::unlock(&self.file, LOCK_GROW);
        result
    }

    fn grow_locked(&self, len: u64) -> Result<bool, StoreError> {
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
            match sys::reserve(&self.file, current, target - current) {
                Ok(()) => break,
                Err(e) if is_no_space(&e) && target > len => target = len,
                Err(e) if is_no_space(&e) => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
        self.map
            .store_u64(H_FILE_LEN as u64, target, Ordering::Release);
        self.map.note_file_len(target);
        tracing::debug!(from = current, to = target, "session store file grown");
        Ok(true)
    }
}

fn is_no_space(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull
        || matches!(
            e.raw_os_error(),
            Some(libc::ENOSPC) | Some(libc::EFBIG) | Some(libc::EDQUOT)
        )
}
