// The imports as a hostile component would call them: every reach beyond
// the export call's rows is refused (the WIT `refused` variant, `denied`
// for a token request), later imports of the call are refused too, and the
// call's transaction is rolled back at once.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import Database from 'better-sqlite3';
import { parseConfig } from '../src/config.js';
import { openKeeper } from '../src/index.js';
import { Keyring } from '../src/keyring.js';
import { CallContext, REFUSED, Scope, keeperImports } from '../src/linker.js';
import { call } from '../src/sandbox.js';
import { SqliteStore } from '../src/storage.js';
import { workspace } from './support/harness.js';

const refusedWith = (fn, tag = 'refused') => {
  try {
    fn();
  } catch (e) {
    assert.equal(e.tag, tag);
    assert.ok(String(e.val).startsWith(REFUSED), e.val);
    return e.val;
  }
  assert.fail('not refused');
};

describe('a call confined to its rows', () => {
  let ws;
  let host;

  before(() => {
    ws = workspace();
    ws.writeConfig('[providers.acme]\ntoken_url = "http://127.0.0.1:9/t"\nclient_id = "c"\ntimeout_ms = 1000\n');
    const keeper = openKeeper({ database: ws.db, config: ws.config, keys: ws.keys, auditAs: null });
    keeper.storeTokens('acme', 'alice', { access_token: 'at-a', refresh_token: 'rt-a', expires_in: 3600, scope: 's' });
    keeper.storeTokens('acme', 'bob', { access_token: 'at-b', refresh_token: 'rt-b', expires_in: 3600, scope: 's' });
    keeper.storeTokens('acme', 'carl', { access_token: 'at-c', refresh_token: 'rt-c', expires_in: 1 });
    keeper.storeTokens('acme', 'dora', { access_token: 'at-d', expires_in: 1 });
    keeper.close();
    host = {
      store: SqliteStore.open(ws.db, { lockWaitMs: 2000 }),
      keyring: Keyring.load(ws.keys),
      now: () => Math.floor(Date.now() / 1000),
      config: parseConfig(`lock_wait_ms = 2000\n[providers.acme]\ntoken_url = "http://127.0.0.1:9/t"\nclient_id = "c"\ntimeout_ms = 1000\n`),
    };
  });

  after(() => {
    host?.store.close();
    ws?.cleanup();
  });

  const importsFor = (scope) => {
    const ctx = new CallContext(host, scope);
    const imports = keeperImports(ctx);
    return {
      ctx,
      storage: imports['tokenkeep:oauth/storage'],
      sealing: imports['tokenkeep:oauth/sealing'],
      endpoint: imports['tokenkeep:oauth/token-endpoint'],
    };
  };

  const lockIsFree = () => {
    const probe = new Database(ws.db, { timeout: 0 });
    try {
      probe.exec('BEGIN IMMEDIATE');
      probe.exec('ROLLBACK');
      return true;
    } catch {
      return false;
    } finally {
      probe.close();
    }
  };

  test('reading another row is refused, and so is everything after it', () => {
    const { ctx, storage } = importsFor(Scope.row('acme', 'alice'));
    assert.equal(storage.read('acme', 'alice').row.userId, 'alice');
    refusedWith(() => storage.read('acme', 'bob'));
    assert.equal(ctx.refusal, "a row outside the call's scope");
    refusedWith(() => storage.read('acme', 'alice'));
  });

  test('opening another row\'s ciphertext, or sealing a refresh token as an access token, is refused', () => {
    const { storage: s1 } = importsFor(Scope.row('acme', 'bob'));
    const bob = s1.read('acme', 'bob').row;
    const { sealing } = importsFor(Scope.row('acme', 'alice'));
    refusedWith(() => sealing.open('acme', 'bob', 'access-token', bob.keyId, bob.accessToken));
    const second = importsFor(Scope.row('acme', 'alice'));
    const alice = second.storage.read('acme', 'alice').row;
    const rt = second.sealing.open('acme', 'alice', 'refresh-token', alice.keyId, alice.refreshToken);
    assert.equal(rt, 'rt-a');
    refusedWith(() => second.sealing.sealTokens('acme', 'alice', rt, undefined));
  });

  test('scans outside a listing, beyond the page, and opening in a listing are refused', () => {
    refusedWith(() => importsFor(Scope.row('acme', 'alice')).storage.listRows(undefined, 10));
    const page = importsFor(Scope.listing(undefined, 5));
    assert.equal(page.storage.listRows(undefined, 5).length, 4);
    refusedWith(() => importsFor(Scope.listing(undefined, 5)).storage.listRows(undefined, 6));
    refusedWith(() => importsFor(Scope.listing(undefined, 5)).storage.listRows({ provider: 'acme', userId: 'alice' }, 5));
    const row = page.storage.listRows(undefined, 5)[0];
    refusedWith(() => page.sealing.open('acme', row.userId, 'access-token', row.keyId, row.accessToken));
    refusedWith(() => importsFor(Scope.listing(undefined, 5)).storage.begin());
  });

  test('writes: none in a call that only reads, none beside the locked row', () => {
    const { storage } = importsFor(Scope.row('acme', 'alice'));
    const row = storage.read('acme', 'alice').row;
    refusedWith(() => storage.upsert(row));
    const writer = importsFor(Scope.writableRow('acme', 'alice'));
    refusedWith(() => writer.storage.delete('acme', 'bob'));
    const locker = importsFor(Scope.writableRow('acme', 'alice'));
    const txn = locker.storage.begin();
    txn.loadForUpdate('acme', 'alice');
    refusedWith(() => locker.storage.delete('acme', 'alice'));
    assert.ok(lockIsFree(), 'the refusal rolled the transaction back');
  });

  test('a transaction locks one row; a second row, a second transaction, a dishonest write are refused', () => {
    const a = importsFor(Scope.rows([{ provider: 'acme', userId: 'alice' }, { provider: 'acme', userId: 'bob' }], undefined, false));
    const txn = a.storage.begin();
    const read = txn.loadForUpdate('acme', 'alice');
    assert.equal(lockIsFree(), false);
    refusedWith(() => txn.loadForUpdate('acme', 'bob'));
    assert.ok(lockIsFree());

    const b = importsFor(Scope.row('acme', 'alice'));
    const t2 = b.storage.begin();
    refusedWith(() => b.storage.begin());

    const c = importsFor(Scope.row('acme', 'alice'));
    const t3 = c.storage.begin();
    const locked = t3.loadForUpdate('acme', 'alice').row;
    // The next generation without a token request: a rewrite of the row.
    refusedWith(() => t3.compareAndSet({ ...locked, generation: locked.generation + 1n }, locked.generation));
    assert.ok(lockIsFree());

    const d = importsFor(Scope.row('acme', 'alice'));
    const t4 = d.storage.begin();
    const row = t4.loadForUpdate('acme', 'alice').row;
    // Bookkeeping only (the failure count): allowed, and committed.
    const health = { ...row.health, failedAttempts: row.health.failedAttempts + 1 };
    assert.equal(t4.compareAndSet({ ...row, health }, row.generation), true);
    t4.commit();
    assert.ok(lockIsFree());
    assert.equal(read.row.userId, 'alice');
    t2[Symbol.dispose]();
  });

  test('a token request the host denied brings nothing: the next generation after it is refused', () => {
    const { storage, endpoint } = importsFor(Scope.row('acme', 'dora'));
    const txn = storage.begin();
    const locked = txn.loadForUpdate('acme', 'dora').row;
    // No refresh token: denied, and nothing sent.
    assert.throws(() => endpoint.requestRefresh(txn), (e) => e.tag === 'denied');
    refusedWith(() => txn.compareAndSet({ ...locked, generation: locked.generation + 1n }, locked.generation));
    assert.ok(lockIsFree());
  });

  test('a token request without a locked row is denied and ends the call', () => {
    const { ctx, storage, endpoint } = importsFor(Scope.row('acme', 'alice'));
    const txn = storage.begin();
    refusedWith(() => endpoint.requestRefresh(txn), 'denied');
    assert.equal(ctx.refusal, 'a refresh without a locked row');
    txn[Symbol.dispose]();
  });

  test('another conversation is refused', () => {
    const { storage } = importsFor(Scope.rows([{ provider: 'acme', userId: 'alice' }], 'conv-1', true));
    assert.deepEqual(storage.conversationEntries('conv-1'), []);
    refusedWith(() => storage.conversationEntries('conv-2'));
  });

  test('a component that traps holding the lock: the call fails as sandbox, the lock is released', () => {
    // The host fails under the component while it holds the row lock (in
    // its token request): a trap, as far as the instance is concerned.
    class Trapping extends Map {
      get(name) {
        if (!lockIsFree()) throw new Error('the host failed under the component');
        return super.get(name);
      }
    }
    const trapping = { ...host, config: { ...host.config, providers: new Trapping(host.config.providers) } };
    let e;
    try {
      call(trapping, Scope.row('acme', 'carl'), (k) => k.tokenStore.ensureFresh('acme', 'carl'));
    } catch (caught) {
      e = caught;
    }
    assert.equal(e?.class, 'sandbox');
    assert.match(e.message, /the host failed under the component/);
    assert.ok(lockIsFree());
  });

  test('dropping a transaction rolls it back and releases the lock', () => {
    const { ctx, storage } = importsFor(Scope.row('acme', 'alice'));
    const txn = storage.begin();
    txn.loadForUpdate('acme', 'alice');
    assert.equal(lockIsFree(), false);
    txn[Symbol.dispose]();
    assert.ok(lockIsFree());
    assert.equal(ctx.live, undefined);
    // And so does the end of the call, whatever the component did.
    const other = importsFor(Scope.row('acme', 'alice'));
    other.storage.begin().loadForUpdate('acme', 'alice');
    assert.equal(lockIsFree(), false);
    other.ctx.rollback();
    assert.ok(lockIsFree());
  });
});
