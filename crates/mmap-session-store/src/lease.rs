//! The busy lease on one key: the guard through which a record is read and replaced.

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use crate::error::StoreError;
use crate::index::KeyHash;
use crate::layout::{holder, state_block, E_STATE, REF_UNIT, R_EXPIRES};
#[cfg(feature = "tokio")]
use crate::layout::{state_token, TOKEN_WAITERS};
use crate::open::now_ms;
use crate::record::ReadOutcome;
use crate::store::{time_to_ms, Record, Store};

/// The busy lease on one key. While it is held, no other process, thread or task can lease the
/// key; lock-free readers ([`Store::get`]) still see the last committed value.
///
/// Dropping the lease releases it without changing anything. A lease that was taken over (held
/// past the lease timeout of a waiting process) can no longer commit: [`Lease::commit`] and
/// [`Lease::remove`] then return [`StoreError::LeaseLost`] and change nothing.
#[derive(Debug)]
pub struct Lease {
    store: Store,
    state_off: u64,
    token: u32,
    key: KeyHash,
    released: bool,
}

impl Lease {
    pub(crate) fn new(store: Store, pos: u64, token: u32, key: KeyHash) -> Lease {
        let state_off = store.shared.entry_off(pos) + E_STATE;
        Lease::from_parts(store, state_off, token, key)
    }

    /// A lease on the state word at `state_off` held by `token` (also used to pass a lease on
    /// to another task of this process, with the same token).
    pub(crate) fn from_parts(store: Store, state_off: u64, token: u32, key: KeyHash) -> Lease {
        Lease {
            store,
            state_off,
            token,
            key,
            released: false,
        }
    }

    /// Forgets this guard without releasing: its token was passed on or back.
    #[cfg(feature = "tokio")]
    pub(crate) fn disarm(mut self) {
        self.released = true;
    }

    /// The committed value, copied out of the file; `None` if there is none, it has expired, or
    /// it fails verification (logged and counted).
    pub fn read(&self) -> Option<Record> {
        let s = &self.store.shared;
        let state = s.map.load_u64(self.state_off, Ordering::Acquire)?;
        let block = state_block(state);
        if block == 0 {
            return None;
        }
        match s.read_record(block, &self.key) {
            ReadOutcome::Found(r) => Some(r),
            ReadOutcome::Expired => None,
            ReadOutcome::Invalid(reason) => {
                s.report_invalid(&self.key, reason);
                None
            }
        }
    }

    /// Replaces the record with `value`, expiring at `expires_at`. The new bytes are written to
    /// a fresh block and published with one atomic store, so readers (and a crash at any point)
    /// see either the old record or the new one, never a mix.
    ///
    /// With [`crate::Durability::OnCommit`] this returns once the new record is on the disk;
    /// [`StoreError::Sync`] says whether a failure to get it there left it published.
    pub fn commit(&mut self, value: &[u8], expires_at: SystemTime) -> Result<(), StoreError> {
        let s = &self.store.shared;
        s.check_not_forked()?;
        self.check_held()?;
        let block = s.write_record(&self.key, value, time_to_ms(expires_at))?;
        let old = match s
            .sync_before_publish()
            .and_then(|()| s.swap_record(self.state_off, self.token, block))
        {
            Ok(old) => old,
            Err(e) => {
                s.free_block(block);
                return Err(e);
            }
        };
        let synced = s.after_publish(self.state_off, block);
        s.retire(block, old);
        s.sweep(4);
        synced
    }

    /// Deletes the record. The key stays leased until the guard is released.
    ///
    /// With [`crate::Durability::OnCommit`] this returns once the removal is on the disk.
    pub fn remove(&mut self) -> Result<(), StoreError> {
        let s = &self.store.shared;
        s.check_not_forked()?;
        self.check_held()?;
        let old = s.swap_record(self.state_off, self.token, 0)?;
        let synced = s.after_publish(self.state_off, 0);
        s.retire(0, old);
        synced
    }

    /// Whether this lease still holds its key (false once taken over by another holder).
    pub fn is_held(&self) -> bool {
        self.check_held().is_ok()
    }

    fn check_held(&self) -> Result<(), StoreError> {
        match self
            .store
            .shared
            .map
            .load_u64(self.state_off, Ordering::Acquire)
        {
            Some(state) if holder(state) == self.token => Ok(()),
            _ => Err(StoreError::LeaseLost),
        }
    }

    /// Releases the lease without changing the record (the same as dropping it).
    pub fn release(mut self) {
        self.release_now();
    }

    fn release_now(&mut self) {
        if std::mem::replace(&mut self.released, true) {
            return;
        }
        let s = &self.store.shared;
        if s.check_not_forked().is_err() {
            return; // a forked child's copy: the lease is its parent's to release
        }
        #[cfg(feature = "tokio")]
        if s.local.pending() {
            // Pass the lease straight to a task of this process, unless another process waits.
            let state = s.map.load_u64(self.state_off, Ordering::Acquire);
            let others_wait = state.is_none_or(|st| state_token(st) & TOKEN_WAITERS != 0);
            if !others_wait
                && state.is_some_and(|st| holder(st) == self.token)
                && s.local
                    .hand_over(&self.store, self.state_off, self.token, self.key)
            {
                return;
            }
        }
        // An expired record found under the lease is reclaimed on the way out.
        if let Some(state) = s.map.load_u64(self.state_off, Ordering::Acquire) {
            let block = state_block(state);
            if holder(state) == self.token && block != 0 && s.block_class(block).is_some() {
                let expires = s
                    .map
                    .load_u64(block as u64 * REF_UNIT + R_EXPIRES, Ordering::Relaxed);
                if expires.is_some_and(|e| e <= now_ms())
                    && s.publish(self.state_off, self.token, 0).is_ok()
                {
                    s.count(crate::layout::S_EXPIRED, 1);
                    crate::metrics::expired_reclaimed();
                }
            }
        }
        // A key without a record gives its entry up, for inserts to reuse.
        s.give_up_key(self.state_off, self.token);
        s.release_word(self.state_off, self.token);
        #[cfg(feature = "tokio")]
        {
            std::sync::atomic::fence(Ordering::SeqCst);
            if s.local.pending() {
                s.local.after_release(&self.store, &self.key);
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.release_now();
    }
}
