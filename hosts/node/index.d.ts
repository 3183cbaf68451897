// Types of tokenkeep-node: the tokenkeep component hosted in Node.js over
// SQLite. Every method is synchronous: a call that waits for a row lock or
// a provider blocks the calling thread (as better-sqlite3's calls do).
// Times are seconds since the Unix epoch; null where there is none.

/** The WIT `error-class` names, plus the host's own `sandbox`. */
export type ErrorClass =
  | 'not-found'
  | 'reauthorization-required'
  | 'provider-unavailable'
  | 'provider-rejected-client'
  | 'scope-mismatch'
  | 'lock-timeout'
  | 'storage'
  | 'decryption'
  | 'invalid-provider-response'
  | 'unknown-provider'
  | 'invalid-input'
  | 'egress-denied'
  | 'configuration'
  | 'sandbox';

/** Exit code of each class, as both command lines use them. */
export declare const EXIT_CODES: Readonly<Record<ErrorClass, number>>;
/** The WIT `error-class` enum, in its order. */
export declare const ERROR_CLASSES: ReadonlyArray<Exclude<ErrorClass, 'sandbox'>>;

/** Every failure of the keeper. Messages never carry a token, a secret or a key. */
export declare class TokenkeepError extends Error {
  readonly name: 'TokenkeepError';
  /** The class: the WIT `error-class` case, or `sandbox`. */
  readonly class: ErrorClass;
  /** The exit code the command lines use for the class. */
  readonly exitCode: number;
  /** The message without its class's words. */
  readonly detail: string;
  /** `not-found`: the row asked about. */
  readonly provider?: string;
  readonly userId?: string;
  /** `scope-mismatch`: the scopes the provider dropped. */
  readonly missingScopes?: string[];
  /** Conversation calls: the provider the failure is about ('' for the whole call). */
  readonly conversationProvider?: string;
  constructor(cls: ErrorClass, detail?: string, extra?: Record<string, unknown>);
}

export type TokenState =
  | 'fresh'
  | 'refresh-due'
  | 'refresh-token-expiring'
  | 'reauthorization-required'
  | 'scope-narrowed';

/** What a runtime needs to call a provider's API: the access token, nothing else secret. */
export interface AccessGrant {
  provider: string;
  userId: string;
  accessToken: string;
  /** null: the access token does not expire. */
  expiresAt: number | null;
  scopes: string[];
  obtainedAt: number;
  /** The row generation the token comes from. */
  generation: number;
}

/** A stored token without its secrets, with its state (`tokens list --json`). */
export interface TokenSummary {
  provider: string;
  userId: string;
  state: TokenState;
  accessTokenExpiresAt: number | null;
  refreshTokenExpiresAt: number | null;
  hasRefreshToken: boolean;
  scopes: string[];
  baselineScopes: string[];
  obtainedAt: number;
  generation: number;
  keyId: string;
  failedAttempts: number;
  lastFailure: Exclude<ErrorClass, 'sandbox'> | null;
  lastFailureAt: number | null;
  lastSuccessAt: number | null;
  retryNotBefore: number | null;
}

/** What `storeTokens` stored, without secrets. */
export interface StoredTokens {
  provider: string;
  userId: string;
  generation: number;
  obtainedAt: number;
  accessTokenExpiresAt: number | null;
  refreshTokenExpiresAt: number | null;
  hasRefreshToken: boolean;
  scopes: string[];
}

/** A provider's token response, RFC 6749 section 5.1. */
export interface TokenResponse {
  access_token: string;
  refresh_token?: string | null;
  expires_in?: number | string | null;
  refresh_token_expires_in?: number | string | null;
  scope?: string | string[] | null;
  [field: string]: unknown;
}

/** One provider's token in a conversation's settings (the seed's shape). */
export interface ProviderTokenJson {
  token: string;
  refresh_token?: string | null;
  expires_at?: number | null;
  refresh_token_expires_at?: number | null;
  obtained_at?: number | null;
  scopes?: string[];
}

export interface ConversationSettingsJson {
  provider_tokens: Record<string, ProviderTokenJson>;
}

export interface ConversationEntry {
  conversationId: string;
  provider: string;
  userId: string;
  scopes: string[];
  generation: number;
  updatedAt: number;
}

