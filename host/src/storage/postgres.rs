//! Postgres: one database shared by every runtime on every machine.
//!
//! Row locks are `SELECT … FOR UPDATE` inside a transaction whose
//! `lock_timeout` is the configured lock wait; a runtime that dies drops its
//! connection and Postgres rolls its transaction back, releasing the lock.
//!
//! The driver is tokio-postgres with deadpool's pool, chosen by measurement
//! (`just bench`): statements are prepared once per connection, a pooled
//! connection is handed out without a ping (sqlx's pool pings on every
//! acquire and release, two round trips per read), and requests pipeline,
//! so that `BEGIN` and the locking read cost one round trip. Every statement
//! is bounded: a connection that stops answering is dropped, not waited on.

use super::outbox;
use super::refuse_newer;
use super::{
    BackendRead, BackendTransaction, BoxFuture, COLUMNS, ConversationEntry, RowKey, SealedRow,
    StorageError, StoreOptions, StoredColumns, scopes_text, to_i64,
};
use super::{Registration, SealedProofKey, authorizations, clients, proof_keys};
use crate::audit;
use crate::events::Event;
use crate::grant_cache::GrantCache;
use deadpool_postgres::{
    ClientWrapper, Hook, HookError, Manager, ManagerConfig, Object, Pool, PoolError,
    RecyclingMethod, Runtime,
};
use std::future::Future;
use std::str::FromStr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row, Statement};

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
    (
        10,
        // The locking read in one round trip: the row locked (waiting at
        // most lock_timeout, or not at all), a rescue parked for it applied,
        // its refresh-start record, the database's time and the session.
        // Each statement of a volatile PL/pgSQL function takes a snapshot of
        // its own, so the record read after the lock wait sees one that a
        // refresher holding the lock committed while we waited.
        "CREATE FUNCTION tokenkeep_lock(p TEXT, u TEXT, no_wait BOOLEAN,
        OUT t tokenkeep_tokens, OUT started_at BIGINT, OUT db_now BIGINT,
        OUT pid INTEGER, OUT backend_start TEXT, OUT xact_start TEXT)
    LANGUAGE plpgsql VOLATILE AS $$
    DECLARE
        rescued tokenkeep_tokens;
    BEGIN
        IF no_wait THEN
            SELECT * INTO t FROM tokenkeep_tokens
            WHERE provider = p AND user_id = u FOR UPDATE NOWAIT;
        ELSE
            SELECT * INTO t FROM tokenkeep_tokens
            WHERE provider = p AND user_id = u FOR UPDATE;
        END IF;
        IF FOUND THEN
            WITH r AS (DELETE FROM tokenkeep_rescues AS d
                       WHERE d.provider = p AND d.user_id = u RETURNING d.*)
            UPDATE tokenkeep_tokens AS x SET key_id = r.key_id,
                access_token = r.access_token, refresh_token = r.refresh_token,
                access_token_expires_at = r.access_token_expires_at,
                refresh_token_expires_at = r.refresh_token_expires_at, scopes = r.scopes,
                obtained_at = r.obtained_at, generation = r.generation,
                failed_attempts = r.failed_attempts, last_failure_at = r.last_failure_at,
                last_failure = r.last_failure, last_success_at = r.last_success_at,
                refresh_started_at = r.refresh_started_at,
                baseline_scopes = r.baseline_scopes, retry_not_before = r.retry_not_before,
                updated_at = r.updated_at
            FROM r WHERE x.provider = r.provider AND x.user_id = r.user_id
                AND x.generation = r.replaces
            RETURNING x.* INTO rescued;
            IF FOUND THEN
                t := rescued;
            END IF;
            SELECT s.started_at INTO started_at FROM tokenkeep_refresh_starts AS s
            WHERE s.provider = p AND s.user_id = u AND s.generation = t.generation;
        END IF;
        db_now := floor(extract(epoch FROM clock_timestamp()))::bigint;
        SELECT a.pid, a.backend_start::text, a.xact_start::text
        INTO pid, backend_start, xact_start
        FROM pg_stat_activity AS a WHERE a.pid = pg_backend_pid();
    END
    $$",
    ),
    (
        11,
        // Every change of a row is announced to the hosts' grant caches at
        // commit (see `listener`), once the first cache of the database has
        // turned announcements on: a NOTIFY takes a cluster-wide lock at
        // commit, which databases without a cache should not pay.
        //
        // A writer holds advisory lock 128021892001388 shared from its
        // trigger to its commit; turning announcements on takes it
        // exclusively, so every writer that found them off has committed
        // before the first listener listens (and reads what it wrote). A
        // writer whose snapshot predates its wait (REPEATABLE READ or
        // stricter) cannot see the switch, so it always announces. A name
        // too long for a notification's 8000 bytes announces everything
        // rather than failing the write.
        "CREATE TABLE tokenkeep_announcing (
        singleton BOOLEAN PRIMARY KEY DEFAULT true CHECK (singleton),
        since TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    CREATE FUNCTION tokenkeep_announce_changes() RETURNS void
    LANGUAGE plpgsql AS $$
    BEGIN
        -- Seen on: every writer that found it off has committed.
        IF EXISTS (SELECT 1 FROM tokenkeep_announcing) THEN
            RETURN;
        END IF;
        PERFORM set_config('lock_timeout', '4s', true);
        PERFORM pg_advisory_xact_lock(128021892001388);
        INSERT INTO tokenkeep_announcing DEFAULT VALUES ON CONFLICT DO NOTHING;
    END
    $$;
    CREATE FUNCTION tokenkeep_tokens_changed() RETURNS trigger
    LANGUAGE plpgsql AS $$
    DECLARE
        r tokenkeep_tokens;
        payload text;
    BEGIN
        PERFORM pg_advisory_xact_lock_shared(128021892001388);
        IF current_setting('transaction_isolation') = 'read committed'
            AND NOT EXISTS (SELECT 1 FROM tokenkeep_announcing) THEN
            RETURN NULL;
        END IF;
        IF TG_OP = 'TRUNCATE' THEN
            PERFORM pg_notify('tokenkeep_tokens', '*');
            RETURN NULL;
        END IF;
        IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
        payload := json_build_array(r.provider, r.user_id)::text;
        IF octet_length(payload) > 7900 THEN payload := '*'; END IF;
        PERFORM pg_notify('tokenkeep_tokens', payload);
        RETURN NULL;
    END
    $$;
    CREATE TRIGGER tokenkeep_tokens_changed AFTER INSERT OR UPDATE OR DELETE
        ON tokenkeep_tokens FOR EACH ROW EXECUTE FUNCTION tokenkeep_tokens_changed();
    CREATE TRIGGER tokenkeep_tokens_truncated AFTER TRUNCATE
        ON tokenkeep_tokens FOR EACH STATEMENT EXECUTE FUNCTION tokenkeep_tokens_changed();",
    ),
    (
        12,
        // `tokenkeep_lock` naming the lock holder by its transaction id
        // rather than by a pg_stat_activity lookup, which copies every
        // backend's status and cost more than the lock itself. The old
        // function stays for hosts of the previous release.
        "CREATE FUNCTION tokenkeep_lock_row(p TEXT, u TEXT, no_wait BOOLEAN,
        OUT t tokenkeep_tokens, OUT started_at BIGINT, OUT db_now BIGINT, OUT xid BIGINT)
    LANGUAGE plpgsql VOLATILE AS $$
    DECLARE
        rescued tokenkeep_tokens;
    BEGIN
        IF no_wait THEN
            SELECT * INTO t FROM tokenkeep_tokens
            WHERE provider = p AND user_id = u FOR UPDATE NOWAIT;
        ELSE
            SELECT * INTO t FROM tokenkeep_tokens
            WHERE provider = p AND user_id = u FOR UPDATE;
        END IF;
        IF FOUND THEN
            WITH r AS (DELETE FROM tokenkeep_rescues AS d
                       WHERE d.provider = p AND d.user_id = u RETURNING d.*)
            UPDATE tokenkeep_tokens AS x SET key_id = r.key_id,
                access_token = r.access_token, refresh_token = r.refresh_token,
                access_token_expires_at = r.access_token_expires_at,
                refresh_token_expires_at = r.refresh_token_expires_at, scopes = r.scopes,
                obtained_at = r.obtained_at, generation = r.generation,
                failed_attempts = r.failed_attempts, last_failure_at = r.last_failure_at,
                last_failure = r.last_failure, last_success_at = r.last_success_at,
                refresh_started_at = r.refresh_started_at,
                baseline_scopes = r.baseline_scopes, retry_not_before = r.retry_not_before,
                updated_at = r.updated_at
            FROM r WHERE x.provider = r.provider AND x.user_id = r.user_id
                AND x.generation = r.replaces
            RETURNING x.* INTO rescued;
            IF FOUND THEN
                t := rescued;
            END IF;
            SELECT s.started_at INTO started_at FROM tokenkeep_refresh_starts AS s
            WHERE s.provider = p AND s.user_id = u AND s.generation = t.generation;
            -- The row lock gave the transaction its id: it lives exactly as
            -- long as the lock.
            xid := txid_current();
        END IF;
        db_now := floor(extract(epoch FROM clock_timestamp()))::bigint;
    END
    $$",
    ),
    (
        13,
        // The audit log: who read which token, every refresh, store and
        // delete. Never a secret.
        "CREATE TABLE tokenkeep_audit (
        id BIGSERIAL PRIMARY KEY,
        at BIGINT NOT NULL,
        caller TEXT NOT NULL,
        action TEXT NOT NULL,
        provider TEXT NOT NULL,
        user_id TEXT NOT NULL,
        generation BIGINT,
        outcome TEXT NOT NULL
    );
    CREATE INDEX tokenkeep_audit_at ON tokenkeep_audit (at);
    CREATE INDEX tokenkeep_audit_row ON tokenkeep_audit (provider, user_id, id);",
    ),
    (
        14,
        // Token events: an outbox written by the database in the
        // transaction that changes the row, whoever the writer; deliveries
        // per webhook; a lease per webhook so that one process delivers
        // its events at a time, in order.
        "CREATE TABLE tokenkeep_events (
        id BIGSERIAL PRIMARY KEY,
        at BIGINT NOT NULL,
        provider TEXT NOT NULL,
        user_id TEXT NOT NULL,
        state TEXT NOT NULL,
        reason TEXT,
        generation BIGINT NOT NULL,
        conversations TEXT NOT NULL
    );
    CREATE TABLE tokenkeep_deliveries (
        webhook TEXT NOT NULL,
        event_id BIGINT NOT NULL,
        delivered_at BIGINT NOT NULL,
        PRIMARY KEY (webhook, event_id)
    );
    CREATE TABLE tokenkeep_webhook_leases (
        webhook TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        until BIGINT NOT NULL
    );
    CREATE FUNCTION tokenkeep_token_event() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        before TEXT;
        state TEXT;
    BEGIN
        IF TG_OP = 'UPDATE' THEN before := OLD.last_failure; END IF;
        IF NEW.last_failure = 'reauthorization-required'
           AND before IS DISTINCT FROM 'reauthorization-required' THEN
            state := 'reauthorization-required';
        ELSIF before = 'reauthorization-required'
           AND NEW.last_failure IS DISTINCT FROM 'reauthorization-required' THEN
            state := 'recovered';
        ELSE
            RETURN NULL;
        END IF;
        INSERT INTO tokenkeep_events
            (at, provider, user_id, state, reason, generation, conversations)
        VALUES (extract(epoch FROM now())::BIGINT, NEW.provider, NEW.user_id, state,
            NEW.last_failure, NEW.generation,
            COALESCE((SELECT json_agg(conversation_id ORDER BY conversation_id)::TEXT
                FROM tokenkeep_conversations
                WHERE provider = NEW.provider AND user_id = NEW.user_id), '[]'));
        RETURN NULL;
    END
    $$;
    CREATE TRIGGER tokenkeep_token_event AFTER INSERT OR UPDATE ON tokenkeep_tokens
        FOR EACH ROW EXECUTE FUNCTION tokenkeep_token_event();",
    ),
    (
        15,
        // The state last announced for each row (null: none yet, which
        // stands for fresh), so that the states time decides are announced
        // once (see `events`); the events a write decides, written before
        // the row (under its lock) with the state they announce; a
        // webhook's start; pruning by age.
        "ALTER TABLE tokenkeep_tokens ADD COLUMN announced_state TEXT;
    ALTER TABLE tokenkeep_webhook_leases ADD COLUMN start_after BIGINT NOT NULL DEFAULT 0;
    CREATE INDEX tokenkeep_events_at ON tokenkeep_events (at);
    DROP TRIGGER tokenkeep_token_event ON tokenkeep_tokens;
    UPDATE tokenkeep_tokens SET announced_state = 'reauthorization-required'
        WHERE last_failure = 'reauthorization-required';
    CREATE FUNCTION tokenkeep_token_write_event() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        state TEXT;
    BEGIN
        IF NEW.last_failure = 'reauthorization-required'
           AND OLD.last_failure IS DISTINCT FROM 'reauthorization-required' THEN
            IF OLD.announced_state IS DISTINCT FROM 'reauthorization-required' THEN
                state := 'reauthorization-required';
            END IF;
            NEW.announced_state := 'reauthorization-required';
        ELSIF NEW.last_failure IS DISTINCT FROM 'reauthorization-required'
           AND (OLD.last_failure = 'reauthorization-required'
                OR (OLD.announced_state = 'reauthorization-required'
                    AND NEW.generation <> OLD.generation)) THEN
            state := 'recovered';
            NEW.announced_state := NULL;
        ELSIF NEW.generation <> OLD.generation
           -- A write that saves tokens with a failure (a narrowed scope,
           -- a salvaged refresh token) is no recovery.
           AND NEW.last_failure IS NULL
           AND (OLD.announced_state = 'refresh-due'
                OR (OLD.announced_state = 'refresh-token-expiring'
                    AND NEW.refresh_token_expires_at
                        IS DISTINCT FROM OLD.refresh_token_expires_at)) THEN
            state := 'fresh';
            NEW.announced_state := 'fresh';
        END IF;
        IF state IS NOT NULL THEN
            INSERT INTO tokenkeep_events
                (at, provider, user_id, state, reason, generation, conversations)
            VALUES (extract(epoch FROM now())::BIGINT, NEW.provider, NEW.user_id, state,
                CASE WHEN state = 'fresh' THEN NULL ELSE NEW.last_failure END, NEW.generation,
                COALESCE((SELECT json_agg(conversation_id ORDER BY conversation_id)::TEXT
                    FROM tokenkeep_conversations
                    WHERE provider = NEW.provider AND user_id = NEW.user_id), '[]'));
        END IF;
        RETURN NEW;
    END
    $$;
    CREATE TRIGGER tokenkeep_token_write_event BEFORE UPDATE ON tokenkeep_tokens
        FOR EACH ROW EXECUTE FUNCTION tokenkeep_token_write_event();",
    ),
    (
        16,
        // Clients registered with a discovered authorisation server, as
        // host/schema/sqlite/0021.sql.
        "CREATE TABLE tokenkeep_clients (
        provider TEXT PRIMARY KEY,
        resource TEXT NOT NULL,
        metadata TEXT NOT NULL,
        client_id TEXT NOT NULL,
        registered_at BIGINT NOT NULL
    );",
    ),
    (
        17,
        // Completed sealed authorisation states, as
        // host/schema/sqlite/0022.sql.
        "CREATE TABLE tokenkeep_authorizations (
        id TEXT PRIMARY KEY,
        expires_at BIGINT NOT NULL
    );",
    ),
    (
        18,
        // DPoP proof keys, as host/schema/sqlite/0023.sql.
        "CREATE TABLE tokenkeep_proof_keys (
        provider TEXT NOT NULL,
        user_id TEXT NOT NULL,
        key_id TEXT NOT NULL,
        sealed BYTEA NOT NULL,
        created_at BIGINT NOT NULL,
        PRIMARY KEY (provider, user_id)
    );",
    ),
];

