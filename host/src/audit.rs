//! The audit log: who read which token, and every refresh, store and
//! delete, kept in the database beside the tokens (never a secret).
//!
//! Entries are written in batches by a task of their own, so that a read
//! costs a channel send, not a database round trip: an entry reaches the
//! database within [`FLUSH_EVERY`] of the call, and [`crate::Keeper::shutdown`]
//! writes what is pending. A process killed outright loses at most the
//! entries of that last moment.

use crate::sandbox::Shared;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// How long an entry may wait for its batch.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// Most entries per batch.
const BATCH: usize = 500;
/// Entries queued for the writer (while reads outpace it, or the database
/// is away); beyond this new ones are dropped, counted and warned of.
const HOLD_AT_MOST: usize = 100_000;
/// Most entries per page of [`crate::Keeper::audit_page`].
pub const MAX_PAGE: u32 = 1000;

/// What was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// An access token was handed out.
    Read,
    /// A provider was asked for new tokens.
    Refresh,
    Store,
    Delete,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Read => "read",
            Action::Refresh => "refresh",
            Action::Store => "store",
            Action::Delete => "delete",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [Action::Read, Action::Refresh, Action::Store, Action::Delete]
            .into_iter()
            .find(|a| a.name() == name)
    }
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Assigned by the database; 0 until written.
    pub id: i64,
    /// Seconds since the epoch, on the keeper's clock.
    pub at: i64,
    /// Who asked: an API key's name, `cli`, or the library's caller name.
    pub caller: String,
    pub action: Action,
    pub provider: String,
    pub user_id: String,
    /// The token generation served or written, when there is one.
    pub generation: Option<u64>,
    /// `ok`, or the error class.
    pub outcome: String,
}

/// Which entries to read: all of them unless narrowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub provider: Option<String>,
    pub user_id: Option<String>,
    pub caller: Option<String>,
    /// At or after this time.
    pub since: Option<i64>,
    /// Before this time.
    pub until: Option<i64>,
    /// Entries after this id (the previous page's last).
    pub after_id: Option<i64>,
}

tokio::task_local! {
    static CALLER: Arc<str>;
}

/// Runs `work` with calls into the keeper attributed to `caller` (a
/// service's API key name) in the audit log.
pub async fn as_caller<F: Future>(caller: &str, work: F) -> F::Output {
    CALLER.scope(Arc::from(caller), work).await
}

/// The caller of the task, when one was named.
pub(crate) fn current_caller() -> Option<Arc<str>> {
    CALLER.try_with(Arc::clone).ok()
}

/// The writer's end: cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    sender: mpsc::Sender<Entry>,
    /// Flush requests, apart from the entries: answered even while the
    /// entries' queue is full or the database away.
    flushes: mpsc::UnboundedSender<oneshot::Sender<()>>,
    /// Entries not queued because the writer was [`HOLD_AT_MOST`] behind.
    dropped: Arc<std::sync::atomic::AtomicU64>,
    shared: Arc<Shared>,
    /// Who calls when no task names a caller.
    default_caller: Arc<str>,
}

impl AuditLog {
    /// Starts the writer over `store`; entries older than `retention` are
    /// pruned once an hour.
    pub(crate) fn start(
        shared: Arc<Shared>,
        default_caller: &str,
        retention: Option<Duration>,
    ) -> Self {
        let (sender, receiver) = mpsc::channel(HOLD_AT_MOST);
        let (flushes, flush_requests) = mpsc::unbounded_channel();
        tokio::spawn(write(shared.clone(), receiver, flush_requests, retention));
        Self {
            sender,
            flushes,
            dropped: Arc::default(),
            shared,
            default_caller: Arc::from(default_caller),
        }
    }

    /// Records one entry (sent to the writer; never waits).
    pub(crate) fn record(
        &self,
        action: Action,
        provider: &str,
        user_id: &str,
        generation: Option<u64>,
        outcome: &str,
    ) {
        self.record_as(
            current_caller(),
            action,
            provider,
            user_id,
            generation,
            outcome,
        );
    }

