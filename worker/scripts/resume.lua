--[[ resume: put a stopped credential back in service (operator action).

KEYS[1]  cred   credential record
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
local rec = rec_load(ck)
if not rec then return { 'missing' } end
local status, reason = rec_get(rec, 'status'), rec_get(rec, 'reason')
if status == 'active' then return { 'active' } end
if rec_get(rec, 'intent') then return { 'busy' } end
local now = now_ms()
if reason then redis.call('HINCRBY', stats, 'failing:' .. reason, -1) end
rec_del(rec, 'ambiguous_token', 'ambiguous_at', 'reason')
rec_set(rec, 'status', 'active')
rec_set(rec, 'failures', 0)
rec_set(rec, 'updated_at', now)
rec_save(ck, rec)
redis.call('HINCRBY', stats, 'status:' .. status, -1)
redis.call('HINCRBY', stats, 'status:active', 1)
redis.call('ZADD', due_key, now, ARGV[1])
return { 'ok', status }
