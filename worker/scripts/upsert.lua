--[[ upsert: create or replace a credential and schedule it.

KEYS[1]  cred   credential record
KEYS[2]  due    partition due set
KEYS[3]  stats  partition counters
ARGV[1]  id       credential id
ARGV[2]  mode     "create" (refuse if it exists) | "replace"
ARGV[3]  due_ms   first refresh time
ARGV[4]  profile  profile id
ARGV[5]  rt_fp    fingerprint of the refresh token to write ("" for none)
ARGV[6..] field, value pairs (tokens already encoded by the store's codec)

Returns { "ok", created (0|1) } or { reason }: "exists", "busy" (a refresh
is in flight: replacing its tokens now could lose the rotated ones),
"spent" (the refresh token is one a rotation already replaced: sending it
again could revoke the grant).
]]
local ck, due_key, stats = KEYS[1], KEYS[2], KEYS[3]
local id, mode, due_ms, profile, rt_fp = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local rec = rec_load(ck)
local exists = rec ~= nil
if exists and mode == 'create' then return { 'exists' } end
if exists and rec_get(rec, 'intent') then return { 'busy' } end
if exists and rt_fp ~= '' and rec_is_spent(rec, rt_fp) then return { 'spent' } end
local now = now_ms()
if exists then
  local reason = rec_get(rec, 'reason')
  redis.call('HINCRBY', stats, 'status:' .. rec_get(rec, 'status'), -1)
  redis.call('HINCRBY', stats, 'profile:' .. rec_get(rec, 'profile'), -1)
  if reason then redis.call('HINCRBY', stats, 'failing:' .. reason, -1) end
  rec_del(rec, 'ambiguous_token', 'ambiguous_at', 'reason', 'extra', 'refresh_expires_at')
  rec_incr(rec, 'version', 1)
else
  rec = {}
  rec_set(rec, 'created_at', now)
  rec_set(rec, 'version', 0)
end
rec_set(rec, 'profile', profile)
rec_set(rec, 'status', 'active')
rec_set(rec, 'failures', 0)
rec_set(rec, 'updated_at', now)
rec_set_pairs(rec, ARGV, 6)
rec_save(ck, rec)
redis.call('HINCRBY', stats, 'status:active', 1)
redis.call('HINCRBY', stats, 'profile:' .. profile, 1)
redis.call('ZADD', due_key, due_ms, id)
if exists then return { 'ok', 0 } end
return { 'ok', 1 }
