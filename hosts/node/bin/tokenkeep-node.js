#!/usr/bin/env node
// tokenkeep-node: the Node host's command line, a subset of `tokenkeep`'s
// with the same options, environment variables, output and exit codes.
//
//   tokenkeep-node [--database URL] [--config FILE] [--keys FILE] COMMAND
//     get PROVIDER USER [--min-remaining S]
//                            a valid access token on standard output, nothing else
//     put PROVIDER USER      stores the token response (RFC 6749 5.1 JSON) on standard input
//     delete PROVIDER USER   deletes a user's tokens
//     list [--json]          stored tokens, never a secret
//     migrate                brings the schema up to date: `schema at version N`
//
// A failure is one line on standard error (`tokenkeep: CLASS: message`, as
// the Rust CLI writes it) and the exit code of its class (README, "Exit
// codes"); 2 for bad usage.

import { existsSync, readSync } from 'node:fs';
import { join } from 'node:path';
import { setImmediate as turn } from 'node:timers/promises';
import { loadConfig, defaultConfig } from '../src/config.js';
import { TokenkeepError, openKeeper } from '../src/index.js';
import { SqliteStore, sqlitePath } from '../src/storage.js';

const NAME = 'tokenkeep-node';
/** How failures begin, as the Rust CLI's do: scripts read both the same way. */
const PREFIX = 'tokenkeep';
const MAX_STDIN_BYTES = 1 << 20;
const env = process.env;

const USAGE = `usage: ${NAME} [--database URL] [--config FILE] [--keys FILE] COMMAND
commands:
  get PROVIDER USER [--min-remaining S]
                         print a valid access token, refreshing it first if needed
                         (or unless it stays valid S seconds more)
  put PROVIDER USER      store a token response (RFC 6749 section 5.1 JSON) read from standard input
  delete PROVIDER USER   delete a user's tokens
  list [--json]          list stored tokens without secrets
  migrate                bring the database's schema up to date`;

class Usage extends Error {}

function parseArgs(argv) {
  const options = {};
  const rest = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const m = /^--(database|config|keys|min-remaining)(?:=(.*))?$/.exec(a);
    if (m) {
      const value = m[2] ?? argv[++i];
      if (value === undefined) throw new Usage(`--${m[1]} needs a value`);
      options[m[1]] = value;
    } else if (a === '--json') {
      options.json = true;
    } else if (a === '-h' || a === '--help') {
      options.help = true;
    } else if (a.startsWith('--')) {
      throw new Usage(`unknown option ${a}`);
    } else {
      rest.push(a);
    }
  }
  return { options, rest };
}

/** Where the embedded default keeps its database and key. */
function dataDir() {
  if (env.TOKENKEEP_HOME) return env.TOKENKEEP_HOME;
  const base = env.XDG_DATA_HOME || (env.HOME ? join(env.HOME, '.local/share') : '.');
  return join(base, 'tokenkeep');
}

function databaseUrl(options) {
  return options.database ?? env.TOKENKEEP_DATABASE ?? `sqlite:${join(dataDir(), 'tokenkeep.db')}`;
}

function configPath(options) {
  const path = options.config ?? env.TOKENKEEP_CONFIG;
  if (path !== undefined) return path;
  const fallback = join(dataDir(), 'config.toml');
  return existsSync(fallback) ? fallback : undefined;
}

/** TOKENKEEP_KEYS (inline) wins, then --keys / TOKENKEEP_KEYS_FILE, then `<db>.key`. */
function keysPath(options) {
  if (env.TOKENKEEP_KEYS !== undefined) return undefined;
  return options.keys ?? env.TOKENKEEP_KEYS_FILE;
}

function readStdin() {
  const chunks = [];
  let total = 0;
  const buf = Buffer.alloc(64 * 1024);
  for (;;) {
    let n;
    try {
      n = readSync(0, buf, 0, buf.length, null);
    } catch (e) {
      if (e.code === 'EAGAIN') continue;
      if (e.code === 'EOF') break;
      throw new TokenkeepError('invalid-input', `cannot read standard input: ${e.code ?? 'error'}`);
    }
    if (n === 0) break;
    total += n;
    if (total > MAX_STDIN_BYTES) throw new TokenkeepError('invalid-input', 'standard input exceeds 1 MiB');
    chunks.push(Buffer.from(buf.subarray(0, n)));
  }
  const data = Buffer.concat(chunks);
  buf.fill(0);
  return data;
}

