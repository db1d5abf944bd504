--[[ ratelimit: one GCRA step for a profile's cluster-wide rate limit.

KEYS[1]  the profile's limiter key (a string: the theoretical arrival time,
         ms, of the next request; it expires when the limiter is idle)
ARGV[1]  emission interval in ms (1000 / rate), may be fractional
ARGV[2]  burst: requests allowed at once after an idle period (>= 1)
returns  0 when this request may go now (and it is counted), else the
         number of ms after which asking again can succeed (nothing counted)

The clock is the server's (TIME), so workers with skewed clocks share one
schedule. One key, one slot: the limiter is hash-tagged by profile.
]]
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - burst * interval
if allow_at > now then
  return math.max(1, math.ceil(allow_at - now))
end
redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.max(1, math.ceil(new_tat - now)))
return 0
