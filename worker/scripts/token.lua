--[[ token: a consumer's read of one credential (worker.client), and on
request the nudge that makes a worker refresh it now.

KEYS[1]  cred   credential record
KEYS[2]  due    partition due set
KEYS[3]  lock   credential lock
ARGV[1]  id       credential id
ARGV[2]  seen     "" to only read; else the version the caller found too
                  close to expiry: ask for a refresh of that version
ARGV[3]  wake     wake channel (published to when a refresh was asked for)
ARGV[4]  format   optional: "json" returns one JSON object (below) instead of
                  the list; what non-Python consumers use (README
                  "Non-Python consumers"). This contract is stable: fields
                  are only ever added.
                  "cache" (with seen ""): the list, without reading the due
                  set (due_ms ""): worker.client's cached read, whose
                  connection has CLIENT TRACKING on; the due set changes on
                  every claim and would invalidate every cached entry.

Never returns the refresh token, the spend intent or the spent list: only
what a consumer may see.

Returns {} when there is no such credential, else
  { status, profile, version, access_token, token_type, expires_at, scope, extra,
    failures, reason, refreshed_at, due_ms, action, receivers }
or, with format "json", the text `null` (no such credential) or
  {"id", "status", "profile", "version", "access_token", "token_type",
   "expires_at", "scope", "extra", "failures", "reason", "refreshed_at",
   "due_at", "action", "receivers"}
with numbers as numbers (epoch ms for the times; due_at and refreshed_at
0 when unknown) and `extra` an object of strings (with encryption at
rest, README "Encryption at rest": `access_token` is its ciphertext,
`extra` is {} and "extra_encrypted" the ciphertext of the object),
where `action` says what the request did ("" when only reading):
  "moved"     the version is no longer `seen`: a refresh (or a put) landed
  "stopped"   the credential is not active: nothing to ask for
  "in_flight" a worker holds it (lock, or a spend intent still running):
              its commit is coming, nothing is moved
  "backoff"   the last attempt failed and the retry is scheduled at due_ms:
              the nudge never overrides a backoff (nor a Retry-After)
  "asked"     its due time is now (ZADD LT: only ever earlier; an active
              credential missing from the due set is scheduled again) and
              the wake channel was told; `receivers` = workers that heard it
The claim/spend/commit path does the rest, as for any due credential: this
script never locks or refreshes, so any number of callers cause one refresh.
]]
-- An encrypted value's text form (worker.codec), which JSON can carry: a
-- record holds it in the record form, one 0xFF byte, the key id, a dot and
-- the raw bytes; the text form is "e1.", the key id, a dot and the bytes in
-- unpadded base64url. Plain values are returned as they are.
local function text_form(v)
  if string.byte(v, 1) ~= 255 then return v end
  local dot = string.find(v, '.', 2, true)
  if not dot then return v end
  local alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_'
  local digit = {}
  for i = 1, 64 do digit[i - 1] = string.sub(alphabet, i, i) end
  local out, n, floor = { 'e1.', string.sub(v, 2, dot) }, 2, math.floor
  for i = dot + 1, #v, 3 do
    local a, b, c = string.byte(v, i, i + 2)
    local x = a * 65536 + (b or 0) * 256 + (c or 0)
    out[n + 1] = digit[floor(x / 262144)]
    out[n + 2] = digit[floor(x / 4096) % 64]
    n = n + 2
    if b then n = n + 1; out[n] = digit[floor(x / 64) % 64] end
    if c then n = n + 1; out[n] = digit[x % 64] end
  end
  return table.concat(out)
end

local ck, due_key, lk = KEYS[1], KEYS[2], KEYS[3]
local id, seen, wake, format = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local rec = rec_load(ck)
if not rec then
  if format == 'json' then return 'null' end
  return {}
end
local status = rec_get(rec, 'status') or 'active'
local version = rec_get(rec, 'version') or '0'
local failures = tonumber(rec_get(rec, 'failures') or '0')
local due = false
if format ~= 'cache' then due = redis.call('ZSCORE', due_key, id) end
local action, receivers = '', 0
if seen ~= '' then
  local now = now_ms()
  local deadline = tonumber(rec_get(rec, 'intent_deadline') or '0')
  if version ~= seen then
    action = 'moved'
  elseif status ~= 'active' then
    action = 'stopped'
  elseif redis.call('EXISTS', lk) == 1 or (rec_get(rec, 'intent') and deadline > now) then
    action = 'in_flight'
  elseif failures > 0 and due and tonumber(due) > now then
    action = 'backoff'
  else
    redis.call('ZADD', due_key, 'LT', now, id)
    due = redis.call('ZSCORE', due_key, id)
    receivers = redis.call('PUBLISH', wake, id)
    action = 'asked'
  end
end
if format == 'json' then
  local raw_extra = rec_get(rec, 'extra') or '{}'
  local ok, extra = pcall(cjson.decode, raw_extra)
  local sealed = nil
  if not ok or type(extra) ~= 'table' then
    extra = {}
    -- encrypted at rest (worker.keyring): the consumer holding the ring opens it
    if string.sub(raw_extra, 1, 3) == 'e1.' or string.byte(raw_extra, 1) == 255 then
      sealed = text_form(raw_extra)
    end
  end
  return cjson.encode({
    extra_encrypted = sealed,
    id = id, status = status, profile = rec_get(rec, 'profile') or '',
    version = tonumber(version), access_token = text_form(rec_get(rec, 'access_token') or ''),
    token_type = rec_get(rec, 'token_type') or '',
    expires_at = tonumber(rec_get(rec, 'expires_at') or '0'),
    scope = rec_get(rec, 'scope') or '', extra = extra, failures = failures,
    reason = rec_get(rec, 'reason') or '',
    refreshed_at = tonumber(rec_get(rec, 'refreshed_at') or '0'),
    due_at = tonumber(due or '0'), action = action, receivers = receivers,
  })
end
return {
  status, rec_get(rec, 'profile') or '', version,
  rec_get(rec, 'access_token') or '', rec_get(rec, 'token_type') or '',
  rec_get(rec, 'expires_at') or '0', rec_get(rec, 'scope') or '', rec_get(rec, 'extra') or '',
  tostring(failures), rec_get(rec, 'reason') or '', rec_get(rec, 'refreshed_at') or '',
  due or '', action, receivers,
}
