--[[ record: the credential record, shared by every credential script (the
loader puts this file in front of each one).

A credential is one string value: a MessagePack map with short keys. As a
hash, its token-sized values (over 64 bytes) pushed it out of the compact
listpack encoding, and each of its ~15 fields cost ~60 bytes of overhead;
packed, a credential with 900 bytes of tokens fits one 1 KiB allocation.

Scripts read the record once (rec_load), work on it as they would on a hash
(rec_get / rec_set / rec_del / rec_incr, by the field names the store
documents), and write it once (rec_save). Numeric fields are kept as
numbers (9 bytes for a millisecond timestamp instead of 14 as text); rec_get
returns text, as HGET did, so comparisons with ARGV strings are unchanged.
An empty value is stored as no value: rec_get then returns false, which
every script already treats as "".
]]
local REC_KEYS = {
  profile = 'p', status = 's', version = 'v',
  access_token = 'a', refresh_token = 'r', token_type = 't', scope = 'sc',
  expires_at = 'x', refresh_expires_at = 'rx', params = 'pa', extra = 'e',
  failures = 'f', last_error = 'le', last_error_at = 'la', reason = 'rs',
  created_at = 'c', updated_at = 'u', refreshed_at = 'ra',
  intent = 'i', intent_rt = 'ir', intent_deadline = 'id', intent_at = 'ia',
  ambiguous_token = 'at', ambiguous_at = 'aa', spent_rt = 'sr', granted_scope = 'gs',
  failing_since = 'fs',
}
local REC_NUMBERS = {
  version = true, expires_at = true, refresh_expires_at = true, failures = true,
  last_error_at = true, created_at = true, updated_at = true, refreshed_at = true,
  intent_deadline = true, intent_at = true, ambiguous_at = true,
  failing_since = true,
}

local function rec_key(name)
  local short = REC_KEYS[name]
  if not short then error('unknown credential field: ' .. tostring(name)) end
  return short
end

local function rec_load(key)
  local raw = redis.call('GET', key)
  if not raw then return nil end
  return cmsgpack.unpack(raw)
end

local function rec_save(key, rec)
  redis.call('SET', key, cmsgpack.pack(rec))
end

local function rec_get(rec, name)
  local value = rec[rec_key(name)]
  if value == nil then return false end
  return tostring(value)
end

local function rec_set(rec, name, value)
  local short = rec_key(name)
  if value == '' or value == nil then
    rec[short] = nil
  elseif REC_NUMBERS[name] then
    rec[short] = tonumber(value) or value
  else
    rec[short] = value
  end
end

-- spent_rt: fingerprints of the last SPENT_KEEP refresh tokens a rotation
-- replaced, newest first, SPENT_LEN hex digits each (a few bytes per record,
-- and only once a credential has rotated), so that an import can never
-- write a spent token back.
local SPENT_LEN, SPENT_KEEP = 8, 2

local function rec_push_spent(rec, fp)
  local short = string.sub(fp, 1, SPENT_LEN)
  if #short < SPENT_LEN then return end
  local old = rec_get(rec, 'spent_rt') or ''
  if string.sub(old, 1, SPENT_LEN) == short then return end
  rec_set(rec, 'spent_rt', string.sub(short .. old, 1, SPENT_LEN * SPENT_KEEP))
end

local function rec_is_spent(rec, fp)
  local short = string.sub(fp, 1, SPENT_LEN)
  local spent = rec_get(rec, 'spent_rt') or ''
  for i = 1, #spent, SPENT_LEN do
    if string.sub(spent, i, i + SPENT_LEN - 1) == short then return true end
  end
  return false
end

-- field, value, field, value ... (as HSET takes them); a `spent_rt` value
-- is added to the spent list rather than replacing it
local function rec_set_pairs(rec, list, first)
  for i = first, #list, 2 do
    if list[i] == 'spent_rt' then
      rec_push_spent(rec, list[i + 1])
    else
      rec_set(rec, list[i], list[i + 1])
    end
  end
end

local function rec_del(rec, ...)
  for _, name in ipairs({ ... }) do rec[rec_key(name)] = nil end
end

local function rec_incr(rec, name, by)
  local short = rec_key(name)
  local value = (tonumber(rec[short]) or 0) + by
  rec[short] = value
  return value
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
