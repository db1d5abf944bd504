// Loopback-only oidc-provider peer for refreshd's interop tests.
//
// A strict refresh-token-rotation authorization server: every refresh
// rotates the refresh token, and presenting an already-rotated refresh
// token revokes the whole grant. Admin endpoints (not part of OIDC):
//
//   POST /__mint?n=N   mint N fresh grants (programmatic login + consent,
//                      then authorization_code + PKCE exchange)
//   GET  /__stats      counters, see `stats` below
//
// Usage: node server.mjs [--port N] [--client-id ID] [--client-secret S]
//                        [--access-token-ttl SECONDS] [--refresh-token-ttl SECONDS]
//                        [--exit-with-stdin]
// Environment fallbacks: OIDC_PEER_PORT, OIDC_PEER_CLIENT_ID,
// OIDC_PEER_CLIENT_SECRET, OIDC_PEER_ACCESS_TOKEN_TTL, OIDC_PEER_REFRESH_TOKEN_TTL.
// Pass the secret through the environment: argv is visible in `ps`.
//
// stdout carries exactly one line, the ready line; everything else
// (including oidc-provider's own notices) goes to stderr.

import { createHash, generateKeyPairSync, randomBytes } from 'node:crypto';
import { Agent, createServer, request as httpRequest } from 'node:http';
import { parseArgs } from 'node:util';

import Provider, { errors } from 'oidc-provider';

// oidc-provider prints its NOTICE lines with console.info (stdout); keep
// stdout for the ready line only.
console.info = console.error;
console.log = console.error;

const HOST = '127.0.0.1';
const SCOPE = 'openid offline_access';
const MAX_MINT = 500;
const MINT_CONCURRENCY = 16;

// ---------------------------------------------------------------- options

function positiveInt(name, raw, fallback, { allowZero = false } = {}) {
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < (allowZero ? 0 : 1)) {
    throw new Error(`${name} must be a ${allowZero ? 'non-negative' : 'positive'} integer`);
  }
  return value;
}

const { values: argv } = parseArgs({
  options: {
    port: { type: 'string' },
    'client-id': { type: 'string' },
    'client-secret': { type: 'string' },
    'access-token-ttl': { type: 'string' },
    'refresh-token-ttl': { type: 'string' },
    // Exit when stdin reaches EOF: lets a parent that dies without cleaning
    // up (SIGKILL) take the peer down with it.
    'exit-with-stdin': { type: 'boolean' },
  },
  strict: true,
});
const { env } = process;

const options = {
  port: positiveInt('port', argv.port ?? env.OIDC_PEER_PORT, 0, { allowZero: true }),
  clientId: argv['client-id'] ?? env.OIDC_PEER_CLIENT_ID ?? 'refreshd-interop',
  clientSecret: argv['client-secret'] ?? env.OIDC_PEER_CLIENT_SECRET,
  accessTokenTTL: positiveInt(
    'access-token-ttl',
    argv['access-token-ttl'] ?? env.OIDC_PEER_ACCESS_TOKEN_TTL,
    60,
  ),
  refreshTokenTTL: positiveInt(
    'refresh-token-ttl',
    argv['refresh-token-ttl'] ?? env.OIDC_PEER_REFRESH_TOKEN_TTL,
    14 * 24 * 60 * 60,
  ),
};
if (!options.clientSecret) {
  throw new Error('client secret missing: set OIDC_PEER_CLIENT_SECRET or --client-secret');
}
if (options.port > 65535) throw new Error('port out of range');

// ------------------------------------------------------------------ stats
//
// refreshes        successful grant_type=refresh_token token requests
// reuse            token requests (any outcome) with grant_type=refresh_token
//                  whose refresh_token this peer had already rotated, i.e.
//                  every re-send of a used refresh token. Detected by
//                  remembering each consumed refresh token forever and
//                  checking it on `grant.error`; oidc-provider's own
//                  detection is the "refresh token already used" path
//                  (it then destroys the token and revokes the grant), so
//                  a later replay of the same token reads "not found" and
//                  is counted too.
// reuse_by_reason  the same, split by oidc-provider's error_detail
// revoked          `grant.revoked` events + revocations by the
//                  concurrent-rotation guard in the adapter's consume();
//                  racing duplicates can revoke one grant more than once
// revoked_grants   distinct grants revoked
// errors           every token-endpoint error, "<error>: <error_detail>"
// minted           grants minted through /__mint

