// A refreshd consumer written without Python (node-redis, raw commands, so
// each step reads like the README "Non-Python consumers" describes it):
//   1. read a token through refreshd's token script (EVALSHA, JSON reply);
//   2. ask for a min-TTL refresh (the same script, with the version seen);
//   3. follow the durable event log from a cursor (XREAD over every
//      partition's stream) until the refresh's event arrives;
//   4. read the token again and see the new version.
// Prints one JSON line: versions, the event's fields, the cursor after it,
// and SHA-256 digests of the access tokens (never a token itself).
//
// Environment: REDIS_URL (the consumer's ACL user), SCRIPT_FILE (output of
// `refreshd consumer script`), CREDENTIAL_ID, CURSOR (where to follow from),
// PREFIX (default "refreshd:"), PARTITIONS (default 16), MIN_TTL (s, default 60),
// TIMEOUT (s, default 15).
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { crc32 } from "node:zlib";
import { createClient } from "redis";

const env = process.env;
const prefix = env.PREFIX ?? "refreshd:";
const partitions = Number(env.PARTITIONS ?? "16");
const id = env.CREDENTIAL_ID;
const minTtlMs = Number(env.MIN_TTL ?? "60") * 1000;
const deadline = Date.now() + Number(env.TIMEOUT ?? "15") * 1000;
const source = readFileSync(env.SCRIPT_FILE, "utf8");

const digest = (text) => createHash("sha256").update(text).digest("hex");
const tag = (n) => `{${prefix}${n}}:`;
const streams = Array.from({ length: partitions }, (_, n) => `${tag(n)}log`);

const redis = createClient({ url: env.REDIS_URL });
redis.on("error", (err) => console.error(`redis: ${err.message}`));
await redis.connect();

let sha = await redis.sendCommand(["SCRIPT", "LOAD", source]);

// token.lua: KEYS cred, due, lock of the credential's partition (crc32 of the
// id modulo the partition count); ARGV id, seen version ("" = only read),
// wake channel, "json".
async function token(seen = "") {
  const part = tag(crc32(id) % partitions);
  const args = [`${part}cred:${id}`, `${part}due`, `${part}lock:${id}`, id, seen, `${prefix}wake`, "json"];
  let reply;
  try {
    reply = await redis.sendCommand(["EVALSHA", sha, "3", ...args]);
  } catch (err) {
    if (!String(err.message).startsWith("NOSCRIPT")) throw err;
    sha = await redis.sendCommand(["SCRIPT", "LOAD", source]); // after a restart or failover
    reply = await redis.sendCommand(["EVALSHA", sha, "3", ...args]);
  }
  return JSON.parse(reply); // null: no such credential
}

// A cursor is "1:<id0>,<id1>,...": one stream id per partition, in order.
function parseCursor(cursor) {
  const [format, ids] = cursor.split(":", 2);
  if (format !== "1") throw new Error(`cursor format ${format} unknown`);
  const positions = ids.split(",");
  if (positions.length !== partitions) throw new Error("cursor is for another partition count");
  return positions;
}

const before = await token();
if (before === null) throw new Error(`no credential ${id}`);
let positions = parseCursor(env.CURSOR);

let asked = null;
if (before.expires_at - Date.now() <= minTtlMs) {
  asked = await token(String(before.version)); // action: asked, in_flight, moved, ...
}

// Follow the log: XREAD BLOCK over every partition's stream; entry fields
// v, type, id, version, json.
let event = null;
while (event === null && Date.now() < deadline) {
  const reply = await redis.sendCommand([
    "XREAD", "COUNT", "100", "BLOCK", "1000", "STREAMS", ...streams, ...positions,
  ]);
  // RESP2 replies [[stream, entries], ...]; node-redis may hand a map as an object
  const byStream = Array.isArray(reply) ? reply : Object.entries(reply ?? {});
  for (const [stream, entries] of byStream) {
    const n = streams.indexOf(stream);
    for (const [entryId, flat] of entries) {
      positions[n] = entryId;
      const fields = {};
      for (let i = 0; i < flat.length; i += 2) fields[flat[i]] = flat[i + 1];
      if (fields.id === id && Number(fields.version) > before.version && event === null) {
        event = { ...fields, json: JSON.parse(fields.json) };
      }
    }
  }
}

const after = await token();
await redis.quit();
console.log(JSON.stringify({
  before: { version: before.version, status: before.status, token_sha256: digest(before.access_token) },
  asked: asked && { action: asked.action, receivers: asked.receivers },
  event: event && {
    v: event.v, type: event.type, id: event.id, version: Number(event.version),
    json_version: event.json.version, json_type: event.json.type,
    token_sha256: digest(event.json.access_token ?? ""),
  },
  cursor: `1:${positions.join(",")}`,
  after: {
    version: after.version, status: after.status, expires_at: after.expires_at,
    token_sha256: digest(after.access_token), keys: Object.keys(after).sort(),
  },
}));
process.exit(event === null ? 1 : 0);
