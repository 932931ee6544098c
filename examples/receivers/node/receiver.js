// A webhookd receiver to copy: checks the secret (and the signature, if the tenant signs),
// answers 200 at once, and processes each webhook once, in order, behind a queue.
//
//     WEBHOOK_SECRET=s3cr3t node receiver.js
//
// Environment:
//     WEBHOOK_SECRET          the tenant's shared secret (required)
//     WEBHOOK_SIGNING_SECRET  the tenant's signing_secret ("whsec_..."), if it has one
//     LISTEN_HOST, PORT       where to listen (default 127.0.0.1 and 8000)
//     WEBHOOK_STATE_FILE      a file keeping the last processed sequence across restarts
//     WEBHOOK_OUTPUT          a file to append a JSON line to per processed webhook (default:
//                             standard output); replace processWebhook with your own work
//
// Node.js 18.2 or later; nothing from npm.
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const http = require('node:http');

const TOLERANCE = 5 * 60; // seconds a signature's timestamp may be off, as Standard Webhooks says
const MAX_BODY = 64 * 1024 * 1024; // a batch holds up to batch_size (at most 1000) webhooks

const secret = Buffer.from(process.env.WEBHOOK_SECRET || '');
if (secret.length === 0) fail("set WEBHOOK_SECRET to the tenant's shared secret");
const signingSecret = process.env.WEBHOOK_SIGNING_SECRET;
let signingKey = null;
if (signingSecret) {
  // Fail now rather than answer 401 to every request (Buffer.from skips bad characters).
  const encoded = signingSecret.replace(/^whsec_/, '');
  if (!/^[A-Za-z0-9+/]+={0,2}$/.test(encoded) || encoded.length % 4 !== 0) {
    fail('WEBHOOK_SIGNING_SECRET is not whsec_<base64>');
  }
  signingKey = Buffer.from(encoded, 'base64');
}
const stateFile = process.env.WEBHOOK_STATE_FILE;
const output = process.env.WEBHOOK_OUTPUT;

function fail(message) {
  console.error(message);
  process.exit(1);
}

// Constant-time equality (of strings, as UTF-8, or Buffers), so response times do not leak
// how much of a guess was right. timingSafeEqual wants equal lengths: compare SHA-256
// digests, which always are.
function same(given, expected) {
  const digest = (bytes) => crypto.createHash('sha256').update(bytes).digest();
  return crypto.timingSafeEqual(digest(given), digest(expected));
}

// Node reads header values as latin1: Buffer.from(value, 'latin1') gives back the bytes sent.
const headerBytes = (value) => Buffer.from(value || '', 'latin1');

// Standard Webhooks: webhook-signature holds one or more (space-separated, while a secret
// rotates) "v1,<base64 HMAC-SHA256(key, '<webhook-id>.<webhook-timestamp>.<body>')>".
function signatureOk(headers, body) {
  const timestamp = headers['webhook-timestamp'] || '';
  if (!/^\d+$/.test(timestamp) || Math.abs(Date.now() / 1000 - Number(timestamp)) > TOLERANCE) {
    return false; // a replay of an old request (or a clock far off)
  }
  const signed = Buffer.concat([
    headerBytes(headers['webhook-id']), Buffer.from(`.${timestamp}.`), body,
  ]);
  const expected = crypto.createHmac('sha256', signingKey).update(signed).digest('base64');
  return (headers['webhook-signature'] || '').split(' ').some((part) => {
    const [version, signature] = part.split(',');
    return version === 'v1' && signature !== undefined && same(signature, expected);
  });
}

// One webhook object, or (batched) a JSON array of them, oldest first; null if neither.
function parse(body) {
  let document;
  try {
    document = JSON.parse(body.toString('utf8'));
  } catch {
    return null;
  }
  const webhooks = Array.isArray(document) ? document : [document];
  const valid = (w) => w !== null && typeof w === 'object' && Number.isInteger(w.sequence);
  return webhooks.length > 0 && webhooks.every(valid) ? webhooks : null;
}

// The worker: processes webhooks in order and skips any sequence at or below the last one
// processed (webhookd sends at least once, so a webhook may come again after a timeout or a
// crash on either side).
const queue = [];
let last = stateFile && fs.existsSync(stateFile) ? Number(fs.readFileSync(stateFile, 'utf8')) : 0;
if (!Number.isInteger(last)) fail(`${stateFile} does not hold a sequence number`);
let draining = false;

