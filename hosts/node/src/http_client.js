// A synchronous POST for the synchronous `token-endpoint` import: the HTTP
// runs in a worker thread (http_worker.js) while this thread waits on a
// SharedArrayBuffer, then takes the answer off a MessagePort without
// returning to the event loop. One worker per process, started on the first
// refresh, unref'd so that it never keeps a process alive.

import { MessageChannel, Worker, receiveMessageOnPort } from 'node:worker_threads';

/**
 * How long past the provider's own deadline the worker may take to say so:
 * short, as the caller holds the row's lock meanwhile and waiters give up
 * at the lock wait.
 */
const MARGIN_MS = 1_000;

let worker;
let port;
let signal;
let sequence = 0;

function ensureWorker() {
  if (worker) return;
  const channel = new MessageChannel();
  signal = new Int32Array(new SharedArrayBuffer(4));
  const w = new Worker(new URL('./http_worker.js', import.meta.url), {
    workerData: { port: channel.port2, signal },
    transferList: [channel.port2],
    // The worker needs no environment of its own: the proxy settings come
    // with each request, read when it is sent (as the Rust host reads them).
    env: {},
    stdout: true,
    stderr: true,
  });
  w.unref();
  // Only the worker that failed is stopped (a later one may be running).
  w.on('error', () => {
    if (worker === w) stopWorker();
  });
  w.on('exit', () => {
    if (worker === w) stopWorker();
  });
  worker = w;
  port = channel.port1;
  port.unref();
}

function proxyEnvironment() {
  const env = {};
  for (const name of ['HTTPS_PROXY', 'https_proxy', 'NO_PROXY', 'no_proxy']) {
    if (process.env[name] !== undefined) env[name] = process.env[name];
  }
  return env;
}

function stopWorker() {
  const w = worker;
  worker = undefined;
  port?.close();
  port = undefined;
  w?.terminate().catch(() => {});
}

/**
 * POSTs `body` to `url` and waits for the outcome: `{answer: {status,
 * contentType, retryAfter, body}}` or `{error: {tag, val}}` with a WIT
 * `request-error` tag.
 */
export function postSync({ url, headers, body, timeoutMs, maxBytes, ca }) {
  ensureWorker();
  const id = (sequence = (sequence % 0x7ffffffe) + 1);
  worker.postMessage({ id, url, headers, body, timeoutMs, maxBytes, ca, proxyEnv: proxyEnvironment() });
  const until = Date.now() + timeoutMs + MARGIN_MS;
  // Whether the worker took the request: one it never took was never sent.
  let taken = false;
  for (;;) {
    Atomics.store(signal, 0, 0);
    for (let m = receiveMessageOnPort(port); m; m = receiveMessageOnPort(port)) {
      if (m.message.id !== id) continue;
      if (m.message.taken) {
        taken = true;
        continue;
      }
      const { answer, error } = m.message;
      if (answer) answer.body = Buffer.from(answer.body);
      return answer ? { answer } : { error };
    }
    const left = until - Date.now();
    if (left <= 0) {
      stopWorker();
      // A stuck worker may have reached the provider; one that never took
      // the request (it did not start, or died first) sent nothing.
      return taken
        ? { error: { tag: 'no-answer', val: 'timed out' } }
        : { error: { tag: 'not-sent', val: 'the request was never sent: the HTTP worker did not take it' } };
    }
    Atomics.wait(signal, 0, 0, left);
  }
}
