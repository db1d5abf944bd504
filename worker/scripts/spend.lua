--[[ spend: record the intent to send a refresh token, just before sending.

KEYS[1]  cred   credential hash
KEYS[2]  lock   credential lock
KEYS[3]  due    partition due set
ARGV[1]  token    claim token (must still own the lock)
ARGV[2]  version  version read at claim (tokens unchanged since)
ARGV[3]  timeout  ms the HTTP request may take
ARGV[4]  margin   ms of safety between the request deadline and the lease end
ARGV[5]  rt_hash  fingerprint of the refresh token about to be sent
ARGV[6]  id       credential id (member of due)
ARGV[7]  grace    ms the provider accepts a refresh token again after an
                  unanswered send ("-1": always, it does not rotate)

Returns { "ok", now_ms, deadline_ms } or { reason } with reason one of
  "lost" (lock not ours), "inactive", "stale" (version moved), "busy",
  "grace_over" (an earlier send of this token went unanswered and this
  request could end after the provider's reuse window: never send it).

The grace check runs here, on Redis time, as the last step before the
request leaves: a worker's clock or a wait for a rate-limit slot between
the claim and now cannot stretch the window.

The lease is renewed to outlive the request deadline, so a lock can never
lapse while its request is in flight; and while the intent is open no other
worker may send, even after the lease, until the deadline has passed and
the unknown-outcome rule has been applied.
]]
local ck, lk, due_key = KEYS[1], KEYS[2], KEYS[3]
local token, version, timeout, margin = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
if redis.call('GET', lk) ~= token then return { 'lost' } end
local f = redis.call('HMGET', ck, 'status', 'version', 'intent', 'ambiguous_at')
if f[1] ~= 'active' then return { 'inactive' } end
if f[2] ~= version then return { 'stale' } end
if f[3] and f[3] ~= '' then return { 'busy' } end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local grace = tonumber(ARGV[7])
if f[4] and f[4] ~= '' and grace >= 0 and now + timeout + margin >= tonumber(f[4]) + grace then
  return { 'grace_over' }
end
local deadline = now + timeout + margin
local need = timeout + 2 * margin
if redis.call('PTTL', lk) < need then
  redis.call('PEXPIRE', lk, need)
  redis.call('ZADD', due_key, now + need, ARGV[6])
end
redis.call('HSET', ck, 'intent', token, 'intent_rt', ARGV[5],
  'intent_deadline', deadline, 'intent_at', now)
return { 'ok', now, deadline }