    /// [`AuditLog::record`] for a named caller (a task that outlived its
    /// caller's scope).
    pub(crate) fn record_as(
        &self,
        caller: Option<Arc<str>>,
        action: Action,
        provider: &str,
        user_id: &str,
        generation: Option<u64>,
        outcome: &str,
    ) {
        let caller = caller.unwrap_or_else(|| self.default_caller.clone());
        let sent = self.sender.try_send(Entry {
            id: 0,
            at: self.shared.store.now(),
            caller: caller.to_string(),
            action,
            provider: provider.to_string(),
            user_id: user_id.to_string(),
            generation,
            outcome: outcome.to_string(),
        });
        if let Err(mpsc::error::TrySendError::Full(_)) = sent {
            crate::metrics::audit_dropped();
            let before = self
                .dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if before.is_power_of_two() || before == 0 {
                tracing::warn!(
                    dropped = before + 1,
                    "audit entries dropped: reads outpace the audit writer"
                );
            }
        }
    }

    /// Waits until the entries recorded before this call are written, or
    /// the database refused a write meanwhile (they are kept for later),
    /// for `at_most`.
    pub async fn flush(&self, at_most: std::time::Duration) {
        let (done, written) = oneshot::channel();
        if self.flushes.send(done).is_ok() {
            let _ = tokio::time::timeout(at_most, written).await;
        }
    }
}

/// The writer: batches entries and writes them, holding a batch while the
/// database does not take it (the queue behind it is bounded).
async fn write(
    shared: Arc<Shared>,
    mut receiver: mpsc::Receiver<Entry>,
    mut flush_requests: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
    retention: Option<Duration>,
) {
    let store = &shared.store;
    let mut pending: Vec<Entry> = Vec::new();
    let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
    let mut failures: u32 = 0;
    let mut pruned_at: Option<std::time::Instant> = None;
    let mut open = true;
    while open || !pending.is_empty() {
        // Nothing pending: wait for an entry or a flush.
        if pending.is_empty() {
            tokio::select! {
                entry = receiver.recv() => match entry {
                    Some(e) => pending.push(e),
                    None => open = false,
                },
                Some(done) = flush_requests.recv() => waiting.push(done),
            }
        }
        // Gather a batch: up to its size or its time; a flush request
        // writes at once what has come before it.
        let deadline = tokio::time::Instant::now() + FLUSH_EVERY;
        while open && pending.len() < BATCH && waiting.is_empty() {
            tokio::select! {
                entry = receiver.recv() => match entry {
                    Some(e) => pending.push(e),
                    None => open = false,
                },
                Some(done) = flush_requests.recv() => waiting.push(done),
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        if !waiting.is_empty() {
            // Everything queued before the request.
            while let Ok(e) = receiver.try_recv() {
                pending.push(e);
            }
        }
        if !pending.is_empty() {
            match store.append_audit(&pending).await {
                Ok(()) => {
                    pending.clear();
                    failures = 0;
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 {
                        tracing::warn!("audit entries not written yet, held: {e}");
                    }
                    // Flushes are answered all the same: no caller waits
                    // on an outage.
                    for done in waiting.drain(..) {
                        let _ = done.send(());
                    }
                    if !open {
                        return;
                    }
                    tokio::time::sleep(FLUSH_EVERY * failures.min(25)).await;
                    continue;
                }
            }
        }
        // Before a flush is answered: a command that exits right after
        // leaves the log pruned.
        if let Some(keep) = retention
            && pruned_at.is_none_or(|at| at.elapsed() >= PRUNE_EVERY)
        {
            pruned_at = Some(std::time::Instant::now());
            let before = store.now() - i64::try_from(keep.as_secs()).unwrap_or(i64::MAX);
            match store.prune_audit(before).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(pruned = n, "audit entries past retention pruned"),
                Err(e) => tracing::warn!("audit pruning failed: {e}"),
            }
        }
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
    }
}

/// How often entries past the retention are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
