//! SQLite: the zero-setup default, one file shared by the runtimes of a machine.
//!
//! WAL lets readers proceed while a refresh holds the write lock; a locking
//! read takes that lock up front (`BEGIN IMMEDIATE`) and waits for it at most
//! the lock wait (the busy timeout).

use super::{
    BackendRead, BackendTransaction, BoxFuture, ConversationEntry, RowKey, SealedRow, StorageError,
    StoreOptions,
};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE tokenkeep_tokens (
        provider TEXT NOT NULL,
        user_id TEXT NOT NULL,
        key_id TEXT NOT NULL,
        access_token BLOB NOT NULL,
        refresh_token BLOB,
        access_token_expires_at INTEGER,
        refresh_token_expires_at INTEGER,
        scopes TEXT NOT NULL,
        obtained_at INTEGER NOT NULL,
        generation INTEGER NOT NULL,
        failed_attempts INTEGER NOT NULL DEFAULT 0,
        last_failure_at INTEGER,
        last_failure TEXT,
        last_success_at INTEGER,
        refresh_started_at INTEGER,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (provider, user_id)
    ) WITHOUT ROWID",
    ),
    (
        2,
        "CREATE TABLE tokenkeep_conversations (
        conversation_id TEXT NOT NULL,
        provider TEXT NOT NULL,
        user_id TEXT NOT NULL,
        scopes TEXT NOT NULL,
        generation INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (conversation_id, provider)
    ) WITHOUT ROWID",
    ),
];

/// A pool over one SQLite file.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    /// Unlocked reads and single-statement writes: the hot path.
    pub(crate) pool: SqlitePool,
    /// Transactions that take the write lock. Kept apart so that callers
    /// waiting for it never starve reads (WAL readers do not wait).
    tx_pool: SqlitePool,
    /// Refresh-start records live in a second file: SQLite locks a whole
    /// database, and they must be written while the row's transaction holds
    /// the main file's write lock.
    pub(crate) markers: SqlitePool,
}

/// The owner's clock is the database's: no `db_now`. The write lock is the
/// transaction's (`BEGIN IMMEDIATE`); refresh-start records are in their own
/// file, so `started_at` is read separately.
const READ_SQL: &str = "SELECT t.provider, t.user_id, t.key_id, t.access_token, t.refresh_token, \
     t.access_token_expires_at, t.refresh_token_expires_at, t.scopes, t.obtained_at, t.generation, \
     t.failed_attempts, t.last_failure_at, t.last_failure, t.last_success_at, t.refresh_started_at, \
     NULL AS db_now FROM (SELECT 1) AS one \
     LEFT JOIN tokenkeep_tokens AS t ON t.provider = $1 AND t.user_id = $2";
const LOCK_SQL: &str = READ_SQL;

pub(crate) mod rows {
    super::super::rows!(sqlx::Sqlite, super::error);
}

