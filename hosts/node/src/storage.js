// SQLite storage, as host/src/storage/sqlite.rs and the shared SQL of
// host/src/storage/mod.rs (`rows!`) keep it: one file shared with the Rust
// host (same schema, migrations from host/schema/sqlite, same pragmas), WAL
// so that readers never wait, and a transaction that takes the file's write
// lock at its first locking read (`BEGIN IMMEDIATE`) and waits for it at
// most the lock wait (the busy timeout). Refresh-start records live in the
// second file `<database>-refresh-starts`, the audit log in `<database>-audit`.
//
// Rows are handled in the WIT `sealed-row` shape (camelCase, timestamps and
// generations as BigInt, ciphertexts as bytes): the store never sees a
// plaintext token.

import Database from 'better-sqlite3';
import { mkdirSync, readdirSync, readFileSync } from 'node:fs';
import { dirname } from 'node:path';
import { ERROR_CLASSES as CLASSES, TokenkeepError, configuration, storage as storageFailure } from './errors.js';
import { SCHEMA_DIR } from './paths.js';

/** A storage failure: the WIT `storage-error` it maps to (`lock-timeout`, `unavailable`). */
export class StorageError extends Error {
  constructor(tag, message) {
    super(message);
    this.tag = tag;
  }
}

const lockTimeout = () =>
  new StorageError('lock-timeout', 'row lock not granted within the lock wait');

/** Maps a SQLite failure onto the storage taxonomy (busy or locked: the wait ran out). */
export function sqliteError(e) {
  if (e instanceof StorageError) return e;
  const code = typeof e?.code === 'string' ? e.code : '';
  if (code.startsWith('SQLITE_BUSY') || code.startsWith('SQLITE_LOCKED')) return lockTimeout();
  return new StorageError('unavailable', `sqlite: ${e?.message ?? String(e)}`);
}

/** The host's error for a storage failure (outside the component). */
export function storageToHost(e) {
  const s = sqliteError(e);
  if (s.tag === 'lock-timeout') return new TokenkeepError('lock-timeout');
  if (s.schemaTooNew) return configuration(s.message);
  return storageFailure(s.message);
}

const COLUMNS =
  'provider, user_id, key_id, access_token, refresh_token, access_token_expires_at, ' +
  'refresh_token_expires_at, scopes, obtained_at, generation, failed_attempts, last_failure_at, ' +
  'last_failure, last_success_at, refresh_started_at, baseline_scopes, retry_not_before';

// The owner's clock is the database's: no db_now. The lock is the
// transaction's (BEGIN IMMEDIATE), so the locking read is the same SQL.
const READ_SQL =
  'SELECT t.provider, t.user_id, t.key_id, t.access_token, t.refresh_token, ' +
  't.access_token_expires_at, t.refresh_token_expires_at, t.scopes, t.obtained_at, t.generation, ' +
  't.failed_attempts, t.last_failure_at, t.last_failure, t.last_success_at, t.refresh_started_at, ' +
  't.baseline_scopes, t.retry_not_before, ' +
  'NULL AS db_now FROM (SELECT 1) AS one ' +
  'LEFT JOIN tokenkeep_tokens AS t ON t.provider = $1 AND t.user_id = $2';

const UPSERT_ON_CONFLICT =
  'DO UPDATE SET ' +
  'key_id = excluded.key_id, access_token = excluded.access_token, ' +
  'refresh_token = excluded.refresh_token, ' +
  'access_token_expires_at = excluded.access_token_expires_at, ' +
  'refresh_token_expires_at = excluded.refresh_token_expires_at, ' +
  'scopes = excluded.scopes, obtained_at = excluded.obtained_at, ' +
  'generation = tokenkeep_tokens.generation + 1, ' +
  'failed_attempts = excluded.failed_attempts, last_failure_at = excluded.last_failure_at, ' +
  'last_failure = excluded.last_failure, last_success_at = excluded.last_success_at, ' +
  'refresh_started_at = excluded.refresh_started_at, ' +
  'baseline_scopes = excluded.baseline_scopes, ' +
  'retry_not_before = excluded.retry_not_before, updated_at = excluded.updated_at ' +
  'RETURNING generation';

