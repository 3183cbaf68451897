// The RFC 6749 section 6 refresh request and the reading of its answer, as
// core/src/provider.rs has them: the host needs the request body, the retry
// rules it holds for the component (`may_repeat`), the salvage of a rotated
// refresh token (so none leaks back), and the token-response reading of
// `tokens put`. Nothing from a body is ever quoted back but sanitised codes.

/** Longest lifetime believed from a provider: twenty years. */
const MAX_LIFETIME_SECONDS = 20n * 365n * 86400n;

/** Statuses that, without an OAuth error, refuse a refresh token. */
const BARE_REFUSAL_STATUSES = [400, 403, 410, 422];

const utf8 = new TextDecoder('utf-8', { fatal: true });

/** A failure of the provider protocol: a WIT error class and a message. */
export class ProtocolError extends Error {
  constructor(cls, message) {
    super(message);
    this.cls = cls;
  }
}

const unavailable = (m) => new ProtocolError('provider-unavailable', m);
const refusal = (m) => new ProtocolError('reauthorization-required', m);
const rejected = (m) => new ProtocolError('provider-rejected-client', m);
const invalid = (m) => new ProtocolError('invalid-provider-response', m);

/** `application/x-www-form-urlencoded` encoding of one name or value. */
export function formEncode(s) {
  const bytes = Buffer.from(String(s), 'utf8');
  let out = '';
  for (const b of bytes) {
    if (
      (b >= 0x41 && b <= 0x5a) ||
      (b >= 0x61 && b <= 0x7a) ||
      (b >= 0x30 && b <= 0x39) ||
      b === 0x2d ||
      b === 0x2e ||
      b === 0x5f ||
      b === 0x2a
    ) {
      out += String.fromCharCode(b);
    } else if (b === 0x20) {
      out += '+';
    } else {
      out += '%' + b.toString(16).toUpperCase().padStart(2, '0');
    }
  }
  return out;
}

function formDecode(s) {
  const bytes = Buffer.from(s, 'utf8');
  const out = [];
  for (let i = 0; i < bytes.length; i++) {
    const b = bytes[i];
    if (b === 0x2b) {
      out.push(0x20);
    } else if (b === 0x25) {
      const hex = bytes.subarray(i + 1, i + 3).toString('latin1');
      if (hex.length !== 2 || !/^[0-9A-Fa-f]{2}$/.test(hex)) return undefined;
      out.push(parseInt(hex, 16));
      i += 2;
    } else {
      out.push(b);
    }
  }
  try {
    return utf8.decode(Uint8Array.from(out));
  } catch {
    return undefined;
  }
}

/** The form body of a refresh request (a secret itself: it holds the token). */
export function refreshRequestBody(refreshToken, extraParams) {
  let body = 'grant_type=refresh_token&refresh_token=' + formEncode(refreshToken);
  for (const [k, v] of extraParams) {
    if (k === 'grant_type' || k === 'refresh_token') continue;
    body += '&' + formEncode(k) + '=' + formEncode(v);
  }
  return body;
}

// Rust's `char::is_whitespace` (Unicode White_Space), not JS's trim set.
const LEADING_SPACE = /^\p{White_Space}+/u;
const TRAILING_SPACE = /\p{White_Space}+$/u;
const rustTrimStart = (s) => s.replace(LEADING_SPACE, '');
const rustTrim = (s) => rustTrimStart(s).replace(TRAILING_SPACE, '');

function isPlainObject(v) {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}

function looksLikeForm(s) {
  if (!s.includes('=')) return false;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c < 0x21 || c > 0x7e) return false;
  }
  return s.startsWith('access_token=') || s.startsWith('error=') || s.includes('&access_token=');
}

