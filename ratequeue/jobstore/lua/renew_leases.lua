-- renew_leases: extend (or drop) the leases an owner still holds on jobs of one batch.
--
-- KEYS[1]  claims hash   custom_id -> "<owner> <lease expiry in ms>"
-- ARGV[1]  owner
-- ARGV[2]  lease in ms from now; 0 drops the leases (a run cancelled at shutdown)
-- ARGV[3..] custom_ids
--
-- Only leases this owner still holds are touched: a job it deferred (lease dropped) stays free,
-- and a deleted batch's claims are never recreated. Returns how many leases were touched.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prefix = ARGV[1] .. ' '
local n = 0
for i = 3, #ARGV do
  local claim = redis.call('HGET', KEYS[1], ARGV[i])
  if claim and string.sub(claim, 1, #prefix) == prefix then
    if tonumber(ARGV[2]) > 0 then
      redis.call('HSET', KEYS[1], ARGV[i], prefix .. (now + tonumber(ARGV[2])))
    else
      redis.call('HDEL', KEYS[1], ARGV[i])
    end
    n = n + 1
  end
end
return n
