//! Postgres: one database shared by every runtime on every machine.
//!
//! Row locks are `SELECT … FOR UPDATE` inside a transaction whose
//! `lock_timeout` is the configured lock wait; a runtime that dies drops its
//! connection and Postgres rolls its transaction back, releasing the lock.

use super::{
    BackendRead, BackendTransaction, BoxFuture, ConversationEntry, RowKey, SealedRow, StorageError,
    StoreOptions,
};
use sqlx::Connection;
use sqlx::pool::PoolConnectionMetadata;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;

/// Schema migrations, applied in order under an advisory lock.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE tokenkeep_tokens (
        provider TEXT NOT NULL,
        user_id TEXT NOT NULL,
        key_id TEXT NOT NULL,
        access_token BYTEA NOT NULL,
        refresh_token BYTEA,
        access_token_expires_at BIGINT,
        refresh_token_expires_at BIGINT,
        scopes TEXT NOT NULL,
        obtained_at BIGINT NOT NULL,
        generation BIGINT NOT NULL,
        failed_attempts BIGINT NOT NULL DEFAULT 0,
        last_failure_at BIGINT,
        last_failure TEXT,
        last_success_at BIGINT,
        refresh_started_at BIGINT,
        updated_at BIGINT NOT NULL,
        PRIMARY KEY (provider, user_id)
    )",
    ),
    (
        2,
        // Written outside the row's transaction, so it survives the death of
        // the runtime that holds the row lock.
        "CREATE TABLE tokenkeep_refresh_starts (
        provider TEXT NOT NULL,
        user_id TEXT NOT NULL,
        generation BIGINT NOT NULL,
        started_at BIGINT NOT NULL,
        PRIMARY KEY (provider, user_id)
    )",
    ),
    (
        3,
        "CREATE TABLE tokenkeep_conversations (
        conversation_id TEXT NOT NULL,
        provider TEXT NOT NULL,
        user_id TEXT NOT NULL,
        scopes TEXT NOT NULL,
        generation BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        PRIMARY KEY (conversation_id, provider)
    )",
    ),
    (
        4,
        // Rows a refresher wrote but could not commit (its connection was
        // cut): the next holder of the row's lock applies the one that
        // follows the generation it finds. Written outside the row's lock.
        "CREATE TABLE tokenkeep_rescues (
        LIKE tokenkeep_tokens INCLUDING ALL,
        replaces BIGINT NOT NULL
    )",
    ),
    (
        5,
        // The last generation of each deleted row: a new row for the same
        // provider and user continues after it.
        "CREATE TABLE tokenkeep_tombstones (
        provider TEXT NOT NULL,
        user_id TEXT NOT NULL,
        generation BIGINT NOT NULL,
        PRIMARY KEY (provider, user_id)
    )",
    ),
    (
        6,
        "CREATE FUNCTION tokenkeep_tombstone() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO tokenkeep_tombstones VALUES (OLD.provider, OLD.user_id, OLD.generation)
        ON CONFLICT (provider, user_id) DO UPDATE
        SET generation = GREATEST(tokenkeep_tombstones.generation, excluded.generation);
        RETURN OLD;
    END
    $$",
    ),
    (
        7,
        "CREATE TRIGGER tokenkeep_tombstone AFTER DELETE ON tokenkeep_tokens
        FOR EACH ROW EXECUTE FUNCTION tokenkeep_tombstone()",
    ),
    (
        8,
        // The scopes the user authorised (null: those the row holds), and
        // when the provider may be asked again after a failure.
        "ALTER TABLE tokenkeep_tokens ADD COLUMN baseline_scopes TEXT, \
         ADD COLUMN retry_not_before BIGINT",
    ),
    (
        9,
        "ALTER TABLE tokenkeep_rescues ADD COLUMN baseline_scopes TEXT, \
         ADD COLUMN retry_not_before BIGINT",
    ),
];

/// How long one statement inside a locked transaction may go unanswered
/// (a write of one row, a commit) before the connection is presumed cut
/// off and the write is saved another way.
const STATEMENT_BOUND: std::time::Duration = std::time::Duration::from_secs(5);