/** A new row continues after its deleted predecessor's last generation. */
const insertSql = (onConflict) =>
  `INSERT INTO tokenkeep_tokens (${COLUMNS}, updated_at) ` +
  'VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, ' +
  'COALESCE((SELECT generation + 1 FROM tokenkeep_tombstones ' +
  'WHERE provider = $1 AND user_id = $2), 1), ' +
  '$10, $11, $12, $13, $14, $15, $16, $17) ' +
  `ON CONFLICT (provider, user_id) ${onConflict}`;

const COMPARE_AND_SET_SQL =
  'UPDATE tokenkeep_tokens SET key_id = $1, access_token = $2, refresh_token = $3, ' +
  'access_token_expires_at = $4, refresh_token_expires_at = $5, scopes = $6, ' +
  'obtained_at = $7, generation = $8, failed_attempts = $9, last_failure_at = $10, ' +
  'last_failure = $11, last_success_at = $12, refresh_started_at = $13, ' +
  'baseline_scopes = $14, retry_not_before = $15, updated_at = $16 ' +
  'WHERE provider = $17 AND user_id = $18 AND generation = $19';

const MARKER_SQL =
  'SELECT started_at FROM tokenkeep_refresh_starts ' +
  'WHERE provider = $1 AND user_id = $2 AND generation = $3';

const RECORD_START_SQL =
  'INSERT INTO tokenkeep_refresh_starts (provider, user_id, generation, started_at) ' +
  'VALUES ($1, $2, $3, $4) ON CONFLICT (provider, user_id) DO UPDATE SET ' +
  'generation = excluded.generation, started_at = excluded.started_at';

const ERROR_CLASSES = new Set(CLASSES);

/** `$1`, `$2`... bound from a list. */
function args(...values) {
  const out = {};
  values.forEach((v, i) => {
    out[i + 1] = bind(v);
  });
  return out;
}

/** Integers as SQLite INTEGERs (BigInt), absent values as NULL. */
function bind(v) {
  if (v === undefined || v === null) return null;
  if (typeof v === 'number') return Number.isInteger(v) ? BigInt(v) : v;
  return v;
}

const opt = (v) => (v === null || v === undefined ? undefined : BigInt(v));

/** The migrations this build knows: host/schema/sqlite/NNNN.sql, by number. */
export function migrations() {
  const files = readdirSync(new URL('sqlite/', SCHEMA_DIR)).filter((f) => /^\d{4}\.sql$/.test(f));
  return files
    .map((f) => [Number.parseInt(f, 10), readFileSync(new URL(`sqlite/${f}`, SCHEMA_DIR), 'utf8')])
    .sort((a, b) => a[0] - b[0]);
}

const schemaFile = (name) => readFileSync(new URL(`sqlite/${name}`, SCHEMA_DIR), 'utf8');

function connect(path, lockWaitMs) {
  let db;
  try {
    db = new Database(path, { timeout: lockWaitMs });
    db.pragma('journal_mode = WAL');
    db.pragma('foreign_keys = ON');
    db.pragma('synchronous = NORMAL');
    db.defaultSafeIntegers(true);
  } catch (e) {
    try {
      db?.close();
    } catch {
      // already broken
    }
    throw sqliteError(e);
  }
  return db;
}

/** The database's schema is newer than this build knows. */
function schemaTooNew(found, known) {
  const e = new StorageError(
    'unavailable',
    `the database's schema is at version ${found}, newer than this tokenkeep knows ` +
      `(${known}): upgrade tokenkeep before using this database`,
  );
  e.schemaTooNew = true;
  return e;
}