/// How long one statement may go unanswered (a read, a write of one row, a
/// commit) before the connection is presumed cut off: dropped, and inside a
/// locked transaction the write is saved another way.
pub(super) const STATEMENT_BOUND: Duration = Duration::from_secs(5);

/// Connections that write refresh-start records, at most: concurrent
/// refreshes write theirs side by side rather than in turn on one.
const MARKER_CONNECTIONS: usize = 4;

/// How long opening the store waits for the database to answer at all.
const FIRST_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Any constant distinct from other applications' advisory locks.
const MIGRATION_LOCK: i64 = 0x746f_6b65_6e6b;

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

/// The locking read (`tokenkeep_lock_row`, migration 12): the row's
/// columns, its refresh-start record in place of the row's own, the
/// database's time and the locking transaction's id. `$3`: fail at once
/// (55P03) rather than wait.
static LOCK_SQL: LazyLock<String> = LazyLock::new(|| {
    let columns: Vec<String> = COLUMNS
        .split(',')
        .map(str::trim)
        .map(|c| match c {
            "refresh_started_at" => "l.started_at AS refresh_started_at".to_string(),
            c => format!("(l.t).{c} AS {c}"),
        })
        .collect();
    format!(
        "SELECT {}, l.db_now, l.xid FROM tokenkeep_lock_row($1, $2, $3) AS l",
        columns.join(", ")
    )
});

/// The values of a whole row but its generation, bound as `$1`…`$17`
/// (`$17` the time of writing) by every statement that writes one.
const ROW_VALUES: &str =
    "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17";

