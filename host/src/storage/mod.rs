//! Durable storage of sealed rows with row locks: Postgres for fleets of
//! runtimes, SQLite as the zero-setup default.
//!
//! Both keep the same columns ([`COLUMNS`], turned into rows by
//! [`StoredColumns`]); Postgres speaks through tokio-postgres, SQLite through
//! sqlx with the SQL of [`rows!`].

pub mod listener;
pub mod postgres;
pub mod sqlite;

use crate::audit;
use crate::clock::{Clock, SharedClock};
use crate::events;
use crate::grant_cache::GrantCache;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
pub use tokenkeep_core::model::{ConversationEntry, Health, RowKey, RowRead, SealedRow};

/// Storage failures (WIT `storage-error`, less `refused`: that is the
/// linker's verdict, not the database's).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StorageError {
    #[error("row lock not granted within the lock wait")]
    LockTimeout,
    #[error("{0}")]
    Unavailable(String),
    /// The connection broke or stopped answering mid-transaction: what the
    /// transaction did may or may not have reached the database.
    #[error("{0}")]
    ConnectionLost(String),
    /// The database was migrated by a newer tokenkeep: this one must not
    /// read or write rows whose meaning it may not know.
    #[error(
        "the database's schema is at version {found}, newer than this tokenkeep knows \
         ({known}): upgrade tokenkeep before using this database"
    )]
    SchemaTooNew { found: i64, known: i64 },
}

impl From<StorageError> for crate::Error {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::LockTimeout => crate::Error::LockTimeout,
            StorageError::Unavailable(m) | StorageError::ConnectionLost(m) => {
                crate::Error::Storage(m)
            }
            e @ StorageError::SchemaTooNew { .. } => crate::Error::Config(e.to_string()),
        }
    }
}

/// The last of a backend's migrations: the schema version this build knows.
pub(crate) fn latest_schema(migrations: &[(i64, &str)]) -> i64 {
    migrations.last().map_or(0, |(v, _)| *v)
}

/// A schema past `known` (a newer tokenkeep migrated it) is refused.
pub(crate) fn refuse_newer(current: Option<i64>, known: i64) -> Result<(), StorageError> {
    match current {
        Some(found) if found > known => Err(StorageError::SchemaTooNew { found, known }),
        _ => Ok(()),
    }
}

/// A row as a backend read it (none: no row) and the database's time, when
/// the database has a clock of its own.
pub type BackendRead = (Option<SealedRow>, Option<i64>);

/// How long a caller who need not wait (its token is still valid) waits
/// for a transaction connection: long enough to open one, not to queue
/// behind lock waiters that hold them all.
pub(crate) const TRY_ACQUIRE: Duration = Duration::from_secs(1);

/// A future a backend returns: boxed, so backends sit behind `dyn Backend`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A database that keeps sealed rows with row locks. The backend never sees
/// a plaintext token; reads report the database's time when it has its own
/// clock (`None`: the owning host's clock is the database's).
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// The database's time, when it has a clock of its own.
    fn database_now(&self) -> BoxFuture<'_, Result<Option<i64>, StorageError>>;
    /// The last committed row, unlocked, and the database's time.
    fn read<'a>(
        &'a self,
        provider: &'a str,
        user_id: &'a str,
    ) -> BoxFuture<'a, Result<BackendRead, StorageError>>;
    /// Up to `limit` rows after `after`, ordered by provider then user.
    fn list<'a>(
        &'a self,
        after: Option<&'a RowKey>,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<SealedRow>, StorageError>>;
    /// Rows per key id, counted by the database.
    fn rows_per_key(&self) -> BoxFuture<'_, Result<Vec<(String, u64)>, StorageError>>;
    /// Inserts `row` only if none exists (at the generation after a deleted
    /// row's); false when one does.
    fn insert<'a>(
        &'a self,
        row: &'a SealedRow,
        now: i64,
    ) -> BoxFuture<'a, Result<bool, StorageError>>;
    /// Inserts or replaces `row`; the generation written.
    fn upsert<'a>(
        &'a self,
        row: &'a SealedRow,
        now: i64,
    ) -> BoxFuture<'a, Result<u64, StorageError>>;
    /// Deletes a row, its refresh-start record and its proof key; false
    /// when there was no row.
    fn delete<'a>(
        &'a self,
        provider: &'a str,
        user_id: &'a str,
    ) -> BoxFuture<'a, Result<bool, StorageError>>;
    /// A grant cache kept current with every host's changes, and what
    /// keeps it so (a listener, for as long as the guard lives; none where
    /// the cache asks the database itself). A listener's heartbeats bring
    /// the database's time, for `clock`.
    fn grant_cache(
        &self,
        clock: Arc<SharedClock>,
    ) -> Result<(Arc<GrantCache>, Option<listener::AbortOnDrop>), StorageError>;
    /// The schema version this build migrates a database to (and refuses
    /// to run past).
    fn schema_version(&self) -> i64;
    /// A transaction whose row loads lock.
    fn begin(&self) -> BoxFuture<'_, Result<Box<dyn BackendTransaction>, StorageError>>;
    fn conversation_entries<'a>(
        &'a self,
        conversation_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ConversationEntry>, StorageError>>;
    fn put_conversation_entry<'a>(
        &'a self,
        entry: &'a ConversationEntry,
    ) -> BoxFuture<'a, Result<(), StorageError>>;
    /// Appends audit entries (the database numbers them), all or none.
    fn append_audit<'a>(
        &'a self,
        entries: &'a [audit::Entry],
    ) -> BoxFuture<'a, Result<(), StorageError>>;
    /// Audit entries matching `filter`, in the order they were written, at
    /// most `limit`.
    fn audit<'a>(
        &'a self,
        filter: &'a audit::Filter,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<audit::Entry>, StorageError>>;
    /// Deletes audit entries from before `before`: how many.
    fn prune_audit(&self, before: i64) -> BoxFuture<'_, Result<u64, StorageError>>;
    /// The connections of the pools that serve reads and transactions.
    fn pool_use(&self) -> crate::metrics::PoolUse;
    /// Takes or renews the lease on delivering `webhook`'s events for
    /// `seconds`: false while another holder's lease runs.
    fn lease_webhook<'a>(
        &'a self,
        webhook: &'a str,
        holder: &'a str,
        seconds: i64,
    ) -> BoxFuture<'a, Result<bool, StorageError>>;
    /// The oldest event not yet delivered to `webhook`.
    fn next_event<'a>(
        &'a self,
        webhook: &'a str,
    ) -> BoxFuture<'a, Result<Option<events::Event>, StorageError>>;
    /// Records `event_id` as delivered to `webhook`, if `holder` still
    /// holds its lease: false when it does not.
    fn mark_delivered<'a>(
        &'a self,
        webhook: &'a str,
        holder: &'a str,
        event_id: i64,
    ) -> BoxFuture<'a, Result<bool, StorageError>>;
    /// Events not yet delivered to `webhook`.
    fn pending_events<'a>(&'a self, webhook: &'a str) -> BoxFuture<'a, Result<u64, StorageError>>;
    /// The first time `webhook` is seen, starts its deliveries after the
    /// events written so far.
    /// The client registered for a discovered provider, if any.
    fn registration<'a>(
        &'a self,
        provider: &'a str,
    ) -> BoxFuture<'a, Result<Option<Registration>, StorageError>>;
    /// Records a registration unless one for the same resource is there
    /// (the first registrant wins; the others read and use its client).
    fn register_client<'a>(
        &'a self,
        r: &'a Registration,
    ) -> BoxFuture<'a, Result<(), StorageError>>;
    /// Records a sealed authorisation state as completed: false when it
    /// already was. Drops the records of states expired by `now`.
    fn consume_authorization<'a>(
        &'a self,
        id: &'a str,
        expires_at: i64,
        now: i64,
    ) -> BoxFuture<'a, Result<bool, StorageError>>;
    fn register_webhook<'a>(&'a self, webhook: &'a str) -> BoxFuture<'a, Result<(), StorageError>>;
    /// The row's sealed DPoP proof key, if it has one.
    fn proof_key<'a>(
        &'a self,
        provider: &'a str,
        user_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<SealedProofKey>, StorageError>>;
    /// Stores a proof key unless the row has one (the first wins).
    fn put_proof_key<'a>(
        &'a self,
        key: &'a SealedProofKey,
        now: i64,
    ) -> BoxFuture<'a, Result<(), StorageError>>;
    /// Up to `limit` proof keys after `after`, sealed with a key other
    /// than `active`.
    fn proof_keys_to_reseal<'a>(
        &'a self,
        active: &'a str,
        after: &'a RowKey,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<SealedProofKey>, StorageError>>;
    /// Replaces a proof key's ciphertext if it is still sealed with
    /// `old_key_id`: false when another host resealed it first.
    fn reseal_proof_key<'a>(
        &'a self,
        old_key_id: &'a str,
        key: &'a SealedProofKey,
    ) -> BoxFuture<'a, Result<bool, StorageError>>;
    /// Deletes the events written before `before`, and their deliveries:
    /// how many events.
    fn prune_events(&self, before: i64) -> BoxFuture<'_, Result<u64, StorageError>>;
    /// The states announced for the rows from `first` to `last`.
    fn announced<'a>(
        &'a self,
        first: &'a RowKey,
        last: &'a RowKey,
    ) -> BoxFuture<'a, Result<Vec<events::Announced>, StorageError>>;
    /// Writes the event and the row's announced state in one transaction,
    /// if the row still has the generation and the announced state the
    /// scan saw and no refresh holds it: whether it did.
    fn announce<'a>(
        &'a self,
        a: &'a events::Announcement,
    ) -> BoxFuture<'a, Result<bool, StorageError>>;
}

