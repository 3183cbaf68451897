// The one request the component may have sent (host/src/token_endpoint.rs):
// a refresh of the row its transaction holds locked, built by the host from
// the row and the configuration alone. The refresh start is recorded
// durably (in `<database>-refresh-starts`) before the request leaves; the
// body is `grant_type=refresh_token`, the row's own refresh token, the
// configured parameters and the client credentials (form body or HTTP
// Basic), POSTed to the configured token URL within the provider's total
// time (connect to last byte) and size bound.

import { postSync } from './http_client.js';
import { formEncode, refreshRequestBody } from './protocol.js';

/** RFC 6749 section 2.3.1: in the body, or HTTP Basic over the form-encoded pair. */
export function attachClientCredentials(provider, form, headers) {
  const secret = provider.clientSecret;
  if (provider.clientAuth === 'basic' && secret !== undefined) {
    const pair = `${formEncode(provider.clientId)}:${formEncode(secret)}`;
    headers.Authorization = `Basic ${Buffer.from(pair, 'utf8').toString('base64')}`;
    return form;
  }
  let out = form;
  const push = (k, v) => {
    out += `${out === '' ? '' : '&'}${k}=${formEncode(v)}`;
  };
  push('client_id', provider.clientId);
  if (secret !== undefined) push('client_secret', secret);
  return out;
}

/**
 * Sends the refresh of `row` (locked by `txn`) with its opened refresh
 * token: `{answer}` or `{error: {tag, val}}` (a WIT `request-error`).
 */
export function requestRefresh(provider, row, txn, refreshToken, now) {
  // Durably, before the request leaves: if this runtime dies before its
  // commit, the next one can tell a lost rotation from a revocation.
  try {
    txn.startRefresh(row.provider, row.userId, row.generation, now);
  } catch (e) {
    return { error: { tag: 'not-sent', val: `the refresh could not be started: ${e.message}` } };
  }
  const headers = {
    'Content-Type': 'application/x-www-form-urlencoded',
    Accept: 'application/json',
  };
  const form = attachClientCredentials(
    provider,
    refreshRequestBody(refreshToken, provider.extraParams),
    headers,
  );
  return postSync({
    url: provider.tokenUrl,
    headers,
    body: Buffer.from(form, 'utf8'),
    timeoutMs: provider.timeoutMs,
    maxBytes: provider.maxResponseBytes,
    ca: provider.ca,
  });
}
