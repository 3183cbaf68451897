// The keeper: what runtimes call, as host/src/keeper.rs has it. Every call
// runs in a fresh component instance confined to the rows it is about; what
// the component returns is checked against what the call opened or sealed;
// its errors are typed, tidied, and never quote a refresh token the call saw.
// Calls are synchronous (the imports are): a call that waits for a row lock
// or a provider blocks the calling thread, as better-sqlite3's calls do.

import { PREFIX, TokenkeepError, sandbox, invalidInput } from './errors.js';
import { Scope } from './linker.js';
import { ProtocolError, parseTokenResponse } from './protocol.js';
import { call } from './sandbox.js';
import { storageToHost } from './storage.js';

/** Rows per component call when listing: the component's largest page. */
const LIST_PAGE = 1000;
/** Longest message of the component's that the host passes on. */
const MAX_GUEST_MESSAGE = 200;
/** How often audit entries past the retention are pruned. */
const PRUNE_EVERY_MS = 3600_000;

const num = (v) => (v === undefined || v === null ? null : Number(v));

/** The component's words: one line of printable ASCII, bounded. */
function tidy(m) {
  let out = '';
  for (const c of String(m)) {
    const code = c.codePointAt(0);
    out += code >= 0x20 && code <= 0x7e ? c : '?';
  }
  return out.length > MAX_GUEST_MESSAGE ? `${out.slice(0, MAX_GUEST_MESSAGE)}...` : out;
}

/** The component returned a token this call never opened or sealed for the row. */
const notTheRows = () =>
  sandbox("the component returned a token that is not the requested row's");

/** The host's error for the component's `refresh-error`. */
function refreshError(ctx, e, provider, userId) {
  const strings = Array.isArray(e.val) ? e.val : e.val === undefined ? [] : [e.val];
  if (ctx.leaks(JSON.stringify(e)) || strings.some((s) => ctx.leaks(String(s)))) {
    return sandbox("the component's error quoted a refresh token");
  }
  switch (e.tag) {
    case 'not-found':
      return new TokenkeepError('not-found', '', { provider, userId });
    case 'lock-timeout':
      return new TokenkeepError('lock-timeout');
    case 'scope-mismatch': {
      if (!ctx.sawEachScope(provider === '' ? undefined : provider, e.val)) {
        return sandbox('the component named scopes the row never had');
      }
      return new TokenkeepError('scope-mismatch', '', { missingScopes: e.val.slice(0, 64).map(tidy) });
    }
    default:
      if (e.tag === 'sandbox' || !(e.tag in PREFIX)) return sandbox('the component returned an unknown error');
      return new TokenkeepError(e.tag, tidy(e.val));
  }
}

function summaryOut(s) {
  return {
    provider: s.provider,
    userId: s.userId,
    state: s.state,
    accessTokenExpiresAt: num(s.accessTokenExpiresAt),
    refreshTokenExpiresAt: num(s.refreshTokenExpiresAt),
    hasRefreshToken: s.hasRefreshToken,
    scopes: [...s.scopes],
    baselineScopes: [...s.baselineScopes],
    obtainedAt: num(s.obtainedAt),
    generation: num(s.generation),
    keyId: s.keyId,
    failedAttempts: s.health.failedAttempts,
    lastFailure: s.health.lastFailure ?? null,
    lastFailureAt: num(s.health.lastFailureAt),
    lastSuccessAt: num(s.health.lastSuccessAt),
    retryNotBefore: num(s.health.retryNotBefore),
  };
}

function u32(v, what) {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0 || n > 4294967295) {
    throw invalidInput(`${what} must be an integer from 0 to 4294967295`);
  }
  return n;
}

const opt = (v) => (v === undefined || v === null ? undefined : BigInt(v));

/** A token record (numbers, camelCase) as the WIT `token-record`. */
function recordToWit(r) {
  const t = r?.tokens ?? {};
  const h = r?.health ?? {};
  if (typeof t.accessToken !== 'string') throw invalidInput('record.tokens.accessToken must be a string');
  return {
    provider: String(r.provider ?? ''),
    userId: String(r.userId ?? ''),
    tokens: {
      accessToken: t.accessToken,
      refreshToken: t.refreshToken ?? undefined,
      accessTokenExpiresAt: opt(t.accessTokenExpiresAt),
      refreshTokenExpiresAt: opt(t.refreshTokenExpiresAt),
      scopes: [...(t.scopes ?? [])],
    },
    obtainedAt: BigInt(r.obtainedAt ?? 0),
    generation: BigInt(r.generation ?? 0),
    health: {
      failedAttempts: h.failedAttempts ?? 0,
      lastFailureAt: opt(h.lastFailureAt),
      lastFailure: h.lastFailure ?? undefined,
      lastSuccessAt: opt(h.lastSuccessAt),
      refreshStartedAt: opt(h.refreshStartedAt),
      retryNotBefore: opt(h.retryNotBefore),
    },
  };
}