/// The outbox's SQL, the same on both backends but for the database's
/// time (`{now}`: seconds since the epoch) and its casts.
/// A client registered (RFC 7591) with the authorisation server a
/// provider was discovered to use, shared by every host of the database:
/// the tokens are bound to the client that got them. A public client, so
/// nothing here is secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub provider: String,
    /// The protected resource (an MCP server's URL) it was registered for.
    pub resource: String,
    /// The discovered endpoints and scopes (JSON).
    pub metadata: String,
    pub client_id: String,
    pub registered_at: i64,
}

/// A row's DPoP proof key as stored: sealed by [`crate::dpop::ProofKey`],
/// bound to its row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedProofKey {
    pub provider: String,
    pub user_id: String,
    pub key_id: String,
    pub sealed: Vec<u8>,
}

/// The registrations' SQL, the same for both databases.
pub(crate) mod clients {
    pub const GET: &str = "SELECT provider, resource, metadata, client_id, registered_at \
         FROM tokenkeep_clients WHERE provider = $1";
    pub const PUT: &str = "INSERT INTO tokenkeep_clients \
         (provider, resource, metadata, client_id, registered_at) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (provider) DO UPDATE SET resource = excluded.resource, \
         metadata = excluded.metadata, client_id = excluded.client_id, \
         registered_at = excluded.registered_at \
         WHERE tokenkeep_clients.resource <> excluded.resource";
}

/// The DPoP proof keys' SQL, the same for both databases. A key is
/// never replaced (tokens are bound to it), only sealed again.
pub(crate) mod proof_keys {
    pub const GET: &str = "SELECT provider, user_id, key_id, sealed FROM tokenkeep_proof_keys \
         WHERE provider = $1 AND user_id = $2";
    pub const PUT: &str = "INSERT INTO tokenkeep_proof_keys \
         (provider, user_id, key_id, sealed, created_at) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (provider, user_id) DO NOTHING";
    /// Keys sealed with another key than `$1`, after `($2, $3)`.
    pub const TO_RESEAL: &str = "SELECT provider, user_id, key_id, sealed \
         FROM tokenkeep_proof_keys WHERE key_id <> $1 AND (provider, user_id) > ($2, $3) \
         ORDER BY provider, user_id LIMIT $4";
    pub const RESEAL: &str = "UPDATE tokenkeep_proof_keys SET key_id = $4, sealed = $5 \
         WHERE provider = $1 AND user_id = $2 AND key_id = $3";
}

/// Rows and proof keys per key id: a key that still seals either cannot
/// be retired.
pub(crate) const ROWS_PER_KEY: &str = "SELECT key_id, count(*) FROM \
     (SELECT key_id FROM tokenkeep_tokens UNION ALL SELECT key_id FROM tokenkeep_proof_keys) k \
     GROUP BY key_id ORDER BY key_id";

/// The completed sealed states' SQL, the same for both databases.
pub(crate) mod authorizations {
    pub const PRUNE: &str = "DELETE FROM tokenkeep_authorizations WHERE expires_at < $1";
    pub const CONSUME: &str = "INSERT INTO tokenkeep_authorizations (id, expires_at) \
         VALUES ($1, $2) ON CONFLICT (id) DO NOTHING";
}

