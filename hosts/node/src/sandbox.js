// The component, transpiled by jco (`npm run build`, --instantiation sync):
// its core modules are compiled once per process, and every export call is
// served by a fresh instance with the imports of that call, as the WIT asks
// and the Rust host does. Whatever way the call ends (an answer, an error,
// a trap, a refusal), the call's transaction is rolled back unless it was
// committed, so no lock outlives the call.

import { readFileSync } from 'node:fs';
import { sandbox } from './errors.js';
import { CallContext, REFUSED, keeperImports } from './linker.js';
import { DIST_DIR } from './paths.js';
import { wasiImports } from './wasi.js';

let generated;
let loadFailure;
try {
  generated = await import(new URL('tokenkeep.js', DIST_DIR).href);
} catch (e) {
  loadFailure = e;
}

const modules = new Map();

function coreModule(name) {
  let m = modules.get(name);
  if (!m) {
    m = new WebAssembly.Module(readFileSync(new URL(name, DIST_DIR)));
    modules.set(name, m);
  }
  return m;
}

/** Throws unless the transpiled component is there (and compiles its modules). */
export function ensureComponent() {
  if (!generated) {
    throw sandbox(
      'the transpiled component is missing from hosts/node/dist: run `npm run build`' +
        (loadFailure?.code ? ` (${loadFailure.code})` : ''),
    );
  }
}

/**
 * A fresh instance. jco's output probes `WebAssembly.promising` (JSPI) ten
 * times per instantiation inside one very large function; where JSPI is
 * missing (Node 20), each probe throws a TypeError whose message V8 renders
 * by parsing that function again: 50 ms an instance instead of 0.7. While
 * the (synchronous) instantiation runs, a stand-in returns the function
 * itself, which is what the generated code falls back to anyway.
 */
function instantiate(imports) {
  if (typeof WebAssembly.promising === 'function') {
    return generated.instantiate(coreModule, imports);
  }
  WebAssembly.promising = (f) => f;
  try {
    return generated.instantiate(coreModule, imports);
  } finally {
    delete WebAssembly.promising;
  }
}

/** Both spellings of each import: versioned (as the WIT names it) and not (as jco reads it). */
function withVersions(imports) {
  const out = {};
  for (const [name, value] of Object.entries(imports)) {
    out[name] = value;
    out[`${name}@${name.startsWith('wasi:') ? '0.2.12' : '0.6.0'}`] = value;
  }
  return out;
}

/** A short message of a trap or a host failure, never a value. */
function describe(e) {
  let m = e instanceof Error ? `${e.name === 'RuntimeError' ? 'guest trapped: ' : ''}${e.message}` : 'guest trapped';
  if (/memory/i.test(m) && /grow|out of/i.test(m)) m = `guest exceeded its memory limit (${m})`;
  return m.length > 200 ? m.slice(0, 200) : m;
}

/**
 * Runs `work(exports)` against a fresh instance confined to `scope`.
 * Returns {ok: value} or {err: refresh-error variant} with the call's
 * context; throws a `sandbox` TokenkeepError on a trap or a refusal.
 */
export function call(host, scope, work) {
  ensureComponent();
  const ctx = new CallContext(host, scope);
  let outcome;
  try {
    const root = instantiate(withVersions({ ...keeperImports(ctx), ...wasiImports() }));
    try {
      outcome = { ok: work(root) };
    } catch (e) {
      if (e && Object.prototype.hasOwnProperty.call(e, 'payload') && e.constructor?.name === 'ComponentError') {
        outcome = { err: e.payload };
      } else {
        throw e;
      }
    }
  } catch (e) {
    if (ctx.refusal !== undefined) throw sandbox(`${REFUSED}: ${ctx.refusal}`);
    if (e?.name === 'TokenkeepError') throw e;
    throw sandbox(describe(e));
  } finally {
    // Whatever happened, no lock outlives the call.
    ctx.rollback();
  }
  if (ctx.refusal !== undefined) throw sandbox(`${REFUSED}: ${ctx.refusal}`);
  return { ...outcome, ctx };
}