/// Applies a rescued row if it follows the generation the row holds now,
/// and drops any rescue of the row either way (an older one is stale).
const APPLY_RESCUE_SQL: &str = "WITH r AS (DELETE FROM tokenkeep_rescues \
     WHERE provider = $1 AND user_id = $2 RETURNING *) \
     UPDATE tokenkeep_tokens AS t SET key_id = r.key_id, access_token = r.access_token, \
     refresh_token = r.refresh_token, access_token_expires_at = r.access_token_expires_at, \
     refresh_token_expires_at = r.refresh_token_expires_at, scopes = r.scopes, \
     obtained_at = r.obtained_at, generation = r.generation, failed_attempts = r.failed_attempts, \
     last_failure_at = r.last_failure_at, last_failure = r.last_failure, \
     last_success_at = r.last_success_at, refresh_started_at = r.refresh_started_at, \
     baseline_scopes = r.baseline_scopes, retry_not_before = r.retry_not_before, \
     updated_at = r.updated_at \
     FROM r WHERE t.provider = r.provider AND t.user_id = r.user_id AND t.generation = r.replaces";

/// Parks a written row for the next holder of the lock.
/// Its values are bound as the shared row insert binds them
/// (`rows::insert_row`), then the generation and the one it replaces.
const RESCUE_SQL: &str = "INSERT INTO tokenkeep_rescues (provider, user_id, key_id, \
     access_token, refresh_token, access_token_expires_at, refresh_token_expires_at, scopes, \
     obtained_at, failed_attempts, last_failure_at, last_failure, last_success_at, \
     refresh_started_at, baseline_scopes, retry_not_before, updated_at, generation, replaces) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, \
     $19) \
     ON CONFLICT (provider, user_id) DO UPDATE SET key_id = excluded.key_id, \
     access_token = excluded.access_token, refresh_token = excluded.refresh_token, \
     access_token_expires_at = excluded.access_token_expires_at, \
     refresh_token_expires_at = excluded.refresh_token_expires_at, scopes = excluded.scopes, \
     obtained_at = excluded.obtained_at, generation = excluded.generation, \
     failed_attempts = excluded.failed_attempts, last_failure_at = excluded.last_failure_at, \
     last_failure = excluded.last_failure, last_success_at = excluded.last_success_at, \
     refresh_started_at = excluded.refresh_started_at, \
     baseline_scopes = excluded.baseline_scopes, retry_not_before = excluded.retry_not_before, \
     updated_at = excluded.updated_at, replaces = excluded.replaces";

/// How long opening the store waits for the database to answer at all.
const FIRST_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Any constant distinct from other applications' advisory locks.
const MIGRATION_LOCK: i64 = 0x746f_6b65_6e6b;

/// A Postgres connection pool.
#[derive(Clone)]
pub struct PgStore {
    /// Unlocked reads and single-statement writes: the hot path.
    pub(crate) pool: PgPool,
    /// Transactions that wait for row locks. Kept apart so that callers
    /// queued behind one stale token never starve reads of other tokens.
    tx_pool: PgPool,
    /// The connection that writes refresh-start records. A refresher writes
    /// one while it holds a row lock, so it must not queue for a connection
    /// behind callers that are waiting for that very lock.
    markers: Arc<tokio::sync::Mutex<Option<PgConnection>>>,
    connect: Arc<PgConnectOptions>,
    lock_wait: std::time::Duration,
    /// The longest provider call: what lock-holding sessions may sit idle.
    hold: std::time::Duration,
}

/// The database's time, whole seconds, when the statement computes it.
macro_rules! db_now {
    () => {
        "floor(extract(epoch FROM clock_timestamp()))::bigint"
    };
}

