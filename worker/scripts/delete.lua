--[[ delete: remove a credential and everything that points at it.

KEYS[1]  cred   credential hash
KEYS[2]  lock   credential lock
KEYS[3]  due    partition due set
KEYS[4]  stats  partition counters
ARGV[1]  id     credential id
ARGV[2]  force  "1" to delete even while a refresh is in flight

Returns { "ok" } or { reason }: "missing", "busy".
]]
local ck, lk, due_key, stats = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local f = redis.call('HMGET', ck, 'status', 'profile', 'intent', 'reason')
if not f[1] then return { 'missing' } end
if ARGV[2] ~= '1' and ((f[3] and f[3] ~= '') or redis.call('EXISTS', lk) == 1) then
  return { 'busy' }
end
redis.call('DEL', ck, lk)
redis.call('ZREM', due_key, ARGV[1])
redis.call('HINCRBY', stats, 'status:' .. f[1], -1)
redis.call('HINCRBY', stats, 'profile:' .. f[2], -1)
if f[4] and f[4] ~= '' then redis.call('HINCRBY', stats, 'failing:' .. f[4], -1) end
return { 'ok' }