pub(crate) mod outbox {
    pub const LEASE: &str = "INSERT INTO tokenkeep_webhook_leases (webhook, holder, until) \
         VALUES ($1, $2, {now} + $3) ON CONFLICT (webhook) DO UPDATE \
         SET holder = excluded.holder, until = excluded.until \
         WHERE tokenkeep_webhook_leases.holder = excluded.holder \
         OR tokenkeep_webhook_leases.until < {now}";
    /// A webhook seen for the first time starts after the events already
    /// written: a webhook added to a running system is not sent its history.
    pub const REGISTER: &str = "INSERT INTO tokenkeep_webhook_leases \
         (webhook, holder, until, start_after) \
         SELECT CAST($1 AS TEXT), '', 0, COALESCE(max(id), 0) FROM tokenkeep_events WHERE true \
         ON CONFLICT (webhook) DO NOTHING";
    pub const NEXT: &str = "SELECT id, at, provider, user_id, state, reason, generation, \
         conversations FROM tokenkeep_events e WHERE e.id > (SELECT start_after FROM \
         tokenkeep_webhook_leases WHERE webhook = $1) AND NOT EXISTS (SELECT 1 FROM \
         tokenkeep_deliveries d WHERE d.webhook = $1 AND d.event_id = e.id) ORDER BY id LIMIT 1";
    pub const MARK: &str = "INSERT INTO tokenkeep_deliveries (webhook, event_id, delivered_at) \
         SELECT webhook, CAST($3 AS BIGINT), {now} FROM tokenkeep_webhook_leases \
         WHERE webhook = $1 AND holder = $2 AND until >= {now} \
         ON CONFLICT (webhook, event_id) DO NOTHING";
    pub const PENDING: &str = "SELECT count(*) FROM tokenkeep_events e WHERE e.id > (SELECT \
         start_after FROM tokenkeep_webhook_leases WHERE webhook = $1) AND NOT EXISTS \
         (SELECT 1 FROM tokenkeep_deliveries d WHERE d.webhook = $1 AND d.event_id = e.id)";
    /// Events written before `$1`, and then the deliveries of events no
    /// longer kept.
    pub const PRUNE_EVENTS: &str = "DELETE FROM tokenkeep_events WHERE at < $1";
    pub const PRUNE_DELIVERIES: &str = "DELETE FROM tokenkeep_deliveries WHERE NOT EXISTS \
         (SELECT 1 FROM tokenkeep_events e WHERE e.id = tokenkeep_deliveries.event_id)";
    /// The states announced for the rows from `($1, $2)` to `($3, $4)`: a
    /// page of the listing, in its order.
    pub const ANNOUNCED: &str = "SELECT provider, user_id, generation, announced_state \
         FROM tokenkeep_tokens WHERE (provider, user_id) >= ($1, $2) \
         AND (provider, user_id) <= ($3, $4)";

    /// `sql` with the database's time expression.
    pub fn with_now(sql: &str, now: &str) -> String {
        sql.replace("{now}", now)
    }
}

/// An event's stored columns, in [`outbox::NEXT`]'s order.
pub(crate) type EventColumns = (
    i64,
    i64,
    String,
    String,
    String,
    Option<String>,
    i64,
    String,
);

pub(crate) fn event(
    (id, at, provider, user_id, state, reason, generation, conversations): EventColumns,
) -> events::Event {
    events::Event {
        id,
        at,
        provider,
        user_id,
        state,
        reason,
        generation: generation.max(0) as u64,
        conversations: serde_json::from_str(&conversations).unwrap_or_default(),
    }
}

/// A row's announced state from [`outbox::ANNOUNCED`]'s columns.
pub(crate) fn announced(
    (provider, user_id, generation, state): (String, String, i64, Option<String>),
) -> events::Announced {
    events::Announced {
        row: RowKey { provider, user_id },
        generation: generation.max(0) as u64,
        state,
    }
}

/// The audit log's query, the same SQL on both backends: every filter
/// optional, oldest first.
pub(crate) const AUDIT_SQL: &str = "SELECT id, at, caller, action, provider, user_id, generation, \
     outcome FROM tokenkeep_audit \
     WHERE ($1::TEXT IS NULL OR provider = $1) AND ($2::TEXT IS NULL OR user_id = $2) \
     AND ($3::TEXT IS NULL OR caller = $3) AND ($4::BIGINT IS NULL OR at >= $4) \
     AND ($5::BIGINT IS NULL OR at < $5) AND ($6::BIGINT IS NULL OR id > $6) \
     ORDER BY id LIMIT $7";

/// An audit entry's stored columns, in [`AUDIT_SQL`]'s order.
pub(crate) type AuditColumns = (
    i64,
    i64,
    String,
    String,
    String,
    String,
    Option<i64>,
    String,
);

/// An audit entry from its stored columns.
pub(crate) fn audit_entry(
    (id, at, caller, action, provider, user_id, generation, outcome): AuditColumns,
) -> Result<audit::Entry, StorageError> {
    Ok(audit::Entry {
        id,
        at,
        caller,
        action: audit::Action::from_name(&action)
            .ok_or_else(|| StorageError::Unavailable(format!("unknown audit action {action:?}")))?,
        provider,
        user_id,
        generation: generation.map(|g| g.max(0) as u64),
        outcome,
    })
}

/// An open backend transaction; dropping it rolls back.
pub trait BackendTransaction: Send {
    /// Reads and locks a row, with its refresh-start record for the current
    /// generation, and the database's time after the lock was granted.
    fn load_for_update<'a>(
        &'a mut self,
        provider: &'a str,
        user_id: &'a str,
    ) -> BoxFuture<'a, Result<BackendRead, StorageError>>;
    /// Like `load_for_update`, without waiting: none when another
    /// transaction holds the lock.
    fn try_load_for_update<'a>(
        &'a mut self,
        provider: &'a str,
        user_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<BackendRead>, StorageError>>;
    /// Writes `row` if the stored generation is still `expected`. Under
    /// the row's lock, where the generation it read is `expected` and so
    /// the write cannot miss, a backend may send it with the commit (or
    /// with the transaction's next statement) and say true at once: a write
    /// that then does not land is saved as a rescue or fails the commit.
    fn compare_and_set<'a>(
        &'a mut self,
        row: &'a SealedRow,
        expected: u64,
        now: i64,
    ) -> BoxFuture<'a, Result<bool, StorageError>>;
    /// Records durably, outside this transaction (the record must survive
    /// this runtime's death), that a refresh of the row this transaction
    /// holds locked at `generation` starts at `at`; and checks, right before
    /// the request that spends the row's refresh token, that the lock is
    /// still held (the database may have ended a session it thought
    /// abandoned). `ConnectionLost` when it is not: nothing may be sent.
    fn start_refresh<'a>(
        &'a mut self,
        provider: &'a str,
        user_id: &'a str,
        generation: u64,
        at: i64,
    ) -> BoxFuture<'a, Result<(), StorageError>>;
    /// Commits, with any write still to send; an error when a row written
    /// here could not be committed nor saved.
    fn commit(self: Box<Self>) -> BoxFuture<'static, Result<(), StorageError>>;
}

