//! A process-local cache of access grants, so that repeated reads of a token
//! that is valid beyond its refresh window do not touch the database.
//!
//! Correctness rests on these rules:
//! - **Invalidation.** Every host's writes reach every cache: this process's
//!   own writes invalidate at once (in [`crate::storage::Store`]); on
//!   Postgres other hosts' through `NOTIFY`, sent by a trigger on every
//!   change of a row and delivered to this process's listening connection;
//!   on SQLite through the file's change counter (below).
//! - **Freshness of the listener** (Postgres). The listener sends itself a heartbeat
//!   notification every [`HEARTBEAT`]. Notifications arrive in commit order,
//!   so once a heartbeat comes back, every change committed before it was
//!   sent has been applied. The cache serves only while the last heartbeat
//!   that came back was sent less than [`STALENESS_BOUND`] ago: a change
//!   another host committed earlier than that is never answered from here,
//!   however the listener's connection fails (closed, black-holed, slow).
//! - **A change counter** (SQLite). Every process shares one database file,
//!   which counts the commits of other connections (`PRAGMA data_version`):
//!   every read of the cache asks it first and starts over if it moved, so
//!   a change committed before the read began is never answered from here.
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

/// A number that moves whenever another connection commits to the
/// database (all of this process's other connections included).
pub trait ChangeCounter: Send + Sync {
    /// None when it cannot be read: then nothing is served.
    fn read(&self) -> Option<i64>;
}

/// The grants of one process, and what it knows of the listener.
pub struct GrantCache {
    entries: Mutex<Entries>,
    /// Bumped by every invalidation: a fill that began before one is dropped.
    epoch: AtomicU64,
    /// When (nanoseconds after `origin`) the last heartbeat that came back
    /// was sent; 0 while none has.
    confirmed: AtomicU64,
    origin: Instant,
    /// Asked at every read instead of a listener, where there is one.
    counter: Option<Box<dyn ChangeCounter>>,
}

/// The grants, and the change count they were kept under.
#[derive(Default)]
struct Entries {
    grants: HashMap<RowKey, AccessGrant>,
    counted: Option<i64>,
}

impl std::fmt::Debug for GrantCache {
    // Not derived: the entries name users.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrantCache")
            .field("grants", &self.len())
            .field("listening", &self.listening())
            .field("counting", &self.counter.is_some())
            .finish()
    }
}

impl Default for GrantCache {
    /// A cache kept current by a listener ([`GrantCache::confirm`]).
    fn default() -> Self {
        Self {
            entries: Mutex::default(),
            epoch: AtomicU64::new(0),
            confirmed: AtomicU64::new(0),
            origin: Instant::now(),
            counter: None,
        }
    }
}

impl GrantCache {
    /// A cache that asks `counter` at every read whether anything changed.
    pub fn counting(counter: Box<dyn ChangeCounter>) -> Self {
        Self {
            counter: Some(counter),
            ..Self::default()
        }
    }

    fn entries(&self) -> MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the last heartbeat to come back was sent within the bound.
    fn listening(&self) -> bool {
        let confirmed = self.confirmed.load(Ordering::Acquire);
        confirmed != 0
            && self.nanos(Instant::now()).saturating_sub(confirmed) < nanos(STALENESS_BOUND)
    }

    fn nanos(&self, at: Instant) -> u64 {
        nanos(at.saturating_duration_since(self.origin)).max(1)
    }