/** A row's stored columns as a WIT `sealed-row`. */
function decodeRow(r) {
  let scopes;
  let baselineScopes;
  try {
    scopes = JSON.parse(r.scopes);
    // Rows from before baselines were kept: what they hold is the baseline.
    baselineScopes = r.baseline_scopes === null ? [...scopes] : JSON.parse(r.baseline_scopes);
    if (!Array.isArray(scopes) || !Array.isArray(baselineScopes)) throw new Error();
    if (![...scopes, ...baselineScopes].every((s) => typeof s === 'string')) throw new Error();
  } catch {
    throw new StorageError('unavailable', 'sqlite: a stored row is malformed (scopes)');
  }
  const failed = BigInt(r.failed_attempts);
  const generation = BigInt(r.generation);
  return {
    provider: r.provider,
    userId: r.user_id,
    keyId: r.key_id,
    accessToken: r.access_token,
    refreshToken: r.refresh_token ?? undefined,
    accessTokenExpiresAt: opt(r.access_token_expires_at),
    refreshTokenExpiresAt: opt(r.refresh_token_expires_at),
    scopes,
    baselineScopes,
    obtainedAt: BigInt(r.obtained_at),
    generation: generation < 0n ? 0n : generation,
    health: {
      failedAttempts: Number(failed < 0n ? 0n : failed > 4294967295n ? 4294967295n : failed),
      lastFailureAt: opt(r.last_failure_at),
      lastFailure: ERROR_CLASSES.has(r.last_failure) ? r.last_failure : undefined,
      lastSuccessAt: opt(r.last_success_at),
      refreshStartedAt: opt(r.refresh_started_at),
      retryNotBefore: opt(r.retry_not_before),
    },
  };
}

const scopesText = (scopes) => JSON.stringify(scopes);

/** `$1`...`$17` of an insert: the whole row but its generation, and the time. */
function rowArgs(row, now) {
  return args(
    row.provider,
    row.userId,
    row.keyId,
    row.accessToken,
    row.refreshToken,
    row.accessTokenExpiresAt,
    row.refreshTokenExpiresAt,
    scopesText(row.scopes),
    row.obtainedAt,
    row.health.failedAttempts,
    row.health.lastFailureAt,
    row.health.lastFailure,
    row.health.lastSuccessAt,
    row.health.refreshStartedAt,
    scopesText(row.baselineScopes),
    row.health.retryNotBefore,
    now,
  );
}

/** Splits `sqlite:PATH`, `sqlite://PATH` or a plain path. */
export function sqlitePath(database) {
  const url = String(database);
  if (url.startsWith('postgres://') || url.startsWith('postgresql://')) {
    throw configuration('the Node host keeps tokens in SQLite only: use sqlite:PATH');
  }
  if (url.startsWith('sqlite://')) return url.slice('sqlite://'.length);
  if (url.startsWith('sqlite:')) return url.slice('sqlite:'.length);
  return url;
}

/** One SQLite file (and its two side files), shared with the Rust host. */
export class SqliteStore {
  #main;
  #tx;
  #markers;
  #audit;
  #path;
  #lockWaitMs;
  #live = null;
  #statements = new Map();
  schemaVersion = 0;

  constructor(path, lockWaitMs) {
    this.#path = path;
    this.#lockWaitMs = lockWaitMs;
  }

  /** Opens the file, brings its schema up to date (or refuses a newer one). */
  static open(path, { lockWaitMs }) {
    if (path === '') throw storageFailure('the SQLite path is empty');
    const dir = dirname(path);
    if (dir && dir !== '.') {
      try {
        mkdirSync(dir, { recursive: true });
      } catch (e) {
        throw storageFailure(`cannot create ${dir}: ${e.code ?? 'error'}`);
      }
    }
    const store = new SqliteStore(path, lockWaitMs);
    try {
      store.#main = connect(path, lockWaitMs);
      store.#tx = connect(path, lockWaitMs);
      store.#markers = connect(`${path}-refresh-starts`, lockWaitMs);
      store.#audit = connect(`${path}-audit`, lockWaitMs);
      store.#migrate();
      store.#markers.exec(schemaFile('refresh-starts.sql'));
      store.#audit.exec(schemaFile('audit.sql'));
    } catch (e) {
      store.close();
      throw storageToHost(e);
    }
    return store;
  }

