--[[ commit: record the outcome of a refresh, atomically with its event.

KEYS[1]  cred   credential hash
KEYS[2]  lock   credential lock
KEYS[3]  due    partition due set
KEYS[4]  stats  partition counters
ARGV[1]  token    claim token
ARGV[2]  version  version read at claim
ARGV[3]  outcome  refreshed | retry | needs_reauth | quarantined | release
ARGV[4]  next_due ms of the next refresh; "now" for the server's now; "" to unschedule
ARGV[5]  channel  pub/sub channel of events
ARGV[6]  event    JSON message to publish ("" for none)
ARGV[7]  id       credential id (member of due)
ARGV[8]  reason   failure reason ("" on success); kept in `reason`, and the
                  partition counters `failing:<reason>` count credentials by
                  their current failure, so `status` needs no scan
ARGV[9..] field, value pairs to write into the credential hash

Ownership: `refreshed` needs our open spend intent, not the lock: the
provider already answered, so these are the newest tokens and must land even
if the lease lapsed. Our intent recovered as ambiguous by another claim
(a late answer) still lands when the version is unchanged - even while a
grace retry is out, whose own commit then lands on top of it (newest wins)
and whose failure then leaves these tokens in place. Other outcomes need our open intent, or no intent and our
lock, and the version read at claim: a failure decided on an older snapshot
must not override newer tokens. A stale outcome still clears our own
intent and lock, since our request is over.

Returns { "ok", lease_lost (0|1), now_ms } or { reason }: "gone", "stale".
]]
local ck, lk, due_key, stats = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local token, version, outcome, next_due = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local f = redis.call('HMGET', ck, 'status', 'version', 'intent', 'ambiguous_token', 'reason')
if not f[1] then return { 'gone' } end
local status, intent, amb = f[1], f[3] or '', f[4] or ''
local lock_owner = redis.call('GET', lk)
local function release_own()
  if intent == token then
    redis.call('HDEL', ck, 'intent', 'intent_rt', 'intent_deadline', 'intent_at')
  end
  if lock_owner == token then redis.call('DEL', lk) end
end
if outcome == 'refreshed' then
  local late = amb == token and f[2] == version
  if intent ~= token and not late then return { 'stale' } end
else
  if not (intent == token or (intent == '' and lock_owner == token)) then return { 'stale' } end
  if f[2] ~= version then
    release_own()
    return { 'stale' }
  end
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if #ARGV >= 9 then redis.call('HSET', ck, unpack(ARGV, 9)) end
local old_reason, new_reason = f[5] or '', ARGV[8]
if outcome ~= 'release' and old_reason ~= new_reason then
  if old_reason ~= '' then redis.call('HINCRBY', stats, 'failing:' .. old_reason, -1) end
  if new_reason ~= '' then redis.call('HINCRBY', stats, 'failing:' .. new_reason, 1) end
  redis.call('HSET', ck, 'reason', new_reason)
end
redis.call('HSET', ck, 'updated_at', now)
if intent == token then
  redis.call('HDEL', ck, 'intent', 'intent_rt', 'intent_deadline', 'intent_at')
end

local new_status = status
local event = ARGV[6]
if outcome == 'refreshed' then
  local new_version = redis.call('HINCRBY', ck, 'version', 1)
  if event ~= '' and new_version ~= tonumber(version) + 1 then
    -- a late answer landed meanwhile: the event must carry the stored version
    local body = cjson.decode(event)
    body['version'] = new_version
    event = cjson.encode(body)
  end
  redis.call('HSET', ck, 'failures', 0, 'refreshed_at', now)
  redis.call('HDEL', ck, 'ambiguous_token', 'ambiguous_at')
  new_status = 'active'
elseif outcome == 'retry' then
  redis.call('HINCRBY', ck, 'failures', 1)
  redis.call('HSET', ck, 'last_error_at', now)
elseif outcome == 'needs_reauth' or outcome == 'quarantined' then
  redis.call('HINCRBY', ck, 'failures', 1)
  redis.call('HSET', ck, 'last_error_at', now)
  new_status = outcome
end
if new_status ~= status then
  redis.call('HSET', ck, 'status', new_status)
  redis.call('HINCRBY', stats, 'status:' .. status, -1)
  redis.call('HINCRBY', stats, 'status:' .. new_status, 1)
end

if new_status ~= 'active' or next_due == '' then
  redis.call('ZREM', due_key, ARGV[7])
elseif next_due == 'now' then
  redis.call('ZADD', due_key, now, ARGV[7])
else
  redis.call('ZADD', due_key, next_due, ARGV[7])
end

local lease_lost = 1
if lock_owner == token then
  redis.call('DEL', lk)
  lease_lost = 0
end
if event ~= '' then redis.call('PUBLISH', ARGV[5], event) end
return { 'ok', lease_lost, now }