/** The answer's fields, JSON or form-encoded; undefined when it is neither. */
function decodeBody(contentType, body) {
  let text;
  try {
    text = utf8.decode(body);
  } catch {
    return undefined;
  }
  const trimmed = rustTrimStart(text);
  if (trimmed.startsWith('{')) {
    try {
      const v = JSON.parse(text);
      return isPlainObject(v) ? new Map(Object.entries(v)) : undefined;
    } catch {
      return undefined;
    }
  }
  const form =
    contentType != null &&
    contentType.toLowerCase().startsWith('application/x-www-form-urlencoded');
  if (!form && !looksLikeForm(trimmed)) return undefined;
  const map = new Map();
  for (const pair of trimmed.split('&')) {
    if (pair === '') continue;
    const at = pair.indexOf('=');
    if (at < 0) return undefined;
    const k = formDecode(pair.slice(0, at));
    const v = formDecode(pair.slice(at + 1));
    if (k === undefined || v === undefined) return undefined;
    map.set(k, v);
  }
  return map.size > 0 ? map : undefined;
}

function sanitiseCode(code) {
  let clean = '';
  for (const c of code) {
    if (clean.length >= 64) break;
    if (/^[A-Za-z0-9_.-]$/.test(c)) clean += c;
  }
  return clean === '' ? 'unnamed_error' : clean;
}

function errorCode(fields) {
  const slackFailure = fields.get('ok') === false;
  const e = fields.get('error');
  if (typeof e === 'string') return sanitiseCode(e);
  if (isPlainObject(e)) {
    return typeof e.code === 'string' ? sanitiseCode(e.code) : undefined;
  }
  if ((e === null || e === undefined) && slackFailure) return 'unknown_error';
  return undefined;
}

/** Whether an answer asks to be asked again later (429, 503, `slow_down`...). */
export function asksToRetry(status, contentType, body) {
  if (status === 429 || status === 503) return true;
  const fields = decodeBody(contentType, body);
  const code = fields && errorCode(fields);
  return ['temporarily_unavailable', 'slow_down', 'ratelimited', 'rate_limited'].includes(code);
}

/** A rotated refresh token from a 2xx answer that failed to parse otherwise. */
export function salvageRefreshToken(status, contentType, body) {
  if (status < 200 || status >= 300) return undefined;
  const fields = decodeBody(contentType, body);
  if (!fields || errorCode(fields) !== undefined) return undefined;
  const r = fields.get('refresh_token');
  return typeof r === 'string' && r !== '' && Buffer.byteLength(r) <= 16 * 1024 ? r : undefined;
}

function errorOfClass(cls, code) {
  const honoured = ['reauthorization-required', 'provider-rejected-client', 'provider-unavailable'];
  return new ProtocolError(
    honoured.includes(cls) ? cls : 'invalid-provider-response',
    `provider answered ${code}`,
  );
}

/** Maps an OAuth (or provider-specific) error code onto the taxonomy. */
export function classifyErrorCode(code, status) {
  switch (code) {
    case 'invalid_grant':
    case 'bad_refresh_token':
    case 'invalid_refresh_token':
    case 'token_revoked':
    case 'token_expired':
    case 'refresh_token_expired':
    case 'expired_token':
    case 'invalid_token':
      return refusal(`provider answered ${code}`);
    case 'invalid_client':
    case 'unauthorized_client':
    case 'unsupported_grant_type':
    case 'invalid_request':
    case 'invalid_scope':
    case 'incorrect_client_credentials':
    case 'invalid_client_id':
    case 'bad_client_secret':
    case 'invalid_client_secret':
    case 'access_denied':
      return rejected(`provider answered ${code}`);
    case 'temporarily_unavailable':
    case 'server_error':
    case 'slow_down':
    case 'ratelimited':
    case 'rate_limited':
    case 'service_unavailable':
      return unavailable(`provider answered ${code}`);
    default:
      if (status >= 500 || status === 429) {
        return unavailable(`status ${status} with an unrecognised error code`);
      }
      return invalid(`unrecognised error code (status ${status})`);
  }
}

function classifyStatus(status) {
  if (status === 429 || (status >= 500 && status <= 599)) return unavailable(`status ${status}`);
  if (status === 401) return rejected('status 401');
  return invalid(`status ${status} without an OAuth error`);
}

function lifetime(v, name) {
  let secs;
  if (v === undefined || v === null) return undefined;
  if (typeof v === 'number') {
    secs = Number.isInteger(v) ? BigInt(v) : undefined;
  } else if (typeof v === 'string') {
    const t = rustTrim(v);
    secs = /^[+-]?[0-9]+$/.test(t) ? BigInt(t) : undefined;
    if (secs !== undefined && (secs > 9223372036854775807n || secs < -9223372036854775808n)) {
      secs = undefined;
    }
  }
  if (secs === 0n) return undefined;
  if (secs !== undefined && secs >= 1n && secs <= MAX_LIFETIME_SECONDS) return Number(secs);
  throw invalid(`${name} is not a sensible number of seconds`);
}

