//! The shared mapping, reached only through bounds-checked atomics and byte copies.
//!
//! This module and `sys` hold all of the crate's `unsafe`. The rule they keep: no Rust reference
//! (`&[u8]`, `&T`) ever points into the mapping, because other processes write it at any time.
//! Words that processes share are read and written only as atomics; record bytes are copied in
//! or out, and a copy that may race with a writer is validated by the caller (checksum and a
//! re-read of the state word) before it is believed.

#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

use memmap2::{MmapOptions, MmapRaw};

use crate::layout::{HEADER_LEN, H_FILE_LEN};

/// How a futex wait ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wake {
    /// A `wake` (or a spurious wake-up) ended it.
    Woken,
    /// The timeout passed.
    TimedOut,
    /// The word no longer held the expected value, or a signal interrupted the wait.
    Changed,
}

/// A shared mapping of `len` bytes of the store file. Only the first `file_len()` bytes are
/// backed by the file; every access is checked against that length before it is made, so an
/// offset read from a corrupt or hostile file can never touch memory outside the file.
pub(crate) struct Map {
    raw: MmapRaw,
    len: u64,
    /// The mapped file, to check a length read from the header against the real one.
    file: File,
    /// This process's view of the file length; refreshed from the header when an access falls
    /// beyond it (another process may have grown the file).
    known_len: AtomicU64,
}

