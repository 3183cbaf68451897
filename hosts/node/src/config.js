// The tokenkeep TOML configuration, read as host/src/config.rs reads it
// (`Config::parse`, `Provider::resolve`), with the built-in catalogue as the
// data host/schema/catalogue.json holds (generated from core's catalogue,
// copied into dist/ by the build). Client secrets stay here: the component's
// `provider-config` has none.

import { readFileSync } from 'node:fs';
import { parse as parseToml, TomlDate, TomlError } from 'smol-toml';
import { configuration } from './errors.js';
import { isPlainName } from './keyring.js';
import { SCHEMA_DIR } from './paths.js';

export const DEFAULT_REFRESH_THRESHOLD_SECONDS = 600;
export const DEFAULT_TIMEOUT_MS = 15_000;
export const DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024;
export const DEFAULT_LOCK_WAIT_MS = 45_000;
export const DEFAULT_MAX_ATTEMPTS = 3;
export const DEFAULT_AUDIT_RETENTION_DAYS = 90;
export const CUSTOM = 'custom';

let catalogue;

/** The built-in catalogue (host/schema/catalogue.json). */
export function loadCatalogue() {
  if (!catalogue) {
    let text;
    try {
      text = readFileSync(new URL('catalogue.json', SCHEMA_DIR), 'utf8');
    } catch {
      throw configuration(
        'the provider catalogue is missing from dist/schema: run `npm run build` in hosts/node',
      );
    }
    catalogue = JSON.parse(text);
  }
  return catalogue;
}

const spec = (kind) => loadCatalogue().find((s) => s.kind === kind);

const TOP_LEVEL = new Set(['lock_wait_ms', 'audit_retention_days', 'providers', 'serve']);

const PROVIDER_FIELDS = {
  kind: 'string',
  token_url: 'string',
  client_id: 'string',
  client_secret: 'string',
  client_secret_env: 'string',
  client_auth: 'client_auth',
  private_key_file: 'string',
  key_id: 'string',
  grant: 'grant',
  authorization_url: 'string',
  device_authorization_url: 'string',
  revocation_url: 'string',
  scopes: 'string_list',
  resource: 'string',
  mcp_url: 'string',
  issuer: 'string',
  subject_provider: 'string',
  audience: 'string',
  ca_bundle: 'string',
  extra_params: 'string_table',
  refresh_threshold_seconds: 'u32',
  timeout_ms: 'u32',
  max_response_bytes: 'u32',
  max_attempts: 'u32',
  default_expires_in: 'u32',
  default_refresh_token_expires_in: 'u32',
  refresh_token_idle_seconds: 'u32',
  rotates_refresh_tokens: 'bool',
  reuse_leeway_seconds: 'u32',
  bare_4xx_is_refusal: 'bool',
  dpop: 'bool',
  base_url: 'string',
  tenant: 'string',
  scope: 'string',
  redirect_uri: 'string',
};

// The names `client_auth` takes, RFC 7591's among them.
const CLIENT_AUTH = {
  body: 'body',
  'client-secret-post': 'body',
  basic: 'basic',
  'client-secret-basic': 'basic',
  none: 'none',
  'private-key-jwt': 'private-key-jwt',
};

// A shape error names the key, never the value (which may be a secret).
const notValid = (where) =>
  configuration(`configuration is not valid TOML for tokenkeep (${where})`);

const isTable = (v) =>
  v !== null &&
  typeof v === 'object' &&
  !Array.isArray(v) &&
  !(v instanceof Date) &&
  !(v instanceof TomlDate);

function u32(v, where) {
  if (typeof v !== 'bigint' || v < 0n || v > 4294967295n) {
    throw notValid(`${where}: expected an integer from 0 to 4294967295`);
  }
  return Number(v);
}

function checkField(kind, v, where) {
  switch (kind) {
    case 'string':
      if (typeof v !== 'string') throw notValid(`${where}: expected a string`);
      return v;
    case 'bool':
      if (typeof v !== 'boolean') throw notValid(`${where}: expected a boolean`);
      return v;
    case 'u32':
      return u32(v, where);
    case 'client_auth': {
      const auth = CLIENT_AUTH[v];
      if (typeof v !== 'string' || auth === undefined) {
        throw notValid(`${where}: expected one of ${Object.keys(CLIENT_AUTH).join(', ')}`);
      }
      return auth;
    }
    case 'grant':
      if (!['authorization-code', 'client-credentials', 'token-exchange'].includes(v)) {
        throw notValid(
          `${where}: expected "authorization-code", "client-credentials" or "token-exchange"`,
        );
      }
      return v;
    case 'string_list':
      if (!Array.isArray(v) || v.some((s) => typeof s !== 'string')) {
        throw notValid(`${where}: expected a list of strings`);
      }
      return [...v];
    case 'string_table': {
      if (!isTable(v)) throw notValid(`${where}: expected a table`);
      const out = new Map();
      for (const [k, s] of Object.entries(v)) {
        if (typeof s !== 'string') throw notValid(`${where}.${k}: expected a string`);
        out.set(k, s);
      }
      return out;
    }
    default:
      throw new Error(kind);
  }
}