/// Where the tokens live, and the keeper's clock (the database's).
#[derive(Debug)]
pub struct Store {
    backend: Box<dyn Backend>,
    clock: Arc<SharedClock>,
    /// Grants served without a read, when enabled ([`Store::cache_grants`]).
    cache: Option<Arc<GrantCache>>,
    /// The task that keeps `cache` current; it stops with the store.
    _listener: Option<listener::AbortOnDrop>,
}

/// An open transaction; dropping it rolls back and releases its locks.
pub struct Transaction {
    inner: Box<dyn BackendTransaction>,
    clock: Arc<SharedClock>,
    /// Rows this transaction locked: whatever it changed in them is
    /// forgotten by this process's cache once it ends.
    locked: Forget,
}

/// Rows this process is changing: the grant cache forgets them at once and
/// again when this is dropped, after the write however it ended (done,
/// failed, or cancelled with its caller), so that no read begun meanwhile
/// fills with what was there before.
struct Forget {
    cache: Option<Arc<GrantCache>>,
    rows: Vec<(String, String)>,
}

impl Forget {
    fn new(cache: &Option<Arc<GrantCache>>) -> Self {
        Self {
            cache: cache.clone(),
            rows: Vec::new(),
        }
    }

    fn row(mut self, provider: &str, user_id: &str) -> Self {
        self.add(provider, user_id);
        self
    }

    fn add(&mut self, provider: &str, user_id: &str) {
        let Some(cache) = &self.cache else { return };
        cache.invalidate(provider, user_id);
        if !self.rows.iter().any(|(p, u)| p == provider && u == user_id) {
            self.rows.push((provider.to_string(), user_id.to_string()));
        }
    }
}

impl Drop for Forget {
    fn drop(&mut self) {
        if let Some(cache) = &self.cache {
            for (provider, user_id) in &self.rows {
                cache.invalidate(provider, user_id);
            }
        }
    }
}

/// Connection settings shared by the backends.
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// How long a runtime waits for another's row lock.
    pub lock_wait: Duration,
    /// Connections per process.
    pub max_connections: u32,
    /// The longest a refresher holds a row lock without a word to the
    /// database (its provider call): beyond it, plus a margin, the database
    /// ends a holder that has gone silent.
    pub hold: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            lock_wait: Duration::from_millis(u64::from(crate::config::DEFAULT_LOCK_WAIT_MS)),
            max_connections: 16,
            hold: crate::config::Config::default().slowest_provider_call(),
        }
    }
}

impl Store {
    /// Connects to `url` (`postgres://…`, `sqlite://path` or `sqlite:path`),
    /// brings its schema up to date and reads the database's clock.
    pub async fn open(
        url: &str,
        options: StoreOptions,
        clock: Clock,
    ) -> Result<Self, StorageError> {
        let backend: Box<dyn Backend> =
            if url.starts_with("postgres://") || url.starts_with("postgresql://") {
                Box::new(postgres::PgStore::open(url, options).await?)
            } else if let Some(path) = url
                .strip_prefix("sqlite://")
                .or_else(|| url.strip_prefix("sqlite:"))
            {
                Box::new(sqlite::SqliteStore::open(path, options).await?)
            } else {
                return Err(StorageError::Unavailable(
                    "database URL must start with postgres://, postgresql:// or sqlite:".into(),
                ));
            };
        Self::with_backend(backend, clock).await
    }

    /// A store over any backend.
    pub async fn with_backend(
        backend: Box<dyn Backend>,
        clock: Clock,
    ) -> Result<Self, StorageError> {
        let clock = Arc::new(SharedClock::new(clock));
        clock.observe(backend.database_now().await?);
        Ok(Self {
            backend,
            clock,
            cache: None,
            _listener: None,
        })
    }

    /// Serves grants from a process-local cache from now on, kept current
    /// by the database: its change notifications (Postgres) or its change
    /// counter (SQLite).
    pub fn cache_grants(&mut self) -> Result<Arc<GrantCache>, StorageError> {
        if let Some(cache) = &self.cache {
            return Ok(cache.clone());
        }
        let (cache, listener) = self.backend.grant_cache(self.clock.clone())?;
        self._listener = listener;
        self.cache = Some(cache.clone());
        Ok(cache)
    }

    /// The schema version the database is at: the one this build knows,
    /// since opening migrates to it and refuses a newer one.
    pub fn schema_version(&self) -> i64 {
        self.backend.schema_version()
    }

    /// The grant cache, when enabled.
    pub fn grant_cache(&self) -> Option<&Arc<GrantCache>> {
        self.cache.as_ref()
    }

    /// This process's own change of a row: forgotten at once, not when the
    /// notification comes back, and again once the write has ended.
    fn forget(&self, provider: &str, user_id: &str) -> Forget {
        Forget::new(&self.cache).row(provider, user_id)
    }

    /// The shared time (the database's), without a round trip.
    pub fn now(&self) -> i64 {
        self.clock.now()
    }

    /// The last committed row, unlocked, with the database's time.
    pub async fn read(&self, provider: &str, user_id: &str) -> Result<RowRead, StorageError> {
        let (row, db_now) = self.backend.read(provider, user_id).await?;
        Ok(RowRead {
            row,
            now: self.clock.observe(db_now),
        })
    }

    /// Appends audit entries, all or none.
    pub async fn append_audit(&self, entries: &[audit::Entry]) -> Result<(), StorageError> {
        self.backend.append_audit(entries).await
    }

    /// Audit entries matching `filter`, oldest first, at most `limit`.
    pub async fn audit(
        &self,
        filter: &audit::Filter,
        limit: u32,
    ) -> Result<Vec<audit::Entry>, StorageError> {
        self.backend.audit(filter, limit).await
    }

    pub async fn lease_webhook(
        &self,
        webhook: &str,
        holder: &str,
        seconds: i64,
    ) -> Result<bool, StorageError> {
        self.backend.lease_webhook(webhook, holder, seconds).await
    }

    pub async fn next_event(&self, webhook: &str) -> Result<Option<events::Event>, StorageError> {
        self.backend.next_event(webhook).await
    }