  #migrate() {
    const known = migrations();
    const latest = known.length ? known[known.length - 1][0] : 0;
    const currentOf = (db) => {
      const v = db.prepare('SELECT max(version) AS v FROM tokenkeep_schema').get().v;
      return v === null ? undefined : Number(v);
    };
    const refuseNewer = (current) => {
      if (current !== undefined && current > latest) throw schemaTooNew(current, latest);
    };
    // Most opens find the schema current: a read, which waits for no
    // refresh holding the write lock.
    let current;
    try {
      current = currentOf(this.#main);
    } catch {
      current = undefined;
    }
    refuseNewer(current);
    if (current !== undefined && current >= latest) {
      this.schemaVersion = latest;
      return;
    }
    const db = this.#main;
    db.exec('BEGIN IMMEDIATE');
    try {
      db.exec(
        'CREATE TABLE IF NOT EXISTS tokenkeep_schema ' +
          '(version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)',
      );
      current = currentOf(db);
      refuseNewer(current);
      const record = db.prepare('INSERT INTO tokenkeep_schema (version, applied_at) VALUES ($1, $2)');
      for (const [version, sql] of known) {
        if (current !== undefined && version <= current) continue;
        db.exec(sql);
        record.run(args(version, Math.floor(Date.now() / 1000)));
      }
      db.exec('COMMIT');
    } catch (e) {
      if (db.inTransaction) db.exec('ROLLBACK');
      throw e;
    }
    this.schemaVersion = latest;
  }

