--[[ spend: record the intent to send a refresh token, just before sending.

KEYS[1]  cred   credential record
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
local rec = rec_load(ck)
if not rec or rec_get(rec, 'status') ~= 'active' then return { 'inactive' } end
if rec_get(rec, 'version') ~= version then return { 'stale' } end
if rec_get(rec, 'intent') then return { 'busy' } end
local now = now_ms()
local grace = tonumber(ARGV[7])
local ambiguous_at = rec_get(rec, 'ambiguous_at')
if ambiguous_at and grace >= 0 and now + timeout + margin >= tonumber(ambiguous_at) + grace then
  return { 'grace_over' }
end
local deadline = now + timeout + margin
local need = timeout + 2 * margin
if redis.call('PTTL', lk) < need then
  redis.call('PEXPIRE', lk, need)
  redis.call('ZADD', due_key, now + need, ARGV[6])
end
rec_set(rec, 'intent', token)
rec_set(rec, 'intent_rt', ARGV[5])
rec_set(rec, 'intent_deadline', deadline)
rec_set(rec, 'intent_at', now)
rec_save(ck, rec)
return { 'ok', now, deadline }
