// tokenkeep-node: the tokenkeep component (tokenkeep:oauth@0.6.0) hosted
// in Node.js over SQLite, sharing files, schema, sealing, keys and locks
// with the Rust host.

import { existsSync } from 'node:fs';
import { applyRegistration, defaultConfig, loadConfig } from './config.js';
import { configuration } from './errors.js';
import { Keeper } from './keeper.js';
import { Keyring } from './keyring.js';
import { ensureComponent } from './sandbox.js';
import { SqliteStore, sqlitePath } from './storage.js';

export { TokenkeepError, EXIT_CODES, ERROR_CLASSES } from './errors.js';
export { Keeper } from './keeper.js';

/** The key file beside an SQLite database: `<database>` with its extension replaced by `.key`. */
export function defaultKeyPath(path) {
  const slash = path.lastIndexOf('/');
  const name = path.slice(slash + 1);
  const dot = name.lastIndexOf('.');
  // As Rust's Path::with_extension: a leading dot is the name, not an extension.
  const stem = dot > 0 ? name.slice(0, dot) : name;
  return `${path.slice(0, slash + 1)}${stem}.key`;
}

/**
 * The keyring: `keys` (a key file), else TOKENKEEP_KEYS (inline entries),
 * else TOKENKEEP_KEYS_FILE, else `<database>.key` beside the SQLite file,
 * created (mode 0600) on first use; `onCreate(path)` is told when it is.
 */
export function resolveKeyring({ keys, database, env = process.env, onCreate }) {
  if (keys !== undefined && keys !== null) return Keyring.load(String(keys));
  if (env.TOKENKEEP_KEYS !== undefined) return Keyring.parse(env.TOKENKEEP_KEYS);
  if (env.TOKENKEEP_KEYS_FILE) return Keyring.load(env.TOKENKEEP_KEYS_FILE);
  const path = defaultKeyPath(sqlitePath(database));
  if (existsSync(path)) return Keyring.load(path);
  const ring = Keyring.create(path);
  onCreate?.(path);
  return ring;
}

/**
 * Opens a keeper over an SQLite file shared with the Rust host.
 *
 * - `database`: a path, or `sqlite:PATH` (required)
 * - `config`: the tokenkeep TOML configuration file (optional: no providers)
 * - `keys`: the key file, as the CLI's `--keys` (optional: see resolveKeyring)
 * - `auditAs`: the caller recorded in the audit log (`node` unless given; null: no audit)
 * - `env`: where `client_secret_env` variables and TOKENKEEP_KEYS* are read (process.env)
 * - `clock`: seconds since the epoch, for every clock of the keeper (tests; the machine's by default)
 */
export function openKeeper({
  database,
  config,
  keys,
  auditAs = 'node',
  env = process.env,
  onKeyCreated,
  clock,
} = {}) {
  if (database === undefined || database === null || database === '') {
    throw configuration('openKeeper needs a database: a path or sqlite:PATH');
  }
  ensureComponent();
  const settings = config === undefined || config === null ? defaultConfig() : loadConfig(String(config), env);
  const keyring = resolveKeyring({ keys, database: String(database), env, onCreate: onKeyCreated });
  const store = SqliteStore.open(sqlitePath(String(database)), { lockWaitMs: settings.lockWaitMs });
  // MCP servers' providers: the client the Rust host registered, if any.
  for (const provider of settings.providers.values()) {
    if (provider.mcpUrl === undefined) continue;
    const registration = store.registration(provider.name);
    if (registration) applyRegistration(provider, registration);
  }
  return new Keeper({ store, keyring, config: settings, auditAs: auditAs ?? undefined, clock });
}

export default openKeeper;
