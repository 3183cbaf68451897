//! SQLite: the zero-setup default, one file shared by the runtimes of a machine.
//!
//! WAL lets readers proceed while a refresh holds the write lock; a locking
//! read takes that lock up front (`BEGIN IMMEDIATE`) and waits for it at most
//! the lock wait (the busy timeout).

use super::outbox;
use super::{
    BackendRead, BackendTransaction, BoxFuture, ConversationEntry, RowKey, SealedRow, StorageError,
    StoreOptions, StoredColumns, refuse_newer,
};
use super::{Registration, SealedProofKey, authorizations, clients, proof_keys};
use crate::audit;
use crate::clock::SharedClock;
use crate::events::Event;
use crate::grant_cache::{ChangeCounter, GrantCache};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One schema migration, from the SQL files both hosts read (the Node
/// host in `hosts/node` applies the same files to the same file).
macro_rules! migration {
    ($version:literal, $file:literal) => {
        (
            $version,
            include_str!(concat!("../../schema/sqlite/", $file)),
        )
    };
}

/// The refresh-start records' file (`<database>-refresh-starts`).
const REFRESH_STARTS_SCHEMA: &str = include_str!("../../schema/sqlite/refresh-starts.sql");
/// The audit log's file (`<database>-audit`).
const AUDIT_SCHEMA: &str = include_str!("../../schema/sqlite/audit.sql");

const MIGRATIONS: &[(i64, &str)] = &[
    migration!(1, "0001.sql"),
    migration!(2, "0002.sql"),
    migration!(3, "0003.sql"),
    migration!(4, "0004.sql"),
    migration!(5, "0005.sql"),
    migration!(6, "0006.sql"),
    migration!(7, "0007.sql"),
    migration!(8, "0008.sql"),
    migration!(9, "0009.sql"),
    migration!(10, "0010.sql"),
    migration!(11, "0011.sql"),
    migration!(12, "0012.sql"),
    migration!(13, "0013.sql"),
    migration!(14, "0014.sql"),
    migration!(15, "0015.sql"),
    migration!(16, "0016.sql"),
    migration!(17, "0017.sql"),
    migration!(18, "0018.sql"),
    migration!(19, "0019.sql"),
    migration!(20, "0020.sql"),
    migration!(21, "0021.sql"),
    migration!(22, "0022.sql"),
    migration!(23, "0023.sql"),
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
    /// The audit log, in a file of its own: its writes neither wait for
    /// the tokens' write lock nor move the change counter that keeps the
    /// grant cache current.
    audit: SqlitePool,
    /// The busy timeout: how long a locking read waits for the write lock.
    lock_wait_ms: u128,
    /// Unlocked point reads, in the calling thread (and the file's path,
    /// for the grant cache's change counter).
    readers: Arc<Readers>,
}

/// The owner's clock is the database's: no `db_now`. The write lock is the
/// transaction's (`BEGIN IMMEDIATE`); refresh-start records are in their own
/// file, so `started_at` is read separately.
const READ_SQL: &str = "SELECT t.provider, t.user_id, t.key_id, t.access_token, t.refresh_token, \
     t.access_token_expires_at, t.refresh_token_expires_at, t.scopes, t.obtained_at, t.generation, \
     t.failed_attempts, t.last_failure_at, t.last_failure, t.last_success_at, t.refresh_started_at, \
     t.baseline_scopes, t.retry_not_before, \
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
            audit: connect(&format!("{path}-audit"), options).await?,
            lock_wait_ms: options.lock_wait.as_millis(),
            readers: Arc::new(Readers {
                path: path.to_string(),
                idle: Mutex::default(),
                keep: options.max_connections.clamp(1, 8) as usize,
            }),
        };
        store.migrate().await?;
        sqlx::query(REFRESH_STARTS_SCHEMA)
            .execute(&store.markers)
            .await
            .map_err(error)?;
        sqlx::raw_sql(AUDIT_SCHEMA)
            .execute(&store.audit)
            .await
            .map_err(error)?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StorageError> {
        // Most starts find the schema current: a read, which waits for no
        // refresh holding the write lock. Only a start that must migrate
        // takes the lock.
        let latest = super::latest_schema(MIGRATIONS);
        let current: Option<i64> = sqlx::query_scalar("SELECT max(version) FROM tokenkeep_schema")
            .fetch_one(&self.pool)
            .await
            .unwrap_or(None);
        refuse_newer(current, latest)?;
        if current >= Some(latest) {
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
        refuse_newer(current, latest)?;
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

    /// A transaction: it takes a connection and the write lock at its first
    /// locking read (`BEGIN IMMEDIATE`), waiting for them or not.
    fn begin(&self) -> SqliteTransaction {
        SqliteTransaction {
            conn: None,
            begun: false,
            unsure: false,
            tx_pool: self.tx_pool.clone(),
            markers: self.markers.clone(),
            lock_wait_ms: self.lock_wait_ms,
        }
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

/// The database's time in the outbox's SQL (the owner's clock).
const SQLITE_NOW: &str = "unixepoch()";

impl SqliteStore {
    /// A lease or delivery statement of the outbox: whether it wrote a row.
    async fn outbox_write(
        &self,
        sql: &str,
        webhook: &str,
        holder: &str,
        n: i64,
    ) -> Result<bool, StorageError> {
        let sql = outbox::with_now(sql, SQLITE_NOW);
        let done = sqlx::query(&sql)
            .bind(webhook)
            .bind(holder)
            .bind(n)
            .execute(&self.pool)
            .await
            .map_err(error)?;
        Ok(done.rows_affected() == 1)
    }
}

impl super::Backend for SqliteStore {
    fn lease_webhook<'a>(
        &'a self,
        webhook: &'a str,
        holder: &'a str,
        seconds: i64,
    ) -> BoxFuture<'a, Result<bool, StorageError>> {
        Box::pin(self.outbox_write(outbox::LEASE, webhook, holder, seconds))
    }
    fn next_event<'a>(
        &'a self,
        webhook: &'a str,
    ) -> BoxFuture<'a, Result<Option<Event>, StorageError>> {
        Box::pin(async move {
            let row: Option<super::EventColumns> = sqlx::query_as(outbox::NEXT)
                .bind(webhook)
                .fetch_optional(&self.pool)
                .await
                .map_err(error)?;
            Ok(row.map(super::event))
        })
    }
    fn mark_delivered<'a>(
        &'a self,
        webhook: &'a str,
        holder: &'a str,
        event_id: i64,
    ) -> BoxFuture<'a, Result<bool, StorageError>> {
        Box::pin(self.outbox_write(outbox::MARK, webhook, holder, event_id))
    }
    fn pending_events<'a>(&'a self, webhook: &'a str) -> BoxFuture<'a, Result<u64, StorageError>> {
        Box::pin(async move {
            let n: i64 = sqlx::query_scalar(outbox::PENDING)
                .bind(webhook)
                .fetch_one(&self.pool)
                .await
                .map_err(error)?;
            Ok(n.max(0) as u64)
        })
    }
    fn registration<'a>(
        &'a self,
        provider: &'a str,
    ) -> BoxFuture<'a, Result<Option<Registration>, StorageError>> {
        Box::pin(async move {
            let row: Option<(String, String, String, String, i64)> = sqlx::query_as(clients::GET)
                .bind(provider)
                .fetch_optional(&self.pool)
                .await
                .map_err(error)?;
            Ok(row.map(
                |(provider, resource, metadata, client_id, registered_at)| Registration {
                    provider,
                    resource,
                    metadata,
                    client_id,
                    registered_at,
                },
            ))
        })
    }
    fn register_client<'a>(
        &'a self,
        r: &'a Registration,
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            sqlx::query(clients::PUT)
                .bind(&r.provider)
                .bind(&r.resource)
                .bind(&r.metadata)
                .bind(&r.client_id)
                .bind(r.registered_at)
                .execute(&self.pool)
                .await
                .map_err(error)?;
            Ok(())
        })
    }
    fn proof_key<'a>(
        &'a self,
        provider: &'a str,
        user_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<SealedProofKey>, StorageError>> {
        Box::pin(async move {
            let row: Option<ProofKeyColumns> = sqlx::query_as(proof_keys::GET)
                .bind(provider)
                .bind(user_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(error)?;
            Ok(row.map(sealed_proof_key))
        })
    }
    fn put_proof_key<'a>(
        &'a self,
        key: &'a SealedProofKey,
        now: i64,
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            sqlx::query(proof_keys::PUT)
                .bind(&key.provider)
                .bind(&key.user_id)
                .bind(&key.key_id)
                .bind(&key.sealed)
                .bind(now)
                .execute(&self.pool)
                .await
                .map_err(error)?;
            Ok(())
        })
    }
    fn proof_keys_to_reseal<'a>(
        &'a self,
        active: &'a str,
        after: &'a RowKey,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<SealedProofKey>, StorageError>> {
        Box::pin(async move {
            let rows: Vec<ProofKeyColumns> = sqlx::query_as(proof_keys::TO_RESEAL)
                .bind(active)
                .bind(&after.provider)
                .bind(&after.user_id)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err(error)?;
            Ok(rows.into_iter().map(sealed_proof_key).collect())
        })
    }
    fn reseal_proof_key<'a>(
        &'a self,
        old_key_id: &'a str,
        key: &'a SealedProofKey,
    ) -> BoxFuture<'a, Result<bool, StorageError>> {
        Box::pin(async move {
            let n = sqlx::query(proof_keys::RESEAL)
                .bind(&key.provider)
                .bind(&key.user_id)
                .bind(old_key_id)
                .bind(&key.key_id)
                .bind(&key.sealed)
                .execute(&self.pool)
                .await
                .map_err(error)?
                .rows_affected();
            Ok(n == 1)
        })
    }
    fn consume_authorization<'a>(
        &'a self,
        id: &'a str,
        expires_at: i64,
        now: i64,
    ) -> BoxFuture<'a, Result<bool, StorageError>> {
        Box::pin(async move {
            sqlx::query(authorizations::PRUNE)
                .bind(now)
                .execute(&self.pool)
                .await
                .map_err(error)?;
            let n = sqlx::query(authorizations::CONSUME)
                .bind(id)
                .bind(expires_at)
                .execute(&self.pool)
                .await
                .map_err(error)?
                .rows_affected();
            Ok(n == 1)
        })
    }
    fn register_webhook<'a>(&'a self, webhook: &'a str) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            sqlx::query(outbox::REGISTER)
                .bind(webhook)
                .execute(&self.pool)
                .await
                .map_err(error)?;
            Ok(())
        })
    }
    fn prune_events(&self, before: i64) -> BoxFuture<'_, Result<u64, StorageError>> {
        Box::pin(async move {
            let mut tx = self.pool.begin().await.map_err(error)?;
            let n = sqlx::query(outbox::PRUNE_EVENTS)
                .bind(before)
                .execute(&mut *tx)
                .await
                .map_err(error)?
                .rows_affected();
            sqlx::query(outbox::PRUNE_DELIVERIES)
                .execute(&mut *tx)
                .await
                .map_err(error)?;
            tx.commit().await.map_err(error)?;
            Ok(n)
        })
    }
    fn announced<'a>(
        &'a self,
        first: &'a RowKey,
        last: &'a RowKey,
    ) -> BoxFuture<'a, Result<Vec<crate::events::Announced>, StorageError>> {
        Box::pin(async move {
            let rows: Vec<(String, String, i64, Option<String>)> =
                sqlx::query_as(outbox::ANNOUNCED)
                    .bind(&first.provider)
                    .bind(&first.user_id)
                    .bind(&last.provider)
                    .bind(&last.user_id)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(error)?;
            Ok(rows.into_iter().map(super::announced).collect())
        })
    }
    fn announce<'a>(
        &'a self,
        a: &'a crate::events::Announcement,
    ) -> BoxFuture<'a, Result<bool, StorageError>> {
        Box::pin(async move {
            let generation = super::to_i64(a.generation)?;
            // The write lock, waited for at most the lock wait: a refresh
            // holding it decides the row's state itself.
            let mut tx = self
                .tx_pool
                .begin_with("BEGIN IMMEDIATE")
                .await
                .map_err(error)?;
            let changed = sqlx::query(
                "UPDATE tokenkeep_tokens SET announced_state = $5 \
                 WHERE provider = $1 AND user_id = $2 AND generation = $3 \
                 AND announced_state IS $4",
            )
            .bind(&a.row.provider)
            .bind(&a.row.user_id)
            .bind(generation)
            .bind(&a.from)
            .bind(a.to)
            .execute(&mut *tx)
            .await
            .map_err(error)?
            .rows_affected();
            if changed != 1 {
                return Ok(false);
            }
            sqlx::query(
                "INSERT INTO tokenkeep_events \
                 (at, provider, user_id, state, reason, generation, conversations) \
                 VALUES (unixepoch(), $1, $2, $3, $4, $5, \
                 (SELECT json_group_array(conversation_id) FROM (SELECT conversation_id \
                  FROM tokenkeep_conversations WHERE provider = $1 AND user_id = $2 \
                  ORDER BY conversation_id)))",
            )
            .bind(&a.row.provider)
            .bind(&a.row.user_id)
            .bind(a.to)
            .bind(&a.reason)
            .bind(generation)
            .execute(&mut *tx)
            .await
            .map_err(error)?;
            tx.commit().await.map_err(error)?;
            Ok(true)
        })
    }
    fn pool_use(&self) -> crate::metrics::PoolUse {
        let mut total = crate::metrics::PoolUse::default();
        for pool in [&self.pool, &self.tx_pool] {
            total.open += u64::from(pool.size());
            total.idle += pool.num_idle() as u64;
            total.max += u64::from(pool.options().get_max_connections());
        }
        total
    }
    // list, insert, upsert and the conversation entries: the shared SQL.
    super::pool_backend_methods!();
    fn read<'a>(
        &'a self,
        provider: &'a str,
        user_id: &'a str,
    ) -> BoxFuture<'a, Result<BackendRead, StorageError>> {
        Box::pin(async move {
            match self.readers.read(provider, user_id) {
                Some(read) => read,
                // Busy for a moment (a WAL recovery), or not readable here:
                // through the pool, which waits.
                None => rows::read(&self.pool, provider, user_id).await,
            }
        })
    }
    fn append_audit<'a>(
        &'a self,
        entries: &'a [audit::Entry],
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            let mut tx = self.audit.begin().await.map_err(error)?;
            for e in entries {
                sqlx::query(
                    "INSERT INTO tokenkeep_audit \
                     (at, caller, action, provider, user_id, generation, outcome) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(e.at)
                .bind(&e.caller)
                .bind(e.action.name())
                .bind(&e.provider)
                .bind(&e.user_id)
                .bind(e.generation.map(|g| i64::try_from(g).unwrap_or(i64::MAX)))
                .bind(&e.outcome)
                .execute(&mut *tx)
                .await
                .map_err(error)?;
            }
            tx.commit().await.map_err(error)
        })
    }
    fn audit<'a>(
        &'a self,
        filter: &'a audit::Filter,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<audit::Entry>, StorageError>> {
        Box::pin(async move {
            // SQLite has no ::TYPE casts: the shared SQL without them.
            let sql = super::AUDIT_SQL
                .replace("::TEXT", "")
                .replace("::BIGINT", "");
            let rows: Vec<super::AuditColumns> = sqlx::query_as(&sql)
                .bind(&filter.provider)
                .bind(&filter.user_id)
                .bind(&filter.caller)
                .bind(filter.since)
                .bind(filter.until)
                .bind(filter.after_id)
                .bind(i64::from(limit))
                .fetch_all(&self.audit)
                .await
                .map_err(error)?;
            rows.into_iter().map(super::audit_entry).collect()
        })
    }
    fn prune_audit(&self, before: i64) -> BoxFuture<'_, Result<u64, StorageError>> {
        Box::pin(async move {
            sqlx::query("DELETE FROM tokenkeep_audit WHERE at < $1")
                .bind(before)
                .execute(&self.audit)
                .await
                .map(|r| r.rows_affected())
                .map_err(error)
        })
    }
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
        Box::pin(
            async move { Ok(Box::new(SqliteStore::begin(self)) as Box<dyn BackendTransaction>) },
        )
    }
    fn schema_version(&self) -> i64 {
        super::latest_schema(MIGRATIONS)
    }
    fn grant_cache(
        &self,
        _clock: Arc<SharedClock>,
    ) -> Result<(Arc<GrantCache>, Option<super::listener::AbortOnDrop>), StorageError> {
        let counter = DataVersion::open(&self.readers.path)?;
        Ok((Arc::new(GrantCache::counting(Box::new(counter))), None))
    }
}