impl SqliteStore {
    pub async fn open(path: &str, options: StoreOptions) -> Result<Self, StorageError> {
        if let Some(dir) = std::path::Path::new(path)
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir).map_err(|e| {
                StorageError::Unavailable(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let store = Self {
            pool: connect(path, options).await?,
            tx_pool: connect(path, options).await?,
            markers: connect(&format!("{path}-refresh-starts"), options).await?,
        };
        store.migrate().await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS tokenkeep_refresh_starts (
                provider TEXT NOT NULL,
                user_id TEXT NOT NULL,
                generation INTEGER NOT NULL,
                started_at INTEGER NOT NULL,
                PRIMARY KEY (provider, user_id)
            ) WITHOUT ROWID",
        )
        .execute(&store.markers)
        .await
        .map_err(error)?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StorageError> {
        // Most starts find the schema current: a read, which waits for no
        // refresh holding the write lock. Only a start that must migrate
        // takes the lock.
        let latest = MIGRATIONS.last().map(|(v, _)| *v);
        let current: Option<i64> = sqlx::query_scalar("SELECT max(version) FROM tokenkeep_schema")
            .fetch_one(&self.pool)
            .await
            .unwrap_or(None);
        if current >= latest {
            return Ok(());
        }
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(error)?;
        sqlx::query("CREATE TABLE IF NOT EXISTS tokenkeep_schema (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)")
            .execute(&mut *tx)
            .await
            .map_err(error)?;
        let current: Option<i64> = sqlx::query_scalar("SELECT max(version) FROM tokenkeep_schema")
            .fetch_one(&mut *tx)
            .await
            .map_err(error)?;
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| Some(*v) > current) {
            sqlx::query(sql).execute(&mut *tx).await.map_err(error)?;
            sqlx::query("INSERT INTO tokenkeep_schema (version, applied_at) VALUES ($1, $2)")
                .bind(version)
                .bind(crate::clock::system_now())
                .execute(&mut *tx)
                .await
                .map_err(error)?;
        }
        tx.commit().await.map_err(error)
    }

    pub(crate) async fn begin(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, StorageError> {
        self.tx_pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(error)
    }
}

async fn connect(path: &str, options: StoreOptions) -> Result<SqlitePool, StorageError> {
    let connect = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(options.lock_wait);
    SqlitePoolOptions::new()
        .max_connections(options.max_connections.min(8))
        .acquire_timeout(options.lock_wait * 2)
        .connect_with(connect)
        .await
        .map_err(error)
}

/// Maps a SQLite failure onto the storage taxonomy.
pub(crate) fn error(e: sqlx::Error) -> StorageError {
    if let sqlx::Error::Database(db) = &e {
        // SQLITE_BUSY (5) and its extended codes: the busy timeout ran out.
        let code = db.code().and_then(|c| c.parse::<i32>().ok()).unwrap_or(-1);
        if code & 0xff == 5 || code & 0xff == 6 {
            return StorageError::LockTimeout;
        }
        return StorageError::Unavailable(format!("sqlite: {}", db.message()));
    }
    StorageError::Unavailable(match e {
        sqlx::Error::PoolTimedOut => "sqlite: no connection free within the wait".into(),
        sqlx::Error::Io(io) => format!("sqlite: {}", io.kind()),
        other => format!("sqlite: {other}"),
    })
}

impl super::Backend for SqliteStore {
    // read, list, insert, upsert and the conversation entries: the shared SQL.
    super::pool_backend_methods!();
    fn database_now(&self) -> BoxFuture<'_, Result<Option<i64>, StorageError>> {
        // One owner: its clock is the database's.
        Box::pin(async { Ok(None) })
    }
    fn delete<'a>(
        &'a self,
        provider: &'a str,
        user_id: &'a str,
    ) -> BoxFuture<'a, Result<bool, StorageError>> {
        Box::pin(async move {
            rows::delete_refresh_start(&self.markers, provider, user_id).await?;
            rows::delete(&self.pool, provider, user_id).await
        })
    }
    fn begin(&self) -> BoxFuture<'_, Result<Box<dyn BackendTransaction>, StorageError>> {
        Box::pin(async move {
            let tx = SqliteStore::begin(self).await?;
            Ok(Box::new(SqliteTransaction {
                tx,
                markers: self.markers.clone(),
            }) as Box<dyn BackendTransaction>)
        })
    }
    fn record_refresh_start<'a>(
        &'a self,
        provider: &'a str,
        user_id: &'a str,
        generation: u64,
        at: i64,
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(rows::record_refresh_start(
            &self.markers,
            provider,
            user_id,
            generation,
            at,
        ))
    }
}

/// A SQLite transaction holding the file's write lock; refresh-start
/// records come from their own file.
struct SqliteTransaction {
    tx: sqlx::Transaction<'static, sqlx::Sqlite>,
    markers: SqlitePool,
}

impl BackendTransaction for SqliteTransaction {
    fn load_for_update<'a>(
        &'a mut self,
        provider: &'a str,
        user_id: &'a str,
    ) -> BoxFuture<'a, Result<BackendRead, StorageError>> {
        Box::pin(rows::load_for_update(
            &mut self.tx,
            Some(&self.markers),
            provider,
            user_id,
        ))
    }
    fn compare_and_set<'a>(
        &'a mut self,
        row: &'a SealedRow,
        expected: u64,
        now: i64,
    ) -> BoxFuture<'a, Result<bool, StorageError>> {
        Box::pin(rows::compare_and_set(&mut self.tx, row, expected, now))
    }
    fn commit(self: Box<Self>) -> BoxFuture<'static, Result<(), StorageError>> {
        Box::pin(async move { self.tx.commit().await.map_err(error) })
    }
}
