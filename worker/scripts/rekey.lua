--[[ rekey: replace a credential's encrypted fields by the same secrets under
another key (`refreshd key rotate`), only if nothing changed since they were
read, and never under a refresh in flight.

KEYS[1]  cred   credential record
KEYS[2]  lock   credential lock
ARGV[1]  version  the record's version when it was read
ARGV[2], ARGV[3], ARGV[4]  field, value read, new value (repeated per field;
         the fields are the store's SECRET_FIELDS)

Returns 'ok' (written), 'missing' (deleted meanwhile), 'busy' (locked or a
spend intent open before its deadline: a refresh is in flight; try again later, its commit may
write new tokens at any moment) or 'changed' (the version or a value is not
what was read: a refresh, an import or another rotation got there first;
read it again). The version is not changed: the secrets are the same, only
their encryption is, and consumers and commits keep comparing versions.
]]
local ck, lk = KEYS[1], KEYS[2]
local rec = rec_load(ck)
if not rec then return 'missing' end
-- a lock, or a spend intent whose request may still be answered (the claim's
-- own rule): a refresh is in flight. An intent past its deadline belongs to
-- no live request (the next claim recovers it), and a stopped credential
-- may keep one for good: neither blocks the rotation.
local deadline = tonumber(rec_get(rec, 'intent_deadline') or '0') or 0
if redis.call('EXISTS', lk) == 1 or (rec_get(rec, 'intent') and deadline > now_ms()) then
  return 'busy'
end
if (rec_get(rec, 'version') or '0') ~= ARGV[1] then return 'changed' end
for i = 2, #ARGV, 3 do
  if (rec_get(rec, ARGV[i]) or '') ~= ARGV[i + 1] then return 'changed' end
end
for i = 2, #ARGV, 3 do
  rec_set(rec, ARGV[i], ARGV[i + 2])
end
rec_save(ck, rec)
return 'ok'
