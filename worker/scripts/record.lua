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
  ambiguous_token = 'at', ambiguous_at = 'aa',
}
local REC_NUMBERS = {
  version = true, expires_at = true, refresh_expires_at = true, failures = true,
  last_error_at = true, created_at = true, updated_at = true, refreshed_at = true,
  intent_deadline = true, intent_at = true, ambiguous_at = true,
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

-- field, value, field, value ... (as HSET takes them)
local function rec_set_pairs(rec, list, first)
  for i = first, #list, 2 do rec_set(rec, list[i], list[i + 1]) end
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
