// Several Node processes on one expiring token: one provider call; and a
// lock holder that dies releases its lock, its refresh start recorded.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { spawn } from 'node:child_process';
import { openKeeper } from '../src/index.js';
import { NODE_CLI, cliArgs, nodeCli, providerToml, spawnCli, startProvider, workspace } from './support/harness.js';

describe('Node processes racing one token', () => {
  let ws;
  let provider;

  before(async () => {
    ws = workspace();
    provider = await startProvider(ws.dir, ['--delay', '400']);
    ws.writeConfig(`lock_wait_ms = 8000\n${providerToml('acme', provider.url)}`);
  });

  after(async () => {
    await provider?.stop();
    ws?.cleanup();
  });

  test('six processes, one expired token, exactly one provider call', async () => {
    const put = nodeCli([...cliArgs(ws), 'put', 'acme', 'alice'], {
      input: JSON.stringify({ access_token: 'at-stale', refresh_token: 'rt-0', expires_in: 1 }),
    });
    assert.equal(put.code, 0, put.stderr);
    const results = await Promise.all(
      Array.from({ length: 6 }, () => spawnCli('node', [...cliArgs(ws), 'get', 'acme', 'alice'])),
    );
    for (const r of results) {
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.stdout, 'at-1\n');
      assert.equal(r.stderr, '');
    }
    const calls = provider.calls();
    assert.equal(calls.length, 1);
    assert.equal(calls[0].refresh_token, 'rt-0');
  });

  test('SIGTERM during a refresh waits for the commit, then exits 143 without output', async () => {
    const put = nodeCli([...cliArgs(ws), 'put', 'acme', 'carol'], {
      input: JSON.stringify({ access_token: 'at-c', refresh_token: 'rt-1', expires_in: 1 }),
    });
    assert.equal(put.code, 0, put.stderr);
    const before = provider.calls().length;
    const child = spawn(process.execPath, [NODE_CLI, ...cliArgs(ws), 'get', 'acme', 'carol'], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    while (provider.calls().length === before) await new Promise((r) => setTimeout(r, 5));
    child.kill('SIGTERM');
    const code = await new Promise((r) => child.on('close', r));
    assert.equal(code, 143);
    assert.equal(stdout, '');
    assert.match(stderr, /interrupted: refreshes in flight were saved first/);
    // The rotated token was saved: the next read needs no provider call.
    const keeper = openKeeper({ database: ws.db, config: ws.config, keys: ws.keys });
    try {
      assert.equal(keeper.accessToken('acme', 'carol'), 'at-2');
    } finally {
      keeper.close();
    }
    assert.equal(provider.calls().length, before + 1);
  });

  test('a holder killed mid-refresh releases the lock; the lost rotation is named', async () => {
    const put = nodeCli([...cliArgs(ws), 'put', 'acme', 'bob'], {
      input: JSON.stringify({ access_token: 'at-b', refresh_token: 'rt-2', expires_in: 1 }),
    });
    assert.equal(put.code, 0, put.stderr);
    const before = provider.calls().length;
    const victim = spawn(process.execPath, [NODE_CLI, ...cliArgs(ws), 'get', 'acme', 'bob'], { stdio: 'ignore' });
    while (provider.calls().length === before) await new Promise((r) => setTimeout(r, 5));
    // The request is with the provider, which will rotate: the answer dies here.
    const died = new Promise((r) => victim.on('exit', r));
    victim.kill('SIGKILL');
    await died;
    await new Promise((r) => setTimeout(r, 600));
    const started = Date.now();
    const next = nodeCli([...cliArgs(ws), 'get', 'acme', 'bob']);
    assert.ok(Date.now() - started < 4000, 'the dead holder\'s lock went with it');
    assert.equal(next.code, 4, next.stderr);
    assert.match(next.stderr, /^tokenkeep: reauthorization-required: .*interrupted refresh/);
    assert.equal(next.stderr.split('\n').filter(Boolean).length, 1);
  });
});