/** An endpoint of the provider: absolute, and https unless on loopback. */
function checkEndpoint(what, text, bad) {
  let url;
  try {
    url = new URL(text);
  } catch {
    throw bad(`${what} is not a URL`);
  }
  if (!['https:', 'http:'].includes(url.protocol) || url.hostname === '') {
    throw bad(`${what} must be an absolute http(s) URL`);
  }
  if (url.protocol === 'http:' && !isLoopback(url)) {
    throw bad(`${what} must use https (plain http is allowed on loopback only)`);
  }
  return url;
}

/** Rust's `str` ordering (bytes of UTF-8), as a BTreeMap iterates. */
const byBytes = (a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b));

/** Reads and checks a TOML configuration file. */
export function loadConfig(path, env = process.env) {
  let text;
  try {
    text = readFileSync(path, 'utf8');
  } catch (e) {
    throw configuration(`cannot read ${path}: ${e.code ?? 'error'}`);
  }
  return parseConfig(text, env);
}

/** The configuration with no file: no providers, the default lock wait. */
export function defaultConfig() {
  return {
    providers: new Map(),
    lockWaitMs: DEFAULT_LOCK_WAIT_MS,
    auditRetentionDays: DEFAULT_AUDIT_RETENTION_DAYS,
  };
}

/** Parses and checks TOML configuration text. */
export function parseConfig(text, env = process.env) {
  let raw;
  try {
    raw = parseToml(text, { integersAsBigInt: true, unsafeKeyBehaviour: 'keep' });
  } catch (e) {
    // smol-toml's message quotes the document: say where, never what.
    const line = e instanceof TomlError && e.line ? ` at line ${e.line}` : '';
    throw configuration(`configuration is not valid TOML for tokenkeep${line}`);
  }
  for (const key of Object.keys(raw)) {
    if (!TOP_LEVEL.has(key)) throw notValid(`unknown field ${key}`);
  }
  const lockWaitMs =
    raw.lock_wait_ms === undefined ? DEFAULT_LOCK_WAIT_MS : u32(raw.lock_wait_ms, 'lock_wait_ms');
  let auditRetentionDays = DEFAULT_AUDIT_RETENTION_DAYS;
  if (raw.audit_retention_days !== undefined) {
    const days = u32(raw.audit_retention_days, 'audit_retention_days');
    auditRetentionDays = days === 0 ? undefined : days;
  }
  if (raw.serve !== undefined && !isTable(raw.serve)) throw notValid('serve: expected a table');
  const rawProviders = raw.providers ?? {};
  if (!isTable(rawProviders)) throw notValid('providers: expected a table');
  const providers = new Map();
  for (const name of Object.keys(rawProviders).sort(byBytes)) {
    const p = rawProviders[name];
    if (!isTable(p)) throw notValid(`providers.${name}: expected a table`);
    const fields = {};
    for (const [k, v] of Object.entries(p)) {
      if (!(k in PROVIDER_FIELDS)) throw notValid(`providers.${name}: unknown field ${k}`);
      fields[k] = checkField(PROVIDER_FIELDS[k], v, `providers.${name}.${k}`);
    }
    if (fields.client_id === undefined && fields.mcp_url === undefined) {
      throw notValid(`providers.${name}: missing field client_id`);
    }
    fields.extra_params ??= new Map();
    providers.set(name, resolveProvider(name, fields, env));
  }
  for (const p of providers.values()) {
    if (p.subjectProvider !== undefined) {
      const subject = providers.get(p.subjectProvider);
      if (subject === undefined) {
        throw configuration(`provider ${p.name}: subject_provider ${p.subjectProvider} is not configured`);
      }
      if (subject.grant !== 'authorization-code') {
        throw configuration(
          `provider ${p.name}: subject_provider ${p.subjectProvider} must hold users' own tokens ` +
            '(grant = "authorization-code")',
        );
      }
    }
    if (p.timeoutMs >= lockWaitMs) {
      throw configuration(
        `lock_wait_ms (${lockWaitMs}) must exceed provider ${p.name}'s timeout_ms (${p.timeoutMs}): ` +
          'waiters must outlast the runtime that refreshes',
      );
    }
  }
  // Three quarters of the lock wait: retries finish while waiters still wait.
  const retryBudgetMs = Math.floor(lockWaitMs / 4) * 3;
  for (const p of providers.values()) {
    p.retryBudgetMs = Math.max(retryBudgetMs, p.timeoutMs);
  }
  return { providers, lockWaitMs, auditRetentionDays };
}

