// Data-encryption keys (host/src/keyring.rs): `id=base64(32 bytes)` entries,
// one per line in a key file or comma-separated in TOKENKEEP_KEYS; the first
// is active, the others still open the rows they sealed. Key bytes never
// leave this module but into node:crypto, and no message quotes them.

import { randomBytes } from 'node:crypto';
import { closeSync, fsyncSync, mkdirSync, openSync, readFileSync, writeSync } from 'node:fs';
import { dirname } from 'node:path';
import { configuration } from './errors.js';

const KEY_ID = /^[A-Za-z0-9._-]{1,64}$/;
const BASE64 = /^[A-Za-z0-9+/]*={0,2}$/;

/** Whether `name` is 1-64 characters of [A-Za-z0-9._-] (`is_plain_name`). */
export const isPlainName = (name) => typeof name === 'string' && KEY_ID.test(name);

/** Standard base64 with padding, strictly (as the Rust host's decoder reads it). */
function decodeBase64(text) {
  if (text.length % 4 !== 0 || !BASE64.test(text)) return undefined;
  const bytes = Buffer.from(text, 'base64');
  // Non-canonical trailing bits are refused by the Rust decoder too.
  return bytes.toString('base64') === text ? bytes : undefined;
}

export class Keyring {
  #active;
  #keys;

  constructor(active, keys) {
    this.#active = active;
    this.#keys = keys;
  }

  /** Parses `id=base64` entries separated by newlines or commas. */
  static parse(text) {
    let active;
    const keys = new Map();
    for (const raw of String(text).split(/[\n,]/)) {
      const entry = raw.trim();
      if (entry === '' || entry.startsWith('#')) continue;
      const at = entry.indexOf('=');
      if (at < 0) throw configuration('key entries must be id=base64');
      const id = entry.slice(0, at).trim();
      if (!isPlainName(id)) {
        throw configuration('key ids must be 1-64 characters of [A-Za-z0-9._-]');
      }
      const bytes = decodeBase64(entry.slice(at + 1).trim());
      if (!bytes) throw configuration(`key ${id} is not valid base64`);
      if (bytes.length !== 32) {
        throw configuration(`key ${id} must be 32 bytes, not ${bytes.length}`);
      }
      if (keys.has(id)) throw configuration(`key ${id} is listed twice`);
      keys.set(id, bytes);
      active ??= id;
    }
    if (active === undefined) throw configuration('the keyring holds no key');
    return new Keyring(active, keys);
  }

  /** Reads a key file. */
  static load(path) {
    let text;
    try {
      text = readFileSync(path, 'utf8');
    } catch (e) {
      throw configuration(`cannot read key file ${path}: ${e.code ?? 'error'}`);
    }
    return Keyring.parse(text);
  }

  /** Creates a key file holding one new random key, readable by its owner only. */
  static create(path) {
    const text = `k1=${randomBytes(32).toString('base64')}\n`;
    try {
      mkdirSync(dirname(path), { recursive: true });
    } catch (e) {
      throw configuration(`cannot create ${dirname(path)}: ${e.code ?? 'error'}`);
    }
    let fd;
    try {
      fd = openSync(path, 'wx', 0o600);
    } catch (e) {
      throw configuration(`cannot create key file ${path}: ${e.code ?? 'error'}`);
    }
    try {
      writeSync(fd, text);
      fsyncSync(fd);
    } catch (e) {
      throw configuration(`cannot write key file ${path}: ${e.code ?? 'error'}`);
    } finally {
      closeSync(fd);
    }
    return Keyring.parse(text);
  }

  /** The id new writes are sealed with. */
  get activeId() {
    return this.#active;
  }

  /** A key's bytes by id, or undefined. */
  key(id) {
    return this.#keys.get(id);
  }

  /** All key ids. */
  ids() {
    return [...this.#keys.keys()].sort();
  }

  // Never show key bytes, whatever inspects the object.
  toJSON() {
    return { active: this.#active, ids: this.ids() };
  }

  [Symbol.for('nodejs.util.inspect.custom')]() {
    return `Keyring { active: ${this.#active}, ids: [${this.ids().join(', ')}] }`;
  }
}
