--[[ resume: put a stopped credential back in service (operator action).

KEYS[1]  cred   credential hash
KEYS[2]  due    partition due set
KEYS[3]  stats  partition counters
ARGV[1]  id     credential id

For `needs_reauth` after the cause was fixed (say, the profile's secret),
and for `quarantined` once the operator has established that the refresh
token was not used (resuming sends it again). Clears the failure state and
makes the credential due now.

Returns { "ok", previous status } or { reason }: "missing", "active" (nothing
to resume), "busy".
]]
local ck, due_key, stats = KEYS[1], KEYS[2], KEYS[3]
local f = redis.call('HMGET', ck, 'status', 'intent', 'reason')
if not f[1] then return { 'missing' } end
if f[1] == 'active' then return { 'active' } end
if f[2] and f[2] ~= '' then return { 'busy' } end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if f[3] and f[3] ~= '' then redis.call('HINCRBY', stats, 'failing:' .. f[3], -1) end
redis.call('HDEL', ck, 'ambiguous_token', 'ambiguous_at', 'reason')
redis.call('HSET', ck, 'status', 'active', 'failures', 0, 'updated_at', now)
redis.call('HINCRBY', stats, 'status:' .. f[1], -1)
redis.call('HINCRBY', stats, 'status:active', 1)
redis.call('ZADD', due_key, now, ARGV[1])
return { 'ok', f[1] }
