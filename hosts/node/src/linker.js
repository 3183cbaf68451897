// tokenkeep's own imports (clock, storage, sealing, providers,
// token-endpoint) for one export call, confined to the call's scope as
// host/src/linker.rs confines them: an export about (provider, user id) may
// read, lock, write, seal and open that row only; a conversation call its
// rows and its entries; a listing may scan its page but open nothing;
// `compare-and-set` only the row its transaction locked. A call that
// reaches further gets the WIT `refused` variant (`denied` for a token
// request), every later import of the call is refused too, its transaction
// is rolled back at once, and the export call fails as `sandbox`, whatever
// the component returns. What the component returns is checked against
// what the call opened or sealed (`vouchesFor`, `leaks`).

import { applyRegistration, providerContract } from './config.js';
import { mayRepeat, salvageRefreshToken } from './protocol.js';
import { SealingError, open as openSealed, sealTokens } from './sealing.js';
import { StorageError } from './storage.js';
import { requestRefresh } from './token_endpoint.js';

/** What a call that reached outside its scope fails with. */
export const REFUSED = 'the component reached outside its call';

/** Most access or refresh tokens one call may open or seal. */
const MAX_HANDED = 256;
/** Shortest refresh token looked for inside returned text. */
const MIN_LEAK_LEN = 8;
/** Longest token accepted, in bytes. */
const MAX_TOKEN_LEN = 16 * 1024;
/** The furthest ahead a write may put a row's next refresh. */
const LONGEST_BACKOFF_SECONDS = 300n + 60n;

const byteLength = (s) => Buffer.byteLength(s, 'utf8');

/** The scopes of export calls. */
export const Scope = {
  nothing: () => ({ kind: 'nothing' }),
  row: (provider, userId) => ({
    kind: 'rows',
    rows: [{ provider, userId }],
    conversation: undefined,
    writes: false,
  }),
  writableRow: (provider, userId) => ({
    kind: 'rows',
    rows: [{ provider, userId }],
    conversation: undefined,
    writes: true,
  }),
  rows: (rows, conversation, writes) => ({ kind: 'rows', rows, conversation, writes }),
  listing: (after, limit) => ({ kind: 'listing', after, limit }),
  summary: (key) => ({ kind: 'summary', key }),
};

const sameKey = (a, b) => a.provider === b.provider && a.userId === b.userId;
const sameStrings = (a, b) => a.length === b.length && a.every((s, i) => s === b[i]);

function sameBytes(a, b) {
  if (a === undefined || b === undefined) return a === b;
  return Buffer.compare(Buffer.from(a.buffer, a.byteOffset, a.byteLength), Buffer.from(b.buffer, b.byteOffset, b.byteLength)) === 0;
}

/** Thrown out of an import when the call was refused: the component sees the variant. */
class Refused {
  constructor(tag, val) {
    this.tag = tag;
    this.val = val;
  }
}

/** The state of one call into the component. */
export class CallContext {
  constructor(host, scope) {
    this.host = host;
    this.scope = scope;
    /** Access tokens this call opened or sealed, by row: what it may return. */
    this.handed = [];
    /** Refresh tokens this call saw: none may leave in what it returns. */
    this.kept = [];
    /** undefined: no live transaction; else {key} (key undefined until a load). */
    this.live = undefined;
    /** The live transaction object, to roll back at the end of the call. */
    this.liveTxn = undefined;
    /** Token requests per row: {key, sent, closed}. */
    this.requests = [];
    /** Scopes each row held or was given in this call. */
    this.scopes = [];
    /** The baselines of the rows this call saw. */
    this.baselines = [];
    /** The first refusal, if the call reached outside its scope. */
    this.refusal = undefined;
  }

  /** The rows this call sent token requests for. */
  refreshed() {
    return this.requests.filter((r) => r.sent > 0).map((r) => r.key);
  }

  /** Whether `accessToken` is one this call opened or sealed for that row, and no refresh token. */
  vouchesFor(provider, userId, accessToken) {
    return (
      !this.isKept(accessToken) &&
      this.handed.some(
        (h) =>
          h.key.provider === provider &&
          (userId === undefined || h.key.userId === userId) &&
          h.token === accessToken,
      )
    );
  }