    pub async fn mark_delivered(
        &self,
        webhook: &str,
        holder: &str,
        event_id: i64,
    ) -> Result<bool, StorageError> {
        self.backend.mark_delivered(webhook, holder, event_id).await
    }

    pub async fn pending_events(&self, webhook: &str) -> Result<u64, StorageError> {
        self.backend.pending_events(webhook).await
    }

    pub async fn registration(&self, provider: &str) -> Result<Option<Registration>, StorageError> {
        self.backend.registration(provider).await
    }

    /// Records `r` unless a registration for the same resource exists, and
    /// returns the one that stands.
    pub async fn register_client(&self, r: &Registration) -> Result<Registration, StorageError> {
        self.backend.register_client(r).await?;
        self.backend
            .registration(&r.provider)
            .await?
            .ok_or_else(|| StorageError::Unavailable("the registration was not kept".into()))
    }

    /// Records a sealed authorisation state as completed: false when it
    /// already was (a replay).
    pub async fn consume_authorization(
        &self,
        id: &str,
        expires_at: i64,
    ) -> Result<bool, StorageError> {
        self.backend
            .consume_authorization(id, expires_at, self.now())
            .await
    }

    pub async fn proof_key(
        &self,
        provider: &str,
        user_id: &str,
    ) -> Result<Option<SealedProofKey>, StorageError> {
        self.backend.proof_key(provider, user_id).await
    }

    /// Stores `key` unless the row has a proof key, and returns the one
    /// that stands.
    pub async fn put_proof_key(
        &self,
        key: &SealedProofKey,
    ) -> Result<SealedProofKey, StorageError> {
        self.backend.put_proof_key(key, self.now()).await?;
        self.backend
            .proof_key(&key.provider, &key.user_id)
            .await?
            .ok_or_else(|| StorageError::Unavailable("the proof key was not kept".into()))
    }

    pub async fn proof_keys_to_reseal(
        &self,
        active: &str,
        after: &RowKey,
        limit: u32,
    ) -> Result<Vec<SealedProofKey>, StorageError> {
        self.backend
            .proof_keys_to_reseal(active, after, limit)
            .await
    }

    pub async fn reseal_proof_key(
        &self,
        old_key_id: &str,
        key: &SealedProofKey,
    ) -> Result<bool, StorageError> {
        self.backend.reseal_proof_key(old_key_id, key).await
    }

    pub async fn register_webhook(&self, webhook: &str) -> Result<(), StorageError> {
        self.backend.register_webhook(webhook).await
    }

    pub async fn prune_events(&self, before: i64) -> Result<u64, StorageError> {
        self.backend.prune_events(before).await
    }

    pub async fn announced(
        &self,
        first: &RowKey,
        last: &RowKey,
    ) -> Result<Vec<events::Announced>, StorageError> {
        self.backend.announced(first, last).await
    }

    pub async fn announce(&self, a: &events::Announcement) -> Result<bool, StorageError> {
        self.backend.announce(a).await
    }

    /// The database connections this process holds.
    pub fn pool_use(&self) -> crate::metrics::PoolUse {
        self.backend.pool_use()
    }

    /// Deletes audit entries from before `before`.
    pub async fn prune_audit(&self, before: i64) -> Result<u64, StorageError> {
        self.backend.prune_audit(before).await
    }

    /// Up to `limit` rows after `after`, ordered by provider then user.
    pub async fn list(
        &self,
        after: Option<&RowKey>,
        limit: u32,
    ) -> Result<Vec<SealedRow>, StorageError> {
        self.backend.list(after, limit).await
    }

    /// Rows per key id, counted by the database (no row leaves it).
    pub async fn rows_per_key(&self) -> Result<Vec<(String, u64)>, StorageError> {
        self.backend.rows_per_key().await
    }

    /// Inserts `row` only if none exists; false when one does.
    pub async fn insert(&self, row: &SealedRow) -> Result<bool, StorageError> {
        let _forget = self.forget(&row.provider, &row.user_id);
        self.backend.insert(row, self.now()).await
    }

    /// Inserts or replaces `row`; the generation written.
    pub async fn upsert(&self, row: &SealedRow) -> Result<u64, StorageError> {
        let _forget = self.forget(&row.provider, &row.user_id);
        self.backend.upsert(row, self.now()).await
    }

    /// Deletes a row and its refresh-start record; its last generation is
    /// kept (a tombstone), so a later row for the same user continues after it.
    pub async fn delete(&self, provider: &str, user_id: &str) -> Result<bool, StorageError> {
        let _forget = self.forget(provider, user_id);
        self.backend.delete(provider, user_id).await
    }

    /// Opens a transaction whose row loads lock (Postgres: `FOR UPDATE` with
    /// a `lock_timeout`; SQLite: the write lock taken up front).
    pub async fn begin(&self) -> Result<Transaction, StorageError> {
        Ok(Transaction {
            inner: self.backend.begin().await?,
            clock: self.clock.clone(),
            locked: Forget::new(&self.cache),
        })
    }

    /// The entries persisted for a conversation, ordered by provider.
    pub async fn conversation_entries(
        &self,
        conversation_id: &str,
    ) -> Result<Vec<ConversationEntry>, StorageError> {
        self.backend.conversation_entries(conversation_id).await
    }

    /// Inserts or replaces one entry of a conversation.
    pub async fn put_conversation_entry(
        &self,
        entry: &ConversationEntry,
    ) -> Result<(), StorageError> {
        self.backend.put_conversation_entry(entry).await
    }
}

impl Transaction {
    /// Reads and locks a row, with the database's time after the lock.
    pub async fn load_for_update(
        &mut self,
        provider: &str,
        user_id: &str,
    ) -> Result<RowRead, StorageError> {
        self.locked.add(provider, user_id);
        let (row, db_now) = self.inner.load_for_update(provider, user_id).await?;
        Ok(RowRead {
            row,
            now: self.clock.observe(db_now),
        })
    }

    pub async fn try_load_for_update(
        &mut self,
        provider: &str,
        user_id: &str,
    ) -> Result<Option<RowRead>, StorageError> {
        self.locked.add(provider, user_id);
        let read = self.inner.try_load_for_update(provider, user_id).await?;
        Ok(read.map(|(row, db_now)| RowRead {
            row,
            now: self.clock.observe(db_now),
        }))
    }

    pub async fn compare_and_set(
        &mut self,
        row: &SealedRow,
        expected: u64,
    ) -> Result<bool, StorageError> {
        let now = self.clock.now();
        self.locked.add(&row.provider, &row.user_id);
        self.inner.compare_and_set(row, expected, now).await
    }

