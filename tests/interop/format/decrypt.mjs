// Decrypts refreshd's text form the way README "The format" describes it,
// with node's own crypto and zlib: what a consumer in another language does.
// stdin: {"key": base64, "values": [{"stored", "prefix", "kind", "record", "field"}]}
// stdout: the plaintexts, a JSON list.
import crypto from "node:crypto";
import { readFileSync } from "node:fs";
import zlib from "node:zlib";

function counted(text) {
  const bytes = Buffer.from(text, "utf8");
  return Buffer.concat([Buffer.from(`${bytes.length}:`, "ascii"), bytes]);
}

function unpackBase64url(data) {
  const segments = [];
  let at = 0;
  while (at < data.length) {
    const length = data.readUInt16BE(at);
    const size = Math.ceil(length / 4) * 3;
    const text = data.subarray(at + 2, at + 2 + size).toString("base64");
    segments.push(text.slice(0, length).replaceAll("+", "-").replaceAll("/", "_"));
    at += 2 + size;
  }
  return segments.join(".");
}

function decrypt(key, v) {
  if (!v.stored.startsWith("e1.")) throw new Error("not the text form");
  const rest = v.stored.slice(3);
  const dot = rest.indexOf(".");
  const kid = rest.slice(0, dot);
  const raw = Buffer.from(rest.slice(dot + 1), "base64url");
  const nonce = raw.subarray(0, 12);
  const tag = raw.subarray(raw.length - 16);
  const aad = Buffer.concat([
    Buffer.from(`e1.${kid}.`, "ascii"),
    counted(v.prefix), counted(v.kind), counted(v.record), counted(v.field),
  ]);
  const decipher = crypto.createDecipheriv("aes-256-gcm", key, nonce);
  decipher.setAAD(aad);
  decipher.setAuthTag(tag);
  const plain = Buffer.concat([decipher.update(raw.subarray(12, raw.length - 16)), decipher.final()]);
  const payload = plain.subarray(1);
  switch (plain[0]) {
    case 0: return payload.toString("utf8");
    case 1: return zlib.inflateRawSync(payload).toString("utf8");
    case 2: return unpackBase64url(payload);
    default: throw new Error(`unknown payload kind ${plain[0]}`);
  }
}

const input = JSON.parse(readFileSync(0, "utf8"));
const key = Buffer.from(input.key, "base64");
process.stdout.write(JSON.stringify(input.values.map((v) => decrypt(key, v))));