/** Splits an OAuth scope string; providers use spaces, some use commas. */
export function splitScopes(s) {
  return s.split(/[ ,]/).filter((p) => p !== '');
}

function tokenFromFields(fields) {
  const access = fields.get('access_token');
  if (access === undefined) throw invalid('no access_token');
  if (typeof access !== 'string' || access === '') {
    throw invalid('access_token is not a non-empty string');
  }
  const r = fields.get('refresh_token');
  let refreshToken;
  if (typeof r === 'string') {
    refreshToken = r === '' ? undefined : r;
  } else if (r !== undefined && r !== null) {
    throw invalid('refresh_token is not a string');
  }
  const s = fields.get('scope');
  let scopes;
  if (typeof s === 'string') {
    scopes = rustTrim(s) === '' ? undefined : splitScopes(s);
  } else if (Array.isArray(s)) {
    scopes = s.map((item) => {
      if (typeof item !== 'string') throw invalid('scope list holds a non-string');
      return item;
    });
  } else if (s !== undefined && s !== null) {
    throw invalid('scope is neither a string nor a list');
  }
  return {
    accessToken: access,
    refreshToken,
    expiresIn: lifetime(fields.get('expires_in'), 'expires_in'),
    refreshTokenExpiresIn: lifetime(fields.get('refresh_token_expires_in'), 'refresh_token_expires_in'),
    scopes,
  };
}

/**
 * Reads a token endpoint's answer: a token response, or throws a
 * ProtocolError. `providerCodes` are [code, class] pairs looked up first.
 */
export function parseTokenResponse(status, contentType, body, providerCodes = []) {
  const fields = decodeBody(contentType, body);
  const code = fields && errorCode(fields);
  if (code !== undefined) {
    const own = providerCodes.find(([c]) => c === code);
    if (own) throw errorOfClass(own[1], code);
    throw classifyErrorCode(code, status);
  }
  if (status < 200 || status >= 300) throw classifyStatus(status);
  if (!fields) {
    throw invalid(
      `status ${status}, body is neither JSON nor form-encoded (${body.length} bytes)`,
    );
  }
  return tokenFromFields(fields);
}

/** `parseTokenResponse` under the provider's rules (its codes, bare 4xx). */
export function judgeAnswer(config, status, contentType, body) {
  const html = contentType != null && contentType.toLowerCase().startsWith('text/html');
  try {
    return parseTokenResponse(status, contentType, body, config.errorCodes);
  } catch (e) {
    if (
      e instanceof ProtocolError &&
      e.cls === 'invalid-provider-response' &&
      config.bare4xxIsRefusal &&
      !html &&
      BARE_REFUSAL_STATUSES.includes(status)
    ) {
      throw refusal(`provider answered status ${status} without an OAuth error: taken as a refusal`);
    }
    throw e;
  }
}

/**
 * Whether a token request may be sent again after its outcome: the one rule
 * the component's retries and the host that enforces them share.
 * `outcome` is {answer: {status, contentType, body}} or {error: {tag}}.
 */
export function mayRepeat(outcome, config) {
  const lenient = config.reuseLeewaySeconds * 1000 >= config.retryBudgetMs;
  const unknownFateIsSafe = !config.rotatesRefreshTokens || lenient;
  if (outcome.answer) {
    const { status, contentType, body } = outcome.answer;
    let transient = false;
    try {
      judgeAnswer(config, status, contentType, body);
    } catch (e) {
      transient = e instanceof ProtocolError && e.cls === 'provider-unavailable';
    }
    return transient && (unknownFateIsSafe || asksToRetry(status, contentType, body));
  }
  switch (outcome.error.tag) {
    case 'not-sent':
      return true;
    case 'no-answer':
      return unknownFateIsSafe;
    case 'answer-unusable':
      return config.rotatesRefreshTokens && lenient;
    default:
      return false;
  }
}