/// One round trip: the row (if any) and the database's time.
const READ_SQL: &str = concat!(
    "SELECT t.provider, t.user_id, t.key_id, t.access_token, t.refresh_token, \
     t.access_token_expires_at, t.refresh_token_expires_at, t.scopes, t.obtained_at, t.generation, \
     t.failed_attempts, t.last_failure_at, t.last_failure, t.last_success_at, t.refresh_started_at, \
     t.baseline_scopes, t.retry_not_before, ",
    db_now!(),
    " AS db_now FROM (SELECT 1) AS one \
     LEFT JOIN tokenkeep_tokens AS t ON t.provider = $1 AND t.user_id = $2"
);

/// The row locked with `$mode`, and the database's time read after the
/// lock was granted (the materialised CTE runs, and waits, before the outer
/// projection). The refresh-start record is read by the next statement:
/// under READ COMMITTED a join here would see the table as it was before
/// the lock wait, and miss the record of a refresher that died while this
/// one waited.
macro_rules! lock_sql {
    ($mode:literal) => {
        concat!(
            "WITH t AS MATERIALIZED (SELECT * FROM tokenkeep_tokens \
             WHERE provider = $1 AND user_id = $2 FOR UPDATE",
            $mode,
            ") SELECT t.provider, t.user_id, t.key_id, t.access_token, t.refresh_token, \
             t.access_token_expires_at, t.refresh_token_expires_at, t.scopes, t.obtained_at, \
             t.generation, t.failed_attempts, t.last_failure_at, t.last_failure, \
             t.last_success_at, t.refresh_started_at, t.baseline_scopes, t.retry_not_before, ",
            db_now!(),
            " AS db_now FROM (SELECT 1) AS one LEFT JOIN t ON true"
        )
    };
}

/// Waits for the lock, at most `lock_timeout`.
const LOCK_SQL: &str = lock_sql!("");
/// Fails at once (55P03) when another transaction holds the lock.
const LOCK_NOWAIT_SQL: &str = lock_sql!(" NOWAIT");

pub(crate) mod rows {
    super::super::rows!(sqlx::Postgres, super::error);
}

impl std::fmt::Debug for PgStore {
    // Not derived: the connect options hold the database password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

impl PgStore {
    pub async fn open(url: &str, options: StoreOptions) -> Result<Self, StorageError> {
        let connect = PgConnectOptions::from_str(url)
            .map_err(|_| StorageError::Unavailable("the Postgres URL is not valid".into()))?
            .application_name("tokenkeep");
        // One connection first, so that a database that is down or refuses
        // us is reported at once (a pool retries until its acquire timeout).
        // It becomes the refresh-start writer's.
        let first = tokio::time::timeout(
            FIRST_CONNECT_TIMEOUT.min(options.lock_wait),
            PgConnection::connect_with(&connect),
        )
        .await
        .map_err(|_| StorageError::Unavailable("postgres: connect timed out".into()))?
        .map_err(error)?;
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.lock_wait)
            .after_connect(set_session(options.lock_wait, None))
            .connect_lazy_with(connect.clone());
        let tx_pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .min_connections(0)
            // Callers queue for a connection while others hold row locks.
            .acquire_timeout(options.lock_wait * 2)
            .after_connect(set_session(options.lock_wait, Some(options.hold)))
            .connect_lazy_with(connect.clone());
        let store = Self {
            pool,
            tx_pool,
            markers: Arc::new(tokio::sync::Mutex::new(Some(first))),
            connect: Arc::new(connect),
            lock_wait: options.lock_wait,
            hold: options.hold,
        };
        store.migrate().await?;
        Ok(store)
    }

    /// The database's time, for the clock before the first row is read.
    pub(crate) async fn database_now(&self) -> Result<i64, StorageError> {
        sqlx::query_scalar(concat!("SELECT ", db_now!()))
            .fetch_one(&self.pool)
            .await
            .map_err(error)
    }

