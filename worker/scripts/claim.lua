--[[ claim: lease due credentials of one partition to one worker.

KEYS[1]  due    sorted set of the partition (member = id, score = due ms)
KEYS[2]  stats  hash of the partition's counters (unused here, declared for the slot)
ARGV[1]  base   key prefix of the partition, e.g. "{refreshd:3}:"
ARGV[2]  limit  most credentials to claim
ARGV[3]  lease  milliseconds the claim lasts
ARGV[4]  token  claim token (unique per claim call); the lock value
ARGV[5]  ids    "" to take what is due now, else ids separated by "\n" to claim
                those ids whatever their due time ("refresh now")

Returns { now_ms, contended, item... } where each item is the array
  { id, due_ms, profile, refresh_token, token_type, scope,
    expires_at, version, failures, ambiguous_at, recovered, params, granted_scope,
    failing_since, refresh_expires_at }
(not the access token: the worker is about to replace it, and it is most
of a record's bytes)
`recovered` is "1" when the credential carried a spend intent past its
deadline: a request was sent and never answered. The intent becomes
`ambiguous_token` / `ambiguous_at` and the worker applies the rotation rule.

Re-scoring `due` to now + lease IS the lease: a worker that dies leaves its
credentials due again when the lease ends, without a reaper.
]]
local due_key = KEYS[1]
local base, limit, lease, token, ids_arg = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[5]
local now = now_ms()

local candidates = {}
if ids_arg == '' then
  local raw = redis.call('ZRANGE', due_key, '-inf', now, 'BYSCORE', 'LIMIT', 0, limit, 'WITHSCORES')
  for i = 1, #raw, 2 do candidates[#candidates + 1] = { raw[i], raw[i + 1] } end
else
  for id in string.gmatch(ids_arg, '[^\n]+') do
    local score = redis.call('ZSCORE', due_key, id)
    candidates[#candidates + 1] = { id, score or tostring(now) }
  end
end

local out = { now, 0 }
local contended = 0
for _, c in ipairs(candidates) do
  local id, score = c[1], c[2]
  local ck, lk = base .. 'cred:' .. id, base .. 'lock:' .. id
  local rec = rec_load(ck)
  local status = rec and rec_get(rec, 'status')
  if not status or status ~= 'active' then
    -- deleted or stopped credentials never stay scheduled
    redis.call('ZREM', due_key, id)
  else
    local ttl = redis.call('PTTL', lk)
    local intent = rec_get(rec, 'intent')
    local intent_deadline = tonumber(rec_get(rec, 'intent_deadline') or '0')
    if ttl > 0 then
      contended = contended + 1
      redis.call('ZADD', due_key, now + ttl, id)
    elseif intent and intent_deadline > now then
      -- a request is out and may still be answered: never race it
      contended = contended + 1
      redis.call('ZADD', due_key, intent_deadline, id)
    else
      local recovered = '0'
      local ambiguous_at = rec_get(rec, 'ambiguous_at') or ''
      if intent then
        recovered = '1'
        if ambiguous_at == '' then ambiguous_at = rec_get(rec, 'intent_at') or '' end
        rec_set(rec, 'ambiguous_token', intent)
        rec_set(rec, 'ambiguous_at', ambiguous_at)
        rec_del(rec, 'intent', 'intent_rt', 'intent_deadline', 'intent_at')
        rec_save(ck, rec)
      end
      redis.call('SET', lk, token, 'PX', lease)
      redis.call('ZADD', due_key, now + lease, id)
      out[#out + 1] = { id, score, rec_get(rec, 'profile') or '',
        rec_get(rec, 'refresh_token') or '',
        rec_get(rec, 'token_type') or '', rec_get(rec, 'scope') or '',
        rec_get(rec, 'expires_at') or '0', rec_get(rec, 'version') or '0',
        rec_get(rec, 'failures') or '0', ambiguous_at, recovered, rec_get(rec, 'params') or '',
        rec_get(rec, 'granted_scope') or '',
        rec_get(rec, 'failing_since') or '', rec_get(rec, 'refresh_expires_at') or '' }
    end
  end
end
out[2] = contended
return out
