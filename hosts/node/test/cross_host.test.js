// The Node host and the Rust host on one SQLite file: the same schema, the
// same sealing and keys, the same lock, and one provider call per expiry
// however many processes of either host ask.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import Database from 'better-sqlite3';
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { openKeeper } from '../src/index.js';
import {
  HAVE_RUST,
  LATEST_SCHEMA,
  cliArgs,
  nodeCli,
  providerToml,
  rustCli,
  spawnCli,
  startProvider,
  workspace,
} from './support/harness.js';

const skip = !HAVE_RUST && 'the Rust CLI (target/debug/tokenkeep) is not built';

describe('one SQLite file, two hosts', { skip }, () => {
  let ws;
  let provider;

  before(async () => {
    ws = workspace();
    provider = await startProvider(ws.dir, ['--delay', '300', '--client-secret', 'test-secret-Zq9']);
    ws.writeConfig(`lock_wait_ms = 8000\n${providerToml('acme', provider.url)}`);
  });

  after(async () => {
    await provider?.stop();
    ws?.cleanup();
  });

  test('a database the Rust host created and migrated opens in Node', () => {
    const r = rustCli([...cliArgs(ws), 'migrate']);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout.trim(), `schema at version ${LATEST_SCHEMA}`);
    const n = nodeCli([...cliArgs(ws), 'migrate']);
    assert.equal(n.code, 0, n.stderr);
    assert.equal(n.stdout.trim(), `schema at version ${LATEST_SCHEMA}`);
  });

  test('a row sealed by the Rust CLI opens in Node', () => {
    const put = rustCli([...cliArgs(ws), 'tokens', 'put', 'acme', 'alice'], {
      input: JSON.stringify({ access_token: 'at-rust', refresh_token: 'rt-rust', expires_in: 3600, scope: 'a b' }),
    });
    assert.equal(put.code, 0, put.stderr);
    const keeper = openKeeper({ database: `sqlite:${ws.db}`, config: ws.config, keys: ws.keys });
    try {
      const grant = keeper.accessGrant('acme', 'alice');
      assert.equal(grant.accessToken, 'at-rust');
      assert.deepEqual(grant.scopes, ['a', 'b']);
      assert.equal(grant.generation, 1);
    } finally {
      keeper.close();
    }
    const get = nodeCli([...cliArgs(ws), 'get', 'acme', 'alice']);
    assert.equal(get.code, 0, get.stderr);
    assert.equal(get.stdout, 'at-rust\n');
    assert.equal(provider.calls().length, 0);
  });

  test('a row stored by Node is read by `tokenkeep tokens get`', () => {
    const put = nodeCli([...cliArgs(ws), 'put', 'acme', 'bob'], {
      input: JSON.stringify({ access_token: 'at-node', refresh_token: 'rt-node', expires_in: 3600 }),
    });
    assert.equal(put.code, 0, put.stderr);
    assert.equal(put.stdout, '');
    assert.equal(put.stderr, 'stored acme/bob (generation 1)\n');
    const get = rustCli([...cliArgs(ws), 'tokens', 'get', 'acme', 'bob']);
    assert.equal(get.code, 0, get.stderr);
    assert.equal(get.stdout, 'at-node\n');
    const list = rustCli([...cliArgs(ws), 'tokens', 'list', '--json']);
    const bob = list.stdout.split('\n').filter(Boolean).map((l) => JSON.parse(l)).find((r) => r.user_id === 'bob');
    assert.equal(bob.state, 'fresh');
    assert.equal(bob.key_id, 'k1');
    assert.equal(provider.calls().length, 0);
  });

  test('a refresh by one host is read by the other, and generations go on', () => {
    nodeCli([...cliArgs(ws), 'put', 'acme', 'carol'], {
      input: JSON.stringify({ access_token: 'at-c0', refresh_token: 'rt-0', expires_in: 1 }),
    });
    const rust = rustCli([...cliArgs(ws), 'tokens', 'get', 'acme', 'carol']);
    assert.equal(rust.code, 0, rust.stderr);
    assert.equal(rust.stdout, 'at-1\n');
    const node = nodeCli([...cliArgs(ws), 'get', 'acme', 'carol']);
    assert.equal(node.stdout, 'at-1\n');
    assert.equal(provider.calls().length, 1);
    const keeper = openKeeper({ database: ws.db, config: ws.config, keys: ws.keys });
    try {
      assert.equal(keeper.accessGrant('acme', 'carol').generation, 2);
    } finally {
      keeper.close();
    }
  });

  test('keys rotated by the Rust host: Node opens old and new key ids', () => {
    const newKey = randomBytes(32).toString('base64');
    const rotated = `${ws.dir}/keys-rotated`;
    writeFileSync(rotated, `k2=${newKey}\nk1=${ws.key}\n`);
    const args = ['--database', `sqlite:${ws.db}`, '--config', ws.config, '--keys', rotated];
    const put = rustCli([...args, 'tokens', 'put', 'acme', 'dave'], {
      input: JSON.stringify({ access_token: 'at-k2', expires_in: 3600 }),
    });
    assert.equal(put.code, 0, put.stderr);
    const keeper = openKeeper({ database: ws.db, config: ws.config, keys: rotated });
    try {
      assert.equal(keeper.accessToken('acme', 'dave'), 'at-k2');
      assert.equal(keeper.accessToken('acme', 'alice'), 'at-rust');
      const stored = keeper.storeTokens('acme', 'erin', { access_token: 'at-e', expires_in: 3600 });
      assert.equal(stored.generation, 1);
    } finally {
      keeper.close();
    }
    const list = rustCli([...args, 'tokens', 'list', '--json']).stdout.split('\n').filter(Boolean).map((l) => JSON.parse(l));
    assert.equal(list.find((r) => r.user_id === 'erin').key_id, 'k2');
    const get = rustCli([...args, 'tokens', 'get', 'acme', 'erin']);
    assert.equal(get.stdout, 'at-e\n');
    // With only the old key, Rust cannot open what Node sealed with the new one.
    const old = rustCli([...cliArgs(ws), 'tokens', 'get', 'acme', 'erin']);
    assert.equal(old.code, 10);
  });

  test('4 Node and 4 Rust processes racing one expired token make one provider call', async () => {
    const before = provider.calls().length;
    nodeCli([...cliArgs(ws), 'put', 'acme', 'race'], {
      input: JSON.stringify({ access_token: 'at-stale', refresh_token: 'rt-1', expires_in: 1 }),
    });
    const runs = [];
    for (let i = 0; i < 4; i++) {
      runs.push(spawnCli('node', [...cliArgs(ws), 'get', 'acme', 'race']));
      runs.push(spawnCli('rust', [...cliArgs(ws), 'tokens', 'get', 'acme', 'race']));
    }
    const results = await Promise.all(runs);
    for (const r of results) {
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.stdout, 'at-2\n');
    }
    const calls = provider.calls().slice(before);
    assert.equal(calls.length, 1);
    assert.equal(calls[0].refresh_token, 'rt-1');
  });

  test('a lock held by a Rust process is a lock Node waits for', async () => {
    // Rust holds the write lock while its refresh waits on the provider
    // (300 ms); Node, started meanwhile, waits and reads Rust's result.
    nodeCli([...cliArgs(ws), 'put', 'acme', 'frank'], {
      input: JSON.stringify({ access_token: 'at-f', refresh_token: 'rt-2', expires_in: 1 }),
    });
    const before = provider.calls().length;
    const rust = spawnCli('rust', [...cliArgs(ws), 'tokens', 'get', 'acme', 'frank']);
    while (provider.calls().length === before) await new Promise((r) => setTimeout(r, 10));
    const node = nodeCli([...cliArgs(ws), 'get', 'acme', 'frank']);
    const r = await rust;
    assert.equal(r.stdout, 'at-3\n');
    assert.equal(node.stdout, 'at-3\n');
    assert.equal(provider.calls().length, before + 1);
  });

  test('the audit log is one log for both hosts', () => {
    const audit = new Database(`${ws.db}-audit`, { readonly: true });
    const callers = audit.prepare("SELECT DISTINCT caller FROM tokenkeep_audit WHERE user_id = 'race'").all();
    audit.close();
    assert.deepEqual(callers.map((c) => c.caller).sort(), ['cli', 'node-cli']);
    const r = rustCli([...cliArgs(ws), 'audit', '--user', 'race', '--json']);
    const actions = r.stdout.split('\n').filter(Boolean).map((l) => JSON.parse(l));
    assert.equal(actions.filter((a) => a.action === 'refresh').length, 1);
    assert.equal(actions.filter((a) => a.action === 'read').length, 8);
  });
});
