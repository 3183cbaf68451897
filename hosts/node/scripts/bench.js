#!/usr/bin/env node
// `node scripts/bench.js`: in-process `accessToken` reads of a fresh token
// through openKeeper (a fresh component instance per read, no grant cache),
// in a throwaway SQLite file: p50, p99 and reads per second.

import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openKeeper } from '../src/index.js';

const dir = mkdtempSync(join(tmpdir(), 'tokenkeep-node-bench-'));
try {
  writeFileSync(join(dir, 'config.toml'), '[providers.acme]\ntoken_url = "http://127.0.0.1:9/t"\nclient_id = "c"\nclient_secret = "s"\n');
  writeFileSync(join(dir, 'keys'), `k1=${randomBytes(32).toString('base64')}\n`, { mode: 0o600 });
  const keeper = openKeeper({ database: `sqlite:${join(dir, 'db')}`, config: join(dir, 'config.toml'), keys: join(dir, 'keys'), auditAs: null });
  keeper.storeTokens('acme', 'alice', { access_token: 'at-a', refresh_token: 'rt-a', expires_in: 36000 });
  for (let i = 0; i < 200; i++) keeper.accessToken('acme', 'alice');
  const n = 2000;
  const t = [];
  for (let i = 0; i < n; i++) {
    const s = process.hrtime.bigint();
    keeper.accessToken('acme', 'alice');
    t.push(Number(process.hrtime.bigint() - s) / 1000);
  }
  keeper.close();
  t.sort((a, b) => a - b);
  const mean = t.reduce((a, b) => a + b) / n;
  console.log(`accessToken: ${n} reads, p50 ${t[n >> 1].toFixed(0)} µs, p99 ${t[Math.floor(n * 0.99)].toFixed(0)} µs, ${(1e6 / mean).toFixed(0)} reads/s`);
} finally {
  rmSync(dir, { recursive: true, force: true });
}