/** A catalogued provider's URL, parameters and quirks from its settings. */
export function resolveCatalogued(kind, settings) {
  const s = spec(kind);
  if (!s) {
    const known = loadCatalogue().map((e) => e.kind);
    throw new Error(
      `unknown provider kind ${JSON.stringify(kind)}; built in: ${known.join(', ')}, or ${CUSTOM}`,
    );
  }
  const unexpected = settings.find(([name]) => !s.settings.some((t) => t.name === name));
  if (unexpected) {
    const known = s.settings.map((t) => t.name);
    throw new Error(
      `${kind} has no setting ${unexpected[0]}; it reads: ${known.length ? known.join(', ') : 'nothing'}`,
    );
  }
  let tokenUrl = s.token_url;
  const extraParams = [];
  for (const setting of s.settings) {
    const given = settings.find(([name]) => name === setting.name)?.[1];
    const value = given ?? setting.default;
    if (value === undefined || value === null) {
      throw new Error(`${kind} needs the setting ${setting.name}`);
    }
    tokenUrl = tokenUrl.replaceAll(`{${setting.name}}`, value.replace(/\/+$/, ''));
    if (setting.param && value !== '') extraParams.push([setting.param, value]);
  }
  return {
    kind,
    tokenUrl,
    clientAuth: s.client_auth,
    extraParams,
    rotatesRefreshTokens: s.rotates_refresh_tokens,
    reuseLeewaySeconds: s.reuse_leeway_seconds,
    errorCodes: s.error_codes.map(([code, cls]) => [code, cls]),
    defaultExpiresIn: s.default_expires_in ?? undefined,
    defaultRefreshTokenExpiresIn: s.default_refresh_token_expires_in ?? undefined,
    refreshTokenIdleSeconds: s.refresh_token_idle_seconds ?? undefined,
  };
}

function isLoopback(url) {
  const host = url.hostname;
  if (host === 'localhost') return true;
  if (/^\d+\.\d+\.\d+\.\d+$/.test(host)) return host.startsWith('127.');
  return host === '[::1]';
}

function readCaBundle(path) {
  let text;
  try {
    text = readFileSync(path, 'utf8');
  } catch (e) {
    throw new Error(`ca_bundle ${path}: ${e.code ?? 'cannot be read'}`);
  }
  const certs = text.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
  if (certs.length === 0) throw new Error(`ca_bundle ${path} holds no certificate`);
  return certs;
}