  /** Whether `text` quotes a refresh token this call saw. */
  leaks(text) {
    return this.kept.some((t) => t === text || (byteLength(t) >= MIN_LEAK_LEN && text.includes(t)));
  }

  sawScopes(provider, userId, scopes) {
    return this.scopes.some(
      (s) =>
        s.key.provider === provider &&
        (userId === undefined || s.key.userId === userId) &&
        sameStrings(s.scopes, scopes),
    );
  }

  sawEachScope(provider, scopes) {
    const seen = [...this.scopes, ...this.baselines];
    return scopes.every((scope) =>
      seen.some((s) => (provider === undefined || s.key.provider === provider) && s.scopes.includes(scope)),
    );
  }

  isAbout(provider) {
    return this.scope.kind === 'rows' && this.scope.rows.some((k) => k.provider === provider);
  }

  sawRow(row) {
    const key = { provider: row.provider, userId: row.userId };
    if (!this.scopes.some((s) => sameKey(s.key, key) && sameStrings(s.scopes, row.scopes))) {
      this.scopes.push({ key, scopes: [...row.scopes] });
    }
    if (!this.baselines.some((s) => sameKey(s.key, key) && sameStrings(s.scopes, row.baselineScopes))) {
      this.baselines.push({ key, scopes: [...row.baselineScopes] });
    }
  }

  isKept(token) {
    return this.kept.includes(token);
  }

  /** Ends the call's reach: later imports are refused, the transaction rolled back. */
  refuse(what, tag = 'refused') {
    this.refusal ??= what;
    this.rollback();
    return new Refused(tag, `${REFUSED}: ${what}`);
  }

  /** Throws the refusal if the call was refused before. */
  checkNotRefused(tag = 'refused') {
    if (this.refusal !== undefined) throw new Refused(tag, `${REFUSED}: ${this.refusal}`);
  }

  vouch(provider, userId, accessToken) {
    const known = this.handed.some(
      (h) => h.key.provider === provider && h.key.userId === userId && h.token === accessToken,
    );
    if (!known) {
      if (this.handed.length >= MAX_HANDED) throw this.refuse('more tokens than a call can need');
      this.handed.push({ key: { provider, userId }, token: accessToken });
    }
  }

  keep(refreshToken) {
    if (byteLength(refreshToken) > MAX_TOKEN_LEN) throw this.refuse('a token longer than any token');
    if (!this.isKept(refreshToken)) {
      if (this.kept.length >= MAX_HANDED) throw this.refuse('more tokens than a call can need');
      this.kept.push(refreshToken);
    }
  }

  allows(provider, userId) {
    return this.scope.kind === 'rows' && this.scope.rows.some((k) => k.provider === provider && k.userId === userId);
  }

  allowsConversation(id) {
    return this.scope.kind === 'rows' && this.scope.conversation !== undefined && this.scope.conversation === id;
  }

  checkRow(provider, userId) {
    this.checkNotRefused();
    if (!this.allows(provider, userId)) throw this.refuse("a row outside the call's scope");
  }

  /** A write outside a transaction: in scope, allowed, and not to the locked row. */
  checkWrite(provider, userId) {
    this.checkRow(provider, userId);
    if (!(this.scope.kind === 'rows' && this.scope.writes)) {
      throw this.refuse('a write outside a transaction in a call that only reads');
    }
    if (this.live?.key && this.live.key.provider === provider && this.live.key.userId === userId) {
      throw this.refuse('a write beside the transaction that locks the row');
    }
  }

  /** A row written outside a lock is a new authorisation. */
  checkNewAuthorisation(row) {
    if (!sameStrings(row.baselineScopes, row.scopes) || row.health.retryNotBefore !== undefined) {
      throw this.refuse("a stored row whose baseline or backoff is not a new authorisation's");
    }
  }

  /** Rolls back the live transaction, if any (the end of every call, a refusal). */
  rollback() {
    const txn = this.liveTxn;
    this.liveTxn = undefined;
    this.live = undefined;
    if (txn) txn.rollback();
  }
}

