--[[ get: read one credential for an operator or a test (never the hot path).

KEYS[1]  cred   credential record
KEYS[2]  due    partition due set
KEYS[3]  lock   credential lock
ARGV[1]  id     credential id

Returns { fields, due_ms or false, locked (0|1) } where fields is a flat
field, value list as HGETALL gave it (names as the store documents them),
or {} when there is no such credential.
]]
local rec = rec_load(KEYS[1])
if not rec then return {} end
local fields = {}
for name, _ in pairs(REC_KEYS) do
  local value = rec_get(rec, name)
  if value then
    fields[#fields + 1] = name
    fields[#fields + 1] = value
  end
end
return { fields, redis.call('ZSCORE', KEYS[2], ARGV[1]), redis.call('EXISTS', KEYS[3]) }
