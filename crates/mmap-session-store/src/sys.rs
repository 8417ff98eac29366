//! The few system calls the store needs beyond `std`: open-file-description locks, space
//! reservation and the effective user id.
//!
//! OFD locks (`F_OFD_SETLK`) belong to the open file description, not to the process, and are
//! released by the kernel when the last descriptor of it closes, which includes the process
//! being killed. That is what lets one process learn, without anyone's help, that another died.
//! Classic `fcntl` locks are unusable here: closing *any* descriptor of the file drops them.

#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// What kind of lock to take on a byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LockKind {
    Shared,
    Exclusive,
}

fn flock_for(kind: Option<LockKind>, byte: i64) -> libc::flock {
    // SAFETY: `flock` is a plain C struct of integers; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = match kind {
        Some(LockKind::Shared) => libc::F_RDLCK as libc::c_short,
        Some(LockKind::Exclusive) => libc::F_WRLCK as libc::c_short,
        None => libc::F_UNLCK as libc::c_short,
    };
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    fl.l_pid = 0;
    fl
}

fn fcntl_lock(file: &File, cmd: libc::c_int, fl: &mut libc::flock) -> io::Result<()> {
    // SAFETY: `fl` is a valid, initialised `flock` that outlives the call, and the descriptor is
    // owned by `file`, which is open for the duration of the call.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), cmd, fl as *mut libc::flock) };
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Tries to lock one byte of `file` without waiting. `Ok(false)` if another open file
/// description holds a conflicting lock.
pub(crate) fn try_lock(file: &File, byte: i64, kind: LockKind) -> io::Result<bool> {
    let mut fl = flock_for(Some(kind), byte);
    match fcntl_lock(file, libc::F_OFD_SETLK, &mut fl) {
        Ok(()) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Locks one byte of `file`, waiting as long as it takes.
pub(crate) fn lock(file: &File, byte: i64, kind: LockKind) -> io::Result<()> {
    let mut fl = flock_for(Some(kind), byte);
    loop {
        match fcntl_lock(file, libc::F_OFD_SETLKW, &mut fl) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Releases a lock taken by `try_lock` or `lock`.
pub(crate) fn unlock(file: &File, byte: i64) -> io::Result<()> {
    let mut fl = flock_for(None, byte);
    fcntl_lock(file, libc::F_OFD_SETLK, &mut fl)
}

/// True if some other open file description holds a lock on `byte` (that is: the process that
/// registered that byte is alive). Locks held through `file` itself never count.
pub(crate) fn is_locked_by_other(file: &File, byte: i64) -> io::Result<bool> {
    let mut fl = flock_for(Some(LockKind::Exclusive), byte);
    fcntl_lock(file, libc::F_OFD_GETLK, &mut fl)?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Reserves disk (or tmpfs) space for `off..off+len`, growing the file if needed, so that later
/// writes through the mapping cannot fault with SIGBUS. `ErrorKind::StorageFull` when there is
/// no space. Writes zeros where the filesystem has no `fallocate`: callers that may race with
/// other growers use [`fallocate`] and serialise the fallback themselves.
pub(crate) fn reserve(file: &File, off: u64, len: u64) -> io::Result<()> {
    if fallocate(file, off, len)? {
        Ok(())
    } else {
        reserve_by_writing(file, off, len)
    }
}

/// `fallocate(2)` (mode 0: allocate and extend), retried when a signal interrupts it. False if
/// the filesystem does not support it. Concurrent calls over overlapping ranges are safe: each
/// only allocates, and the file only grows. (Not `posix_fallocate`: where the filesystem lacks
/// `fallocate`, glibc emulates it by reading and rewriting a byte per block, which races with
/// other processes writing records; the caller serialises its own fallback instead.)
pub(crate) fn fallocate(file: &File, off: u64, len: u64) -> io::Result<bool> {
    let (Ok(o), Ok(l)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "range too large",
        ));
    };
    loop {
        // SAFETY: plain system call on a descriptor owned by `file`; no pointers are passed.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, o, l) };
        if rc == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => return Ok(false),
            _ => return Err(e),
        }
    }
}

/// For filesystems without `fallocate`: write zeros, which allocates the blocks just as well.
pub(crate) fn reserve_by_writing(file: &File, off: u64, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let zeros = vec![0u8; 1 << 16];
    let mut done = 0;
    let current = file.metadata()?.len();
    while done < len {
        let at = off + done;
        let n = (len - done).min(zeros.len() as u64);
        // Never overwrite bytes that are already part of the file.
        if at + n > current {
            let start = at.max(current);
            let skip = (start - at) as usize;
            file.write_all_at(&zeros[..n as usize - skip], start)?;
        }
        done += n;
    }
    Ok(())
}

/// The effective user id of this process.
pub(crate) fn effective_uid() -> u32 {
    // SAFETY: `geteuid` has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// How many times this process is removed by `fork()` from the process that loaded this code:
/// 0 in the original process, 1 in a child, 2 in a grandchild. A `Store` remembers the value at
/// open and refuses leases in a forked child, which would share its parent's registration.
pub(crate) fn fork_generation() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Once;
    static GENERATION: AtomicU64 = AtomicU64::new(0);
    static REGISTER: Once = Once::new();
    extern "C" fn in_child() {
        GENERATION.fetch_add(1, Ordering::Relaxed);
    }
    REGISTER.call_once(|| {
        // SAFETY: registers a handler that only increments an atomic, which is async-signal
        // safe as `fork` requires of child handlers; the function lives for the whole program.
        let _ = unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
    });
    GENERATION.load(Ordering::Relaxed)
}

/// Test hook (only with the `failpoints` feature): runs `f` in a child forked from this
/// process, which then ends with `_exit(f())`; returns the child's exit code.
#[cfg(feature = "failpoints")]
pub(crate) fn in_forked_child(f: impl FnOnce() -> i32) -> io::Result<i32> {
    // SAFETY: the caller is a single-threaded test process; the child runs `f` and ends with
    // `_exit` (no destructor or atexit handler of the parent's state runs twice).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        let code = f();
        // SAFETY: ends the child at once; always sound.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for the child forked above; `status` outlives the call.
    if unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(libc::WEXITSTATUS(status))
}