    /// See [`BackendTransaction::start_refresh`].
    pub async fn start_refresh(
        &mut self,
        provider: &str,
        user_id: &str,
        generation: u64,
    ) -> Result<(), StorageError> {
        let at = self.clock.now();
        self.inner
            .start_refresh(provider, user_id, generation, at)
            .await
    }

    pub async fn commit(self) -> Result<(), StorageError> {
        // A lock may also have applied a parked write (a rescue), and a
        // failed commit may still have landed or been saved: `locked`
        // forgets them all once the commit has ended, however it ends.
        let Transaction { inner, locked, .. } = self;
        let done = inner.commit().await;
        drop(locked);
        done
    }
}

const COLUMNS: &str = "provider, user_id, key_id, access_token, refresh_token, access_token_expires_at, \
     refresh_token_expires_at, scopes, obtained_at, generation, failed_attempts, last_failure_at, \
     last_failure, last_success_at, refresh_started_at, baseline_scopes, retry_not_before";

/// A row's columns as the database holds them (scopes as JSON text),
/// turned into a row in one place for every backend.
pub(crate) struct StoredColumns {
    pub provider: String,
    pub user_id: String,
    pub key_id: String,
    pub access_token: Vec<u8>,
    pub refresh_token: Option<Vec<u8>>,
    pub access_token_expires_at: Option<i64>,
    pub refresh_token_expires_at: Option<i64>,
    pub scopes: String,
    pub obtained_at: i64,
    pub generation: i64,
    pub failed_attempts: i64,
    pub last_failure_at: Option<i64>,
    pub last_failure: Option<String>,
    pub last_success_at: Option<i64>,
    pub refresh_started_at: Option<i64>,
    pub baseline_scopes: Option<String>,
    pub retry_not_before: Option<i64>,
}

impl StoredColumns {
    pub(crate) fn into_row(self) -> Result<SealedRow, serde_json::Error> {
        let scopes: Vec<String> = serde_json::from_str(&self.scopes)?;
        // Rows from before baselines were kept: what they hold is the baseline.
        let baseline_scopes = match self.baseline_scopes {
            Some(b) => serde_json::from_str(&b)?,
            None => scopes.clone(),
        };
        Ok(SealedRow {
            provider: self.provider,
            user_id: self.user_id,
            key_id: self.key_id,
            access_token: self.access_token,
            refresh_token: self.refresh_token,
            access_token_expires_at: self.access_token_expires_at,
            refresh_token_expires_at: self.refresh_token_expires_at,
            scopes,
            baseline_scopes,
            obtained_at: self.obtained_at,
            generation: self.generation.max(0) as u64,
            health: Health {
                failed_attempts: self.failed_attempts.clamp(0, i64::from(u32::MAX)) as u32,
                last_failure_at: self.last_failure_at,
                last_failure: self
                    .last_failure
                    .as_deref()
                    .and_then(tokenkeep_core::error::ErrorClass::from_name),
                last_success_at: self.last_success_at,
                refresh_started_at: self.refresh_started_at,
                retry_not_before: self.retry_not_before,
            },
        })
    }
}

/// A row's [`StoredColumns`] from a driver's row `r` (tokio-postgres or
/// sqlx: both name columns with `try_get`), `?` on the first that fails.
macro_rules! stored_columns {
    ($r:expr) => {{
        let r = $r;
        crate::storage::StoredColumns {
            provider: r.try_get("provider")?,
            user_id: r.try_get("user_id")?,
            key_id: r.try_get("key_id")?,
            access_token: r.try_get("access_token")?,
            refresh_token: r.try_get("refresh_token")?,
            access_token_expires_at: r.try_get("access_token_expires_at")?,
            refresh_token_expires_at: r.try_get("refresh_token_expires_at")?,
            scopes: r.try_get("scopes")?,
            obtained_at: r.try_get("obtained_at")?,
            generation: r.try_get("generation")?,
            failed_attempts: r.try_get("failed_attempts")?,
            last_failure_at: r.try_get("last_failure_at")?,
            last_failure: r.try_get("last_failure")?,
            last_success_at: r.try_get("last_success_at")?,
            refresh_started_at: r.try_get("refresh_started_at")?,
            baseline_scopes: r.try_get("baseline_scopes")?,
            retry_not_before: r.try_get("retry_not_before")?,
        }
    }};
}
pub(crate) use stored_columns;

/// How an upsert replaces a row: every column but the key, and the next
/// generation (both backends' SQL).
pub(crate) const UPSERT_ON_CONFLICT: &str = "DO UPDATE SET \
     key_id = excluded.key_id, access_token = excluded.access_token, \
     refresh_token = excluded.refresh_token, \
     access_token_expires_at = excluded.access_token_expires_at, \
     refresh_token_expires_at = excluded.refresh_token_expires_at, \
     scopes = excluded.scopes, obtained_at = excluded.obtained_at, \
     generation = tokenkeep_tokens.generation + 1, \
     failed_attempts = excluded.failed_attempts, last_failure_at = excluded.last_failure_at, \
     last_failure = excluded.last_failure, last_success_at = excluded.last_success_at, \
     refresh_started_at = excluded.refresh_started_at, \
     baseline_scopes = excluded.baseline_scopes, \
     retry_not_before = excluded.retry_not_before, updated_at = excluded.updated_at \
     RETURNING generation";

/// The JSON text the scope columns hold.
pub(crate) fn scopes_text(scopes: &[String]) -> String {
    serde_json::to_string(scopes).unwrap_or_else(|_| "[]".into())
}

fn to_i64(v: u64) -> Result<i64, StorageError> {
    i64::try_from(v).map_err(|_| StorageError::Unavailable("generation out of range".into()))
}