function checkName(name, what) {
  if (typeof name !== 'string') throw invalidInput(`${what} must be a string`);
}

/**
 * A provider's token response (RFC 6749 section 5.1 JSON) as a WIT
 * token-set, lifetimes counted from `now` (host/src/token_response.rs).
 */
export function tokenSet(response, now) {
  let body;
  if (typeof response === 'string') body = Buffer.from(response, 'utf8');
  else if (response instanceof Uint8Array) body = Buffer.from(response);
  else if (response !== null && typeof response === 'object') {
    body = Buffer.from(JSON.stringify(response), 'utf8');
  } else {
    throw invalidInput('token response: not a JSON object');
  }
  let r;
  try {
    r = parseTokenResponse(200, 'application/json', body, []);
  } catch (e) {
    if (!(e instanceof ProtocolError)) throw e;
    throw invalidInput(`token response: ${PREFIX[e.cls] ?? ''}${e.message}`);
  }
  return {
    accessToken: r.accessToken,
    refreshToken: r.refreshToken,
    accessTokenExpiresAt: r.expiresIn === undefined ? undefined : BigInt(now + r.expiresIn),
    refreshTokenExpiresAt:
      r.refreshTokenExpiresIn === undefined ? undefined : BigInt(now + r.refreshTokenExpiresIn),
    scopes: r.scopes ?? [],
  };
}

/** The token keeper of one process over one SQLite file. */
export class Keeper {
  #host;
  #auditAs;
  #prunedAt;
  #closed = false;

  /** Use `openKeeper`. */
  constructor({ store, keyring, config, auditAs, clock }) {
    const now = clock ?? (() => Math.floor(Date.now() / 1000));
    this.#host = { store, keyring, config, now: () => Math.floor(Number(now())) };
    this.#auditAs = auditAs ?? undefined;
  }

  /** The shared time (the owning machine's clock), seconds since the epoch. */
  now() {
    return this.#host.now();
  }

  /** The schema version the database is at. */
  get schemaVersion() {
    return this.#host.store.schemaVersion;
  }

