// AES-256-GCM sealing of tokens at rest, byte for byte as core/src/seal.rs:
// `version (1) || nonce (12) || ciphertext || tag (16)`, with associated data
// "tokenkeep/v1\0" then provider, user id, field label and key id, each
// prefixed by its length (u32, big-endian). Rows sealed by either host open
// in the other; a ciphertext moved to another row, field or key id does not.

import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import { isPlainName } from './keyring.js';

const VERSION = 1;
const NONCE_LEN = 12;
const TAG_LEN = 16;

const LABELS = { 'access-token': 'access_token', 'refresh-token': 'refresh_token' };
/** The field as the Rust host names it in messages (`{:?}` of `Field`). */
const DEBUG_NAMES = { 'access-token': 'AccessToken', 'refresh-token': 'RefreshToken' };

const utf8 = new TextDecoder('utf-8', { fatal: true });

/** A sealing failure: the WIT `sealing-error` variant it maps to. */
export class SealingError extends Error {
  constructor(tag, message) {
    super(message);
    this.tag = tag;
  }
}

function associatedData(provider, userId, field, keyId) {
  const parts = [provider, userId, LABELS[field], keyId].map((p) => Buffer.from(p, 'utf8'));
  const chunks = [Buffer.from('tokenkeep/v1\0', 'latin1')];
  for (const part of parts) {
    const len = Buffer.alloc(4);
    len.writeUInt32BE(part.length);
    chunks.push(len, part);
  }
  return Buffer.concat(chunks);
}

/**
 * Seals one value for (provider, user id, field, key id) with a fresh
 * nonce (`nonce` only for the shared test vectors: never reuse one).
 */
export function sealValue(key, provider, userId, field, keyId, plaintext, nonce = randomBytes(NONCE_LEN)) {
  const cipher = createCipheriv('aes-256-gcm', key, nonce, { authTagLength: TAG_LEN });
  cipher.setAAD(associatedData(provider, userId, field, keyId));
  const ct = Buffer.concat([cipher.update(Buffer.from(plaintext, 'utf8')), cipher.final()]);
  return Buffer.concat([Buffer.from([VERSION]), nonce, ct, cipher.getAuthTag()]);
}

/** Opens one value; throws a SealingError that quotes no stored bytes. */
export function openValue(key, provider, userId, field, keyId, sealed) {
  if (!key) {
    // The key id comes from the row: quoted only when it looks like one.
    throw new SealingError(
      'unknown-key',
      isPlainName(keyId)
        ? `key ${keyId} is not in the keyring`
        : 'the row names a key id that is not in the keyring',
    );
  }
  const fail = (what) => new SealingError('undecryptable', `${DEBUG_NAMES[field]}: ${what}`);
  const bytes = Buffer.from(sealed.buffer, sealed.byteOffset, sealed.byteLength);
  if (bytes.length < 1 + NONCE_LEN + TAG_LEN || bytes[0] !== VERSION) {
    throw fail('sealed value is malformed');
  }
  const nonce = bytes.subarray(1, 1 + NONCE_LEN);
  const ct = bytes.subarray(1 + NONCE_LEN, bytes.length - TAG_LEN);
  const tag = bytes.subarray(bytes.length - TAG_LEN);
  let plain;
  try {
    const decipher = createDecipheriv('aes-256-gcm', key, nonce, { authTagLength: TAG_LEN });
    decipher.setAAD(associatedData(provider, userId, field, keyId));
    decipher.setAuthTag(tag);
    plain = Buffer.concat([decipher.update(ct), decipher.final()]);
  } catch {
    throw fail('sealed value failed authentication (tampered, moved, or wrong key)');
  }
  try {
    return utf8.decode(plain);
  } catch {
    throw fail('sealed value is not UTF-8');
  } finally {
    plain.fill(0);
  }
}

/** Both tokens of a row, sealed with the keyring's active key. */
export function sealTokens(keyring, provider, userId, accessToken, refreshToken) {
  const keyId = keyring.activeId;
  const key = keyring.key(keyId);
  if (!key) {
    throw new SealingError('unknown-key', `active key ${keyId} is not in the keyring`);
  }
  return {
    keyId,
    accessToken: sealValue(key, provider, userId, 'access-token', keyId, accessToken),
    refreshToken:
      refreshToken === undefined
        ? undefined
        : sealValue(key, provider, userId, 'refresh-token', keyId, refreshToken),
  };
}

/** Opens one sealed field of the row (provider, user id). */
export function open(keyring, provider, userId, field, keyId, sealed) {
  return openValue(keyring.key(keyId), provider, userId, field, keyId, sealed);
}