  #prepare(db, sql) {
    const key = db === this.#main ? `m:${sql}` : db === this.#tx ? `t:${sql}` : null;
    if (key === null) return db.prepare(sql);
    let s = this.#statements.get(key);
    if (!s) {
      s = db.prepare(sql);
      this.#statements.set(key, s);
    }
    return s;
  }

  #guard(work) {
    try {
      return work();
    } catch (e) {
      throw sqliteError(e);
    }
  }

  /** The last committed row, unlocked (WAL readers never wait for the write lock). */
  read(provider, userId) {
    return this.#guard(() => {
      const r = this.#prepare(this.#main, READ_SQL).get(args(provider, userId));
      return r.provider === null ? undefined : decodeRow(r);
    });
  }

  /** The client registered for a discovered provider (an MCP server's), if any. */
  registration(provider) {
    return this.#guard(() =>
      this.#prepare(
        this.#main,
        'SELECT resource, metadata, client_id FROM tokenkeep_clients WHERE provider = $1',
      ).get(args(provider)),
    );
  }

  /** Up to `limit` rows after `after`, ordered by provider then user. */
  list(after, limit) {
    return this.#guard(() => {
      const rows = after
        ? this.#prepare(
            this.#main,
            `SELECT ${COLUMNS} FROM tokenkeep_tokens WHERE (provider, user_id) > ($1, $2) ` +
              'ORDER BY provider, user_id LIMIT $3',
          ).all(args(after.provider, after.userId, limit))
        : this.#prepare(
            this.#main,
            `SELECT ${COLUMNS} FROM tokenkeep_tokens ORDER BY provider, user_id LIMIT $1`,
          ).all(args(limit));
      return rows.map(decodeRow);
    });
  }

  /** Inserts `row` only if none exists; false when one does. */
  insert(row, now) {
    return this.#guard(
      () => this.#prepare(this.#main, insertSql('DO NOTHING')).run(rowArgs(row, now)).changes === 1,
    );
  }

  /** Inserts or replaces `row`; the generation written. */
  upsert(row, now) {
    return this.#guard(() => {
      const r = this.#prepare(this.#main, insertSql(UPSERT_ON_CONFLICT)).get(rowArgs(row, now));
      return BigInt(r.generation);
    });
  }

  /** Deletes a row and its refresh-start record; false when there was no row. */
  delete(provider, userId) {
    return this.#guard(() => {
      this.#markers
        .prepare('DELETE FROM tokenkeep_refresh_starts WHERE provider = $1 AND user_id = $2')
        .run(args(provider, userId));
      const done = this.#prepare(
        this.#main,
        'DELETE FROM tokenkeep_tokens WHERE provider = $1 AND user_id = $2',
      ).run(args(provider, userId));
      return done.changes > 0;
    });
  }

  /** The entries persisted for a conversation, ordered by provider. */
  conversationEntries(conversationId) {
    return this.#guard(() =>
      this.#prepare(
        this.#main,
        'SELECT conversation_id, provider, user_id, scopes, generation, updated_at ' +
          'FROM tokenkeep_conversations WHERE conversation_id = $1 ORDER BY provider',
      )
        .all(args(conversationId))
        .map((r) => {
          let scopes;
          try {
            scopes = JSON.parse(r.scopes);
          } catch {
            throw new StorageError('unavailable', 'sqlite: a conversation entry is malformed');
          }
          return {
            conversationId: r.conversation_id,
            provider: r.provider,
            userId: r.user_id,
            scopes,
            generation: BigInt(r.generation),
            updatedAt: BigInt(r.updated_at),
          };
        }),
    );
  }

  /** Inserts or replaces one entry of a conversation. */
  putConversationEntry(e) {
    this.#guard(() =>
      this.#prepare(
        this.#main,
        'INSERT INTO tokenkeep_conversations ' +
          '(conversation_id, provider, user_id, scopes, generation, updated_at) ' +
          'VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (conversation_id, provider) DO UPDATE SET ' +
          'user_id = excluded.user_id, scopes = excluded.scopes, ' +
          'generation = excluded.generation, updated_at = excluded.updated_at',
      ).run(
        args(e.conversationId, e.provider, e.userId, JSON.stringify(e.scopes), e.generation, e.updatedAt),
      ),
    );
  }

  /** A transaction that takes the write lock at its first locking read. */
  begin() {
    if (this.#live) throw new StorageError('unavailable', 'sqlite: a transaction is already open');
    const txn = new SqliteTransaction(this, () => {
      if (this.#live === txn) this.#live = null;
    });
    this.#live = txn;
    return txn;
  }

  /** Rolls back whatever transaction is still open (the end of every call). */
  rollbackLive() {
    this.#live?.rollback();
  }

  get lockWaitMs() {
    return this.#lockWaitMs;
  }

  /** The transaction connection (for SqliteTransaction only). */
  txConnection() {
    if (!this.#tx || !this.#tx.open) this.#tx = connect(this.#path, this.#lockWaitMs);
    return this.#tx;
  }

  /** Closes and forgets the transaction connection (its state is unknown). */
  dropTxConnection() {
    for (const key of [...this.#statements.keys()]) {
      if (key.startsWith('t:')) this.#statements.delete(key);
    }
    try {
      this.#tx?.close();
    } catch {
      // closing rolls back; nothing else to do
    }
    this.#tx = null;
  }

  prepareTx(sql) {
    return this.#prepare(this.txConnection(), sql);
  }

  /** Reads the refresh-start record for the row's generation, from its own file. */
  refreshStart(provider, userId, generation) {
    const r = this.#markers.prepare(MARKER_SQL).get(args(provider, userId, generation));
    return r === undefined ? undefined : BigInt(r.started_at);
  }

  /** Records durably, in its own file, that a refresh from `generation` starts at `at`. */
  recordRefreshStart(provider, userId, generation, at) {
    this.#guard(() => this.#markers.prepare(RECORD_START_SQL).run(args(provider, userId, generation, at)));
  }

  /** Appends audit entries, all or none. */
  appendAudit(entries) {
    this.#guard(() => {
      const insert = this.#audit.prepare(
        'INSERT INTO tokenkeep_audit (at, caller, action, provider, user_id, generation, outcome) ' +
          'VALUES ($1, $2, $3, $4, $5, $6, $7)',
      );
      this.#audit.transaction(() => {
        for (const e of entries) {
          insert.run(args(e.at, e.caller, e.action, e.provider, e.userId, e.generation, e.outcome));
        }
      })();
    });
  }

  /** Deletes audit entries from before `before`: how many. */
  pruneAudit(before) {
    return this.#guard(
      () => this.#audit.prepare('DELETE FROM tokenkeep_audit WHERE at < $1').run(args(before)).changes,
    );
  }

  close() {
    this.#live?.rollback();
    for (const db of [this.#main, this.#tx, this.#markers, this.#audit]) {
      try {
        db?.close();
      } catch {
        // already closed
      }
    }
    this.#statements.clear();
  }
}

