// A real OpenID Connect / OAuth 2.0 server for tokenkeep's integration tests:
// panva's oidc-provider from npm, configured, not written, here. What this
// file adds around it is what a deployment adds: the clients, the user who
// signs in (every interaction is approved as that user, as a signed-in user
// who clicks "Allow" would), and a protected resource (an MCP server's
// RFC 9728 metadata and a 401 that points at it).
//
// DPoP: a client whose tokens must be bound, and nonces at the token
// endpoint.
//
// Usage: node server.mjs [--access-token-seconds 3600] [--jwks FILE]
// Prints ONE JSON line on stdout ({issuer, clients, mcp}), then serves on
// 127.0.0.1 until SIGTERM or until stdin reaches EOF, so that a test that
// dies never leaves the server behind. Each request is logged on stderr as
// one line: method, path, grant type, status (never a body or a token).

import { createServer } from 'node:http';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import Provider, { errors } from 'oidc-provider';

const args = process.argv.slice(2);
const arg = (name, fallback) => {
  const i = args.indexOf(`--${name}`);
  return i === -1 ? fallback : args[i + 1];
};
const accessTokenSeconds = Number(arg('access-token-seconds', 3600));
const jwks = arg('jwks') ? JSON.parse(readFileSync(arg('jwks'), 'utf8')) : undefined;

const server = createServer();
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
const base = `http://127.0.0.1:${server.address().port}`;
const issuer = base;
const mcp = `${base}/mcp`;

const secret = () => randomBytes(24).toString('base64url');
const clients = {
  public: { client_id: 'tk-public' },
  machine: { client_id: 'tk-machine', client_secret: secret() },
  post: { client_id: 'tk-post', client_secret: secret() },
  jwt: { client_id: 'tk-jwt' },
  exchange: { client_id: 'tk-exchange', client_secret: secret() },
  dpop: { client_id: 'tk-dpop' },
};
const TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
// Loopback redirects of native clients match on any port (RFC 8252): the
// CLI's listener, and a tokenkeep service's callback.
const redirects = ['http://127.0.0.1/callback', 'http://127.0.0.1/v1/connect/callback'];
const userGrants = ['authorization_code', 'refresh_token', 'urn:ietf:params:oauth:grant-type:device_code'];

const provider = new Provider(issuer, {
  clients: [
    {
      ...clients.public,
      application_type: 'native',
      token_endpoint_auth_method: 'none',
      redirect_uris: redirects,
      grant_types: userGrants,
      response_types: ['code'],
      scope: 'openid offline_access read write',
    },
    {
      // A public client whose tokens must be DPoP-bound (RFC 9449).
      ...clients.dpop,
      application_type: 'native',
      token_endpoint_auth_method: 'none',
      dpop_bound_access_tokens: true,
      redirect_uris: redirects,
      grant_types: userGrants,
      response_types: ['code'],
      scope: 'openid offline_access read write',
    },
    {
      ...clients.machine,
      token_endpoint_auth_method: 'client_secret_basic',
      grant_types: ['client_credentials'],
      redirect_uris: [],
      response_types: [],
      scope: 'read write',
    },
    {
      ...clients.post,
      application_type: 'native',
      token_endpoint_auth_method: 'client_secret_post',
      redirect_uris: redirects,
      grant_types: [...userGrants, 'client_credentials'],
      response_types: ['code'],
      scope: 'openid offline_access read write',
    },
    {
      ...clients.exchange,
      token_endpoint_auth_method: 'client_secret_basic',
      grant_types: [TOKEN_EXCHANGE],
      redirect_uris: [],
      response_types: [],
      scope: 'read write',
    },
    ...(jwks
      ? [{
        ...clients.jwt,
        token_endpoint_auth_method: 'private_key_jwt',
        token_endpoint_auth_signing_alg: 'ES256',
        jwks,
        grant_types: ['client_credentials'],
        redirect_uris: [],
        response_types: [],
        scope: 'read write',
      }]
      : []),
  ],
  scopes: ['openid', 'offline_access', 'read', 'write'],
  clientAuthMethods: ['none', 'client_secret_basic', 'client_secret_post', 'private_key_jwt'],
  pkce: { required: () => true },
  features: {
    devInteractions: { enabled: false },
    deviceFlow: { enabled: true },
    clientCredentials: { enabled: true },
    revocation: { enabled: true },
    introspection: { enabled: true },
    registration: { enabled: true },
    // Proofs at the token endpoint must carry the server's nonce (RFC 9449
    // section 8): a client learns it from a use_dpop_nonce answer.
    dPoP: { enabled: true, nonceSecret: randomBytes(32), requireNonce: (ctx) => ctx.oidc.route === 'token' },
    resourceIndicators: {
      enabled: true,
      // The MCP server is the one resource; a request that names none gets
      // an opaque token for the user's own data.
      defaultResource: () => undefined,
      useGrantedResource: () => false,
      getResourceServerInfo: (ctx, indicator) => {
        if (indicator !== mcp) throw new errors.InvalidTarget();
        return { scope: 'read write', audience: mcp, accessTokenFormat: 'opaque', accessTokenTTL: accessTokenSeconds };
      },
    },
  },
  // A plain OAuth client (no `openid`) still gets a refresh token.
  issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
  // Public clients rotate on every use; confidential ones keep theirs.
  rotateRefreshToken: (ctx) => ctx.oidc.client.clientAuthMethod === 'none',
  ttl: {
    AccessToken: accessTokenSeconds,
    ClientCredentials: accessTokenSeconds,
    DeviceCode: 600,
    RefreshToken: 14 * 24 * 3600,
    Grant: 14 * 24 * 3600,
    Session: 14 * 24 * 3600,
    Interaction: 600,
    AuthorizationCode: 60,
  },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  cookies: { keys: [secret()] },
  findAccount: (ctx, sub) => ({ accountId: sub, claims: () => ({ sub }) }),
});
provider.proxy = false;
// The log the tests count: one line per grant issued, by grant type,
// and one more for those that named the MCP server as their resource.
provider.on('grant.success', (ctx) => {
  const { grant_type: grant, resource } = ctx.oidc.params;
  process.stderr.write(`grant ${grant}\n`);
  if (resource === mcp) process.stderr.write(`grant ${grant} for the MCP server\n`);
});

