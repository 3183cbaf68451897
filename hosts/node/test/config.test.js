// The configuration file and the key file, read as the Rust host reads them.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { parseConfig, providerContract } from '../src/config.js';
import { Keyring } from '../src/keyring.js';
import { open, sealTokens } from '../src/sealing.js';
import { defaultKeyPath } from '../src/index.js';
import { attachClientCredentials } from '../src/token_endpoint.js';
import { mayRepeat, parseTokenResponse, refreshRequestBody } from '../src/protocol.js';

const refused = (text, pattern, env = {}) => {
  let e;
  try {
    parseConfig(text, env);
  } catch (caught) {
    e = caught;
  }
  assert.ok(e, `accepted: ${text}`);
  assert.equal(e.class, 'configuration');
  assert.match(e.message, pattern);
};

describe('the configuration', () => {
  test('a custom provider with the defaults', () => {
    const c = parseConfig('[providers.gitlab-ish]\ntoken_url = "https://gitlab.example.com/oauth/token"\nclient_id = "abc"\nclient_secret = "s3cret"\n');
    const p = c.providers.get('gitlab-ish');
    assert.equal(c.lockWaitMs, 45000);
    assert.equal(c.auditRetentionDays, 90);
    assert.deepEqual(providerContract(p), {
      name: 'gitlab-ish',
      refreshThresholdSeconds: 600,
      timeoutMs: 15000,
      maxResponseBytes: 65536,
      kind: 'custom',
      errorCodes: [],
      defaultExpiresIn: undefined,
      defaultRefreshTokenExpiresIn: undefined,
      rotatesRefreshTokens: true,
      maxAttempts: 3,
      retryBudgetMs: 33750,
      bare4xxIsRefusal: true,
      reuseLeewaySeconds: 0,
      hostGrant: false,
    });
    assert.equal(p.clientAuth, 'body');
    assert.equal(p.clientSecret, 's3cret');
  });

  test('the keys of connect, machine clients and resource indicators are read', () => {
    const c = parseConfig(`
[providers.mcp]
token_url = "https://as.example/token"
authorization_url = "https://as.example/auth"
device_authorization_url = "https://as.example/device"
revocation_url = "https://as.example/revoke"
client_id = "public"
client_auth = "none"
scopes = ["offline_access", "read"]
resource = "https://mcp.example/mcp"

[providers.ci]
token_url = "https://as.example/token"
client_id = "machine"
client_secret = "s"
client_auth = "client-secret-basic"
grant = "client-credentials"

[providers.bound]
token_url = "https://as.example/token"
client_id = "public"
client_auth = "none"
dpop = true
`);
    const mcp = c.providers.get('mcp');
    assert.equal(mcp.clientAuth, 'none');
    assert.deepEqual(mcp.extraParams, [['resource', 'https://mcp.example/mcp']]);
    assert.equal(mcp.unsupported, undefined);
    const ci = c.providers.get('ci');
    assert.equal(ci.clientAuth, 'basic');
    assert.equal(providerContract(ci).hostGrant, true);
    // The Rust host renews these; this one says so when asked to.
    assert.match(ci.unsupported, /not supported by the Node host/);
    // A refresh without the row's DPoP proof would be refused as a bad
    // grant: this host says it cannot, and leaves the row alone.
    assert.match(c.providers.get('bound').unsupported, /dpop = true .* not supported by the Node host/);
    refused('[providers.x]\ntoken_url = "https://a.example/t"\nclient_id = "a"\nclient_auth = "none"\nclient_secret = "s"\n', /not sent with client_auth = "none"/);
    refused('[providers.x]\ntoken_url = "https://a.example/t"\nclient_id = "a"\nrevocation_url = "http://example.com/r"\n', /revocation_url must use https/);
  });

  test('built-in providers resolve from the catalogue', () => {
    const c = parseConfig(`
[providers.github]
client_id = "Iv1"
client_secret_env = "GH_SECRET"

[providers.work-gitlab]
kind = "gitlab"
base_url = "https://git.example.com/"
client_id = "x"

[providers.ms]
kind = "microsoft"
tenant = "contoso.example"
extra_params = { scope = "offline_access User.Read" }
client_id = "y"

[providers.bb]
kind = "bitbucket"
client_id = "z"
client_secret = "pw"
`, { GH_SECRET: 'from-env' });
    const gh = c.providers.get('github');
    assert.equal(gh.tokenUrl, 'https://github.com/login/oauth/access_token');
    assert.equal(gh.clientSecret, 'from-env');
    assert.deepEqual(gh.errorCodes[0], ['bad_refresh_token', 'reauthorization-required']);
    assert.equal(gh.defaultExpiresIn, 28800);
    assert.equal(c.providers.get('work-gitlab').tokenUrl, 'https://git.example.com/oauth/token');
    const ms = c.providers.get('ms');
    assert.equal(ms.tokenUrl, 'https://login.microsoftonline.com/contoso.example/oauth2/v2.0/token');
    assert.deepEqual(ms.extraParams, [['scope', 'offline_access User.Read']]);
    assert.equal(c.providers.get('bb').clientAuth, 'basic');
    const missing = parseConfig('[providers.github]\nclient_id = "a"\nclient_secret_env = "NOT_SET_ANYWHERE"\n', {});
    assert.equal(missing.providers.get('github').clientSecretMissing, 'NOT_SET_ANYWHERE');
  });

  test('what the Rust host refuses, this host refuses', () => {
    refused('[providers.x]\ntoken_url = "http://example.com/token"\nclient_id = "a"\n', /plain http is allowed on loopback only/);
    refused('lock_wait_ms = 1000\n[providers.x]\ntoken_url = "https://a.example/t"\nclient_id = "a"\ntimeout_ms = 5000\n', /lock_wait_ms \(1000\) must exceed provider x's timeout_ms \(5000\)/);
    refused('[providers.x]\ntoken_url = "https://a.example/t"\nclient_id = "a"\ncolour = "blue"\n', /not valid TOML/);
    refused('surprise = 1\n', /not valid TOML/);
    refused('[providers.x]\ntoken_url = "https://a.example/t"\n', /not valid TOML/);
    refused('[providers.x]\ntoken_url = "https://a.example/t"\nclient_id = "a"\nclient_secret = "s"\nclient_secret_env = "E"\n', /not both/);
    refused('[providers.x]\ntoken_url = "https://a.example/t"\nclient_id = "a"\nclient_auth = "basic"\n', /needs a client secret/);
    refused('[providers.x]\nclient_id = "a"\n', /not a built-in provider: set kind \(one of github, gitlab, bitbucket, google, slack, atlassian, microsoft, linear\)/);
    refused('[providers.x]\ntoken_url = "https://a.example/t"\nbase_url = "https://b"\nclient_id = "a"\n', /base_url is a setting of built-in providers/);
    refused('[providers.github]\nclient_id = "a"\nrotates_refresh_tokens = false\n', /rotates_refresh_tokens is known for github/);
    refused('[providers.github]\nclient_id = "a"\nbase_url = "https://ghe.example"\ntoken_url = "https://x.example/t"\n', /token_url replaces the github URL that base_url would build/);
    refused('[providers.ms]\nkind = "microsoft"\nclient_id = "a"\n', /provider ms: microsoft needs the setting scope/);
    refused('[providers.g]\nkind = "gitlab"\nbaseurl = "x"\nclient_id = "a"\n', /not valid TOML/);
    refused('[providers.g]\nkind = "gitlub"\nclient_id = "a"\n', /unknown provider kind "gitlub"/);
    refused('[providers.x]\ntoken_url = "https://a.example/t"\nclient_id = "a"\nmax_attempts = 0\n', /max_attempts must be 1-10, not 0/);
    refused('[providers."bad name"]\ntoken_url = "https://a.example/t"\nclient_id = "a"\n', /name must be 1-64 characters/);
    refused('[providers.x]\ntoken_url = "https://a.example/t"\nclient_id = "a"\ntimeout_ms = -1\n', /not valid TOML/);
  });

  test('loopback over plain http, bounds, and the retry budget', () => {
    const c = parseConfig('lock_wait_ms = 4000\n[providers.x]\ntoken_url = "http://localhost:8080/t"\nclient_id = "a"\ntimeout_ms = 3500\nmax_response_bytes = 10\n');
    const p = c.providers.get('x');
    assert.equal(p.tokenUrl, 'http://localhost:8080/t');
    assert.equal(p.maxResponseBytes, 256);
    assert.equal(p.retryBudgetMs, 3500);
    assert.equal(parseConfig('audit_retention_days = 0\n').auditRetentionDays, undefined);
  });
});

describe('the token request', () => {
  test('the form body and the client credentials, as the Rust host builds them', () => {
    assert.equal(
      refreshRequestBody('r/+ &=', [['scope', 'a b'], ['grant_type', 'x']]),
      'grant_type=refresh_token&refresh_token=r%2F%2B+%26%3D&scope=a+b',
    );
    const c = parseConfig(`[providers.acme]
token_url = "https://auth.example/oauth/token"
client_id = "the client"
client_secret = "s3cret&="
[providers.basic]
token_url = "https://auth.example/basic"
client_id = "id"
client_secret = "pw"
client_auth = "basic"
`);
    const headers = {};
    assert.equal(
      attachClientCredentials(c.providers.get('acme'), 'grant_type=refresh_token', headers),
      'grant_type=refresh_token&client_id=the+client&client_secret=s3cret%26%3D',
    );
    assert.equal(headers.Authorization, undefined);
    assert.equal(attachClientCredentials(c.providers.get('basic'), 'grant_type=refresh_token', headers), 'grant_type=refresh_token');
    assert.equal(headers.Authorization, 'Basic aWQ6cHc=');
  });

  test('answers are read and repeats judged as core reads and judges them', () => {
    const t = parseTokenResponse(200, 'application/json', Buffer.from('{"access_token":"a2","refresh_token":"r2","expires_in":3600,"refresh_token_expires_in":"15897600","scope":"repo user"}'));
    assert.deepEqual(t, { accessToken: 'a2', refreshToken: 'r2', expiresIn: 3600, refreshTokenExpiresIn: 15897600, scopes: ['repo', 'user'] });
    const form = parseTokenResponse(200, 'application/x-www-form-urlencoded', Buffer.from('access_token=gho_a&expires_in=28800&scope=&token_type=bearer'));
    assert.equal(form.scopes, undefined);
    const rules = { rotatesRefreshTokens: true, reuseLeewaySeconds: 0, retryBudgetMs: 30000, errorCodes: [], bare4xxIsRefusal: true };
    const plain = { ...rules, rotatesRefreshTokens: false };
    const answer = (status, body) => ({ answer: { status, contentType: 'application/json', body: Buffer.from(body) } });
    assert.equal(mayRepeat(answer(400, '{"error":"server_error"}'), plain), true);
    assert.equal(mayRepeat(answer(400, '{"error":"server_error"}'), rules), false);
    assert.equal(mayRepeat(answer(400, '{"error":"temporarily_unavailable"}'), rules), true);
    assert.equal(mayRepeat(answer(503, ''), rules), true);
    assert.equal(mayRepeat(answer(400, '{"error":"invalid_grant"}'), plain), false);
    assert.equal(mayRepeat({ error: { tag: 'no-answer' } }, plain), true);
    assert.equal(mayRepeat({ error: { tag: 'no-answer' } }, rules), false);
    assert.equal(mayRepeat({ error: { tag: 'not-sent' } }, rules), true);
    assert.equal(mayRepeat({ error: { tag: 'answer-unusable' } }, { ...rules, reuseLeewaySeconds: 600 }), true);
  });
});

describe('keys and sealing', () => {
  const a = Buffer.alloc(32, 1).toString('base64');
  const b = Buffer.alloc(32, 2).toString('base64');

  test('the first key is active; bad entries are refused without quoting keys', () => {
    const ring = Keyring.parse(`# comment\nnew=${a}\nold=${b}\n`);
    assert.equal(ring.activeId, 'new');
    assert.deepEqual(Keyring.parse(`x=${a},y=${b}`).ids(), ['x', 'y']);
    for (const [text, pattern] of [
      [`k=${Buffer.alloc(16).toString('base64')}`, /must be 32 bytes, not 16/],
      [`k=${a}\nk=${b}`, /listed twice/],
      [`bad id=${a}`, /key ids must be/],
      ['k=***', /not valid base64/],
      ['', /holds no key/],
      ['no-equals-sign', /id=base64/],
    ]) {
      assert.throws(() => Keyring.parse(text), (e) => e.class === 'configuration' && pattern.test(e.message) && !e.message.includes(a));
    }
  });

  test('a sealed field opens only for its own row, field and key id', () => {
    const ring = Keyring.parse(`k2=${b}\nk1=${a}`);
    const sealed = sealTokens(ring, 'github', 'alice', 'at', 'rt');
    assert.equal(sealed.keyId, 'k2');
    assert.equal(sealed.accessToken[0], 1);
    assert.equal(sealed.accessToken.length, 1 + 12 + 2 + 16);
    assert.equal(open(ring, 'github', 'alice', 'access-token', 'k2', sealed.accessToken), 'at');
    assert.throws(() => open(ring, 'github', 'bob', 'refresh-token', 'k2', sealed.refreshToken), { tag: 'undecryptable' });
    assert.throws(() => open(ring, 'github', 'alice', 'access-token', 'k2', sealed.refreshToken), { tag: 'undecryptable' });
    assert.throws(() => open(ring, 'github', 'alice', 'access-token', 'k1', sealed.accessToken), { tag: 'undecryptable' });
    assert.throws(() => open(ring, 'github', 'alice', 'access-token', 'k9', sealed.accessToken), {
      tag: 'unknown-key',
      message: 'key k9 is not in the keyring',
    });
    assert.throws(() => open(ring, 'github', 'alice', 'access-token', 'k2', sealed.accessToken.subarray(0, 5)), {
      message: 'AccessToken: sealed value is malformed',
    });
  });

  test('the default key file sits beside the database, its extension replaced', () => {
    assert.equal(defaultKeyPath('/tmp/x.db'), '/tmp/x.key');
    assert.equal(defaultKeyPath('/tmp/x'), '/tmp/x.key');
    assert.equal(defaultKeyPath('a.b.db'), 'a.b.key');
    assert.equal(defaultKeyPath('/tmp/.db'), '/tmp/.db.key');
  });
});
