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
];

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
    lock_wait_ms: u128,
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
     t.failed_attempts, t.last_failure_at, t.last_failure, t.last_success_at, t.refresh_started_at, ",
    db_now!(),
    " AS db_now FROM (SELECT 1) AS one \
     LEFT JOIN tokenkeep_tokens AS t ON t.provider = $1 AND t.user_id = $2"
);

/// The row locked, and the database's time read after the lock was granted
/// (the materialised CTE runs, and waits, before the outer projection). The
/// refresh-start record is read by the next statement: under READ COMMITTED
/// a join here would see the table as it was before the lock wait, and miss
/// the record of a refresher that died while this one waited.
const LOCK_SQL: &str = concat!(
    "WITH t AS MATERIALIZED (SELECT * FROM tokenkeep_tokens \
     WHERE provider = $1 AND user_id = $2 FOR UPDATE) \
     SELECT t.provider, t.user_id, t.key_id, t.access_token, t.refresh_token, \
     t.access_token_expires_at, t.refresh_token_expires_at, t.scopes, t.obtained_at, t.generation, \
     t.failed_attempts, t.last_failure_at, t.last_failure, t.last_success_at, t.refresh_started_at, ",
    db_now!(),
    " AS db_now FROM (SELECT 1) AS one LEFT JOIN t ON true"
);

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
            .after_connect(set_lock_timeout(options.lock_wait))
            .connect_lazy_with(connect.clone());
        let tx_pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .min_connections(0)
            // Callers queue for a connection while others hold row locks.
            .acquire_timeout(options.lock_wait * 2)
            .after_connect(set_lock_timeout(options.lock_wait))
            .connect_lazy_with(connect.clone());
        let store = Self {
            pool,
            tx_pool,
            markers: Arc::new(tokio::sync::Mutex::new(Some(first))),
            connect: Arc::new(connect),
            lock_wait_ms: options.lock_wait.as_millis(),
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
        // Bounded: a half-open connection must not stall refreshes that hold
        // row locks; on timeout the connection is dropped and rebuilt.
        let wait = std::time::Duration::from_millis(self.lock_wait_ms as u64);
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

    pub(crate) async fn begin(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, StorageError> {
        self.tx_pool.begin().await.map_err(error)
    }
}

/// The future `after_connect` callbacks return.
type ConnectFuture<'c> = Pin<Box<dyn Future<Output = Result<(), sqlx::Error>> + Send + 'c>>;

/// Every connection waits at most the lock wait for a row lock: set once per
/// connection, not per transaction (a round trip each), and not as a startup
/// option (which connection poolers such as PgBouncer refuse).
fn set_lock_timeout(
    wait: std::time::Duration,
) -> impl for<'c> Fn(&'c mut PgConnection, PoolConnectionMetadata) -> ConnectFuture<'c>
+ Send
+ Sync
+ 'static {
    let sql = format!("SET lock_timeout = '{}ms'", wait.as_millis());
    move |conn, _| {
        let sql = sql.clone();
        Box::pin(async move { sqlx::query(&sql).execute(conn).await.map(|_| ()) })
    }
}

/// Maps a Postgres failure onto the storage taxonomy.
pub(crate) fn error(e: sqlx::Error) -> StorageError {
    if let sqlx::Error::Database(db) = &e {
        // 55P03 lock_not_available (lock_timeout), 40P01 deadlock_detected.
        if matches!(db.code().as_deref(), Some("55P03") | Some("40P01")) {
            return StorageError::LockTimeout;
        }
        return StorageError::Unavailable(format!("postgres: {}", db.message()));
    }
    StorageError::Unavailable(match e {
        sqlx::Error::PoolTimedOut => "postgres: no connection free within the wait".into(),
        sqlx::Error::Io(io) => format!("postgres unreachable: {}", io.kind()),
        sqlx::Error::Tls(_) => "postgres: TLS failure".into(),
        other => format!("postgres: {other}"),
    })
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
            rows::delete(&self.pool, provider, user_id).await
        })
    }
    fn begin(&self) -> BoxFuture<'_, Result<Box<dyn BackendTransaction>, StorageError>> {
        Box::pin(async move {
            let tx = PgStore::begin(self).await?;
            Ok(Box::new(PgTransaction(tx)) as Box<dyn BackendTransaction>)
        })
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

/// A Postgres transaction: the row's lock and its refresh-start record.
struct PgTransaction(sqlx::Transaction<'static, sqlx::Postgres>);

impl BackendTransaction for PgTransaction {
    fn load_for_update<'a>(
        &'a mut self,
        provider: &'a str,
        user_id: &'a str,
    ) -> BoxFuture<'a, Result<BackendRead, StorageError>> {
        Box::pin(rows::load_for_update(&mut self.0, None, provider, user_id))
    }
    fn compare_and_set<'a>(
        &'a mut self,
        row: &'a SealedRow,
        expected: u64,
        now: i64,
    ) -> BoxFuture<'a, Result<bool, StorageError>> {
        Box::pin(rows::compare_and_set(&mut self.0, row, expected, now))
    }
    fn commit(self: Box<Self>) -> BoxFuture<'static, Result<(), StorageError>> {
        Box::pin(async move { self.0.commit().await.map_err(error) })
    }
}
