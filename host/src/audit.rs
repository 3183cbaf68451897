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
/// Entries held while the database does not take them, or waiting for
/// the writer when reads outpace it; beyond this the oldest pending are
/// dropped, or new ones are not queued (counted, and warned of).
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

enum Message {
    Entry(Entry),
    Flush(oneshot::Sender<()>),
}

/// The writer's end: cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    sender: mpsc::Sender<Message>,
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
        tokio::spawn(write(shared.clone(), receiver, retention));
        Self {
            sender,
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
        let sent = self.sender.try_send(Message::Entry(Entry {
            id: 0,
            at: self.shared.store.now(),
            caller: caller.to_string(),
            action,
            provider: provider.to_string(),
            user_id: user_id.to_string(),
            generation,
            outcome: outcome.to_string(),
        }));
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

    /// Waits until every entry recorded before this call is written (or
    /// the writer gave up on the database).
    pub async fn flush(&self) {
        let (done, written) = oneshot::channel();
        if self.sender.send(Message::Flush(done)).await.is_ok() {
            let _ = written.await;
        }
    }
}

/// The writer: batches entries and writes them, holding them (bounded)
/// while the database does not take them.
async fn write(
    shared: Arc<Shared>,
    mut receiver: mpsc::Receiver<Message>,
    retention: Option<Duration>,
) {
    let store = &shared.store;
    let mut pending: Vec<Entry> = Vec::new();
    let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
    let mut dropped: u64 = 0;
    let mut failures: u32 = 0;
    let mut pruned_at: Option<std::time::Instant> = None;
    let mut open = true;
    while open || !pending.is_empty() {
        // Nothing pending: wait for something to write.
        if pending.is_empty() {
            match receiver.recv().await {
                Some(m) => take(m, &mut pending, &mut waiting),
                None => open = false,
            }
        }
        // Gather a batch: up to its size, its time, or a flush request.
        let deadline = tokio::time::Instant::now() + FLUSH_EVERY;
        while open && pending.len() < BATCH && waiting.is_empty() {
            match tokio::time::timeout_at(deadline, receiver.recv()).await {
                Ok(Some(m)) => take(m, &mut pending, &mut waiting),
                Ok(None) => open = false,
                Err(_) => break,
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
                    if pending.len() > HOLD_AT_MOST {
                        let over = pending.len() - HOLD_AT_MOST;
                        pending.drain(..over);
                        dropped += over as u64;
                        tracing::warn!(
                            dropped,
                            "audit entries dropped: the database does not take them"
                        );
                    }
                    if !open {
                        return;
                    }
                    // Flushes are answered all the same: no caller waits
                    // on an outage.
                    for done in waiting.drain(..) {
                        let _ = done.send(());
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

fn take(m: Message, pending: &mut Vec<Entry>, waiting: &mut Vec<oneshot::Sender<()>>) {
    match m {
        Message::Entry(e) => pending.push(e),
        Message::Flush(done) => waiting.push(done),
    }
}