const stats = {
  minted: 0,
  refreshes: 0,
  reuse: 0,
  reuse_by_reason: {},
  revoked: 0,
  revoked_grants: 0,
  errors: {},
};

function bump(bucket, key) {
  bucket[key] = (bucket[key] ?? 0) + 1;
}

function errorKey(err) {
  const reason = err?.error_detail ?? err?.error_description ?? err?.message ?? 'unknown';
  return `${err?.error ?? err?.name ?? 'error'}: ${reason}`;
}

// ---------------------------------------------------------------- adapter
//
// Unbounded in-memory adapter. oidc-provider's bundled memory adapter is a
// ~1,000-entry LRU: rotated (consumed) refresh tokens fall out of it, and a
// replay then reads as "refresh token not found" instead of reuse, so no
// grant gets revoked. Nothing here is evicted except by expiry.

const epochTime = () => Math.floor(Date.now() / 1000);

const GRANTABLE = new Set([
  'AccessToken',
  'AuthorizationCode',
  'RefreshToken',
  'DeviceCode',
  'BackchannelAuthenticationRequest',
  'PreAuthorizedCode',
]);

const store = {
  models: new Map(), // model name -> Map(id -> { payload, expiresAt })
  grants: new Map(), // grantId -> Set("Model\0id")
  sessionUids: new Map(), // Session uid -> Session id
  userCodes: new Map(), // DeviceCode userCode -> DeviceCode id
  // Every refresh token ever rotated. Kept after the token itself is
  // destroyed or revoked so that any later presentation still counts as
  // reuse in /__stats (the provider then reports "not found").
  rotatedRefreshTokens: new Set(),
  // Revoked grants; tokens saved for them afterwards (by a request that was
  // already past its checks) are dropped.
  revokedGrants: new Set(),
};

function table(model) {
  let map = store.models.get(model);
  if (!map) {
    map = new Map();
    store.models.set(model, map);
  }
  return map;
}

function memberKey(model, id) {
  return `${model}\u0000${id}`;
}

function removeEntry(model, id) {
  const map = table(model);
  const entry = map.get(id);
  if (!entry) return;
  map.delete(id);
  const { payload } = entry;
  if (payload.grantId && GRANTABLE.has(model)) {
    const members = store.grants.get(payload.grantId);
    if (members) {
      members.delete(memberKey(model, id));
      if (members.size === 0) store.grants.delete(payload.grantId);
    }
  }
  if (model === 'Session' && payload.uid && store.sessionUids.get(payload.uid) === id) {
    store.sessionUids.delete(payload.uid);
  }
  if (payload.userCode && store.userCodes.get(payload.userCode) === id) {
    store.userCodes.delete(payload.userCode);
  }
}

function liveEntry(model, id) {
  if (typeof id !== 'string') return undefined;
  const entry = table(model).get(id);
  if (!entry) return undefined;
  if (entry.expiresAt <= Date.now()) {
    removeEntry(model, id);
    return undefined;
  }
  return entry;
}

function markRevoked(grantId) {
  if (!store.revokedGrants.has(grantId)) {
    store.revokedGrants.add(grantId);
    stats.revoked_grants += 1;
  }
  stats.revoked += 1;
}

function revokeWholeGrant(grantId) {
  markRevoked(grantId);
  for (const key of [...(store.grants.get(grantId) ?? [])]) {
    const sep = key.indexOf('\u0000');
    removeEntry(key.slice(0, sep), key.slice(sep + 1));
  }
  store.grants.delete(grantId);
  removeEntry('Grant', grantId);
}

class UnboundedMemoryAdapter {
  constructor(model) {
    this.model = model;
  }

  async upsert(id, payload, expiresIn) {
    if (GRANTABLE.has(this.model) && payload.grantId && store.revokedGrants.has(payload.grantId)) {
      return;
    }
    removeEntry(this.model, id);
    const expiresAt = typeof expiresIn === 'number' ? Date.now() + expiresIn * 1000 : Infinity;
    table(this.model).set(id, { payload: structuredClone(payload), expiresAt });
    if (GRANTABLE.has(this.model) && payload.grantId) {
      let members = store.grants.get(payload.grantId);
      if (!members) {
        members = new Set();
        store.grants.set(payload.grantId, members);
      }
      members.add(memberKey(this.model, id));
    }
    if (this.model === 'Session' && payload.uid) store.sessionUids.set(payload.uid, id);
    if (payload.userCode) store.userCodes.set(payload.userCode, id);
  }