/** A transaction holding the file's write lock; refresh starts come from their own file. */
export class SqliteTransaction {
  #store;
  #done;
  #begun = false;
  #ended = false;

  constructor(store, done) {
    this.#store = store;
    this.#done = done;
  }

  get ended() {
    return this.#ended;
  }

  /** Takes the write lock, waiting the busy timeout or not at all. */
  #beginImmediate(wait) {
    if (this.#begun) return true;
    if (this.#ended) throw new StorageError('unavailable', 'sqlite: transaction already ended');
    const db = this.#store.txConnection();
    let unsure = true;
    try {
      if (!wait) db.pragma('busy_timeout = 0');
      try {
        db.exec('BEGIN IMMEDIATE');
        this.#begun = true;
      } catch (e) {
        const s = sqliteError(e);
        if (!(s.tag === 'lock-timeout' && !wait)) throw s;
      } finally {
        if (!wait) db.pragma(`busy_timeout = ${this.#store.lockWaitMs}`);
      }
      unsure = false;
      return this.#begun;
    } catch (e) {
      throw sqliteError(e);
    } finally {
      // A connection whose state is unknown is closed, never reused.
      if (unsure) this.#store.dropTxConnection();
    }
  }

  #lock(provider, userId, wait) {
    if (!this.#beginImmediate(wait)) return undefined;
    try {
      const r = this.#store.prepareTx(READ_SQL).get(args(provider, userId));
      if (r.provider === null) return { row: undefined };
      const row = decodeRow(r);
      // After the lock: a record a refresher that held it committed meanwhile.
      row.health.refreshStartedAt = this.#store.refreshStart(provider, userId, row.generation);
      return { row };
    } catch (e) {
      throw sqliteError(e);
    }
  }

  /** Reads and locks the row, waiting at most the lock wait. */
  loadForUpdate(provider, userId) {
    const read = this.#lock(provider, userId, true);
    if (!read) throw lockTimeout();
    return read;
  }

  /** Like loadForUpdate, never waiting: undefined when another holds the lock. */
  tryLoadForUpdate(provider, userId) {
    return this.#lock(provider, userId, false);
  }

  /** Writes `row` if the stored generation is still `expected`. */
  compareAndSet(row, expected, now) {
    this.#beginImmediate(true);
    try {
      const done = this.#store.prepareTx(COMPARE_AND_SET_SQL).run(
        args(
          row.keyId,
          row.accessToken,
          row.refreshToken,
          row.accessTokenExpiresAt,
          row.refreshTokenExpiresAt,
          scopesText(row.scopes),
          row.obtainedAt,
          row.generation,
          row.health.failedAttempts,
          row.health.lastFailureAt,
          row.health.lastFailure,
          row.health.lastSuccessAt,
          row.health.refreshStartedAt,
          scopesText(row.baselineScopes),
          row.health.retryNotBefore,
          now,
          row.provider,
          row.userId,
          expected,
        ),
      );
      return done.changes === 1;
    } catch (e) {
      throw sqliteError(e);
    }
  }

  /** Records the start of a refresh of the locked row, outside this transaction. */
  startRefresh(provider, userId, generation, at) {
    this.#store.recordRefreshStart(provider, userId, generation, at);
  }

  /** Makes the writes durable and releases the lock. */
  commit() {
    if (this.#ended) throw new StorageError('unavailable', 'sqlite: transaction already ended');
    try {
      if (this.#begun) {
        this.#store.txConnection().exec('COMMIT');
        this.#begun = false;
      }
    } catch (e) {
      this.rollback();
      throw sqliteError(e);
    }
    this.#end();
  }

  /** Rolls back (if the lock was taken) and releases the lock; idempotent. */
  rollback() {
    if (this.#ended) return;
    if (this.#begun) {
      try {
        const db = this.#store.txConnection();
        if (db.inTransaction) db.exec('ROLLBACK');
      } catch {
        // Closing the connection rolls back and releases the lock.
        this.#store.dropTxConnection();
      }
      this.#begun = false;
    }
    this.#end();
  }

  #end() {
    this.#ended = true;
    this.#done();
  }
}
