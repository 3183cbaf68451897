// Typed errors: the WIT `error-class` names plus the host-only `sandbox`,
// with the Rust host's messages (host/src/error.rs) and the CLI's exit codes.
// No message ever carries a token, a client secret, a key or a provider body.

/** Exit code per class, as the Rust CLI documents them (README, "Exit codes"). */
export const EXIT_CODES = Object.freeze({
  'not-found': 3,
  'reauthorization-required': 4,
  'provider-unavailable': 5,
  'provider-rejected-client': 6,
  'scope-mismatch': 7,
  'lock-timeout': 8,
  storage: 9,
  decryption: 10,
  'invalid-provider-response': 11,
  'unknown-provider': 12,
  'invalid-input': 13,
  configuration: 14,
  sandbox: 15,
  'egress-denied': 16,
});

/** The WIT `error-class` enum, in its order (`ErrorClass::ALL`). */
export const ERROR_CLASSES = Object.freeze([
  'not-found',
  'reauthorization-required',
  'provider-unavailable',
  'provider-rejected-client',
  'scope-mismatch',
  'lock-timeout',
  'storage',
  'decryption',
  'invalid-provider-response',
  'unknown-provider',
  'invalid-input',
  'egress-denied',
  'configuration',
]);

// How each class reads (the Rust host's `Display`), given its detail.
export const PREFIX = Object.freeze({
  'reauthorization-required': 're-authorisation required: ',
  'provider-unavailable': 'provider unavailable: ',
  'provider-rejected-client': 'provider rejected the client: ',
  storage: 'storage: ',
  decryption: 'decryption failed: ',
  'invalid-provider-response': 'invalid provider response: ',
  'unknown-provider': 'unknown provider: ',
  'invalid-input': 'invalid input: ',
  'egress-denied': 'egress denied: ',
  configuration: 'configuration: ',
  sandbox: 'sandbox: ',
});

function render(cls, detail, extra) {
  switch (cls) {
    case 'not-found':
      return `no token stored for ${extra.provider ?? ''}/${extra.userId ?? ''}`;
    case 'scope-mismatch':
      return `scope mismatch: provider dropped ${(extra.missingScopes ?? []).join(' ')}`;
    case 'lock-timeout':
      return "lock timeout: another runtime held the token's lock longer than the lock wait";
    default:
      return `${PREFIX[cls] ?? `${cls}: `}${detail}`;
  }
}

/**
 * Every failure of the Node host: `.class` is the class name (the WIT
 * `error-class` case, or `sandbox`), `.exitCode` the CLI's exit code.
 */
export class TokenkeepError extends Error {
  constructor(cls, detail = '', extra = {}) {
    if (!(cls in EXIT_CODES)) {
      throw new TypeError(`unknown error class ${cls}`);
    }
    super(render(cls, String(detail), extra));
    this.name = 'TokenkeepError';
    Object.defineProperty(this, 'class', { value: cls, enumerable: true });
    this.exitCode = EXIT_CODES[cls];
    /** The message without its class's words (what the component or host said). */
    this.detail = String(detail);
    if (cls === 'not-found') {
      this.provider = extra.provider ?? '';
      this.userId = extra.userId ?? '';
    }
    if (cls === 'scope-mismatch') {
      this.missingScopes = [...(extra.missingScopes ?? [])];
    }
    if (extra.conversationProvider !== undefined) {
      this.conversationProvider = extra.conversationProvider;
    }
  }
}

/** Shorthands for the host's own errors. */
export const configuration = (m) => new TokenkeepError('configuration', m);
export const storage = (m) => new TokenkeepError('storage', m);
export const sandbox = (m) => new TokenkeepError('sandbox', m);
export const invalidInput = (m) => new TokenkeepError('invalid-input', m);
export const lockTimeout = () => new TokenkeepError('lock-timeout');
