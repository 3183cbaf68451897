// The keeper over a real SQLite file, refreshing against a loopback token
// endpoint that runs in a child process.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import Database from 'better-sqlite3';
import { existsSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { TokenkeepError, openKeeper } from '../src/index.js';
import {
  LATEST_SCHEMA,
  cliArgs,
  nodeCli,
  providerToml,
  startProvider,
  startProxy,
  workspace,
} from './support/harness.js';

const classOf = (fn) => {
  try {
    fn();
  } catch (e) {
    assert.ok(e instanceof TokenkeepError, `a TokenkeepError, not ${e}`);
    return e.class;
  }
  assert.fail('no error');
};

describe('a keeper over one SQLite file', () => {
  let ws;
  let provider;
  let keeper;

  before(async () => {
    ws = workspace();
    // Every token this provider grants expires within the 60 s skew: each
    // read refreshes it, spending the refresh token the last one stored.
    provider = await startProvider(ws.dir, ['--expires-in', '30', '--client-secret', 'test-secret-Zq9']);
    ws.writeConfig(`lock_wait_ms = 4000\n${providerToml('acme', provider.url)}`);
    keeper = openKeeper({ database: ws.db, config: ws.config, keys: ws.keys });
  });

  after(async () => {
    keeper?.close();
    await provider?.stop();
    ws?.cleanup();
  });

  test('a stored token is served without a provider call', () => {
    const stored = keeper.storeTokens('acme', 'alice', {
      access_token: 'at-stored',
      refresh_token: 'rt-stored',
      expires_in: 3600,
      scope: 'repo user',
    });
    assert.equal(stored.generation, 1);
    assert.deepEqual(stored.scopes, ['repo', 'user']);
    assert.equal(keeper.accessToken('acme', 'alice'), 'at-stored');
    const grant = keeper.accessGrant('acme', 'alice');
    assert.equal(grant.accessToken, 'at-stored');
    assert.equal(grant.generation, 1);
    assert.ok(grant.expiresAt > keeper.now() + 3500);
    assert.equal(provider.calls().length, 0);
    const [row] = keeper.listTokens().filter((s) => s.userId === 'alice');
    assert.equal(row.state, 'fresh');
    assert.equal(row.hasRefreshToken, true);
    assert.equal(JSON.stringify(row).includes('rt-stored'), false);
  });

  test('an expired token is refreshed once and the rotated refresh token is stored', () => {
    keeper.storeTokens('acme', 'bob', { access_token: 'at-old', refresh_token: 'rt-0', expires_in: 1 });
    assert.equal(keeper.accessToken('acme', 'bob'), 'at-1');
    let calls = provider.calls();
    assert.equal(calls.length, 1);
    assert.equal(calls[0].refresh_token, 'rt-0');
    assert.equal(calls[0].grant_type, 'refresh_token');
    assert.equal(calls[0].client_secret_ok, true);
    // The new token is due at once (30 s): the next read spends the rotated one.
    assert.equal(keeper.accessToken('acme', 'bob'), 'at-2');
    calls = provider.calls();
    assert.equal(calls.length, 2);
    assert.equal(calls[1].refresh_token, 'rt-1');
    const [row] = keeper.listTokens().filter((s) => s.userId === 'bob');
    assert.equal(row.generation, 3);
    assert.equal(row.failedAttempts, 0);
    // The refresh start was recorded in the side file, for the generation it spent.
    const markers = new Database(`${ws.db}-refresh-starts`, { readonly: true });
    const start = markers.prepare('SELECT generation FROM tokenkeep_refresh_starts WHERE user_id = ?').get('bob');
    markers.close();
    assert.equal(start.generation, 2);
  });

  test('the request goes to the configured token URL and nowhere else', async () => {
    const decoy = await startProvider(ws.dir);
    try {
      keeper.storeTokens('acme', 'carol', { access_token: 'at-c', refresh_token: 'rt-2', expires_in: 1 });
      keeper.accessToken('acme', 'carol');
      const calls = provider.calls();
      const last = calls[calls.length - 1];
      assert.equal(last.method, 'POST');
      assert.equal(last.path, '/oauth/token');
      assert.equal(last.host, `127.0.0.1:${provider.port}`);
      assert.deepEqual(last.params.sort(), ['client_id', 'client_secret', 'grant_type', 'refresh_token']);
      assert.equal(decoy.calls().length, 0);
    } finally {
      await decoy.stop();
    }
  });

  test('an unknown provider is unknown-provider', () => {
    assert.equal(classOf(() => keeper.accessToken('nosuch', 'alice')), 'unknown-provider');
    assert.equal(classOf(() => keeper.accessToken('acme', 'nobody')), 'not-found');
    assert.equal(classOf(() => keeper.accessToken('bad name!', 'alice')), 'invalid-input');
    assert.equal(classOf(() => keeper.accessToken('acme', '')), 'invalid-input');
  });

  test('a tampered or moved ciphertext is a decryption failure', () => {
    keeper.storeTokens('acme', 'dave', { access_token: 'at-d', refresh_token: 'rt-d', expires_in: 3600 });
    keeper.storeTokens('acme', 'erin', { access_token: 'at-e', refresh_token: 'rt-e', expires_in: 3600 });
    const db = new Database(ws.db);
    const { access_token: sealed } = db
      .prepare("SELECT access_token FROM tokenkeep_tokens WHERE user_id = 'dave'")
      .get();
    const tampered = Buffer.from(sealed);
    tampered[tampered.length - 1] ^= 1;
    db.prepare("UPDATE tokenkeep_tokens SET access_token = ? WHERE user_id = 'dave'").run(tampered);
    // Dave's intact ciphertext moved into Erin's row.
    db.prepare("UPDATE tokenkeep_tokens SET access_token = ? WHERE user_id = 'erin'").run(sealed);
    db.close();
    let e;
    try {
      keeper.accessToken('acme', 'dave');
    } catch (caught) {
      e = caught;
    }
    assert.equal(e.class, 'decryption');
    assert.equal(e.exitCode, 10);
    assert.match(e.message, /^decryption failed: /);
    assert.equal(classOf(() => keeper.accessToken('acme', 'erin')), 'decryption');
  });

  test('a bare keyring without the row key is a decryption failure too', () => {
    const other = workspace();
    try {
      const stranger = openKeeper({ database: ws.db, config: ws.config, keys: other.keys, auditAs: null });
      try {
        assert.equal(classOf(() => stranger.accessToken('acme', 'alice')), 'decryption');
      } finally {
        stranger.close();
      }
    } finally {
      other.cleanup();
    }
  });

  test('a held write lock makes a refresh wait the lock wait, then lock-timeout; a valid token is served', () => {
    keeper.storeTokens('acme', 'frank', { access_token: 'at-f', refresh_token: 'rt-f', expires_in: 1 });
    keeper.storeTokens('acme', 'gina', { access_token: 'at-g', refresh_token: 'rt-g', expires_in: 400 });
    const holder = new Database(ws.db);
    holder.exec('BEGIN IMMEDIATE');
    try {
      const started = Date.now();
      assert.equal(classOf(() => keeper.accessToken('acme', 'frank')), 'lock-timeout');
      const waited = Date.now() - started;
      assert.ok(waited >= 3500 && waited < 15000, `waited ${waited} ms`);
      // Due (inside the 600 s threshold) but valid: served without waiting.
      const t0 = Date.now();
      assert.equal(keeper.accessToken('acme', 'gina'), 'at-g');
      assert.ok(Date.now() - t0 < 2000);
    } finally {
      holder.exec('ROLLBACK');
      holder.close();
    }
    // The keeper released everything: the lock can be taken at once.
    const probe = new Database(ws.db, { timeout: 0 });
    probe.exec('BEGIN IMMEDIATE');
    probe.exec('ROLLBACK');
    probe.close();
  });

  test('deleting tokens, and generations that continue after a delete', () => {
    keeper.storeTokens('acme', 'hank', { access_token: 'at-h1', expires_in: 3600 });
    keeper.storeTokens('acme', 'hank', { access_token: 'at-h2', expires_in: 3600 });
    assert.equal(keeper.deleteTokens('acme', 'hank'), true);
    assert.equal(keeper.deleteTokens('acme', 'hank'), false);
    assert.equal(classOf(() => keeper.accessToken('acme', 'hank')), 'not-found');
    const again = keeper.storeTokens('acme', 'hank', { access_token: 'at-h3', expires_in: 3600 });
    assert.equal(again.generation, 3);
  });

  test('a token response that cannot be stored is invalid-input', () => {
    assert.equal(classOf(() => keeper.storeTokens('acme', 'ivy', { refresh_token: 'x' })), 'invalid-input');
    assert.equal(classOf(() => keeper.storeTokens('acme', 'ivy', { access_token: 'a', expires_in: -5 })), 'invalid-input');
    assert.equal(classOf(() => keeper.storeTokens('acme', 'ivy', '{not json')), 'invalid-input');
    assert.equal(classOf(() => keeper.storeTokens('acme', 'a\u0001b', { access_token: 'a' })), 'invalid-input');
  });

  test('the audit log records reads, refreshes and stores, never a token', () => {
    const audit = new Database(`${ws.db}-audit`, { readonly: true });
    const rows = audit.prepare("SELECT caller, action, provider, user_id, outcome FROM tokenkeep_audit WHERE user_id = 'bob'").all();
    audit.close();
    const actions = rows.map((r) => `${r.action}:${r.outcome}`);
    assert.deepEqual(actions, ['store:ok', 'refresh:ok', 'read:ok', 'refresh:ok', 'read:ok']);
    assert.ok(rows.every((r) => r.caller === 'node'));
  });
});

describe('refusals by the provider', () => {
  let ws;
  let provider;
  let keeper;

  before(async () => {
    ws = workspace();
    provider = await startProvider(ws.dir, ['--mode', 'invalid_grant']);
    ws.writeConfig(`lock_wait_ms = 4000\n${providerToml('acme', provider.url)}`);
    keeper = openKeeper({ database: ws.db, config: ws.config, keys: ws.keys });
  });

  after(async () => {
    keeper?.close();
    await provider?.stop();
    ws?.cleanup();
  });

  test('400 invalid_grant is reauthorization-required, recorded, and not sent again', () => {
    keeper.storeTokens('acme', 'alice', { access_token: 'at-a', refresh_token: 'rt-dead', expires_in: 1 });
    let e;
    try {
      keeper.accessToken('acme', 'alice');
    } catch (caught) {
      e = caught;
    }
    assert.equal(e.class, 'reauthorization-required');
    assert.equal(e.exitCode, 4);
    assert.equal(e.message.includes('rt-dead'), false);
    assert.equal(provider.calls().length, 1);
    const [row] = keeper.listTokens();
    assert.equal(row.state, 'reauthorization-required');
    assert.equal(row.lastFailure, 'reauthorization-required');
    // The refusal stands: the dead refresh token is not offered again.
    assert.equal(classOf(() => keeper.accessToken('acme', 'alice')), 'reauthorization-required');
    assert.equal(provider.calls().length, 1);
  });
});

describe('provider configuration at refresh time', () => {
  let ws;
  let provider;

  before(async () => {
    ws = workspace();
    provider = await startProvider(ws.dir, ['--client-secret', 'basic-secret']);
  });

  after(async () => {
    await provider?.stop();
    ws?.cleanup();
  });

  test('HTTP Basic client authentication puts no secret in the body', () => {
    ws.writeConfig(`[providers.acme]
token_url = "${provider.url}"
client_id = "test-client"
client_secret = "basic-secret"
client_auth = "basic"
extra_params = { audience = "api" }
timeout_ms = 3000
`);
    const keeper = openKeeper({ database: ws.db, config: ws.config, keys: ws.keys });
    try {
      keeper.storeTokens('acme', 'alice', { access_token: 'at-a', refresh_token: 'rt-0', expires_in: 1 });
      assert.equal(keeper.accessToken('acme', 'alice'), 'at-1');
      const [call] = provider.calls();
      assert.equal(call.authorization, `Basic ${Buffer.from('test-client:basic-secret').toString('base64')}`);
      assert.deepEqual(call.params, ['grant_type', 'refresh_token', 'audience']);
    } finally {
      keeper.close();
    }
  });

  test('a client_secret_env that is not set is configuration, and nothing is sent', () => {
    ws.writeConfig(`[providers.acme]
token_url = "${provider.url}"
client_id = "test-client"
client_secret_env = "TOKENKEEP_NODE_TEST_UNSET_SECRET"
timeout_ms = 3000
`);
    const before = provider.calls().length;
    const keeper = openKeeper({ database: ws.db, config: ws.config, keys: ws.keys, env: {} });
    try {
      keeper.storeTokens('acme', 'bob', { access_token: 'at-b', refresh_token: 'rt-b', expires_in: 1 });
      assert.equal(classOf(() => keeper.accessToken('acme', 'bob')), 'configuration');
      assert.equal(provider.calls().length, before);
      assert.equal(existsSync(`${ws.db}-refresh-starts`), true);
    } finally {
      keeper.close();
    }
  });

  test('a closed port is provider-unavailable, the token kept', () => {
    ws.writeConfig(`lock_wait_ms = 4000\n${providerToml('acme', 'http://127.0.0.1:9/oauth/token', 'max_attempts = 1')}`);
    const keeper = openKeeper({ database: ws.db, config: ws.config, keys: ws.keys });
    try {
      keeper.storeTokens('acme', 'carol', { access_token: 'at-c', refresh_token: 'rt-c', expires_in: 1 });
      assert.equal(classOf(() => keeper.accessToken('acme', 'carol')), 'provider-unavailable');
      const [row] = keeper.listTokens().filter((s) => s.userId === 'carol');
      assert.equal(row.generation, 1);
      assert.equal(row.lastFailure, 'provider-unavailable');
      assert.ok(row.retryNotBefore > keeper.now());
    } finally {
      keeper.close();
    }
  });
});

describe('the schema', () => {
  test('a schema newer than this host knows is refused as configuration, naming both versions', () => {
    const ws = workspace();
    try {
      openKeeper({ database: ws.db, keys: ws.keys }).close();
      const db = new Database(ws.db);
      db.prepare('INSERT INTO tokenkeep_schema (version, applied_at) VALUES (999, 0)').run();
      db.close();
      let e;
      try {
        openKeeper({ database: `sqlite:${ws.db}`, keys: ws.keys });
      } catch (caught) {
        e = caught;
      }
      assert.equal(e.class, 'configuration');
      assert.match(e.message, new RegExp(`version 999, newer than this tokenkeep knows \\(${LATEST_SCHEMA}\\)`));
    } finally {
      ws.cleanup();
    }
  });

  test('the pragmas: WAL, and the side files beside the database', () => {
    const ws = workspace();
    try {
      openKeeper({ database: ws.db, keys: ws.keys }).close();
      const db = new Database(ws.db, { readonly: true });
      assert.equal(db.pragma('journal_mode', { simple: true }), 'wal');
      const versions = db.prepare('SELECT version FROM tokenkeep_schema ORDER BY version').all();
      assert.deepEqual(versions.map((v) => v.version), Array.from({ length: LATEST_SCHEMA }, (_, i) => i + 1));
      db.close();
      assert.ok(existsSync(`${ws.db}-refresh-starts`));
      assert.ok(existsSync(`${ws.db}-audit`));
    } finally {
      ws.cleanup();
    }
  });
});

describe('token endpoints over TLS', () => {
  let ws;
  let provider;
  const openssl = spawnSync('openssl', ['version']).status === 0;

  before(async () => {
    ws = workspace();
    if (!openssl) return;
    const made = spawnSync('openssl', [
      'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
      '-keyout', `${ws.dir}/key.pem`, '-out', `${ws.dir}/cert.pem`, '-days', '2',
      '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1',
    ]);
    assert.equal(made.status, 0, String(made.stderr));
    provider = await startProvider(ws.dir, ['--tls-cert', `${ws.dir}/cert.pem`, '--tls-key', `${ws.dir}/key.pem`]);
  });

  after(async () => {
    await provider?.stop();
    ws?.cleanup();
  });

  test('an untrusted certificate is configuration and nothing is sent; ca_bundle trusts it', { skip: !openssl && 'no openssl' }, () => {
    const url = `https://127.0.0.1:${provider.port}/oauth/token`;
    ws.writeConfig(`lock_wait_ms = 4000\n${providerToml('acme', url)}`);
    let keeper = openKeeper({ database: ws.db, config: ws.config, keys: ws.keys });
    try {
      keeper.storeTokens('acme', 'alice', { access_token: 'at-a', refresh_token: 'rt-0', expires_in: 1 });
      let e;
      try {
        keeper.accessToken('acme', 'alice');
      } catch (caught) {
        e = caught;
      }
      assert.equal(e.class, 'configuration');
      assert.match(e.message, /certificate is not trusted/);
      assert.equal(provider.calls().length, 0);
    } finally {
      keeper.close();
    }
    ws.writeConfig(`lock_wait_ms = 4000\n${providerToml('acme', url, `ca_bundle = "${ws.dir}/cert.pem"`)}`);
    keeper = openKeeper({ database: ws.db, config: ws.config, keys: ws.keys });
    try {
      assert.equal(keeper.accessToken('acme', 'alice'), 'at-1');
      assert.equal(provider.calls().length, 1);
    } finally {
      keeper.close();
    }
  });

  test('HTTPS_PROXY tunnels token requests, unless NO_PROXY names the host', { skip: !openssl && 'no openssl' }, async () => {
    const proxy = await startProxy(ws.dir);
    try {
      const target = `127.0.0.1:${provider.port}`;
      for (const [user, rt, at] of [['bob', 'rt-1', 'at-2'], ['carol', 'rt-2', 'at-3']]) {
        const put = nodeCli([...cliArgs(ws), 'put', 'acme', user], {
          input: JSON.stringify({ access_token: 'x', refresh_token: rt, expires_in: 1 }),
        });
        assert.equal(put.code, 0, put.stderr);
        const env = user === 'bob' ? { HTTPS_PROXY: proxy.url } : { HTTPS_PROXY: proxy.url, NO_PROXY: 'example.com,127.0.0.1' };
        const get = nodeCli([...cliArgs(ws), 'get', 'acme', user], { env });
        assert.equal(get.code, 0, get.stderr);
        assert.equal(get.stdout, `${at}\n`);
      }
      assert.deepEqual(proxy.targets(), [target]);
    } finally {
      await proxy.stop();
    }
  });
});

describe('conversations', () => {
  let ws;
  let provider;
  let keeper;

  before(async () => {
    ws = workspace();
    provider = await startProvider(ws.dir, ['--initial', 'rt-conv']);
    ws.writeConfig(`lock_wait_ms = 4000\n${providerToml('acme', provider.url)}`);
    keeper = openKeeper({ database: ws.db, config: ws.config, keys: ws.keys });
  });

  after(async () => {
    keeper?.close();
    await provider?.stop();
    ws?.cleanup();
  });

  test('a stale token is refreshed through its row, a fresh one comes back as it was', () => {
    const now = keeper.now();
    const settings = {
      provider_tokens: {
        acme: { token: 'at-stale', refresh_token: 'rt-conv', expires_at: now - 10, scopes: [] },
      },
    };
    const out = keeper.refreshProviderTokens(settings, 'conv-1', 'alice');
    assert.equal(out.provider_tokens.acme.token, 'at-1');
    assert.equal(out.provider_tokens.acme.refresh_token, null);
    assert.equal(provider.calls().length, 1);
    const again = keeper.refreshProviderTokens(out, 'conv-1', 'alice');
    assert.equal(again.provider_tokens.acme.token, 'at-1');
    assert.equal(provider.calls().length, 1);
    const [entry] = keeper.conversationEntries('conv-1');
    assert.equal(entry.provider, 'acme');
    assert.equal(entry.userId, 'alice');
    assert.equal(keeper.resume('conv-1').provider_tokens.acme.token, 'at-1');
    assert.equal(keeper.resume('conv-unknown'), null);
    assert.equal(keeper.accessToken('acme', 'alice'), 'at-1');
  });

  test('a provider that cannot be refreshed names itself; partial results list it', () => {
    const settings = {
      provider_tokens: { nosuch: { token: 'at-x', expires_at: keeper.now() - 10, scopes: [] } },
    };
    let e;
    try {
      keeper.refreshProviderTokens(settings, 'conv-2', 'bob');
    } catch (caught) {
      e = caught;
    }
    assert.equal(e.class, 'unknown-provider');
    assert.equal(e.conversationProvider, 'nosuch');
    const partial = keeper.refreshProviderTokens(settings, 'conv-2', 'bob', { partial: true });
    assert.equal(partial.failures.length, 1);
    assert.equal(partial.failures[0].class, 'unknown-provider');
    assert.equal(partial.settings.provider_tokens.nosuch.token, 'at-x');
  });
});