function enqueue(webhooks) {
  queue.push(...webhooks);
  if (!draining) {
    draining = true;
    setImmediate(drain); // after the 200 has been written
  }
}

async function drain() {
  while (queue.length > 0) {
    const webhook = queue.shift();
    if (webhook.sequence <= last) continue; // already processed: a re-send
    if (last && webhook.sequence > last + 1) {
      // webhookd's only gaps are webhooks an operator parked (never delivered).
      console.error(`gap: ${last + 1}-${webhook.sequence - 1} not received`);
    }
    await processUntilDone(webhook);
    save(webhook.sequence);
  }
  draining = false;
}

// The 200 has gone, so webhookd will not send this again: retry here, holding later webhooks
// behind it to keep the order.
async function processUntilDone(webhook) {
  for (let delay = 1000; ; delay = Math.min(delay * 2, 60000)) {
    try {
      return await processWebhook(webhook);
    } catch (error) {
      console.error(error);
      await new Promise((resolve) => setTimeout(resolve, delay));
    }
  }
}

// Your work goes here. If it can crash after acting but before save(), the webhook is
// processed again at restart: make it idempotent or save in the same transaction.
async function processWebhook(webhook) {
  const { sequence, id, event, timestamp, data } = webhook; // never print webhook.secret
  const line = JSON.stringify({ sequence, id, event, timestamp, data }) + '\n';
  if (output) await fs.promises.appendFile(output, line);
  else process.stdout.write(line);
}

function save(sequence) {
  last = sequence;
  if (stateFile) {
    fs.writeFileSync(`${stateFile}.tmp`, String(sequence));
    fs.renameSync(`${stateFile}.tmp`, stateFile); // atomic: a crash leaves old or new, whole
  }
}

function refuse(res, status, error, detail) {
  res.writeHead(status, { 'Content-Type': 'application/json' });
  res.end(JSON.stringify({ error, detail }));
}

async function receive(req, res) {
  if (req.method !== 'POST') return refuse(res, 405, 'method_not_allowed', 'POST only.');
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > MAX_BODY) {
      res.setHeader('Connection', 'close');
      return refuse(res, 413, 'too_large', 'The body is too large.');
    }
    chunks.push(chunk);
  }
  const body = Buffer.concat(chunks);
  // A tenant with authorization_header = false sends no header: the secret in each webhook
  // (checked below) is then the only one.
  const header = req.headers.authorization;
  const bearer = Buffer.concat([Buffer.from('Bearer '), secret]);
  if (header !== undefined && !same(headerBytes(header), bearer)) {
    return refuse(res, 401, 'unauthorized', 'The bearer secret is wrong.');
  }
  if (signingKey && !signatureOk(req.headers, body)) {
    return refuse(res, 401, 'bad_signature', 'The webhook-signature does not verify.');
  }
  const webhooks = parse(body);
  if (webhooks === null) {
    return refuse(res, 400, 'bad_body', 'The body is not a webhook or an array of them.');
  }
  if (!webhooks.every((w) => typeof w.secret === 'string' && same(w.secret, secret))) {
    return refuse(res, 401, 'unauthorized', 'A webhook carries the wrong secret.');
  }
  // Answer at once (webhookd waits 5 s for a batch, 10 s for one, by default); work later.
  // This queue lives in memory: webhooks accepted but not yet processed are lost if the
  // process dies. In production, put them in a durable queue (a database table, Redis,
  // SQS...) here, before answering, and run the worker in a process of its own.
  enqueue(webhooks);
  res.end('ok');
}

const host = process.env.LISTEN_HOST || '127.0.0.1';
const port = Number(process.env.PORT || 8000);
const server = http.createServer((req, res) => {
  receive(req, res).catch((error) => {
    console.error(error);
    if (!res.headersSent) refuse(res, 500, 'internal', 'The receiver failed.');
  });
});
server.listen(port, host, () => console.error(`listening on http://${host}:${port}`));
// Stop taking requests; Node exits once the queue has drained and connections have closed.
for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => {
    server.close();
    server.closeIdleConnections(); // Node 18 leaves kept-alive ones open until they time out
  });
}