  #call(scope, work) {
    if (this.#closed) throw new TokenkeepError('storage', 'the keeper is closed');
    return call(this.#host, scope, work);
  }

  #audit(action, provider, userId, got, generation) {
    if (!this.#auditAs) return;
    const { store, config } = this.#host;
    const at = this.now();
    try {
      store.appendAudit([
        {
          at,
          caller: this.#auditAs,
          action,
          provider,
          userId,
          generation: got.error ? undefined : generation,
          outcome: got.error ? (got.error.class ?? 'sandbox') : 'ok',
        },
      ]);
      const days = config.auditRetentionDays;
      if (days !== undefined && (this.#prunedAt === undefined || Date.now() - this.#prunedAt >= PRUNE_EVERY_MS)) {
        this.#prunedAt = Date.now();
        store.pruneAudit(at - days * 86400);
      }
    } catch {
      // The audit log never fails a call (the Rust host holds and retries).
    }
  }

  /** Runs `work`, records its outcome, and returns or throws it. */
  #audited(action, provider, userId, work, generationOf) {
    let value;
    try {
      value = work();
    } catch (error) {
      this.#audit(action, provider, userId, { error }, undefined);
      throw error;
    }
    this.#audit(action, provider, userId, {}, generationOf(value));
    return value;
  }

  /** An access token valid beyond its refresh window, refreshed first if needed. */
  accessToken(provider, userId) {
    return this.accessGrant(provider, userId).accessToken;
  }

  /**
   * The access grant (the token, its expiry, scopes, generation), refreshed
   * first unless it stays valid `minRemainingSeconds` more.
   */
  accessGrant(provider, userId, { minRemainingSeconds = 0 } = {}) {
    checkName(provider, 'provider');
    checkName(userId, 'user id');
    const min = Number(minRemainingSeconds);
    if (!Number.isInteger(min) || min < 0 || min > 4294967295) {
      throw invalidInput('minRemainingSeconds must be an integer from 0 to 4294967295');
    }
    return this.#audited(
      'read',
      provider,
      userId,
      () => {
        const outcome = this.#call(Scope.row(provider, userId), (k) =>
          k.tokenStore.ensureFreshFor(provider, userId, min),
        );
        const { ctx } = outcome;
        const got = () => {
          if (outcome.err) throw refreshError(ctx, outcome.err, provider, userId);
          const g = outcome.ok;
          if (
            g.provider !== provider ||
            g.userId !== userId ||
            !ctx.vouchesFor(provider, userId, g.accessToken) ||
            !ctx.sawScopes(provider, userId, g.scopes)
          ) {
            throw notTheRows();
          }
          return {
            provider: g.provider,
            userId: g.userId,
            accessToken: g.accessToken,
            expiresAt: num(g.expiresAt),
            scopes: [...g.scopes],
            obtainedAt: num(g.obtainedAt),
            generation: num(g.generation),
          };
        };
        if (ctx.refreshed().length > 0) {
          return this.#audited('refresh', provider, userId, got, (g) => g.generation);
        }
        return got();
      },
      (g) => g.generation,
    );
  }

  /**
   * Stores a provider's token response (RFC 6749 section 5.1 JSON: an
   * object, its text or its bytes) for a user, replacing older tokens, as
   * `tokenkeep tokens put` does. Returns the stored row without secrets.
   */
  storeTokens(provider, userId, tokenResponse) {
    checkName(provider, 'provider');
    checkName(userId, 'user id');
    return this.#audited(
      'store',
      provider,
      userId,
      () => this.#store(provider, userId, tokenSet(tokenResponse, this.now())),
      (r) => r.generation,
    );
  }

  /**
   * Stores a token set as the WIT `token-set` has it ({accessToken,
   * refreshToken?, accessTokenExpiresAt?, refreshTokenExpiresAt?, scopes}),
   * expiries in seconds since the epoch.
   */
  storeTokenSet(provider, userId, tokens) {
    checkName(provider, 'provider');
    checkName(userId, 'user id');
    if (typeof tokens?.accessToken !== 'string') throw invalidInput('tokens.accessToken must be a string');
    const opt = (v) => (v === undefined || v === null ? undefined : BigInt(v));
    const input = {
      accessToken: tokens.accessToken,
      refreshToken: tokens.refreshToken ?? undefined,
      accessTokenExpiresAt: opt(tokens.accessTokenExpiresAt),
      refreshTokenExpiresAt: opt(tokens.refreshTokenExpiresAt),
      scopes: [...(tokens.scopes ?? [])].map(String),
    };
    return this.#audited('store', provider, userId, () => this.#store(provider, userId, input), (r) => r.generation);
  }

  #store(provider, userId, input) {
    const { ok: record, err, ctx } = this.#call(Scope.writableRow(provider, userId), (k) =>
      k.tokenStore.storeTokens(provider, userId, input),
    );
    if (err) throw refreshError(ctx, err, provider, userId);
    const got = record.tokens;
    const same =
      got.accessToken === input.accessToken &&
      got.refreshToken === input.refreshToken &&
      got.accessTokenExpiresAt === input.accessTokenExpiresAt &&
      got.refreshTokenExpiresAt === input.refreshTokenExpiresAt &&
      got.scopes.length === input.scopes.length &&
      got.scopes.every((s, i) => s === input.scopes[i]);
    if (
      !same ||
      record.provider !== provider ||
      record.userId !== userId ||
      !ctx.vouchesFor(provider, userId, got.accessToken)
    ) {
      throw notTheRows();
    }
    return {
      provider,
      userId,
      generation: num(record.generation),
      obtainedAt: num(record.obtainedAt),
      accessTokenExpiresAt: num(got.accessTokenExpiresAt),
      refreshTokenExpiresAt: num(got.refreshTokenExpiresAt),
      hasRefreshToken: got.refreshToken !== undefined,
      scopes: [...got.scopes],
    };
  }

  /** Deletes a user's tokens; false when there were none. */
  deleteTokens(provider, userId) {
    checkName(provider, 'provider');
    checkName(userId, 'user id');
    let deleted;
    try {
      const { ok, err, ctx } = this.#call(Scope.writableRow(provider, userId), (k) =>
        k.tokenStore.deleteTokens(provider, userId),
      );
      if (err) throw refreshError(ctx, err, provider, userId);
      deleted = ok;
    } catch (error) {
      this.#audit('delete', provider, userId, { error }, undefined);
      throw error;
    }
    const outcome = deleted ? {} : { error: new TokenkeepError('not-found', '', { provider, userId }) };
    this.#audit('delete', provider, userId, outcome, undefined);
    return deleted;
  }

  /**
   * One page of stored tokens without secrets: at most `limit` (1-1000)
   * after `after` ({provider, userId}), ordered by provider then user id.
   */
  listTokensPage(after, limit = LIST_PAGE) {
    const n = Math.min(LIST_PAGE, Math.max(1, Math.floor(Number(limit) || 1)));
    const cursor = after ? { provider: String(after.provider), userId: String(after.userId) } : undefined;
    const { ok: page, err, ctx } = this.#call(Scope.listing(cursor, n), (k) =>
      k.tokenStore.listTokens(cursor, n),
    );
    if (err) throw refreshError(ctx, err, '', '');
    const seen = new Set();
    const unique = page.every((s) => {
      const key = JSON.stringify([s.provider, s.userId]);
      const isCursor = cursor && s.provider === cursor.provider && s.userId === cursor.userId;
      if (isCursor || seen.has(key)) return false;
      seen.add(key);
      return true;
    });
    if (page.length > n || !unique) throw notTheRows();
    return page.map(summaryOut);
  }

  /** Every stored token, without secrets, page by page. */
  listTokens() {
    const all = [];
    for (;;) {
      const last = all[all.length - 1];
      const page = this.listTokensPage(last && { provider: last.provider, userId: last.userId }, LIST_PAGE);
      all.push(...page);
      if (page.length < LIST_PAGE) return all;
    }
  }

  /** One stored token's summary, without secrets; null when there is none. */
  tokenSummary(provider, userId) {
    checkName(provider, 'provider');
    checkName(userId, 'user id');
    const key = { provider, userId };
    const { ok: page, err, ctx } = this.#call(Scope.summary(key), (k) =>
      k.tokenStore.listTokens(undefined, 1),
    );
    if (err) throw refreshError(ctx, err, provider, userId);
    if (page.length === 0) return null;
    const s = page[0];
    if (page.length !== 1 || s.provider !== provider || s.userId !== userId) throw notTheRows();
    return summaryOut(s);
  }

  /**
   * A refreshed copy of a conversation's settings (the seed's
   * `refresh_provider_tokens`), access tokens only: `settings` is
   * `{provider_tokens: {NAME: {token, refresh_token?, expires_at?,
   * refresh_token_expires_at?, obtained_at?, scopes?}}}`. With `partial`,
   * returns `{settings, failures}` instead of failing on the first provider.
   */
  refreshProviderTokens(settings, conversationId, userId, { partial = false } = {}) {
    checkName(conversationId, 'conversation id');
    checkName(userId, 'user id');
    const input = settingsToWit(settings);
    const scope = Scope.rows(
      input.providerTokens.map((t) => ({ provider: t.provider, userId })),
      conversationId,
      true,
    );
    if (partial) {
      const { ok, ctx } = this.#call(scope, (k) =>
        k.conversations.refreshProviderTokensPartial(input, conversationId, userId),
      );
      return {
        settings: checkedSettings(ok.settings, ctx, input),
        failures: ok.failures.map((f) => failure(ctx, f, userId)),
      };
    }
    const { ok, err, ctx } = this.#call(scope, (k) =>
      k.conversations.refreshProviderTokens(input, conversationId, userId),
    );
    if (err) throw failure(ctx, err, userId);
    return checkedSettings(ok, ctx, input);
  }

  /** The conversation's persisted settings, refreshed first; null for one never seen. */
  resume(conversationId) {
    checkName(conversationId, 'conversation id');
    let entries;
    try {
      entries = this.#host.store.conversationEntries(conversationId);
    } catch (e) {
      throw storageToHost(e);
    }
    const scope = Scope.rows(
      entries.map((e) => ({ provider: e.provider, userId: e.userId })),
      conversationId,
      false,
    );
    const { ok, err, ctx } = this.#call(scope, (k) => k.conversations.resume(conversationId));
    if (err) throw failure(ctx, err, '');
    return ok === undefined ? null : checkedSettings(ok, ctx, { providerTokens: [] });
  }

  /** What is persisted for a conversation, without secrets. */
  conversationEntries(conversationId) {
    checkName(conversationId, 'conversation id');
    const { ok, err, ctx } = this.#call(Scope.rows([], conversationId, false), (k) =>
      k.conversations.entries(conversationId),
    );
    if (err) throw refreshError(ctx, err, '', '');
    return ok.map((e) => ({
      conversationId: e.conversationId,
      provider: e.provider,
      userId: e.userId,
      scopes: [...e.scopes],
      generation: num(e.generation),
      updatedAt: num(e.updatedAt),
    }));
  }

  /** The seed's `is_access_token_valid`, by the component on the shared clock. */
  isAccessTokenValid(record, clockSkewSeconds = 60) {
    return this.#call(Scope.nothing(), (k) =>
      k.tokenStore.isAccessTokenValid(recordToWit(record), u32(clockSkewSeconds, 'clockSkewSeconds')),
    ).ok;
  }

  /** The seed's `is_refresh_token_valid`, by the component on the shared clock. */
  isRefreshTokenValid(record) {
    return this.#call(Scope.nothing(), (k) => k.tokenStore.isRefreshTokenValid(recordToWit(record))).ok;
  }

  /** Where `record` stands now, given its provider's refresh threshold (WIT `classify`). */
  classify(record, refreshThresholdSeconds) {
    return this.#call(Scope.nothing(), (k) =>
      k.tokenStore.classify(recordToWit(record), u32(refreshThresholdSeconds, 'refreshThresholdSeconds')),
    ).ok;
  }

  /** Closes the database connections. */
  close() {
    if (this.#closed) return;
    this.#closed = true;
    this.#host.store.close();
  }
}