/// Read-only connections for the hot path's point read, run in the calling
/// thread: a few microseconds in the C library, where sqlx sends every
/// statement to a worker thread of its connection and back. A WAL reader
/// never waits for the write lock; one that would wait (busy_timeout 0),
/// or fails in any way, hands the read back to the pool.
#[derive(Debug)]
struct Readers {
    path: String,
    idle: Mutex<Vec<rusqlite::Connection>>,
    /// Idle connections kept at most.
    keep: usize,
}

impl Readers {
    /// None when it could not be read here (busy, no connection, any
    /// failure of the C library's).
    fn read(&self, provider: &str, user_id: &str) -> Option<Result<BackendRead, StorageError>> {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match idle {
            Some(conn) => conn,
            None => read_only(&self.path).ok()?,
        };
        let read = (|| {
            let mut statement = conn.prepare_cached(READ_SQL)?;
            statement.query_row([provider, user_id], |r| {
                let present: Option<String> = r.get("provider")?;
                match present {
                    None => Ok(None),
                    Some(_) => Ok(Some(super::stored_columns!(ByName(r)))),
                }
            })
        })();
        // Any failure (busy, or anything else) goes to the pool, which
        // waits and names errors the one way; this connection is dropped.
        let read = read.ok()?;
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.keep {
            idle.push(conn);
        }
        drop(idle);
        let row = match read.map(StoredColumns::into_row).transpose() {
            Ok(row) => row,
            Err(e) => {
                return Some(Err(StorageError::Unavailable(format!(
                    "sqlite: a stored row is malformed: {e}"
                ))));
            }
        };
        // The owner's clock is the database's: no time of its own.
        Some(Ok((row, None)))
    }
}