    async fn migrate(&self) -> Result<(), StorageError> {
        let mut tx = self.pool.begin().await.map_err(error)?;
        // Another process may be migrating: wait for it, however long.
        sqlx::query("SET LOCAL lock_timeout = 0")
            .execute(&mut *tx)
            .await
            .map_err(error)?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(error)?;
        sqlx::query("CREATE TABLE IF NOT EXISTS tokenkeep_schema (version BIGINT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
            .execute(&mut *tx)
            .await
            .map_err(error)?;
        let current: Option<i64> = sqlx::query_scalar("SELECT max(version) FROM tokenkeep_schema")
            .fetch_one(&mut *tx)
            .await
            .map_err(error)?;
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| Some(*v) > current) {
            sqlx::query(sql).execute(&mut *tx).await.map_err(error)?;
            sqlx::query("INSERT INTO tokenkeep_schema (version) VALUES ($1)")
                .bind(version)
                .execute(&mut *tx)
                .await
                .map_err(error)?;
        }
        tx.commit().await.map_err(error)
    }

    /// Writes a refresh-start record on the dedicated connection, reconnecting
    /// after a failure.
    pub(crate) async fn record_refresh_start(
        &self,
        provider: &str,
        user_id: &str,
        generation: u64,
        at: i64,
    ) -> Result<(), StorageError> {
        // Bounded, and well inside the lock holder's idle allowance: a
        // half-open connection must not stall refreshes that hold row locks;
        // on timeout the connection is dropped and rebuilt.
        let wait = STATEMENT_BOUND;
        let mut slot = tokio::time::timeout(wait, self.markers.lock())
            .await
            .map_err(|_| StorageError::Unavailable("postgres: refresh-start writer busy".into()))?;
        // A kept connection may have died with a server restart: one more
        // try on a new connection before giving up.
        let tries = if slot.is_some() { 2 } else { 1 };
        let mut written = Ok(());
        for _ in 0..tries {
            let conn = match slot.as_mut() {
                Some(conn) => conn,
                None => slot.insert(
                    tokio::time::timeout(wait, PgConnection::connect_with(&*self.connect))
                        .await
                        .map_err(|_| {
                            StorageError::Unavailable("postgres: connect timed out".into())
                        })?
                        .map_err(error)?,
                ),
            };
            written = tokio::time::timeout(
                wait,
                rows::record_refresh_start(&mut *conn, provider, user_id, generation, at),
            )
            .await
            .unwrap_or_else(|_| {
                Err(StorageError::Unavailable(
                    "postgres: refresh-start write timed out".into(),
                ))
            });
            if written.is_ok() {
                break;
            }
            *slot = None;
        }
        written
    }

    /// A transaction; it takes a connection of the transaction pool at its
    /// first locking read.
    fn begin(&self) -> PgTransaction {
        PgTransaction {
            conn: None,
            session: None,
            written: None,
            store: self.clone(),
        }
    }

    /// A connection of its own, outside both pools, for saving a write.
    async fn connect_alone(&self) -> Result<PgConnection, StorageError> {
        let mut conn = bounded(STATEMENT_BOUND, PgConnection::connect_with(&self.connect)).await?;
        // It will hold the row lock: the same bounds as the pool's.
        let set = session_sql(self.lock_wait, Some(self.hold));
        bounded(
            STATEMENT_BOUND,
            sqlx::Executor::execute(&mut conn, set.as_str()),
        )
        .await?;
        Ok(conn)
    }
}

/// Runs a statement, but gives up on an answer after `bound`: a connection
/// that stops answering is reported as lost, not waited on.
async fn bounded<T>(
    bound: std::time::Duration,
    work: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, StorageError> {
    within(bound, async { work.await.map_err(error) }).await
}

/// [`bounded`] for work that already speaks the storage taxonomy.
async fn within<T>(
    bound: std::time::Duration,
    work: impl Future<Output = Result<T, StorageError>>,
) -> Result<T, StorageError> {
    match tokio::time::timeout(bound, work).await {
        Ok(done) => done,
        Err(_) => Err(StorageError::ConnectionLost(format!(
            "postgres: no answer within {} ms",
            bound.as_millis()
        ))),
    }
}

/// The future `after_connect` callbacks return.
type ConnectFuture<'c> = Pin<Box<dyn Future<Output = Result<(), sqlx::Error>> + Send + 'c>>;

/// Every connection waits at most the lock wait for a row lock: set once per
/// connection, not per transaction (a round trip each), and not as startup
/// options (which connection poolers such as PgBouncer refuse). Connections
/// that hold row locks also have the database end a transaction left idle
/// longer than the longest provider call (`hold`) plus a margin, and probe
/// a silent client: a refresher cut off from the database releases its
/// lock within that bound instead of TCP's two hours.
fn set_session(
    wait: std::time::Duration,
    hold: Option<std::time::Duration>,
) -> impl for<'c> Fn(&'c mut PgConnection, PoolConnectionMetadata) -> ConnectFuture<'c>
+ Send
+ Sync
+ 'static {
    let sql = session_sql(wait, hold);
    move |conn, _| {
        let sql = sql.clone();
        Box::pin(async move {
            sqlx::Executor::execute(conn, sql.as_str())
                .await
                .map(|_| ())
        })
    }
}

