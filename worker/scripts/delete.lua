--[[ delete: remove a credential and everything that points at it.

KEYS[1]  cred   credential record
KEYS[2]  lock   credential lock
KEYS[3]  due    partition due set
KEYS[4]  stats  partition counters
ARGV[1]  id     credential id
ARGV[2]  force  "1" to delete even while a refresh is in flight

Returns { "ok" } or { reason }: "missing", "busy".
]]
local ck, lk, due_key, stats = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local rec = rec_load(ck)
if not rec then return { 'missing' } end
if ARGV[2] ~= '1' and (rec_get(rec, 'intent') or redis.call('EXISTS', lk) == 1) then
  return { 'busy' }
end
local reason = rec_get(rec, 'reason')
redis.call('DEL', ck, lk)
redis.call('ZREM', due_key, ARGV[1])
redis.call('HINCRBY', stats, 'status:' .. rec_get(rec, 'status'), -1)
redis.call('HINCRBY', stats, 'profile:' .. rec_get(rec, 'profile'), -1)
if reason then redis.call('HINCRBY', stats, 'failing:' .. reason, -1) end
return { 'ok' }
