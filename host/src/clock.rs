//! One clock for every host of a database.
//!
//! Expiry, due and validity decisions use the database's time: Postgres
//! reports it in the same round trip as the row it reads, and between reads
//! the host keeps the offset to its own clock. An embedded SQLite file has
//! one owner, whose clock is the database's. A host's own clock only decides
//! nothing; when it is off by more than the skew, that is logged once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use tokenkeep_core::validity::DEFAULT_CLOCK_SKEW_SECONDS;

/// A host's wall clock.
#[derive(Clone, Debug, Default)]
pub enum Clock {
    /// The machine's clock.
    #[default]
    System,
    /// The machine's clock off by a fixed number of seconds: a host whose
    /// clock is wrong (tests of the one-clock rule).
    Skewed(i64),
    /// A simulated time for a whole test world, moved by hand. It stands for
    /// every clock at once, the database's included, so that tests can
    /// cross expiry boundaries to the second on either backend.
    Manual(Arc<AtomicI64>),
}

impl Clock {
    /// A simulated clock frozen at `seconds` since the epoch until moved.
    pub fn manual(seconds: i64) -> Self {
        Clock::Manual(Arc::new(AtomicI64::new(seconds)))
    }

    /// Moves a manual clock by `seconds` (no-op on the others).
    pub fn advance(&self, seconds: i64) {
        if let Clock::Manual(t) = self {
            t.fetch_add(seconds, Ordering::SeqCst);
        }
    }

    /// Seconds since the epoch on this clock.
    pub fn now(&self) -> i64 {
        match self {
            Clock::System => system_now(),
            Clock::Skewed(offset) => system_now().saturating_add(*offset),
            Clock::Manual(t) => t.load(Ordering::SeqCst),
        }
    }

    fn is_manual(&self) -> bool {
        matches!(self, Clock::Manual(_))
    }
}

/// The machine's clock, seconds since the epoch.
pub(crate) fn system_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// The keeper's clock: the database's time as last observed, carried forward
/// on the host's clock between observations.
#[derive(Debug)]
pub struct SharedClock {
    host: Clock,
    /// Database time minus host time, in seconds.
    offset: AtomicI64,
    warned: AtomicBool,
}

impl SharedClock {
    pub fn new(host: Clock) -> Self {
        Self {
            host,
            offset: AtomicI64::new(0),
            warned: AtomicBool::new(false),
        }
    }

    /// The shared time given the database's own reading, if it gave one
    /// (SQLite does not: its owner's clock is the database's).
    pub fn observe(&self, database_now: Option<i64>) -> i64 {
        let Some(db) = database_now.filter(|_| !self.host.is_manual()) else {
            return self.now();
        };
        let offset = db.saturating_sub(self.host.now());
        self.offset.store(offset, Ordering::Relaxed);
        if offset.abs() > i64::from(DEFAULT_CLOCK_SKEW_SECONDS)
            && !self.warned.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                offset_seconds = offset,
                "this host's clock differs from the database's by more than the skew; \
                 tokenkeep uses the database's"
            );
        }
        db
    }

    /// The shared time now, without a round trip.
    pub fn now(&self) -> i64 {
        self.host
            .now()
            .saturating_add(self.offset.load(Ordering::Relaxed))
    }
}

/// The component's `wasi:clocks/wall-clock` tells the shared time too, so
/// nothing in the sandbox can read a host's own clock by another route.
pub(crate) struct WasiWallClock(pub Arc<crate::sandbox::Shared>);

impl wasmtime_wasi::HostWallClock for WasiWallClock {
    fn resolution(&self) -> std::time::Duration {
        std::time::Duration::from_secs(1)
    }

    fn now(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::try_from(self.0.store.now()).unwrap_or_default())
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days, proleptic Gregorian).
pub fn utc(ts: i64) -> String {
    let days = ts.div_euclid(86_400);
    let secs = ts.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_reading_wins_and_carries_forward() {
        let clock = SharedClock::new(Clock::Skewed(900));
        let db = system_now();
        assert_eq!(clock.observe(Some(db)), db);
        assert!((clock.now() - db).abs() <= 1, "carried on the host clock");
        assert!(clock.warned.load(Ordering::Relaxed), "15 minutes is logged");
    }

    #[test]
    fn a_manual_clock_stands_for_every_clock() {
        let manual = Clock::manual(1_000);
        let clock = SharedClock::new(manual.clone());
        assert_eq!(clock.observe(Some(5_000)), 1_000);
        manual.advance(5);
        assert_eq!(clock.now(), 1_005);
    }
}