/** A stored token with its secrets, for the validity calls. */
export interface TokenRecord {
  provider: string;
  userId: string;
  tokens: {
    accessToken: string;
    refreshToken?: string;
    accessTokenExpiresAt?: number;
    refreshTokenExpiresAt?: number;
    scopes: string[];
  };
  obtainedAt: number;
  generation: number;
  health?: {
    failedAttempts?: number;
    lastFailureAt?: number;
    lastFailure?: Exclude<ErrorClass, 'sandbox'>;
    lastSuccessAt?: number;
    refreshStartedAt?: number;
    retryNotBefore?: number;
  };
}

export interface RowKey {
  provider: string;
  userId: string;
}

export interface OpenOptions {
  /** A path, or `sqlite:PATH`. */
  database: string;
  /** The tokenkeep TOML configuration file; none: no providers. */
  config?: string;
  /**
   * The key file (`id=base64` lines, the first active), as the CLI's
   * `--keys`. None: TOKENKEEP_KEYS, TOKENKEEP_KEYS_FILE, or `<database>.key`
   * beside the database, created (mode 0600) on first use.
   */
  keys?: string;
  /** The caller recorded in the audit log (`node`); null: no audit entries. */
  auditAs?: string | null;
  /** Where `client_secret_env` and TOKENKEEP_KEYS* are read (process.env). */
  env?: Record<string, string | undefined>;
  /** Told the path of a key file created on first use. */
  onKeyCreated?: (path: string) => void;
  /** Seconds since the epoch for every clock of the keeper (tests); the machine's by default. */
  clock?: () => number;
}

export declare class Keeper {
  private constructor();
  /** The shared clock (this machine's, for an SQLite file), seconds since the epoch. */
  now(): number;
  /** The schema version the database is at. */
  readonly schemaVersion: number;
  /** The hot path: an access token valid beyond its refresh window, refreshed first if needed. */
  accessToken(provider: string, userId: string): string;
  /** `accessToken` with its grant, refreshed first unless valid `minRemainingSeconds` more. */
  accessGrant(provider: string, userId: string, options?: { minRemainingSeconds?: number }): AccessGrant;
  /** Stores a token response (object, JSON text or bytes), replacing older tokens (`tokens put`). */
  storeTokens(provider: string, userId: string, tokenResponse: TokenResponse | string | Uint8Array): StoredTokens;
  /** Stores a token set (expiries in seconds since the epoch), replacing older tokens. */
  storeTokenSet(
    provider: string,
    userId: string,
    tokens: {
      accessToken: string;
      refreshToken?: string | null;
      accessTokenExpiresAt?: number | null;
      refreshTokenExpiresAt?: number | null;
      scopes?: string[];
    },
  ): StoredTokens;
  /** Validity and classification of a record by the component, on the keeper's clock. */
  isAccessTokenValid(record: TokenRecord, clockSkewSeconds?: number): boolean;
  isRefreshTokenValid(record: TokenRecord): boolean;
  classify(record: TokenRecord, refreshThresholdSeconds: number): TokenState;
  /** Deletes a user's tokens; false when there were none. */
  deleteTokens(provider: string, userId: string): boolean;
  /** Every stored token, without secrets (paged through `list-tokens`). */
  listTokens(): TokenSummary[];
  /** One page: at most `limit` (1-1000) after `after`, by provider then user id. */
  listTokensPage(after?: RowKey | null, limit?: number): TokenSummary[];
  /** One stored token's summary; null when there is none. */
  tokenSummary(provider: string, userId: string): TokenSummary | null;
  /** A refreshed copy of a conversation's settings, access tokens only. */
  refreshProviderTokens(
    settings: ConversationSettingsJson | string,
    conversationId: string,
    userId: string,
  ): ConversationSettingsJson;
  refreshProviderTokens(
    settings: ConversationSettingsJson | string,
    conversationId: string,
    userId: string,
    options: { partial: true },
  ): { settings: ConversationSettingsJson; failures: TokenkeepError[] };
  /** The conversation's persisted settings, refreshed first; null for one never seen. */
  resume(conversationId: string): ConversationSettingsJson | null;
  /** What is persisted for a conversation, without secrets. */
  conversationEntries(conversationId: string): ConversationEntry[];
  /** Closes the database connections. */
  close(): void;
}

/** Opens a keeper over an SQLite file shared with the Rust host. */
export declare function openKeeper(options: OpenOptions): Keeper;
export default openKeeper;

/** `<database>` with its extension replaced by `.key`, as the Rust CLI names it. */
export declare function defaultKeyPath(path: string): string;

/** The keyring an `openKeeper` call would use (see OpenOptions.keys). */
export declare function resolveKeyring(options: {
  keys?: string;
  database: string;
  env?: Record<string, string | undefined>;
  onCreate?: (path: string) => void;
}): unknown;