/** The seed's settings JSON as the WIT `conversation-settings`. */
function settingsToWit(settings) {
  const bad = (what) => invalidInput(`settings: ${what}`);
  let value = settings;
  if (typeof settings === 'string') {
    try {
      value = JSON.parse(settings);
    } catch {
      throw bad('not JSON');
    }
  }
  const tokens = value?.provider_tokens;
  if (tokens === null || typeof tokens !== 'object' || Array.isArray(tokens)) {
    throw bad('no provider_tokens object');
  }
  const providerTokens = [];
  for (const [provider, t] of Object.entries(tokens)) {
    const field = (name) => (t?.[name] === null ? undefined : t?.[name]);
    const secret = (name) => {
      const v = field(name);
      if (v !== undefined && typeof v !== 'string') throw bad(`${provider}.${name} is not a string`);
      return v;
    };
    const time = (name) => {
      const v = field(name);
      if (v === undefined) return undefined;
      if (!Number.isSafeInteger(v)) throw bad(`${provider}.${name} is not an integer`);
      return BigInt(v);
    };
    const scopes = field('scopes') ?? [];
    if (!Array.isArray(scopes)) throw bad(`${provider}.scopes is not a list`);
    if (!scopes.every((s) => typeof s === 'string')) throw bad(`${provider}.scopes holds a non-string`);
    const accessToken = secret('token');
    if (accessToken === undefined) throw bad(`${provider}.token is missing`);
    providerTokens.push({
      provider,
      accessToken,
      refreshToken: secret('refresh_token'),
      expiresAt: time('expires_at'),
      refreshTokenExpiresAt: time('refresh_token_expires_at'),
      obtainedAt: time('obtained_at'),
      scopes: [...scopes],
    });
  }
  return { providerTokens };
}