/// A rusqlite row read by column name, as [`super::stored_columns`] reads.
struct ByName<'r, 's>(&'r rusqlite::Row<'s>);

impl ByName<'_, '_> {
    fn try_get<T: rusqlite::types::FromSql>(&self, name: &str) -> rusqlite::Result<T> {
        self.0.get(name)
    }
}

/// A connection that never writes and never waits.
fn read_only(path: &str) -> Result<rusqlite::Connection, StorageError> {
    use rusqlite::OpenFlags;
    let conn = rusqlite::Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| StorageError::Unavailable(format!("sqlite: {e}")))?;
    conn.busy_timeout(Duration::ZERO)
        .map_err(|e| StorageError::Unavailable(format!("sqlite: {e}")))?;
    Ok(conn)
}

/// The file's count of other connections' commits (`PRAGMA data_version`),
/// on a read-only connection of its own that never writes, so that every
/// commit of every process (and of this one's pools) moves it.
struct DataVersion(Mutex<rusqlite::Connection>);

impl DataVersion {
    fn open(path: &str) -> Result<Self, StorageError> {
        // Never waits: a file busy for a moment (a WAL recovery) serves
        // from the database instead.
        Ok(Self(Mutex::new(read_only(path)?)))
    }
}

impl ChangeCounter for DataVersion {
    fn read(&self) -> Option<i64> {
        let conn = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut statement = conn.prepare_cached("PRAGMA data_version").ok()?;
        statement.query_row([], |r| r.get(0)).ok()
    }
}