  async find(id) {
    const entry = liveEntry(this.model, id);
    return entry ? structuredClone(entry.payload) : undefined;
  }

  async findByUid(uid) {
    return this.find(store.sessionUids.get(uid));
  }

  async findByUserCode(userCode) {
    return this.find(store.userCodes.get(userCode));
  }

  // oidc-provider checks `consumed` on the copy it read and consumes later,
  // awaiting other lookups (grant, account) in between. With this store
  // those awaits never yield to I/O, so same-token requests are in effect
  // serialized and the provider's own check sees every duplicate; but once
  // any of them does real I/O two requests interleave there and both rotate
  // (reproduced with a 5 ms findAccount). Consuming is therefore the atomic
  // check: a strict peer fails every loser as reuse and revokes the grant.
  async consume(id) {
    const entry = liveEntry(this.model, id);
    if (this.model !== 'RefreshToken') {
      if (entry) entry.payload.consumed = epochTime();
      return;
    }
    if (!entry || entry.payload.consumed) {
      if (!store.rotatedRefreshTokens.has(id)) {
        // Gone without having been rotated: its grant was revoked meanwhile.
        throw new errors.InvalidGrant('refresh token revoked during the request');
      }
      if (entry?.payload.grantId) revokeWholeGrant(entry.payload.grantId);
      throw new errors.InvalidGrant('refresh token already used (concurrent rotation)');
    }
    store.rotatedRefreshTokens.add(id);
    entry.payload.consumed = epochTime();
  }

  async destroy(id) {
    removeEntry(this.model, id);
  }

  async revokeByGrantId(grantId) {
    const members = store.grants.get(grantId);
    if (!members) return;
    const prefix = memberKey(this.model, '');
    for (const key of [...members]) {
      if (key.startsWith(prefix)) removeEntry(this.model, key.slice(prefix.length));
    }
  }
}

// Expired entries are removed lazily on read; sweep the rest now and then.
setInterval(() => {
  const now = Date.now();
  for (const [model, map] of store.models) {
    for (const [id, entry] of map) {
      if (entry.expiresAt <= now) removeEntry(model, id);
    }
  }
}, 30_000).unref();

// --------------------------------------------------------------- provider

function signingKey() {
  const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const jwk = privateKey.export({ format: 'jwk' });
  return { ...jwk, kid: randomBytes(8).toString('hex'), alg: 'ES256', use: 'sig' };
}

const redirectUri = `http://${HOST}/cb`;
// RFC 6749 2.3.1: client_id and secret are form-urlencoded before base64.
const formEncode = (v) => encodeURIComponent(v).replace(/%20/g, '+');
const basicAuth = `Basic ${Buffer.from(
  `${formEncode(options.clientId)}:${formEncode(options.clientSecret)}`,
).toString('base64')}`;

function buildProvider(issuer) {
  const provider = new Provider(issuer, {
    adapter: UnboundedMemoryAdapter,
    clients: [
      {
        client_id: options.clientId,
        client_secret: options.clientSecret,
        token_endpoint_auth_method: 'client_secret_basic',
        grant_types: ['authorization_code', 'refresh_token'],
        response_types: ['code'],
        redirect_uris: [redirectUri],
        id_token_signed_response_alg: 'ES256',
      },
    ],
    jwks: { keys: [signingKey()] },
    cookies: { keys: [randomBytes(32).toString('base64url')] },
    features: {
      devInteractions: { enabled: false },
    },
    pkce: { required: () => true },
    scopes: ['openid', 'offline_access'],
    async findAccount(ctx, sub) {
      return { accountId: sub, async claims() { return { sub }; } };
    },
    async loadExistingGrant(ctx) {
      const grantId = ctx.oidc.result?.consent?.grantId
        || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
      return grantId ? ctx.oidc.provider.Grant.find(grantId) : undefined;
    },
    issueRefreshToken: () => true,
    rotateRefreshToken: true,
    revokeGrantPolicy: () => true,
    expiresWithSession: () => false,
    ttl: {
      AccessToken: options.accessTokenTTL,
      AuthorizationCode: 60,
      IdToken: 3600,
      Interaction: 600,
      Session: 3600,
      // Never shorter than the refresh tokens: an expired grant would read
      // as "grant not found" and mask refresh-token expiry.
      Grant: Math.max(options.refreshTokenTTL, 14 * 24 * 60 * 60),
      RefreshToken: options.refreshTokenTTL,
    },
    interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
    clientBasedCORS: () => false,
    async renderError(ctx, out) {
      ctx.type = 'json';
      ctx.body = out;
    },
  });

  provider.on('grant.success', (ctx) => {
    if (ctx.oidc.params?.grant_type === 'refresh_token') stats.refreshes += 1;
  });
  provider.on('grant.error', (ctx, err) => {
    const key = errorKey(err);
    bump(stats.errors, key);
    const params = ctx.oidc?.params;
    if (
      params?.grant_type === 'refresh_token'
      && typeof params.refresh_token === 'string'
      && store.rotatedRefreshTokens.has(params.refresh_token)
    ) {
      stats.reuse += 1;
      bump(stats.reuse_by_reason, err?.error_detail ?? key);
    }
  });
  provider.on('grant.revoked', (ctx, grantId) => markRevoked(grantId));
  provider.on('server_error', (ctx, err) => {
    bump(stats.errors, `server_error: ${err?.message ?? 'unknown'}`);
    console.error(`oidc-peer: server_error on ${ctx.method} ${ctx.path}: ${err?.stack ?? err}`);
  });
  return provider;
}

