#!/usr/bin/env node
// A loopback OAuth token endpoint for the tests, run in a child process
// (the keeper's token request is synchronous and blocks its caller's
// thread). It rotates refresh tokens, and revokes the whole chain when a
// spent one comes back, as the strictest providers do. Every request is
// appended to the log file as one JSON line; `listening PORT` goes to
// standard output once it answers.
//
//   node provider.js LOG_FILE [--mode rotate|invalid_grant|status:CODE|garbage] [--delay MS]
//                    [--expires-in S] [--initial RT] [--client-id ID] [--client-secret S]
//                    [--tls-cert PEM --tls-key PEM]   (https instead of http)
//                    [--script FILE]   answers [{status, content_type, body}] given in order first

import { appendFileSync, readFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';

const [logFile, ...argv] = process.argv.slice(2);
const opt = (name, fallback) => {
  const i = argv.indexOf(`--${name}`);
  return i >= 0 ? argv[i + 1] : fallback;
};
const mode = opt('mode', 'rotate');
const delay = Number(opt('delay', '0'));
const expiresIn = Number(opt('expires-in', '3600'));
const clientId = opt('client-id', 'test-client');
const clientSecret = opt('client-secret', undefined);

let valid = opt('initial', 'rt-0');
const script = opt('script', undefined) ? JSON.parse(readFileSync(opt('script'), 'utf8')) : [];
const spent = new Set();
let issued = 0;

function answer(res, status, body, type = 'application/json') {
  res.writeHead(status, { 'content-type': type, 'cache-control': 'no-store' });
  res.end(typeof body === 'string' ? body : JSON.stringify(body));
}

const tlsCert = opt('tls-cert', undefined);
const handler = (req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    const form = new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
    const entry = {
      at: Date.now(),
      method: req.method,
      path: req.url,
      host: req.headers.host,
      grant_type: form.get('grant_type'),
      refresh_token: form.get('refresh_token'),
      client_id: form.get('client_id'),
      client_secret_ok: clientSecret === undefined ? null : form.get('client_secret') === clientSecret,
      authorization: req.headers.authorization ?? null,
      params: [...form.keys()],
      form: [...form],
    };
    appendFileSync(logFile, `${JSON.stringify(entry)}\n`);
    setTimeout(() => respond(req, res, form), delay);
  });
};
const server = tlsCert
  ? https.createServer({ cert: readFileSync(tlsCert), key: readFileSync(opt('tls-key')) }, handler)
  : http.createServer(handler);

function respond(req, res, form) {
  const scripted = script.shift();
  if (scripted) return answer(res, scripted.status, scripted.body, scripted.content_type);
  if (mode === 'invalid_grant') return answer(res, 400, { error: 'invalid_grant' });
  if (mode.startsWith('status:')) return answer(res, Number(mode.slice(7)), '', 'text/plain');
  if (mode === 'garbage') return answer(res, 200, '<html>hello</html>', 'text/html');
  if (form.get('grant_type') !== 'refresh_token') return answer(res, 400, { error: 'unsupported_grant_type' });
  // The client authenticates in the body or with HTTP Basic (RFC 6749 2.3.1).
  let id = form.get('client_id');
  let secret = form.get('client_secret');
  const basic = /^Basic (.+)$/.exec(req.headers.authorization ?? '');
  if (basic) {
    const pair = Buffer.from(basic[1], 'base64').toString('utf8');
    const at = pair.indexOf(':');
    const decode = (s) => decodeURIComponent(s.replace(/\+/g, ' '));
    id = decode(pair.slice(0, at));
    secret = decode(pair.slice(at + 1));
  }
  if (id !== clientId) return answer(res, 401, { error: 'invalid_client' });
  if (clientSecret !== undefined && secret !== clientSecret) {
    return answer(res, 401, { error: 'invalid_client' });
  }
  const presented = form.get('refresh_token');
  if (presented !== null && presented === valid) {
    spent.add(presented);
    issued += 1;
    valid = `rt-${issued}`;
    return answer(res, 200, {
      access_token: `at-${issued}`,
      refresh_token: valid,
      expires_in: expiresIn,
      token_type: 'bearer',
    });
  }
  // A spent token came back: the chain is revoked.
  if (spent.has(presented)) valid = null;
  return answer(res, 400, { error: 'invalid_grant' });
}

server.listen(0, '127.0.0.1', () => {
  process.stdout.write(`listening ${server.address().port}\n`);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