function resolveProvider(name, p, env) {
  const bad = (what) => configuration(`provider ${name}: ${what}`);
  if (!isPlainName(name)) throw bad('name must be 1-64 characters of [A-Za-z0-9._-]');
  if (p.max_attempts !== undefined && !(p.max_attempts >= 1 && p.max_attempts <= 10)) {
    throw bad(`max_attempts must be 1-10, not ${p.max_attempts}`);
  }
  const settings = ['base_url', 'tenant', 'scope', 'redirect_uri']
    .filter((k) => p[k] !== undefined)
    .map((k) => [k, p[k]]);
  let kind;
  if (p.kind !== undefined) kind = p.kind;
  else if (spec(name)) kind = name;
  else if (p.token_url !== undefined || p.mcp_url !== undefined) kind = CUSTOM;
  else {
    const kinds = loadCatalogue().map((s) => s.kind).join(', ');
    throw bad(`not a built-in provider: set kind (one of ${kinds}) or token_url for a custom one`);
  }
  let resolved;
  if (kind === CUSTOM) {
    if (settings.length > 0) {
      throw bad(
        `${settings[0][0]} is a setting of built-in providers; a custom one takes token_url and extra_params`,
      );
    }
    if (p.token_url !== undefined && p.mcp_url !== undefined) {
      throw bad('set mcp_url (its endpoints are discovered) or token_url');
    }
    if (p.token_url === undefined && p.mcp_url === undefined) {
      throw bad('a custom provider needs token_url');
    }
    resolved = {
      kind,
      tokenUrl: p.token_url,
      clientAuth: 'body',
      extraParams: [],
      rotatesRefreshTokens: p.rotates_refresh_tokens ?? true,
      reuseLeewaySeconds: 0,
      errorCodes: [],
      defaultExpiresIn: undefined,
      defaultRefreshTokenExpiresIn: undefined,
      refreshTokenIdleSeconds: undefined,
    };
  } else {
    if (p.rotates_refresh_tokens !== undefined) {
      throw bad(`rotates_refresh_tokens is known for ${kind}; it is a setting of custom providers`);
    }
    const s = spec(kind);
    // A setting that is a request parameter may also come as an extra parameter.
    for (const setting of s?.settings ?? []) {
      if (
        setting.param &&
        !settings.some(([k]) => k === setting.name) &&
        p.extra_params.has(setting.param)
      ) {
        settings.push([setting.name, p.extra_params.get(setting.param)]);
      }
    }
    try {
      resolved = resolveCatalogued(kind, settings);
    } catch (e) {
      throw bad(e.message);
    }
    if (p.token_url !== undefined) {
      const templated = s !== undefined && s.token_url.includes('{');
      const setting = settings.find(([k]) => templated && (k === 'base_url' || k === 'tenant'));
      if (setting) {
        throw bad(`token_url replaces the ${kind} URL that ${setting[0]} would build: set one of them`);
      }
      resolved.tokenUrl = p.token_url;
    }
  }
  const mcpUrl = p.mcp_url === undefined ? undefined : checkEndpoint('mcp_url', p.mcp_url, bad).href;
  if (
    mcpUrl !== undefined &&
    ['authorization_url', 'device_authorization_url', 'revocation_url', 'resource'].some(
      (k) => p[k] !== undefined,
    )
  ) {
    throw bad("an MCP server's endpoints and resource are discovered from mcp_url");
  }
  // An MCP server's token URL is discovered: its registration is applied
  // when the keeper opens the database (`applyRegistration`).
  const url = mcpUrl === undefined ? checkEndpoint('token_url', resolved.tokenUrl, bad) : { href: '' };
  // A variable that is not set fails only this provider's refreshes.
  let clientSecret;
  let clientSecretMissing;
  if (p.client_secret !== undefined && p.client_secret_env !== undefined) {
    throw bad('set client_secret or client_secret_env, not both');
  } else if (p.client_secret !== undefined) {
    clientSecret = p.client_secret;
  } else if (p.client_secret_env !== undefined) {
    const value = env[p.client_secret_env];
    if (typeof value === 'string' && value !== '') clientSecret = value;
    else clientSecretMissing = p.client_secret_env;
  }
  const clientAuth =
    p.client_auth ?? (mcpUrl !== undefined && p.client_id === undefined ? 'none' : resolved.clientAuth);
  if (clientAuth === 'basic' && clientSecret === undefined && clientSecretMissing === undefined) {
    throw bad('client_auth = "basic" needs a client secret');
  }
  if (clientAuth === 'private-key-jwt' && p.private_key_file === undefined) {
    throw bad('client_auth = "private-key-jwt" needs private_key_file');
  }
  if (clientAuth !== 'private-key-jwt' && p.private_key_file !== undefined) {
    throw bad('private_key_file is for client_auth = "private-key-jwt"');
  }
  if (
    (clientAuth === 'none' || clientAuth === 'private-key-jwt') &&
    (clientSecret !== undefined || clientSecretMissing !== undefined)
  ) {
    throw bad(`a client secret is not sent with client_auth = "${clientAuth}"`);
  }
  const grant = p.grant ?? 'authorization-code';
  if (grant === 'client-credentials' && clientAuth === 'none') {
    throw bad('grant = "client-credentials" needs a client that authenticates');
  }
  for (const what of ['authorization_url', 'device_authorization_url', 'revocation_url', 'resource']) {
    if (p[what] !== undefined) checkEndpoint(what, p[what], bad);
  }
  // What this host cannot do fails only this provider's refreshes, like a
  // missing secret: the same file serves the Rust host, which can.
  let unsupported;
  if (clientAuth === 'private-key-jwt') {
    unsupported = 'client_auth = "private-key-jwt" is not supported by the Node host';
  } else if (grant !== 'authorization-code') {
    unsupported = `grant = "${grant}" is not supported by the Node host`;
  } else if (p.dpop === true) {
    // A refresh without the row's proof would be refused as a bad grant.
    unsupported = 'dpop = true (proof keys) is not supported by the Node host';
  }
  if (mcpUrl === undefined && p.issuer !== undefined) {
    throw bad("issuer pins an MCP server's authorisation server: set mcp_url");
  }
  if (
    mcpUrl !== undefined &&
    p.issuer === undefined &&
    (clientSecret !== undefined || clientSecretMissing !== undefined || p.private_key_file !== undefined)
  ) {
    throw bad(
      'a client with credentials for an MCP server needs issuer: its secret goes to ' +
        'the authorisation server the server names',
    );
  }
  if (grant === 'token-exchange' && p.subject_provider === undefined) {
    throw bad('grant = "token-exchange" needs subject_provider');
  }
  if (grant !== 'token-exchange' && p.subject_provider !== undefined) {
    throw bad('subject_provider is for grant = "token-exchange"');
  }
  // The configuration's own parameters win, and none is sent twice.
  let extraParams = resolved.extraParams;
  for (const k of [...p.extra_params.keys()].sort(byBytes)) {
    extraParams = extraParams.filter(([existing]) => existing !== k);
    extraParams.push([k, p.extra_params.get(k)]);
  }
  // RFC 8707: the resource indicator goes with every token request.
  const resource = p.resource ?? mcpUrl;
  if (resource !== undefined) {
    extraParams = extraParams.filter(([existing]) => existing !== 'resource');
    extraParams.push(['resource', new URL(resource).href]);
  }
  let ca;
  if (p.ca_bundle !== undefined) {
    try {
      ca = readCaBundle(p.ca_bundle);
    } catch (e) {
      throw bad(e.message);
    }
  }
  const secret = clientSecret;
  const provider = {
    name,
    kind,
    tokenUrl: url.href,
    clientId: p.client_id ?? '',
    mcpUrl,
    clientSecretMissing,
    unsupported,
    clientAuth,
    grant,
    subjectProvider: p.subject_provider,
    ca,
    extraParams,
    rotatesRefreshTokens: resolved.rotatesRefreshTokens,
    reuseLeewaySeconds: p.reuse_leeway_seconds ?? resolved.reuseLeewaySeconds,
    bare4xxIsRefusal: p.bare_4xx_is_refusal ?? true,
    errorCodes: resolved.errorCodes,
    defaultExpiresIn: p.default_expires_in ?? resolved.defaultExpiresIn,
    defaultRefreshTokenExpiresIn:
      p.default_refresh_token_expires_in ?? resolved.defaultRefreshTokenExpiresIn,
    refreshTokenIdleSeconds: p.refresh_token_idle_seconds ?? resolved.refreshTokenIdleSeconds,
    maxAttempts: Math.min(10, Math.max(1, p.max_attempts ?? DEFAULT_MAX_ATTEMPTS)),
    retryBudgetMs: 0,
    refreshThresholdSeconds: p.refresh_threshold_seconds ?? DEFAULT_REFRESH_THRESHOLD_SECONDS,
    timeoutMs: Math.max(1, p.timeout_ms ?? DEFAULT_TIMEOUT_MS),
    maxResponseBytes: Math.max(256, p.max_response_bytes ?? DEFAULT_MAX_RESPONSE_BYTES),
  };
  // The secret is reachable only through this getter: not enumerable, so
  // no JSON.stringify, console.log or util.inspect of the provider shows it.
  Object.defineProperty(provider, 'clientSecret', { get: () => secret, enumerable: false });
  return provider;
}

