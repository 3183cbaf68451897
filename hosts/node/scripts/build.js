#!/usr/bin/env node
// `npm run build`: transpiles the tokenkeep component with jco into dist/
// (--instantiation sync: the host passes the imports itself and
// instantiates a fresh instance per export call), and copies the schema
// both hosts share (host/schema/sqlite/*.sql, host/schema/catalogue.json)
// beside it. TOKENKEEP_COMPONENT names another component file.
// `--if-stale` does nothing when dist/ was built from the same inputs.

import { createHash } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, '..');
const repo = resolve(root, '..', '..');
const dist = join(root, 'dist');
const component = resolve(
  process.env.TOKENKEEP_COMPONENT ||
    join(repo, 'target/wasm/wasm32-wasip2/component/tokenkeep_component.wasm'),
);
const schema = join(repo, 'host/schema');

function fail(message) {
  process.stderr.write(`build: ${message}\n`);
  process.exit(1);
}

if (!existsSync(component)) {
  fail(`no component at ${component} (build it with the Rust workspace, or set TOKENKEEP_COMPONENT)`);
}
const sqlFiles = readdirSync(join(schema, 'sqlite')).filter((f) => f.endsWith('.sql')).sort();
const inputs = [component, join(schema, 'catalogue.json'), ...sqlFiles.map((f) => join(schema, 'sqlite', f))];
const digest = createHash('sha256');
for (const file of inputs) {
  digest.update(file).update('\0').update(readFileSync(file)).update('\0');
}
const stamp = digest.digest('hex');
const stampFile = join(dist, 'build-stamp');

if (process.argv.includes('--if-stale') && existsSync(stampFile) && readFileSync(stampFile, 'utf8') === stamp) {
  process.exit(0);
}

rmSync(dist, { recursive: true, force: true });
mkdirSync(dist, { recursive: true });
const jco = join(root, 'node_modules', '@bytecodealliance', 'jco', 'dist', 'jco.js');
if (!existsSync(jco)) fail('jco is not installed: run `npm install` in hosts/node');
execFileSync(
  process.execPath,
  [jco, 'transpile', component, '--out-dir', dist, '--name', 'tokenkeep', '--instantiation', 'sync', '--no-typescript', '--quiet'],
  { stdio: ['ignore', 'inherit', 'inherit'] },
);
mkdirSync(join(dist, 'schema', 'sqlite'), { recursive: true });
copyFileSync(join(schema, 'catalogue.json'), join(dist, 'schema', 'catalogue.json'));
for (const f of sqlFiles) copyFileSync(join(schema, 'sqlite', f), join(dist, 'schema', 'sqlite', f));
writeFileSync(join(dist, 'package.json'), '{"type": "module"}\n');
writeFileSync(stampFile, stamp);
process.stdout.write(`built dist/ from ${component}\n`);
