--[[ filter: which of some credentials of one partition match an operator
listing's filter, decided here so that only matching ids come back (a
listing by status over 20,000 credentials returns a handful of ids, not
20,000 records).

KEYS[1..n]  cred   credential records, all of one partition
ARGV[1]     status the status to keep ("" keeps any)
ARGV[2]     profile the profile to keep ("" keeps any)
ARGV[3..]   ids    the credential ids, in KEYS order

Returns the ids that exist and match, in KEYS order.
]]
local want_status, want_profile = ARGV[1], ARGV[2]
local out = {}
for i, key in ipairs(KEYS) do
  local rec = rec_load(key)
  if rec
    and (want_status == '' or (rec_get(rec, 'status') or 'active') == want_status)
    and (want_profile == '' or rec_get(rec, 'profile') == want_profile)
  then
    out[#out + 1] = ARGV[i + 2]
  end
end
return out
