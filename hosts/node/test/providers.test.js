// The recorded answers of every catalogued provider (tests/vectors/providers)
// through this host's command: each answer maps to its token set or error
// class, the request carries what the provider wants, and a failed refresh
// loses nothing. The Rust suite runs the same files through both hosts.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import Database from 'better-sqlite3';
import { existsSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { openKeeper } from '../src/index.js';
import { Keyring } from '../src/keyring.js';
import { open } from '../src/sealing.js';
import { REPO, cliArgs, nodeCli, startProvider, workspace } from './support/harness.js';

const DIR = join(REPO, 'tests', 'vectors', 'providers');
const fixtures = existsSync(DIR)
  ? readdirSync(DIR)
      .filter((f) => f.endsWith('.json'))
      .sort()
      .map((f) => JSON.parse(readFileSync(join(DIR, f), 'utf8')))
  : [];

describe('recorded provider answers', { skip: fixtures.length === 0 && 'tests/vectors/providers is not there' }, () => {
  for (const fx of fixtures) {
    test(fx.kind, async () => {
      const ws = workspace();
      const script = join(ws.dir, 'script.json');
      writeFileSync(script, JSON.stringify(fx.answers));
      const provider = await startProvider(ws.dir, ['--script', script, '--client-id', 'dev-client']);
      try {
        const loopback = `http://127.0.0.1:${provider.port}`;
        let toml = `[providers.${fx.kind}]\nkind = "${fx.kind}"\nmax_attempts = 1\nclient_id = "dev-client"\nclient_secret = "dev-secret"\n`;
        for (const [k, v] of Object.entries(fx.config)) toml += `${k} = "${v.replace('{loopback}', loopback)}"\n`;
        ws.writeConfig(toml);
        const ring = Keyring.load(ws.keys);
        for (const [i, answer] of fx.answers.entries()) {
          const what = `${fx.kind} / ${answer.name}`;
          const user = `user-${i}`;
          const keeper = openKeeper({ database: ws.db, config: ws.config, keys: ws.keys, auditAs: null });
          const now = keeper.now();
          // An answer that reports no scopes keeps the old ones: old ones
          // there are, so that keeping can be told from clearing.
          const oldScopes = answer.expect.ok && answer.expect.ok.scopes === undefined ? ['old-scope'] : [];
          keeper.storeTokenSet(fx.kind, user, {
            accessToken: 'at-old',
            refreshToken: 'rt-old',
            accessTokenExpiresAt: now - 10,
            scopes: oldScopes,
          });
          keeper.close();
          const r = nodeCli([...cliArgs(ws), 'get', fx.kind, user]);
          assert.equal(r.stderr.includes('rt-old') || r.stdout.includes('rt-old'), false, `${what}: quoted a secret`);
          const calls = provider.calls();
          assert.equal(calls.length, i + 1, `${what}: one call`);
          const call = calls[i];
          const has = (k, v) => call.form.some(([fk, fv]) => fk === k && fv === v);
          assert.ok(has('grant_type', 'refresh_token') && has('refresh_token', 'rt-old'), what);
          for (const [k, v] of Object.entries(fx.request.params)) assert.ok(has(k, v), `${what}: parameter ${k}`);
          if (fx.request.client_auth === 'basic') {
            assert.match(call.authorization ?? '', /^Basic /, what);
            assert.equal(call.params.includes('client_secret'), false, what);
          } else {
            assert.equal(call.authorization, null, what);
            assert.ok(has('client_id', 'dev-client') && has('client_secret', 'dev-secret'), what);
          }
          const db = new Database(ws.db, { readonly: true });
          const row = db.prepare('SELECT * FROM tokenkeep_tokens WHERE provider = ? AND user_id = ?').get(fx.kind, user);
          db.close();
          const opened = (field, bytes) => open(ring, fx.kind, user, field, row.key_id, bytes);
          const near = (got, want) => (got === null || want === null ? got === want : Math.abs(got - want) <= 2);
          if (answer.expect.ok) {
            const g = answer.expect.ok;
            assert.equal(r.code, 0, `${what}: ${r.stderr}`);
            assert.equal(r.stdout, `${g.access_token}\n`, what);
            assert.equal(opened('access-token', row.access_token), g.access_token, what);
            assert.equal(opened('refresh-token', row.refresh_token), g.refresh_token === 'kept' ? 'rt-old' : g.refresh_token, what);
            assert.ok(near(row.access_token_expires_at, now + g.expires_in), `${what}: expires_at`);
            assert.ok(
              near(row.refresh_token_expires_at, g.refresh_token_expires_in == null ? null : now + g.refresh_token_expires_in),
              `${what}: refresh_token_expires_at`,
            );
            assert.deepEqual(JSON.parse(row.scopes), g.scopes ?? oldScopes, what);
            assert.equal(row.generation, 2, `${what}: persisted`);
          } else {
            assert.match(r.stderr, new RegExp(`^tokenkeep: ${answer.expect.error}: `), what);
            assert.equal(row.generation, 1, what);
            assert.equal(opened('access-token', row.access_token), 'at-old', what);
            assert.equal(opened('refresh-token', row.refresh_token), 'rt-old', what);
          }
        }
      } finally {
        await provider.stop();
        ws.cleanup();
      }
    });
  }
});