/// A new row starts after the last generation a deleted row of the same
/// provider and user had (its tombstone), so generations never repeat.
fn insert_sql(on_conflict: &str) -> String {
    format!(
        "INSERT INTO tokenkeep_tokens (provider, user_id, key_id, access_token, refresh_token, \
         access_token_expires_at, refresh_token_expires_at, scopes, obtained_at, failed_attempts, \
         last_failure_at, last_failure, last_success_at, refresh_started_at, baseline_scopes, \
         retry_not_before, updated_at, generation) \
         VALUES ({ROW_VALUES}, COALESCE((SELECT generation + 1 FROM tokenkeep_tombstones \
         WHERE provider = $1 AND user_id = $2), 1)) \
         ON CONFLICT (provider, user_id) {on_conflict}"
    )
}

static INSERT_SQL: LazyLock<String> = LazyLock::new(|| insert_sql("DO NOTHING"));

static UPSERT_SQL: LazyLock<String> = LazyLock::new(|| insert_sql(super::UPSERT_ON_CONFLICT));

/// Writes the locked row if it still holds the generation `$19`: the row's
/// values as [`ROW_VALUES`], `$18` the generation written.
const COMPARE_AND_SET_SQL: &str = "UPDATE tokenkeep_tokens SET key_id = $3, access_token = $4, \
     refresh_token = $5, access_token_expires_at = $6, refresh_token_expires_at = $7, \
     scopes = $8, obtained_at = $9, failed_attempts = $10, last_failure_at = $11, \
     last_failure = $12, last_success_at = $13, refresh_started_at = $14, \
     baseline_scopes = $15, retry_not_before = $16, updated_at = $17, generation = $18 \
     WHERE provider = $1 AND user_id = $2 AND generation = $19";

/// Parks a written row for the next holder of the lock: the row's values
/// as [`ROW_VALUES`], `$18` its generation, `$19` the one it replaces.
static RESCUE_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO tokenkeep_rescues (provider, user_id, key_id, access_token, refresh_token, \
         access_token_expires_at, refresh_token_expires_at, scopes, obtained_at, failed_attempts, \
         last_failure_at, last_failure, last_success_at, refresh_started_at, baseline_scopes, \
         retry_not_before, updated_at, generation, replaces) VALUES ({ROW_VALUES}, $18, $19) \
         ON CONFLICT (provider, user_id) DO UPDATE SET key_id = excluded.key_id, \
         access_token = excluded.access_token, refresh_token = excluded.refresh_token, \
         access_token_expires_at = excluded.access_token_expires_at, \
         refresh_token_expires_at = excluded.refresh_token_expires_at, scopes = excluded.scopes, \
         obtained_at = excluded.obtained_at, generation = excluded.generation, \
         failed_attempts = excluded.failed_attempts, last_failure_at = excluded.last_failure_at, \
         last_failure = excluded.last_failure, last_success_at = excluded.last_success_at, \
         refresh_started_at = excluded.refresh_started_at, \
         baseline_scopes = excluded.baseline_scopes, retry_not_before = excluded.retry_not_before, \
         updated_at = excluded.updated_at, replaces = excluded.replaces"
    )
});

/// Whether the transaction that took a row lock is still running, and so
/// still holds it (a transaction id is never reused while its epoch lasts).
macro_rules! lock_holder_alive {
    ($xid:literal) => {
        concat!("txid_status(", $xid, "::bigint) = 'in progress'")
    };
}

/// Records a refresh start, but only while the lock's transaction is alive.
const START_REFRESH_SQL: &str = concat!(
    "INSERT INTO tokenkeep_refresh_starts (provider, user_id, generation, started_at) \
     SELECT $1::text, $2::text, $3::bigint, $4::bigint WHERE ",
    lock_holder_alive!("$5"),
    " ON CONFLICT (provider, user_id) DO UPDATE SET \
     generation = excluded.generation, started_at = excluded.started_at"
);

/// Asked again once the record is committed: a transaction that ended
/// between the check and the commit may have let another runtime lock the
/// row before the record was visible.
const STILL_ALIVE_SQL: &str = concat!("SELECT ", lock_holder_alive!("$1"));

/// Ends the session whose transaction `$1` is still running: the holder of
/// its transaction-id lock (behind a pooler a backend serves many clients;
/// only this transaction is ours to end).
const END_HOLDER_SQL: &str = concat!(
    "SELECT pg_terminate_backend(l.pid) FROM pg_locks AS l \
     WHERE l.locktype = 'transactionid' AND l.mode = 'ExclusiveLock' AND l.granted \
     AND l.transactionid = ($1::bigint % 4294967296)::text::xid AND ",
    lock_holder_alive!("$1")
);

/// Every transaction reads committed data: the locking function's reads
/// after a lock wait rely on a snapshot per statement.
/// Appends a batch of audit entries in one statement, one array per column.
const APPEND_AUDIT_SQL: &str = "INSERT INTO tokenkeep_audit \
     (at, caller, action, provider, user_id, generation, outcome) \
     SELECT * FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], \
     $6::BIGINT[], $7::TEXT[])";

const BEGIN_SQL: &str = "BEGIN ISOLATION LEVEL READ COMMITTED";

/// A row, its refresh-start record and its rescue go together.
const DELETE_SQL: &str = "WITH s AS (DELETE FROM tokenkeep_refresh_starts \
     WHERE provider = $1 AND user_id = $2), r AS (DELETE FROM tokenkeep_rescues \
     WHERE provider = $1 AND user_id = $2), k AS (DELETE FROM tokenkeep_proof_keys \
     WHERE provider = $1 AND user_id = $2) \
     DELETE FROM tokenkeep_tokens WHERE provider = $1 AND user_id = $2";

/// A Postgres store: two pools and the refresh-start writer.
#[derive(Clone)]
pub struct PgStore {
    /// Unlocked reads and single-statement writes: the hot path.
    pool: Pool,
    /// Transactions that wait for row locks. Kept apart so that callers
    /// queued behind one stale token never starve reads of other tokens.
    tx_pool: Pool,
    /// The connections that write refresh-start records. A refresher writes
    /// one while it holds a row lock, so it must not queue for a connection
    /// behind callers that are waiting for that very lock: only lock
    /// holders use these, and their statements wait for no lock.
    markers: Pool,
    connect: Arc<tokio_postgres::Config>,
    lock_wait: Duration,
    /// The longest provider call: what lock-holding sessions may sit idle.
    hold: Duration,
}