// ----------------------------------------------------- programmatic login
//
// A grant is minted the way a browser would get one, minus the browser:
//   1. GET  /auth?...&prompt=consent&code_challenge=...  -> 303 /interaction/:uid
//   2. the interaction is approved in-process (login as a fresh account,
//      consent to every requested scope) -- same as GET /interaction/:uid
//   3. GET  /auth/:uid (resume, with the interaction cookies)  -> 303 redirect_uri?code=
//   4. POST /token grant_type=authorization_code + code_verifier (client_secret_basic)
// Requests go over loopback HTTP through a keep-alive agent; global fetch
// costs ~3x more per request here.

let accountSeq = 0;

async function approve(provider, interaction) {
  const accountId = `account-${++accountSeq}`;
  const grant = new provider.Grant({ accountId, clientId: interaction.params.client_id });
  grant.addOIDCScope(interaction.params.scope);
  const grantId = await grant.save();
  return { login: { accountId }, consent: { grantId } };
}

// GET /interaction/:uid, for a client that follows redirects itself.
async function approveInteraction(provider, req, res) {
  const interaction = await provider.interactionDetails(req, res);
  const result = await approve(provider, interaction);
  await provider.interactionFinished(req, res, result, { mergeWithLastSubmission: false });
}

// Same as interactionResult(), addressed by uid rather than by cookie.
async function approveByUid(provider, uid) {
  const interaction = await provider.Interaction.find(uid);
  if (!interaction) throw new Error('mint: interaction not found');
  interaction.result = await approve(provider, interaction);
  await interaction.save(interaction.exp - epochTime());
}

const agent = new Agent({ keepAlive: true, maxSockets: 64 });

function call(base, method, path, { headers = {}, body } = {}) {
  return new Promise((resolve, reject) => {
    const url = new URL(path, base);
    const req = httpRequest(
      { host: url.hostname, port: url.port, path: url.pathname + url.search, method, headers, agent },
      (res) => {
        const chunks = [];
        res.on('data', (c) => chunks.push(c));
        res.on('end', () => resolve({
          status: res.statusCode,
          headers: res.headers,
          body: Buffer.concat(chunks).toString('utf8'),
        }));
        res.on('error', reject);
      },
    );
    req.on('error', reject);
    req.end(body);
  });
}

function expectRedirect(response, what) {
  if (response.status !== 303 && response.status !== 302) {
    throw new Error(`mint: ${what}: expected a redirect, got ${response.status} ${response.body.slice(0, 200)}`);
  }
  return response.headers.location;
}

function cookiesOf(response) {
  return (response.headers['set-cookie'] ?? []).map((line) => line.split(';', 1)[0]).join('; ');
}

