--[[ rekey_profile: replace a profile's encrypted fields by the same secrets
under another key (`refreshd key rotate`), only if none changed since they
were read (a `profile update` may have written a new secret meanwhile).

KEYS[1]  profile  the profile hash
ARGV[1], ARGV[2], ARGV[3]  field, value read, new value (repeated per field:
         client_secret, secret_params)

Returns 'ok' (written), 'missing' (deleted meanwhile) or 'changed' (read it
again).
]]
local key = KEYS[1]
if redis.call('EXISTS', key) == 0 then return 'missing' end
for i = 1, #ARGV, 3 do
  if (redis.call('HGET', key, ARGV[i]) or '') ~= ARGV[i + 1] then return 'changed' end
end
for i = 1, #ARGV, 3 do
  redis.call('HSET', key, ARGV[i], ARGV[i + 2])
end
return 'ok'