/// The session settings of [`set_session`], one round trip.
fn session_sql(wait: std::time::Duration, hold: Option<std::time::Duration>) -> String {
    let mut sql = format!("SET lock_timeout = '{}ms'", wait.as_millis());
    if let Some(hold) = hold {
        sql.push_str(&format!(
            "; SET idle_in_transaction_session_timeout = '{}ms'; \
             SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; \
             SET tcp_keepalives_count = 3",
            (hold + 2 * STATEMENT_BOUND).as_millis()
        ));
    }
    sql
}

/// Maps a Postgres failure onto the storage taxonomy.
pub(crate) fn error(e: sqlx::Error) -> StorageError {
    if let sqlx::Error::Database(db) = &e {
        let code = db.code();
        let code = code.as_deref().unwrap_or("");
        // 55P03 lock_not_available (lock_timeout), 40P01 deadlock_detected.
        if matches!(code, "55P03" | "40P01") {
            return StorageError::LockTimeout;
        }
        let message = format!("postgres: {}", db.message());
        // 08: connection exceptions; 57P01-57P03: the server ended the
        // session (pg_terminate_backend, shutdown); 25P03: idle in a
        // transaction too long.
        if code.starts_with("08") || code.starts_with("57P") || code == "25P03" {
            return StorageError::ConnectionLost(message);
        }
        return StorageError::Unavailable(message);
    }
    match e {
        sqlx::Error::PoolTimedOut => {
            StorageError::Unavailable("postgres: no connection free within the wait".into())
        }
        sqlx::Error::Io(io) => {
            StorageError::ConnectionLost(format!("postgres unreachable: {}", io.kind()))
        }
        sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => {
            StorageError::ConnectionLost(format!("postgres: {e}"))
        }
        sqlx::Error::Tls(_) => StorageError::Unavailable("postgres: TLS failure".into()),
        other => StorageError::Unavailable(format!("postgres: {other}")),
    }
}

impl super::Backend for PgStore {
    // read, list, insert, upsert and the conversation entries: the shared SQL.
    super::pool_backend_methods!();
    fn database_now(&self) -> BoxFuture<'_, Result<Option<i64>, StorageError>> {
        Box::pin(async move { PgStore::database_now(self).await.map(Some) })
    }
    fn delete<'a>(
        &'a self,
        provider: &'a str,
        user_id: &'a str,
    ) -> BoxFuture<'a, Result<bool, StorageError>> {
        Box::pin(async move {
            rows::delete_refresh_start(&self.pool, provider, user_id).await?;
            sqlx::query("DELETE FROM tokenkeep_rescues WHERE provider = $1 AND user_id = $2")
                .bind(provider)
                .bind(user_id)
                .execute(&self.pool)
                .await
                .map_err(error)?;
            rows::delete(&self.pool, provider, user_id).await
        })
    }
    fn begin(&self) -> BoxFuture<'_, Result<Box<dyn BackendTransaction>, StorageError>> {
        Box::pin(async move { Ok(Box::new(PgStore::begin(self)) as Box<dyn BackendTransaction>) })
    }
    fn record_refresh_start<'a>(
        &'a self,
        provider: &'a str,
        user_id: &'a str,
        generation: u64,
        at: i64,
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(PgStore::record_refresh_start(
            self, provider, user_id, generation, at,
        ))
    }
}