impl std::fmt::Debug for Map {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Map")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl Map {
    /// Maps `len` bytes of `file` (address space for the largest size the file may grow to).
    /// `file_len` is the file's current length, at least one header page.
    pub(crate) fn new(file: &File, len: u64, file_len: u64) -> io::Result<Map> {
        if file_len < HEADER_LEN || file_len > len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "file length outside the mapping",
            ));
        }
        let map_len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mapping too large"))?;
        let raw = MmapOptions::new().len(map_len).map_raw(file)?;
        let file = file.try_clone()?;
        Ok(Map {
            raw,
            len,
            file,
            known_len: AtomicU64::new(file_len),
        })
    }

    /// The file length as the header says now (at least as large as any length seen before).
    /// A larger length is believed only as far as the file really is that long: the header is
    /// shared memory that a bug or an attacker may have scribbled on, and touching a page beyond
    /// the end of the file would kill the process with SIGBUS.
    pub(crate) fn file_len(&self) -> u64 {
        let from_header = self.header_file_len();
        let known = self.known_len.load(Ordering::Relaxed);
        if from_header <= known {
            return known;
        }
        // Growth reserves the space (the file grows) before it publishes the new length.
        let real = self.file.metadata().map_or(known, |m| m.len());
        let len = from_header.min(real).min(self.len);
        self.known_len.fetch_max(len, Ordering::Relaxed);
        len.max(known)
    }

    fn header_file_len(&self) -> u64 {
        // The header page is always backed (checked in `new`) and the offset is aligned.
        let ptr = self.raw.as_mut_ptr().wrapping_add(H_FILE_LEN).cast::<u64>();
        // SAFETY: `H_FILE_LEN + 8 <= HEADER_LEN <= file length`, so the word is inside the mapped,
        // file-backed range; it is 8-byte aligned (the mapping is page aligned); every process
        // accesses this word only atomically, so an atomic view of it is sound.
        let word = unsafe { AtomicU64::from_ptr(ptr) };
        word.load(Ordering::Acquire)
    }

    /// Records a new file length after this process grew the file.
    pub(crate) fn note_file_len(&self, len: u64) {
        self.known_len
            .fetch_max(len.min(self.len), Ordering::Relaxed);
    }

    /// Writes the changed pages of `off..off + len` (clipped to the file) to the disk and waits
    /// for them (`msync` with `MS_SYNC`, which the kernel may widen to more of the file).
    pub(crate) fn sync(&self, off: u64, len: u64) -> io::Result<()> {
        let end = off.saturating_add(len).min(self.file_len());
        if off >= end {
            return Ok(());
        }
        let (Ok(off), Ok(len)) = (usize::try_from(off), usize::try_from(end - off)) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range too large",
            ));
        };
        self.raw.flush_range(off, len)
    }

    /// Checks that `off..off+n` lies inside the file-backed part of the mapping.
    #[inline]
    pub(crate) fn in_file(&self, off: u64, n: u64) -> bool {
        let Some(end) = off.checked_add(n) else {
            return false;
        };
        end <= self.known_len.load(Ordering::Relaxed) || end <= self.file_len()
    }

    #[inline]
    fn checked_ptr(&self, off: u64, n: u64, align: u64) -> Option<*mut u8> {
        if off % align != 0 || !self.in_file(off, n) {
            return None;
        }
        let off = usize::try_from(off).ok()?;
        Some(self.raw.as_mut_ptr().wrapping_add(off))
    }

    /// Atomically loads the `u64` at `off`; `None` if `off` is misaligned or outside the file.
    #[inline]
    pub(crate) fn load_u64(&self, off: u64, order: Ordering) -> Option<u64> {
        let ptr = self.checked_ptr(off, 8, 8)?;
        // SAFETY: `checked_ptr` proved the 8 bytes are inside the file-backed mapping and 8-byte
        // aligned; shared words are only ever accessed atomically by every process, and an
        // `AtomicU64` is interior-mutable, so concurrent writes by others are not UB.
        let word = unsafe { AtomicU64::from_ptr(ptr.cast::<u64>()) };
        Some(word.load(order))
    }

    /// Atomically stores `value` at `off`; false if `off` is misaligned or outside the file.
    #[inline]
    pub(crate) fn store_u64(&self, off: u64, value: u64, order: Ordering) -> bool {
        let Some(ptr) = self.checked_ptr(off, 8, 8) else {
            return false;
        };
        // SAFETY: as in `load_u64`.
        let word = unsafe { AtomicU64::from_ptr(ptr.cast::<u64>()) };
        word.store(value, order);
        true
    }

    /// Compare-and-swap of the `u64` at `off`. `Err(None)` if `off` is out of bounds,
    /// `Err(Some(actual))` if the word did not hold `current`.
    #[inline]
    pub(crate) fn cas_u64(&self, off: u64, current: u64, new: u64) -> Result<u64, Option<u64>> {
        let ptr = self.checked_ptr(off, 8, 8).ok_or(None)?;
        // SAFETY: as in `load_u64`.
        let word = unsafe { AtomicU64::from_ptr(ptr.cast::<u64>()) };
        word.compare_exchange(current, new, Ordering::AcqRel, Ordering::Acquire)
            .map_err(Some)
    }

    /// Atomically adds to the `u64` at `off` (wrapping); false if out of bounds.
    #[inline]
    pub(crate) fn add_u64(&self, off: u64, delta: u64) -> bool {
        let Some(ptr) = self.checked_ptr(off, 8, 8) else {
            return false;
        };
        // SAFETY: as in `load_u64`.
        let word = unsafe { AtomicU64::from_ptr(ptr.cast::<u64>()) };
        word.fetch_add(delta, Ordering::Relaxed);
        true
    }

    /// Atomically adds to the `u64` at `off` and returns the previous value.
    #[inline]
    pub(crate) fn fetch_add_u64(&self, off: u64, delta: u64) -> Option<u64> {
        let ptr = self.checked_ptr(off, 8, 8)?;
        // SAFETY: as in `load_u64`.
        let word = unsafe { AtomicU64::from_ptr(ptr.cast::<u64>()) };
        Some(word.fetch_add(delta, Ordering::Relaxed))
    }

    /// Atomically raises the `u64` at `off` to at least `value`.
    pub(crate) fn max_u64(&self, off: u64, value: u64) -> bool {
        let Some(ptr) = self.checked_ptr(off, 8, 8) else {
            return false;
        };
        // SAFETY: as in `load_u64`.
        let word = unsafe { AtomicU64::from_ptr(ptr.cast::<u64>()) };
        word.fetch_max(value, Ordering::AcqRel);
        true
    }

    /// Atomically loads the byte at `off`.
    pub(crate) fn load_u8(&self, off: u64) -> Option<u8> {
        let ptr = self.checked_ptr(off, 1, 1)?;
        // SAFETY: the byte is inside the file-backed mapping (checked); shared bytes of the chunk
        // table are accessed only atomically by every process.
        let byte = unsafe { AtomicU8::from_ptr(ptr) };
        Some(byte.load(Ordering::Acquire))
    }

    /// Atomically stores the byte at `off`; false if it is outside the file.
    pub(crate) fn store_u8(&self, off: u64, value: u8) -> bool {
        let Some(ptr) = self.checked_ptr(off, 1, 1) else {
            return false;
        };
        // SAFETY: as in `load_u8`.
        let byte = unsafe { AtomicU8::from_ptr(ptr) };
        byte.store(value, Ordering::Release);
        true
    }

    /// Compare-and-swap of the byte at `off`; true if it held `current` and now holds `new`.
    pub(crate) fn cas_u8(&self, off: u64, current: u8, new: u8) -> bool {
        let Some(ptr) = self.checked_ptr(off, 1, 1) else {
            return false;
        };
        // SAFETY: as in `load_u8`.
        let byte = unsafe { AtomicU8::from_ptr(ptr) };
        byte.compare_exchange(current, new, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Copies `dst.len()` bytes at `off` out of the mapping; false (and nothing copied) if the
    /// range is outside the file.
    ///
    /// The caller must treat the bytes as untrusted: if no lease protects them, another process
    /// may be writing them during the copy, and only a checksum tells a torn copy apart.
    #[inline]
    pub(crate) fn read(&self, off: u64, dst: &mut [u8]) -> bool {
        let Some(src) = self.checked_ptr(off, dst.len() as u64, 1) else {
            return false;
        };
        // SAFETY: the source range is inside the file-backed mapping (checked) and cannot overlap
        // `dst`, which is private memory of this process. No reference into the mapping is
        // formed: the bytes are copied through raw pointers, and bytes another process writes
        // concurrently can at worst arrive torn, which callers detect with the record checksum.
        unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len()) };
        true
    }

    /// Copies `len` bytes at `off` out of the mapping into a new vector (without zeroing it
    /// first); `None` if the range is outside the file. The same caveat as for `read` applies.
    #[inline]
    pub(crate) fn read_vec(&self, off: u64, len: usize) -> Option<Vec<u8>> {
        let src = self.checked_ptr(off, len as u64, 1)?;
        let mut out = Vec::with_capacity(len);
        // SAFETY: the source range is inside the file-backed mapping (checked); the destination
        // is the vector's own allocation of at least `len` bytes, which cannot overlap the map.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), len) };
        // SAFETY: the copy above initialised exactly the first `len` bytes of the allocation.
        unsafe { out.set_len(len) };
        Some(out)
    }

    /// Copies `src` into the mapping at `off`; false (and nothing written) if out of bounds.
    ///
    /// Callers write only into blocks they own: a block just taken from a free list, or the
    /// header of a record under their lease.
    #[inline]
    pub(crate) fn write(&self, off: u64, src: &[u8]) -> bool {
        let Some(dst) = self.checked_ptr(off, src.len() as u64, 1) else {
            return false;
        };
        // SAFETY: the destination is inside the file-backed mapping (checked; the space was
        // reserved with fallocate, so no SIGBUS) and cannot overlap `src`, private memory. No
        // reference into the mapping is formed.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
        true
    }

    /// Sleeps until the 32-bit word at `off` is woken by `wake`, stops holding `expected`, or
    /// `timeout` passes.
    pub(crate) fn wait(&self, off: u64, expected: u32, timeout: Duration) -> Wake {
        let Some(ptr) = self.checked_ptr(off, 4, 4) else {
            return Wake::Changed;
        };
        let ts = libc::timespec {
            tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // Make sure the compiler sees the word as atomic memory too.
        // SAFETY: as in `load_u64`, for a 4-byte aligned word inside the file.
        let _ = unsafe { AtomicU32::from_ptr(ptr.cast::<u32>()) }.load(Ordering::Acquire);
        // SAFETY: FUTEX_WAIT (without FUTEX_PRIVATE_FLAG, so it keys on the shared file page and
        // works across processes) reads the aligned word at `ptr`, which is mapped and in the
        // file; `ts` outlives the call; the kernel never writes through these pointers.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_futex,
                ptr.cast::<u32>(),
                libc::FUTEX_WAIT,
                expected,
                &ts as *const libc::timespec,
                std::ptr::null::<u32>(),
                0u32,
            )
        };
        if rc == 0 {
            Wake::Woken
        } else if io::Error::last_os_error().raw_os_error() == Some(libc::ETIMEDOUT) {
            Wake::TimedOut
        } else {
            Wake::Changed
        }
    }

    /// Wakes up to `n` waiters sleeping on the 32-bit word at `off`, in any process.
    pub(crate) fn wake(&self, off: u64, n: i32) {
        let Some(ptr) = self.checked_ptr(off, 4, 4) else {
            return;
        };
        // SAFETY: FUTEX_WAKE only uses the address as a key to find sleepers; it is mapped and
        // aligned. No memory is read or written through it.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                ptr.cast::<u32>(),
                libc::FUTEX_WAKE,
                n,
                std::ptr::null::<libc::timespec>(),
                std::ptr::null::<u32>(),
                0u32,
            );
        }
    }
}