/** A storage failure as the WIT variant the component sees. */
function storageVariant(e) {
  if (e instanceof Refused) return e;
  if (e instanceof StorageError) {
    return e.tag === 'lock-timeout' ? { tag: 'lock-timeout' } : { tag: 'unavailable', val: e.message };
  }
  throw e;
}

const committed = () => ({ tag: 'unavailable', val: 'transaction already committed' });

/**
 * A write under the lock keeps the row's baseline scopes and either keeps
 * the tokens and the generation (bookkeeping) or, once this call asked the
 * provider for the row, is the next generation.
 */
function honestSuccessor(locked, row, expected, requested) {
  if (expected !== locked.generation || !sameStrings(row.baselineScopes, locked.baselineScopes)) {
    return false;
  }
  if (row.generation === locked.generation + 1n) return requested;
  return (
    row.generation === locked.generation &&
    row.keyId === locked.keyId &&
    sameBytes(row.accessToken, locked.accessToken) &&
    sameBytes(row.refreshToken, locked.refreshToken) &&
    row.accessTokenExpiresAt === locked.accessTokenExpiresAt &&
    row.refreshTokenExpiresAt === locked.refreshTokenExpiresAt &&
    sameStrings(row.scopes, locked.scopes) &&
    row.obtainedAt === locked.obtainedAt
  );
}