/// A SQLite transaction holding the file's write lock; refresh-start
/// records come from their own file.
struct SqliteTransaction {
    conn: Option<sqlx::pool::PoolConnection<sqlx::Sqlite>>,
    /// Whether `BEGIN IMMEDIATE` succeeded: the write lock is held.
    begun: bool,
    /// A statement that may have begun a transaction or changed the busy
    /// timeout did not finish (cancelled, or failed): the connection's
    /// state is unknown.
    unsure: bool,
    tx_pool: SqlitePool,
    markers: SqlitePool,
    lock_wait_ms: u128,
}

impl Drop for SqliteTransaction {
    fn drop(&mut self) {
        // Not committed, or in an unknown state: closing the connection
        // rolls back and releases the lock; it never goes back to the pool
        // mid-transaction or with another busy timeout.
        if let Some(conn) = self.conn.take()
            && (self.begun || self.unsure)
        {
            drop(conn.detach());
        }
    }
}

impl SqliteTransaction {
    fn conn(&mut self) -> Result<&mut sqlx::SqliteConnection, StorageError> {
        self.conn
            .as_deref_mut()
            .ok_or_else(|| StorageError::Unavailable("sqlite: transaction already ended".into()))
    }

    /// Takes the write lock, waiting the busy timeout or not at all: false
    /// when `wait` is false and another connection holds it.
    async fn begin_immediate(&mut self, wait: bool) -> Result<bool, StorageError> {
        if self.begun {
            return Ok(true);
        }
        if self.conn.is_none() {
            self.conn = Some(if wait {
                self.tx_pool.acquire().await.map_err(error)?
            } else {
                // None free soon: as busy as a held lock.
                match tokio::time::timeout(super::TRY_ACQUIRE, self.tx_pool.acquire()).await {
                    Ok(Ok(conn)) => conn,
                    Ok(Err(_)) | Err(_) => return Ok(false),
                }
            });
        }
        let restore = format!("PRAGMA busy_timeout = {}", self.lock_wait_ms);
        // Until every statement below has answered, the connection's state
        // is unknown (Drop closes it rather than pool it).
        self.unsure = true;
        let conn = self.conn()?;
        if !wait {
            sqlx::Executor::execute(&mut *conn, "PRAGMA busy_timeout = 0")
                .await
                .map_err(error)?;
        }
        let begun = sqlx::Executor::execute(&mut *conn, "BEGIN IMMEDIATE")
            .await
            .map_err(error);
        if !wait {
            sqlx::Executor::execute(&mut *conn, restore.as_str())
                .await
                .map_err(error)?;
        }
        match begun {
            Ok(_) => {
                self.begun = true;
                self.unsure = false;
                Ok(true)
            }
            Err(StorageError::LockTimeout) if !wait => {
                self.unsure = false;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    async fn lock(
        &mut self,
        provider: &str,
        user_id: &str,
        wait: bool,
    ) -> Result<Option<BackendRead>, StorageError> {
        if !self.begin_immediate(wait).await? {
            return Ok(None);
        }
        let markers = self.markers.clone();
        let conn = self.conn()?;
        rows::load_for_update(conn, &markers, LOCK_SQL, provider, user_id)
            .await
            .map(Some)
    }
}

impl BackendTransaction for SqliteTransaction {
    fn load_for_update<'a>(
        &'a mut self,
        provider: &'a str,
        user_id: &'a str,
    ) -> BoxFuture<'a, Result<BackendRead, StorageError>> {
        Box::pin(async move {
            self.lock(provider, user_id, true)
                .await?
                .ok_or(StorageError::LockTimeout)
        })
    }
    fn try_load_for_update<'a>(
        &'a mut self,
        provider: &'a str,
        user_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<BackendRead>, StorageError>> {
        Box::pin(self.lock(provider, user_id, false))
    }
    fn compare_and_set<'a>(
        &'a mut self,
        row: &'a SealedRow,
        expected: u64,
        now: i64,
    ) -> BoxFuture<'a, Result<bool, StorageError>> {
        Box::pin(async move {
            // A write takes the write lock if no read took it.
            self.begin_immediate(true).await?;
            rows::compare_and_set(self.conn()?, row, expected, now).await
        })
    }
    fn start_refresh<'a>(
        &'a mut self,
        provider: &'a str,
        user_id: &'a str,
        generation: u64,
        at: i64,
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        // In their own file, outside this transaction. The file's lock lives
        // with this process's connection: it cannot be taken away while the
        // connection is open.
        Box::pin(rows::record_refresh_start(
            &self.markers,
            provider,
            user_id,
            generation,
            at,
        ))
    }
    fn commit(mut self: Box<Self>) -> BoxFuture<'static, Result<(), StorageError>> {
        Box::pin(async move {
            if self.begun {
                sqlx::Executor::execute(self.conn()?, "COMMIT")
                    .await
                    .map_err(error)?;
                self.begun = false;
            }
            // Back to the pool.
            drop(self.conn.take());
            Ok(())
        })
    }
}

/// A proof key in [`proof_keys::GET`]'s columns.
type ProofKeyColumns = (String, String, String, Vec<u8>);

fn sealed_proof_key((provider, user_id, key_id, sealed): ProofKeyColumns) -> SealedProofKey {
    SealedProofKey {
        provider,
        user_id,
        key_id,
        sealed,
    }
}

#[cfg(test)]
mod tests {
    use super::MIGRATIONS;

    /// Every host applies the files it finds (the Node host reads the
    /// directory): a file not in this list would make this host refuse the
    /// schema as newer, one missing would leave the other behind.
    #[test]
    fn the_migrations_are_exactly_the_schema_files() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/schema/sqlite");
        let mut files: Vec<i64> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().into_string().unwrap();
                let stem = name.strip_suffix(".sql")?;
                stem.parse().ok()
            })
            .collect();
        files.sort();
        let listed: Vec<i64> = MIGRATIONS.iter().map(|(v, _)| *v).collect();
        assert_eq!(files, listed);
        assert_eq!(listed, (1..=listed.len() as i64).collect::<Vec<_>>());
    }
}
