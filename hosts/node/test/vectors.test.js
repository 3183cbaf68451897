// The shared test vectors every host must answer the same way
// (tests/vectors): validity and classification through the component on a
// fixed clock, and sealing to the byte. The providers and flows vectors run
// through this host's command from the Rust suite (tests/vectors.rs).

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { openKeeper } from '../src/index.js';
import { SealingError, openValue, sealValue } from '../src/sealing.js';
import { REPO, workspace } from './support/harness.js';

const VECTORS = join(REPO, 'tests', 'vectors');
const load = (name) => JSON.parse(readFileSync(join(VECTORS, name), 'utf8'));
const missing = (name) => !existsSync(join(VECTORS, name)) && `tests/vectors/${name} is not there`;

describe('validity vectors', { skip: missing('validity.json') }, () => {
  let ws;
  let keeper;
  let v;

  before(() => {
    v = load('validity.json');
    ws = workspace();
    keeper = openKeeper({ database: ws.db, keys: ws.keys, auditAs: null, clock: () => v.now });
  });

  after(() => {
    keeper?.close();
    ws?.cleanup();
  });

  test('every case gives the expected answers', () => {
    assert.ok(v.cases.length >= 20, `${v.cases.length} cases`);
    for (const c of v.cases) {
      const r = c.record;
      const record = {
        provider: 'acme',
        userId: 'u',
        tokens: {
          accessToken: 'at',
          refreshToken: r.refresh_token ? 'rt' : undefined,
          accessTokenExpiresAt: r.access_token_expires_in === null ? undefined : v.now + r.access_token_expires_in,
          refreshTokenExpiresAt:
            r.refresh_token_expires_in === null || r.refresh_token_expires_in === undefined
              ? undefined
              : v.now + r.refresh_token_expires_in,
          scopes: [],
        },
        obtainedAt: v.now - r.obtained_ago,
        generation: 1,
        health: { failedAttempts: 0, lastFailure: r.last_failure ?? undefined },
      };
      const skew = c.clock_skew_seconds ?? v.defaults.clock_skew_seconds;
      const threshold = c.refresh_threshold_seconds ?? v.defaults.refresh_threshold_seconds;
      const got = {
        access_token_valid: keeper.isAccessTokenValid(record, skew),
        refresh_token_valid: keeper.isRefreshTokenValid(record),
        state: keeper.classify(record, threshold),
      };
      assert.deepEqual(got, c.expect, c.name);
    }
  });
});

describe('sealing vectors', { skip: missing('sealing.json') }, () => {
  const v = missing('sealing.json') ? undefined : load('sealing.json');
  const key = v && Buffer.from(v.key_hex, 'hex');
  const field = (label) => ({ access_token: 'access-token', refresh_token: 'refresh-token' })[label];
  const openWith = (b, sealed) => openValue(key, b.provider, b.user_id, field(b.field), b.key_id, sealed);

  test('each case seals to the byte and opens back', () => {
    for (const c of v.cases) {
      const b = c.binding;
      const sealed = sealValue(key, b.provider, b.user_id, field(b.field), b.key_id, c.plaintext, Buffer.from(c.nonce, 'hex'));
      assert.equal(sealed.toString('hex'), c.sealed, c.name);
      assert.equal(openWith(b, Buffer.from(c.sealed, 'hex')), c.plaintext, c.name);
    }
  });

  test('moved, relabelled and tampered values do not open', () => {
    for (const r of v.refused) {
      const sealed = Buffer.from(v.cases[r.sealed_from].sealed, 'hex');
      assert.throws(() => openWith(r.binding, sealed), SealingError, r.name);
    }
    for (const t of v.tampered) {
      assert.throws(() => openWith(v.cases[0].binding, Buffer.from(t.sealed, 'hex')), SealingError, t.name);
    }
  });
});