function open(options) {
  return openKeeper({
    database: databaseUrl(options),
    config: configPath(options),
    keys: keysPath(options),
    auditAs: 'node-cli',
    onKeyCreated: (path) =>
      process.stderr.write(
        `${PREFIX}: created encryption key ${path} (mode 0600); back it up: without it the stored tokens cannot be read\n`,
      ),
  });
}

function twoNames(rest, command) {
  if (rest.length !== 3) throw new Usage(`${command} takes PROVIDER USER`);
  return [rest[1], rest[2]];
}

/** Runs the command: what to print on standard output, if anything. */
function run(options, rest) {
  const command = rest[0];
  switch (command) {
    case 'get': {
      const [provider, user] = twoNames(rest, command);
      const raw = options['min-remaining'] ?? '0';
      if (!/^[0-9]+$/.test(raw) || Number(raw) > 4294967295) {
        throw new Usage('--min-remaining takes a number of seconds');
      }
      const keeper = open(options);
      try {
        return `${keeper.accessGrant(provider, user, { minRemainingSeconds: Number(raw) }).accessToken}\n`;
      } finally {
        keeper.close();
      }
    }
    case 'put': {
      const [provider, user] = twoNames(rest, command);
      const body = readStdin();
      const keeper = open(options);
      try {
        const r = keeper.storeTokens(provider, user, body);
        process.stderr.write(`stored ${provider}/${user} (generation ${r.generation})\n`);
        return '';
      } finally {
        body.fill(0);
        keeper.close();
      }
    }
    case 'delete': {
      const [provider, user] = twoNames(rest, command);
      const keeper = open(options);
      try {
        if (!keeper.deleteTokens(provider, user)) {
          throw new TokenkeepError('not-found', '', { provider, userId: user });
        }
        process.stderr.write(`deleted ${provider}/${user}\n`);
        return '';
      } finally {
        keeper.close();
      }
    }
    case 'list': {
      if (rest.length !== 1) throw new Usage('list takes no arguments');
      const keeper = open(options);
      try {
        const rows = keeper.listTokens();
        if (options.json) return rows.map((r) => `${JSON.stringify(r)}\n`).join('');
        return rows
          .map((r) =>
            [r.provider, r.userId, r.state, r.accessTokenExpiresAt ?? 'never', r.generation, r.keyId, r.lastFailure ?? '-'].join('\t'),
          )
          .map((line) => `${line}\n`)
          .join('');
      } finally {
        keeper.close();
      }
    }
    case 'migrate': {
      if (rest.length !== 1) throw new Usage('migrate takes no arguments');
      const path = configPath(options);
      const config = path === undefined ? defaultConfig() : loadConfig(path);
      const store = SqliteStore.open(sqlitePath(databaseUrl(options)), { lockWaitMs: config.lockWaitMs });
      const version = store.schemaVersion;
      store.close();
      return `schema at version ${version}\n`;
    }
    default:
      throw new Usage(command === undefined ? 'no command given' : `unknown command ${command}`);
  }
}

// SIGTERM and SIGINT wait for the call in flight (a provider may already
// have rotated the token): the handler runs once the synchronous call has
// committed; then the command stops without printing, as the Rust CLI does.
let interrupted;
for (const [signal, number] of [['SIGTERM', 15], ['SIGINT', 2]]) {
  process.on(signal, () => {
    if (interrupted === undefined) interrupted = number;
  });
}

async function main() {
  let out;
  try {
    const { options, rest } = parseArgs(process.argv.slice(2));
    if (options.help) {
      process.stdout.write(`${USAGE}\n`);
      return 0;
    }
    out = run(options, rest);
  } catch (e) {
    if (e instanceof Usage) {
      process.stderr.write(`${NAME}: ${e.message}\n${USAGE}\n`);
      return 2;
    }
    if (e instanceof TokenkeepError) {
      const prefix = `${e.class}: `;
      const message = e.message.startsWith(prefix) ? e.message.slice(prefix.length) : e.message;
      process.stderr.write(`${PREFIX}: ${e.class}: ${message}\n`);
      return e.exitCode;
    }
    const message = String(e?.message ?? e).split('\n')[0].slice(0, 200);
    process.stderr.write(`${PREFIX}: sandbox: ${message}\n`);
    return 15;
  }
  // Let a signal that arrived during the call be seen before printing
  // (libuv hands it over within a couple of loop turns).
  for (let i = 0; i < 4 && interrupted === undefined; i++) await turn();
  if (interrupted !== undefined) {
    process.stderr.write(`${PREFIX}: interrupted: refreshes in flight were saved first\n`);
    return 128 + interrupted;
  }
  if (out) process.stdout.write(out);
  return 0;
}

process.exitCode = await main();
