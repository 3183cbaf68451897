//! Token events: the changes of a token's state that a platform acts on.
//!
//! What a write decides (a definitive refusal: `reauthorization-required`;
//! a new token over a refusal: `recovered`; a refresh of a token announced
//! `refresh-due`: `fresh`) is written to the outbox by the database itself,
//! in the transaction that changes the row (a trigger), whoever the writer.
//! What time decides (a refresh window opening: `refresh-due`; a refresh
//! token near its end: `refresh-token-expiring`; an access token expired
//! with nothing to refresh it: `reauthorization-required`) is announced by
//! the background refresher's scan, in one transaction with the row's
//! announced state, and only if the row is unchanged since the scan read
//! it: each change is one event, however many processes scan. Delivery
//! (signed webhooks) is `tokenkeep serve`'s; this is what it reads.

use tokenkeep_core::model::RowKey;

/// One event of the outbox. Never a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Increasing in the order the changes were written; events of one
    /// token are committed in this order (its row lock orders them).
    pub id: i64,
    /// Seconds since the epoch, the database's time.
    pub at: i64,
    pub provider: String,
    pub user_id: String,
    /// `fresh`, `refresh-due`, `refresh-token-expiring`,
    /// `reauthorization-required` or `recovered`.
    pub state: String,
    /// The failure class behind it, if any.
    pub reason: Option<String>,
    pub generation: u64,
    /// The conversations whose settings use the token.
    pub conversations: Vec<String>,
}

/// The state last announced for a stored row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announced {
    pub row: RowKey,
    pub generation: u64,
    /// `None`: nothing announced yet, which stands for [`FRESH`].
    pub state: Option<String>,
}

/// A state time decided, to be announced if the row is as the scan saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    pub row: RowKey,
    pub generation: u64,
    /// The announced state the scan saw.
    pub from: Option<String>,
    pub to: &'static str,
    pub reason: Option<String>,
}

/// The state a token is in until another is announced.
pub const FRESH: &str = "fresh";

/// How long a process may deliver a webhook's events before another may
/// take over (renewed before every delivery).
pub const LEASE_SECONDS: i64 = 60;
