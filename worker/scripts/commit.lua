--[[ commit: record the outcome of a refresh, atomically with its event.

KEYS[1]  cred   credential record
KEYS[2]  lock   credential lock
KEYS[3]  due    partition due set
KEYS[4]  stats  partition counters
KEYS[5]  log    partition event log stream (worker.eventlog)
ARGV[1]  token    claim token
ARGV[2]  version  version read at claim
ARGV[3]  outcome  refreshed | retry | needs_reauth | quarantined | release
ARGV[4]  next_due ms of the next refresh; "now" for the server's now; "" to unschedule
ARGV[5]  channel  pub/sub channel of events; a hash-tagged one ("{...}", the
                  partition's own on a Redis Cluster) is a shard channel,
                  published with SPUBLISH so the event stays on this shard
ARGV[6]  event    JSON message to publish ("" for none)
ARGV[7]  id       credential id (member of due)
ARGV[8]  reason   failure reason ("" on success); kept in `reason`, and the
                  partition counters `failing:<reason>` count credentials by
                  their current failure, so `status` needs no scan
ARGV[9]  log_on   "1": append the event to the log too; "0": publish only
ARGV[10] max_age  ms: trim log entries older than this (MINID ~); 0 none
ARGV[11] max_len  entries this partition's log keeps (MAXLEN ~); 0 none
ARGV[12..] field, value pairs to write into the credential record; on
          `refreshed` they are applied after `failures` and `last_error`
          are reset and the ambiguous mark cleared, so they may set those
          again (a partial answer), and a
          `spent_rt` value joins the spent list (record.lua)

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
local rec = rec_load(ck)
if not rec then return { 'gone' } end
local status, stored_version = rec_get(rec, 'status'), rec_get(rec, 'version')
local intent, amb = rec_get(rec, 'intent') or '', rec_get(rec, 'ambiguous_token') or ''
local lock_owner = redis.call('GET', lk)
local function release_own()
  if intent == token then
    rec_del(rec, 'intent', 'intent_rt', 'intent_deadline', 'intent_at')
    rec_save(ck, rec)
  end
  if lock_owner == token then redis.call('DEL', lk) end
end
if outcome == 'refreshed' then
  local late = amb == token and stored_version == version
  if intent ~= token and not late then return { 'stale' } end
else
  if not (intent == token or (intent == '' and lock_owner == token)) then return { 'stale' } end
  if stored_version ~= version then
    release_own()
    return { 'stale' }
  end
end

local now = now_ms()
local old_reason, new_reason = rec_get(rec, 'reason') or '', ARGV[8]
if outcome == 'refreshed' then
  -- before the caller's fields, which may set them again (a partial answer
  -- keeps counting failures; an unconfirmed refresh token sets ambiguous_at)
  rec_set(rec, 'failures', 0)
  rec_del(rec, 'ambiguous_token', 'ambiguous_at', 'last_error', 'last_error_at')
end
rec_set_pairs(rec, ARGV, 12)
if outcome ~= 'release' and old_reason ~= new_reason then
  if old_reason ~= '' then redis.call('HINCRBY', stats, 'failing:' .. old_reason, -1) end
  if new_reason ~= '' then redis.call('HINCRBY', stats, 'failing:' .. new_reason, 1) end
  rec_set(rec, 'reason', new_reason)
end
rec_set(rec, 'updated_at', now)
if intent == token then
  rec_del(rec, 'intent', 'intent_rt', 'intent_deadline', 'intent_at')
end

local new_status = status
local event = ARGV[6]
local event_version, event_type, event_schema = version, nil, nil
if outcome == 'refreshed' then
  local new_version = rec_incr(rec, 'version', 1)
  event_version = new_version
  if event ~= '' and new_version ~= tonumber(version) + 1 then
    -- a late answer landed meanwhile: the event must carry the stored version
    local body = cjson.decode(event)
    body['version'] = new_version
    event_type, event_schema = body['type'], body['schema']
    event = cjson.encode(body)
  end
  rec_set(rec, 'refreshed_at', now)
  new_status = 'active'
elseif outcome == 'retry' then
  rec_incr(rec, 'failures', 1)
  rec_set(rec, 'last_error_at', now)
elseif outcome == 'needs_reauth' or outcome == 'quarantined' then
  rec_incr(rec, 'failures', 1)
  rec_set(rec, 'last_error_at', now)
  new_status = outcome
end
if new_status ~= status then
  rec_set(rec, 'status', new_status)
  redis.call('HINCRBY', stats, 'status:' .. status, -1)
  redis.call('HINCRBY', stats, 'status:' .. new_status, 1)
end
rec_save(ck, rec)

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
if event ~= '' then
  redis.call(string.byte(ARGV[5]) == 123 and 'SPUBLISH' or 'PUBLISH', ARGV[5], event)
  if ARGV[9] == '1' then
    -- the entry's fields are a stable contract (README "Event log"): v, type,
    -- id, version, json. worker.events.build_event starts every event with
    -- schema and type, so a match reads them without decoding the event.
    if not event_type then
      event_schema, event_type = string.match(event, '^{"schema":(%d+),"type":"([^"]*)"')
    end
    local max_age, max_len = tonumber(ARGV[10]), tonumber(ARGV[11])
    -- the age trim never passes the entry before this one: a consumer that
    -- has read everything sits on it, and after a long quiet spell must
    -- not see its position trimmed away when nothing was lost
    local min_id = now - max_age
    if max_age > 0 then
      local last = redis.call('XREVRANGE', KEYS[5], '+', '-', 'COUNT', 1)[1]
      if last and tonumber(string.match(last[1], '^(%d+)')) < min_id then min_id = last[1] end
    end
    if max_len > 0 then
      redis.call('XADD', KEYS[5], 'MAXLEN', '~', max_len, '*', 'v', event_schema or '',
                 'type', event_type or '', 'id', ARGV[7], 'version', event_version, 'json', event)
    else
      redis.call('XADD', KEYS[5], '*', 'v', event_schema or '', 'type', event_type or '',
                 'id', ARGV[7], 'version', event_version, 'json', event)
    end
    if max_age > 0 then redis.call('XTRIM', KEYS[5], 'MINID', '~', min_id) end
  end
end
return { 'ok', lease_lost, now }
