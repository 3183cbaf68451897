//! A process-local cache of access grants, so that repeated reads of a token
//! that is valid beyond its refresh window do not touch the database.
//!
//! Correctness rests on three rules:
//! - **Invalidation.** Every host's writes reach every cache: this process's
//!   own writes invalidate at once (in [`crate::storage::Store`]); other
//!   hosts' through Postgres `NOTIFY`, sent by a trigger on every change of
//!   a row and delivered to this process's listening connection.
//! - **Freshness of the listener.** The listener sends itself a heartbeat
//!   notification every [`HEARTBEAT`]. Notifications arrive in commit order,
//!   so once a heartbeat comes back, every change committed before it was
//!   sent has been applied. The cache serves only while the last heartbeat
//!   that came back was sent less than [`STALENESS_BOUND`] ago: a change
//!   another host committed earlier than that is never answered from here,
//!   however the listener's connection fails (closed, black-holed, slow).
//! - **No stale fills.** A grant read from the database is kept only if no
//!   invalidation of any row happened since the read began ([`GrantCache::epoch`]).
//!
//! Grants are served only outside their refresh window, by the component's
//! own rule ([`tokenkeep_core::validity::needs_refresh`]), so a due token
//! always goes to the database and is refreshed there.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokenkeep_core::model::{AccessGrant, RowKey};

/// How often the listener proves it is still hearing the database.
pub const HEARTBEAT: Duration = Duration::from_millis(200);

/// A change another host committed longer ago than this is never served
/// from a cache: the documented bound (README, "The grant cache").
pub const STALENESS_BOUND: Duration = Duration::from_secs(1);

/// Grants kept at most; a full cache starts over (the busiest tokens are
/// back after one read each).
const CAPACITY: usize = 100_000;

/// The grants of one process, and what it knows of the listener.
pub struct GrantCache {
    entries: Mutex<HashMap<RowKey, AccessGrant>>,
    /// Bumped by every invalidation: a fill that began before one is dropped.
    epoch: AtomicU64,
    /// When (nanoseconds after `origin`) the last heartbeat that came back
    /// was sent; 0 while none has.
    confirmed: AtomicU64,
    origin: Instant,
}

impl std::fmt::Debug for GrantCache {
    // Not derived: the entries name users.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrantCache")
            .field("grants", &self.len())
            .field("listening", &self.listening())
            .finish()
    }
}

impl Default for GrantCache {
    fn default() -> Self {
        Self {
            entries: Mutex::default(),
            epoch: AtomicU64::new(0),
            confirmed: AtomicU64::new(0),
            origin: Instant::now(),
        }
    }
}

impl GrantCache {
    fn entries(&self) -> MutexGuard<'_, HashMap<RowKey, AccessGrant>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the listener has been heard within the bound.
    fn listening(&self) -> bool {
        let confirmed = self.confirmed.load(Ordering::Acquire);
        confirmed != 0
            && self.nanos(Instant::now()).saturating_sub(confirmed) < nanos(STALENESS_BOUND)
    }

    fn nanos(&self, at: Instant) -> u64 {
        // Never 0, which means "not heard".
        nanos(at.saturating_duration_since(self.origin)).max(1)
    }

    /// The grant for a row, if one is kept, the listener is current and the
    /// grant is outside its refresh window at `now` (the shared clock).
    pub fn get(
        &self,
        provider: &str,
        user_id: &str,
        now: i64,
        threshold: u32,
    ) -> Option<AccessGrant> {
        if !self.listening() {
            return None;
        }
        let key = RowKey {
            provider: provider.to_string(),
            user_id: user_id.to_string(),
        };
        let mut entries = self.entries();
        let grant = entries.get(&key)?;
        if tokenkeep_core::validity::needs_refresh(
            grant.obtained_at,
            grant.expires_at,
            now,
            threshold,
        ) {
            // Due: the database decides from here on; kept no longer.
            entries.remove(&key);
            return None;
        }
        Some(grant.clone())
    }

    /// Take before reading the row a fill will come from.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Keeps `grant` unless anything was invalidated since `epoch` was taken.
    pub fn fill(&self, epoch: u64, grant: &AccessGrant) {
        let mut entries = self.entries();
        // Checked under the lock that invalidations take: an invalidation
        // either happened before (the epoch moved) or removes this entry.
        if self.epoch.load(Ordering::Acquire) != epoch || !self.listening() {
            return;
        }
        if entries.len() >= CAPACITY {
            // Freed after the lock is released, not on the hot path's time.
            let full = std::mem::take(&mut *entries);
            drop(entries);
            drop(full);
            return;
        }
        entries.insert(
            RowKey {
                provider: grant.provider.clone(),
                user_id: grant.user_id.clone(),
            },
            grant.clone(),
        );
    }

    /// A row changed (or may have): forget it, and drop fills in flight.
    pub fn invalidate(&self, provider: &str, user_id: &str) {
        let mut entries = self.entries();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        entries.remove(&RowKey {
            provider: provider.to_string(),
            user_id: user_id.to_string(),
        });
    }

    /// Anything may have changed (the listener reconnected, a change too
    /// large to name, a truncate): forget everything.
    pub fn invalidate_all(&self) {
        let mut entries = self.entries();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        entries.clear();
    }

    /// A heartbeat sent at `sent` came back: every change committed before
    /// then has been applied.
    pub fn confirm(&self, sent: Instant) {
        self.confirmed.fetch_max(self.nanos(sent), Ordering::AcqRel);
    }

    /// The listener lost the database: nothing is served until it is back
    /// and heard again.
    pub fn deafen(&self) {
        self.confirmed.store(0, Ordering::Release);
        self.invalidate_all();
    }

    /// Grants kept now.
    pub fn len(&self) -> usize {
        self.entries().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(expires_at: Option<i64>) -> AccessGrant {
        AccessGrant {
            provider: "acme".into(),
            user_id: "u".into(),
            access_token: "at".to_string().into(),
            expires_at,
            scopes: vec![],
            obtained_at: 1_000,
            generation: 1,
        }
    }

    fn heard() -> GrantCache {
        let cache = GrantCache::default();
        cache.confirm(Instant::now());
        cache
    }

    #[test]
    fn nothing_is_served_before_the_listener_is_heard() {
        let cache = GrantCache::default();
        cache.fill(cache.epoch(), &grant(None));
        assert!(cache.is_empty());
        let cache = heard();
        cache.fill(cache.epoch(), &grant(None));
        assert!(cache.get("acme", "u", 2_000, 60).is_some());
        cache.deafen();
        assert!(cache.get("acme", "u", 2_000, 60).is_none());
    }

    #[test]
    fn a_grant_inside_its_refresh_window_is_not_served() {
        let cache = heard();
        // Issued at 1000 for an hour: the window is 600 s under a 600 s threshold.
        cache.fill(cache.epoch(), &grant(Some(4_600)));
        assert!(cache.get("acme", "u", 3_999, 600).is_some());
        assert!(cache.get("acme", "u", 4_000, 600).is_none());
    }

    #[test]
    fn a_fill_that_began_before_an_invalidation_is_dropped() {
        let cache = heard();
        let epoch = cache.epoch();
        cache.invalidate("other", "row");
        cache.fill(epoch, &grant(None));
        assert!(cache.get("acme", "u", 2_000, 60).is_none());
        cache.fill(cache.epoch(), &grant(None));
        cache.invalidate("acme", "u");
        assert!(cache.get("acme", "u", 2_000, 60).is_none());
    }
}