/** The tokenkeep imports of one call. `host` is {store, keyring, config, now}. */
export function keeperImports(ctx) {
  const { store, keyring, config } = ctx.host;
  // The shared clock: the owning machine's, in seconds (a test may fix it).
  const nowSeconds = () => BigInt(ctx.host.now());

  /** A transaction as the component holds it: the one row it locked. */
  class Transaction {
    #txn;
    #locked;
    #key;

    constructor(txn) {
      this.#txn = txn;
    }

    #lockRow(provider, userId, wait) {
      ctx.checkRow(provider, userId);
      if (this.#key && !sameKey(this.#key, { provider, userId })) {
        throw ctx.refuse('a second row in one transaction');
      }
      if (!this.#txn || this.#txn.ended) throw committed();
      let read;
      try {
        read = wait ? this.#txn.loadForUpdate(provider, userId) : this.#txn.tryLoadForUpdate(provider, userId);
      } catch (e) {
        throw storageVariant(e);
      }
      if (read === undefined) return undefined;
      this.#locked = read.row;
      if (read.row) ctx.sawRow(read.row);
      ctx.live = { key: { provider, userId } };
      this.#key = { provider, userId };
      return { row: read.row, now: nowSeconds() };
    }

    loadForUpdate(provider, userId) {
      const read = this.#lockRow(provider, userId, true);
      if (read === undefined) throw { tag: 'lock-timeout' };
      return read;
    }

    tryLoadForUpdate(provider, userId) {
      return this.#lockRow(provider, userId, false);
    }

    compareAndSet(row, expectedGeneration) {
      ctx.checkNotRefused();
      const locked = this.#locked;
      if (!locked || locked.provider !== row.provider || locked.userId !== row.userId) {
        throw ctx.refuse('a write to a row the transaction did not lock');
      }
      // Only a request that went out may have brought new tokens.
      const requested = ctx.requests.some((r) => sameKey(r.key, row) && r.sent > 0);
      const now = nowSeconds();
      if (
        !honestSuccessor(locked, row, expectedGeneration, requested) ||
        (row.health.retryNotBefore !== undefined && row.health.retryNotBefore > now + LONGEST_BACKOFF_SECONDS)
      ) {
        throw ctx.refuse("a write that does not follow the locked row's generation");
      }
      if (!this.#txn || this.#txn.ended) throw committed();
      let written;
      try {
        written = this.#txn.compareAndSet(row, expectedGeneration, now);
      } catch (e) {
        throw storageVariant(e);
      }
      if (written) {
        ctx.sawRow(row);
        // The refresh endpoint must spend the newest token.
        this.#locked = row;
      }
      return written;
    }

    commit() {
      ctx.checkNotRefused();
      this.#locked = undefined;
      const txn = this.#txn;
      if (!txn || txn.ended) throw committed();
      this.#txn = undefined;
      ctx.live = undefined;
      ctx.liveTxn = undefined;
      try {
        txn.commit();
      } catch (e) {
        throw storageVariant(e);
      }
    }

    /** The locked row, for the token endpoint: only while the transaction runs. */
    lockedRow() {
      return this.#txn && !this.#txn.ended ? this.#locked : undefined;
    }

    /** The backend transaction (for the token endpoint's refresh-start record). */
    backend() {
      return this.#txn;
    }

    // Dropped without commit: rolled back, the lock released.
    [Symbol.dispose]() {
      const txn = this.#txn;
      this.#txn = undefined;
      this.#locked = undefined;
      if (txn) {
        if (ctx.liveTxn === txn) {
          ctx.liveTxn = undefined;
          ctx.live = undefined;
        }
        txn.rollback();
      }
    }
  }

  const storage = {
    Transaction,

    read(provider, userId) {
      ctx.checkRow(provider, userId);
      let row;
      try {
        row = store.read(provider, userId);
      } catch (e) {
        throw storageVariant(e);
      }
      if (row) ctx.sawRow(row);
      return { row, now: nowSeconds() };
    },

    listRows(after, limit) {
      ctx.checkNotRefused();
      const scope = ctx.scope;
      try {
        if (scope.kind === 'listing') {
          const samePage =
            (after === undefined && scope.after === undefined) ||
            (after !== undefined && scope.after !== undefined && sameKey(after, scope.after));
          if (!samePage || limit > scope.limit) throw ctx.refuse('a scan beyond the page asked for');
          return store.list(after, limit);
        }
        if (scope.kind === 'summary') {
          if (after !== undefined || limit < 1) throw ctx.refuse('a scan beyond the page asked for');
          const row = store.read(scope.key.provider, scope.key.userId);
          return row ? [row] : [];
        }
        throw ctx.refuse('a scan outside a listing');
      } catch (e) {
        throw storageVariant(e);
      }
    },

    upsert(row) {
      ctx.checkWrite(row.provider, row.userId);
      ctx.checkNewAuthorisation(row);
      try {
        return store.upsert(row, nowSeconds());
      } catch (e) {
        throw storageVariant(e);
      }
    },

    insert(row) {
      ctx.checkWrite(row.provider, row.userId);
      ctx.checkNewAuthorisation(row);
      try {
        return store.insert(row, nowSeconds());
      } catch (e) {
        throw storageVariant(e);
      }
    },

    delete(provider, userId) {
      ctx.checkWrite(provider, userId);
      try {
        return store.delete(provider, userId);
      } catch (e) {
        throw storageVariant(e);
      }
    },

    conversationEntries(conversationId) {
      ctx.checkNotRefused();
      if (!ctx.allowsConversation(conversationId)) throw ctx.refuse('another conversation');
      try {
        return store.conversationEntries(conversationId);
      } catch (e) {
        throw storageVariant(e);
      }
    },

    putConversationEntry(entry) {
      ctx.checkNotRefused();
      if (!ctx.allowsConversation(entry.conversationId)) throw ctx.refuse('another conversation');
      ctx.checkRow(entry.provider, entry.userId);
      try {
        store.putConversationEntry(entry);
      } catch (e) {
        throw storageVariant(e);
      }
    },

    begin() {
      ctx.checkNotRefused();
      if (ctx.scope.kind !== 'rows') throw ctx.refuse('a transaction in a call about no row');
      if (ctx.live !== undefined) throw ctx.refuse('a second transaction in one call');
      let txn;
      try {
        txn = store.begin();
      } catch (e) {
        throw storageVariant(e);
      }
      ctx.live = { key: undefined };
      ctx.liveTxn = txn;
      return new Transaction(txn);
    },
  };

  const sealingError = (e) => {
    if (e instanceof SealingError) return { tag: e.tag, val: e.message };
    throw e;
  };

  const sealing = {
    sealTokens(provider, userId, accessToken, refreshToken) {
      ctx.checkRow(provider, userId);
      if (refreshToken !== undefined) ctx.keep(refreshToken);
      if (ctx.isKept(accessToken)) throw ctx.refuse('a refresh token sealed as an access token');
      let sealed;
      try {
        sealed = sealTokens(keyring, provider, userId, accessToken, refreshToken);
      } catch (e) {
        throw sealingError(e);
      }
      ctx.vouch(provider, userId, accessToken);
      return sealed;
    },

    open(provider, userId, field, keyId, ciphertext) {
      ctx.checkRow(provider, userId);
      let plain;
      try {
        plain = openSealed(keyring, provider, userId, field, keyId, ciphertext);
      } catch (e) {
        throw sealingError(e);
      }
      if (field === 'access-token') ctx.vouch(provider, userId, plain);
      else ctx.keep(plain);
      return plain;
    },
  };

  const providers = {
    lookup(name) {
      const p = config.providers.get(name);
      return p ? providerContract(p) : undefined;
    },
  };

  const tokenEndpoint = {
    requestRefresh(locked) {
      try {
        return refresh(locked);
      } catch (e) {
        // request-error has no `refused`: a refusal is `denied` there.
        if (e instanceof Refused && e.tag === 'refused') throw new Refused('denied', e.val);
        throw e;
      }
    },
  };

  function refresh(locked) {
    ctx.checkNotRefused('denied');
    const row = locked instanceof Transaction ? locked.lockedRow() : undefined;
    if (!row) throw ctx.refuse('a refresh without a locked row', 'denied');
    const key = { provider: row.provider, userId: row.userId };
    const provider = config.providers.get(row.provider);
    if (!provider) {
      throw { tag: 'denied', val: "the locked row's provider is not configured" };
    }
    if (provider.clientSecretMissing !== undefined) {
      throw {
        tag: 'misconfigured',
        val: `environment variable ${provider.clientSecretMissing} (client_secret_env) is not set`,
      };
    }
    if (provider.tokenUrl === '') {
      // Registered by another process since this one opened.
      const registration = store.registration(provider.name);
      if (registration) applyRegistration(provider, registration);
    }
    if (provider.tokenUrl === '') {
      throw {
        tag: 'misconfigured',
        val: "the MCP server's authorisation server is not discovered yet: run tokenkeep connect",
      };
    }
    if (provider.unsupported !== undefined) {
      throw { tag: 'misconfigured', val: provider.unsupported };
    }
    // The provider's retry rules, held by the host.
    let entry = ctx.requests.find((r) => sameKey(r.key, key));
    if (!entry) {
      entry = { key, sent: 0, closed: false };
      ctx.requests.push(entry);
    }
    if (entry.closed || entry.sent >= provider.maxAttempts) {
      throw ctx.refuse("a token request beyond the provider's retry rules", 'denied');
    }
    if (row.refreshToken === undefined) {
      throw { tag: 'denied', val: 'the locked row holds no refresh token' };
    }
    let refreshToken;
    try {
      refreshToken = openSealed(keyring, row.provider, row.userId, 'refresh-token', row.keyId, row.refreshToken);
    } catch {
      throw { tag: 'denied', val: "the locked row's refresh token does not open" };
    }
    ctx.keep(refreshToken);
    const outcome = requestRefresh(provider, row, locked.backend(), refreshToken, nowSeconds());
    if (outcome.answer) {
      const { status, contentType, body } = outcome.answer;
      const granted = salvageRefreshToken(status, contentType, body);
      if (granted !== undefined) ctx.keep(granted);
    }
    const repeatable = mayRepeat(outcome, provider);
    entry.sent += 1;
    entry.closed = !repeatable;
    if (outcome.error) throw outcome.error;
    return outcome.answer;
  }

  const clock = { now: nowSeconds };

  return {
    'tokenkeep:oauth/clock': clock,
    'tokenkeep:oauth/storage': storage,
    'tokenkeep:oauth/sealing': sealing,
    'tokenkeep:oauth/providers': providers,
    'tokenkeep:oauth/token-endpoint': tokenEndpoint,
    'tokenkeep:oauth/types': {},
  };
}