/// A connection a transaction runs on.
enum Conn {
    Pooled(sqlx::pool::PoolConnection<sqlx::Postgres>),
    /// Opened to save a write after the pooled one was cut off.
    Alone(PgConnection),
}

impl Conn {
    fn raw(&mut self) -> &mut PgConnection {
        match self {
            Conn::Pooled(c) => c,
            Conn::Alone(c) => c,
        }
    }

    /// Rolls back whatever it holds, then returns it to the pool (our own
    /// connection closes); one that does not answer is discarded.
    async fn roll_back(mut self) {
        let rolled_back = match &mut self {
            Conn::Pooled(pooled) => {
                bounded(
                    STATEMENT_BOUND,
                    sqlx::Executor::execute(&mut **pooled, "ROLLBACK"),
                )
                .await
            }
            Conn::Alone(_) => Err(StorageError::ConnectionLost("not pooled".into())),
        };
        match rolled_back {
            Ok(_) => drop(self),
            Err(_) => self.discard(),
        }
    }

    /// Closes it without a word to the server (which rolls back whatever
    /// it had not committed); a pooled one is never handed out again.
    fn discard(self) {
        match self {
            Conn::Pooled(c) => drop(c.detach()),
            Conn::Alone(c) => drop(c),
        }
    }
}

/// A Postgres transaction: the row's lock and its refresh-start record.
///
/// Every statement is bounded. If the connection is cut off after the
/// row was written (a partition, a dropped NAT entry, the backend
/// terminated), the write is not lost: it is parked in `tokenkeep_rescues`
/// on a new connection, the old backend is ended so that its lock goes at
/// once, and the row is locked again on the new connection, where the
/// rescue is applied if the row still holds the generation it replaces.
/// Whoever locks the row first applies it, so a waiter queued ahead of us
/// cannot spend the refresh token our write replaced.
struct PgTransaction {
    /// None until the first locking read; taken when the transaction ends.
    conn: Option<Conn>,
    /// The session serving `conn`, to end it if we lose sight of it.
    session: Option<Session>,
    /// The row written in this transaction and the generation it replaces.
    written: Option<(SealedRow, u64, i64)>,
    store: PgStore,
}

/// A server session in one transaction: the backend's pid and start, and
/// the transaction's start (behind a pooler a backend serves many clients;
/// only this transaction is ours to end).
struct Session {
    pid: i32,
    backend_start: String,
    xact_start: String,
}

/// Opens the transaction and tells which session serves it.
const BEGIN_SQL: &str = "BEGIN; SELECT pid, backend_start::text, xact_start::text \
     FROM pg_stat_activity WHERE pid = pg_backend_pid()";

impl Drop for PgTransaction {
    fn drop(&mut self) {
        // Not committed (an error, a cancelled caller): rolled back before
        // the connection serves anyone else, never returned mid-transaction.
        let Some(conn) = self.conn.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(conn.roll_back());
            }
            Err(_) => conn.discard(),
        }
    }
}

impl PgTransaction {
    fn conn(&mut self) -> Result<&mut PgConnection, StorageError> {
        self.conn
            .as_mut()
            .map(Conn::raw)
            .ok_or_else(|| StorageError::ConnectionLost("postgres: transaction lost".into()))
    }

