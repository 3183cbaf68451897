// The worker thread that sends token requests for the synchronous
// `token-endpoint.request-refresh` import: the component's thread blocks on
// a SharedArrayBuffer (Atomics.wait) while this thread POSTs with node:http
// over a connection it opened itself (straight, TLS, or through the
// HTTPS_PROXY CONNECT tunnel), bounded by the provider's total time
// (connect to last byte) and response size, and classifies every failure as
// host/src/token_endpoint.rs does. It logs nothing: the request holds a
// refresh token and client credentials, the answer may hold tokens.

import http from 'node:http';
import net from 'node:net';
import tls from 'node:tls';
import { parentPort, workerData } from 'node:worker_threads';

const { port, signal } = workerData;

// Certificate problems are the configuration's (nothing was sent); other
// handshake failures are the network's.
const CERTIFICATE_ERRORS = new Set([
  'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_CRL',
  'UNABLE_TO_DECRYPT_CERT_SIGNATURE',
  'UNABLE_TO_DECRYPT_CRL_SIGNATURE',
  'UNABLE_TO_DECODE_ISSUER_PUBLIC_KEY',
  'CERT_SIGNATURE_FAILURE',
  'CRL_SIGNATURE_FAILURE',
  'CERT_NOT_YET_VALID',
  'CERT_HAS_EXPIRED',
  'CRL_NOT_YET_VALID',
  'CRL_HAS_EXPIRED',
  'ERROR_IN_CERT_NOT_BEFORE_FIELD',
  'ERROR_IN_CERT_NOT_AFTER_FIELD',
  'ERROR_IN_CRL_LAST_UPDATE_FIELD',
  'ERROR_IN_CRL_NEXT_UPDATE_FIELD',
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'SELF_SIGNED_CERT_IN_CHAIN',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'CERT_CHAIN_TOO_LONG',
  'CERT_REVOKED',
  'INVALID_CA',
  'PATH_LENGTH_EXCEEDED',
  'INVALID_PURPOSE',
  'CERT_UNTRUSTED',
  'CERT_REJECTED',
  'HOSTNAME_MISMATCH',
  'ERR_TLS_CERT_ALTNAME_INVALID',
]);

class Failure extends Error {
  constructor(tag, message) {
    super(message);
    this.tag = tag;
  }
}

const kind = (e) => (typeof e?.code === 'string' ? e.code : 'error');

/** The proxy for an https request to host:port, if the environment names one. */
function proxyFor(host, port, proxyEnv) {
  const env = (names) =>
    names.map((n) => proxyEnv[n]).find((v) => typeof v === 'string' && v.trim() !== '');
  const url = env(['HTTPS_PROXY', 'https_proxy']);
  if (!url) return undefined;
  const noProxy = env(['NO_PROXY', 'no_proxy']);
  if (noProxy && exempt(noProxy, host, port)) return undefined;
  const misconfigured = () =>
    new Failure('misconfigured', 'HTTPS_PROXY is not an http:// proxy URL');
  let parsed;
  try {
    parsed = new URL(url.includes('://') ? url : `http://${url}`);
  } catch {
    throw misconfigured();
  }
  if (parsed.protocol !== 'http:' || parsed.hostname === '') throw misconfigured();
  let authorization;
  if (parsed.username !== '') {
    const pair = `${decodeURIComponent(parsed.username)}:${decodeURIComponent(parsed.password)}`;
    authorization = `Basic ${Buffer.from(pair).toString('base64')}`;
  }
  return {
    host: parsed.hostname.replace(/^\[|\]$/g, ''),
    port: parsed.port === '' ? 80 : Number(parsed.port),
    authorization,
  };
}