    /// The grant for (provider, user), if one is kept and `now` is outside
    /// its refresh window (`threshold` as the provider configures it).
    pub fn get(
        &self,
        provider: &str,
        user_id: &str,
        now: i64,
        threshold: u32,
    ) -> Option<AccessGrant> {
        // Asked before the lock is taken, compared under it: an older count
        // arriving late only starts the cache over once more.
        let count = match &self.counter {
            Some(counter) => Some(counter.read()?),
            None if self.listening() => None,
            None => return None,
        };
        let key = RowKey {
            provider: provider.to_string(),
            user_id: user_id.to_string(),
        };
        let mut entries = self.entries();
        if count.is_some() && entries.counted != count {
            self.epoch.fetch_add(1, Ordering::AcqRel);
            entries.grants.clear();
            entries.counted = count;
            return None;
        }
        let grant = entries.grants.get(&key)?;
        if tokenkeep_core::validity::needs_refresh(
            grant.obtained_at,
            grant.expires_at,
            now,
            threshold,
        ) {
            entries.grants.remove(&key);
            return None;
        }
        Some(grant.clone())
    }

    /// Taken before a read from the database that may fill the cache.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Keeps `grant`, read after [`GrantCache::epoch`] returned `epoch`,
    /// unless anything was invalidated since (or the listener is not heard).
    pub fn fill(&self, epoch: u64, grant: &AccessGrant) {
        let mut entries = self.entries();
        let heard = self.counter.is_some() || self.listening();
        if self.epoch.load(Ordering::Acquire) != epoch || !heard {
            return;
        }
        if entries.grants.len() >= CAPACITY {
            // Freed outside the lock: 100,000 grants take a while to drop.
            let full = std::mem::take(&mut entries.grants);
            drop(entries);
            drop(full);
            return;
        }
        entries.grants.insert(
            RowKey {
                provider: grant.provider.clone(),
                user_id: grant.user_id.clone(),
            },
            grant.clone(),
        );
    }

    /// Forgets one row (a change announced, or one of our own writes).
    pub fn invalidate(&self, provider: &str, user_id: &str) {
        let mut entries = self.entries();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        entries.grants.remove(&RowKey {
            provider: provider.to_string(),
            user_id: user_id.to_string(),
        });
    }

    /// Forgets every row (a truncate, or a change we cannot name).
    pub fn invalidate_all(&self) {
        let mut entries = self.entries();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        entries.grants.clear();
    }

    /// A heartbeat sent at `sent` came back.
    pub fn confirm(&self, sent: Instant) {
        self.confirmed.fetch_max(self.nanos(sent), Ordering::AcqRel);
    }

    /// The listener lost the database: nothing is served until a heartbeat
    /// comes back on a new connection, and nothing kept now is trusted then.
    pub fn deafen(&self) {
        self.confirmed.store(0, Ordering::Release);
        self.invalidate_all();
    }

    /// Grants kept now.
    pub fn len(&self) -> usize {
        self.entries().grants.len()
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

    /// A counter the test moves by hand.
    struct Count(std::sync::Arc<std::sync::atomic::AtomicI64>);

    impl ChangeCounter for Count {
        fn read(&self) -> Option<i64> {
            match self.0.load(Ordering::SeqCst) {
                -1 => None,
                n => Some(n),
            }
        }
    }

    #[test]
    fn a_counting_cache_starts_over_when_the_count_moves_and_serves_nothing_unread() {
        let count = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(7));
        let cache = GrantCache::counting(Box::new(Count(count.clone())));
        assert!(cache.get("acme", "u", 2_000, 60).is_none());
        cache.fill(cache.epoch(), &grant(None));
        assert!(cache.get("acme", "u", 2_000, 60).is_some());
        // Another connection committed: the next read starts over.
        let epoch = cache.epoch();
        count.store(8, Ordering::SeqCst);
        assert!(cache.get("acme", "u", 2_000, 60).is_none());
        assert!(cache.is_empty());
        // A read that began before the count moved fills nothing.
        cache.fill(epoch, &grant(None));
        assert!(cache.is_empty());
        cache.fill(cache.epoch(), &grant(None));
        assert!(cache.get("acme", "u", 2_000, 60).is_some());
        // A counter that cannot be read serves nothing.
        count.store(-1, Ordering::SeqCst);
        assert!(cache.get("acme", "u", 2_000, 60).is_none());
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