    /// Takes the connection out of service after a failure.
    fn lose_connection(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.discard();
        }
    }

    /// Opens the transaction on a pooled connection, waiting for one unless
    /// `wait` is false (then none free is false: a caller who need not wait
    /// does not queue behind lock waiters for a connection either).
    async fn open(&mut self, wait: bool) -> Result<bool, StorageError> {
        if self.conn.is_some() {
            return Ok(true);
        }
        let pooled = if wait {
            self.store.tx_pool.acquire().await.map_err(error)?
        } else {
            // A free connection, or a new one if the pool has room: not a
            // place in the queue behind lock waiters.
            match tokio::time::timeout(super::TRY_ACQUIRE, self.store.tx_pool.acquire()).await {
                Ok(Ok(pooled)) => pooled,
                Ok(Err(_)) | Err(_) => return Ok(false),
            }
        };
        // Held by the transaction from here on, so that a cancelled BEGIN
        // is rolled back by Drop.
        self.conn = Some(Conn::Pooled(pooled));
        self.begin_session().await?;
        Ok(true)
    }

    /// `BEGIN` on the current connection, recording its session.
    async fn begin_session(&mut self) -> Result<(), StorageError> {
        let conn = self.conn()?;
        let row = bounded(STATEMENT_BOUND, sqlx::Executor::fetch_one(conn, BEGIN_SQL)).await;
        let session = row.and_then(|row| {
            use sqlx::Row as _;
            Ok(Session {
                pid: row.try_get(0).map_err(error)?,
                backend_start: row.try_get(1).map_err(error)?,
                xact_start: row.try_get(2).map_err(error)?,
            })
        });
        match session {
            Ok(session) => {
                self.session = Some(session);
                Ok(())
            }
            Err(e) => {
                self.lose_connection();
                Err(e)
            }
        }
    }

    /// Locks the row, waiting for it unless `wait` is false (then a lock
    /// held elsewhere is `LockTimeout` at once).
    async fn lock(
        &mut self,
        provider: &str,
        user_id: &str,
        wait: bool,
    ) -> Result<BackendRead, StorageError> {
        let (sql, bound) = if wait {
            (LOCK_SQL, self.store.lock_wait + STATEMENT_BOUND)
        } else {
            (LOCK_NOWAIT_SQL, STATEMENT_BOUND)
        };
        if !self.open(wait).await? {
            // No connection free at once: as busy as a held lock.
            return Err(StorageError::LockTimeout);
        }
        let conn = self.conn()?;
        let read = within(
            bound,
            rows::load_for_update(conn, None, sql, provider, user_id),
        )
        .await;
        let read = match read {
            Ok((Some(_), _)) => {
                // A rescue parked by a refresher that was cut off: applied
                // (if it follows this generation) before anyone reads the row.
                let applied = bounded(
                    STATEMENT_BOUND,
                    sqlx::query(APPLY_RESCUE_SQL)
                        .bind(provider)
                        .bind(user_id)
                        .execute(&mut *conn),
                )
                .await;
                match applied {
                    Ok(done) if done.rows_affected() > 0 => {
                        within(
                            STATEMENT_BOUND,
                            rows::load_for_update(conn, None, LOCK_SQL, provider, user_id),
                        )
                        .await
                    }
                    Ok(_) => read,
                    Err(e) => Err(e),
                }
            }
            other => other,
        };
        if matches!(read, Err(StorageError::ConnectionLost(_))) {
            self.lose_connection();
        }
        read
    }

    /// After the connection was lost with `row` written (or being written):
    /// parks it, ends the old backend and locks the row again on a new
    /// connection. True when the row then holds what we wrote.
    async fn save_written(
        &mut self,
        row: &SealedRow,
        expected: u64,
        now: i64,
    ) -> Result<bool, StorageError> {
        self.lose_connection();
        let mut alone = self.store.connect_alone().await?;
        let to_i64 = |v: u64| {
            i64::try_from(v)
                .map_err(|_| StorageError::Unavailable("generation out of range".into()))
        };
        bounded(
            STATEMENT_BOUND,
            rows::insert_row(RESCUE_SQL, row, now)
                .bind(to_i64(row.generation)?)
                .bind(to_i64(expected)?)
                .execute(&mut alone),
        )
        .await?;
        tracing::warn!(
            provider = %row.provider,
            "lost the database connection holding a refreshed row; saving it on a new one"
        );
        if let Some(old) = self.session.take() {
            // Its lock goes now, not when the server notices the silence.
            // Only if it is still in our transaction; best effort: it may
            // be gone already.
            let _ = bounded(
                STATEMENT_BOUND,
                sqlx::query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE pid = $1 AND backend_start = $2::timestamptz \
                     AND xact_start = $3::timestamptz",
                )
                .bind(old.pid)
                .bind(old.backend_start)
                .bind(old.xact_start)
                .execute(&mut alone),
            )
            .await;
        }
        self.conn = Some(Conn::Alone(alone));
        self.begin_session().await?;
        let (stored, _) = self.lock(&row.provider, &row.user_id, true).await?;
        Ok(stored
            .is_some_and(|s| s.generation == row.generation && s.access_token == row.access_token))
    }
}