/** Whether NO_PROXY exempts host:port (`*`, the host, a domain above it, with :port). */
function exempt(list, host, port) {
  const h = host.replace(/\.+$/, '').toLowerCase();
  return list
    .split(',')
    .map((e) => e.trim().toLowerCase())
    .filter((e) => e !== '')
    .some((entry) => {
      if (entry === '*') return true;
      let name = entry;
      let entryPort;
      const at = entry.lastIndexOf(':');
      if (at >= 0 && !entry.slice(0, at).includes(':')) {
        name = entry.slice(0, at);
        const p = Number.parseInt(entry.slice(at + 1), 10);
        entryPort = Number.isInteger(p) && String(p) === entry.slice(at + 1) ? p : undefined;
      }
      if (entryPort !== undefined && entryPort !== port) return false;
      name = name.replace(/^\.+/, '').replace(/\.+$/, '');
      return h === name || h.endsWith(`.${name}`);
    });
}

function onceConnected(socket, event) {
  return new Promise((resolve, reject) => {
    socket.once(event, () => resolve(socket));
    socket.once('error', reject);
  });
}

/** A CONNECT tunnel to host:port through the proxy. */
async function tunnel(proxy, host, port) {
  const socket = net.connect({ host: proxy.host, port: proxy.port });
  try {
    await onceConnected(socket, 'connect');
  } catch (e) {
    socket.destroy();
    throw new Failure('not-sent', `the provider could not be reached: proxy: ${kind(e)}`);
  }
  let request = `CONNECT ${host}:${port} HTTP/1.1\r\nHost: ${host}:${port}\r\n`;
  if (proxy.authorization) request += `Proxy-Authorization: ${proxy.authorization}\r\n`;
  socket.write(`${request}\r\n`);
  const head = await new Promise((resolve, reject) => {
    let buf = Buffer.alloc(0);
    const onData = (chunk) => {
      // Byte by byte would keep the tunnel's first bytes; a proxy sends
      // nothing after its head before we speak, so the head is all there is.
      buf = Buffer.concat([buf, chunk]);
      const end = buf.indexOf('\r\n\r\n');
      if (end >= 0) {
        socket.off('data', onData);
        socket.pause();
        if (end + 4 < buf.length) socket.unshift(buf.subarray(end + 4));
        resolve(buf.subarray(0, end).toString('latin1'));
      } else if (buf.length > 8 * 1024) {
        reject(new Failure('not-sent', 'the provider could not be reached: proxy: answer too long'));
      }
    };
    socket.on('data', onData);
    socket.once('error', (e) =>
      reject(new Failure('not-sent', `the provider could not be reached: proxy: ${kind(e)}`)),
    );
    socket.once('end', () =>
      reject(new Failure('not-sent', 'the provider could not be reached: proxy: closed')),
    );
  }).catch((e) => {
    socket.destroy();
    throw e;
  });
  const status = Number.parseInt(head.split(/\s+/)[1] ?? '', 10);
  if (status >= 200 && status <= 299) return socket;
  socket.destroy();
  if (status === 407) {
    throw new Failure('misconfigured', 'the proxy wants credentials (407); put them in HTTPS_PROXY');
  }
  if (Number.isInteger(status)) {
    throw new Failure('not-sent', `the provider could not be reached: proxy refused the tunnel (status ${status})`);
  }
  throw new Failure('not-sent', 'the provider could not be reached: proxy: not an HTTP answer');
}

/** A connection to the token endpoint (TLS for https). Nothing is sent yet. */
async function connect(url, ca, proxyEnv) {
  const https = url.protocol === 'https:';
  const host = url.hostname.replace(/^\[|\]$/g, '');
  const port = url.port === '' ? (https ? 443 : 80) : Number(url.port);
  let raw;
  if (https) {
    const proxy = proxyFor(host, port, proxyEnv);
    if (proxy) raw = await tunnel(proxy, host, port);
  }
  if (!raw) {
    raw = net.connect({ host, port });
    try {
      await onceConnected(raw, 'connect');
    } catch (e) {
      raw.destroy();
      throw new Failure('not-sent', `the provider could not be reached: ${kind(e)}`);
    }
  }
  if (!https) return raw;
  const secure = tls.connect({
    socket: raw,
    servername: net.isIP(host) ? undefined : host,
    host,
    ca,
    ALPNProtocols: ['http/1.1'],
  });
  try {
    await onceConnected(secure, 'secureConnect');
  } catch (e) {
    secure.destroy();
    raw.destroy();
    const code = kind(e);
    if (CERTIFICATE_ERRORS.has(code)) {
      throw new Failure(
        'misconfigured',
        `TLS: the provider's certificate is not trusted (${code}); ` +
          'set ca_bundle if it is signed by a private CA',
      );
    }
    throw new Failure('not-sent', `the provider could not be reached: TLS: ${code}`);
  }
  return secure;
}