impl std::fmt::Debug for PgStore {
    // Not derived: the connect options hold the database password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

/// Opens a connection outside the pools; dropping it closes it.
async fn open_connection(config: &tokio_postgres::Config) -> Result<ClientWrapper, StorageError> {
    let (client, connection) = config.connect(NoTls).await.map_err(|e| match error(e) {
        // Nothing was sent: the database is not there.
        StorageError::ConnectionLost(m) => StorageError::Unavailable(m),
        other => other,
    })?;
    let task = tokio::spawn(async move {
        // Its end (a closed or broken connection) is what the client's next
        // request reports.
        let _ = connection.await;
    });
    Ok(ClientWrapper::new(client, task))
}

/// A pool whose connections carry the session settings of [`session_sql`].
fn pool(
    config: &tokio_postgres::Config,
    size: usize,
    wait: Duration,
    session: String,
) -> Result<Pool, StorageError> {
    let manager = Manager::from_config(
        config.clone(),
        NoTls,
        ManagerConfig {
            // Handed out without a round trip: a connection that broke
            // since is found out by its bounded statement, and dropped.
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let session: Arc<str> = session.into();
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(wait))
        .create_timeout(Some(STATEMENT_BOUND))
        .post_create(Hook::async_fn(move |client: &mut ClientWrapper, _| {
            let session = session.clone();
            Box::pin(async move {
                client
                    .batch_execute(&session)
                    .await
                    .map_err(HookError::Backend)
            })
        }))
        .build()
        .map_err(|e| StorageError::Unavailable(format!("postgres: {e}")))
}

impl PgStore {
    pub async fn open(url: &str, options: StoreOptions) -> Result<Self, StorageError> {
        let mut connect = tokio_postgres::Config::from_str(url)
            .map_err(|_| StorageError::Unavailable("the Postgres URL is not valid".into()))?;
        connect
            .application_name("tokenkeep")
            .connect_timeout(FIRST_CONNECT_TIMEOUT.min(options.lock_wait));
        // One connection first, so that a database that is down or refuses
        // us is reported at once (a pool retries until its wait runs out).
        let _first = tokio::time::timeout(
            FIRST_CONNECT_TIMEOUT.min(options.lock_wait),
            open_connection(&connect),
        )
        .await
        .map_err(|_| StorageError::Unavailable("postgres: connect timed out".into()))??;
        connect.connect_timeout(STATEMENT_BOUND);
        let size = options.max_connections.max(1) as usize;
        let store = Self {
            pool: pool(
                &connect,
                size,
                options.lock_wait,
                session_sql(options.lock_wait, None),
            )?,
            // Callers queue for a connection while others hold row locks.
            tx_pool: pool(
                &connect,
                size,
                options.lock_wait * 2,
                session_sql(options.lock_wait, Some(options.hold)),
            )?,
            markers: pool(
                &connect,
                size.min(MARKER_CONNECTIONS),
                STATEMENT_BOUND,
                session_sql(options.lock_wait, None),
            )?,
            connect: Arc::new(connect),
            lock_wait: options.lock_wait,
            hold: options.hold,
        };
        store.migrate().await?;
        Ok(store)
    }

    /// A connection of the hot-path pool.
    async fn pooled(&self) -> Result<Object, StorageError> {
        get(&self.pool, self.lock_wait).await
    }

    /// Runs `work` on a pooled connection within [`STATEMENT_BOUND`]; a
    /// connection that broke or stopped answering is dropped, not pooled.
    async fn on_pool<T>(
        &self,
        work: impl AsyncFnOnce(&ClientWrapper) -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        let client = self.pooled().await?;
        let done = within(STATEMENT_BOUND, work(&client)).await;
        if matches!(done, Err(StorageError::ConnectionLost(_))) {
            drop(Object::take(client));
        }
        done
    }

    /// The database's time, for the clock before the first row is read.
    pub(crate) async fn database_now(&self) -> Result<i64, StorageError> {
        self.on_pool(async |c| {
            let row = c
                .query_one(concat!("SELECT ", db_now!()), &[])
                .await
                .map_err(error)?;
            row.try_get(0).map_err(error)
        })
        .await
    }

    async fn migrate(&self) -> Result<(), StorageError> {
        let client = self.pooled().await?;
        let migrated = migrate(&client).await;
        if migrated.is_err() {
            // Mid-transaction, perhaps: never pooled again.
            drop(Object::take(client));
        }
        migrated
    }

    /// Writes a refresh-start record on a connection of the record pool,
    /// if `session` still holds the row's lock, and asks again once it is
    /// committed (pipelined: one round trip); on another connection once
    /// more after a lost one. True when the record stands and the lock is
    /// still held. Each attempt is bounded (a connection that does not
    /// answer is dropped, never pooled again) and so is the whole, well
    /// inside the lock holder's idle allowance: a half-open connection must
    /// not stall refreshes that hold row locks.
    async fn record_refresh_start(
        &self,
        record: [&(dyn ToSql + Sync); 4],
        session: &Session,
    ) -> Result<bool, StorageError> {
        within(STATEMENT_BOUND, async {
            let mut written = Ok(false);
            for _ in 0..2 {
                let conn = get(&self.markers, STATEMENT_BOUND / 2).await?;
                written = within(STATEMENT_BOUND / 2, async {
                    let insert = conn
                        .prepare_cached(START_REFRESH_SQL)
                        .await
                        .map_err(error)?;
                    let check = conn.prepare_cached(STILL_ALIVE_SQL).await.map_err(error)?;
                    let [p, u, g, at] = record;
                    let holder: [&(dyn ToSql + Sync); 1] = [&session.xid];
                    let values = [p, u, g, at, holder[0]];
                    let (inserted, alive) = tokio::join!(
                        conn.execute(&insert, &values),
                        conn.query_one(&check, &holder)
                    );
                    let inserted = inserted.map_err(error)?;
                    let alive: bool = alive.and_then(|r| r.try_get(0)).map_err(error)?;
                    Ok(inserted == 1 && alive)
                })
                .await;
                match &written {
                    Err(StorageError::ConnectionLost(_)) => drop(Object::take(conn)),
                    _ => break,
                }
            }
            written
        })
        .await
    }

    /// A transaction; it takes a connection of the transaction pool at its
    /// first locking read.
    fn begin(&self) -> PgTransaction {
        PgTransaction {
            conn: None,
            begun: false,
            session: None,
            written: None,
            held: None,
            deferred: None,
            store: self.clone(),
        }
    }

    /// A connection of its own, outside both pools, for saving a write.
    async fn connect_alone(&self) -> Result<ClientWrapper, StorageError> {
        let conn = within(STATEMENT_BOUND, open_connection(&self.connect)).await?;
        // It will hold the row lock: the same bounds as the pool's.
        let set = session_sql(self.lock_wait, Some(self.hold));
        bounded(STATEMENT_BOUND, conn.batch_execute(&set)).await?;
        Ok(conn)
    }
}

/// A pooled connection, bounded as a whole: deadpool bounds the wait for a
/// free slot (`wait`) and the connect, not the session settings after it.
async fn get(pool: &Pool, wait: Duration) -> Result<Object, StorageError> {
    match tokio::time::timeout(wait + 2 * STATEMENT_BOUND, pool.get()).await {
        Ok(got) => got.map_err(pool_error),
        Err(_) => Err(StorageError::Unavailable(
            "postgres: no connection within the wait".into(),
        )),
    }
}

/// Brings the schema up to date under an advisory lock.
async fn migrate(client: &ClientWrapper) -> Result<(), StorageError> {
    // Another process may be migrating: wait for it, however long.
    client
        .batch_execute(
            "BEGIN; SET LOCAL lock_timeout = 0; SET LOCAL client_min_messages = warning; \
             CREATE TABLE IF NOT EXISTS tokenkeep_schema (version BIGINT PRIMARY KEY, \
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        )
        .await
        .map_err(error)?;
    client
        .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(error)?;
    let current: Option<i64> = client
        .query_one("SELECT max(version) FROM tokenkeep_schema", &[])
        .await
        .and_then(|r| r.try_get(0))
        .map_err(error)?;
    refuse_newer(current, super::latest_schema(MIGRATIONS))?;
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| Some(*v) > current) {
        client.batch_execute(sql).await.map_err(error)?;
        client
            .execute(
                "INSERT INTO tokenkeep_schema (version) VALUES ($1)",
                &[version],
            )
            .await
            .map_err(error)?;
    }
    client.batch_execute("COMMIT").await.map_err(error)
}

/// Runs a statement, but gives up on an answer after `bound`: a connection
/// that stops answering is reported as lost, not waited on.
pub(super) async fn bounded<T>(
    bound: Duration,
    work: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, StorageError> {
    within(bound, async { work.await.map_err(error) }).await
}

/// [`bounded`] for work that already speaks the storage taxonomy.
pub(super) async fn within<T>(
    bound: Duration,
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

/// Every connection waits at most the lock wait for a row lock: set once per
/// connection, not per transaction (a round trip each), and not as startup
/// options (which connection poolers such as PgBouncer refuse). Connections
/// that hold row locks also have the database end a transaction left idle
/// longer than the longest provider call (`hold`) plus a margin, and probe
/// a silent client: a refresher cut off from the database releases its
/// lock within that bound instead of TCP's two hours.
fn session_sql(wait: Duration, hold: Option<Duration>) -> String {
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
pub(crate) fn error(e: tokio_postgres::Error) -> StorageError {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        // 55P03 lock_not_available (lock_timeout, NOWAIT), 40P01 deadlock_detected.
        if matches!(code, "55P03" | "40P01") {
            return StorageError::LockTimeout;
        }
        let message = format!("postgres: {}", db.message());
        // 08: connection exceptions; 57P01-57P03: the server ended the
        // session (pg_terminate_backend, shutdown); 25P03/25P04: idle in a
        // transaction, or in one, too long; FATAL and PANIC end the session.
        if code.starts_with("08")
            || code.starts_with("57P")
            || matches!(code, "25P03" | "25P04")
            || matches!(db.severity(), "FATAL" | "PANIC")
        {
            return StorageError::ConnectionLost(message);
        }
        return StorageError::Unavailable(message);
    }
    if e.is_closed() {
        return StorageError::ConnectionLost("postgres: the connection is closed".into());
    }
    let io = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<std::io::Error>());
    if let Some(io) = io {
        return StorageError::ConnectionLost(format!("postgres unreachable: {}", io.kind()));
    }
    // The protocol out of step: the connection cannot be trusted. Anything
    // else (a value that does not convert, a missing row) leaves it sound.
    let text = e.to_string();
    if text.contains("unexpected message") || text.contains("parsing response") {
        return StorageError::ConnectionLost(format!("postgres: {text}"));
    }
    StorageError::Unavailable(format!("postgres: {text}"))
}

/// Maps a failure to get a pooled connection.
fn pool_error(e: PoolError) -> StorageError {
    match e {
        PoolError::Timeout(_) => {
            StorageError::Unavailable("postgres: no connection free within the wait".into())
        }
        // Nothing was sent on a connection that never opened.
        PoolError::Backend(e) => match error(e) {
            StorageError::ConnectionLost(m) => StorageError::Unavailable(m),
            other => other,
        },
        PoolError::PostCreateHook(HookError::Backend(e)) => match error(e) {
            StorageError::ConnectionLost(m) => StorageError::Unavailable(m),
            other => other,
        },
        other => StorageError::Unavailable(format!("postgres: {other}")),
    }
}

/// Decodes a row of [`READ_SQL`] or [`LOCK_SQL`]: the row, if any, and the
/// database's time.
fn decode_read(r: &Row) -> Result<BackendRead, StorageError> {
    let db_now: Option<i64> = r.try_get("db_now").map_err(error)?;
    let present: Option<String> = r.try_get("provider").map_err(error)?;
    let row = match present {
        Some(_) => Some(decode(r)?),
        None => None,
    };
    Ok((row, db_now))
}

fn decode(r: &Row) -> Result<SealedRow, StorageError> {
    let columns =
        (|| -> Result<StoredColumns, tokio_postgres::Error> { Ok(super::stored_columns!(r)) })()
            .map_err(error)?;
    columns
        .into_row()
        .map_err(|e| StorageError::Unavailable(format!("postgres: a stored row is malformed: {e}")))
}

/// A row's values as [`ROW_VALUES`] binds them.
struct RowValues<'r> {
    row: &'r SealedRow,
    scopes: String,
    baseline: String,
    failed_attempts: i64,
    last_failure: Option<&'static str>,
    now: i64,
}

impl<'r> RowValues<'r> {
    fn new(row: &'r SealedRow, now: i64) -> Self {
        Self {
            row,
            scopes: scopes_text(&row.scopes),
            baseline: scopes_text(&row.baseline_scopes),
            failed_attempts: i64::from(row.health.failed_attempts),
            last_failure: row
                .health
                .last_failure
                .map(tokenkeep_core::error::ErrorClass::name),
            now,
        }
    }

    /// `$1`…`$17`, then `more`.
    fn with<'a>(&'a self, more: &[&'a (dyn ToSql + Sync)]) -> Vec<&'a (dyn ToSql + Sync)> {
        let r = self.row;
        let mut values: Vec<&(dyn ToSql + Sync)> = vec![
            &r.provider,
            &r.user_id,
            &r.key_id,
            &r.access_token,
            &r.refresh_token,
            &r.access_token_expires_at,
            &r.refresh_token_expires_at,
            &self.scopes,
            &r.obtained_at,
            &self.failed_attempts,
            &r.health.last_failure_at,
            &self.last_failure,
            &r.health.last_success_at,
            &r.health.refresh_started_at,
            &self.baseline,
            &r.health.retry_not_before,
            &self.now,
        ];
        values.extend_from_slice(more);
        values
    }
}

/// The first eight columns of a row (an audit entry's, an event's).
// One tuple of eight columns, whichever the table: an alias would name one.
#[allow(clippy::type_complexity)]
fn eight<A, B, C, D, E, F, G, H>(r: &Row) -> Result<(A, B, C, D, E, F, G, H), StorageError>
where
    A: for<'a> tokio_postgres::types::FromSql<'a>,
    B: for<'a> tokio_postgres::types::FromSql<'a>,
    C: for<'a> tokio_postgres::types::FromSql<'a>,
    D: for<'a> tokio_postgres::types::FromSql<'a>,
    E: for<'a> tokio_postgres::types::FromSql<'a>,
    F: for<'a> tokio_postgres::types::FromSql<'a>,
    G: for<'a> tokio_postgres::types::FromSql<'a>,
    H: for<'a> tokio_postgres::types::FromSql<'a>,
{
    Ok((
        r.try_get(0).map_err(error)?,
        r.try_get(1).map_err(error)?,
        r.try_get(2).map_err(error)?,
        r.try_get(3).map_err(error)?,
        r.try_get(4).map_err(error)?,
        r.try_get(5).map_err(error)?,
        r.try_get(6).map_err(error)?,
        r.try_get(7).map_err(error)?,
    ))
}

/// A state time decided: the row's announced state and the event in one
/// statement, if the row is as the scan saw it; a row a refresh holds
/// locked is skipped (the refresh decides its state).
const ANNOUNCE_SQL: &str = "WITH target AS (SELECT provider, user_id FROM tokenkeep_tokens \
     WHERE provider = $1 AND user_id = $2 AND generation = $3 \
     AND announced_state IS NOT DISTINCT FROM $4::TEXT FOR UPDATE SKIP LOCKED), \
     changed AS (UPDATE tokenkeep_tokens t SET announced_state = $5::TEXT FROM target \
     WHERE t.provider = target.provider AND t.user_id = target.user_id \
     RETURNING t.provider, t.user_id, t.generation) \
     INSERT INTO tokenkeep_events (at, provider, user_id, state, reason, generation, conversations) \
     SELECT extract(epoch FROM now())::BIGINT, provider, user_id, $5::TEXT, $6::TEXT, generation, \
     COALESCE((SELECT json_agg(conversation_id ORDER BY conversation_id)::TEXT \
     FROM tokenkeep_conversations x \
     WHERE x.provider = changed.provider AND x.user_id = changed.user_id), '[]') FROM changed";

/// The database's time in the outbox's SQL.
const PG_NOW: &str = "extract(epoch FROM now())::BIGINT";

impl super::Backend for PgStore {
    fn lease_webhook<'a>(
        &'a self,
        webhook: &'a str,
        holder: &'a str,
        seconds: i64,
    ) -> BoxFuture<'a, Result<bool, StorageError>> {
        Box::pin(self.on_pool(async move |c| {
            let sql = outbox::with_now(outbox::LEASE, PG_NOW);
            let n = c
                .execute(sql.as_str(), &[&webhook, &holder, &seconds])
                .await
                .map_err(error)?;
            Ok(n == 1)
        }))
    }
    fn next_event<'a>(
        &'a self,
        webhook: &'a str,
    ) -> BoxFuture<'a, Result<Option<Event>, StorageError>> {
        Box::pin(self.on_pool(async move |c| {
            let row = c
                .query_opt(outbox::NEXT, &[&webhook])
                .await
                .map_err(error)?;
            row.map(|r| eight(&r).map(super::event)).transpose()
        }))
    }
    fn mark_delivered<'a>(
        &'a self,
        webhook: &'a str,
        holder: &'a str,
        event_id: i64,
    ) -> BoxFuture<'a, Result<bool, StorageError>> {
        Box::pin(self.on_pool(async move |c| {
            let sql = outbox::with_now(outbox::MARK, PG_NOW);
            let n = c
                .execute(sql.as_str(), &[&webhook, &holder, &event_id])
                .await
                .map_err(error)?;
            Ok(n == 1)
        }))
    }
    fn pending_events<'a>(&'a self, webhook: &'a str) -> BoxFuture<'a, Result<u64, StorageError>> {
        Box::pin(self.on_pool(async move |c| {
            let row = c
                .query_one(outbox::PENDING, &[&webhook])
                .await
                .map_err(error)?;
            let n: i64 = row.try_get(0).map_err(error)?;
            Ok(n.max(0) as u64)
        }))
    }
    fn registration<'a>(
        &'a self,
        provider: &'a str,
    ) -> BoxFuture<'a, Result<Option<Registration>, StorageError>> {
        Box::pin(self.on_pool(async move |c| {
            let row = c
                .query_opt(clients::GET, &[&provider])
                .await
                .map_err(error)?;
            row.map(|r| {
                Ok(Registration {
                    provider: r.try_get(0).map_err(error)?,
                    resource: r.try_get(1).map_err(error)?,
                    metadata: r.try_get(2).map_err(error)?,
                    client_id: r.try_get(3).map_err(error)?,
                    registered_at: r.try_get(4).map_err(error)?,
                })
            })
            .transpose()
        }))
    }
    fn register_client<'a>(
        &'a self,
        r: &'a Registration,
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(self.on_pool(async move |c| {
            c.execute(
                clients::PUT,
                &[
                    &r.provider,
                    &r.resource,
                    &r.metadata,
                    &r.client_id,
                    &r.registered_at,
                ],
            )
            .await
            .map_err(error)?;
            Ok(())
        }))
    }
    fn proof_key<'a>(
        &'a self,
        provider: &'a str,
        user_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<SealedProofKey>, StorageError>> {
        Box::pin(self.on_pool(async move |c| {
            let row = c
                .query_opt(proof_keys::GET, &[&provider, &user_id])
                .await
                .map_err(error)?;
            row.map(|r| sealed_proof_key(&r)).transpose()
        }))
    }
    fn put_proof_key<'a>(
        &'a self,
        key: &'a SealedProofKey,
        now: i64,
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(self.on_pool(async move |c| {
            c.execute(
                proof_keys::PUT,
                &[&key.provider, &key.user_id, &key.key_id, &key.sealed, &now],
            )
            .await
            .map_err(error)?;
            Ok(())
        }))
    }
    fn proof_keys_to_reseal<'a>(
        &'a self,
        active: &'a str,
        after: &'a RowKey,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<SealedProofKey>, StorageError>> {
        Box::pin(self.on_pool(async move |c| {
            let rows = c
                .query(
                    proof_keys::TO_RESEAL,
                    &[&active, &after.provider, &after.user_id, &i64::from(limit)],
                )
                .await
                .map_err(error)?;
            rows.iter().map(sealed_proof_key).collect()
        }))
    }
    fn reseal_proof_key<'a>(
        &'a self,
        old_key_id: &'a str,
        key: &'a SealedProofKey,
    ) -> BoxFuture<'a, Result<bool, StorageError>> {
        Box::pin(self.on_pool(async move |c| {
            let n = c
                .execute(
                    proof_keys::RESEAL,
                    &[
                        &key.provider,
                        &key.user_id,
                        &old_key_id,
                        &key.key_id,
                        &key.sealed,
                    ],
                )
                .await
                .map_err(error)?;
            Ok(n == 1)
        }))
    }
    fn consume_authorization<'a>(
        &'a self,
        id: &'a str,
        expires_at: i64,
        now: i64,
    ) -> BoxFuture<'a, Result<bool, StorageError>> {
        Box::pin(self.on_pool(async move |c| {
            c.execute(authorizations::PRUNE, &[&now])
                .await
                .map_err(error)?;
            let n = c
                .execute(authorizations::CONSUME, &[&id, &expires_at])
                .await
                .map_err(error)?;
            Ok(n == 1)
        }))
    }
    fn register_webhook<'a>(&'a self, webhook: &'a str) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(self.on_pool(async move |c| {
            c.execute(outbox::REGISTER, &[&webhook])
                .await
                .map_err(error)?;
            Ok(())
        }))
    }
    fn prune_events(&self, before: i64) -> BoxFuture<'_, Result<u64, StorageError>> {
        Box::pin(self.on_pool(async move |c| {
            let n = c
                .execute(outbox::PRUNE_EVENTS, &[&before])
                .await
                .map_err(error)?;
            // Idempotent: a cut between the two is made good next time.
            c.execute(outbox::PRUNE_DELIVERIES, &[])
                .await
                .map_err(error)?;
            Ok(n)
        }))
    }
    fn announced<'a>(
        &'a self,
        first: &'a RowKey,
        last: &'a RowKey,
    ) -> BoxFuture<'a, Result<Vec<crate::events::Announced>, StorageError>> {
        Box::pin(self.on_pool(async move |c| {
            let statement = c.prepare_cached(outbox::ANNOUNCED).await.map_err(error)?;
            let rows = c
                .query(
                    &statement,
                    &[
                        &first.provider,
                        &first.user_id,
                        &last.provider,
                        &last.user_id,
                    ],
                )
                .await
                .map_err(error)?;
            rows.iter()
                .map(|r| {
                    Ok(super::announced((
                        r.try_get(0).map_err(error)?,
                        r.try_get(1).map_err(error)?,
                        r.try_get(2).map_err(error)?,
                        r.try_get(3).map_err(error)?,
                    )))
                })
                .collect()
        }))
    }
    fn announce<'a>(
        &'a self,
        a: &'a crate::events::Announcement,
    ) -> BoxFuture<'a, Result<bool, StorageError>> {
        Box::pin(self.on_pool(async move |c| {
            let generation = super::to_i64(a.generation)?;
            let to: &str = a.to;
            let statement = c.prepare_cached(ANNOUNCE_SQL).await.map_err(error)?;
            let n = c
                .execute(
                    &statement,
                    &[
                        &a.row.provider,
                        &a.row.user_id,
                        &generation,
                        &a.from,
                        &to,
                        &a.reason,
                    ],
                )
                .await
                .map_err(error)?;
            Ok(n == 1)
        }))
    }
    fn pool_use(&self) -> crate::metrics::PoolUse {
        let mut total = crate::metrics::PoolUse::default();
        for pool in [&self.pool, &self.tx_pool] {
            let s = pool.status();
            total.open += s.size as u64;
            total.idle += s.available as u64;
            total.max += s.max_size as u64;
        }
        total
    }
    fn append_audit<'a>(
        &'a self,
        entries: &'a [audit::Entry],
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(self.on_pool(async move |c| {
            if entries.is_empty() {
                return Ok(());
            }
            let column = |f: fn(&audit::Entry) -> String| entries.iter().map(f).collect::<Vec<_>>();
            let at: Vec<i64> = entries.iter().map(|e| e.at).collect();
            let generation: Vec<Option<i64>> = entries
                .iter()
                .map(|e| e.generation.map(|g| i64::try_from(g).unwrap_or(i64::MAX)))
                .collect();
            let (caller, action, provider, user_id, outcome) = (
                column(|e| e.caller.clone()),
                column(|e| e.action.name().to_string()),
                column(|e| e.provider.clone()),
                column(|e| e.user_id.clone()),
                column(|e| e.outcome.clone()),
            );
            let statement = c.prepare_cached(APPEND_AUDIT_SQL).await.map_err(error)?;
            c.execute(
                &statement,
                &[
                    &at,
                    &caller,
                    &action,
                    &provider,
                    &user_id,
                    &generation,
                    &outcome,
                ],
            )
            .await
            .map_err(error)?;
            Ok(())
        }))
    }
    fn audit<'a>(
        &'a self,
        filter: &'a audit::Filter,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<audit::Entry>, StorageError>> {
        Box::pin(self.on_pool(async move |c| {
            let statement = c.prepare_cached(super::AUDIT_SQL).await.map_err(error)?;
            let rows = c
                .query(
                    &statement,
                    &[
                        &filter.provider,
                        &filter.user_id,
                        &filter.caller,
                        &filter.since,
                        &filter.until,
                        &filter.after_id,
                        &i64::from(limit),
                    ],
                )
                .await
                .map_err(error)?;
            rows.iter().map(|r| super::audit_entry(eight(r)?)).collect()
        }))
    }
    fn prune_audit(&self, before: i64) -> BoxFuture<'_, Result<u64, StorageError>> {
        Box::pin(self.on_pool(async move |c| {
            c.execute("DELETE FROM tokenkeep_audit WHERE at < $1", &[&before])
                .await
                .map_err(error)
        }))
    }
    fn database_now(&self) -> BoxFuture<'_, Result<Option<i64>, StorageError>> {
        Box::pin(async move { PgStore::database_now(self).await.map(Some) })
    }
    fn read<'a>(
        &'a self,
        provider: &'a str,
        user_id: &'a str,
    ) -> BoxFuture<'a, Result<BackendRead, StorageError>> {
        Box::pin(self.on_pool(async move |c| {
            let statement = c.prepare_cached(READ_SQL).await.map_err(error)?;
            let row = c
                .query_one(&statement, &[&provider, &user_id])
                .await
                .map_err(error)?;
            decode_read(&row)
        }))
    }
    fn list<'a>(
        &'a self,
        after: Option<&'a RowKey>,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<SealedRow>, StorageError>> {
        Box::pin(self.on_pool(async move |c| {
            let limit = i64::from(limit);
            let rows = match after {
                Some(k) => {
                    let sql = format!(
                        "SELECT {COLUMNS} FROM tokenkeep_tokens \
                         WHERE (provider, user_id) > ($1, $2) \
                         ORDER BY provider, user_id LIMIT $3"
                    );
                    let statement = c.prepare_cached(&sql).await.map_err(error)?;
                    c.query(&statement, &[&k.provider, &k.user_id, &limit])
                        .await
                }
                None => {
                    let sql = format!(
                        "SELECT {COLUMNS} FROM tokenkeep_tokens \
                         ORDER BY provider, user_id LIMIT $1"
                    );
                    let statement = c.prepare_cached(&sql).await.map_err(error)?;
                    c.query(&statement, &[&limit]).await
                }
            }
            .map_err(error)?;
            rows.iter().map(decode).collect()
        }))
    }
    fn rows_per_key(&self) -> BoxFuture<'_, Result<Vec<(String, u64)>, StorageError>> {
        Box::pin(self.on_pool(async |c| {
            let rows = c.query(super::ROWS_PER_KEY, &[]).await.map_err(error)?;
            rows.iter()
                .map(|r| {
                    let key: String = r.try_get(0).map_err(error)?;
                    let n: i64 = r.try_get(1).map_err(error)?;
                    Ok((key, n.max(0) as u64))
                })
                .collect()
        }))
    }
    fn insert<'a>(
        &'a self,
        row: &'a SealedRow,
        now: i64,
    ) -> BoxFuture<'a, Result<bool, StorageError>> {
        Box::pin(self.on_pool(async move |c| {
            let statement = c.prepare_cached(&INSERT_SQL).await.map_err(error)?;
            let values = RowValues::new(row, now);
            let n = c
                .execute(&statement, &values.with(&[]))
                .await
                .map_err(error)?;
            Ok(n == 1)
        }))
    }
    fn upsert<'a>(
        &'a self,
        row: &'a SealedRow,
        now: i64,
    ) -> BoxFuture<'a, Result<u64, StorageError>> {
        Box::pin(self.on_pool(async move |c| {
            let statement = c.prepare_cached(&UPSERT_SQL).await.map_err(error)?;
            let values = RowValues::new(row, now);
            let written = c
                .query_one(&statement, &values.with(&[]))
                .await
                .map_err(error)?;
            let generation: i64 = written.try_get(0).map_err(error)?;
            Ok(generation.max(0) as u64)
        }))
    }
    fn delete<'a>(
        &'a self,
        provider: &'a str,
        user_id: &'a str,
    ) -> BoxFuture<'a, Result<bool, StorageError>> {
        Box::pin(self.on_pool(async move |c| {
            let statement = c.prepare_cached(DELETE_SQL).await.map_err(error)?;
            let n = c
                .execute(&statement, &[&provider, &user_id])
                .await
                .map_err(error)?;
            Ok(n > 0)
        }))
    }
    fn grant_cache(
        &self,
        clock: Arc<crate::clock::SharedClock>,
    ) -> Result<(Arc<GrantCache>, Option<super::listener::AbortOnDrop>), StorageError> {
        let cache = Arc::new(GrantCache::default());
        let listener = super::listener::spawn(&self.connect, cache.clone(), clock);
        Ok((cache, Some(listener)))
    }

    fn begin(&self) -> BoxFuture<'_, Result<Box<dyn BackendTransaction>, StorageError>> {
        Box::pin(async move { Ok(Box::new(PgStore::begin(self)) as Box<dyn BackendTransaction>) })
    }
    fn schema_version(&self) -> i64 {
        super::latest_schema(MIGRATIONS)
    }
    fn conversation_entries<'a>(
        &'a self,
        conversation_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ConversationEntry>, StorageError>> {
        Box::pin(self.on_pool(async move |c| {
            let statement = c
                .prepare_cached(
                    "SELECT conversation_id, provider, user_id, scopes, generation, updated_at \
                     FROM tokenkeep_conversations WHERE conversation_id = $1 ORDER BY provider",
                )
                .await
                .map_err(error)?;
            let rows = c
                .query(&statement, &[&conversation_id])
                .await
                .map_err(error)?;
            rows.iter()
                .map(|r| {
                    let scopes: String = r.try_get("scopes").map_err(error)?;
                    Ok(ConversationEntry {
                        conversation_id: r.try_get("conversation_id").map_err(error)?,
                        provider: r.try_get("provider").map_err(error)?,
                        user_id: r.try_get("user_id").map_err(error)?,
                        scopes: serde_json::from_str(&scopes).map_err(|e| {
                            StorageError::Unavailable(format!("postgres: malformed scopes: {e}"))
                        })?,
                        generation: r.try_get::<_, i64>("generation").map_err(error)?.max(0) as u64,
                        updated_at: r.try_get("updated_at").map_err(error)?,
                    })
                })
                .collect()
        }))
    }
    fn put_conversation_entry<'a>(
        &'a self,
        entry: &'a ConversationEntry,
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(self.on_pool(async move |c| {
            let statement = c
                .prepare_cached(
                    "INSERT INTO tokenkeep_conversations \
                     (conversation_id, provider, user_id, scopes, generation, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (conversation_id, provider) DO UPDATE SET \
                     user_id = excluded.user_id, scopes = excluded.scopes, \
                     generation = excluded.generation, updated_at = excluded.updated_at",
                )
                .await
                .map_err(error)?;
            let scopes = scopes_text(&entry.scopes);
            let generation = to_i64(entry.generation)?;
            c.execute(
                &statement,
                &[
                    &entry.conversation_id,
                    &entry.provider,
                    &entry.user_id,
                    &scopes,
                    &generation,
                    &entry.updated_at,
                ],
            )
            .await
            .map_err(error)?;
            Ok(())
        }))
    }
}

