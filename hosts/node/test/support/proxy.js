#!/usr/bin/env node
// A CONNECT proxy for the tests: it opens tunnels to loopback addresses
// only, appends each tunnel's target to the log file, and prints
// `listening PORT` once it answers.

import { appendFileSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';

const [logFile] = process.argv.slice(2);
writeFileSync(logFile, '');
const server = http.createServer((req, res) => {
  res.writeHead(405);
  res.end();
});
server.on('connect', (req, client, head) => {
  appendFileSync(logFile, `${req.url}\n`);
  const [host, port] = req.url.split(':');
  if (host !== '127.0.0.1') {
    client.end('HTTP/1.1 403 Forbidden\r\n\r\n');
    return;
  }
  const upstream = net.connect(Number(port), host, () => {
    client.write('HTTP/1.1 200 Connection Established\r\n\r\n');
    if (head.length) upstream.write(head);
    upstream.pipe(client);
    client.pipe(upstream);
  });
  upstream.on('error', () => client.destroy());
  client.on('error', () => upstream.destroy());
});
server.listen(0, '127.0.0.1', () => process.stdout.write(`listening ${server.address().port}\n`));
process.on('SIGTERM', () => process.exit(0));
