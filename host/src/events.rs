//! Token events: a change of a token's state that a platform must act on
//! (its user must authorise again; a new authorisation recovered it),
//! written to an outbox table by the database itself, in the transaction
//! that changes the row (a trigger), whoever the writer. Delivery (signed
//! webhooks) is `tokenkeep serve`'s; this is what it reads.

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
    /// `reauthorization-required` or `recovered`.
    pub state: String,
    /// The failure class that caused it, for `reauthorization-required`.
    pub reason: Option<String>,
    pub generation: u64,
    /// The conversations whose settings use the token.
    pub conversations: Vec<String>,
}

/// How long a process may deliver a webhook's events before another may
/// take over (renewed before every delivery).
pub const LEASE_SECONDS: i64 = 60;
