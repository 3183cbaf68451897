// No token, refresh token, client secret or key appears on standard output
// (but the access token `get` prints), standard error, or in an error.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import Database from 'better-sqlite3';
import { inspect } from 'node:util';
import { parseConfig } from '../src/config.js';
import { Keyring } from '../src/keyring.js';
import { openKeeper } from '../src/index.js';
import { cliArgs, nodeCli, startProvider, workspace } from './support/harness.js';

const ACCESS = 'AT-sekrit-access-7f3a';
const REFRESH = 'RT-sekrit-refresh-9c1e';
const CLIENT_SECRET = 'CS-sekrit-client-4b2d';

describe('secrets stay out of every output', () => {
  let ws;
  const providers = {};
  const secrets = () => [ACCESS, REFRESH, CLIENT_SECRET, ws.key, 'rt-1', 'at-1'];

  const clean = (text, what) => {
    for (const s of secrets()) assert.equal(text.includes(s), false, `${what} quotes a secret`);
  };

  before(async () => {
    ws = workspace();
    for (const mode of ['invalid_grant', 'status:500', 'garbage', 'status:401']) {
      providers[mode] = await startProvider(ws.dir, ['--mode', mode]);
    }
    let text = 'lock_wait_ms = 5000\n';
    for (const [mode, p] of Object.entries(providers)) {
      const name = mode.replace(':', '-').replace('_', '-');
      text += `[providers.${name}]\ntoken_url = "${p.url}"\nclient_id = "cid"\nclient_secret = "${CLIENT_SECRET}"\ntimeout_ms = 2000\nmax_attempts = 1\n`;
    }
    ws.writeConfig(text);
  });

  after(async () => {
    for (const p of Object.values(providers)) await p.stop();
    ws?.cleanup();
  });

  test('failed refreshes, through the CLI: one line on stderr, no secret', () => {
    const expected = {
      'invalid-grant': [4, 'reauthorization-required'],
      'status-500': [5, 'provider-unavailable'],
      garbage: [11, 'invalid-provider-response'],
      'status-401': [6, 'provider-rejected-client'],
    };
    for (const [name, [code, cls]] of Object.entries(expected)) {
      const put = nodeCli([...cliArgs(ws), 'put', name, 'alice'], {
        input: JSON.stringify({ access_token: ACCESS, refresh_token: REFRESH, expires_in: 1 }),
      });
      assert.equal(put.code, 0, put.stderr);
      clean(put.stdout + put.stderr, `put ${name}`);
      const get = nodeCli([...cliArgs(ws), 'get', name, 'alice']);
      assert.equal(get.code, code, `${name}: ${get.stderr}`);
      assert.equal(get.stdout, '');
      assert.match(get.stderr, new RegExp(`^tokenkeep: ${cls}: [^\\n]+\\n$`));
      clean(get.stderr, `get ${name}`);
    }
  });

  test('a decryption failure and a malformed token response quote nothing', () => {
    nodeCli([...cliArgs(ws), 'put', 'garbage', 'carol'], {
      input: JSON.stringify({ access_token: ACCESS, refresh_token: REFRESH, expires_in: 3600 }),
    });
    // The refresh token's ciphertext moved into the access token's column.
    const db = new Database(ws.db);
    const row = db.prepare("SELECT refresh_token FROM tokenkeep_tokens WHERE user_id = 'carol'").get();
    db.prepare("UPDATE tokenkeep_tokens SET access_token = ? WHERE user_id = 'carol'").run(row.refresh_token);
    db.close();
    const get = nodeCli([...cliArgs(ws), 'get', 'garbage', 'carol']);
    assert.equal(get.code, 10);
    clean(get.stdout + get.stderr, 'decryption');
    const put = nodeCli([...cliArgs(ws), 'put', 'garbage', 'bob'], {
      input: `{"access_token": "${ACCESS}", "refresh_token": "${REFRESH}", "expires_in": "${CLIENT_SECRET}"}`,
    });
    assert.equal(put.code, 13);
    clean(put.stdout + put.stderr, 'put');
  });

  test('errors, keepers, configurations and keyrings show no secret when inspected', () => {
    const keeper = openKeeper({ database: ws.db, config: ws.config, keys: ws.keys });
    try {
      let e;
      try {
        keeper.accessToken('invalid-grant', 'alice');
      } catch (caught) {
        e = caught;
      }
      assert.equal(e.class, 'reauthorization-required');
      for (const shown of [e.message, e.detail, e.stack, JSON.stringify(e), inspect(e, { depth: 5 }), inspect(keeper, { depth: 5 })]) {
        clean(String(shown), 'an error or the keeper');
      }
    } finally {
      keeper.close();
    }
    const config = parseConfig(`[providers.acme]\ntoken_url = "https://a.example/t"\nclient_id = "a"\nclient_secret = "${CLIENT_SECRET}"\n`);
    const provider = config.providers.get('acme');
    assert.equal(provider.clientSecret, CLIENT_SECRET);
    clean(JSON.stringify(provider) + inspect(config, { depth: 5 }), 'the configuration');
    const ring = Keyring.parse(`k1=${ws.key}`);
    clean(JSON.stringify(ring) + inspect(ring, { depth: 5 }), 'the keyring');
  });

  test('configuration errors say where, never what', () => {
    for (const text of [
      `[providers.x]\nclient_secret = "${CLIENT_SECRET}" garbage\n`,
      `[providers.x]\ntoken_url = "https://a.example/t"\nclient_id = "a"\nclient_secret = 9876543210\n`,
    ]) {
      let e;
      try {
        parseConfig(text);
      } catch (caught) {
        e = caught;
      }
      assert.equal(e.class, 'configuration');
      assert.equal(e.message.includes(CLIENT_SECRET) || e.message.includes('9876543210'), false, e.message);
    }
  });
});