/** Settings the component returned, checked, in the seed's JSON shape. */
function checkedSettings(out, ctx, input) {
  const tokens = {};
  for (const t of out.providerTokens) {
    const handedIn = input.providerTokens.some(
      (i) => i.provider === t.provider && i.accessToken === t.accessToken,
    );
    if (
      t.refreshToken !== undefined ||
      !(handedIn || ctx.vouchesFor(t.provider, undefined, t.accessToken)) ||
      t.scopes.some((s) => ctx.leaks(s))
    ) {
      throw notTheRows();
    }
    tokens[t.provider] = {
      token: t.accessToken,
      refresh_token: null,
      expires_at: num(t.expiresAt),
      refresh_token_expires_at: num(t.refreshTokenExpiresAt),
      obtained_at: num(t.obtainedAt),
      scopes: [...t.scopes],
    };
  }
  return { provider_tokens: tokens };
}

/** A conversation failure naming its provider (`.conversationProvider`). */
function failure(ctx, f, userId) {
  if (f.provider !== '' && !ctx.isAbout(f.provider)) {
    return sandbox('the component named a provider the call is not about');
  }
  const e = refreshError(ctx, f.error, f.provider, userId);
  e.conversationProvider = f.provider;
  if (f.provider !== '') e.message = `provider ${f.provider}: ${e.message}`;
  return e;
}
