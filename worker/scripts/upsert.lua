--[[ upsert: create or replace a credential and schedule it.

KEYS[1]  cred   credential hash
KEYS[2]  due    partition due set
KEYS[3]  stats  partition counters
ARGV[1]  id       credential id
ARGV[2]  mode     "create" (refuse if it exists) | "replace"
ARGV[3]  due_ms   first refresh time
ARGV[4]  profile  profile id
ARGV[5..] field, value pairs (tokens already encoded by the store's codec)

Returns { "ok", created (0|1) } or { reason }: "exists", "busy" (a refresh
is in flight: replacing its tokens now could lose the rotated ones).
]]
local ck, due_key, stats = KEYS[1], KEYS[2], KEYS[3]
local id, mode, due_ms, profile = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local f = redis.call('HMGET', ck, 'status', 'profile', 'intent', 'reason')
local exists = f[1] ~= false
if exists and mode == 'create' then return { 'exists' } end
if f[3] and f[3] ~= '' then return { 'busy' } end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if exists then
  redis.call('HINCRBY', stats, 'status:' .. f[1], -1)
  redis.call('HINCRBY', stats, 'profile:' .. f[2], -1)
  if f[4] and f[4] ~= '' then redis.call('HINCRBY', stats, 'failing:' .. f[4], -1) end
  redis.call('HDEL', ck, 'ambiguous_token', 'ambiguous_at', 'reason', 'extra',
    'refresh_expires_at')
  redis.call('HINCRBY', ck, 'version', 1)
else
  redis.call('HSET', ck, 'created_at', now, 'version', 0)
end
redis.call('HSET', ck, 'profile', profile, 'status', 'active', 'failures', 0, 'updated_at', now)
if #ARGV >= 5 then redis.call('HSET', ck, unpack(ARGV, 5)) end
redis.call('HINCRBY', stats, 'status:active', 1)
redis.call('HINCRBY', stats, 'profile:' .. profile, 1)
redis.call('ZADD', due_key, due_ms, id)
if exists then return { 'ok', 0 } end
return { 'ok', 1 }
