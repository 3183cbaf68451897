// What the tests share: temporary directories with a key file and a
// configuration, a loopback token endpoint in a child process, and the two
// command lines (this host's and the Rust host's built CLI).

import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';

const here = dirname(fileURLToPath(import.meta.url));
export const HOST_DIR = resolve(here, '..', '..');
export const REPO = resolve(HOST_DIR, '..', '..');
export const NODE_CLI = join(HOST_DIR, 'bin', 'tokenkeep-node.js');
export const RUST_CLI = process.env.TOKENKEEP_RUST_CLI || join(REPO, 'target', 'debug', 'tokenkeep');
export const HAVE_RUST = existsSync(RUST_CLI);
/** The newest schema version both hosts know: host/schema/sqlite/NNNN.sql. */
export const LATEST_SCHEMA = Math.max(
  ...readdirSync(join(REPO, 'host', 'schema', 'sqlite'))
    .filter((f) => /^\d{4}\.sql$/.test(f))
    .map((f) => Number(f.slice(0, 4))),
);

/** A fresh directory with a key file; removed by `cleanup()`. */
export function workspace() {
  const dir = mkdtempSync(join(tmpdir(), 'tokenkeep-node-'));
  const key = randomBytes(32).toString('base64');
  const keys = join(dir, 'keys');
  writeFileSync(keys, `k1=${key}\n`, { mode: 0o600 });
  return {
    dir,
    db: join(dir, 'tokens.db'),
    keys,
    key,
    config: join(dir, 'config.toml'),
    writeConfig(text) {
      writeFileSync(this.config, text);
      return this.config;
    },
    cleanup() {
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** A provider section for `name` at `url` (defaults the tests rely on). */
export function providerToml(name, url, extra = '') {
  return `[providers.${name}]
token_url = "${url}"
client_id = "test-client"
client_secret = "test-secret-Zq9"
timeout_ms = 3000
${extra}
`;
}

/** Starts the loopback token endpoint; `stop()` ends it. */
export async function startProvider(dir, args = []) {
  const log = join(dir, `provider-${randomBytes(4).toString('hex')}.log`);
  writeFileSync(log, '');
  const child = spawn(process.execPath, [join(here, 'provider.js'), log, ...args], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const lines = createInterface({ input: child.stdout });
  const port = await new Promise((resolvePort, reject) => {
    child.once('exit', (code) => reject(new Error(`provider exited ${code}`)));
    lines.on('line', (line) => {
      const m = /^listening (\d+)$/.exec(line);
      if (m) resolvePort(Number(m[1]));
    });
  });
  return {
    port,
    url: `http://127.0.0.1:${port}/oauth/token`,
    calls() {
      return readFileSync(log, 'utf8')
        .split('\n')
        .filter(Boolean)
        .map((l) => JSON.parse(l));
    },
    async stop() {
      if (child.exitCode !== null) return;
      const done = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      await done;
    },
  };
}

function run(argv0, args, { input, env } = {}) {
  const r = spawnSync(argv0[0], [...argv0.slice(1), ...args], {
    input: input ?? '',
    env: { ...process.env, ...env },
    encoding: 'utf8',
    timeout: 120_000,
  });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** Runs this host's CLI to completion. */
export const nodeCli = (args, options) => run([process.execPath, NODE_CLI], args, options);

/** Runs the Rust CLI to completion. */
export const rustCli = (args, options) => run([RUST_CLI], args, options);

/** Starts a CLI without waiting: resolves to {code, stdout, stderr}. */
export function spawnCli(which, args, env = {}) {
  const argv = which === 'rust' ? [RUST_CLI] : [process.execPath, NODE_CLI];
  const child = spawn(argv[0], [...argv.slice(1), ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, ...env },
  });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d) => (stdout += d));
  child.stderr.on('data', (d) => (stderr += d));
  return new Promise((r) => child.on('close', (code) => r({ code, stdout, stderr })));
}

/** The common options of both CLIs for a workspace. */
export const cliArgs = (ws) => ['--database', `sqlite:${ws.db}`, '--config', ws.config, '--keys', ws.keys];

/** Starts the loopback CONNECT proxy; `targets()` lists the tunnels it opened. */
export async function startProxy(dir) {
  const log = join(dir, `proxy-${randomBytes(4).toString('hex')}.log`);
  const child = spawn(process.execPath, [join(here, 'proxy.js'), log], { stdio: ['ignore', 'pipe', 'inherit'] });
  const lines = createInterface({ input: child.stdout });
  const port = await new Promise((resolvePort, reject) => {
    child.once('exit', (code) => reject(new Error(`proxy exited ${code}`)));
    lines.on('line', (line) => {
      const m = /^listening (\d+)$/.exec(line);
      if (m) resolvePort(Number(m[1]));
    });
  });
  return {
    url: `http://127.0.0.1:${port}`,
    targets: () => readFileSync(log, 'utf8').split('\n').filter(Boolean),
    async stop() {
      if (child.exitCode !== null) return;
      const done = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      await done;
    },
  };
}
