// The user at a browser: opens the URL it is given, follows redirects with
// its cookies, submits the one form a page asks it to (a device code's
// confirmation), and stops where the server sends it back to the client (a
// loopback redirect, which it opens, handing over the code) or at the
// device flow's success page. Usable as $BROWSER: `node user.mjs URL`.
//
// Exits 0 when the flow reached the client or the success page, 1 otherwise,
// with one line on stderr.

const start = process.argv[2];
if (!start) {
  process.stderr.write('usage: node user.mjs URL\n');
  process.exit(2);
}
const origin = new URL(start).origin;
const jar = new Map();

async function go(url, init = {}) {
  const headers = { ...(init.headers ?? {}) };
  if (jar.size && new URL(url).origin === origin) {
    headers.cookie = [...jar].map(([k, v]) => `${k}=${v}`).join('; ');
  }
  const res = await fetch(url, { ...init, headers, redirect: 'manual' });
  for (const c of res.headers.getSetCookie()) {
    const [pair] = c.split(';');
    const eq = pair.indexOf('=');
    jar.set(pair.slice(0, eq).trim(), pair.slice(eq + 1).trim());
  }
  return res;
}

function form(html) {
  const m = html.match(/<form[^>]*method="post"[^>]*action="([^"]*)"[^>]*>([\s\S]*?)<\/form>/i);
  if (!m) return undefined;
  const fields = new URLSearchParams();
  for (const input of m[2].matchAll(/<input[^>]*name="([^"]*)"[^>]*value="([^"]*)"[^>]*>/gi)) {
    fields.set(input[1], input[2]);
  }
  return { action: m[1], fields };
}

let url = start;
let init = {};
for (let step = 0; step < 20; step += 1) {
  const res = await go(url, init);
  init = {};
  if (res.status >= 300 && res.status < 400) {
    const next = new URL(res.headers.get('location'), url);
    if (next.origin !== origin) {
      // Back to the client: deliver the code (or the error) to it.
      const delivered = await fetch(next);
      process.exit(delivered.ok ? 0 : 1);
    }
    url = next.href;
    continue;
  }
  const html = await res.text();
  if (/Sign-in Success/.test(html)) process.exit(0);
  const f = res.status === 200 && form(html);
  if (!f) {
    process.stderr.write(`user.mjs: stuck at ${new URL(url).pathname} (status ${res.status})\n`);
    process.exit(1);
  }
  url = new URL(f.action, url).href;
  init = { method: 'POST', body: f.fields, headers: { 'content-type': 'application/x-www-form-urlencoded' } };
}
process.stderr.write('user.mjs: too many steps\n');
process.exit(1);
