// The shared refresh-flow vectors (tests/vectors/flows.json) through this
// host's command: each caller its own process, the provider scripted, the
// row checked after. The Rust suite runs the same file through both hosts.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import Database from 'better-sqlite3';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { openKeeper } from '../src/index.js';
import { Keyring } from '../src/keyring.js';
import { open } from '../src/sealing.js';
import { REPO, cliArgs, spawnCli, startProvider, workspace } from './support/harness.js';

const FILE = join(REPO, 'tests', 'vectors', 'flows.json');

/** A CLI run as the vectors name outcomes: {ok: token} or {error: class}. */
function outcome(r) {
  if (r.code === 0) {
    assert.equal(r.stderr, '', 'quiet on success');
    return { ok: r.stdout.trimEnd() };
  }
  assert.equal(r.stdout, '', 'nothing on stdout on failure');
  const lines = r.stderr.trimEnd().split('\n');
  assert.equal(lines.length, 1, `one line: ${r.stderr}`);
  const m = /^tokenkeep: ([a-z-]+): /.exec(lines[0]);
  assert.ok(m, `not a tokenkeep error line: ${lines[0]}`);
  return { error: m[1] };
}

function admits(want, got) {
  if (want.one_of) return got.ok !== undefined && want.one_of.includes(got.ok);
  return JSON.stringify(want) === JSON.stringify(got);
}

describe('flow vectors', { skip: !existsSync(FILE) && 'tests/vectors/flows.json is not there' }, () => {
  const flows = existsSync(FILE) ? JSON.parse(readFileSync(FILE, 'utf8')) : { scenarios: [] };

  for (const s of flows.scenarios) {
    test(s.name, async () => {
      const ws = workspace();
      const script = join(ws.dir, 'script.json');
      writeFileSync(script, JSON.stringify(s.answers));
      const provider = await startProvider(ws.dir, ['--script', script, '--client-id', 'dev-client']);
      try {
        ws.writeConfig(
          `[providers.acme]\ntoken_url = "${provider.url}"\nclient_id = "dev-client"\nclient_secret = "dev-secret"\n${s.provider ?? ''}\n`,
        );
        const keeper = openKeeper({ database: ws.db, config: ws.config, keys: ws.keys, auditAs: null });
        try {
          if (s.stored) {
            keeper.storeTokenSet('acme', 'u', {
              accessToken: s.stored.access_token,
              refreshToken: s.stored.refresh_token ?? undefined,
              accessTokenExpiresAt: keeper.now() + s.stored.access_token_expires_in,
              scopes: ['repo', 'read:user'],
            });
            const db = new Database(ws.db);
            db.prepare('UPDATE tokenkeep_tokens SET obtained_at = obtained_at - ?').run(s.stored.obtained_ago);
            db.close();
          }
        } finally {
          keeper.close();
        }
        const args = [...cliArgs(ws), 'get', 'acme', 'u'];
        if (s.min_remaining_seconds) args.push('--min-remaining', String(s.min_remaining_seconds));
        const runs = await Promise.all(Array.from({ length: s.callers }, () => spawnCli('node', args)));
        for (const r of runs) {
          const got = outcome(r);
          assert.ok(admits(s.expect.result, got), `got ${JSON.stringify(got)}, want ${JSON.stringify(s.expect.result)}`);
        }
        const calls = provider.calls();
        assert.equal(calls.length, s.expect.provider_calls, 'provider calls');
        if (s.expect.refresh_tokens_sent) {
          assert.deepEqual(calls.map((c) => c.refresh_token ?? ''), s.expect.refresh_tokens_sent);
        }
        const after = s.expect.stored;
        if (after) {
          const store = new Database(ws.db, { readonly: true });
          const row = store.prepare("SELECT * FROM tokenkeep_tokens WHERE provider = 'acme' AND user_id = 'u'").get();
          store.close();
          assert.ok(row, 'a row');
          const ring = Keyring.load(ws.keys);
          const openField = (field, bytes) => open(ring, 'acme', 'u', field, row.key_id, bytes);
          if (after.access_token !== undefined) assert.equal(openField('access-token', row.access_token), after.access_token);
          if (after.refresh_token !== undefined) {
            const rt = row.refresh_token === null ? null : openField('refresh-token', row.refresh_token);
            assert.equal(rt, after.refresh_token, 'refresh token');
          }
          if (after.generation !== undefined) assert.equal(row.generation, after.generation, 'generation');
          if (after.failed_attempts !== undefined) assert.equal(row.failed_attempts, after.failed_attempts, 'failed attempts');
          if (after.last_failure !== undefined) assert.equal(row.last_failure, after.last_failure, 'last failure');
          if (after.access_token_expires_in !== undefined) {
            const left = row.access_token_expires_at - Math.floor(Date.now() / 1000);
            assert.ok(Math.abs(left - after.access_token_expires_in) <= 2, `expires in ${left}`);
          }
        }
      } finally {
        await provider.stop();
        ws.cleanup();
      }
    });
  }
});