async function mintOne(provider, base) {
  const verifier = randomBytes(32).toString('base64url');
  const challenge = createHash('sha256').update(verifier).digest('base64url');
  const state = randomBytes(8).toString('base64url');
  const query = new URLSearchParams({
    client_id: options.clientId,
    response_type: 'code',
    redirect_uri: redirectUri,
    scope: SCOPE,
    prompt: 'consent',
    state,
    code_challenge: challenge,
    code_challenge_method: 'S256',
  });

  const authorize = await call(base, 'GET', `/auth?${query}`);
  const interactionPath = expectRedirect(authorize, 'authorization request');
  const uid = /^\/interaction\/([^/?#]+)$/.exec(interactionPath)?.[1];
  if (!uid) throw new Error(`mint: unexpected interaction location ${interactionPath}`);
  await approveByUid(provider, uid);

  const resume = await call(base, 'GET', `/auth/${uid}`, { headers: { cookie: cookiesOf(authorize) } });
  const callback = new URL(expectRedirect(resume, 'resume'), base);
  if (callback.origin + callback.pathname !== redirectUri || callback.searchParams.get('state') !== state) {
    throw new Error('mint: unexpected authorization response');
  }
  const code = callback.searchParams.get('code');
  if (!code) throw new Error(`mint: authorization failed: ${callback.searchParams.get('error')}`);

  const exchange = await call(base, 'POST', '/token', {
    headers: {
      authorization: basicAuth,
      'content-type': 'application/x-www-form-urlencoded',
    },
    body: new URLSearchParams({
      grant_type: 'authorization_code',
      code,
      redirect_uri: redirectUri,
      code_verifier: verifier,
    }).toString(),
  });
  const tokens = JSON.parse(exchange.body);
  if (exchange.status !== 200 || !tokens.refresh_token) {
    throw new Error(`mint: code exchange failed: ${exchange.status} ${tokens.error ?? ''}`);
  }
  stats.minted += 1;
  return {
    access_token: tokens.access_token,
    refresh_token: tokens.refresh_token,
    expires_in: tokens.expires_in,
    scope: tokens.scope,
  };
}

async function mint(provider, base, n) {
  const out = new Array(n);
  let next = 0;
  async function worker() {
    while (next < n) {
      const i = next;
      next += 1;
      out[i] = await mintOne(provider, base);
    }
  }
  await Promise.all(Array.from({ length: Math.min(MINT_CONCURRENCY, n) }, worker));
  return out;
}

// ------------------------------------------------------------------ admin

function sendJson(res, status, body) {
  const data = JSON.stringify(body);
  res.writeHead(status, {
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(data),
    'cache-control': 'no-store',
  });
  res.end(data);
}

async function admin(provider, base, req, res, url) {
  if (url.pathname === '/__stats' && req.method === 'GET') {
    sendJson(res, 200, stats);
    return;
  }
  if (url.pathname === '/__mint' && req.method === 'POST') {
    req.resume();
    const raw = url.searchParams.get('n') ?? '1';
    const n = Number(raw);
    if (!Number.isInteger(n) || n < 1 || n > MAX_MINT) {
      sendJson(res, 400, { error: `n must be an integer in 1..${MAX_MINT}` });
      return;
    }
    sendJson(res, 200, await mint(provider, base, n));
    return;
  }
  sendJson(res, 404, { error: 'not found' });
}

// ----------------------------------------------------------------- server

const server = createServer();
server.keepAliveTimeout = 30_000;

server.listen(options.port, HOST, () => {
  const { port } = server.address();
  const issuer = `http://${HOST}:${port}`;
  const provider = buildProvider(issuer);
  const oidc = provider.callback();

  server.on('request', (req, res) => {
    const url = new URL(req.url, issuer);
    let handled;
    if (url.pathname.startsWith('/__')) {
      handled = admin(provider, issuer, req, res, url);
    } else if (url.pathname.startsWith('/interaction/') && req.method === 'GET') {
      handled = approveInteraction(provider, req, res);
    } else {
      oidc(req, res);
      return;
    }
    handled.catch((err) => {
      console.error(`oidc-peer: ${req.method} ${url.pathname} failed: ${err?.stack ?? err}`);
      if (!res.headersSent) sendJson(res, 500, { error: String(err?.message ?? err) });
      else res.destroy();
    });
  });

  process.stdout.write(`${JSON.stringify({ ready: true, port, issuer })}\n`);
});

server.on('error', (err) => {
  console.error(`oidc-peer: ${err.message}`);
  process.exit(1);
});

function shutdown() {
  server.close();
  server.closeAllConnections();
  process.exit(0);
}
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, shutdown);
if (argv['exit-with-stdin']) {
  process.stdin.on('end', shutdown);
  process.stdin.on('error', shutdown);
  process.stdin.resume();
}