/**
 * Applies a registration another host made for an MCP server's provider
 * (the `tokenkeep_clients` row): its discovered token URL and client.
 */
export function applyRegistration(provider, registration) {
  if (provider.mcpUrl === undefined || registration.resource !== provider.mcpUrl) return;
  let metadata;
  try {
    metadata = JSON.parse(registration.metadata);
  } catch {
    throw configuration(`provider ${provider.name}: the stored registration does not read`);
  }
  provider.tokenUrl = metadata.token_endpoint;
  if (provider.clientId === '') provider.clientId = registration.client_id;
}

/** What the component knows of a provider: the WIT `provider-config`. */
export function providerContract(p) {
  return {
    name: p.name,
    refreshThresholdSeconds: p.refreshThresholdSeconds,
    timeoutMs: p.timeoutMs,
    maxResponseBytes: p.maxResponseBytes,
    kind: p.kind,
    errorCodes: p.errorCodes.map(([code, cls]) => [code, cls]),
    defaultExpiresIn: p.defaultExpiresIn,
    defaultRefreshTokenExpiresIn: p.defaultRefreshTokenExpiresIn,
    rotatesRefreshTokens: p.rotatesRefreshTokens,
    maxAttempts: p.maxAttempts,
    retryBudgetMs: p.retryBudgetMs,
    bare4xxIsRefusal: p.bare4xxIsRefusal,
    reuseLeewaySeconds: p.reuseLeewaySeconds,
    hostGrant: p.grant !== 'authorization-code',
  };
}