/// The row queries over sqlx (SQLite's). The backend module defines
/// `READ_SQL` and `LOCK_SQL`: one row with the columns (null when there is
/// no row) and `db_now`, the database's time or null where the host's clock
/// is the database's.
macro_rules! rows {
    ($db:ty, $error:path) => {
        use crate::storage::{to_i64, COLUMNS, ConversationEntry, RowKey, SealedRow};
        use crate::storage::StorageError;
        use sqlx::Row as _;
        use tokenkeep_core::error::ErrorClass;

        type Db = $db;

        fn decode(r: &<Db as sqlx::Database>::Row) -> Result<SealedRow, sqlx::Error> {
            crate::storage::stored_columns!(r)
            .into_row()
            .map_err(|e| sqlx::Error::Decode(Box::new(e)))
        }

        fn scopes_json(row: &SealedRow) -> String {
            crate::storage::scopes_text(&row.scopes)
        }

        fn baseline_json(row: &SealedRow) -> String {
            crate::storage::scopes_text(&row.baseline_scopes)
        }

        /// The row, if any, and the database's time if the backend tells it.
        fn decode_read(r: &<Db as sqlx::Database>::Row) -> Result<(Option<SealedRow>, Option<i64>), sqlx::Error> {
            let db_now: Option<i64> = r.try_get("db_now")?;
            let present: Option<String> = r.try_get("provider")?;
            Ok((present.map(|_| decode(r)).transpose()?, db_now))
        }

        pub async fn read(pool: &sqlx::Pool<Db>, provider: &str, user_id: &str) -> Result<(Option<SealedRow>, Option<i64>), StorageError> {
            let row = sqlx::query(super::READ_SQL)
                .bind(provider)
                .bind(user_id)
                .fetch_one(pool)
                .await
                .map_err($error)?;
            decode_read(&row).map_err($error)
        }

        /// Reads the row with `lock_sql` (the backend's locking read) and
        /// its refresh-start record, kept in their own database `markers`.
        pub async fn load_for_update(
            tx: &mut <Db as sqlx::Database>::Connection,
            markers: &sqlx::Pool<Db>,
            lock_sql: &str,
            provider: &str,
            user_id: &str,
        ) -> Result<(Option<SealedRow>, Option<i64>), StorageError> {
            let found = sqlx::query(lock_sql)
                .bind(provider)
                .bind(user_id)
                .fetch_one(&mut *tx)
                .await
                .map_err($error)?;
            let (row, db_now) = decode_read(&found).map_err($error)?;
            let Some(mut row) = row else {
                return Ok((None, db_now));
            };
            // After the lock: it sees a record that a refresher which held
            // the lock committed while we waited.
            let marker = sqlx::query_scalar(
                "SELECT started_at FROM tokenkeep_refresh_starts \
                 WHERE provider = $1 AND user_id = $2 AND generation = $3",
            )
            .bind(provider)
            .bind(user_id)
            .bind(to_i64(row.generation)?);
            row.health.refresh_started_at =
                marker.fetch_optional(markers).await.map_err($error)?;
            Ok((Some(row), db_now))
        }

        pub async fn conversation_entries(
            pool: &sqlx::Pool<Db>,
            conversation_id: &str,
        ) -> Result<Vec<ConversationEntry>, StorageError> {
            let rows = sqlx::query(
                "SELECT conversation_id, provider, user_id, scopes, generation, updated_at \
                 FROM tokenkeep_conversations WHERE conversation_id = $1 ORDER BY provider",
            )
            .bind(conversation_id)
            .fetch_all(pool)
            .await
            .map_err($error)?;
            rows.iter()
                .map(|r| -> Result<ConversationEntry, sqlx::Error> {
                    let scopes: String = r.try_get("scopes")?;
                    Ok(ConversationEntry {
                        conversation_id: r.try_get("conversation_id")?,
                        provider: r.try_get("provider")?,
                        user_id: r.try_get("user_id")?,
                        scopes: serde_json::from_str(&scopes).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
                        generation: r.try_get::<i64, _>("generation")? as u64,
                        updated_at: r.try_get("updated_at")?,
                    })
                })
                .collect::<Result<_, _>>()
                .map_err($error)
        }

        pub async fn put_conversation_entry(
            pool: &sqlx::Pool<Db>,
            e: &ConversationEntry,
        ) -> Result<(), StorageError> {
            sqlx::query(
                "INSERT INTO tokenkeep_conversations \
                 (conversation_id, provider, user_id, scopes, generation, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (conversation_id, provider) DO UPDATE SET \
                 user_id = excluded.user_id, scopes = excluded.scopes, \
                 generation = excluded.generation, updated_at = excluded.updated_at",
            )
            .bind(&e.conversation_id)
            .bind(&e.provider)
            .bind(&e.user_id)
            .bind(serde_json::to_string(&e.scopes).unwrap_or_else(|_| "[]".into()))
            .bind(to_i64(e.generation)?)
            .bind(e.updated_at)
            .execute(pool)
            .await
            .map_err($error)?;
            Ok(())
        }

        pub async fn record_refresh_start<'e>(
            markers: impl sqlx::Executor<'e, Database = Db>,
            provider: &str,
            user_id: &str,
            generation: u64,
            at: i64,
        ) -> Result<(), StorageError> {
            sqlx::query(
                "INSERT INTO tokenkeep_refresh_starts (provider, user_id, generation, started_at) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (provider, user_id) DO UPDATE SET \
                 generation = excluded.generation, started_at = excluded.started_at",
            )
            .bind(provider)
            .bind(user_id)
            .bind(to_i64(generation)?)
            .bind(at)
            .execute(markers)
            .await
            .map_err($error)?;
            Ok(())
        }

        pub async fn rows_per_key(pool: &sqlx::Pool<Db>) -> Result<Vec<(String, u64)>, StorageError> {
            let counts: Vec<(String, i64)> = sqlx::query_as(crate::storage::ROWS_PER_KEY)
            .fetch_all(pool)
            .await
            .map_err($error)?;
            Ok(counts.into_iter().map(|(k, n)| (k, n.max(0) as u64)).collect())
        }

        pub async fn list(
            pool: &sqlx::Pool<Db>,
            after: Option<&RowKey>,
            limit: u32,
        ) -> Result<Vec<SealedRow>, StorageError> {
            let limit = i64::from(limit);
            let rows = match after {
                Some(k) => sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM tokenkeep_tokens WHERE (provider, user_id) > ($1, $2) \
                     ORDER BY provider, user_id LIMIT $3"
                ))
                .bind(&k.provider)
                .bind(&k.user_id)
                .bind(limit)
                .fetch_all(pool)
                .await,
                None => sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM tokenkeep_tokens ORDER BY provider, user_id LIMIT $1"
                ))
                .bind(limit)
                .fetch_all(pool)
                .await,
            }
            .map_err($error)?;
            rows.iter().map(decode).collect::<Result<_, _>>().map_err($error)
        }

        /// `sql` (an `INSERT` of a whole row but its generation) with the
        /// row's values bound as `$1`…`$17`, `$17` the time of writing.
        fn insert_row<'q>(
            sql: &'q str,
            row: &'q SealedRow,
            now: i64,
        ) -> sqlx::query::Query<'q, Db, <Db as sqlx::Database>::Arguments<'q>> {
            sqlx::query(sql)
                .bind(&row.provider)
                .bind(&row.user_id)
                .bind(&row.key_id)
                .bind(&row.access_token)
                .bind(&row.refresh_token)
                .bind(row.access_token_expires_at)
                .bind(row.refresh_token_expires_at)
                .bind(scopes_json(row))
                .bind(row.obtained_at)
                .bind(i64::from(row.health.failed_attempts))
                .bind(row.health.last_failure_at)
                .bind(row.health.last_failure.map(ErrorClass::name))
                .bind(row.health.last_success_at)
                .bind(row.health.refresh_started_at)
                .bind(baseline_json(row))
                .bind(row.health.retry_not_before)
                .bind(now)
        }

        /// A new row starts after the last generation a deleted row of the
        /// same provider and user had (its tombstone), so generations never
        /// repeat and nothing recorded against an old one can match.
        fn insert_sql(on_conflict: &str) -> String {
            format!(
                "INSERT INTO tokenkeep_tokens ({COLUMNS}, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, \
                 COALESCE((SELECT generation + 1 FROM tokenkeep_tombstones \
                 WHERE provider = $1 AND user_id = $2), 1), \
                 $10, $11, $12, $13, $14, $15, $16, $17) \
                 ON CONFLICT (provider, user_id) {on_conflict}"
            )
        }

        pub async fn upsert(pool: &sqlx::Pool<Db>, row: &SealedRow, now: i64) -> Result<u64, StorageError> {
            let sql = insert_sql(crate::storage::UPSERT_ON_CONFLICT);
            let generation: i64 = insert_row(&sql, row, now)
                .fetch_one(pool)
                .await
                .map_err($error)?
                .try_get(0)
                .map_err($error)?;
            Ok(generation as u64)
        }

        pub async fn insert(pool: &sqlx::Pool<Db>, row: &SealedRow, now: i64) -> Result<bool, StorageError> {
            let sql = insert_sql("DO NOTHING");
            let done = insert_row(&sql, row, now).execute(pool).await.map_err($error)?;
            Ok(done.rows_affected() == 1)
        }

        pub async fn compare_and_set(
            tx: &mut <Db as sqlx::Database>::Connection,
            row: &SealedRow,
            expected: u64,
            now: i64,
        ) -> Result<bool, StorageError> {
            let done = sqlx::query(
                "UPDATE tokenkeep_tokens SET key_id = $1, access_token = $2, refresh_token = $3, \
                 access_token_expires_at = $4, refresh_token_expires_at = $5, scopes = $6, \
                 obtained_at = $7, generation = $8, failed_attempts = $9, last_failure_at = $10, \
                 last_failure = $11, last_success_at = $12, refresh_started_at = $13, \
                 baseline_scopes = $14, retry_not_before = $15, updated_at = $16 \
                 WHERE provider = $17 AND user_id = $18 AND generation = $19",
            )
            .bind(&row.key_id)
            .bind(&row.access_token)
            .bind(&row.refresh_token)
            .bind(row.access_token_expires_at)
            .bind(row.refresh_token_expires_at)
            .bind(scopes_json(row))
            .bind(row.obtained_at)
            .bind(to_i64(row.generation)?)
            .bind(i64::from(row.health.failed_attempts))
            .bind(row.health.last_failure_at)
            .bind(row.health.last_failure.map(ErrorClass::name))
            .bind(row.health.last_success_at)
            .bind(row.health.refresh_started_at)
            .bind(baseline_json(row))
            .bind(row.health.retry_not_before)
            .bind(now)
            .bind(&row.provider)
            .bind(&row.user_id)
            .bind(to_i64(expected)?)
            .execute(&mut *tx)
            .await
            .map_err($error)?;
            Ok(done.rows_affected() == 1)
        }

        pub async fn delete_refresh_start(
            markers: &sqlx::Pool<Db>,
            provider: &str,
            user_id: &str,
        ) -> Result<(), StorageError> {
            sqlx::query("DELETE FROM tokenkeep_refresh_starts WHERE provider = $1 AND user_id = $2")
                .bind(provider)
                .bind(user_id)
                .execute(markers)
                .await
                .map_err($error)?;
            Ok(())
        }

        /// Deletes the row and its proof key (a reconnect gets a new one).
        pub async fn delete(pool: &sqlx::Pool<Db>, provider: &str, user_id: &str) -> Result<bool, StorageError> {
            let mut tx = pool.begin().await.map_err($error)?;
            sqlx::query("DELETE FROM tokenkeep_proof_keys WHERE provider = $1 AND user_id = $2")
                .bind(provider)
                .bind(user_id)
                .execute(&mut *tx)
                .await
                .map_err($error)?;
            let done = sqlx::query("DELETE FROM tokenkeep_tokens WHERE provider = $1 AND user_id = $2")
                .bind(provider)
                .bind(user_id)
                .execute(&mut *tx)
                .await
                .map_err($error)?;
            tx.commit().await.map_err($error)?;
            Ok(done.rows_affected() > 0)
        }
    };
}
pub(crate) use rows;