/** POSTs the refresh form: {answer} or {error: {tag, val}}. */
async function exchange(req) {
  const url = new URL(req.url);
  const total = req.timeoutMs;
  const deadline = Date.now() + total;
  let socket;
  // Connecting gets half the budget: a connection that never came up ends
  // as "not sent" (safe to repeat) before the deadline means "no answer".
  let timer;
  const connecting = connect(url, req.ca, req.proxyEnv ?? {});
  try {
    socket = await Promise.race([
      connecting,
      new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Failure('not-sent', 'connect timed out')), total / 2);
      }),
    ]);
  } catch (e) {
    connecting.then((s) => s.destroy(), () => {});
    throw e instanceof Failure ? e : new Failure('not-sent', `the provider could not be reached: ${kind(e)}`);
  } finally {
    clearTimeout(timer);
  }
  return new Promise((resolve) => {
    let settled = false;
    let answered = false;
    let received = 0;
    const chunks = [];
    const finish = (result) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      socket.destroy();
      resolve(result);
    };
    const fail = (tag, val) => finish({ error: { tag, val } });
    timer = setTimeout(() => {
      if (answered) fail('answer-unusable', `answer cut off after ${received} bytes: timed out`);
      else fail('no-answer', 'timed out');
    }, Math.max(0, deadline - Date.now()));
    const request = http.request({
      method: 'POST',
      path: `${url.pathname}${url.search}`,
      headers: { Host: url.host, ...req.headers, 'Content-Length': req.body.length },
      setHost: false,
      createConnection: () => socket,
    });
    request.on('error', (e) => {
      if (answered) fail('answer-unusable', `answer cut off: ${kind(e)}`);
      else fail('no-answer', `no answer: ${kind(e)}`);
    });
    request.on('response', (res) => {
      answered = true;
      const status = res.statusCode;
      const contentType = res.headers['content-type'];
      const retry = res.headers['retry-after'];
      let retryAfter;
      if (typeof retry === 'string' && /^\+?[0-9]+$/.test(retry.trim())) {
        const n = Number(retry.trim());
        if (n <= 4294967295) retryAfter = n;
      }
      res.on('data', (chunk) => {
        if (received + chunk.length > req.maxBytes) {
          fail('answer-unusable', `answer larger than ${req.maxBytes} bytes`);
          return;
        }
        received += chunk.length;
        chunks.push(chunk);
      });
      res.on('aborted', () => fail('answer-unusable', 'answer cut off: aborted'));
      res.on('error', (e) => fail('answer-unusable', `answer cut off: ${kind(e)}`));
      res.on('end', () => {
        if (!res.complete) {
          fail('answer-unusable', 'answer cut off: incomplete');
          return;
        }
        finish({
          answer: {
            status,
            contentType: typeof contentType === 'string' ? contentType : undefined,
            retryAfter,
            body: Buffer.concat(chunks),
          },
        });
      });
      res.on('close', () => {
        if (!res.complete) fail('answer-unusable', 'answer cut off: closed');
      });
    });
    request.end(Buffer.from(req.body));
  });
}

parentPort.on('message', async (req) => {
  // Taken: from here on the request may leave.
  port.postMessage({ id: req.id, taken: true });
  let result;
  try {
    result = await exchange(req);
  } catch (e) {
    result =
      e instanceof Failure
        ? { error: { tag: e.tag, val: e.message } }
        : { error: { tag: 'no-answer', val: `no answer: ${kind(e)}` } };
  }
  port.postMessage({ id: req.id, ...result });
  Atomics.store(signal, 0, req.id);
  Atomics.notify(signal, 0);
});