// Token exchange (RFC 8693), which oidc-provider leaves to its embedder:
// an active access token of this server's, for a token of the exchanging
// client's. The log says whose token was exchanged.
provider.registerGrantType(
  TOKEN_EXCHANGE,
  async (ctx) => {
    const { subject_token: subjectToken, subject_token_type: type, scope } = ctx.oidc.params;
    if (type !== 'urn:ietf:params:oauth:token-type:access_token') {
      throw new errors.InvalidRequest('unsupported subject_token_type');
    }
    const subject = await provider.AccessToken.find(subjectToken);
    if (!subject) throw new errors.InvalidGrant('the subject token is not active');
    const token = new provider.ClientCredentials({ client: ctx.oidc.client, scope: scope || undefined });
    const value = await token.save();
    process.stderr.write(`exchanged a token of ${subject.accountId}\n`);
    ctx.body = {
      access_token: value,
      issued_token_type: 'urn:ietf:params:oauth:token-type:access_token',
      token_type: 'Bearer',
      expires_in: token.expiration,
      scope: token.scope,
    };
  },
  ['subject_token', 'subject_token_type', 'requested_token_type', 'audience', 'scope', 'resource'],
);

// The user: signs in as `alice` and allows whatever the client asked for.
async function interaction(req, res) {
  const details = await provider.interactionDetails(req, res);
  const { prompt, params, session } = details;
  let result;
  if (prompt.name === 'login') {
    result = { login: { accountId: 'alice' } };
  } else {
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    const missing = prompt.details;
    if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
    if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
    for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes ?? {})) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
    result = { consent: { grantId: await grant.save() } };
  }
  await provider.interactionFinished(req, res, result, { mergeWithLastSubmission: true });
}

// The MCP server: its protected-resource metadata (RFC 9728), and a 401
// that names it for a request without a valid token.
async function protectedResource(req, res) {
  const url = new URL(req.url, base);
  // At the path-inserted location and at the root, as servers differ.
  if (['/.well-known/oauth-protected-resource/mcp', '/.well-known/oauth-protected-resource'].includes(url.pathname)) {
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify({ resource: mcp, authorization_servers: [issuer], scopes_supported: ['read', 'write'] }));
    return;
  }
  const auth = req.headers.authorization ?? '';
  const token = auth.startsWith('Bearer ') ? auth.slice(7) : undefined;
  const found = token && await provider.AccessToken.find(token);
  if (!found || found.aud !== mcp) {
    res.statusCode = 401;
    res.setHeader('www-authenticate', `Bearer resource_metadata="${base}/.well-known/oauth-protected-resource/mcp"`);
    res.end();
    return;
  }
  res.setHeader('content-type', 'application/json');
  res.end(JSON.stringify({ ok: true, sub: found.accountId ?? found.clientId }));
}

const callback = provider.callback();
server.on('request', (req, res) => {
  res.on('finish', () => {
    process.stderr.write(`${req.method} ${req.url.split('?')[0]} ${res.statusCode}\n`);
  });
  const path = req.url.split('?')[0];
  if (path.startsWith('/mark/')) {
    // Everything logged before this line was answered before it.
    process.stderr.write(`mark ${path.slice('/mark/'.length)}\n`);
    res.end();
  } else if (path.startsWith('/interaction/')) {
    interaction(req, res).catch((e) => { res.statusCode = 500; res.end(String(e.name)); });
  } else if (path === '/mcp' || path.startsWith('/.well-known/oauth-protected-resource')) {
    protectedResource(req, res).catch(() => { res.statusCode = 500; res.end(); });
  } else {
    callback(req, res);
  }
});

process.on('SIGTERM', () => process.exit(0));
process.stdin.on('end', () => process.exit(0));
process.stdin.on('error', () => process.exit(0));
process.stdin.resume();

process.stdout.write(`${JSON.stringify({ issuer, base, mcp, clients })}\n`);