/// A write under the row's lock that found another generation: impossible
/// unless something outside the lock changed the row; the row is not
/// written (and is then saved as a rescue only if it still can be).
fn changed_under_lock() -> StorageError {
    StorageError::Unavailable("postgres: the locked row changed under its lock".into())
}

/// A connection a transaction runs on.
enum Conn {
    Pooled(Object),
    /// Opened to save a write after the pooled one was cut off.
    Alone(ClientWrapper),
}

impl Conn {
    fn client(&self) -> &ClientWrapper {
        match self {
            Conn::Pooled(c) => c,
            Conn::Alone(c) => c,
        }
    }

    /// Rolls back whatever it holds, then returns it to the pool (our own
    /// connection closes); one that does not answer is discarded.
    async fn roll_back(self) {
        let rolled_back = match &self {
            Conn::Pooled(pooled) => {
                bounded(STATEMENT_BOUND, pooled.batch_execute("ROLLBACK")).await
            }
            Conn::Alone(_) => Err(StorageError::ConnectionLost("not pooled".into())),
        };
        match rolled_back {
            Ok(()) => drop(self),
            Err(_) => self.discard(),
        }
    }

    /// Closes it without a word to the server (which rolls back whatever
    /// it had not committed); a pooled one is never handed out again.
    fn discard(self) {
        match self {
            Conn::Pooled(c) => drop(Object::take(c)),
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
    /// Whether `BEGIN` has run on `conn`.
    begun: bool,
    /// The session serving `conn`, to end it if we lose sight of it.
    session: Option<Session>,
    /// The row written in this transaction and the generation it replaces.
    written: Option<(SealedRow, u64, i64)>,
    /// The row this transaction holds locked, with the generation it held
    /// when locked or since written here: a write that expects that
    /// generation cannot miss, since no one else can change the row.
    held: Option<(String, String, u64)>,
    /// Such a write, not yet sent: it goes with the commit, in the same
    /// round trip, or before any other statement of the transaction.
    deferred: Option<(SealedRow, u64, i64)>,
    store: PgStore,
}

/// The transaction that holds a row lock, by its id (`txid_current`).
struct Session {
    xid: i64,
}

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
    fn client(&self) -> Result<&ClientWrapper, StorageError> {
        self.conn
            .as_ref()
            .map(Conn::client)
            .ok_or_else(|| StorageError::ConnectionLost("postgres: transaction lost".into()))
    }

    /// Takes the connection out of service after a failure.
    fn lose_connection(&mut self) {
        self.begun = false;
        // No connection, no lock: nothing is held, no write can be deferred.
        self.held = None;
        self.session = None;
        if let Some(conn) = self.conn.take() {
            conn.discard();
        }
    }

    /// Takes a pooled connection, waiting for one unless `wait` is false
    /// (then none free soon is false: a caller who need not wait does not
    /// queue behind lock waiters for a connection either).
    async fn open(&mut self, wait: bool) -> Result<bool, StorageError> {
        if self.conn.is_some() {
            return Ok(true);
        }
        let pooled = if wait {
            get(&self.store.tx_pool, self.store.lock_wait * 2).await?
        } else {
            let mut timeouts = self.store.tx_pool.timeouts();
            timeouts.wait = Some(super::TRY_ACQUIRE);
            let got = tokio::time::timeout(
                super::TRY_ACQUIRE + 2 * STATEMENT_BOUND,
                self.store.tx_pool.timeout_get(&timeouts),
            )
            .await;
            match got {
                Ok(Ok(pooled)) => pooled,
                // None free at once: as busy as a held lock.
                Ok(Err(PoolError::Timeout(deadpool_postgres::TimeoutType::Wait))) => {
                    return Ok(false);
                }
                Ok(Err(e)) => return Err(pool_error(e)),
                Err(_) => {
                    return Err(StorageError::Unavailable(
                        "postgres: no connection within the wait".into(),
                    ));
                }
            }
        };
        self.conn = Some(Conn::Pooled(pooled));
        self.begun = false;
        Ok(true)
    }

    /// Locks the row (with `BEGIN` in the same round trip, the first time),
    /// waiting for it unless `wait` is false (then a lock held elsewhere is
    /// `LockTimeout` at once).
    async fn lock(
        &mut self,
        provider: &str,
        user_id: &str,
        wait: bool,
    ) -> Result<BackendRead, StorageError> {
        // A read after a write sees it.
        self.send_deferred().await?;
        self.lock_row(provider, user_id, wait).await
    }

    /// [`PgTransaction::lock`] with no write deferred.
    async fn lock_row(
        &mut self,
        provider: &str,
        user_id: &str,
        wait: bool,
    ) -> Result<BackendRead, StorageError> {
        let bound = if wait {
            self.store.lock_wait + STATEMENT_BOUND
        } else {
            STATEMENT_BOUND
        };
        if !self.open(wait).await? {
            // No connection free at once: as busy as a held lock.
            return Err(StorageError::LockTimeout);
        }
        let begin = !self.begun;
        // From the moment BEGIN may be sent, the connection may hold a
        // transaction: never handed back without a rollback.
        self.begun = true;
        let client = self.client()?;
        let no_wait = !wait;
        let found = within(bound, async {
            let statement = client.prepare_cached(&LOCK_SQL).await.map_err(error)?;
            let params: [&(dyn ToSql + Sync); 3] = [&provider, &user_id, &no_wait];
            if begin {
                // Pipelined: one round trip.
                let (begun, row) = tokio::join!(
                    client.batch_execute(BEGIN_SQL),
                    client.query_one(&statement, &params)
                );
                begun.map_err(error)?;
                row.map_err(error)
            } else {
                client.query_one(&statement, &params).await.map_err(error)
            }
        })
        .await;
        let row = match found {
            Ok(row) => row,
            Err(e) => {
                // Otherwise BEGIN ran and the refused lock aborted the
                // transaction: rolled back when it ends.
                if matches!(e, StorageError::ConnectionLost(_)) {
                    self.lose_connection();
                }
                return Err(e);
            }
        };
        // No row, no lock, no id.
        let xid: Option<i64> = row.try_get("xid").map_err(error)?;
        if let Some(xid) = xid {
            self.session = Some(Session { xid });
        }
        let read = decode_read(&row)?;
        self.held = read
            .0
            .as_ref()
            .map(|r| (provider.to_string(), user_id.to_string(), r.generation));
        Ok(read)
    }

    /// Sends the compare-and-set of `row` over `expected`; true when it
    /// wrote the row.
    async fn send_write(
        &self,
        row: &SealedRow,
        expected: u64,
        now: i64,
    ) -> Result<bool, StorageError> {
        let statement = self.write_statement().await?;
        self.execute_write(&statement, row, expected, now).await
    }

    /// The compare-and-set, prepared on this connection (once).
    async fn write_statement(&self) -> Result<Statement, StorageError> {
        let client = self.client()?;
        within(STATEMENT_BOUND, async {
            client
                .prepare_cached(COMPARE_AND_SET_SQL)
                .await
                .map_err(error)
        })
        .await
    }

    /// Sends the prepared compare-and-set at its first poll, so that a
    /// statement polled after it is sent after it.
    async fn execute_write(
        &self,
        statement: &Statement,
        row: &SealedRow,
        expected: u64,
        now: i64,
    ) -> Result<bool, StorageError> {
        let client = self.client()?;
        let generation = to_i64(row.generation)?;
        let expected = to_i64(expected)?;
        let values = RowValues::new(row, now);
        within(STATEMENT_BOUND, async {
            let n = client
                .execute(statement, &values.with(&[&generation, &expected]))
                .await
                .map_err(error)?;
            Ok(n == 1)
        })
        .await
    }

    /// Sends a deferred write before another statement of the transaction.
    /// It was reported written already: if it did not land, it is saved
    /// another way (as when the connection is lost), or this is an error.
    /// Kept until the send has ended, so that a caller cancelled before it
    /// was sent leaves it for the commit.
    async fn send_deferred(&mut self) -> Result<(), StorageError> {
        let Some((row, expected, now)) = self.deferred.clone() else {
            return Ok(());
        };
        let sent = self.send_write(&row, expected, now).await;
        self.deferred = None;
        let why = match sent {
            Ok(true) => return Ok(()),
            Ok(false) => changed_under_lock(),
            Err(e) => e,
        };
        if self.save_written(&row, expected, now).await? {
            Ok(())
        } else {
            Err(StorageError::Unavailable(format!(
                "{why}; the row changed before the refreshed tokens could be saved"
            )))
        }
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
        let old = self.session.take();
        self.lose_connection();
        let alone = self.store.connect_alone().await?;
        let generation = to_i64(row.generation)?;
        let replaces = to_i64(expected)?;
        let values = RowValues::new(row, now);
        bounded(
            STATEMENT_BOUND,
            alone.execute(RESCUE_SQL.as_str(), &values.with(&[&generation, &replaces])),
        )
        .await?;
        tracing::warn!(
            provider = %row.provider,
            "lost the database connection holding a refreshed row; saving it on a new one"
        );
        if let Some(old) = old {
            // Its lock goes now, not when the server notices the silence.
            // Only if it is still in our transaction; best effort: it may
            // be gone already.
            let _ = bounded(STATEMENT_BOUND, alone.execute(END_HOLDER_SQL, &[&old.xid])).await;
        }
        self.conn = Some(Conn::Alone(alone));
        self.begun = false;
        let (stored, _) = self.lock_row(&row.provider, &row.user_id, true).await?;
        Ok(stored
            .is_some_and(|s| s.generation == row.generation && s.access_token == row.access_token))
    }
}

impl BackendTransaction for PgTransaction {
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
            // A refusal below must be the lock's, not a pending write's.
            self.send_deferred().await?;
            match self.lock_row(provider, user_id, false).await {
                Ok(read) => Ok(Some(read)),
                // Rolling back would take a row written here with it.
                Err(StorageError::LockTimeout) if self.written.is_some() => {
                    Err(StorageError::Unavailable(
                        "postgres: a row lock held elsewhere would roll back a row this \
                         transaction wrote"
                            .into(),
                    ))
                }
                // NOWAIT's refusal aborted the transaction: roll it back,
                // and the connection can serve again.
                Err(StorageError::LockTimeout) => {
                    self.begun = false;
                    self.session = None;
                    self.held = None;
                    if let Some(conn) = self.conn.take() {
                        conn.roll_back().await;
                    }
                    Ok(None)
                }
                Err(e) => Err(e),
            }
        })
    }
    fn start_refresh<'a>(
        &'a mut self,
        provider: &'a str,
        user_id: &'a str,
        generation: u64,
        at: i64,
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            let Some(session) = self.session.as_ref() else {
                return Err(StorageError::ConnectionLost(
                    "postgres: no row lock is held".into(),
                ));
            };
            let generation = to_i64(generation)?;
            let recorded = self
                .store
                .record_refresh_start([&provider, &user_id, &generation, &at], session)
                .await?;
            if recorded {
                Ok(())
            } else {
                // The database ended our session: its lock is gone.
                self.session = None;
                self.lose_connection();
                Err(StorageError::ConnectionLost(
                    "postgres: the session holding the row lock has ended".into(),
                ))
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
            // Under the lock, a write that expects the generation we hold
            // cannot miss: it waits for the commit, one round trip fewer.
            if self.deferred.is_none()
                && self.conn.is_some()
                && self.session.is_some()
                && self.held.as_ref().is_some_and(|(p, u, g)| {
                    *p == row.provider && *u == row.user_id && *g == expected
                })
            {
                // What the send would refuse, refused now.
                to_i64(row.generation)?;
                to_i64(expected)?;
                self.held = Some((row.provider.clone(), row.user_id.clone(), row.generation));
                self.deferred = Some((row.clone(), expected, now));
                self.written = Some((row.clone(), expected, now));
                return Ok(true);
            }
            self.send_deferred().await?;
            // A write opens the transaction if no read did.
            self.open(true).await?;
            if !self.begun {
                self.begun = true;
                let client = self.client()?;
                if let Err(e) = bounded(STATEMENT_BOUND, client.batch_execute(BEGIN_SQL)).await {
                    self.lose_connection();
                    return Err(e);
                }
            }
            match self.send_write(row, expected, now).await {
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
            if !self.begun {
                // Rolled back after a failure: a row written here is gone.
                if self.written.is_some() {
                    return Err(StorageError::Unavailable(
                        "postgres: the transaction was rolled back before its commit".into(),
                    ));
                }
                // Nothing was locked or written: nothing to commit; the
                // connection goes back to the pool.
                drop(self.conn.take());
                return Ok(());
            }
            let committed = match self.deferred.take() {
                None => bounded(STATEMENT_BOUND, self.client()?.batch_execute("COMMIT")).await,
                // The write and the commit in one round trip, the write
                // first (prepared beforehand: a statement still to prepare
                // would let the COMMIT overtake it). A write that failed
                // turns the COMMIT into a rollback.
                Some((row, expected, now)) => {
                    let client = self.client()?;
                    let pair = match self.write_statement().await {
                        Ok(statement) => {
                            tokio::join!(
                                self.execute_write(&statement, &row, expected, now),
                                bounded(STATEMENT_BOUND, client.batch_execute("COMMIT"))
                            )
                        }
                        Err(e) => (Err(e), Ok(())),
                    };
                    // A write that did not land fails the commit, and is
                    // saved another way below.
                    match pair {
                        (Ok(true), committed) => committed,
                        (Ok(false), _) => Err(changed_under_lock()),
                        (Err(e), _) => Err(e),
                    }
                }
            };
            match committed {
                Ok(()) => {
                    // Back to the pool (or closed, if it was our own).
                    drop(self.conn.take());
                    Ok(())
                }
                // Whatever failed the commit (a lost connection, a server
                // that could not write), a written row is saved another way:
                // the provider may already have rotated the token it replaces.
                Err(e) => match self.written.take() {
                    // Nothing written: a failed read-only transaction is a rollback.
                    None => {
                        self.lose_connection();
                        match e {
                            StorageError::ConnectionLost(_) => Ok(()),
                            e => Err(e),
                        }
                    }
                    Some((row, expected, now)) => {
                        let m = e.to_string();
                        if !self.save_written(&row, expected, now).await? {
                            return Err(StorageError::Unavailable(format!(
                                "{m}; the row changed before the refreshed tokens could be saved"
                            )));
                        }
                        bounded(STATEMENT_BOUND, self.client()?.batch_execute("COMMIT")).await?;
                        drop(self.conn.take());
                        Ok(())
                    }
                },
            }
        })
    }
}

/// A proof key in [`proof_keys::GET`]'s columns.
fn sealed_proof_key(r: &Row) -> Result<SealedProofKey, StorageError> {
    Ok(SealedProofKey {
        provider: r.try_get(0).map_err(error)?,
        user_id: r.try_get(1).map_err(error)?,
        key_id: r.try_get(2).map_err(error)?,
        sealed: r.try_get(3).map_err(error)?,
    })
}