impl BackendTransaction for PgTransaction {
    fn still_held(&mut self) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(async move {
            let conn = self.conn()?;
            let alive = bounded(STATEMENT_BOUND, sqlx::Executor::execute(conn, "SELECT 1")).await;
            if alive.is_err() {
                self.lose_connection();
            }
            alive.map(|_| ())
        })
    }
    fn load_for_update<'a>(
        &'a mut self,
        provider: &'a str,
        user_id: &'a str,
    ) -> BoxFuture<'a, Result<BackendRead, StorageError>> {
        Box::pin(self.lock(provider, user_id, true))
    }
    fn try_load_for_update<'a>(
        &'a mut self,
        provider: &'a str,
        user_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<BackendRead>, StorageError>> {
        Box::pin(async move {
            match self.lock(provider, user_id, false).await {
                Ok(read) => Ok(Some(read)),
                // NOWAIT's refusal aborted the transaction: roll it back,
                // and the connection can serve again.
                Err(StorageError::LockTimeout) => {
                    if let Some(conn) = self.conn.take() {
                        conn.roll_back().await;
                    }
                    Ok(None)
                }
                Err(e) => Err(e),
            }
        })
    }
    fn compare_and_set<'a>(
        &'a mut self,
        row: &'a SealedRow,
        expected: u64,
        now: i64,
    ) -> BoxFuture<'a, Result<bool, StorageError>> {
        Box::pin(async move {
            // A write opens the transaction if no read did.
            self.open(true).await?;
            let conn = self.conn()?;
            let set = within(
                STATEMENT_BOUND,
                rows::compare_and_set(conn, row, expected, now),
            )
            .await;
            match set {
                Ok(true) => {
                    self.written = Some((row.clone(), expected, now));
                    Ok(true)
                }
                Ok(false) => Ok(false),
                // It may or may not have been written: save it either way.
                Err(StorageError::ConnectionLost(_)) => {
                    let saved = self.save_written(row, expected, now).await?;
                    if saved {
                        self.written = Some((row.clone(), expected, now));
                    }
                    Ok(saved)
                }
                Err(e) => Err(e),
            }
        })
    }
    fn commit(mut self: Box<Self>) -> BoxFuture<'static, Result<(), StorageError>> {
        Box::pin(async move {
            let conn = self.conn()?;
            let committed = bounded(
                STATEMENT_BOUND,
                sqlx::Executor::execute(&mut *conn, "COMMIT"),
            )
            .await;
            match committed {
                Ok(_) => {
                    // Back to the pool (or closed, if it was our own).
                    drop(self.conn.take());
                    Ok(())
                }
                Err(StorageError::ConnectionLost(m)) => match self.written.take() {
                    // Nothing written: a lost read-only transaction is a rollback.
                    None => {
                        self.lose_connection();
                        Ok(())
                    }
                    Some((row, expected, now)) => {
                        if !self.save_written(&row, expected, now).await? {
                            return Err(StorageError::Unavailable(format!(
                                "{m}; the row changed before the refreshed tokens could be saved"
                            )));
                        }
                        let conn = self.conn()?;
                        bounded(
                            STATEMENT_BOUND,
                            sqlx::Executor::execute(&mut *conn, "COMMIT"),
                        )
                        .await?;
                        drop(self.conn.take());
                        Ok(())
                    }
                },
                Err(e) => {
                    self.lose_connection();
                    Err(e)
                }
            }
        })
    }
}