/// The [`Backend`] methods that are the SQL of [`rows!`] on the backend's
/// `pool`.
macro_rules! pool_backend_methods {
    () => {
        fn list<'a>(
            &'a self,
            after: Option<&'a RowKey>,
            limit: u32,
        ) -> BoxFuture<'a, Result<Vec<SealedRow>, StorageError>> {
            Box::pin(rows::list(&self.pool, after, limit))
        }
        fn rows_per_key(&self) -> BoxFuture<'_, Result<Vec<(String, u64)>, StorageError>> {
            Box::pin(rows::rows_per_key(&self.pool))
        }
        fn insert<'a>(
            &'a self,
            row: &'a SealedRow,
            now: i64,
        ) -> BoxFuture<'a, Result<bool, StorageError>> {
            Box::pin(rows::insert(&self.pool, row, now))
        }
        fn upsert<'a>(
            &'a self,
            row: &'a SealedRow,
            now: i64,
        ) -> BoxFuture<'a, Result<u64, StorageError>> {
            Box::pin(rows::upsert(&self.pool, row, now))
        }
        fn conversation_entries<'a>(
            &'a self,
            conversation_id: &'a str,
        ) -> BoxFuture<'a, Result<Vec<ConversationEntry>, StorageError>> {
            Box::pin(rows::conversation_entries(&self.pool, conversation_id))
        }
        fn put_conversation_entry<'a>(
            &'a self,
            entry: &'a ConversationEntry,
        ) -> BoxFuture<'a, Result<(), StorageError>> {
            Box::pin(rows::put_conversation_entry(&self.pool, entry))
        }
    };
}
pub(crate) use pool_backend_methods;
